"""Forgetting of earlier edits: every edit made so far re-scored at checkpoint k.

`score_history` scores the cases with edit_index <= k on the model after k edits, with the same
definitions as `edit_scores` (efficacy and paraphrase prompts by default: es, em, efficacy_em,
nll_new, nll_true, ps, pm, paraphrase_em).

Derived curves (used by the report):

* A fact counts as LEARNED when its metric (default efficacy_em: o* is the argmax continuation of
  the edit prompt) was correct right after its own edit (from the edit_scores table, k == j).
  Facts that never took are left out of both curves.
* `forgetting_curve` (the study's view): a learned fact is FORGOTTEN at the first checkpoint
  k >= its edit index where the history table says it is no longer correct; it stays counted as
  forgotten afterwards even if it comes back. forgotten_pct(k) = 100 * (#learned facts with
  edit_index <= k forgotten at a checkpoint <= k) / (#learned facts with edit_index <= k).
* `retention_curve`: fraction of the learned facts with edit_index <= k that are correct AT
  checkpoint k (facts may come back), over the learned facts that the history scored at k.

"correct" means value > `threshold` (default 0.5; efficacy_em and es are 0/1 per fact).
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

from .edit_scores import score_cases

HISTORY_PARTS = ("efficacy", "paraphrase")


def score_history(model, tok, cases: Sequence[dict], k: int, parts: Sequence[str] = HISTORY_PARTS, batch_size: int = 64) -> pl.DataFrame:
    """Rows (k, item=case_id, edit_index, metric, value) for every case with edit_index <= k."""
    earlier = [c for c in cases if int(c["edit_index"]) <= k]
    earlier.sort(key=lambda c: int(c["edit_index"]))
    return score_cases(model, tok, earlier, k=k, parts=parts, batch_size=batch_size)


def _learned(edit_scores_df: pl.DataFrame, metric: str, threshold: float) -> pl.DataFrame:
    df = edit_scores_df.filter(pl.col("metric") == metric)
    if "edit_index" not in df.columns:
        df = df.with_columns(pl.col("k").alias("edit_index"))
    df = df.with_columns(pl.col("edit_index").fill_null(pl.col("k")))
    return (
        df.filter(pl.col("value") > threshold)
        .select(pl.col("item"), pl.col("edit_index").cast(pl.Int64))
        .unique(subset="item", keep="first")
    )


def _status(history_df: pl.DataFrame, learned: pl.DataFrame, metric: str, threshold: float) -> pl.DataFrame:
    """(k, item, edit_index, correct) for the learned facts at every history checkpoint k >= edit_index."""
    h = history_df.filter(pl.col("metric") == metric).select("k", "item", pl.col("value"))
    return (
        h.join(learned, on="item", how="inner")
        .filter(pl.col("k") >= pl.col("edit_index"))
        .with_columns((pl.col("value") > threshold).alias("correct"))
        .select("k", "item", "edit_index", "correct")
    )


def forgetting_curve(
    edit_scores_df: pl.DataFrame, history_df: pl.DataFrame, metric: str = "efficacy_em", threshold: float = 0.5
) -> pl.DataFrame:
    """Columns k, learned, forgotten, forgotten_pct (one row per history checkpoint, sorted)."""
    learned = _learned(edit_scores_df, metric, threshold)
    status = _status(history_df, learned, metric, threshold)
    first_forgotten = (
        status.filter(~pl.col("correct")).group_by("item").agg(pl.col("k").min().alias("k_forgot"))
    )
    ks = sorted(set(history_df["k"].to_list()))
    learned_idx = learned["edit_index"].to_list()
    forgot_ks = first_forgotten["k_forgot"].to_list()
    rows = {"k": [], "learned": [], "forgotten": [], "forgotten_pct": []}
    for k in ks:
        n_learned = sum(1 for e in learned_idx if e <= k)
        n_forgot = sum(1 for f in forgot_ks if f <= k)
        rows["k"].append(k)
        rows["learned"].append(n_learned)
        rows["forgotten"].append(n_forgot)
        rows["forgotten_pct"].append(100.0 * n_forgot / n_learned if n_learned else float("nan"))
    return pl.DataFrame(rows, schema={"k": pl.Int64, "learned": pl.Int64, "forgotten": pl.Int64, "forgotten_pct": pl.Float64})


def retention_curve(
    edit_scores_df: pl.DataFrame, history_df: pl.DataFrame, metric: str = "efficacy_em", threshold: float = 0.5
) -> pl.DataFrame:
    """Columns k, evaluated, retained, retained_pct (one row per history checkpoint, sorted)."""
    learned = _learned(edit_scores_df, metric, threshold)
    status = _status(history_df, learned, metric, threshold)
    ks = pl.DataFrame({"k": sorted(set(history_df["k"].to_list()))}, schema={"k": pl.Int64})
    agg = status.group_by("k").agg(
        pl.len().cast(pl.Int64).alias("evaluated"), pl.col("correct").sum().cast(pl.Int64).alias("retained")
    )
    out = ks.join(agg, on="k", how="left").with_columns(
        pl.col("evaluated").fill_null(0), pl.col("retained").fill_null(0)
    )
    return out.with_columns(
        pl.when(pl.col("evaluated") > 0)
        .then(100.0 * pl.col("retained") / pl.col("evaluated"))
        .otherwise(float("nan"))
        .alias("retained_pct")
    ).sort("k")
