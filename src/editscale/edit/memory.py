"""Method state beyond weight deltas: a memory attached to one module by a forward hook.

A memory is a set of row tables per module (e.g. GRACE's codebook: keys, values, deferral radii,
labels), changed only through `MemoryOp`s (rows of one field set to new values; an index equal to
the table's length appends), so that every change is recorded and replays exactly, as weight
updates are (`weights.Update`). The chain keeps

- the whole memory after a checkpoint in its delta file (group "memory", `module/field` datasets),
- each edit's ops in its segment's factors file (group "memory_ops"),

so the model after any edit k is the delta's weights plus the memory of the checkpoint before k
with the ops up to k applied (`chain.attach_memory`). Every metric evaluates the model with its
memory attached (`chain.model_at`, `chain.states_in_segment`): a forward hook on the module the
method names (the architecture registry's module names), never a fork of the model code.

Kinds of memory are subclasses of `Memory` implementing `rewrite(module, inputs, output)`, the
hook's change of the module's output; the method class names its kind (`EditMethod.memory_type`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..io import EditscaleError
from ..models.registry import get_module


@dataclasses.dataclass
class MemoryOp:
    """Rows `rows` of field `field` of `module`'s memory set to `values` ([len(rows), ...])."""

    module: str
    field: str
    rows: np.ndarray  # int64 row indices; an index equal to the table's length appends
    values: np.ndarray


def set_rows(table: np.ndarray, rows, values) -> np.ndarray:
    """`table` with `rows` set to `values`, in place (an index at or past its length grows it into a
    new array, returned): the one way a memory changes, in the chain, in replay and in the audit."""
    rows = np.asarray(rows, dtype=np.int64)
    values = np.asarray(values, dtype=table.dtype).reshape(len(rows), *table.shape[1:])
    grow = int(rows.max()) + 1 - len(table) if len(rows) else 0
    if grow > 0:
        table = np.concatenate([table, np.zeros((grow, *table.shape[1:]), dtype=table.dtype)])
    table[rows] = values
    return table


def tables_from_ops(ops, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `module/field` tables that `ops` (MemoryOps, in order) build from empty, in the row
    shapes and dtypes of `like`: each sized once to its final length, so n appends cost O(n) rather
    than a growing copy each (the audit's re-derivation of a whole chain)."""
    ops = list(ops)
    size: dict[str, int] = {}
    for op in ops:
        if len(op.rows):
            key = f"{op.module}/{op.field}"
            size[key] = max(size.get(key, 0), int(np.max(op.rows)) + 1)
    tables = {key: np.zeros((size.get(key, 0), *arr.shape[1:]), dtype=arr.dtype) for key, arr in like.items()}
    for op in ops:
        key = f"{op.module}/{op.field}"
        tables[key] = set_rows(tables[key], op.rows, op.values)
    return tables


class Memory:
    """Row tables per module: fields -> np.ndarray [n, ...] (all fields of a module have n rows)."""

    fields: dict[str, tuple[np.dtype, str]] = {}  # field -> (dtype, what a row is)

    def __init__(self, modules: list[str], widths: dict[str, dict[str, tuple[int, ...]]], state: dict[str, np.ndarray] | None = None):
        self.modules = list(modules)
        self.tables: dict[str, dict[str, np.ndarray]] = {
            m: {f: np.zeros((0, *widths[m][f]), dtype=dt) for f, (dt, _) in self.fields.items()} for m in self.modules}
        self.ops: list[MemoryOp] = []
        for key, arr in (state or {}).items():
            module, _, field = key.rpartition("/")
            if module not in self.tables or field not in self.fields:
                raise EditscaleError(f"memory state {key!r} names no field of {sorted(self.fields)} of the modules {self.modules}")
            expected = self.tables[module][field].shape[1:]
            if tuple(arr.shape[1:]) != tuple(expected):
                raise EditscaleError(f"memory state {key!r} has rows of shape {tuple(arr.shape[1:])}, expected {tuple(expected)}")
            self.tables[module][field] = np.array(arr, dtype=self.fields[field][0])

    def size(self, module: str) -> int:
        return len(next(iter(self.tables[module].values()))) if self.fields else 0

    def apply(self, op: MemoryOp) -> None:
        """Set the op's rows (append at index n), and record it (`take_ops`)."""
        self.tables[op.module][op.field] = set_rows(self.tables[op.module][op.field], op.rows, op.values)
        self.ops.append(op)

    def take_ops(self) -> list[MemoryOp]:
        out, self.ops = self.ops, []
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{m}/{f}": t.copy() for m, fs in self.tables.items() for f, t in fs.items()}

    # -- the hook ----------------------------------------------------------------------------

    def rewrite(self, module: str, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The module's output with the memory in place (subclasses)."""
        raise NotImplementedError

    def attach(self, model) -> list:
        """Forward hooks that rewrite each memory module's output; returns their handles."""
        handles = []
        for m in self.modules:
            def hook(module, args, output, name=m):
                out = output[0] if isinstance(output, tuple) else output
                new = self.rewrite(name, args[0], out)
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handles.append(get_module(model, m).register_forward_hook(hook))
        return handles


class Codebook(Memory):
    """GRACE's codebook at one module: keys (module inputs of edited prompts), values (the output
    that replaces the module's), deferral radii, and labels (the edit's target, as a 63-bit hash)."""

    fields = {"keys": (np.dtype(np.float32), "module input"), "values": (np.dtype(np.float32), "module output"),
              "radii": (np.dtype(np.float32), "deferral radius"), "labels": (np.dtype(np.int64), "target label")}

    def rewrite(self, module: str, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Every position whose input lies within the deferral radius of its nearest key gets that
        key's value as the module's output; the others pass unchanged."""
        t = self.tables[module]
        if len(t["keys"]) == 0:
            return output
        keys = torch.from_numpy(t["keys"]).to(inputs.device)
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        dist = torch.cdist(flat, keys)  # [positions, n]
        nearest_dist, nearest = dist.min(dim=1)
        radii = torch.from_numpy(t["radii"]).to(inputs.device)
        hit = nearest_dist <= radii[nearest]
        if not bool(hit.any()):
            return output
        values = torch.from_numpy(t["values"]).to(device=output.device, dtype=output.dtype)
        out = output.reshape(-1, output.shape[-1]).clone()
        out[hit] = values[nearest[hit]]
        return out.reshape(output.shape)
