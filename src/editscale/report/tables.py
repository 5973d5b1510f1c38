"""Report tables: every metric of every run gathered into tidy polars tables.

Input convention (written by the evaluate stage): `results/{run}/metrics/{family}/{k:06d}.parquet`,
a long table with columns k (Int64, model state after k edits), item (Utf8), metric (Utf8),
value (Float64) and optional extra columns (edit_index, ...).

Output (`results/studies/<study>/tables/`, each as .parquet with provenance metadata and as .csv, written
atomically):

- `{family}.parquet` for history, downstream, generation, perplexity, weights: tidy long tables
  with columns run, model, method, dataset, sample, edit (= k), metric, item, value, then any extra
  columns of the inputs (e.g. edit_index of history rows). `sample` is kept as text.
- `edit_scores.parquet`: one row per run and edit, wide: run, model, method, dataset, sample, edit,
  case_id, es, em, ps, pm, ns, nm, score, efficacy_em, paraphrase_em (whatever metrics exist).
- `forgetting.parquet`: per run and checkpoint, the history re-scored: n_scored (earlier edits
  scored), retention (mean es of all earlier edits), paraphrase_retention (mean ps), n_successful
  (scored edits that succeeded when they were made: es >= threshold right after the edit),
  forgotten_pct (share of the successful edits whose es is now below the threshold, in %) and
  ever_forgotten_pct (below it now or at any earlier checkpoint: once forgotten, always
  forgotten); stratified estimates with 95 % intervals (_lo, _hi) when history re-scores a sample
  (`forgetting_table`). Without edit scores every scored edit counts as successful.
- `edit_log.parquet`: the per-edit log (run, edit_index, case_id, seconds, update_norm,
  update_rel, v_loss, ...): the one the caller passed, else the `log` group of every
  results/{run}/factors/*.h5 (empty when there is none).
- `indicators.parquet`: per run, collapse indicator and checkpoint: value, growth per edit and
  ratio to the unedited model (`indicator_table`); the summary names the leading indicator.
- `phases.parquet`, `disabling_edits.parquet`: editscale.report.phases (onset of catastrophic
  forgetting per curve and combined; disabling edits with reasons).
- `summary.parquet`: one row per run, see `summary_table`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from ..config import section_defaults
from ..io import EditscaleError, atomic_path, provenance, sha256_json, write_parquet_atomic

log = logging.getLogger(__name__)

def families() -> list[str]:
    """The metric families of the report: every registered metric (editscale.evaluate.registry)."""
    from ..evaluate.registry import METRICS

    return list(METRICS)


META_COLS = ("run", "model", "method", "dataset", "sample")
TIDY_SCHEMA = {
    "run": pl.Utf8,
    "model": pl.Utf8,
    "method": pl.Utf8,
    "dataset": pl.Utf8,
    "sample": pl.Utf8,
    "edit": pl.Int64,
    "metric": pl.Utf8,
    "item": pl.Utf8,
    "value": pl.Float64,
}
EDIT_SCORE_METRICS = ("es", "em", "ps", "pm", "ns", "nm", "score", "efficacy_em", "paraphrase_em",
                      "rewrite_acc", "rephrase_acc", "locality")  # the last three: EasyEdit's names (evaluate.edit_scores)
_REPORT = section_defaults("report")  # the schema's defaults of the summary settings
SUMMARY_COUNTS = tuple(_REPORT["counts"])
REQUIRED = ("k", "item", "metric", "value")


# ----------------------------------------------------------------------------------------------
# run descriptions


def normalize_runs_meta(runs_meta) -> dict[str, dict]:
    """Run descriptions keyed by name, from a list of dicts, a mapping name -> dict, a config dict
    with a "runs" list, or None."""
    if runs_meta is None:
        return {}
    if isinstance(runs_meta, Mapping) and "runs" in runs_meta:
        runs_meta = runs_meta["runs"]
    if isinstance(runs_meta, Mapping):
        return {str(name): {"name": str(name), **dict(meta or {})} for name, meta in runs_meta.items()}
    out = {}
    for meta in runs_meta:
        if "name" not in meta:
            raise EditscaleError(f"run description without a name: {meta}")
        out[str(meta["name"])] = dict(meta)
    return out


def load_json_arg(value: str | os.PathLike, what: str = "json"):
    """A JSON value given inline (starting with '[' or '{') or as a path to a file."""
    text = str(value).strip()
    if text.startswith(("[", "{")):
        source = "inline JSON"
    else:
        path = Path(text)
        if not path.exists():
            raise EditscaleError(f"{what} not found: {path}")
        text, source = path.read_text(), str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"{what} ({source}): not valid JSON ({exc})") from exc


def load_runs_json(value: str | os.PathLike) -> dict[str, dict]:
    """Run descriptions from inline JSON or a JSON file (see normalize_runs_meta)."""
    return normalize_runs_meta(load_json_arg(value, "runs json"))


def _meta_frame(runs: Iterable[str], meta: Mapping[str, dict]) -> pl.DataFrame:
    rows = []
    for r in runs:
        m = meta.get(r, {})
        rows.append(
            {
                "run": r,
                "model": None if m.get("model") is None else str(m["model"]),
                "method": None if m.get("method") is None else str(m["method"]),
                "dataset": None if m.get("dataset") is None else str(m["dataset"]),
                "sample": None if m.get("sample") is None else str(m["sample"]),
            }
        )
    return pl.DataFrame(rows, schema={c: pl.Utf8 for c in META_COLS})


# ----------------------------------------------------------------------------------------------
# collecting metric files


def run_of(path: str | os.PathLike, depth: int) -> str:
    """The run a results file belongs to: results/{run}/metrics/{family}/{k}.parquet (depth 2) or
    results/{run}/factors/{k}.h5 (depth 1)."""
    return Path(path).parents[depth].name


def metric_files(family: str, paths: Iterable[str | os.PathLike], runs: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """(run, parquet path) of one metric family among `paths`, the files a rule declared as its
    inputs ({run}/metrics/{family}/{k}.parquet). A directory is refused: globbing results/ would
    let checkpoints no longer in the config (a lowered n_edits, a changed grid) into the tables."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = None if runs is None else set(runs)
    found: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            raise EditscaleError(f"{p} is a directory: pass the metric files themselves (the rule's declared inputs)")
        if p.parent.name == family:
            found.append((run_of(p, 2), p))
    return [(r, p) for r, p in found if runs is None or r in runs]


def read_metric_file(path: str | os.PathLike) -> pl.DataFrame:
    """One metric file, checked and cast to the convention (k Int64, item/metric Utf8, value Float64)."""
    path = Path(path)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for a broken file
        raise EditscaleError(f"cannot read metric file {path}: {exc}") from exc
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise EditscaleError(f"metric file {path} lacks columns {missing} (has {df.columns})")
    casts = [
        pl.col("k").cast(pl.Int64),
        pl.col("item").cast(pl.Utf8),
        pl.col("metric").cast(pl.Utf8),
        pl.col("value").cast(pl.Float64),
    ]
    if "edit_index" in df.columns:
        casts.append(pl.col("edit_index").cast(pl.Int64))
    return df.with_columns(casts)


def empty_tidy(extra: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame:
    return pl.DataFrame(schema={**TIDY_SCHEMA, **(extra or {})})


def collect_metric(family: str, paths, runs_meta=None) -> pl.DataFrame:
    """Tidy long table of one metric family over runs.

    Columns: run, model, method, dataset, sample, edit (= k), metric, item, value, then any extra
    columns of the files. Run descriptions (`runs_meta`: list of run dicts or mapping) supply
    model / method / dataset / sample and, when given, restrict the runs read.
    """
    meta = normalize_runs_meta(runs_meta)
    files = metric_files(family, paths, runs=meta.keys() if meta else None)
    if not files:
        return empty_tidy({"edit_index": pl.Int64} if family == "history" else None)
    frames = [read_metric_file(p).with_columns(pl.lit(run, pl.Utf8).alias("run")) for run, p in files]
    df = pl.concat(frames, how="diagonal_relaxed").rename({"k": "edit"})
    runs = sorted(df["run"].unique().to_list())
    df = df.join(_meta_frame(runs, meta), on="run", how="left")
    base = list(TIDY_SCHEMA)
    extras = [c for c in df.columns if c not in base]
    return df.select(base + extras).sort(["run", "edit", "metric", "item"])


def edit_scores_wide(long: pl.DataFrame) -> pl.DataFrame:
    """One row per run and edit: meta, edit, case_id and one column per edit-score metric."""
    keys = list(META_COLS) + ["edit", "item"]
    if long.height == 0:
        schema = {**{c: TIDY_SCHEMA[c] for c in META_COLS}, "edit": pl.Int64, "case_id": pl.Utf8}
        return pl.DataFrame(schema={**schema, **{m: pl.Float64 for m in ("es", "ps", "ns", "score")}})
    wide = long.select(keys + ["metric", "value"]).pivot(
        on="metric", index=keys, values="value", aggregate_function="last"
    )
    metrics = [c for c in wide.columns if c not in keys]
    ordered = [m for m in EDIT_SCORE_METRICS if m in metrics] + sorted(m for m in metrics if m not in EDIT_SCORE_METRICS)
    wide = wide.rename({"item": "case_id"}).select(list(META_COLS) + ["edit", "case_id"] + ordered)
    return wide.with_columns([pl.col(m).cast(pl.Float64) for m in ordered]).sort(["run", "edit"])


# the reading of an insertion-only run (editscale.data.schema.is_insertion): no old answer, so the
# token accuracy of the new answer (EasyEdit's reading) stands where P(new) > P(old) is undefined
INSERTION_READINGS = {"es": "rewrite_acc", "ps": "rephrase_acc"}


def insertion_fallback(edit_scores: pl.DataFrame, history: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Runs whose every edit is a knowledge insertion (es undefined for every edit, rewrite_acc
    scored) read es as rewrite_acc and ps as rephrase_acc, in the edit scores and in history's
    re-scores, so that proficiency, forgetting, phases and the summary have a reading; the edit
    scores' column `efficacy_reading` names which ("es" or "rewrite_acc") for every run. Runs that
    mix insertions and edits keep es (its mean leaves the insertions out)."""
    if edit_scores.height == 0 or "es" not in edit_scores.columns:
        return edit_scores, history
    fallback = []
    if "rewrite_acc" in edit_scores.columns:
        by_run = edit_scores.group_by("run").agg(pl.col("es").fill_nan(None).is_not_null().any().alias("has_es"),
                                                 pl.col("rewrite_acc").fill_nan(None).is_not_null().any().alias("has_acc"))
        fallback = sorted(by_run.filter(~pl.col("has_es") & pl.col("has_acc"))["run"].to_list())
    mine = pl.col("run").is_in(fallback)
    scores = edit_scores.with_columns(pl.when(mine).then(pl.lit("rewrite_acc")).otherwise(pl.lit("es")).alias("efficacy_reading"))
    if not fallback:
        return scores, history
    log.warning("run(s) %s: every edit is a knowledge insertion (no old answer): es / ps read rewrite_acc / rephrase_acc", fallback)
    scores = scores.with_columns([pl.when(mine).then(pl.col(src)).otherwise(pl.col(dst)).alias(dst)
                                  for dst, src in INSERTION_READINGS.items() if src in scores.columns])
    if history.height and "metric" in history.columns:
        reread = history.filter(mine & pl.col("metric").is_in(list(INSERTION_READINGS.values())))
        reread = reread.with_columns(pl.col("metric").replace({v: k for k, v in INSERTION_READINGS.items()}))
        history = pl.concat([history.filter(~(mine & pl.col("metric").is_in(list(INSERTION_READINGS)))), reread])
    return scores, history


Z95 = 1.959963984540054  # the normal quantile of the 95 % intervals


def forgetting_table(history: pl.DataFrame, edit_scores: pl.DataFrame | None = None, *, threshold: float = 0.5) -> pl.DataFrame:
    """Per run and checkpoint: retention of earlier edits and % forgotten (module docstring),
    estimated from the re-scored earlier edits (all of them, or history's age-stratified sample).

    Each history row names its age stratum (stratum_lo..stratum_hi, edit indices; files without
    them are one stratum of every earlier edit). Estimates are stratified means: retention and
    paraphrase_retention over all earlier edits of each stratum (stratum size hi - lo + 1);
    forgotten_pct and ever_forgotten_pct over the successful edits of each stratum (counted from
    the edit scores, which score every edit right after it). A stratum with successful edits but
    none sampled is left out and the weights renormalized. Each estimate has a 95 % normal
    interval (columns _lo, _hi) from the stratified variance with the finite-population
    correction, so a full history (every stratum complete) has zero width.

    forgotten_pct: successful edits whose es is below the threshold now. ever_forgotten_pct (the
    study's once-forgotten-always-forgotten reading): successful edits whose es was below it at
    this or any earlier checkpoint at which they were scored.
    """
    schema = {
        **{c: pl.Utf8 for c in META_COLS},
        "edit": pl.Int64,
        "n_scored": pl.Int64,
        "retention": pl.Float64, "retention_lo": pl.Float64, "retention_hi": pl.Float64,
        "paraphrase_retention": pl.Float64,
        "n_successful": pl.Int64,
        "forgotten_pct": pl.Float64, "forgotten_pct_lo": pl.Float64, "forgotten_pct_hi": pl.Float64,
        "ever_forgotten_pct": pl.Float64, "ever_forgotten_pct_lo": pl.Float64, "ever_forgotten_pct_hi": pl.Float64,
    }
    if history.height == 0:
        return pl.DataFrame(schema=schema)
    for c in ("stratum_lo", "stratum_hi", "edit_index"):
        if c not in history.columns:
            history = history.with_columns(pl.lit(None, pl.Int64).alias(c))
    history = history.with_columns(pl.col("stratum_lo").fill_null(1), pl.col("stratum_hi").fill_null(pl.col("edit")))
    keys = list(META_COLS) + ["edit", "item", "stratum_lo", "stratum_hi"]
    h = history.filter(pl.col("metric").is_in(["es", "ps"])).pivot(
        on="metric", index=keys, values="value", aggregate_function="last"
    )
    for m in ("es", "ps"):
        if m not in h.columns:
            h = h.with_columns(pl.lit(None, pl.Float64).alias(m))
    have_scores = edit_scores is not None and edit_scores.height > 0 and "es" in edit_scores.columns
    if have_scores:
        at_edit = edit_scores.group_by(["run", "case_id"]).agg(pl.col("es").first().alias("es_at_edit"))
        h = h.join(at_edit, left_on=["run", "item"], right_on=["run", "case_id"], how="left")
        success = pl.col("es_at_edit").fill_null(1.0) >= threshold
    else:
        success = pl.lit(True)
    h = h.with_columns(success.alias("_ok"), (pl.col("es") < threshold).cast(pl.Float64).alias("_lost"))
    # once forgotten, always forgotten: lost at this or any earlier checkpoint the fact was scored at
    h = h.sort(["run", "item", "edit"]).with_columns(pl.col("_lost").cum_max().over(["run", "item"]).alias("_ever"))
    h = h.with_columns(pl.struct("run", "stratum_lo", "stratum_hi").map_batches(
        lambda s: _successful_in(s, edit_scores if have_scores else None, threshold), return_dtype=pl.Int64).alias("_n_ok_pop"))
    h = h.with_columns((pl.col("stratum_hi") - pl.col("stratum_lo") + 1).alias("_n_pop"))
    by = list(META_COLS) + ["edit"]
    counts = h.group_by(by).agg(pl.col("es").count().cast(pl.Int64).alias("n_scored"), pl.col("_ok").sum().cast(pl.Int64).alias("n_successful"))
    out = counts
    for name, value, pop, rows, scale in (
        ("retention", "es", "_n_pop", h, 1.0),
        ("paraphrase_retention", "ps", "_n_pop", h, 1.0),
        ("forgotten_pct", "_lost", "_n_ok_pop", h.filter(pl.col("_ok")), 100.0),
        ("ever_forgotten_pct", "_ever", "_n_ok_pop", h.filter(pl.col("_ok")), 100.0),
    ):
        out = out.join(_stratified_mean(rows, by, value, pop, name, scale), on=by, how="left")
    return out.sort(["run", "edit"]).select(list(schema)).cast(schema)


def _successful_in(bounds: pl.Series, edit_scores: pl.DataFrame | None, threshold: float) -> pl.Series:
    """Per (run, stratum_lo, stratum_hi): the edits of the run in that index range that succeeded
    right after they were made (every edit when there are no edit scores)."""
    df = bounds.struct.unnest()
    if edit_scores is None:
        return (df["stratum_hi"] - df["stratum_lo"] + 1).cast(pl.Int64)
    cum = {}
    for run, g in edit_scores.group_by("run"):
        run = run[0]
        ok = g.filter(pl.col("es") >= threshold)["edit"].to_numpy()
        top = int(max(g["edit"].max() or 0, df.filter(pl.col("run") == run)["stratum_hi"].max() or 0))
        cum[run] = np.concatenate([[0], np.cumsum(np.bincount(ok, minlength=top + 1)[1:top + 1])])
    out = [int(cum[r][min(hi, len(cum[r]) - 1)] - cum[r][min(lo - 1, len(cum[r]) - 1)]) if r in cum else hi - lo + 1
           for r, lo, hi in zip(df["run"], df["stratum_lo"], df["stratum_hi"])]
    return pl.Series(out, dtype=pl.Int64)


def _stratified_mean(rows: pl.DataFrame, by: list[str], value: str, pop: str, name: str, scale: float) -> pl.DataFrame:
    """Columns by + [name, name_lo, name_hi]: the stratified mean of `value` (scaled) with its 95 %
    normal interval, the strata being (stratum_lo, stratum_hi) with population sizes `pop`."""
    # every float sum runs over sorted values: a group's rows (and the strata a group_by makes)
    # come in no fixed order, and the sum's last bits would follow it, so that merging the same
    # records twice could publish two tables (tests/test_report.py, ..._whatever_the_order_...)
    strata = (
        rows.filter(pl.col(value).is_not_null())
        .group_by([*by, "stratum_lo", "stratum_hi"])
        .agg(pl.len().alias("n"), pl.col(value).sort().mean().alias("m"), pl.col(value).sort().var().alias("s2"),
             pl.col(pop).first().alias("N"))
        .with_columns(pl.max_horizontal(pl.col("N"), pl.col("n")).cast(pl.Float64).alias("N"))
        # one sampled edit of a larger stratum: the largest variance of a 0-1 reading
        .with_columns(pl.when(pl.col("n") < 2).then(pl.when(pl.col("N") > pl.col("n")).then(0.25).otherwise(0.0)).otherwise(pl.col("s2")).alias("s2"))
    )
    total = pl.col("N").sort().sum()
    est = strata.group_by(by).agg(
        ((pl.col("N") * pl.col("m")).sort().sum() / total).alias("_m"),
        ((pl.col("N") / total) ** 2 * (1 - pl.col("n") / pl.col("N")) * pl.col("s2") / pl.col("n")).sort().sum().alias("_v"),
    )
    half = Z95 * pl.col("_v").sqrt()
    return est.select(
        *by,
        (scale * pl.col("_m")).alias(name),
        (scale * (pl.col("_m") - half).clip(lower_bound=0.0)).alias(f"{name}_lo"),
        (scale * (pl.col("_m") + half).clip(upper_bound=1.0)).alias(f"{name}_hi"),
    )


# ----------------------------------------------------------------------------------------------
# summary


def _at(k, y, c: int) -> float | None:
    """Value at the latest checkpoint <= c; None when the run has not reached c or it is NaN."""
    if len(k) == 0 or k[-1] < c:
        return None
    i = int(np.searchsorted(k, c, side="right")) - 1
    return None if i < 0 or math.isnan(y[i]) else float(y[i])


def _window_mean(k, y, c: int, window: int) -> float | None:
    """Mean over the scored edits in (c - min(window, c), c] of a per-edit curve; None before c."""
    if len(k) == 0 or k[-1] < c:
        return None
    w = y[(k > c - min(window, c)) & (k <= c)]
    w = w[~np.isnan(w)]
    return float(w.mean()) if len(w) else None


def summary_table(
    tables: Mapping[str, pl.DataFrame],
    runs_meta=None,
    *,
    counts: Sequence[int] = SUMMARY_COUNTS,
    window: int = _REPORT["window"],
    edit_log: pl.DataFrame | None = None,
    storage_bytes: Mapping[str, int] | None = None,
    run_phases: Mapping[str, object] | None = None,
) -> pl.DataFrame:
    """One row per run.

    Columns: run, model, method, dataset, sample, n_edits (configured), edits_done (last edit
    scored or checkpoint seen); for each count c in `counts` that is <= n_edits, and for "end"
    (= n_edits), one column {stem}_at_{c} per registered curve with a summary stem
    (editscale.evaluate.registry.CurveSpec.summary; by default es, ps, ns, score, retention,
    forgotten_pct, downstream_f1, downstream_accuracy_ll, perplexity, ngram_entropy):
      per-edit curves (es, ...): mean over the last min(window, c) edits ending at edit c, as
        scored right after each edit;
      checkpoint curves: the value at the latest checkpoint <= c (means over tasks / items);
      null where the run has not reached c;
    onset (text: the edit count of the combined onset, or "none within N edits", N = last
    checkpoint analysed), onset_k, onset_ci_low, onset_ci_high, collapse_k, onset_curves (curves
    that agree), onset_decision (how it was decided, or why each curve showed no onset, e.g. too
    few checkpoints); early_fall (text: the edit count where a fast first fall ends, or "none"),
    early_fall_k, early_fall_ci_low, early_fall_ci_high, early_fall_share (share of the curve's
    whole drop before it), early_fall_curves; first_to_fall (text: which downstream task's own curve
    broke first, "none", `first_item_fall`), first_to_fall_k, first_to_fall_curve, first_to_fall_shape;
    disabling_edits (comma-separated edit indices), n_disabling_edits;
    edit_seconds_total, edit_seconds_mean, edit_seconds_median (from `edit_log`; the median is what
    a paused or shared machine barely moves), storage_bytes;
    the two efficacy readings toolkits disagree on (EasyEdit issue #518), side by side (`readings`):
    {es,ps}_after_each_edit (mean over every edit, each scored right after its own edit or
    batch: edit_scores) and {es,ps}_at_last_checkpoint (mean over the same edits re-scored once
    on the model after the last checkpoint, last_checkpoint: history); efficacy_reading: es, or
    rewrite_acc where every edit of the run is a knowledge insertion (insertion_fallback).
    `run_phases` maps run -> editscale.report.phases.RunPhases; computed when not given.
    """
    from ..evaluate.registry import curve_specs
    from . import phases as ph

    stems = [spec.summary for _, spec in curve_specs() if spec.summary]
    meta = normalize_runs_meta(runs_meta)
    runs = list(meta) or sorted({r for df in tables.values() if df is not None and "run" in df.columns for r in df["run"].unique().to_list()})
    rows = []
    all_labels: list[str] = []
    for run in runs:
        n_edits = meta.get(run, {}).get("n_edits")
        n_edits = int(n_edits) if n_edits is not None else None
        edits_done = _edits_done(tables, run)
        end = n_edits if n_edits is not None else edits_done
        points = _summary_points(counts, end)
        all_labels += [label for label, _ in points if label not in all_labels]
        rp = (run_phases or {}).get(run) if run_phases is not None else ph.analyze_run(tables, run)
        row = {**_meta_frame([run], meta).row(0, named=True), "n_edits": n_edits, "edits_done": edits_done}
        row.update(_curves_at(tables, run, points, window))
        row.update(_onset_columns(rp, edits_done, end))
        row.update(_early_fall_columns(rp))
        row.update(first_item_fall(rp))
        row.update(leading_indicator(rp))
        dis = [d.edit_index for d in rp.disabling] if rp is not None else []
        row.update(disabling_edits=",".join(str(j) for j in dis), n_disabling_edits=len(dis))
        row.update(_cost_columns(edit_log, storage_bytes, run))
        row.update(readings(tables, run))
        scores = tables.get("edit_scores")
        if scores is not None and "efficacy_reading" in scores.columns:
            reading = scores.filter(pl.col("run") == run)["efficacy_reading"]
            row["efficacy_reading"] = reading[0] if reading.len() else None
        rows.append(row)
    schema: dict[str, pl.DataType] = {**{c: pl.Utf8 for c in META_COLS}, "n_edits": pl.Int64, "edits_done": pl.Int64}
    schema.update({f"{q}_at_{label}": pl.Float64 for label in all_labels for q in stems})
    schema.update(_summary_tail_schema())
    return pl.DataFrame([{c: r.get(c) for c in schema} for r in rows], schema=schema)


def _summary_tail_schema() -> dict[str, pl.DataType]:
    """The summary's columns after the curves' {stem}_at_{count}."""
    return {
        "onset": pl.Utf8,
        "onset_k": pl.Float64,
        "onset_ci_low": pl.Float64,
        "onset_ci_high": pl.Float64,
        "collapse_k": pl.Float64,
        "onset_curves": pl.Utf8,
        "onset_decision": pl.Utf8,
        "early_fall": pl.Utf8,
        "early_fall_k": pl.Float64,
        "early_fall_ci_low": pl.Float64,
        "early_fall_ci_high": pl.Float64,
        "early_fall_share": pl.Float64,
        "early_fall_curves": pl.Utf8,
        "first_to_fall": pl.Utf8,
        "first_to_fall_k": pl.Float64,
        "first_to_fall_curve": pl.Utf8,
        "first_to_fall_shape": pl.Utf8,
        "leading_indicator": pl.Utf8,
        "leading_indicator_onset": pl.Float64,
        "indicator_lead": pl.Float64,
        "disabling_edits": pl.Utf8,
        "n_disabling_edits": pl.Int64,
        "edit_seconds_total": pl.Float64,
        "edit_seconds_mean": pl.Float64,
        "edit_seconds_median": pl.Float64,
        "storage_bytes": pl.Int64,
        **{c: pl.Float64 for c in READING_COLUMNS},
        "last_checkpoint": pl.Int64,
        "efficacy_reading": pl.Utf8,  # es, or rewrite_acc for an insertion-only run (insertion_fallback)
    }


def _edits_done(tables: Mapping[str, pl.DataFrame], run: str) -> int | None:
    """The last edit any table of the run has reached (scored or checkpoint seen)."""
    seen = [
        int(df.filter(pl.col("run") == run)["edit"].max())
        for df in tables.values()
        if df is not None and df.height and "run" in df.columns and "edit" in df.columns and df.filter(pl.col("run") == run).height
    ]
    return max(seen) if seen else None


def _summary_points(counts: Sequence[int], end: int | None) -> list[tuple[str, int]]:
    """(label, edit count) of the summary's columns: each count up to `end`, then "end"."""
    points = [(str(c), c) for c in counts if end is None or c <= end]
    return points + ([("end", end)] if end is not None else [])


def _curves_at(tables: Mapping[str, pl.DataFrame], run: str, points, window: int) -> dict:
    """{stem}_at_{label} of every summary curve: per-edit curves averaged over the last
    min(window, c) edits ending at c, checkpoint curves at the latest checkpoint <= c."""
    from . import phases as ph

    curves = [(spec, k, y) for spec, k, y in ph.curve_values(tables, run).values() if spec.summary]
    return {f"{spec.summary}_at_{label}": _window_mean(k, y, c, window) if spec.per_edit else _at(k, y, c)
            for label, c in points for spec, k, y in curves}


def _onset_columns(rp, edits_done: int | None, end: int | None) -> dict:
    """The combined onset of the run's phase analysis (`summary_table`'s onset* columns)."""
    comb = rp.combined if rp is not None else None
    n_max = (rp.k_max if rp is not None and rp.k_max is not None else None) or edits_done or end or 0
    return {
        "onset": str(int(round(comb.onset_k))) if comb is not None and comb.onset_k is not None else f"none within {n_max} edits",
        "onset_k": comb.onset_k if comb else None,
        "onset_ci_low": comb.ci_low if comb else None,
        "onset_ci_high": comb.ci_high if comb else None,
        "collapse_k": comb.collapse_k if comb else None,
        "onset_curves": ",".join(comb.curves_agreeing) if comb else "",
        "onset_decision": comb.decision if comb else "phases not computed",
    }


def _early_fall_columns(rp) -> dict:
    """The combined early fall of the run's phase analysis (`summary_table`'s early_fall* columns):
    where a fast first fall of the decision curves ends, its interval, the share of the curve's
    whole drop that came before it, and the curves that agree; "none" where no curve shows one."""
    fall = getattr(rp, "early_fall", None) if rp is not None else None
    if fall is None or fall.onset_k is None:
        return {"early_fall": "none" if fall is not None else "phases not computed", "early_fall_k": None, "early_fall_ci_low": None,
                "early_fall_ci_high": None, "early_fall_share": None, "early_fall_curves": ""}
    return {"early_fall": str(int(round(fall.onset_k))), "early_fall_k": fall.onset_k, "early_fall_ci_low": fall.ci_low,
            "early_fall_ci_high": fall.ci_high, "early_fall_share": fall.drop_share, "early_fall_curves": ",".join(fall.curves_agreeing)}


def first_item_fall(rp) -> dict:
    """Which item (a downstream task: the `{curve}[item]` curves, phases.item_curves) fell first,
    read off the detectors' accepted breaks on the items' own curves: an item whose curve falls fast
    from the start (an early fall, ending at its break) fell before any item whose faster fall
    starts later (an onset); among either, the earlier break first. first_to_fall is the text
    ("downstream_f1[capital]: early fall until 35"), "none" where no item curve has an accepted
    break, or "phases not computed"."""
    from .changepoint import EARLY_FALL
    from .phases import is_item_curve

    if rp is None:
        return {"first_to_fall": "phases not computed", "first_to_fall_k": None, "first_to_fall_curve": None, "first_to_fall_shape": None}
    breaks = [(rank, ph.onset_k, name, ph.shape)
              for rank, per_curve in enumerate((rp.early_falls or {}, rp.phases))
              for name, ph in per_curve.items() if is_item_curve(name) and ph.onset_k is not None]
    if not breaks:
        return {"first_to_fall": "none", "first_to_fall_k": None, "first_to_fall_curve": None, "first_to_fall_shape": None}
    _, k, name, shape = min(breaks)
    words = "early fall until" if shape == EARLY_FALL else "onset at"
    return {"first_to_fall": f"{name}: {words} {int(round(k))}", "first_to_fall_k": k, "first_to_fall_curve": name,
            "first_to_fall_shape": shape}


def _cost_columns(edit_log: pl.DataFrame | None, storage_bytes: Mapping[str, int] | None, run: str) -> dict:
    """Edit seconds (total, mean and median per edit, from the edit log) and the run's stored bytes."""
    secs = None
    if edit_log is not None and edit_log.height and "seconds" in edit_log.columns:
        s = edit_log.filter(pl.col("run") == run)["seconds"].drop_nulls()
        secs = (float(s.sum()), float(s.mean()), float(s.median())) if s.len() else None
    sb = (storage_bytes or {}).get(run)
    return {"edit_seconds_total": secs[0] if secs else None, "edit_seconds_mean": secs[1] if secs else None,
            "edit_seconds_median": secs[2] if secs else None, "storage_bytes": int(sb) if sb is not None else None}


def leading_indicator(rp) -> dict:
    """Which collapse indicator (CurveSpec.indicator: ||W||_F, condition number, top singular
    value, hyperspherical energy, ||v*||, perplexity) had the earliest onset, that onset, and by
    how many edits it came before the combined onset (the collapse of the decision curves:
    downstream ability and efficacy); None where no indicator has an onset, a lead of None where
    no combined onset was found. A negative lead: the indicator moved after the collapse."""
    from ..evaluate.registry import curve_specs

    names = {spec.name for _, spec in curve_specs() if spec.indicator}
    onsets = sorted((ph.onset_k, name) for name, ph in (rp.phases.items() if rp is not None else ()) if name in names and ph.onset_k is not None)
    if not onsets:
        return {"leading_indicator": None, "leading_indicator_onset": None, "indicator_lead": None}
    k, name = onsets[0]
    combined = rp.combined.onset_k if rp.combined is not None else None
    return {"leading_indicator": name, "leading_indicator_onset": float(k), "indicator_lead": None if combined is None else float(combined - k)}


def indicator_table(tables: Mapping[str, pl.DataFrame], runs: Sequence[str]) -> pl.DataFrame:
    """Per run, collapse indicator (CurveSpec.indicator) and checkpoint: its value (the mean over
    the edited matrices) and its growth per edit since the previous checkpoint
    ((value_k - value_prev) / (k - k_prev)), and relative to k = 0 (value_k / value_0)."""
    from . import phases as ph

    rows = []
    for run in runs:
        for name, (spec, k, y) in ph.curve_values(tables, run).items():
            if not spec.indicator:
                continue
            for i in range(len(k)):
                growth = (y[i] - y[i - 1]) / (k[i] - k[i - 1]) if i and k[i] > k[i - 1] else None
                ratio = y[i] / y[0] if k[0] == 0 and y[0] not in (0.0,) and np.isfinite(y[0]) else None
                rows.append({"run": run, "indicator": name, "edit": int(k[i]), "value": float(y[i]),
                             "growth_per_edit": None if growth is None else float(growth), "ratio_to_unedited": None if ratio is None else float(ratio)})
    schema = {"run": pl.Utf8, "indicator": pl.Utf8, "edit": pl.Int64, "value": pl.Float64, "growth_per_edit": pl.Float64, "ratio_to_unedited": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


READING_COLUMNS = tuple(f"{m}_{when}" for m in ("es", "ps") for when in ("after_each_edit", "at_last_checkpoint"))


def readings(tables: Mapping[str, pl.DataFrame], run: str) -> dict:
    """Efficacy and paraphrase of a run's edits read two ways (summary_table): right after each
    edit (the edit_scores table, all edits) and once at the last checkpoint the history table
    re-scored (the edits up to it); None where a table lacks the run or the metric."""
    out: dict = {c: None for c in READING_COLUMNS}
    out["last_checkpoint"] = None
    scores, history = tables.get("edit_scores"), tables.get("history")
    last = None
    if history is not None and history.height and "run" in history.columns:
        h = history.filter(pl.col("run") == run)
        if h.height:
            last = int(h["edit"].max())
            out["last_checkpoint"] = last
            h = h.filter(pl.col("edit") == last)
            for m in ("es", "ps"):
                v = h.filter(pl.col("metric") == m)["value"].drop_nulls()
                out[f"{m}_at_last_checkpoint"] = float(v.mean()) if v.len() else None
    if scores is not None and scores.height and "run" in scores.columns:
        e = scores.filter(pl.col("run") == run)
        if last is not None:  # the same edits as the other reading
            e = e.filter(pl.col("edit") <= last)
        for m in ("es", "ps"):
            if m in e.columns and e[m].drop_nulls().len():
                out[f"{m}_after_each_edit"] = float(e[m].drop_nulls().mean())
    return out


# ----------------------------------------------------------------------------------------------
# build / write / read


EDIT_LOG_SCHEMA = {
    "run": pl.Utf8,
    "edit_index": pl.Int64,
    "case_id": pl.Utf8,
    "seconds": pl.Float64,
    "update_norm": pl.Float64,
    "update_rel": pl.Float64,
    "v_loss": pl.Float64,
}


def normalize_edit_log(edit_log: pl.DataFrame | None) -> pl.DataFrame | None:
    """The edit log with the documented columns (missing ones null) first, extras after."""
    if edit_log is None:
        return None
    if "run" not in edit_log.columns or "edit_index" not in edit_log.columns:
        raise EditscaleError(f"edit log needs columns run and edit_index (has {edit_log.columns})")
    cols = [pl.col(c).cast(t) if c in edit_log.columns else pl.lit(None, t).alias(c) for c, t in EDIT_LOG_SCHEMA.items()]
    extra = [c for c in edit_log.columns if c not in EDIT_LOG_SCHEMA]
    return edit_log.select(cols + extra).sort(["run", "edit_index"])


def edit_log_from_factors(factors: Iterable[str | os.PathLike], runs: Iterable[str] | None = None) -> pl.DataFrame:
    """The per-edit log stored in the given results/{run}/factors/{k:06d}.h5 files (group `log`,
    one dataset per column: case_id, edit_index, v_loss, update_norm, update_rel, seconds, ...)."""
    from ..edit.chain import read_log_columns

    wanted = None if runs is None else set(runs)
    frames = []
    for path in sorted(map(Path, factors)):
        run = run_of(path, 1)
        if wanted is not None and run not in wanted:
            continue
        cols = read_log_columns(path)
        if cols:
            frames.append(pl.DataFrame(cols).with_columns(pl.lit(run, pl.Utf8).alias("run")))
    if not frames:
        return pl.DataFrame(schema=EDIT_LOG_SCHEMA)
    df = pl.concat(frames, how="diagonal_relaxed")
    return normalize_edit_log(df).unique(["run", "edit_index"], keep="last", maintain_order=True)


def build_tables(
    metric_paths: Iterable[str | os.PathLike],
    runs_meta,
    *,
    factors: Iterable[str | os.PathLike] = (),
    edit_log: pl.DataFrame | None = None,
    storage_bytes: Mapping[str, int] | None = None,
    window: int = _REPORT["window"],
    counts: Sequence[int] = SUMMARY_COUNTS,
    phase_config=None,
) -> dict[str, pl.DataFrame]:
    """All report tables from the given metric files: the six families, forgetting, edit_log (the
    given one, else read from the given factors files), phases, disabling_edits and summary.

    `phase_config` (editscale.report.phases.PhaseConfig; default: the schema's report section)
    sets the phase analysis."""
    meta = normalize_runs_meta(runs_meta)
    metric_paths = list(metric_paths)
    tables: dict[str, pl.DataFrame] = {}
    from ..evaluate.registry import get_metric

    for family in families():
        long = collect_metric(family, metric_paths, meta or None)
        tables[family] = edit_scores_wide(long) if get_metric(family).table == "wide" else long
        log.info("collected %s: %d rows", family, tables[family].height)
    tables["edit_scores"], tables["history"] = insertion_fallback(tables["edit_scores"], tables["history"])
    tables["forgetting"] = forgetting_table(tables["history"], tables["edit_scores"])
    if edit_log is None:
        log_df = edit_log_from_factors(factors, list(meta) or None)
    else:
        log_df = normalize_edit_log(edit_log)
    tables["edit_log"] = log_df
    from . import phases as ph

    runs = list(meta) or None
    results = ph.analyze_runs(tables, runs, phase_config)
    tables["phases"] = ph.phases_frame(results)
    tables["disabling_edits"] = ph.disabling_frame(results)
    tables["indicators"] = indicator_table(tables, [r.run for r in results])
    tables["summary"] = summary_table(
        tables,
        meta or None,
        counts=counts,
        window=window,
        edit_log=log_df,
        storage_bytes=storage_bytes,
        run_phases={r.run: r for r in results},
    )
    return tables


def write_table(df: pl.DataFrame, out_dir: str | os.PathLike, name: str, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """`{name}.parquet` (with metadata) and `{name}.csv`, both atomic."""
    out_dir = Path(out_dir)
    pq, csv = out_dir / f"{name}.parquet", out_dir / f"{name}.csv"
    write_parquet_atomic(df, pq, dict(metadata or {}))
    with atomic_path(csv) as tmp:
        df.write_csv(tmp)
    log.info("wrote %s and %s (%d rows)", pq, csv, df.height)
    return [pq, csv]


def write_tables(tables: Mapping[str, pl.DataFrame], out_dir: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> list[Path]:
    written: list[Path] = []
    for name, df in tables.items():
        if df is not None:
            written += write_table(df, out_dir, name, metadata)
    return written


def report_tables(
    runs_meta,
    metric_paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    factors: Iterable[str | os.PathLike] = (),
    edit_log: pl.DataFrame | None = None,
    storage_bytes: Mapping[str, int] | None = None,
    **kwargs,
) -> list[Path]:
    """Build and write every report table (the `editscale report-tables` verb)."""
    meta = normalize_runs_meta(runs_meta)
    tables = build_tables(metric_paths, meta, factors=factors, edit_log=edit_log, storage_bytes=storage_bytes, **kwargs)
    md = provenance(inputs={"runs": sha256_json(meta)})
    return write_tables(tables, out_dir, md)


def read_tables(paths: str | os.PathLike | Iterable[str | os.PathLike], names: Iterable[str] | None = None) -> dict[str, pl.DataFrame]:
    """Report tables keyed by name (file stem): the given parquet files, or every parquet file of
    one given directory (for interactive use; rules pass their declared files)."""
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(paths[0].glob("*.parquet"))
    wanted = None if names is None else set(names)
    out = {}
    for p in paths:
        if not p.is_file():
            raise EditscaleError(f"report table not found: {p}")
        if p.suffix != ".parquet":
            raise EditscaleError(f"report table {p}: expected a .parquet file")
        if wanted is None or p.stem in wanted:
            out[p.stem] = pl.read_parquet(p)
    return out


def storage_of_runs(paths: Iterable[str | os.PathLike]) -> dict[str, int]:
    """Bytes of the given results/{run}/{deltas,factors}/{k}.h5 files per run (what the edit chain stores)."""
    out: dict[str, int] = {}
    for p in map(Path, paths):
        out[run_of(p, 1)] = out.get(run_of(p, 1), 0) + p.stat().st_size
    return out


def read_table_file(path: str | os.PathLike) -> pl.DataFrame:
    """A parquet or csv table (e.g. the per-edit log)."""
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"table not found: {path}")
    if path.suffix == ".csv":
        return pl.read_csv(path)
    return pl.read_parquet(path)
