"""Snakemake on a copy of the workflow: what the tests and the benchmarks share (not part of the
editscale package: users run snakemake themselves)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from editscale.forkserver import FORKSERVER_ENV

WORKFLOW_FILES = ["Snakefile", "config.yaml", "config", "rules", "envs", "profiles", "report"]


def copy_workflow(repo: Path, dest: Path) -> Path:
    """The workflow files of a checkout copied to `dest`, as a user's checkout would be."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def put_downstream_files(workdir: Path, names=("sst2", "mrpc", "cola", "rte")) -> None:
    """The forgetting study's GLUE subsets put where the paper configs read them, as a user does
    (docs/scale.md, "Downstream files": a copy of ../shared/data/downstream)."""
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "downstream"
    (workdir / "data" / "downstream").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(shared / f"{name}.jsonl", workdir / "data" / "downstream" / f"{name}.jsonl")


def clean_env(forkserver: bool = True) -> dict:
    """The environment of a snakemake run here: this interpreter's bin/ on PATH, HOME, and the
    fork server of the test session when there is one (tests/conftest.py; `forkserver=False`:
    every job in its own interpreter, as a user's study runs)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home()), "TOKENIZERS_PARALLELISM": "false"}
    if forkserver and os.environ.get(FORKSERVER_ENV):
        env[FORKSERVER_ENV] = os.environ[FORKSERVER_ENV]
    return env


def snakemake(workdir: Path, *args: str, config: str = "config/test-tiny.yaml", check: bool = True, timeout: int = 1200,
              env: dict | None = None, forkserver: bool = True):
    """Run snakemake (this interpreter's) in `workdir` with a clean environment plus `env`
    (clean_env: `forkserver=False` runs every job in its own interpreter)."""
    bindir = Path(sys.executable).parent
    # targets before --configfile, which takes every following word as a config file
    cmd = [str(bindir / "snakemake"), "--cores", "2", *args, "--configfile", config]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout, env={**clean_env(forkserver), **(env or {})}, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def set_config(workdir: Path, edit, name: str = "config/test-tiny.yaml") -> None:
    """Edit a config file of the copy in place (`edit` mutates the loaded dict)."""
    path = workdir / name
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def planned_jobs(res) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[-1]
    jobs = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        jobs[m.group(1)] = int(m.group(2))
    jobs.pop("total", None)
    return jobs


def incomplete_jobs(res) -> dict[str, int]:
    """Of a dry run's jobs, those planned because Snakemake holds their outputs for incomplete
    (a job it had started when it was killed): rule -> count. Under the profile's
    `rerun-incomplete: true` Snakemake gives such a job the reason "Forced execution" (no dry run
    here forces anything else); without it, "Incomplete output files"."""
    jobs: dict[str, int] = {}
    for block in (res.stdout + res.stderr).split("\nrule ")[1:]:
        rule, _, body = block.partition(":")
        reason = next((line for line in body.splitlines() if line.strip().startswith("reason:")), "")
        if "Incomplete output files" in reason or "Forced execution" in reason:
            jobs[rule.strip()] = jobs.get(rule.strip(), 0) + 1
    return jobs


def planned_outputs(res) -> set[str]:
    """The output files of every job of a `snakemake -n` listing."""
    out = set()
    for line in (res.stdout + res.stderr).splitlines():
        line = line.strip()
        if line.startswith("output:"):
            out |= {f.strip().removesuffix(" (update)") for f in line.split(":", 1)[1].split(",") if f.strip()}
    return out


def planned_metric_files(res, metric: str) -> set[str]:
    """The planned files of one metric (results/{run}/metrics/{metric}/{k}.parquet), whichever rule
    makes them (the checkpoint jobs make several metrics' files)."""
    return {f for f in planned_outputs(res) if f"/metrics/{metric}/" in f and f.endswith(".parquet")}


def checkpoint_jobs(jobs: dict[str, int]) -> int:
    """Planned checkpoint jobs (`editscale evaluate`, rules evaluate__{run}__{metrics})."""
    return sum(n for rule, n in jobs.items() if rule.startswith("evaluate__"))


# rules a metric added to a finished study may plan: its checkpoint jobs and what reads every metric
ADDED_METRIC_RULES = {"metric_config", "report_tables", "report_plots", "audit", "all"}


def add_metric_to_finished_study(study: Path, workdir: Path, edit) -> tuple[dict[str, int], Callable[[], set[str]]]:
    """A copy of a finished study at `workdir` with its config changed by `edit` (a metric added):
    (the planned jobs, a function that lists the run's metric files changed since the copy)."""
    import hashlib

    shutil.copytree(study, workdir, symlinks=True)
    files = sorted(workdir.glob("results/*/metrics/**/*.parquet"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    set_config(workdir, edit)
    jobs = planned_jobs(snakemake(workdir, "-n"))
    unexpected = set(jobs) - ADDED_METRIC_RULES - {r for r in jobs if r.startswith("evaluate__")}
    assert not unexpected, jobs

    def changed() -> set[str]:
        return {str(p.relative_to(workdir)) for p in files if hashlib.sha256(p.read_bytes()).hexdigest() != before[p]}

    return jobs, changed
