"""`python -m benchmarks [--model smollm2|tiny]`: measure what a study spends its time and disk on,
print one table, and write the figures as JSON.

Every ratio is measured side by side in this one run on this machine. Sections:
  edits      seconds per sequential edit per method (median after warm-up), split into keys /
             optimization / closed-form update; checkpoint bytes per edit of each format
  optim      before / after of the edit-path optimizations (prefix reuse, C^-1 factored once,
             keys batched over templates)
  eval       batched scorer vs one prompt at a time; statistics stopped after the layer vs the
             full model with its LM head
  floor      FLOPs one ROME edit needs at minimum vs its measured time
  workflow   snakemake: extend N -> 2N vs 2N from scratch, one-metric re-run vs full pipeline,
             peak RSS of edit and evaluation jobs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see editscale.cli
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from . import edit_speed, eval_speed, flops, workflow_cache  # noqa: E402
from .prepare import METHOD_NAMES, REPO, prepare  # noqa: E402
from editscale.edit.methods import LayerMemoryMethod, get_method  # noqa: E402

SECTIONS = ("edits", "optim", "eval", "floor", "workflow")


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg_at_start": os.getloadavg()[0]}


def fmt(x, nd=2) -> str:
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"
    return str(x)


def print_table(res: dict) -> None:
    print(f"\n# editscale benchmarks — model {res['model']}, {res['machine']['cores']} cores ({res['machine']['cpu']}), "
          f"{res['threads']} threads, {res['date']}")
    if "edits" in res:
        print(f"\n## Seconds per sequential edit (median after warm-up; {res['edit_jobs']} methods at a time, "
              f"{res['edit_threads_per_job']} thread(s) each) and checkpoint bytes per edit")
        print(f"{'method':10s} {'edits':>5s} {'total':>7s} {'keys':>6s} {'optim':>6s} {'update':>7s} {'factors B':>10s} {'dense/f':>8s} {'model/f':>9s}")
        for r in res["edits"]:
            print(f"{r['method']:10s} {r['edits']:5d} {r['s_total']:7.2f} {r['s_keys']:6.2f} {r['s_optimize']:6.2f} {r['s_update']:7.3f} "
                  f"{r['bytes_per_edit_factors']:10.0f} {r['dense_over_factors']:8.1f} {r['model_over_factors']:9.0f}")
    if "optim" in res:
        print("\n## Optimizations, before / after in this run")
        for name, r in res["optim"].items():
            extra = {k: v for k, v in r.items() if k not in ("before_s", "after_s", "speedup")}
            print(f"{name:22s} before {r['before_s']:.4f} s  after {r['after_s']:.4f} s  speedup {r['speedup']:.2f}x  {extra}")
    if "eval" in res:
        s, m = res["eval"]["scorer"], res["eval"]["stats"]
        print("\n## Evaluation and statistics throughput")
        print(f"scorer   batched {s['batched_pairs_per_s']:.1f} pairs/s vs one at a time {s['loop_pairs_per_s']:.1f} pairs/s: "
              f"{s['speedup']:.1f}x ({s['pairs']} pairs, max |dNLL| {s['max_abs_nll_diff']:.1e})")
        print(f"stats    stopped after {m['module']} {m['stop_tok_s']:.0f} tok/s vs full model + LM head {m['full_tok_s']:.0f} tok/s: "
              f"{m['speedup']:.1f}x (same result: {m['same_result']})")
    if "floor" in res:
        f = res["floor"]
        print("\n## Floor of one ROME edit")
        print(f"{f['gflop_per_edit']:.1f} GFLOP per edit; matmul peak {f['matmul_peak_gflops']:.1f} GFLOP/s -> floor {f['floor_s']:.2f} s; "
              f"measured optimization {f['measured_optimize_s']:.2f} s = {f['achieved_gflops']:.1f} GFLOP/s ({100 * f['fraction_of_peak']:.0f} % of peak)")
    if "workflow" in res:
        w = res["workflow"]
        print(f"\n## Cached DAG (snakemake, one ROME run on {w['model']}, segment {w['segment']})")
        print(f"extend {w['n_edits']} -> {2 * w['n_edits']} edits: {w['extend_s']:.1f} s vs {2 * w['n_edits']} from scratch "
              f"{w['scratch_2n_s']:.1f} s: ratio {w['extend_over_scratch']:.2f} (job seconds only: {w['job_s_extend_over_scratch']:.2f})")
        print(f"re-run after one metric changed: {w['metric_rerun_s']:.1f} s = {100 * w['metric_over_full']:.1f} % of the full pipeline")
        print("peak RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(w["peak_rss_mb"].items())))


# the methods whose edits are SGD on a memory at one layer (GRACE, WISE, MEMOIR), from the registry
LIFELONG_PREFIX = tuple(m for m in METHOD_NAMES if issubclass(get_method(m), LayerMemoryMethod))
OPTIMS = ("prefix_reuse", "cov_factor_once", "keys_one_batch", *(f"prefix_{m}" for m in LIFELONG_PREFIX), "base_memo")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"], help="SmolLM2-135M (default) or a tiny random GPT-2 (quick)")
    ap.add_argument("--edits", type=int, default=20, help="edits per method after warm-up (median over these)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=METHOD_NAMES)
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--optims", nargs="*", default=list(OPTIMS), choices=OPTIMS,
                    help="section optim: the optimizations timed before / after (prefix_<method>: GRACE, WISE, MEMOIR's edits; base_memo: the edit-score job's unedited-model readings)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--edit-jobs", type=int, default=os.cpu_count() or 1,
                    help="methods timed at once, one process each with threads // edit-jobs threads (as the workflow runs chains)")
    ap.add_argument("--workflow-edits", type=int, default=4, help="N of the extend N -> 2N comparison")
    ap.add_argument("--workflow-model", default="tiny", choices=["smollm2", "tiny"],
                    help="model of the snakemake section (default tiny: the DAG's re-use, not the model, is measured; "
                         "smollm2 takes ~10 min more)")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / ".work"))
    ap.add_argument("--out", default=None, help="JSON file for the figures (default: <workdir>/results-<model>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    t_start = time.perf_counter()
    work = Path(args.workdir)
    res: dict = {"model": args.model, "threads": args.threads, "machine": machine(),
                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    bench = prepare(args.model, work, args.threads)
    res["stats_tokens"] = bench.stats_tokens
    if "edits" in args.sections:
        jobs = max(1, min(args.edit_jobs, len(args.methods)))
        res["edit_jobs"], res["edit_threads_per_job"] = jobs, max(1, args.threads // jobs)
        res["edits"] = edit_speed.per_method_parallel(bench, args.edits, args.warmup, args.methods, jobs, res["edit_threads_per_job"])
    if "optim" in args.sections:
        timed = {
            "prefix_reuse": lambda: edit_speed.prefix_reuse(bench, 3),
            "cov_factor_once": lambda: edit_speed.cov_factor_cache(bench, 20),
            "keys_one_batch": lambda: edit_speed.keys_batched(bench, 5),
            **{f"prefix_{m}": (lambda m=m: edit_speed.memory_prefix_reuse(bench, m, 2)) for m in LIFELONG_PREFIX},
            "base_memo": lambda: eval_speed.base_memo(bench, 100),
        }
        res["optim"] = {name: timed[name]() for name in args.optims}
    if "eval" in args.sections:
        res["eval"] = {"scorer": eval_speed.scorer(bench, 40), "stats": eval_speed.stats_throughput(bench, 2048)}
    if "floor" in args.sections:
        rome = next((r for r in res.get("edits", []) if r["method"] == "rome"), {})
        res["floor"] = flops.floor(bench, rome)
    if "workflow" in args.sections:
        wf_bench = bench if args.workflow_model == args.model else prepare(args.workflow_model, work, args.threads)
        res["workflow"] = {**workflow_cache.run(wf_bench, args.workflow_edits, args.workflow_edits), "model": args.workflow_model}
    res["harness_wall_s"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else work / f"results-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print_table(res)
    print(f"\nharness wall time {res['harness_wall_s']:.0f} s; figures in {out}")


if __name__ == "__main__":
    main()
