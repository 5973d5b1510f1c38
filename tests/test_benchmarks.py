"""The benchmark harness runs end to end on the tiny model and reports every figure (no
wall-clock asserts: only that each measurement exists and that the optimized paths compute the
same results as the naive ones they are compared with)."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys


@pytest.mark.slow
def test_harness_tiny(repo_root, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "benchmarks", "--model", "tiny", "--edits", "2", "--threads", "1",
           "--sections", "edits", "optim", "eval", "floor", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    res = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    fig = json.loads(out.read_text())
    from editscale.edit.cost import cost_class
    from editscale.edit.methods import METHODS

    assert [r["method"] for r in fig["edits"]] == list(METHODS)  # every registered method, in the registry's order
    for r in fig["edits"]:
        # every method but UltraEdit optimizes a value or the weights (UltraEdit: one gradient pass)
        optimizes = cost_class(r["method"]).solve != "gradient"
        assert r["edits"] == 2 and r["s_total"] > 0 and (r["s_optimize"] > 0) == optimizes, r
        assert r["s_keys"] + r["s_optimize"] + r["s_update"] <= r["s_total"] * (1 + 1e-6) + 1e-9
        assert r["bytes_per_edit_factors"] > 0 and r["model_over_factors"] > 0
    if fig["edit_jobs"] > 1:  # methods timed in parallel worker processes
        assert all(r["concurrent_jobs"] == fig["edit_jobs"] for r in fig["edits"])
    lowrank = {r["method"]: r["bytes_per_edit_factors"] for r in fig["edits"]}
    assert lowrank["rome"] < lowrank["ft-c"]  # rank-one factors vs FT-C's dense update
    assert fig["optim"]["prefix_reuse"]["bit_identical"] is True
    assert all(fig["optim"][f"prefix_{m}"]["bit_identical"] is True for m in ("grace", "wise", "memoir"))
    assert fig["optim"]["keys_one_batch"]["max_rel_diff"] < 1e-4
    memo = fig["optim"]["base_memo"]
    assert memo["bit_identical"] is True and 0 < memo["distinct_neighbourhood_lists"] < memo["cases"]
    assert fig["eval"]["stats"]["same_result"] is True
    assert fig["eval"]["scorer"]["max_abs_nll_diff"] < 1e-4
    assert fig["floor"]["gflop_per_edit"] > 0 and 0 < fig["floor"]["fraction_of_peak"]
    for heading in ("Seconds per sequential edit", "Optimizations", "Evaluation and statistics", "Floor of one ROME edit"):
        assert heading in res.stdout


def test_sweep_applies_each_value_on_the_runs_own_inputs(tmp_path, tiny_model_dirs, repo_root):
    """benchmarks.sweep reads a work dir laid out as the workflow leaves it; a larger MEMIT
    mom2_update_weight gives a smaller update (the swept value is the one used)."""
    from benchmarks.sweep import run_setting
    from editscale.data.geofacts import build_geofacts
    from editscale.edit.chain import templates_record
    from editscale.edit.cli import resolve_run
    from editscale.workflow import run_record
    from editscale.edit.methods import get_method
    from editscale.io import write_json_atomic, write_jsonl_atomic
    from editscale.models.load import load_model, model_sha
    from editscale.stats.mom2 import compute_mom2, write_mom2

    model_dir = tiny_model_dirs("gpt2")
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "m").symlink_to(model_dir)
    run = {"name": "r", "model": "m", "method": "memit", "hparams": str(repo_root / "config/hparams/memit/tiny.yaml"),
           "corpus": "c", "segment": 2, "edits_per_step": 1, "seed": 0}
    resolved = resolve_run(run_record({"models": {"m": {"source": "tiny:gpt2", "dtype": "float32"}}}, run))
    run_dir = tmp_path / "results" / "r"
    write_json_atomic(run_dir / "run.json", resolved)
    cases = build_geofacts(seed=0)[:2]
    for i, c in enumerate(cases):
        c["edit_index"] = i + 1
    write_jsonl_atomic(run_dir / "edits.jsonl", cases)
    model, tok = load_model(model_dir)
    write_json_atomic(run_dir / "context_templates.json", templates_record(model, tok, "memit", resolved["hparams"], 0))
    texts = [c["prompt"].format(c["subject"]) + " " + c["target_true"] for c in build_geofacts(seed=0)[:200]]
    for module in get_method("memit").modules(model, resolved["hparams"]):
        mom2, count = compute_mom2(model, tok, [module], texts, seq_len=32, batch_size=32, progress=False)[module]
        write_mom2(tmp_path / "results" / "stats" / "m" / "c" / f"{module}.h5", mom2, count, module=module,
                   model_sha256=model_sha(model_dir), corpus="c", corpus_spec={}, dtype="float32")
    rows = [run_setting(str(tmp_path), "r", "mom2_update_weight", w, n_edits=2) for w in (10.0, 10000.0)]
    for r in rows:
        assert r["n_edits"] == 2 and r["method"] == "memit"
        assert all(0.0 <= r[k] <= 1.0 for k in ("es_now", "ps_now", "es_after"))
    assert rows[0]["value"] == 10.0 and rows[1]["value"] == 10000.0
    assert rows[1]["delta_norm"] < rows[0]["delta_norm"]


def test_compare_studies_sees_a_changed_table_value_and_nothing_else(tiny_study, tmp_path):
    """benchmarks.compare_studies (the before / after check of a refactor): a study equals its
    copy; one changed metric value is one difference naming the file."""
    import shutil

    import polars as pl

    from benchmarks.compare_studies import compare
    from editscale.io import read_parquet_metadata, write_parquet_atomic

    for side in ("before", "after"):
        shutil.copytree(tiny_study, tmp_path / side / "test-tiny", symlinks=True)
    assert compare(tmp_path / "before", tmp_path / "after", ["test-tiny"]) == 0
    path = tmp_path / "after/test-tiny/results/rome-tiny/metrics/perplexity/000006.parquet"
    df = pl.read_parquet(path)
    write_parquet_atomic(df.with_columns(pl.col("value") * 1.001), path, metadata=read_parquet_metadata(path))
    assert compare(tmp_path / "before", tmp_path / "after", ["test-tiny"]) == 1


@pytest.mark.slow
def test_eval_cost_reruns_the_checkpoint_jobs_side_by_side_and_leaves_the_study_alone(tiny_study, tmp_path):
    """benchmarks.eval_cost (issue 29 item 3): the checkpoint job at two counts and the edit-score
    job of each count's segment, re-run as Snakemake runs them, outputs to scratch: every metric of
    the smaller count's job gets its seconds at both counts and a ratio, history says how many edits
    it re-scored (the study's own table's count), and no file of the study changes."""
    import polars as pl

    from benchmarks.eval_cost import main
    from editscale.io import sha256_file

    def snapshot():
        return {str(p.relative_to(tiny_study)): (sha256_file(p), p.stat().st_mtime_ns)
                for p in sorted((tiny_study / "results").rglob("*")) if p.is_file()}

    before = snapshot()
    out = tmp_path / "cost.json"
    main(["--workdir", str(tiny_study), "--configfile", "config/test-tiny.yaml", "--run", "rome-tiny", "--ks", "3", "6",
          "--repeats", "1", "--out", str(out)], _saved := [])
    assert snapshot() == before
    res = json.loads(out.read_text())
    # each job's result was saved as it came (a killed harness keeps them), the partial file removed at the end
    assert [sum(len(v) for kind in r.values() for v in kind.values()) for r in _saved] == [1, 2, 3, 4]
    assert not out.with_suffix(".partial.json").exists()
    assert all(len(res["results"][kind][k]) == 1 for kind in ("checkpoint", "edit_scores") for k in ("3", "6"))
    rows = {r["metric"]: r for r in res["rows"]}
    assert {"history", "weights", "(model load and replay to k)", "(checkpoint job, wall)"} <= set(rows)
    history = rows["history"]
    for k, side in ((3, "lo"), (6, "hi")):
        table = pl.read_parquet(tiny_study / f"results/rome-tiny/metrics/history/{k:06d}.parquet")
        assert history[f"scored_{side}"] == table["edit_index"].n_unique()
    assert history["s_lo"] > 0 and history["ratio"] == pytest.approx(history["s_hi"] / history["s_lo"])
    assert history["ratio_per_scored_edit"] == pytest.approx(history["ratio"] * history["scored_lo"] / history["scored_hi"])
    scores = next(r for k, r in rows.items() if k.startswith("edit_scores (segment 1-3 vs 4-6)"))
    assert scores["scored_lo"] == scores["scored_hi"] == 3 and scores["flat"] in (True, False)
    assert "| history |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no checkpoint job of rome-tiny at k=4"):
        main(["--workdir", str(tiny_study), "--configfile", "config/test-tiny.yaml", "--run", "rome-tiny", "--ks", "4", "6",
              "--out", str(tmp_path / "x.json")])


def test_machine_kinds_counts_differences_flips_and_one_sided_rows(tmp_path):
    """Two machines' metric files: a rounded score, a flipped ES, a NaN on one side only and on
    both, a row on one side only, and the wall-time rows left out."""
    import polars as pl

    from benchmarks.machine_kinds import compare

    def write(root, rows):
        (root / "history").mkdir(parents=True)
        pl.DataFrame(rows, schema={"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64},
                     orient="row").write_parquet(root / "history" / "000025.parquet")

    write(tmp_path / "a", [(25, "e1", "es", 1.0), (25, "e2", "es", 1.0), (25, "e1", "score", 0.5), (25, "e2", "score", 0.25),
                           (25, "e1", "ns", float("nan")), (25, "e2", "ns", float("nan")), (25, "e3", "es", 0.0),
                           (25, "all", "seconds", 3.0)])
    write(tmp_path / "b", [(25, "e1", "es", 1.0), (25, "e2", "es", 0.0), (25, "e1", "score", 0.5), (25, "e2", "score", 0.2),
                           (25, "e1", "ns", float("nan")), (25, "e2", "ns", 0.5), (25, "all", "seconds", 9.0)])
    rows = {r["metric"]: r for r in compare(tmp_path / "a", tmp_path / "b")}
    assert set(rows) == {"es", "score", "ns"}  # seconds left out
    assert rows["es"]["flips"] == 1 and rows["es"]["unmatched"] == 1 and rows["es"]["rows"] == 3
    assert rows["score"]["flips"] is None and rows["score"]["max_abs"] == pytest.approx(0.05)
    assert rows["score"]["max_rel"] == pytest.approx(0.05 / 0.25)
    assert rows["ns"]["unmatched"] == 1 and rows["ns"]["max_abs"] == 0.0
