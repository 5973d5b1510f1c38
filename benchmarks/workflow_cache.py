"""What the cached DAG saves, measured with real snakemake runs on a copy of the workflow:

- extending a finished chain from N to 2N edits against running 2N edits from scratch (ratio of
  wall times; the goal is about 0.5: only the new segments and their evaluations run);
- re-running after one metric's parameter changed (generation.max_new_tokens) against the full
  pipeline (goal: under 5 %);
- peak resident memory of an edit job and of each evaluation job, from the `benchmark:` files
  Snakemake writes for every job (results/benchmarks/).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .snakemake_runs import copy_workflow

from .prepare import MODELS, REPO, Bench

log = logging.getLogger("benchmarks")


def study_config(bench: Bench, n_edits: int, segment: int, eval_every: int) -> dict:
    """A small study of one ROME run on the benchmark model (every metric, small settings,
    evaluated every `eval_every` edits; current-edit scores every segment)."""
    stem = MODELS[bench.name][1]
    return {
        "models": {stem: {"source": f"local:{bench.model_dir}", "params_m": 135 if bench.name == "smollm2" else 1}},
        "datasets": {"geofacts": {"reader": "geofacts", "seed": 0}},
        "corpora": {"self-sample": {"kind": "self_sample", "n_tokens": 2048, "heldout_tokens": 512, "seq_len": 64, "batch_size": 16, "seed": 0}},
        "runs": [{"name": "rome-bench", "model": stem, "method": "rome", "hparams": f"config/hparams/rome/{stem}.yaml",
                  "dataset": "geofacts", "corpus": "self-sample", "n_edits": n_edits, "segment": segment}],
        "metrics": {
            "history": {"eval_every": eval_every},
            "downstream": {"eval_every": eval_every, "probes": {"n_eval": 8}},
            "generation": {"eval_every": eval_every, "max_new_tokens": 16, "n_prompts": 2},
            "perplexity": {"eval_every": eval_every},
            "weights": {"eval_every": eval_every},
        },
    }


def _snakemake(workdir: Path, threads: int) -> float:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(bindir / "snakemake"), "--cores", str(threads), "--configfile", "config/bench.yaml", "--workflow-profile", "none"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"snakemake failed in {workdir}:\n{res.stderr[-4000:]}")
    return wall


def _write_config(workdir: Path, cfg: dict) -> None:
    (workdir / "config" / "bench.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def peak_rss(workdir: Path) -> dict[str, float]:
    """Rule -> largest max_rss (MB) over its jobs' Snakemake benchmark files."""
    out: dict[str, float] = {}
    for tsv in (workdir / "results" / "benchmarks").rglob("*.tsv"):
        rule = tsv.stem.rsplit("_", 1)[0]
        with tsv.open() as f:
            for rec in csv.DictReader(f, delimiter="\t"):
                try:
                    out[rule] = max(out.get(rule, 0.0), float(rec["max_rss"]))
                except (KeyError, ValueError):
                    continue
    return out


def job_seconds(workdir: Path, since: float = 0.0) -> float:
    """Sum of the wall seconds of every job recorded in the Snakemake benchmark files written
    after `since` (edit and evaluation jobs: the rules that carry `benchmark:`)."""
    total = 0.0
    for tsv in (workdir / "results" / "benchmarks").rglob("*.tsv"):
        if tsv.stat().st_mtime < since:
            continue
        with tsv.open() as f:
            total += sum(float(rec["s"]) for rec in csv.DictReader(f, delimiter="\t"))
    return total


def run(bench: Bench, n_edits: int, segment: int) -> dict:
    root = bench.work / "workflow"
    if root.exists():
        shutil.rmtree(root)
    a = copy_workflow(REPO, root / "extend")
    b = copy_workflow(REPO, root / "scratch")
    _write_config(a, study_config(bench, n_edits, segment, 2 * n_edits))
    log.info("workflow: %d edits in %s", n_edits, a)
    t_n = _snakemake(a, bench.threads)
    _write_config(a, study_config(bench, 2 * n_edits, segment, 2 * n_edits))
    log.info("workflow: extend to %d edits", 2 * n_edits)
    t_start_ext = time.time()
    t_ext = _snakemake(a, bench.threads)
    _write_config(b, study_config(bench, 2 * n_edits, segment, 2 * n_edits))
    log.info("workflow: %d edits from scratch", 2 * n_edits)
    t_2n = _snakemake(b, bench.threads)
    chain_ext, chain_2n = job_seconds(a, since=t_start_ext), job_seconds(b)
    cfg = study_config(bench, 2 * n_edits, segment, 2 * n_edits)
    cfg["metrics"]["generation"]["max_new_tokens"] = 24
    _write_config(b, cfg)
    log.info("workflow: re-run after generation.max_new_tokens changed")
    t_metric = _snakemake(b, bench.threads)
    rss = peak_rss(b)
    return {
        "n_edits": n_edits, "segment": segment, "first_n_s": t_n, "extend_s": t_ext, "scratch_2n_s": t_2n,
        "extend_over_scratch": t_ext / t_2n, "metric_rerun_s": t_metric, "metric_over_full": t_metric / t_2n,
        "peak_rss_mb": rss, "job_s_extend": chain_ext, "job_s_scratch": chain_2n,
        "job_s_extend_over_scratch": chain_ext / chain_2n if chain_2n else float("nan"),
    }
