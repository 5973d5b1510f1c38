"""A new built-in metric is its module and its schema section, nothing else: both added to a copy
of the package, the workflow plans its checkpoint jobs, its sub-command exists, and a checkpoint
job computes and writes its table through the generic metric job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from benchmarks.snakemake_runs import planned_metric_files, snakemake

pytestmark = pytest.mark.workflow

MODULE = '''"""edits_so_far: how many edits the model has had at checkpoint k, and their mean target length."""

from __future__ import annotations

import polars as pl

from ..registry import CurveSpec, metric


@metric("edits_so_far", "edits made up to checkpoint k", inputs=("state", "edits"), device=False,
        curves=(CurveSpec("edits_so_far", "n", summary="edits_so_far", phases=False),))
def compute(checkpoint, cfg) -> pl.DataFrame:
    done = [c for c in checkpoint.edits() if int(c["edit_index"]) <= checkpoint.k]
    mean_len = sum(len(c["target_new"]) for c in done) / len(done) if done else 0.0
    return pl.DataFrame({"k": [checkpoint.k] * 2, "item": ["all"] * 2, "metric": ["n", "target_chars"],
                         "value": [float(len(done)) * cfg.scale, mean_len]})
'''

SECTION = '''      edits_so_far:
        type: object
        additionalProperties: false
        default: {}
        properties:
          eval_every: {$ref: "#/$defs/eval_grid", default: 50}
          scale: {type: number, default: 1.0}
'''


def test_a_built_in_metric_is_its_module_and_its_schema_section(tiny_study, tmp_path):
    package = tmp_path / "src" / "editscale"
    shutil.copytree(Path(__import__("editscale").__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "evaluate/metrics/edits_so_far.py").write_text(MODULE)
    schema = package / "schema.yaml"
    text = schema.read_text()
    anchor = "      weights:\n"  # the last metric section: the new one goes before it
    assert text.count(anchor) == 1
    schema.write_text(text.replace(anchor, SECTION + anchor))
    env = {"PYTHONPATH": str(tmp_path / "src")}

    workdir = tmp_path / "wf"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    (workdir / "config/schema.yaml").unlink()
    shutil.copy(schema, workdir / "config/schema.yaml")
    res = snakemake(workdir, "-n", env=env)
    planned = planned_metric_files(res, "edits_so_far")
    assert planned == {f"results/rome-tiny/metrics/edits_so_far/{k:06d}.parquet" for k in (0, 6)}, planned
    history = workdir / "results/rome-tiny/metrics/history/000006.parquet"
    before = history.read_bytes()
    snakemake(workdir, "results/rome-tiny/metrics/edits_so_far/000006.parquet", env=env)
    # the checkpoint job now evaluates the new metric beside the others; their files are kept
    assert history.read_bytes() == before
    assert "evaluating ['edits_so_far'] in one process" in (workdir / "results/logs/rome-tiny/evaluate_000006.log").read_text()
    df = pl.read_parquet(workdir / "results/rome-tiny/metrics/edits_so_far/000006.parquet")
    assert df.filter(pl.col("metric") == "n")["value"].item() == 6.0

    cli = subprocess.run([sys.executable, "-m", "editscale.cli", "edits-so-far", "--help"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env})
    assert cli.returncode == 0 and "--edits" in cli.stdout and "--state" in cli.stdout, cli.stderr
    from editscale.io import read_parquet_metadata

    # the provenance is the generic job's: the resolved section without eval_every, the inputs' hashes
    record = read_parquet_metadata(workdir / "results/rome-tiny/metrics/edits_so_far/000006.parquet")
    assert json.loads(record["params"]) == {"scale": 1.0} and "edits" in json.loads(record["inputs"])
