"""The forgetting phases of each run, read from the report tables.

The curves come from the metric registry (editscale.evaluate.registry.CurveSpec): each
registered metric declares the per-run curves it yields, which of them the onset detector reads
(`phases`), which role each plays in the disabling-edit criterion (`joint`), and the summary
column it fills. `analyze_run` feeds them to the change-point statistics
(editscale.report.changepoint) and the disabling-edit criterion (editscale.report.disabling);
`phases_frame` / `disabling_frame` are the rows of phases.parquet and disabling_edits.parquet.
The settings are one `PhaseConfig`, made from the config's `report` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from .changepoint import EARLY_FALL, METHOD, ONSET, CombinedPhase, Curve, OnsetConfig, Phase, combine_phases, detect_curve
from .disabling import DisablingConfig, DisablingEdit, detect_disabling_edits


@dataclass(frozen=True)
class PhaseConfig:
    """Every setting of the phase analysis of a run."""

    onset: OnsetConfig
    disabling: DisablingConfig
    decision_curves: tuple[str, ...]  # curves whose onsets decide the combined onset
    min_agree: int  # curves that must agree on the combined onset

    @classmethod
    def from_report(cls, report=None) -> "PhaseConfig":
        """From the config's `report` section (a dict, or editscale.config.section("report", ...));
        the schema's defaults fill what it leaves out."""
        from ..config import section

        if report is None or isinstance(report, Mapping):
            report = section("report", dict(report or {}))
        return cls(
            onset=OnsetConfig(slope_ratio=report.slope_ratio, min_delta_bic=report.min_delta_bic, alpha=report.alpha, seed=report.seed),
            disabling=DisablingConfig(drop_z=report.drop_z, norm_z=report.norm_z),
            decision_curves=tuple(report.decision_curves),
            min_agree=report.min_agree,
        )


@dataclass(frozen=True)
class RunPhases:
    run: str
    phases: Mapping[str, Phase]  # curve -> its onset
    combined: CombinedPhase
    disabling: tuple[DisablingEdit, ...]
    k_max: int | None
    early_falls: Mapping[str, Phase] = None  # curve -> its early fall (changepoint.detect_early_fall)
    early_fall: CombinedPhase | None = None  # the decision curves' combined early fall


# ----------------------------------------------------------------------------------------------
# report tables -> curves


def curve_values(tables: Mapping[str, pl.DataFrame], run: str) -> dict[str, tuple[object, np.ndarray, np.ndarray]]:
    """Every registered curve of one run that has data: name -> (CurveSpec, k, value).

    value is the mean over items of the curve's reading at each checkpoint k (each edit for
    per-edit curves), nulls and NaNs left out (NaN where no item has a value); k ascending.
    """
    from ..evaluate.registry import curve_specs

    out = {}
    for metric, spec in curve_specs():
        df = tables.get(spec.table or metric.name)
        if df is None or df.height == 0 or "run" not in df.columns or "edit" not in df.columns:
            continue
        sub = df.filter(pl.col("run") == run)
        if not spec.table and metric.table == "long":
            if "metric" not in sub.columns:
                continue
            sub = sub.filter(pl.col("metric") == spec.reading).select("edit", "value")
        elif spec.reading in sub.columns:
            sub = sub.select("edit", pl.col(spec.reading).alias("value"))
        else:
            continue
        # NaN items are left out of the mean; a checkpoint where every item is NaN stays, as NaN
        sub = sub.group_by("edit").agg(pl.col("value").cast(pl.Float64).fill_nan(None).mean()).sort("edit")
        if sub.height:
            out[spec.name] = (spec, sub["edit"].to_numpy().astype(float), sub["value"].fill_null(float("nan")).to_numpy())
    return out


def run_curves(tables: Mapping[str, pl.DataFrame], run: str) -> dict[str, Curve]:
    """The curves of one run that the onset detector reads (CurveSpec.phases), oriented by their
    higher-is-better flag and log-transformed where the spec says so."""
    out = {}
    for name, (spec, k, y) in curve_values(tables, run).items():
        ok = np.isfinite(y)
        k, y = k[ok], y[ok]
        if spec.phases and len(k):
            if spec.log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    y = np.log(y)
            out[name] = Curve(name, k, y, spec.higher_is_better)
    return out


def item_curves(tables: Mapping[str, pl.DataFrame], run: str) -> dict[str, Curve]:
    """Each item's own curve of the curves whose spec reads items one by one (CurveSpec.per_item:
    a downstream task's), named {curve}[{item}], oriented and log-transformed as the mean curve.
    A mean over tasks hides a task that falls early or alone (one probe lost within 50 edits while
    the others hold reads as a gradual decline of the mean)."""
    from ..evaluate.registry import curve_specs

    out = {}
    for metric, spec in curve_specs():
        df = tables.get(spec.table or metric.name)
        if not spec.per_item or not spec.phases or df is None or df.height == 0 or not {"run", "edit", "item", "metric"} <= set(df.columns):
            continue
        sub = df.filter((pl.col("run") == run) & (pl.col("metric") == spec.reading))
        sub = sub.group_by("item", "edit").agg(pl.col("value").cast(pl.Float64).fill_nan(None).mean()).drop_nulls("value")
        for (item,), part in sorted(sub.group_by("item"), key=lambda g: str(g[0][0])):
            part = part.sort("edit")
            k, y = part["edit"].to_numpy().astype(float), part["value"].to_numpy()
            if spec.log:
                with np.errstate(divide="ignore", invalid="ignore"):
                    y = np.log(y)
            ok = np.isfinite(y)
            if ok.any():
                name = item_curve_name(spec.name, item)
                out[name] = Curve(name, k[ok], y[ok], spec.higher_is_better)
    return out


def item_curve_name(curve: str, item) -> str:
    """The name of one item's own curve (item_curves): {curve}[{item}]."""
    return f"{curve}[{item}]"


def is_item_curve(name: str) -> bool:
    return name.endswith("]") and "[" in name


def joint_drop_curves(curves: Mapping[str, Curve]) -> list[Curve]:
    """One curve per joint-drop role (CurveSpec.joint), the first of the role's curves present."""
    from ..evaluate.registry import curve_specs

    chosen: dict[str, Curve] = {}
    for _, spec in curve_specs():
        if spec.joint and spec.joint not in chosen and spec.name in curves:
            chosen[spec.joint] = curves[spec.name]
    return list(chosen.values())


def run_norms(tables: Mapping[str, pl.DataFrame], run: str) -> pl.DataFrame | None:
    """Per-edit update norms of a run: edit_index, case_id, update_norm[, outlier].

    From the per-edit edit log (edit_index, update_norm) when it has the run; else from the
    weights table (item = case_id rows, metric update_norm / outlier, the last checkpoint's value);
    there the edit index is the row's edit_index, else the case's edit in the edit_scores table,
    else k.
    """
    log = tables.get("edit_log")
    if log is not None and log.height and "update_norm" in log.columns:
        sub = log.filter((pl.col("run") == run) & pl.col("update_norm").is_not_null())
        if sub.height:
            cols = ["edit_index", "update_norm"] + (["case_id"] if "case_id" in sub.columns else [])
            return sub.select(cols).unique("edit_index", keep="last").sort("edit_index")
    w = tables.get("weights")
    if w is not None and w.height:
        rows = w.filter((pl.col("run") == run) & pl.col("metric").is_in(["update_norm", "outlier"]))
        if rows.filter(pl.col("metric") == "update_norm").height:
            if "edit_index" not in rows.columns:
                rows = rows.with_columns(pl.lit(None, pl.Int64).alias("edit_index"))
            es = tables.get("edit_scores")
            if es is not None and es.height and "case_id" in es.columns:
                m = es.filter(pl.col("run") == run).group_by("case_id").agg(pl.col("edit").min().alias("_edit"))
                rows = rows.join(m, left_on="item", right_on="case_id", how="left")
            else:
                rows = rows.with_columns(pl.lit(None, pl.Int64).alias("_edit"))
            rows = rows.with_columns(pl.coalesce("edit_index", "_edit", "edit").alias("edit_index"))
            wide = (
                rows.group_by(["edit_index", "item", "metric"])
                .agg(pl.col("value").last())
                .pivot(on="metric", index=["edit_index", "item"], values="value")
                .rename({"item": "case_id"})
                .sort("edit_index")
            )
            return wide
    return None


def analyze_run(tables: Mapping[str, pl.DataFrame], run: str, config: PhaseConfig | None = None) -> RunPhases:
    """Onset and early fall per curve (the mean curves and each item's, `item_curves`), both
    combined over the decision curves, and disabling edits of one run."""
    config = config or PhaseConfig.from_report()
    curves = run_curves(tables, run)
    read = {**curves, **item_curves(tables, run)}  # the items' curves are read, not combined: not decision curves
    phases = {name: detect_curve(c, config.onset) for name, c in read.items()}
    combined = combine_phases(phases.values(), curves=config.decision_curves, min_agree=config.min_agree)
    falls = {name: detect_curve(c, config.onset, EARLY_FALL) for name, c in read.items()}
    early_fall = combine_phases(falls.values(), curves=config.decision_curves, min_agree=config.min_agree)
    disabling = detect_disabling_edits(joint_drop_curves(curves), run_norms(tables, run), config.disabling, onset_k=combined.onset_k)
    ks = [float(np.max(c.k)) for c in curves.values() if len(c.k)]
    return RunPhases(run, phases, combined, tuple(disabling), int(max(ks)) if ks else None, falls, early_fall)


# ----------------------------------------------------------------------------------------------
# phases.parquet and disabling_edits.parquet


PHASES_SCHEMA = {
    "run": pl.Utf8,
    "curve": pl.Utf8,
    "shape": pl.Utf8,  # onset, or early_fall (onset_k is then where the fast fall ends)
    "onset_k": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "collapse_k": pl.Float64,
    "p_value": pl.Float64,
    "delta_bic": pl.Float64,
    "candidate_k": pl.Float64,
    "slope_before": pl.Float64,
    "slope_after": pl.Float64,
    "slope_ratio": pl.Float64,
    "n_points": pl.Int64,
    "k_max": pl.Float64,
    "method": pl.Utf8,
    "accepted": pl.Boolean,
    "reason": pl.Utf8,
    "curves_agreeing": pl.Utf8,
    "drop_share": pl.Float64,
}

DISABLING_SCHEMA = {
    "run": pl.Utf8,
    "edit_index": pl.Int64,
    "case_id": pl.Utf8,
    "k_before": pl.Int64,
    "k_after": pl.Int64,
    "norm_z": pl.Float64,
    "joint_drop": pl.Boolean,
    "norm_outlier": pl.Boolean,
    "metric_flag": pl.Boolean,
    "reasons": pl.Utf8,
}


def phases_frame(results: Iterable[RunPhases]) -> pl.DataFrame:
    """One row per run, curve and shape (onset, early_fall), plus a row curve = "combined" per
    shape with the decision."""
    rows = []
    for r in results:
        for shape, per_curve, c in ((ONSET, r.phases, r.combined), (EARLY_FALL, r.early_falls or {}, r.early_fall)):
            for p in per_curve.values():
                rows.append(
                    dict(
                        run=r.run,
                        curve=p.curve,
                        shape=shape,
                        onset_k=p.onset_k,
                        ci_low=p.ci_low,
                        ci_high=p.ci_high,
                        collapse_k=p.collapse_k,
                        p_value=p.p_value,
                        delta_bic=p.delta_bic,
                        candidate_k=p.candidate_k,
                        slope_before=p.slope_before,
                        slope_after=p.slope_after,
                        slope_ratio=p.slope_ratio,
                        n_points=p.n_points,
                        k_max=p.k_max,
                        method=p.method,
                        accepted=p.accepted,
                        reason=p.reason,
                        curves_agreeing=None,
                        drop_share=p.drop_share,
                    )
                )
            if c is None:
                continue
            rows.append(
                dict(
                    run=r.run,
                    curve="combined",
                    shape=shape,
                    onset_k=c.onset_k,
                    ci_low=c.ci_low,
                    ci_high=c.ci_high,
                    collapse_k=c.collapse_k,
                    k_max=float(r.k_max) if r.k_max is not None else None,
                    method=METHOD,
                    accepted=c.onset_k is not None,
                    reason=c.decision + (f"; detected by: {', '.join(c.curves_detected)}" if c.curves_detected else ""),
                    curves_agreeing=",".join(c.curves_agreeing),
                    drop_share=c.drop_share,
                )
            )
    return pl.DataFrame(rows, schema=PHASES_SCHEMA)


def disabling_frame(results: Iterable[RunPhases]) -> pl.DataFrame:
    rows = [
        dict(
            run=r.run,
            edit_index=d.edit_index,
            case_id=d.case_id,
            k_before=d.k_before,
            k_after=d.k_after,
            norm_z=d.norm_z,
            joint_drop=d.joint_drop,
            norm_outlier=d.norm_outlier,
            metric_flag=d.metric_flag,
            reasons=" | ".join(d.reasons),
        )
        for r in results
        for d in r.disabling
    ]
    return pl.DataFrame(rows, schema=DISABLING_SCHEMA)


def analyze_runs(tables: Mapping[str, pl.DataFrame], runs: Sequence[str] | None = None, config: PhaseConfig | None = None) -> list[RunPhases]:
    """`analyze_run` for each run (default: every run in the tables)."""
    if runs is None:
        names: set[str] = set()
        for df in tables.values():
            if df is not None and "run" in df.columns:
                names.update(df["run"].drop_nulls().unique().to_list())
        runs = sorted(names)
    config = config or PhaseConfig.from_report()
    return [analyze_run(tables, r, config) for r in runs]
