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


def new_memory(method_cls, model, hparams: dict, state: dict | None = None) -> "Memory | None":
    """The method's memory on `model`, from `state` (empty without), configured; None for a method
    that keeps none (no `memory_type`)."""
    memory_type = getattr(method_cls, "memory_type", None)
    if memory_type is None:
        return None
    memory = memory_type(method_cls.memory_modules(model, hparams), method_cls.memory_widths(model, hparams), state=state or None)
    memory.configure(model, hparams)
    return memory


class Memory:
    """Row tables per module: fields -> np.ndarray [n, ...] (GRACE's and WISE's fields have n rows
    each; MEMOIR's masks grow by the edit while its other fields keep one row)."""

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

    def configure(self, model, hparams: dict) -> None:
        """Settings the hook reads from the model and the method's hparams (new_memory calls
        it); nothing by default."""

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


def mlp_activation(model):
    """The model's MLP activation function (config.hidden_act; GPT-2, GPT-J: activation_function)."""
    from transformers.activations import ACT2FN

    name = getattr(model.config, "hidden_act", None) or getattr(model.config, "activation_function", None)
    if name not in ACT2FN:
        raise EditscaleError(f"the model's MLP activation {name!r} is not one of transformers' ACT2FN")
    return ACT2FN[name]


def activation_distances(act, main: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """||act(side) - act(main)|| per position ([rows, positions]): WISE's distance (the reference's
    `euc` before its mean over positions), read by the router and by the training loss."""
    return torch.norm(act(side) - act(main), dim=-1)


def side_output(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`module`'s output on x with `weight` (the module's stored orientation) in place of its own,
    its bias kept: GPT-2's Conv1D as transformers computes it (addmm with the (in, out) weight),
    a Linear as F.linear."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])
    return torch.nn.functional.linear(x, weight, getattr(module, "bias", None))


class SideMemory(Memory):
    """WISE's side memory at one module (editscale.edit.wise): row 0 the side weight being
    trained, rows 1.. the knowledge shards in order (`active` 0: a row freed by a merge), each
    with its routing threshold's base (the smallest in-scope activation of its edits).

    Routing, per sequence of a batch: d(W) = the mean over its real positions (their maximum past
    100 positions) of ||act(x W^T) - act(main output)||; the side weight's output when d >=
    act_ratio x its min_act, else the main output; then each shard whose d is larger than the best
    so far and than its own threshold."""

    fields = {"weights": (np.dtype(np.float32), "side weight (the module's stored orientation)"),
              "min_act": (np.dtype(np.float64), "smallest in-scope activation"),
              "active": (np.dtype(np.int8), "1: in use")}
    LONG_SEQUENCE = 100  # the reference's `euc(..., infer=True)`: past 100 positions, the largest distance

    def __init__(self, modules, widths, state=None):
        super().__init__(modules, widths, state)
        self.act = None
        self.act_ratio = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def configure(self, model, hparams: dict) -> None:
        self.act, self.act_ratio = mlp_activation(model), float(hparams["act_ratio"])

    def apply(self, op: MemoryOp) -> None:
        super().apply(op)
        if op.field == "weights":
            self._cache = {k: v for k, v in self._cache.items() if not (k[0] == op.module and k[1] in set(op.rows.tolist()))}

    def attach(self, model) -> list:
        if self.act is None:
            raise EditscaleError("SideMemory.configure(model, hparams) must be called before attach (new_memory does)")
        self._modules = {m: get_module(model, m) for m in self.modules}

        def keep_mask(module, args, kwargs):
            self._mask = kwargs.get("attention_mask")

        return [model.register_forward_pre_hook(keep_mask, with_kwargs=True), *super().attach(model)]

    def _weight(self, module: str, row: int, like: torch.Tensor) -> torch.Tensor:
        key = (module, row)
        if key not in self._cache or self._cache[key].device != like.device or self._cache[key].dtype != like.dtype:
            self._cache[key] = torch.from_numpy(self.tables[module]["weights"][row]).to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _distance(self, main: torch.Tensor, side: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """float64 [batch]: each sequence's distance over its real positions."""
        norms = activation_distances(self.act, main, side)  # [batch, positions]
        out = []
        for b in range(norms.shape[0]):
            row = norms[b] if bool(real[b].all()) else norms[b][real[b]]
            out.append(row.max() if row.numel() > self.LONG_SEQUENCE else row.mean())
        return torch.stack(out).double()

    def rewrite(self, module: str, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        t = self.tables[module]
        if len(t["weights"]) == 0:
            return output
        mod = self._modules[module]
        n = output.shape[1]
        real = (self._mask[:, -n:] != 0) if self._mask is not None and self._mask.dim() == 2 else torch.ones(output.shape[:2], dtype=torch.bool)
        real = real.to(output.device)
        side = side_output(mod, inputs, self._weight(module, 0, output))
        best = self._distance(output, side, real)
        pick = best >= float(t["min_act"][0]) * self.act_ratio
        result = torch.where(pick[:, None, None], side, output)
        for r in range(1, len(t["weights"])):
            if not t["active"][r]:
                continue
            shard = side_output(mod, inputs, self._weight(module, r, output))
            d = self._distance(output, shard, real)
            pick = (d > best) & (d > float(t["min_act"][r]) * self.act_ratio)
            result = torch.where(pick[:, None, None], shard, result)
            best = torch.where(pick, d, best)
        return result
