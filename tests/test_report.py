"""Report tables and figures from tiny synthetic metric files in the results convention."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from editscale.io import EditscaleError, read_parquet_metadata
from editscale.report import plots, tables
from editscale.report.phases import analyze_run

TASKS = ("sst2", "mrpc")
MODULES = ("transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj")


def _write(df: pl.DataFrame, results: Path, run: str, family: str, k: int) -> None:
    path = results / run / "metrics" / family / f"{k:06d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path)


def _long(k, items, metric_values: dict[str, list[float]], **extra) -> pl.DataFrame:
    rows = {"k": [], "item": [], "metric": [], "value": []}
    extra_rows = {c: [] for c in extra}
    for metric, values in metric_values.items():
        for i, (item, v) in enumerate(zip(items, values)):
            rows["k"].append(int(k[i]) if isinstance(k, (list, np.ndarray)) else int(k))
            rows["item"].append(item)
            rows["metric"].append(metric)
            rows["value"].append(float(v))
            for c, vals in extra.items():
                extra_rows[c].append(int(vals[i]))
    schema = {"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, **{c: pl.Int64 for c in extra}}
    return pl.DataFrame({**rows, **extra_rows}, schema=schema)


def write_run(
    results: Path,
    run: str,
    *,
    n_edits: int = 20,
    every: int = 5,
    collapse_at: int | None = None,
    outlier_edit: int | None = None,
    early_fall_until: int | None = None,
    seed: int = 0,
) -> None:
    """Every metric family of one run: gradual decline, optional collapse after `collapse_at`, or
    with `early_fall_until` a fast fall of 0.4 until then first."""
    rng = np.random.default_rng(seed)

    def level(k: int) -> float:
        drop = 0.6 if collapse_at is not None and k >= collapse_at else 0.0
        early = 0.4 * min(k, early_fall_until) / early_fall_until if early_fall_until else 0.0
        return 0.9 - 0.2 * k / n_edits - drop - early

    for k in range(0, n_edits + 1, every):
        lvl = level(k)
        noise = lambda n=1: rng.normal(0, 0.005, n)  # noqa: E731
        if k > 0:
            edits = list(range(k - every + 1, k + 1))
            cases = [f"{run}-c{j}" for j in edits]
            es = [1.0 if level(j) > 0.5 else 0.0 for j in edits]
            _write(
                _long(
                    edits,
                    cases,
                    # some cases have no neighborhood prompt: NS is NaN there
                    {"es": es, "ps": [0.8 * e for e in es], "ns": [math.nan if j % 4 == 0 else 0.7 for j in edits],
                     "score": [0.75] * len(edits), "em": es},
                ),
                results,
                run,
                "edit_scores",
                k,
            )
            hist_j = list(range(1, k + 1))
            hist_es = [1.0 if rng.random() < lvl else 0.0 for _ in hist_j]
            _write(
                _long(k, [f"{run}-c{j}" for j in hist_j], {"es": hist_es, "ps": hist_es}, edit_index=hist_j),
                results,
                run,
                "history",
                k,
            )
            norms = (1 + np.array(edits) / 100) * np.exp(rng.normal(0, 0.05, len(edits)))
            if outlier_edit in edits:
                norms[edits.index(outlier_edit)] *= 100
            _write(
                _long(
                    edits,
                    cases,
                    {"update_norm": norms, "update_rel": norms / 10, "outlier": [0.0] * len(edits)},
                    edit_index=edits,
                ),
                results,
                run,
                "weights_cases_tmp",
                k,
            )
        _write(
            _long(
                [k] * 8,
                list(TASKS) * 4,
                {
                    "f1": list(lvl - 0.1 + noise(2)),
                    "mcc": list(lvl - 0.3 + noise(2)),
                    "accuracy_ll": list(lvl + noise(2)),
                    "f1_ll": list(lvl - 0.05 + noise(2)),
                },
            ),
            results,
            run,
            "downstream",
            k,
        )
        _write(_long(k, ["all"], {"ngram_entropy": [5 * lvl + noise()[0]], "unigram_entropy_norm": [lvl]}), results, run, "generation", k)
        _write(_long(k, ["all"], {"perplexity": [20 / max(lvl, 0.05)]}), results, run, "perplexity", k)
        mods = _long(k, list(MODULES), {"fro": [0.1 * k, 0.2 * k], "fro_per_numel": [1e-4 * k] * 2, "spectral": [0.05 * k] * 2})
        case_path = results / run / "metrics" / "weights_cases_tmp" / f"{k:06d}.parquet"
        if case_path.exists():
            cases_df = pl.read_parquet(case_path)
            case_path.unlink()
            mods = pl.concat([mods.with_columns(pl.lit(None, pl.Int64).alias("edit_index")), cases_df])
        _write(mods, results, run, "weights", k)
    (results / run / "metrics" / "weights_cases_tmp").rmdir()


RUNS = [
    {"name": "rome-s0", "model": "tiny", "method": "ROME", "hparams": "h.json", "dataset": "cf", "sample": 0, "n_edits": 20, "segment": 5},
    {"name": "rome-s1", "model": "tiny", "method": "ROME", "hparams": "h.json", "dataset": "cf", "sample": 1, "n_edits": 20, "segment": 5},
    {"name": "memit-s0", "model": "tiny", "method": "MEMIT", "hparams": "h.json", "dataset": "cf", "sample": 0, "n_edits": 20, "segment": 5},
]


@pytest.fixture()
def results(tmp_path) -> Path:
    res = tmp_path / "results"
    for i, r in enumerate(RUNS):
        write_run(res, r["name"], n_edits=r["n_edits"], seed=i)
    return res


def _metrics(res: Path) -> list[Path]:
    """Every metric file under a test results dir: what a report rule declares as its inputs."""
    return sorted(res.glob("*/metrics/*/*.parquet"))


def _factors(res: Path) -> list[Path]:
    return sorted(res.glob("*/factors/*.h5"))


def _edit_log() -> pl.DataFrame:
    rows = [
        {"run": r["name"], "edit_index": j, "case_id": f"{r['name']}-c{j}", "seconds": 2.0, "update_norm": 1.0, "update_rel": 0.1, "v_loss": 0.01}
        for r in RUNS
        for j in range(1, 21)
    ]
    return pl.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# tables


def test_collect_metric_tidy_schema(results):
    df = tables.collect_metric("downstream", _metrics(results), RUNS)
    assert df.columns[:9] == ["run", "model", "method", "dataset", "sample", "edit", "metric", "item", "value"]
    assert dict(df.schema) == {**tables.TIDY_SCHEMA}
    assert df.height == 3 * 5 * 8  # runs x checkpoints x (tasks x metrics)
    assert sorted(df["run"].unique()) == ["memit-s0", "rome-s0", "rome-s1"]
    assert sorted(df["edit"].unique()) == [0, 5, 10, 15, 20]
    row = df.filter((pl.col("run") == "rome-s1") & (pl.col("edit") == 10) & (pl.col("item") == "sst2") & (pl.col("metric") == "f1"))
    assert row.height == 1 and row["method"][0] == "ROME" and row["sample"][0] == "1" and row["model"][0] == "tiny"

    hist = tables.collect_metric("history", _metrics(results), RUNS)
    assert hist.schema["edit_index"] == pl.Int64
    assert hist.filter((pl.col("run") == "rome-s0") & (pl.col("edit") == 20) & (pl.col("metric") == "es")).height == 20

    # only the family's own files are read; runs_meta restricts the runs
    files = sorted(results.glob("*/metrics/downstream/*.parquet"))
    assert tables.collect_metric("downstream", files, RUNS).equals(df)
    only = tables.collect_metric("downstream", _metrics(results), RUNS[:1])
    assert only["run"].unique().to_list() == ["rome-s0"]
    # a directory is refused: the tables read the declared files, never a glob of results/
    with pytest.raises(EditscaleError, match="is a directory: pass the metric files"):
        tables.collect_metric("downstream", results, RUNS)
    # no metadata: meta columns are null, not missing
    bare = tables.collect_metric("perplexity", _metrics(results))
    assert bare["method"].null_count() == bare.height and bare.schema["sample"] == pl.Utf8


def test_collect_metric_missing_family_and_bad_file(results, tmp_path):
    empty = tables.collect_metric("nonexistent", _metrics(results), RUNS)
    assert empty.height == 0 and list(empty.schema) == list(tables.TIDY_SCHEMA)
    bad = tmp_path / "bad" / "r" / "metrics" / "perplexity" / "000005.parquet"
    bad.parent.mkdir(parents=True)
    pl.DataFrame({"k": [5], "value": [1.0]}).write_parquet(bad)
    with pytest.raises(EditscaleError, match="lacks columns"):
        tables.collect_metric("perplexity", [bad])


def test_edit_scores_wide_one_row_per_edit(results):
    wide = tables.edit_scores_wide(tables.collect_metric("edit_scores", _metrics(results), RUNS))
    assert wide.height == 3 * 20
    assert wide.columns[:7] == ["run", "model", "method", "dataset", "sample", "edit", "case_id"]
    for m in ("es", "em", "ps", "ns", "score"):
        assert wide.schema[m] == pl.Float64
    assert wide.select(["run", "edit"]).is_unique().all()
    assert wide.filter(pl.col("run") == "memit-s0")["edit"].to_list() == list(range(1, 21))


def test_an_insertion_only_run_reads_efficacy_as_rewrite_accuracy(results):
    """Every edit of run memit-s0 a knowledge insertion (es / ps NaN in its edit scores and
    history): its edit scores, forgetting, phases and summary read rewrite_acc / rephrase_acc,
    and the summary says so; the other runs keep es."""
    for f in sorted((results / "memit-s0" / "metrics").glob("*/*.parquet")):
        df = pl.read_parquet(f)
        if f.parent.name in ("edit_scores", "history"):
            acc = df.filter(pl.col("metric").is_in(["es", "ps"])).with_columns(
                pl.col("metric").replace({"es": "rewrite_acc", "ps": "rephrase_acc"}), (0.5 * pl.col("value") + 0.25).alias("value"))
            df = pl.concat([df.with_columns(pl.when(pl.col("metric").is_in(["es", "ps", "score"])).then(float("nan")).otherwise(pl.col("value")).alias("value")), acc])
            df.write_parquet(f)
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    scores = t["edit_scores"]
    mine = scores.filter(pl.col("run") == "memit-s0")
    assert mine["es"].to_list() == mine["rewrite_acc"].to_list() and mine["ps"].to_list() == mine["rephrase_acc"].to_list()
    assert set(mine["efficacy_reading"]) == {"rewrite_acc"} and set(scores.filter(pl.col("run") != "memit-s0")["efficacy_reading"]) == {"es"}
    forgetting = t["forgetting"].filter(pl.col("run") == "memit-s0")
    assert forgetting["retention"].is_not_null().all() and forgetting.height > 0
    summary = {r["run"]: r for r in t["summary"].iter_rows(named=True)}
    assert summary["memit-s0"]["efficacy_reading"] == "rewrite_acc" and summary["rome-s0"]["efficacy_reading"] == "es"
    assert summary["memit-s0"]["es_at_end"] is not None and not math.isnan(summary["memit-s0"]["es_at_end"])


def test_forgetting_table_counts():
    hist = pl.DataFrame(
        {
            "run": ["r"] * 4,
            "model": "m",
            "method": "ROME",
            "dataset": "cf",
            "sample": "0",
            "edit": [10] * 4,
            "metric": ["es"] * 4,
            "item": ["a", "b", "c", "d"],
            "value": [1.0, 0.0, 0.0, 1.0],
            "edit_index": [1, 2, 3, 4],
        }
    )
    es = pl.DataFrame({"run": ["r"] * 4, "case_id": ["a", "b", "c", "d"], "edit": [1, 2, 3, 4], "es": [1.0, 1.0, 0.0, 1.0]})
    fg = tables.forgetting_table(hist, es)
    row = fg.row(0, named=True)
    assert row["n_scored"] == 4 and row["retention"] == pytest.approx(0.5)
    assert row["n_successful"] == 3  # c never succeeded
    assert row["forgotten_pct"] == pytest.approx(100 / 3)  # b forgotten out of a, b, d
    assert fg.schema["forgotten_pct"] == pl.Float64 and fg.schema["edit"] == pl.Int64


def _history_rows(rows, run="r"):
    """History family rows from (k, item, edit_index, es[, stratum_lo, stratum_hi])."""
    cols = {"edit": [], "item": [], "edit_index": [], "value": [], "stratum_lo": [], "stratum_hi": []}
    for r in rows:
        k, item, j, es, lo, hi = (*r, 1, r[0]) if len(r) == 4 else r
        for name, v in zip(cols, (k, item, j, es, lo, hi)):
            cols[name].append(v)
    n = len(rows)
    return pl.DataFrame({"run": [run] * n, "model": "m", "method": "ROME", "dataset": "cf", "sample": "0", "metric": ["es"] * n, **cols})


def test_forgetting_table_once_forgotten_always_forgotten():
    # right after their edits A, B, D succeeded; C never took
    es = pl.DataFrame({"run": ["r"] * 4, "case_id": ["A", "B", "C", "D"], "edit": [1, 2, 3, 4], "es": [1.0, 1.0, 0.0, 1.0]})
    hist = _history_rows([
        (2, "A", 1, 1.0), (2, "B", 2, 1.0),
        (4, "A", 1, 0.0), (4, "B", 2, 1.0), (4, "C", 3, 1.0), (4, "D", 4, 1.0),
        (6, "A", 1, 1.0), (6, "B", 2, 0.0), (6, "C", 3, 0.0), (6, "D", 4, 1.0),  # A comes back, B is lost
    ])
    fg = tables.forgetting_table(hist, es)
    assert fg["edit"].to_list() == [2, 4, 6] and fg["n_successful"].to_list() == [2, 3, 3]
    assert fg["forgotten_pct"].to_list() == pytest.approx([0.0, 100 / 3, 100 / 3])  # now: A at 4, B at 6
    assert fg["ever_forgotten_pct"].to_list() == pytest.approx([0.0, 100 / 3, 200 / 3])  # A stays forgotten
    # every earlier edit scored: exact figures, zero-width intervals
    for c in ("forgotten_pct", "ever_forgotten_pct"):
        assert fg[f"{c}_lo"].to_list() == pytest.approx(fg[c].to_list()) and fg[f"{c}_hi"].to_list() == pytest.approx(fg[c].to_list())


def test_forgetting_table_weights_a_stratified_sample_back_to_every_earlier_edit():
    """History samples 20 of 1000 earlier edits in 4 age strata; the estimate is the stratified
    mean (strata weighted by their sizes, not by their sample counts), and its interval covers
    the population figure."""
    from editscale.evaluate.history import history_sample

    rng = np.random.default_rng(0)
    k = 1000
    cases = [{"case_id": f"c{j}", "edit_index": j} for j in range(1, k + 1)]
    retained = {f"c{j}": float(rng.random() < (0.2 if j <= 500 else 0.9)) for j in range(1, k + 1)}  # old edits forgotten
    picked = history_sample(cases, k, 20)
    hist = _history_rows([(k, c["case_id"], c["edit_index"], retained[c["case_id"]], lo, hi) for c, lo, hi in picked])
    es = pl.DataFrame({"run": ["r"] * k, "case_id": list(retained), "edit": list(range(1, k + 1)), "es": [1.0] * k})
    row = tables.forgetting_table(hist, es).row(0, named=True)
    strata = {}
    for c, lo, hi in picked:
        strata.setdefault((lo, hi), []).append(retained[c["case_id"]])
    expected = sum((hi - lo + 1) * np.mean(v) for (lo, hi), v in strata.items()) / k
    naive = np.mean([retained[c["case_id"]] for c, _, _ in picked])
    assert row["n_scored"] == 20 and row["retention"] == pytest.approx(expected) and expected != pytest.approx(naive)
    assert row["forgotten_pct"] == pytest.approx(100 * (1 - expected))
    truth = np.mean(list(retained.values()))
    assert row["retention_lo"] < truth < row["retention_hi"] and row["retention_hi"] - row["retention_lo"] > 0.05
    # the stratum of edits 1..500 has no sampled success: left out, the others renormalized
    hist2 = hist.filter(pl.col("stratum_lo") != 1)
    es2 = es.with_columns(pl.when(pl.col("edit") <= 500).then(0.0).otherwise(1.0).alias("es"))
    row2 = tables.forgetting_table(hist2, es2).row(0, named=True)
    rest = {s: v for s, v in strata.items() if s[0] != 1}
    assert row2["forgotten_pct"] == pytest.approx(100 * (1 - sum((hi - lo + 1) * np.mean(v) for (lo, hi), v in rest.items()) / 500))


def test_forgetting_table_is_the_same_to_the_bit_whatever_the_order_of_its_rows():
    """`merge --publish` must regenerate a table bit for bit: the stratified estimates may not
    depend on the order in which rows (or the strata a group_by makes of them) come, which a
    float sum otherwise does in its last bits (seen on the long study's 10,000-edit history)."""
    from editscale.evaluate.history import history_sample

    rng = np.random.default_rng(1)
    rows = []
    for k in (2000, 5000, 10000):
        cases = [{"case_id": f"c{j}", "edit_index": j} for j in range(1, k + 1)]
        rows += [(k, c["case_id"], c["edit_index"], float(rng.random()), lo, hi) for c, lo, hi in history_sample(cases, k, 500)]
    hist = _history_rows(rows)
    es = pl.DataFrame({"run": ["r"] * 10000, "case_id": [f"c{j}" for j in range(1, 10001)], "edit": list(range(1, 10001)),
                       "es": rng.random(10000).tolist()})
    first = tables.forgetting_table(hist, es)
    for seed in range(8):
        again = tables.forgetting_table(hist.sample(fraction=1.0, shuffle=True, seed=seed), es.sample(fraction=1.0, shuffle=True, seed=seed))
        for col in first.columns:
            assert again[col].to_list() == first[col].to_list(), col


def test_report_tables_written_with_summary(results, tmp_path):
    out = tmp_path / "tables"
    written = tables.report_tables(RUNS, _metrics(results), out, edit_log=_edit_log(), storage_bytes={"rome-s0": 1234})
    names = {p.name for p in written}
    for name in ("history", "downstream", "generation", "perplexity", "weights", "edit_scores", "forgetting", "edit_log", "summary", "phases", "disabling_edits"):
        assert f"{name}.parquet" in names and f"{name}.csv" in names
        assert (out / f"{name}.parquet").stat().st_size > 0
    assert not list(out.glob(".*"))  # no temporary files left
    assert "editscale_version" in read_parquet_metadata(out / "summary.parquet")

    s = pl.read_parquet(out / "summary.parquet")
    assert s["run"].to_list() == ["rome-s0", "rome-s1", "memit-s0"]
    assert s.schema["onset"] == pl.Utf8 and s.schema["storage_bytes"] == pl.Int64
    assert s["onset"].to_list() == ["none within 20 edits"] * 3
    assert s["onset_k"].null_count() == 3
    assert "too few points" in s["onset_decision"][0]  # 5 checkpoints cannot show a change point
    r0 = s.row(0, named=True)
    assert r0["edit_seconds_total"] == pytest.approx(40.0) and r0["edit_seconds_mean"] == pytest.approx(2.0)
    assert r0["edit_seconds_median"] == pytest.approx(2.0)
    assert r0["storage_bytes"] == 1234 and s.row(1, named=True)["storage_bytes"] is None
    assert r0["n_edits"] == 20 and r0["edits_done"] == 20
    # counts <= n_edits (10) plus the end; the larger counts are absent
    assert "es_at_10" in s.columns and "es_at_end" in s.columns and "es_at_50" not in s.columns
    assert r0["es_at_10"] == pytest.approx(1.0)
    assert r0["downstream_f1_at_10"] is not None and r0["retention_at_end"] is not None
    csv = pl.read_csv(out / "summary.csv")
    assert csv.height == 3 and "onset" in csv.columns


def test_summary_reports_onset_and_disabling_edit(tmp_path):
    res = tmp_path / "results"
    runs = [{"name": "long", "model": "tiny", "method": "ROME", "dataset": "cf", "sample": 0, "n_edits": 300}]
    write_run(res, "long", n_edits=300, every=5, collapse_at=180, outlier_edit=178, seed=3)
    t = tables.build_tables(_metrics(res), runs)
    s = t["summary"].row(0, named=True)
    assert s["onset"] != "none within 300 edits"
    assert abs(s["onset_k"] - 180) <= 0.05 * 180
    assert s["onset_ci_low"] <= 180 <= s["onset_ci_high"]
    assert "178" in s["disabling_edits"].split(",")
    rp = analyze_run(t, "long")
    d = {x.edit_index: x for x in rp.disabling}[178]
    assert d.joint_drop and d.norm_outlier
    assert any("joint drop" in r for r in d.reasons) and any("update-norm outlier" in r for r in d.reasons)
    row = t["disabling_edits"].filter(pl.col("edit_index") == 178).row(0, named=True)
    assert row["joint_drop"] is True and row["norm_outlier"] is True and row["metric_flag"] is False
    assert {"downstream_f1", "efficacy"} <= set(rp.combined.curves_detected)
    assert set(t["summary"].columns) >= {"es_at_100", "es_at_200", "es_at_end", "retention_at_200"}
    # cases without a neighborhood prompt are left out of the NS mean, not allowed to blank it
    assert s["ns_at_100"] == pytest.approx(0.7) and s["ns_at_end"] == pytest.approx(0.7)
    # the paper's shape is not an early fall
    assert s["early_fall"] == "none" and s["early_fall_k"] is None


def test_summary_and_published_table_report_an_early_fall(tmp_path):
    from editscale.report.publish import results_table

    res = tmp_path / "results"
    runs = [{"name": "fast", "model": "tiny", "method": "UltraEdit", "dataset": "cf", "sample": 0, "n_edits": 300}]
    write_run(res, "fast", n_edits=300, every=5, early_fall_until=40, seed=4)
    t = tables.build_tables(_metrics(res), runs)
    s = t["summary"].row(0, named=True)
    assert s["onset"] == "none within 300 edits"  # damage first is not the paper's collapse
    assert s["early_fall"] == str(int(round(s["early_fall_k"])))
    assert abs(s["early_fall_k"] - 40) <= 10 and s["early_fall_ci_low"] <= 40 <= s["early_fall_ci_high"]
    # 0.4 of the downstream curve's 0.6 drop comes by edit 40
    assert s["early_fall_share"] == pytest.approx((0.4 + 0.2 * 40 / 300) / 0.6, abs=0.08)
    assert "downstream_f1" in s["early_fall_curves"].split(",")
    ph = t["phases"]
    assert set(ph["shape"]) == {"onset", "early_fall"}
    assert ph.filter((pl.col("curve") == "combined") & (pl.col("shape") == "early_fall"))["onset_k"][0] == s["early_fall_k"]
    row = results_table(t).row(0, named=True)
    assert row["early_fall_k"] == int(s["early_fall_k"]) and row["early_fall_pct"] == pytest.approx(100 * s["early_fall_share"])
    assert row["early_fall_ci"] == f"{int(s['early_fall_ci_low'])}-{int(s['early_fall_ci_high'])}"
    # every task falls as the mean does: the first of them is named, at the mean's break
    assert s["first_to_fall_shape"] == "early_fall" and abs(s["first_to_fall_k"] - 40) <= 10
    assert s["first_to_fall_curve"].split("[")[1].rstrip("]") in TASKS and row["first_to_fall"] == s["first_to_fall"]
    # the overview reads it from the phases table: shaded and named
    phase, _ = plots._phase_rows(t, ["fast"])
    assert phase["fast"]["early_fall_k"] == s["early_fall_k"] and phase["fast"]["early_fall_share"] == s["early_fall_share"]
    assert "early fall until" in plots.phase_title("fast", phase["fast"])


# ---------------------------------------------------------------------------------------------
# plots


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_samples_mean_and_band():
    df = pl.DataFrame(
        {
            "run": ["a", "a", "b", "b", "c"],
            "model": "m",
            "method": ["ROME", "ROME", "ROME", "ROME", "MEMIT"],
            "dataset": "cf",
            "sample": ["0", "0", "1", "1", "0"],
            "edit": [1, 2, 1, 2, 1],
            "value": [0.2, 0.4, 0.6, 0.8, 0.5],
        }
    )
    mm = plots.aggregate_samples(df, "edit", "value")
    rome1 = mm.filter((pl.col("series") == "ROME (2 samples)") & (pl.col("edit") == 1)).row(0, named=True)
    assert rome1["mean"] == pytest.approx(0.4) and rome1["lo"] == pytest.approx(0.2) and rome1["hi"] == pytest.approx(0.6)
    assert rome1["n_runs"] == 2 and rome1["runs"] == "a, b"
    memit = mm.filter(pl.col("series") == "MEMIT").row(0, named=True)
    assert memit["n_runs"] == 1 and memit["lo"] == memit["hi"] == pytest.approx(0.5)
    sd = plots.aggregate_samples(df, "edit", "value", band="sd")
    r = sd.filter((pl.col("series") == "ROME (2 samples)") & (pl.col("edit") == 1)).row(0, named=True)
    assert r["lo"] == pytest.approx(0.4 - np.std([0.2, 0.6], ddof=1))
    # different models get their own series
    two = plots.aggregate_samples(df.with_columns(pl.when(pl.col("run") == "b").then(pl.lit("m2")).otherwise(pl.col("model")).alias("model")), "edit", "value")
    assert set(two["series"]) == {"m / ROME", "m2 / ROME", "m / MEMIT"}


def test_every_figure_written_from_tiny_data(results, tmp_path):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    out = tmp_path / "plots"
    written = plots.make_plots(t, out, plots.FigureOptions(smooth=3))
    stems = {"edit_scores", "forgetting", "downstream", "weight_distance", "update_norms", "overview", "overview_rome-s0", "overview_rome-s1", "overview_memit-s0"}
    assert {p.name for p in written} == {f"{s}.{f}" for s in stems for f in ("html", "png", "svg")} | {"figures.html", "vega-embed.js"}
    for s in stems:
        html, png, svg = (out / f"{s}.{f}" for f in ("html", "png", "svg"))
        # each figure's page loads the folder's one bundle of vega's scripts
        assert '<script src="vega-embed.js">' in html.read_text() and "vegaEmbed('#vis'" in html.read_text()
        assert _is_png(png)
        assert "<svg" in svg.read_text()[:2000]
    assert not list(out.glob(".*"))
    # the multi-sample figure carries the band (two ROME samples) and a tooltip
    spec = plots.proficiency_chart(t, plots.FigureOptions(smooth=3)).to_dict()
    data = next(iter(spec["datasets"].values()))
    rome = [d for d in data if d["series"] == "ROME (2 samples)"]
    assert rome and all(d["n_runs"] == 2 for d in rome)
    assert any(layer["mark"]["type"] == "area" for layer in spec["spec"]["layer"])
    assert any("samples" in line for line in spec["title"]["subtitle"])
    assert all("tooltip" in layer["encoding"] for layer in spec["spec"]["layer"])


def _figures_page_specs(page: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"vegaEmbed\('#vis-\d+', (.*?), \{\"mode\": \"vega-lite\"\}\)", page)]


def test_the_figures_page_holds_every_figure_with_vegas_scripts_once(results, tmp_path):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    plots.make_plots(t, tmp_path, plots.FigureOptions(smooth=3), formats=("html",))
    page = (tmp_path / "figures.html").read_text()
    bundle = (tmp_path / "vega-embed.js").read_text()
    # vega's scripts once on the page, whatever the number of figures; every figure's spec after them
    assert page.count(bundle) == 1 and len(bundle) > 100_000
    specs = _figures_page_specs(page)
    stems = [p.stem for p in sorted(tmp_path.glob("*.html")) if p.name != "figures.html"]
    assert len(specs) == len(stems) == 9
    # it opens on the phases of every run
    assert specs[0]["title"]["text"] == "Phases of every run"
    assert len(page) < len(bundle) + sum(len((tmp_path / f"{s}.html").read_text()) for s in stems)


def _axes(spec, found=None):
    """Every (encoding channel, definition) with an axis or a legend, anywhere in a spec."""
    found = [] if found is None else found
    if isinstance(spec, dict):
        for ch, enc in (spec.get("encoding") or {}).items():
            if isinstance(enc, dict):
                found.append((ch, enc))
        for v in spec.values():
            _axes(v, found)
    elif isinstance(spec, list):
        for v in spec:
            _axes(v, found)
    return found


def test_edit_axes_have_integer_ticks_and_legends_are_not_truncated(results):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    charts = {name: fn(t, plots.FigureOptions(smooth=3)) for name, fn in (
        ("edit_scores", plots.proficiency_chart), ("forgetting", plots.forgetting_chart), ("downstream", plots.downstream_chart),
        ("weight_distance", plots.weights_chart), ("update_norms", plots.update_norm_chart))}
    charts["overview"] = plots.overview_chart(t, "rome-s0", phase={"onset_k": 10.0, "ci_low": 8.0, "ci_high": 12.0, "collapse_k": 15.0}, disabling=[11])
    for name, chart in charts.items():
        encs = _axes(chart.to_dict())
        edit_axes = [e for ch, e in encs if ch == "x" and e.get("field") in ("edit", "edit_index", "start")]
        assert edit_axes, name
        for e in edit_axes:  # no 2.5 edits
            assert e["axis"]["format"] == ",d" and e["axis"]["tickMinStep"] == 1, (name, e)
        for ch, e in encs:
            if ch in ("color", "strokeDash") and e.get("legend") is not None:
                assert e["legend"]["labelLimit"] == 0, (name, ch)


def test_a_method_keeps_its_colour_in_every_figure(results):
    from editscale.edit.methods import METHODS

    runs = [{**r, "method": m} for r, m in zip(RUNS, ("memit", "memit", "rome"))]
    t = tables.build_tables(_metrics(results), runs, edit_log=_edit_log())
    colors = plots.method_colors(list(METHODS))
    assert len(set(colors.values())) == len(colors)  # one colour per registered method
    # a method registered later goes last, so the methods before it keep their colours across versions
    assert list(METHODS)[:15] == ["rome", "r-rome", "memit", "emmet", "alphaedit", "encore", "nas", "rect", "prune", "ultraedit",
                                  "ft-c", "sphere", "grace", "wise", "lyaplock"]

    def scale(chart):
        color = next(e for ch, e in _axes(chart.to_dict()) if ch == "color" and e.get("field") == "series")
        return dict(zip(color["scale"]["domain"], color["scale"]["range"]))

    both = [scale(fn(t, plots.FigureOptions())) for fn in (plots.proficiency_chart, plots.forgetting_chart, plots.downstream_chart, plots.weights_chart)]
    assert all(s == {"memit (2 samples)": colors["memit"], "rome": colors["rome"]} for s in both)
    # the same method keeps its colour in a figure without the other method
    only_rome = tables.build_tables(_metrics(results), runs, edit_log=_edit_log())
    only_rome = {k: v.filter(pl.col("run") == "memit-s0") if "run" in v.columns else v for k, v in only_rome.items()}
    assert scale(plots.proficiency_chart(only_rome)) == {"rome": colors["rome"]}
    overview = plots.overview_chart(t, "memit-s0").to_dict()
    lines = [layer["mark"] for panel in overview["concat"] for layer in panel["layer"] if layer["mark"]["type"] == "line"]
    assert lines and all(m["color"] == colors["rome"] for m in lines)


def test_the_smoothing_is_named_only_when_a_run_has_more_edits_than_the_window(results):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())  # 20 edits per run
    assert plots.proficiency_chart(t, plots.FigureOptions(smooth=10)).to_dict()["title"]["text"] == "Editing proficiency (rolling mean over 10 edits)"
    assert plots.proficiency_chart(t, plots.FigureOptions(smooth=20)).to_dict()["title"]["text"] == "Editing proficiency"
    assert plots.proficiency_chart(t, plots.FigureOptions(smooth=1)).to_dict()["title"]["text"] == "Editing proficiency"
    panels = plots.overview_chart(t, "rome-s0", smooth=30).to_dict()["concat"]
    assert not any("rolling mean" in json.dumps(p["title"]) for p in panels)
    panels = plots.overview_chart(t, "rome-s0", smooth=5).to_dict()["concat"]
    assert [p["title"]["subtitle"] for p in panels if "ES of the new edit" in p["title"]["text"]] == ["rolling mean over 5 edits"]


def test_forgetting_figure_states_its_definition_and_a_sampled_history_band(tmp_path):
    res = tmp_path / "results"
    runs = [{"name": "one", "model": "tiny", "method": "rome", "dataset": "cf", "sample": 0, "n_edits": 20}]
    write_run(res, "one", n_edits=20, seed=1)
    # a sampled history: every other earlier edit, in one stratum of all earlier edits
    for f in sorted((res / "one/metrics/history").glob("*.parquet")):
        h = pl.read_parquet(f)
        h.filter(pl.col("edit_index") % 2 == 0).with_columns(pl.lit(1).alias("stratum_lo"), pl.col("k").alias("stratum_hi")).write_parquet(f)
    t = tables.build_tables(_metrics(res), runs)
    spec = plots.forgetting_chart(t).to_dict()
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "the % that fail now" in subtitle and "once forgotten, always forgotten" in subtitle and "mean ES of all earlier edits" in subtitle
    assert "95 % interval of the re-scored sample" in subtitle
    data = next(iter(spec["datasets"].values()))
    assert any(d["hi"] > d["lo"] for d in data)  # the band drawn (area layer filters hi > lo)


def test_downstream_panels_wrap_to_a_page_width_without_empty_panels(results):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    down = t["downstream"].filter(~((pl.col("item") == "mrpc") & (pl.col("metric") == "f1")))  # mrpc has no generated F1
    spec = plots.downstream_chart({**t, "downstream": down}).to_dict()
    assert spec["columns"] == 4 and set(spec["facet"]) == {"field", "type", "sort", "title", "header"}  # wrapped, no row x column grid
    panels = spec["facet"]["sort"]
    assert panels == ["mrpc: F1 (log-likelihood)", "mrpc: accuracy (log-likelihood)",
                      "sst2: generated F1", "sst2: F1 (log-likelihood)", "sst2: accuracy (log-likelihood)"]
    assert {d["panel"] for d in next(iter(spec["datasets"].values()))} == set(panels)


def test_overview_panels_show_each_curve_in_its_units_with_the_phases_shaded(tmp_path):
    from editscale.report.phases import curve_values

    res = tmp_path / "results"
    runs = [{"name": "long", "model": "tiny", "method": "rome", "dataset": "cf", "sample": 0, "n_edits": 300}]
    write_run(res, "long", n_edits=300, every=10, collapse_at=180, outlier_edit=175, seed=4)
    t = tables.build_tables(_metrics(res), runs)
    phase = {"onset_k": 180.0, "ci_low": 170.0, "ci_high": 190.0, "collapse_k": 200.0}
    spec = plots.overview_chart(t, "long", phase=phase, disabling=[175]).to_dict()
    assert spec["title"]["text"] == "long: onset of catastrophic forgetting at 180 edits (95 % CI 170-190), collapse at 200"
    values = curve_values(t, "long")
    panels = spec["concat"]
    assert len(panels) == sum(1 for sp, *_ in values.values() if sp.phases) and spec["columns"] == 4
    datasets = spec["datasets"]
    for panel in panels:
        layers = {layer["mark"]["type"]: layer for layer in panel["layer"]}
        assert set(layers) == {"rect", "rule", "line"}
        shade = datasets[layers["rect"]["data"]["name"]]
        assert [(d["mark"], d["start"], d["end"]) for d in shade] == [("onset 95 % interval", 170.0, 190.0), ("onset to collapse", 180.0, 200.0)]
        assert [d["start"] for d in datasets[layers["rule"]["data"]["name"]]] == [175.0]
        # the disabling edits are a rug along the panel's foot, not full-height rules over the curve
        rug = layers["rule"]["encoding"]
        assert (rug["y"]["value"], rug["y2"]["value"]) == (panel["height"] - plots.DISABLING_RUG_PX, panel["height"])
    # real units: perplexity's panel holds the perplexities (log scale), not a min-max normalization
    ppl = next(p for p in panels if p["title"]["text"] == "perplexity")
    line = next(layer for layer in ppl["layer"] if layer["mark"]["type"] == "line")
    assert line["encoding"]["y"]["scale"]["type"] == "log"
    spec_ppl, k, y = values["perplexity"]
    assert [d["value"] for d in datasets[line["data"]["name"]]] == pytest.approx(list(y))
    led = plots.overview_chart(t, "long", phase=phase, indicator={"leading_indicator": "weight_norm", "indicator_lead": 30.0}).to_dict()
    assert led["title"]["text"].endswith("collapse at 200; first indicator to move: weight_norm, 30 edits ahead")
    assert plots.overview_chart(t, "long").to_dict()["title"]["text"] == "long: no onset of catastrophic forgetting detected"
    # an early fall is shaded from the first edit to where it ends and named with its share of the drop
    fell = plots.overview_chart(t, "long", phase={"early_fall_k": 40.0, "early_fall_share": 0.46}).to_dict()
    assert fell["title"]["text"] == "long: no onset of catastrophic forgetting detected; early fall until 40 edits (46 % of the drop)"
    rect = next(layer for layer in fell["concat"][0]["layer"] if layer["mark"]["type"] == "rect")
    assert [(d["mark"], d["start"], d["end"]) for d in fell["datasets"][rect["data"]["name"]]] == [("early fall", 0.0, 40.0)]
    paths = plots.save_chart(plots.overview_chart(t, "long", phase=phase), tmp_path / "ov", formats=("png", "svg"))
    assert _is_png(paths[0]) and paths[1].stat().st_size > 0


def test_the_study_overview_shows_every_run_on_shared_ranges(results):
    t = tables.build_tables(_metrics(results), RUNS, edit_log=_edit_log())
    spec = plots.study_overview_chart(t, [r["name"] for r in RUNS], phases={}, disabling={}).to_dict()
    assert spec["title"]["text"] == "Phases of every run" and len(spec["vconcat"]) == 3
    glance = [sp.label.removeprefix("log ") for _, sp in __import__("editscale.evaluate.registry", fromlist=["x"]).curve_specs() if sp.glance]
    for row in spec["vconcat"]:
        titles = [p["title"]["text"] for p in row["concat"]]
        assert titles == [g for g in glance if g in titles] and len(titles) >= 4
    # one y range per curve across the rows, so rows compare
    def domain(row, title):
        panel = next(p for p in row["concat"] if p["title"]["text"] == title)
        return next(layer for layer in panel["layer"] if layer["mark"]["type"] == "line")["encoding"]["y"]["scale"]["domain"]
    assert domain(spec["vconcat"][0], "perplexity") == domain(spec["vconcat"][2], "perplexity")


def test_empty_inputs_give_no_data_figures(tmp_path):
    written = plots.make_plots({}, tmp_path / "empty", formats=("html", "png"), html="cdn")
    assert len(written) == 13 and all(p.stat().st_size > 0 for p in written)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_tables_phases_plots(results, tmp_path):
    from editscale.cli import main

    log_path = tmp_path / "edit_log.parquet"
    _edit_log().write_parquet(log_path)
    out = tmp_path / "tables"
    # runs and params inline, as the Snakemake rule passes them
    argv = ["report-tables", "--runs-json", json.dumps(RUNS), "--metrics", *map(str, _metrics(results)), "--out-dir", str(out)]
    assert main(argv + ["--edit-log", str(log_path), "--params-json", json.dumps({"smooth": 10, "window": 5, "seed": 1})]) == 0
    for name in ("summary", "edit_log", "phases", "disabling_edits", "forgetting"):
        assert (out / f"{name}.parquet").exists() and (out / f"{name}.csv").exists()
    summary = pl.read_parquet(out / "summary.parquet")
    assert summary["storage_bytes"].to_list() == [None, None, None]  # no --deltas / --factors given: unknown
    assert summary["edit_seconds_total"].to_list() == [40.0, 40.0, 40.0]
    first = pl.read_parquet(out / "phases.parquet")
    assert set(first.filter(pl.col("curve") == "combined")["run"]) == {r["name"] for r in RUNS}
    # the phases verb re-derives the same table
    assert main(["phases", "--tables", str(out), "--out", str(tmp_path / "ph" / "phases.parquet"), "--seed", "1"]) == 0
    again = pl.read_parquet(tmp_path / "ph" / "phases.parquet")
    assert again.equals(first)
    assert again.schema["onset_k"] == pl.Float64 and (tmp_path / "ph" / "disabling_edits.parquet").exists()
    # a runs file works too
    runs_json = tmp_path / "runs.json"
    runs_json.write_text(json.dumps({"runs": RUNS}))
    assert main(["report-tables", "--runs-json", str(runs_json), "--metrics", *map(str, _metrics(results)), "--out-dir", str(tmp_path / "t2")]) == 0
    assert pl.read_parquet(tmp_path / "t2" / "edit_log.parquet").height == 0  # no factors files
    plots_dir = tmp_path / "plots"
    assert main(["report-plots", "--tables", str(out), "--out-dir", str(plots_dir), "--smooth", "2", "--formats", "html,svg", "--html", "cdn"]) == 0
    assert (plots_dir / "overview.svg").exists() and (plots_dir / "overview_rome-s0.svg").exists()
    assert not (plots_dir / "edit_scores.png").exists()
    assert main(["report-tables", "--runs-json", str(tmp_path / "missing.json"), "--metrics", *map(str, _metrics(results)), "--out-dir", str(tmp_path / "t3")]) == 2
    assert main(["report-plots", "--tables", str(out), "--out-dir", str(plots_dir), "--formats", "pdf"]) == 2


def test_edit_log_read_from_factors(tmp_path):
    h5py = pytest.importorskip("h5py")
    res = tmp_path / "results"
    for k, edits in ((2, [1, 2]), (4, [3, 4])):
        path = res / "r" / "factors" / f"{k:06d}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            g = f.create_group("log")
            g.create_dataset("case_id", data=np.array([f"c{j}" for j in edits], dtype=h5py.string_dtype()))
            g.create_dataset("edit_index", data=np.array(edits, dtype=np.int64))
            g.create_dataset("seconds", data=np.array([1.5] * len(edits)))
            g.create_dataset("update_norm", data=np.array([1.0, 2.0]))
            g.create_dataset("factor_kind", data=np.array(["rank1"] * len(edits), dtype=h5py.string_dtype()))
    log = tables.edit_log_from_factors(_factors(res), ["r", "absent"])
    assert log["edit_index"].to_list() == [1, 2, 3, 4] and log["case_id"].to_list() == ["c1", "c2", "c3", "c4"]
    assert log.schema["seconds"] == pl.Float64 and log["v_loss"].null_count() == 4 and "factor_kind" in log.columns
    t = tables.build_tables(_metrics(res), [{"name": "r", "method": "ROME", "n_edits": 4}], factors=_factors(res))
    assert t["edit_log"].height == 4
    assert t["summary"].row(0, named=True)["edit_seconds_total"] == pytest.approx(6.0)


def test_rolling_mean_skips_edits_without_prompts():
    """An edit with no neighborhood prompts (NaN) must not blank every later window."""
    import math

    from editscale.report.plots import _rolling

    df = pl.DataFrame({"run": ["a"] * 4, "edit": [1, 2, 3, 4], "ns": [math.nan, 1.0, 0.0, 1.0]})
    out = _rolling(df, ["ns"], 2)["ns"].to_list()
    assert out[0] is None and out[1:] == [1.0, 0.5, 0.5]


def test_summary_has_both_efficacy_readings_side_by_side(tmp_path):
    """es / ps right after each edit (edit_scores) next to the same edits re-scored once at the last
    checkpoint (history): they differ when later edits damage earlier ones (collapse at 12)."""
    res = tmp_path / "results"
    runs = [{"name": "r", "model": "tiny", "method": "MEMIT", "dataset": "cf", "sample": 0, "n_edits": 20}]
    write_run(res, "r", n_edits=20, every=5, collapse_at=12)
    t = tables.build_tables(_metrics(res), runs)
    s = t["summary"].row(0, named=True)
    scores, hist = t["edit_scores"], t["history"]
    assert s["last_checkpoint"] == 20
    assert s["es_after_each_edit"] == pytest.approx(float(scores["es"].mean()))
    assert s["ps_after_each_edit"] == pytest.approx(float(scores["ps"].mean()))
    at_end = hist.filter((pl.col("edit") == 20) & (pl.col("metric") == "es"))
    assert at_end.height == 20 and s["es_at_last_checkpoint"] == pytest.approx(float(at_end["value"].mean()))
    assert s["es_at_last_checkpoint"] < s["es_after_each_edit"]
    cols = t["summary"].columns
    assert cols.index("es_at_last_checkpoint") == cols.index("es_after_each_edit") + 1


# ---------------------------------------------------------------------------------------------
# the results API and `editscale compare`


def _readme_results_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Results in a notebook", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_results_example_runs_on_a_finished_study(tiny_study):
    import subprocess
    import sys

    code = _readme_results_example()
    assert len(code.strip().splitlines()) == 5
    out = subprocess.run([sys.executable, "-c", code + "print(type(summary).__module__, len(history))"], cwd=tiny_study,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rome-tiny" in out.stdout and "perplexity_ratio" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("pandas")


def test_results_join_each_runs_resolved_config_and_compare_reads_the_tables(tiny_study):
    from editscale import results

    res = results.load(tiny_study / "results")
    record = json.loads((tiny_study / "results" / "rome-tiny" / "run.json").read_text())
    history = res["history"]
    assert history.height == res.tables["history"].height  # the join adds columns, never rows
    assert set(history["hp.v_lr"].unique().to_list()) == {record["hparams"]["v_lr"]}
    assert set(history["config_hash"].unique().to_list()) == {record["config_hash"]}
    assert set(history["hparams_file"].unique().to_list()) == {record["hparams_file"]}
    assert res.table("history", join_config=False).columns == res.tables["history"].columns
    assert res.pandas("summary").shape == res["summary"].shape
    # the perplexity ratio is the last checkpoint over k = 0, read off the metric files
    ppl = {int(p.stem): pl.read_parquet(p).filter(pl.col("metric") == "perplexity")["value"][0]
           for p in (tiny_study / "results" / "rome-tiny" / "metrics" / "perplexity").glob("*.parquet")}
    cmp = res.compare(["rome-tiny"])
    assert cmp["perplexity_ratio"][0] == pytest.approx(ppl[max(ppl)] / ppl[0])
    summary = res.tables["summary"].row(0, named=True)
    assert cmp["es_at_end"][0] == summary["es_at_end"] and cmp["onset"][0] == summary["onset"]
    with pytest.raises(EditscaleError, match=r"run\(s\) \['nope'\] not in .*runs: \['rome-tiny'\]"):
        res.compare(["nope"])
    # any count the run has reached, computed as the summary computes its columns
    at_end_again = res.compare(["rome-tiny"], at=[6], window=None)  # 6 = n_edits: the summary's "end" window
    assert at_end_again["es_at_6"][0] == pytest.approx(summary["es_at_end"])
    scores = res.tables["edit_scores"].filter(pl.col("run") == "rome-tiny").sort("edit")
    at_3 = res.compare(["rome-tiny"], at=[3], window=2)
    assert at_3["es_at_3"][0] == pytest.approx(scores.filter(pl.col("edit").is_in([2, 3]))["es"].mean())
    with pytest.raises(EditscaleError, match=r"--at 7: run rome-tiny has reached 6 edits"):
        res.compare(at=[7])
    # the runs' config typed: numbers as numbers, lists as JSON text
    assert res.runs.schema["hp.v_lr"] == pl.Float64 and res.runs.schema["segment"] == pl.Int64 and res.runs.schema["seed"] == pl.Int64
    assert res.runs.schema["hp.layers"] == pl.Utf8 and json.loads(res.runs["hp.layers"][0]) == record["hparams"]["layers"]
    assert repr(res).startswith(f"Results({str(tiny_study / 'results')!r}: 1 run(s) [rome-tiny]; tables [")
    with pytest.raises(EditscaleError, match="no report table 'nope'"):
        res["nope"]


@pytest.mark.slow
def test_compare_cli_prints_the_table_and_names_bad_input(tiny_study, tmp_path):
    import subprocess

    def compare(*args, cwd=tiny_study):
        import sys

        exe = str(Path(sys.executable).parent / "editscale")  # the venv's, activated or not
        return subprocess.run([exe, "compare", *args], cwd=cwd, capture_output=True, text=True, timeout=300)

    text = compare("rome-tiny", "--at", "end")
    assert text.returncode == 0, text.stderr
    header, rule, row = text.stdout.splitlines()
    assert header.split()[:5] == ["run", "method", "model", "n_edits", "onset"] and set(rule.replace(" ", "")) == {"-"}
    assert row.startswith("rome-tiny")
    csv = pl.read_csv(compare("--format", "csv").stdout.encode())
    assert csv["run"].to_list() == ["rome-tiny"] and "perplexity_ratio" in csv.columns
    md = compare("--format", "markdown", "--at", "3", "end").stdout.splitlines()
    assert md[0].startswith("| run | method |") and "es_at_3" in md[0] and md[1].startswith("| --- | --- |") and md[2].startswith("| rome-tiny |")
    tex = compare("--format", "latex").stdout
    assert tex.startswith("\\begin{tabular}{") and "rome-tiny" in tex and "es\\_at\\_end" in tex and tex.rstrip().endswith("\\end{tabular}")
    bad = compare("--at", "ten")
    assert bad.returncode != 0 and "--at takes edit counts or 'end', got 'ten'" in bad.stderr
    missing = compare(cwd=tmp_path)
    assert missing.returncode != 0 and "results/studies/default/tables/summary.parquet not found" in missing.stderr


def test_a_runs_published_means_do_not_depend_on_the_other_runs_in_the_table():
    """Defect: publish took each run's mean with one polars group_by over every run's rows, which
    sums in partitions; when WISE joined the methods table, ROME's NS, NAS's PS and PRUNE's PS moved
    in their last bit. A run's row now depends on its rows only: an exactly rounded mean (fsum).
    The shape is the methods table's: 14 runs of 200 scores in tenths (the old code moved 5 of them)."""
    from editscale.report.publish import results_table

    rng = np.random.default_rng(0)
    runs = [f"run{i}" for i in range(14)]
    values = {run: (rng.integers(0, 11, 200) / 10).tolist() for run in runs}
    values["run1"][7] = math.nan  # a case without such prompts: left out

    def tables(names):
        scores = pl.DataFrame([{"run": r, "es": v, "ps": v, "ns": v} for r in names for v in values[r]])
        ppl = pl.DataFrame([{"run": r, "edit": k, "metric": "perplexity", "value": v}
                            for r in names for k in (0, 10) for v in values[r][10:50]])
        summary = pl.DataFrame([{"run": r, "method": r, "n_edits": 10} for r in names])
        return {"summary": summary, "edit_scores": scores, "perplexity": ppl, "downstream": ppl.clear()}

    together = {row["run"]: row for row in results_table(tables(runs)).iter_rows(named=True)}
    for run in runs:
        assert results_table(tables([run])).row(0, named=True) == together[run], run
    kept = [v for v in values["run1"] if not math.isnan(v)]
    assert together["run1"]["ns_after_edit"] == math.fsum(kept) / len(kept)
    assert together["run1"]["perplexity_end"] == math.fsum(values["run1"][10:50]) / 40


def test_a_published_png_is_compacted_losslessly_and_broken_pngs_are_refused(tmp_path):
    """publish.compact_png: the image data deflated again at zlib's highest level (vl-convert
    deflates fast). Same filtered scanlines, so the same pixels; smaller; every chunk's CRC valid;
    the other chunks kept in order. A file that is no PNG, a chunk whose CRC fails, or a file cut
    inside a chunk header is one error."""
    import zlib

    from editscale.io import EditscaleError
    from editscale.report.publish import compact_png, png_chunks

    res = tmp_path / "results"
    write_run(res, "long", n_edits=300, every=10, collapse_at=180, outlier_edit=175, seed=4)
    t = tables.build_tables(_metrics(res), [{"name": "long", "model": "tiny", "method": "rome", "dataset": "cf", "sample": 0, "n_edits": 300}])
    png = plots.save_chart(plots.overview_chart(t, "long"), tmp_path / "ov", formats=("png",))[0].read_bytes()
    small = compact_png(png)

    def pixels(b: bytes) -> bytes:
        return zlib.decompress(b"".join(data for kind, data in png_chunks(b) if kind == b"IDAT"))

    assert len(small) < 0.8 * len(png) and pixels(small) == pixels(png)
    kinds = [kind for kind, _ in png_chunks(small)]  # png_chunks checks every CRC
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") == 1
    assert [k for k in kinds if k != b"IDAT"] == [k for k, _ in png_chunks(png) if k != b"IDAT"]
    assert compact_png(small) == small  # deterministic, and a second pass changes nothing
    with pytest.raises(EditscaleError, match="not a PNG"):
        compact_png(b"GIF89a" + small[6:])
    broken = bytearray(small)
    broken[40] ^= 0xFF  # inside the first chunks' data
    with pytest.raises(EditscaleError, match="fails its CRC"):
        compact_png(bytes(broken))
    with pytest.raises(EditscaleError, match="truncated"):
        compact_png(small + b"\x00\x00")


def test_a_published_figure_whose_drawing_did_not_change_keeps_its_png(tmp_path, monkeypatch):
    """publish.small_png: each PNG names, in its tEXt chunks, the SVG it was drawn from (hash and
    size bound), its scale and the renderer. Published again from the same SVG, the PNG is kept
    byte for byte without rendering (another vl-convert would move pixels, not the picture); a
    changed SVG, another bound, or a PNG without our text is drawn again."""
    import vl_convert

    from editscale.report.publish import PNG_RENDERER, PNG_SCALE, PNG_SOURCE, figure_source, png_text, small_png

    res = tmp_path / "results"
    write_run(res, "long", n_edits=300, every=10, collapse_at=180, outlier_edit=175, seed=4)
    t = tables.build_tables(_metrics(res), [{"name": "long", "model": "tiny", "method": "rome", "dataset": "cf", "sample": 0, "n_edits": 300}])
    svg = plots.save_chart(plots.overview_chart(t, "long"), tmp_path / "ov", formats=("svg",))[0]
    again = plots.save_chart(plots.overview_chart(t, "long"), tmp_path / "ov2", formats=("svg",))[0]
    assert svg.read_bytes() == again.read_bytes()  # the same tables draw the same SVG
    out = tmp_path / "pub" / "ov.png"
    out.parent.mkdir()
    scale = small_png(svg, out)
    first = out.read_bytes()
    text = png_text(first)
    assert text[PNG_SOURCE] == figure_source(svg.read_bytes(), 300_000) and float(text[PNG_SCALE]) == scale
    assert text[PNG_RENDERER].startswith("vl-convert-python ")

    renders = []
    real = vl_convert.svg_to_png

    def counted(svg_text, scale):
        renders.append(scale)
        return real(svg_text, scale=scale)

    monkeypatch.setattr(vl_convert, "svg_to_png", counted)
    assert small_png(svg, out) == scale and out.read_bytes() == first and renders == []
    small_png(svg, out, max_bytes=299_999)  # another bound: drawn again
    assert renders == [1.0] and png_text(out.read_bytes())[PNG_SOURCE].endswith("max-bytes 299999")
    svg.write_text(svg.read_text().replace("</svg>", "<rect width=\"1\" height=\"1\"/></svg>"))
    small_png(svg, out)  # the drawing changed: drawn again
    assert len(renders) == 2 and png_text(out.read_bytes())[PNG_SOURCE] == figure_source(svg.read_bytes(), 300_000)
    out.write_bytes(real(svg.read_text(), scale=1.0))  # a PNG without our text (published before it was kept)
    small_png(svg, out)
    assert len(renders) == 3 and PNG_SOURCE in png_text(out.read_bytes())


def test_log_spaced_checkpoints_get_a_log_edit_axis_and_linear_ones_keep_theirs():
    """A long study's checkpoints (0, 10, 20, 50, ..., 10,000) on a linear axis crowd its first
    thousand edits into the left edge: their axis is symmetric-log, ticked at powers of ten."""
    long_grid = [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    scale, ticks, note = plots.edit_scale(long_grid, 10000)
    assert scale.to_dict() == {"type": "symlog", "domain": [0, 10000], "nice": False}
    assert ticks == [0, 10, 100, 1000, 10000] and note == "edits on a log scale"
    assert plots.edit_scale(long_grid[:7], 500)[1] == [0, 10, 100, 500]  # a chain stopped at 500 ends on its tick
    for linear in (list(range(0, 201, 25)), list(range(1, 301))):  # the methods study's grid; one point per edit
        scale, ticks, note = plots.edit_scale(linear, max(linear))
        assert "type" not in scale.to_dict() and ticks is None and note == ""
    frame = pl.DataFrame({"edit": long_grid, "mean": [1.0 - 0.05 * i for i in range(11)], "series": "ultraedit", "method": "ultraedit"})
    frame = frame.with_columns(lo=pl.col("mean"), hi=pl.col("mean"), n_runs=pl.lit(1), runs=pl.lit("u"))
    spec = plots.line_band(frame, x="edit", x_title="edits", y_title="score", title="t").to_dict()
    x = spec["layer"][1]["encoding"]["x"]
    assert x["scale"]["type"] == "symlog" and x["axis"]["values"] == [0, 10, 100, 1000, 10000]
    assert "edits on a log scale" in spec["title"]["subtitle"]
