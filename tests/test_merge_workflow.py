"""A study run in two places and merged equals the study run in one (issue 29 item 1).

The study: config/test-tiny.yaml plus a second run on another sample of the edit stream. Directory
ONE is the session's tiny study (copied) continued with the second run: the whole study in one
directory. Directory TWO is a fresh copy of the workflow that runs the second run alone
(`snakemake $(editscale targets --run ...)`), as another machine would. Then:

- the records of both runs exported from ONE merge into tables byte-identical to ONE's own
  report tables (the merge builds exactly what the report_tables rule builds);
- the first run's record from ONE and the second's from TWO (another execution of it) merge into
  tables equal to ONE's in everything but what measures time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from benchmarks.compare_studies import _without_timing
from benchmarks.snakemake_runs import copy_workflow, planned_jobs, set_config, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]
SECOND = "rome-tiny-s1"


def _add_second_run(cfg: dict) -> None:
    cfg["runs"].append({**cfg["runs"][0], "name": SECOND, "sample": 1})


def _editscale(*args: str, cwd: Path) -> str:
    exe = str(Path(sys.executable).parent / "editscale")
    res = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_a_study_split_over_two_directories_merges_into_the_same_tables(repo_root, tiny_study, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(tiny_study, one, symlinks=True)
    set_config(one, _add_second_run)
    plan = planned_jobs(snakemake(one, "-n"))
    assert plan["edit_segment"] == 2 and "stats" not in plan and "corpus_tokens" not in plan, plan  # the first run is re-used
    snakemake(one)

    two = copy_workflow(repo_root, tmp_path / "two")
    set_config(two, _add_second_run)
    targets = _editscale("targets", "--configfile", "config/test-tiny.yaml", "--run", SECOND, cwd=two).split()
    assert targets and all("rome-tiny/" not in t for t in targets)
    plan_two = planned_jobs(snakemake(two, "-n", *targets))
    assert plan_two["edit_segment"] == 2 and "report_tables" not in plan_two, plan_two  # the second run only
    snakemake(two, *targets)
    assert not (two / "results" / "rome-tiny").exists()

    records_one, records_two = tmp_path / "records-one", tmp_path / "records-two"
    _editscale("export-run", "--configfile", "config/test-tiny.yaml", "--run", "rome-tiny", SECOND, "--out", str(records_one), cwd=one)
    _editscale("export-run", "--configfile", "config/test-tiny.yaml", "--run", SECOND, "--out", str(records_two), cwd=two)

    # both records from ONE: the report_tables rule's own bytes
    _editscale("merge", "--configfile", "config/test-tiny.yaml", "--out", str(tmp_path / "m1"), "--no-plots", str(records_one), cwd=one)
    theirs = one / "results/studies/test-tiny/tables"
    for p in sorted(theirs.iterdir()):
        assert (tmp_path / "m1" / "tables" / p.name).read_bytes() == p.read_bytes(), p.name

    # the first run from ONE, the second from TWO: the same tables, timing aside
    shutil.rmtree(records_one / SECOND)
    _editscale("merge", "--configfile", "config/test-tiny.yaml", "--out", str(tmp_path / "m2"), "--no-plots",
               str(records_one), str(records_two), cwd=one)
    merged = json.loads((tmp_path / "m2" / "merge.json").read_text())
    assert merged["runs"][SECOND]["record"] == str(records_two / SECOND)
    compared = 0
    for p in sorted(theirs.glob("*.parquet")):
        ours = _without_timing(pl.read_parquet(tmp_path / "m2" / "tables" / p.name))
        assert ours.equals(_without_timing(pl.read_parquet(p))), p.name
        compared += 1
    assert compared >= 10
    summary = pl.read_parquet(tmp_path / "m2" / "tables" / "summary.parquet")
    assert sorted(summary["run"].to_list()) == ["rome-tiny", SECOND]
