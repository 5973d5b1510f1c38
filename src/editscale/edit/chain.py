"""The sequential edit chain, in segments, with exact checkpoints.

Segment ending at edit k reads the cumulative delta after edit k - segment and writes:

  deltas/{k:06d}.h5   one fp32 dataset per edited module: D_k = W_k - W_0, (out, in) orientation;
                      attrs: model_sha256, k, config_hash, content_sha256, factors_content_sha256,
                      prev_delta_content_sha256, provenance
  factors/{k:06d}.h5  updates/{i:06d}: u, v fp32 (kind lowrank), dense fp32 (dense), or u, v fp64
                      and mask_bits (masked: np.packbits of the out x in mask, RECT) of every
                      update in application order, attrs module, kind, step, edit_indices;
                      log/<column>: one row per edit (case_id, edit_index, v_loss, update_norm,
                      update_rel, seconds, factor_kind, then every other scalar the method
                      returned for the edit, e.g. ROME's key_dot_u);
                      method_state/<name>: the method's state after the segment (AlphaEdit keys);
                      attrs: as the delta's, content_sha256

A state file's content_sha256 (`state_content_sha256`) hashes what it holds for the model: every
dataset and each update's attributes, not its provenance attributes nor the per-edit seconds, so a
segment recomputed bit for bit has the same content hash and the evaluation keys built from it do
not change (issue 32 item 7). Every read re-hashes and compares; a segment checks the state it
continues from (`check_previous_state`) before it edits.

Replaying the factors on D_{k-segment} with the same elementwise operations (weights.add_update)
reproduces every intermediate state bit for bit: the weights after any edit j are recovered
without re-editing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ..io import EditscaleError, atomic_h5, check_free_space, provenance, read_jsonl, sha256_file
from ..layout import SegmentFiles, StateFiles
from ..models.load import load_model, model_sha, pick_device
from .memory import MemoryOp, new_memory
from .weights import Update, WeightState, add_update
from .timing import PHASE_SECONDS

log = logging.getLogger(__name__)

def _is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)) or value is None


LOG_COLUMNS = (
    "case_id", "edit_index", "step", "v_loss", "update_norm", "update_rel", "seconds",
    # seconds split by phase: keys (module inputs), optimize (v* / z / fine-tuning), update (the rest:
    # solves and the closed-form update); per edit, i.e. a batched step's time / its size
    "seconds_keys", "seconds_optimize", "seconds_update", "factor_kind",
)


# ---------------------------------------------------------------------------------------------
# HDF5 I/O


def _is_timing(name: str) -> bool:
    """A log column of how long an edit took (seconds, seconds_<phase>, a method's own *seconds*)."""
    return name.startswith("log/") and "seconds" in name


def state_content_sha256(f: h5py.File) -> str:
    """sha256 of what a delta or factors file holds for the model (module doc): each dataset's name,
    dtype, shape and values and each group's attributes, in name order; the root's attributes
    (provenance: when, where, from which files) and the timing columns of the log are left out."""
    names: list[str] = []
    f.visit(names.append)
    h = hashlib.sha256()
    for name in sorted(names):
        obj = f[name]
        h.update(name.encode() + b"\0")
        if isinstance(obj, h5py.Group):
            h.update(json.dumps({k: str(v) for k, v in sorted(obj.attrs.items())}, sort_keys=True).encode())
        elif not _is_timing(name):
            data = obj[()]
            h.update(f"{data.dtype.str if data.dtype.kind != 'O' else 'str'}{data.shape}".encode())
            if data.dtype.kind == "O":
                h.update("\0".join(v.decode() if isinstance(v, bytes) else str(v) for v in data.reshape(-1)).encode())
            else:
                h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def _seal(f: h5py.File, kind: str) -> str:
    """Record a freshly written state file's kind and content hash."""
    sha = state_content_sha256(f)
    f.attrs.update(state_kind=kind, content_sha256=sha)
    return sha


def verify_state_content(path, f: h5py.File | None = None) -> str | None:
    """Re-hash a delta or factors file against the content_sha256 it recorded (an EditscaleError
    naming the file and the repair when they differ); its hash (None for a file written before
    content hashes: not verified, a warning)."""
    if f is None:
        with h5py.File(path, "r") as fh:
            return verify_state_content(path, fh)
    recorded = f.attrs.get("content_sha256")
    if recorded is None:
        log.warning("%s records no content_sha256 (written by an older editscale): its content is not verified", path)
        return None
    if state_content_sha256(f) != recorded:
        raise EditscaleError(
            f"{f.attrs.get('state_kind', 'state')} file {path} is corrupt: its content no longer matches the content_sha256 "
            f"recorded when it was written. {_repair(path)}")
    return str(recorded)


def _repair(path) -> str:
    """How to rebuild a checkpoint's state: delete its delta and factors, and Snakemake re-runs its
    segment (and every later one)."""
    from ..layout import delta_path, factors_path

    path = Path(path)
    run_dir, k = path.parent.parent, int(path.stem) if path.stem.isdigit() else None
    if k is None:
        return f"Delete it and re-run the workflow: rm {path} && snakemake --cores all"
    return (f"Delete this checkpoint's state and re-run the workflow, which recomputes its segment and every later one: "
            f"rm {delta_path(run_dir, k)} {factors_path(run_dir, k)} && snakemake --cores all")


def write_delta(path, delta: dict[str, torch.Tensor], attrs: dict, memory: dict[str, np.ndarray] | None = None) -> None:
    """The cumulative weight delta of a checkpoint, and the method's memory after it (group
    "memory", `module/field` datasets; editscale.edit.memory) when it keeps one."""
    with atomic_h5(path) as f:
        for module, d in delta.items():
            f.create_dataset(module, data=d.cpu().numpy().astype(np.float32))
        if memory:
            g = f.create_group("memory")
            for key, arr in memory.items():
                g.create_dataset(key, data=np.asarray(arr))
        f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        _seal(f, "delta")


def read_delta(path, expected_model_sha: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"delta file {path} not found")
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        if expected_model_sha and attrs.get("model_sha256") != expected_model_sha:
            raise EditscaleError(
                f"{path} was computed on model {attrs.get('model_sha256')}, not on {expected_model_sha}"
            )
        verify_state_content(path, f)
        return {name: torch.from_numpy(f[name][()]) for name in f.keys() if isinstance(f[name], h5py.Dataset)}, attrs


def read_memory(path) -> dict[str, np.ndarray]:
    """The memory a delta file holds ({} when the method keeps none)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        if "memory" in f:
            f["memory"].visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def read_memory_ops(path) -> list[tuple[int, MemoryOp]]:
    """Each edit step's memory changes a factors file holds ([] when none), by step; within a step
    each table's ops in the order they were made (tables are independent of each other)."""
    ops: list[tuple[int, int, MemoryOp]] = []
    with h5py.File(path, "r") as f:
        if "memory_ops" not in f:
            return []
        tables: list[str] = []
        f["memory_ops"].visititems(lambda name, obj: tables.append(name) if isinstance(obj, h5py.Group) and "step" in obj else None)
        for key in tables:
            g = f["memory_ops"][key]
            module, _, field = key.rpartition("/")
            steps, counts, rows, values = g["step"][()], g["count"][()], g["rows"][()], g["values"][()]
            start = 0
            for i, (step, n) in enumerate(zip(steps, counts)):
                ops.append((int(step), i, MemoryOp(module, field, rows[start:start + n], values[start:start + n])))
                start += int(n)
    return [(step, op) for step, _, op in sorted(ops, key=lambda t: (t[0], t[1]))]


def write_factors(path, updates: list[Update], steps: list[int], rows: list[dict], method_state: dict, attrs: dict,
                  memory_ops: list[tuple[int, MemoryOp]] = ()) -> str:
    """Write a segment's factors file (with each step's memory changes, for a method that keeps a
    memory); returns its content_sha256."""
    with atomic_h5(path) as f:
        if memory_ops:
            # per memory table, its ops in order as flat arrays (step and row count per op): a
            # group per op would cost ~2 kB of HDF5 headers each
            by_table: dict[str, list[tuple[int, MemoryOp]]] = {}
            for step, op in memory_ops:
                by_table.setdefault(f"{op.module}/{op.field}", []).append((step, op))
            mg = f.create_group("memory_ops")
            for key, ops in by_table.items():
                g = mg.create_group(key)
                g.create_dataset("step", data=np.array([st for st, _ in ops], dtype=np.int64))
                g.create_dataset("count", data=np.array([len(op.rows) for _, op in ops], dtype=np.int64))
                g.create_dataset("rows", data=np.concatenate([np.asarray(op.rows, dtype=np.int64) for _, op in ops]))
                g.create_dataset("values", data=np.concatenate([np.asarray(op.values) for _, op in ops]))
        g = f.create_group("updates")
        for i, (upd, step) in enumerate(zip(updates, steps)):
            ug = g.create_group(f"{i:06d}")
            ug.attrs.update({"module": upd.module, "kind": upd.kind, "step": step, "meta": json.dumps(upd.meta, default=str)})
            if upd.kind == "dense":
                ug.create_dataset("dense", data=upd.dense.cpu().numpy().astype(np.float32))
            elif upd.kind == "masked":  # float64 factors and the mask, 1 bit per entry
                ug.create_dataset("u", data=upd.u.cpu().numpy().astype(np.float64))
                ug.create_dataset("v", data=upd.v.cpu().numpy().astype(np.float64))
                ug.create_dataset("mask_bits", data=np.packbits(upd.mask.cpu().numpy().astype(bool).reshape(-1)))
            else:
                ug.create_dataset("u", data=upd.u.cpu().numpy().astype(np.float32))
                ug.create_dataset("v", data=upd.v.cpu().numpy().astype(np.float32))
        lg = f.create_group("log")
        # the chain's columns, then every other scalar a method logged (in first-seen order)
        extra = list(dict.fromkeys(c for r in rows for c in r if c not in LOG_COLUMNS))
        for col in (*LOG_COLUMNS, *extra):
            values = [r.get(col) for r in rows]
            text = col in ("case_id", "factor_kind") or any(isinstance(v, str) for v in values)
            if text:
                lg.create_dataset(col, data=np.array(["" if v is None else str(v) for v in values], dtype=h5py.string_dtype()))
            elif col in ("edit_index", "step"):
                lg.create_dataset(col, data=np.array(values, dtype=np.int64))
            else:
                lg.create_dataset(col, data=np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64))
        sg = f.create_group("method_state")
        for name, arr in method_state.items():
            sg.create_dataset(name, data=np.asarray(arr))
        f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        return _seal(f, "factors")


def read_factors(path) -> tuple[list[tuple[int, Update]], list[dict], dict[str, np.ndarray], dict]:
    """Return ([(step, Update)...] in order, log rows, method state, attrs)."""
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"factors file {path} not found")
    with h5py.File(path, "r") as f:
        verify_state_content(path, f)
        updates = []
        for name in sorted(f["updates"].keys()):
            ug = f["updates"][name]
            kind = ug.attrs["kind"]
            if kind == "dense":
                kw = {"dense": torch.from_numpy(ug["dense"][()])}
            else:
                kw = {"u": torch.from_numpy(ug["u"][()]), "v": torch.from_numpy(ug["v"][()])}
            if kind == "masked":
                shape = (kw["u"].shape[0], kw["v"].shape[0])
                bits = np.unpackbits(ug["mask_bits"][()], count=shape[0] * shape[1])
                kw["mask"] = torch.from_numpy(bits.astype(bool).reshape(shape))
            updates.append((int(ug.attrs["step"]), Update(str(ug.attrs["module"]), meta=json.loads(ug.attrs["meta"]), **kw)))
        cols = {c: f["log"][c][()] for c in f["log"].keys()}
        n = len(cols.get("edit_index", []))
        rows = []
        for i in range(n):
            row = {}
            for c, arr in cols.items():
                v = arr[i]
                row[c] = v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v
            rows.append(row)
        state: dict[str, np.ndarray] = {}
        # State names may contain "/" (e.g. "<module>/keys"), which HDF5 stores as nested groups.
        f["method_state"].visititems(lambda name, obj: state.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return updates, rows, state, dict(f.attrs)


def read_log_columns(path) -> dict[str, list | np.ndarray]:
    """Only the per-edit log of a factors file, column by column (strings decoded); {} if none.
    Cheap: the update tensors are not read."""
    try:
        with h5py.File(path, "r") as f:
            if "log" not in f:
                return {}
            cols = {}
            for c in f["log"].keys():
                arr = f["log"][c][()]
                if arr.dtype.kind in ("O", "S"):
                    arr = [a.decode() if isinstance(a, bytes) else str(a) for a in arr]
                cols[c] = arr
            return cols
    except OSError as exc:
        raise EditscaleError(f"cannot read the edit log of {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Running a segment


def _cases_between(edits_path, k_start: int, k_end: int) -> list[dict]:
    cases = [c for c in read_jsonl(edits_path) if k_start < c["edit_index"] <= k_end]
    if len(cases) != k_end - k_start:
        raise EditscaleError(f"{edits_path} has {len(cases)} edits in ({k_start}, {k_end}], expected {k_end - k_start}")
    return sorted(cases, key=lambda c: c["edit_index"])


def segment_inputs(model_sha256: str, files: SegmentFiles, templates_path, precomputed: dict[str, dict[str, str]], modules: list[str],
                   verified: dict[str, str | None] | None = None) -> dict:
    """What a segment was computed from, recorded in its delta and factors (the audit checks each
    still exists and matches): the model, the edit sequence, the templates, the previous
    checkpoint, and the content_sha256 of each precomputed file it read (second moments,
    projections: `{role}:{module}`). `verified`: the content_sha256 of the previous delta / factors
    as their read already verified it (not hashed again)."""
    from ..stats.mom2 import PRECOMPUTED_KINDS, content_sha256

    inputs: dict = {"model": model_sha256}
    for role, path in (("edits", files.edits), ("templates", templates_path)):
        inputs[role] = {"path": str(path), "sha256": sha256_file(path)}
    for role, path in (("previous_delta", files.previous_delta), ("previous_factors", files.previous_factors)):
        if path is not None:  # by content: a bit-identical recomputation is the same input
            sha = (verified or {}).get(role)
            inputs[role] = {"path": str(path), **({"content_sha256": sha} if sha else content_record(path))}
    for kind, paths in precomputed.items():
        for module, path in sorted(paths.items()):
            if module in modules:
                inputs[f"{PRECOMPUTED_KINDS[kind].role}:{module}"] = {"path": str(path), "content_sha256": content_sha256(path)}
    return inputs


def content_record(path) -> dict:
    """How a segment or a metric records a file it read: a delta or factors file by its verified
    content_sha256 (the audit re-verifies it), any other file (or a state file from before content
    hashes) by the sha256 of its bytes."""
    sha = None
    if Path(path).suffix == ".h5":
        with h5py.File(path, "r") as f:
            sha = verify_state_content(path, f) if "state_kind" in f.attrs else None
    return {"content_sha256": sha} if sha is not None else {"sha256": sha256_file(path)}


def _segment_bytes(model, modules: list[str], files: SegmentFiles) -> int:
    """What a segment writes, estimated before its edits (a full disk found after hours of edits is
    a lost segment): a float32 delta of every edited weight, and a factors file as large as the
    previous segment's (the first segment: as large as the delta)."""
    delta = sum(model.get_submodule(m).weight.numel() * 4 for m in modules)
    previous = files.previous_factors
    factors = Path(previous).stat().st_size if previous is not None and Path(previous).exists() else delta
    return delta + factors


def check_previous_state(files: SegmentFiles, run: dict, delta_attrs: dict, factors_attrs: dict) -> None:
    """The state a segment continues from must be this run's checkpoint k_start: both files written
    by a run with this run's config_hash at k_start, and the factors the ones the delta recorded (a
    delta copied from another run, or from another checkpoint, is refused before any edit: it
    would otherwise be built upon and found only by the final audit). Contents were verified on read."""
    problems = []
    for path, attrs in ((files.previous_delta, delta_attrs), (files.previous_factors, factors_attrs)):
        if int(attrs.get("k", -1)) != files.k_start:
            problems.append(f"{path} holds the state after edit {attrs.get('k')}, not after edit {files.k_start}")
        if run.get("config_hash") and attrs.get("config_hash") != run["config_hash"]:
            problems.append(f"{path} was written by another run (config_hash {str(attrs.get('config_hash'))[:12]}..., "
                            f"this run's is {run['config_hash'][:12]}...)")
    recorded = delta_attrs.get("factors_content_sha256")
    if recorded is not None and factors_attrs.get("content_sha256") != recorded:
        problems.append(f"{files.previous_factors} is not the factors file {files.previous_delta} was written with")
    if problems:
        raise EditscaleError(f"the state this segment (edits {files.k_start + 1}..{files.k_end}) continues from is not this run's: "
                             + "; ".join(problems) + ". " + _repair(files.previous_delta))


def load_precomputed(precomputed: dict[str, dict[str, str]], modules: list[str], model_sha256: str, device) -> dict[str, dict[str, torch.Tensor]]:
    """The precomputed inputs of the edited `modules`, by the keyword the method takes each kind by
    (stats.mom2.PRECOMPUTED_KINDS): {"stats": {module: C}, "projections": {module: P}, ...}."""
    from ..stats.mom2 import PRECOMPUTED_KINDS

    unknown = sorted(set(precomputed) - set(PRECOMPUTED_KINDS))
    if unknown:
        raise EditscaleError(f"precomputed input kind(s) {unknown} unknown (known: {sorted(PRECOMPUTED_KINDS)})")
    return {PRECOMPUTED_KINDS[kind].argument: {m: torch.from_numpy(PRECOMPUTED_KINDS[kind].read(p, expected_model_sha=model_sha256)).to(device)
                                               for m, p in paths.items() if m in modules}
            for kind, paths in precomputed.items()}


def templates_record(model, tok, method: str, hparams: dict, seed: int) -> dict:
    """The content of a run's context_templates.json: template groups sampled from the unedited
    model by the method's reference rule (`EditMethod.template_rule`), with what made them."""
    from .templating import TEMPLATE_FORMAT, flat_templates, sample_context_templates
    from .methods import get_method

    rule = get_method(method, hparams).template_rule
    params = hparams.get("context_template_length_params", [[5, 10], [10, 10]])
    groups = sample_context_templates(model, tok, params, int(seed), rule=rule)
    return {"groups": groups, "templates": flat_templates(groups), "rule": rule, "format": TEMPLATE_FORMAT,
            "length_params": params, "seed": int(seed)}


def read_templates(path: str | Path, rule: str) -> list[list[str]]:
    """The template groups of a context_templates.json; one written by an older editscale (flat
    templates, before the per-reference sampling) or for another method family is refused, naming
    the file, instead of silently averaging keys the wrong way."""
    from .templating import TEMPLATE_FORMAT

    data = json.loads(Path(path).read_text())
    if data.get("format") != TEMPLATE_FORMAT or "groups" not in data:
        raise EditscaleError(
            f"{path} holds context templates in an older format (format {data.get('format')!r}, editscale now writes "
            f"{TEMPLATE_FORMAT}); delete it and the run's deltas/ and factors/ so that they are sampled and edited again"
        )
    if data.get("rule") != rule:
        raise EditscaleError(f"{path} was sampled with the {data.get('rule')!r} rule but this method follows the {rule!r} rule; delete it to re-sample")
    return data["groups"]


def run_segment(model_dir: str | Path, files: SegmentFiles, run: dict, precomputed: dict[str, dict[str, str]], templates_path: str | Path,
                device: str = "auto") -> None:
    """Apply the segment's edits to the state of the previous checkpoint and write its delta and
    factors (every file named by `files`). `run`: the run record (run.json: method, hparams,
    edits_per_step, dtype, config_hash); `precomputed`: kind -> module -> file of what the method
    declared it needs (EditMethod.precomputed), handed to it by kind (`load_precomputed`)."""
    from .methods import get_method

    method, hparams = run["method"], run["hparams"]
    edits_per_step = int(run.get("edits_per_step", 1))
    k_end, segment, k_start = files.k_end, files.segment, files.k_start
    if k_start < 0 or segment <= 0 or segment % edits_per_step:
        raise EditscaleError(f"segment {segment} must be positive, <= k={k_end}, and a multiple of edits_per_step {edits_per_step}")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cases = _cases_between(files.edits, k_start, k_end)
    sha = model_sha(model_dir)
    model, tok = load_model(model_dir, dtype=run.get("dtype", "float32"), device=device)
    dev = pick_device(device)
    method_cls = get_method(method, hparams)
    modules = method_cls.modules(model, hparams)
    inputs_by_argument = {"stats": {}, **load_precomputed(precomputed, modules, sha, dev)}
    templates = read_templates(templates_path, method_cls.template_rule)

    prev_delta, prev_attrs, prev_factors_attrs, state = None, {}, {}, None
    if k_start > 0:
        prev_delta, prev_attrs = read_delta(files.previous_delta, expected_model_sha=sha)
        _, _, state, prev_factors_attrs = read_factors(files.previous_factors)
        check_previous_state(files, run, prev_attrs, prev_factors_attrs)
    weights = WeightState(model, modules, delta=prev_delta)
    memory = new_memory(method_cls, model, hparams, read_memory(files.previous_delta) if k_start > 0 else None)
    if memory is not None:
        inputs_by_argument["memory"] = memory
    memory_ops: list[tuple[int, MemoryOp]] = []
    check_free_space(files.delta, _segment_bytes(model, modules, files),
                     f"the segment's delta and factors ({files.delta}, {files.factors}), estimated")
    editor = method_cls(model, tok, hparams, context_templates=templates, state=state or None, **inputs_by_argument)
    if k_start == 0:
        editor.begin(sorted(read_jsonl(files.edits), key=lambda c: c["edit_index"]))

    log.info("%s edits %d..%d on %s (%s), writing %s and %s", method, k_start + 1, k_end, model_dir, dev, files.delta, files.factors)
    updates, steps, rows = [], [], []
    bar = tqdm(range(0, len(cases), edits_per_step), desc=f"{method} edits {k_start + 1}-{k_end}", unit="step")
    for step_i, i in enumerate(bar):
        batch = cases[i : i + edits_per_step]
        before = {m: weights.current(m).norm().item() for m in modules}
        PHASE_SECONDS.clear()
        t0 = time.perf_counter()
        logs = editor.apply(batch, weights)
        seconds = time.perf_counter() - t0
        split = {"keys": PHASE_SECONDS["keys"], "optimize": PHASE_SECONDS["optimize"]}
        split["update"] = max(seconds - split["keys"] - split["optimize"], 0.0)
        applied = weights.take_applied()
        step_dw = {}
        for upd in applied:
            d = step_dw.setdefault(upd.module, torch.zeros_like(weights.base[upd.module]))
            add_update(d, upd)
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in step_dw.values()))) if step_dw else 0.0
        rel = norm / float(np.sqrt(sum(before[m] ** 2 for m in step_dw))) if step_dw else 0.0
        kinds = {u.kind for u in applied}
        kind = "dense" if "dense" in kinds else "masked" if "masked" in kinds else "lowrank" if applied or memory is None else "memory"
        by_case = {str(r.get("case_id")): r for r in logs}
        for case in batch:
            r = by_case.get(str(case["case_id"]), {})
            row = {
                "case_id": case["case_id"], "edit_index": case["edit_index"], "step": k_start // edits_per_step + step_i + 1,
                "v_loss": r.get("v_loss"), "update_norm": norm, "update_rel": rel,
                "seconds": seconds / len(batch), **{f"seconds_{k}": v / len(batch) for k, v in split.items()},
                "factor_kind": kind,
            }
            # what the method measured (ROME's key_dot_u / residual_norm, MEMIT's z errors, EMMET's
            # constraint residuals, FT-C's losses, AlphaEdit's stored keys); the chain's own
            # columns keep their meaning, the method's same-named value goes in as method_<name>
            for key, value in r.items():
                if key in ("case_id", "v_loss") or not _is_scalar(value):
                    continue
                row[f"method_{key}" if key in row else key] = value
            rows.append(row)
        updates.extend(applied)
        steps.extend([rows[-1]["step"]] * len(applied))
        if memory is not None:
            memory_ops += [(rows[-1]["step"], op) for op in memory.take_ops()]
        bar.set_postfix(loss=f"{rows[-1]['v_loss'] or 0:.3f}", norm=f"{norm:.3g}")

    inputs = segment_inputs(sha, files, templates_path, precomputed, modules,
                            verified={"previous_delta": prev_attrs.get("content_sha256"),
                                      "previous_factors": prev_factors_attrs.get("content_sha256")})
    attrs = {
        "model_sha256": sha, "k": k_end, "k_start": k_start, "segment": segment, "method": method,
        "hparams": json.dumps(hparams, sort_keys=True), **provenance(run.get("config_hash", ""), inputs, str(dev)),
    }
    factors_sha = write_factors(files.factors, updates, steps, rows, editor.state_dict(), attrs, memory_ops)
    prev_sha = prev_attrs.get("content_sha256") if files.previous_delta is not None else None
    write_delta(files.delta, weights.delta, {**attrs, "factors_content_sha256": factors_sha,
                                             "prev_delta_content_sha256": prev_sha},
                memory=memory.state_dict() if memory is not None else None)
    med = float(np.median([r["seconds"] for r in rows]))
    log.info("wrote %s and %s (median %.2f s per edit)", files.factors, files.delta, med)


# ---------------------------------------------------------------------------------------------
# Replay


def replay(state: StateFiles, model_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Cumulative delta after edit state.k: the checkpoint's delta, plus the factors of k's segment
    up to edit k when k falls inside it."""
    delta = read_delta(state.delta, model_sha256)[0] if state.delta is not None else {}
    if state.factors is not None:
        updates, rows, _, _ = read_factors(state.factors)
        last_step_j = next((r["step"] for r in rows if r["edit_index"] == state.k), None)
        if last_step_j is None:
            raise EditscaleError(f"{state.factors} holds no edit {state.k}")
        accumulate(delta, [upd for step, upd in updates if step <= last_step_j])
    return delta


def _stored_method(state: StateFiles) -> tuple[str, dict] | None:
    """(method, hparams) recorded in the state's files; None at k = 0."""
    for path in (state.delta, state.factors):
        if path is not None:
            with h5py.File(path, "r") as f:
                return str(f.attrs["method"]), json.loads(f.attrs["hparams"])
    return None


def attach_memory(model, state: StateFiles):
    """Attach the run's memory after edit state.k to `model` (the checkpoint's memory plus the
    memory changes of k's segment up to edit k); returns it, or None when the method keeps none."""
    from .methods import get_method

    stored = _stored_method(state)
    if stored is None:
        return None
    method, hparams = stored
    memory = new_memory(get_method(method, hparams), model, hparams, read_memory(state.delta) if state.delta is not None else None)
    if memory is None:
        return None
    if state.factors is not None:  # (replay, called first, verified the file; its log alone names the step)
        log_cols = read_log_columns(state.factors)
        last_step_j = next(int(st) for j, st in zip(log_cols["edit_index"], log_cols["step"]) if int(j) == state.k)
        for step, op in read_memory_ops(state.factors):
            if step <= last_step_j:
                memory.apply(op)
        memory.take_ops()
    memory.attach(model)
    return memory


def replay_delta(run_dir: str | Path, j: int, segment: int, model_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Cumulative delta after edit j of the run in run_dir (the layout's file names)."""
    return replay(StateFiles.in_run(run_dir, j, segment), model_sha256)


def accumulate(delta: dict[str, torch.Tensor], updates: list[Update]) -> None:
    """Add `updates` in order to `delta` in place (a module's first update starts it at zero),
    with the same elementwise operations as the chain: the replay primitive."""
    for upd in updates:
        if upd.module not in delta:
            delta[upd.module] = torch.zeros(upd.shape, dtype=torch.float32)
        add_update(delta[upd.module], upd)


def apply_delta(model, delta: dict[str, torch.Tensor]) -> None:
    """Set every edited module's weight to W0 + D (the model must hold base weights)."""
    ws = WeightState(model, list(delta), delta=delta)
    del ws


def model_at(model_dir, state: StateFiles, dtype: str = "float32", device: str = "auto"):
    """(model, tok) after state.k edits (k = 0: the base model)."""
    model, tok = load_model(model_dir, dtype=dtype, device=device)
    if state.k > 0:
        apply_delta(model, replay(state, model_sha(model_dir)))
        attach_memory(model, state)
    return model, tok


def states_in_segment(model_dir, start_delta: Path | None, factors: Path, dtype: str = "float32",
                      device: str = "auto") -> Iterator[tuple[int, object, object]]:
    """Yield (j, model, tok) right after each edit j of one segment (its factors file), starting from
    the delta of the checkpoint before it (None for the first segment), replayed in place."""
    sha = model_sha(model_dir)
    model, tok = load_model(model_dir, dtype=dtype, device=device)
    delta = read_delta(start_delta, sha)[0] if start_delta is not None else {}
    updates, rows, _, attrs = read_factors(factors)
    modules = sorted({u.module for _, u in updates} | set(delta))
    ws = WeightState(model, modules, delta=delta)
    from .methods import get_method

    hparams = json.loads(attrs["hparams"])
    memory = new_memory(get_method(str(attrs["method"]), hparams), model, hparams,
                        read_memory(start_delta) if start_delta is not None else None)
    ops = read_memory_ops(factors) if memory is not None else []
    if memory is not None:
        memory.attach(model)
    by_step: dict[int, list[int]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["edit_index"])
    i = o = 0
    edits = sorted(r["edit_index"] for r in rows)
    # the bar counts the caller's work on each state too (a segment's edit scores: ~1 s per edit);
    # `with`: closed also when the caller stops early (the generator's close)
    desc = f"edits {edits[0]}-{edits[-1]} of {Path(factors).name}" if edits else str(factors)
    with tqdm(total=len(edits), desc=desc, unit="edit") as bar:
        for step in sorted(by_step):
            while i < len(updates) and updates[i][0] == step:
                ws.apply(updates[i][1])
                i += 1
            while o < len(ops) and ops[o][0] == step:
                memory.apply(ops[o][1])
                o += 1
            for j in sorted(by_step[step]):
                yield j, model, tok
                bar.update(1)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (fp32, C order): the bit-identity check of replay and audit."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def read_run(path: str | Path) -> dict:
    """A run record (results/{run}/run.json)."""
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"{path} not found: the run's record (rule run_config) must exist")
    return json.loads(path.read_text())
