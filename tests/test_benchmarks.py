"""The benchmark harness runs end to end on the tiny model and reports every figure (no
wall-clock asserts: only that each measurement exists and that the optimized paths compute the
same results as the naive ones they are compared with)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_harness_tiny(repo_root, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "benchmarks", "--model", "tiny", "--edits", "2", "--threads", "1",
           "--sections", "edits", "optim", "eval", "floor", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    res = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    fig = json.loads(out.read_text())
    assert [r["method"] for r in fig["edits"]] == ["rome", "r-rome", "memit", "emmet", "alphaedit", "ft-c"]
    for r in fig["edits"]:
        assert r["edits"] == 2 and r["s_total"] > 0 and r["s_optimize"] > 0
        assert r["s_keys"] + r["s_optimize"] + r["s_update"] <= r["s_total"] * (1 + 1e-6) + 1e-9
        assert r["bytes_per_edit_factors"] > 0 and r["model_over_factors"] > 0
    if fig["edit_jobs"] > 1:  # methods timed in parallel worker processes
        assert all(r["concurrent_jobs"] == fig["edit_jobs"] for r in fig["edits"])
    lowrank = {r["method"]: r["bytes_per_edit_factors"] for r in fig["edits"]}
    assert lowrank["rome"] < lowrank["ft-c"]  # rank-one factors vs FT-C's dense update
    assert fig["optim"]["prefix_reuse"]["bit_identical"] is True
    assert fig["optim"]["keys_one_batch"]["max_rel_diff"] < 1e-4
    assert fig["eval"]["stats"]["same_result"] is True
    assert fig["eval"]["scorer"]["max_abs_nll_diff"] < 1e-4
    assert fig["floor"]["gflop_per_edit"] > 0 and 0 < fig["floor"]["fraction_of_peak"]
    for heading in ("Seconds per sequential edit", "Optimizations", "Evaluation and statistics", "Floor of one ROME edit"):
        assert heading in res.stdout
