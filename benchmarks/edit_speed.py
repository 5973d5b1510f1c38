"""Seconds per sequential edit of every method, split into key computation, optimization and the
closed-form update, and the before / after of the edit-path optimizations, each measured side by
side in the same run on the same cases:

- prefix reuse: the blocks below the injection layer computed once per value optimization
  instead of once per step (value_optimization.REUSE_PREFIX);
- C^-1 factored once per segment (a Cholesky factor kept by the method) instead of per edit;
- the keys of all context templates in one padded batch instead of one forward per template.
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from editscale.edit import solvers, subject_keys, templating, timing, value_optimization
from editscale.models.registry import mlp_out_name

from .prepare import METHOD_NAMES, Bench

log = logging.getLogger("benchmarks")


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def per_method(bench: Bench, n_edits: int, warmup: int = 1, methods=METHOD_NAMES) -> list[dict]:
    """For each method: `warmup` + `n_edits` sequential single edits on a fresh model; medians of
    the last n_edits of total / keys / optimize / update seconds."""
    rows = []
    for method in methods:
        editor, weights = bench.editor(method)
        times = {"total": [], "keys": [], "optimize": [], "update": []}
        losses, updates, memory_ops = [], [], []
        t_method = time.perf_counter()
        editor.begin(bench.cases[: warmup + n_edits])  # as the chain does at k = 0 (NAS: its anchor)
        s_begin = time.perf_counter() - t_method
        for i, case in enumerate(tqdm(bench.cases[: warmup + n_edits], desc=f"{method} edits", unit="edit")):
            timing.PHASE_SECONDS.clear()
            t0 = time.perf_counter()
            out = editor.apply([case], weights)
            total = time.perf_counter() - t0
            updates += weights.take_applied()
            memory = getattr(editor, "memory", None)
            if memory is not None and hasattr(memory, "take_ops"):  # GRACE: the codebook rows it wrote
                memory_ops += [(i + 1, op) for op in memory.take_ops()]
            if i < warmup:
                continue
            keys, opt = timing.PHASE_SECONDS["keys"], timing.PHASE_SECONDS["optimize"]
            for k, v in (("total", total), ("keys", keys), ("optimize", opt), ("update", total - keys - opt)):
                times[k].append(v)
            if out and out[0].get("v_loss") is not None:
                losses.append(float(out[0]["v_loss"]))
        row = {"method": method, "edits": n_edits, **{f"s_{k}": _median(v) for k, v in times.items()},
               "v_loss_median": _median(losses), "wall_s": time.perf_counter() - t_method, "s_begin": s_begin,
               **storage(bench, method, updates, weights, warmup + n_edits, memory_ops=memory_ops,
                         memory=getattr(editor, "memory", None))}
        log.info("%s: median %.2f s/edit (keys %.2f, optimize %.2f, update %.3f) over %d edits", method,
                 row["s_total"], row["s_keys"], row["s_optimize"], row["s_update"], n_edits)
        rows.append(row)
    return rows


# rough cost order from the registry (a d x d solve per edit first, fine-tuning last): the
# longest jobs first keep the worker pool busy
_SOLVE_ORDER = ("per_edit", "per_segment", "memory", "gradient", "none")


def _cost_rank(method: str) -> int:
    from editscale.edit.cost import cost_class

    return _SOLVE_ORDER.index(cost_class(method).solve)


def _method_worker(name: str, work: str, threads: int, method: str, n_edits: int, warmup: int) -> dict:
    from pathlib import Path

    from .prepare import prepare

    bench = prepare(name, Path(work), threads)  # statistics come from the parent's cache file
    return per_method(bench, n_edits, warmup, [method])[0]


def per_method_parallel(bench: Bench, n_edits: int, warmup: int, methods, jobs: int, threads_per_job: int) -> list[dict]:
    """`per_method` with one process per method, `jobs` at a time, each with `threads_per_job`
    threads: the way the workflow runs edit chains (one edit job per run, one thread each, side by
    side), and what keeps this section inside its time budget on a small machine."""
    import multiprocessing

    if jobs <= 1:
        return per_method(bench, n_edits, warmup, methods)
    order = sorted(methods, key=_cost_rank)
    ctx = multiprocessing.get_context("spawn")  # no fork after OpenMP threads started
    with ctx.Pool(jobs, maxtasksperchild=1) as pool:
        rows = pool.starmap(_method_worker, [(bench.name, str(bench.work), threads_per_job, m, n_edits, warmup) for m in order])
    by = {r["method"]: {**r, "threads": threads_per_job, "concurrent_jobs": jobs} for r in rows}
    return [by[m] for m in methods]


def prefix_reuse(bench: Bench, n_cases: int) -> dict:
    """optimize_value (ROME hparams) with and without re-using the blocks below the edited
    layer, alternating on the same cases; checks the results are bit-identical."""
    hp = bench.hparams("rome")
    bench.fresh_model()
    templates = bench.templates(hp)
    module = mlp_out_name(bench.model, hp["layers"][0])
    on, off, identical = [], [], True
    saved = value_optimization.REUSE_PREFIX
    try:
        for case in bench.cases[:n_cases]:
            res = {}
            for flag, acc in ((False, off), (True, on)):
                value_optimization.REUSE_PREFIX = flag
                t0 = time.perf_counter()
                res[flag] = value_optimization.optimize_value(bench.model, bench.tok, case, templates, module, hp)
                acc.append(time.perf_counter() - t0)
            identical &= bool(torch.equal(res[True][0], res[False][0]))
    finally:
        value_optimization.REUSE_PREFIX = saved
    return {"before_s": _median(off), "after_s": _median(on), "speedup": _median(off) / _median(on),
            "bit_identical": identical, "cases": n_cases, "layer": hp["layers"][0]}


def memory_prefix_reuse(bench: Bench, method: str, n_cases: int) -> dict:
    """A lifelong editor's edits (GRACE, WISE, MEMOIR: SGD on a memory at one layer's MLP output)
    with and without re-using the blocks below that layer across the steps
    (`value_optimization.reused_prefix`): n_cases sequential edits each way on a fresh model,
    without first; checks that the memories are bit-identical."""
    saved = value_optimization.REUSE_PREFIX
    times: dict[bool, list[float]] = {False: [], True: []}
    memories = {}
    try:
        for flag in (False, True):
            value_optimization.REUSE_PREFIX = flag
            editor, weights = bench.editor(method)
            editor.begin(bench.cases[:n_cases])
            for case in bench.cases[:n_cases]:
                t0 = time.perf_counter()
                editor.apply([case], weights)
                times[flag].append(time.perf_counter() - t0)
            memories[flag] = {m: {f: a.copy() for f, a in t.items()} for m, t in editor.memory.tables.items()}
    finally:
        value_optimization.REUSE_PREFIX = saved
    identical = all(np.array_equal(a, memories[True][m][f]) for m, t in memories[False].items() for f, a in t.items())
    return {"before_s": _median(times[False]), "after_s": _median(times[True]), "speedup": _median(times[False]) / _median(times[True]),
            "bit_identical": identical, "cases": n_cases, "layer": bench.hparams(method)["layer"]}


def cov_factor_cache(bench: Bench, n_cases: int) -> dict:
    """The closed-form direction u = C^-1 k* with C factored per edit (before) vs once (after)."""
    hp = bench.hparams("rome")
    bench.fresh_model()
    module = mlp_out_name(bench.model, hp["layers"][0])
    C = bench.stats[module]
    keys = torch.randn(n_cases, C.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for k in keys:
        solvers.CovSolver(C, module).solve(k)
    per_edit = (time.perf_counter() - t0) / n_cases
    solver = solvers.CovSolver(C, module)
    t0 = time.perf_counter()
    for k in keys:
        solver.solve(k)
    cached = (time.perf_counter() - t0) / n_cases
    return {"before_s": per_edit, "after_s": cached, "speedup": per_edit / cached, "dim": int(C.shape[0])}


def keys_batched(bench: Bench, n_cases: int) -> dict:
    """k* of a case over all its context templates in one padded batch (after) vs one forward
    per template (before); same keys up to float rounding."""
    hp = bench.hparams("rome")
    bench.fresh_model()
    templates = templating.flat_templates(bench.templates(hp))
    module = mlp_out_name(bench.model, hp["layers"][0])
    loop_s, batch_s, max_diff = [], [], 0.0
    for case in bench.cases[:n_cases]:
        t0 = time.perf_counter()
        singles = [subject_keys.module_io_at_subject(bench.model, bench.tok, module, [t.format(case["prompt"])], [case["subject"]])[0][0] for t in templates]
        k_loop = torch.stack(singles).mean(0)
        loop_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        k_batch = subject_keys.compute_keys(bench.model, bench.tok, module, [case], templates)[0]
        batch_s.append(time.perf_counter() - t0)
        max_diff = max(max_diff, float((k_loop - k_batch).abs().max() / k_loop.abs().max()))
    return {"before_s": _median(loop_s), "after_s": _median(batch_s), "speedup": _median(loop_s) / _median(batch_s),
            "templates": len(templates), "max_rel_diff": max_diff}


def storage(bench: Bench, method: str, updates, weights, n_edits: int, every: int = 20, memory_ops=(), memory=None) -> dict:
    """Bytes per edit of the checkpoint formats, from files written the way the chain writes them:
    the factors of every update (editscale; with a memory-keeping method's memory ops), the dense
    cumulative delta of the edited matrices (with the memory) written every `every` edits, and the
    whole model written every `every` edits (the study's code saved full checkpoints)."""
    from editscale.edit.chain import write_delta, write_factors

    out_dir = bench.work / "storage" / method
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"case_id": str(i), "edit_index": i + 1, "step": i + 1} for i in range(n_edits)]
    write_factors(out_dir / "factors.h5", updates, list(range(1, len(updates) + 1)), rows, {}, {"k": n_edits}, list(memory_ops))
    write_delta(out_dir / "delta.h5", weights.delta, {"k": n_edits}, memory=memory.state_dict() if memory is not None else None)
    factors = (out_dir / "factors.h5").stat().st_size / n_edits
    dense = (out_dir / "delta.h5").stat().st_size / every
    model = sum(f.stat().st_size for f in bench.model_dir.glob("*.safetensors")) / every
    return {"bytes_per_edit_factors": factors, "bytes_per_edit_dense": dense, "bytes_per_edit_model": model,
            "dense_over_factors": dense / factors, "model_over_factors": model / factors}
