"""Report figures (altair): the study's figures plus editscale's own.

Every figure is saved as HTML (tooltips; self-contained by default, so it opens offline), PNG and
SVG (rendered by vl-convert), each written to a temporary file with the right suffix and renamed.

Figures (file stems in the output directory; each metric names its figures and their functions in
editscale.evaluate.registry, every function called as fn(tables, FigureOptions)):

- `edit_scores`: editing proficiency, ES / PS / NS of each edit right after it was made, smoothed
  by a rolling mean over the last W edits (the study's smoothing; W = 1 shows raw scores), one
  panel per metric.
- `forgetting`: % of earlier (successful) edits forgotten (now, and ever) and % retention (mean ES
  of all earlier edits) against the number of edits; one run's band is the 95 % interval of
  history's sample.
- `downstream`: downstream score per task against edits, one row per reading (generation F1 and
  the log-likelihood reading f1_ll / accuracy_ll).
- `weight_distance`: Frobenius distance of each edited module (and of all together, "all") from
  the base weights against edits.
- `update_norms`: per-edit update norm (log scale) with outliers highlighted: the detrended robust
  z of editscale.report.disabling above the threshold (the disabling-edit criterion) and/or the
  weights metric's own flag; one panel per run.
- `overview`: one panel per run (also written alone as `overview_{run}`): the run's curves
  min-max normalized to [0, 1], with the detected phase shaded: the onset confidence interval
  (grey), gradual-phase end (onset) to collapse (orange), and disabling edits (red rules).

Several runs on one figure are coloured by method (the label adds model / dataset when they vary).
Runs that share model, method and dataset are samples of one configuration: the figure shows their
mean as the line and a band across samples (min-max, or mean +- 1 sd with band="sd").
Every figure renders from a handful of points, and an empty input gives a "no data" figure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import altair as alt
import numpy as np
import polars as pl

from .. import robust
from ..config import section_defaults
from ..io import atomic_path, safe_name
from . import phases as ph
from .disabling import norm_outlier_z

log = logging.getLogger(__name__)

FORMATS = ("html", "png", "svg")
WIDTH, HEIGHT = 260, 180
META = ("run", "model", "method", "dataset", "sample")
MODULE_METRICS = ("fro", "fro_per_numel", "spectral")


_REPORT = section_defaults("report")  # the config's defaults (schema.yaml) of the figure settings


@dataclass(frozen=True)
class FigureOptions:
    """What every figure function (fn(tables, options), named in the metric registry) may read."""

    smooth: int = _REPORT["smooth"]  # rolling mean over W edits of per-edit curves (1: raw)
    band: str = "minmax"  # band across samples: "minmax" or "sd"
    norm_z: float = _REPORT["norm_z"]  # detrended robust z of an update-norm outlier


# ----------------------------------------------------------------------------------------------
# saving


def save_chart(
    chart: alt.TopLevelMixin,
    stem: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    *,
    inline_html: bool = True,
    scale_factor: float = 1.0,
) -> list[Path]:
    """Save `chart` as {stem}.{fmt} for each format, atomically; returns the paths written."""
    written = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path, suffix=f".tmp.{fmt}") as tmp:
            kwargs = {"inline": inline_html} if fmt == "html" else {"scale_factor": scale_factor} if fmt == "png" else {}
            with alt.data_transformers.disable_max_rows():
                chart.save(str(tmp), format=fmt, **kwargs)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# helpers


def no_data(title: str) -> alt.Chart:
    df = pl.DataFrame({"message": [f"{title}: no data"]})
    return alt.Chart(df).mark_text(size=14).encode(text="message:N").properties(width=WIDTH, height=60, title=title)


def add_series(df: pl.DataFrame) -> pl.DataFrame:
    """Add `series`: method, plus model / dataset when several appear (one series per config)."""
    for c in META:
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, pl.Utf8).alias(c))
    parts = []
    if df["model"].n_unique() > 1:
        parts.append(pl.col("model").fill_null("?"))
    parts.append(pl.col("method").fill_null(pl.col("run")))
    if df["dataset"].n_unique() > 1:
        parts.append(pl.col("dataset").fill_null("?"))
    return df.with_columns(pl.concat_str(parts, separator=" / ").alias("series"))


def aggregate_samples(df: pl.DataFrame, x: str, y: str, by: Sequence[str] = (), band: str = "minmax") -> pl.DataFrame:
    """Mean over runs of one series at each x (and `by`), with a band: min-max or mean +- 1 sd.

    Columns: series (label; "... (n samples)" when several), *by, x, mean, lo, hi, sd, n_runs
    (runs in the series), runs (their names).
    """
    if band not in ("minmax", "sd"):
        raise ValueError(f"band must be 'minmax' or 'sd', not {band!r}")
    df = add_series(df).filter(pl.col(y).is_not_null() & pl.col(y).is_not_nan())
    n_runs = df.group_by("series").agg(pl.col("run").n_unique().alias("n_runs"), pl.col("run").unique().sort().str.join(", ").alias("runs"))
    agg = df.group_by(["series", *by, x]).agg(
        pl.col(y).mean().alias("mean"),
        pl.col(y).min().alias("min"),
        pl.col(y).max().alias("max"),
        pl.col(y).std().fill_null(0.0).alias("sd"),
    )
    if band == "minmax":
        agg = agg.with_columns(pl.col("min").alias("lo"), pl.col("max").alias("hi"))
    else:
        agg = agg.with_columns((pl.col("mean") - pl.col("sd")).alias("lo"), (pl.col("mean") + pl.col("sd")).alias("hi"))
    agg = agg.drop("min", "max").join(n_runs, on="series")
    label = pl.when(pl.col("n_runs") > 1).then(pl.format("{} ({} samples)", "series", "n_runs")).otherwise(pl.col("series"))
    return agg.with_columns(label.alias("series")).sort(["series", *by, x])


def line_band(
    frame: pl.DataFrame,
    *,
    x: str,
    x_title: str,
    y_title: str,
    facet: str | None = None,
    facet_title: str | None = None,
    row: str | None = None,
    columns: int = 3,
    log_y: bool = False,
    facet_sort: Sequence[str] | None = None,
    band: str = "minmax",
    title: str = "",
) -> alt.TopLevelMixin:
    """Mean line per series (coloured), with a band where a series has several samples."""
    points = frame.height <= 300
    xenc = alt.X(f"{x}:Q", title=x_title)
    yscale = alt.Scale(type="log") if log_y else alt.Scale(zero=True)
    tooltip = [
        alt.Tooltip("series:N", title="series"),
        alt.Tooltip(f"{x}:Q", title=x_title),
        alt.Tooltip("mean:Q", title=y_title, format=".4g"),
        alt.Tooltip("lo:Q", format=".4g"),
        alt.Tooltip("hi:Q", format=".4g"),
        alt.Tooltip("n_runs:Q", title="samples"),
        alt.Tooltip("runs:N"),
    ]
    extra = [alt.Tooltip(f"{c}:N") for c in (facet, row) if c]
    color = alt.Color("series:N", title="method", legend=alt.Legend(symbolType="stroke", symbolStrokeWidth=3, symbolOpacity=1))
    base = alt.Chart()
    line = base.mark_line(point=points).encode(x=xenc, y=alt.Y("mean:Q", title=y_title, scale=yscale), color=color, tooltip=tooltip + extra)
    area = (
        base.mark_area(opacity=0.2)
        .encode(
            x=xenc,
            y=alt.Y("lo:Q", title=y_title, scale=yscale),
            y2="hi:Q",
            color=color,
            tooltip=tooltip + extra,
        )
        .transform_filter("datum.hi > datum.lo")  # several samples, or one run's interval
    )
    layer = alt.layer(area, line, data=frame).properties(width=WIDTH, height=HEIGHT)
    sort = list(facet_sort) if facet_sort else "ascending"
    if row and facet:
        chart = layer.facet(row=alt.Row(f"{row}:N", title=None), column=alt.Column(f"{facet}:N", title=facet_title, sort=sort)).resolve_scale(y="independent")
    elif facet:
        chart = layer.facet(facet=alt.Facet(f"{facet}:N", title=facet_title, sort=sort), columns=columns).resolve_scale(y="independent")
    else:
        chart = layer
    if title and frame.height and frame["n_runs"].max() > 1:
        title = alt.TitleParams(title, subtitle=f"line: mean over samples; band: {'min-max' if band == 'minmax' else 'mean +- 1 sd'} across samples")
    return chart.properties(title=title) if title else chart


def _rolling(df: pl.DataFrame, cols: Sequence[str], window: int) -> pl.DataFrame:
    window = max(int(window), 1)
    return df.sort(["run", "edit"]).with_columns(
        # NaN (an edit with no prompts of that kind) would poison every window it enters; as a null
        # it is skipped, and the mean is over the window's scored edits.
        [pl.col(c).fill_nan(None).rolling_mean(window_size=window, min_samples=1).over("run").alias(c) for c in cols]
    )


# ----------------------------------------------------------------------------------------------
# the study's figures


def proficiency_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions(), *, metrics: Sequence[str] = ("es", "ps", "ns"), max_points: int = 2000) -> alt.TopLevelMixin:
    """ES / PS / NS of each edit right after it was made, rolling mean over `opts.smooth` edits.

    Longer chains are drawn at every ceil(n / max_points)-th edit (after smoothing).
    """
    edit_scores, smooth, band = tables.get("edit_scores"), opts.smooth, opts.band
    title = "Editing proficiency" + (f" (rolling mean over {smooth} edits)" if smooth > 1 else "")
    if edit_scores is None or edit_scores.height == 0:
        return no_data(title)
    present = [m for m in metrics if m in edit_scores.columns]
    if not present:
        return no_data(title)
    df = edit_scores.group_by([*META, "edit"]).agg([pl.col(m).mean() for m in present])
    df = _rolling(df, present, smooth)
    if df.height and df["edit"].max() > max_points:  # thin the smoothed curves for the figure
        stride = -(-int(df["edit"].max()) // max_points)
        df = df.filter((pl.col("edit") % stride == 0) | (pl.col("edit") == pl.col("edit").max().over("run")))
    long = df.unpivot(index=[*META, "edit"], on=present, variable_name="metric", value_name="value")
    frame = aggregate_samples(long, "edit", "value", by=["metric"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="score", facet="metric", facet_title="metric", facet_sort=present, band=band, title=title)


def forgetting_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions()) -> alt.TopLevelMixin:
    """% of earlier successful edits forgotten (now, and ever: once forgotten, always forgotten),
    and % retention, against edits; a series of one run shows the 95 % interval of history's
    sample as its band (zero width when every earlier edit is re-scored)."""
    forgetting, band = tables.get("forgetting"), opts.band
    title = "Forgetting of earlier edits"
    if forgetting is None or forgetting.height == 0:
        return no_data(title)
    quantities = {"forgotten (%)": ("forgotten_pct", 1.0), "ever forgotten (%)": ("ever_forgotten_pct", 1.0), "retention (%)": ("retention", 100.0)}
    parts = []
    for label, (col, scale) in quantities.items():
        if col in forgetting.columns:
            lo, hi = (pl.col(f"{col}{e}") if f"{col}{e}" in forgetting.columns else pl.col(col) for e in ("_lo", "_hi"))
            parts.append(forgetting.select(*META, "edit", pl.lit(label).alias("quantity"), (scale * pl.col(col)).alias("value"),
                                           (scale * lo).alias("ci_lo"), (scale * hi).alias("ci_hi")))
    long = pl.concat(parts)
    frame = aggregate_samples(long, "edit", "value", by=["quantity"], band=band)
    if frame.height == 0:
        return no_data(title)
    ci = add_series(long).group_by(["series", "quantity", "edit"]).agg(pl.col("ci_lo").mean(), pl.col("ci_hi").mean())
    one_run = pl.col("n_runs") == 1
    frame = frame.join(ci, on=["series", "quantity", "edit"], how="left").with_columns(
        pl.when(one_run).then(pl.col("ci_lo").fill_null(pl.col("lo"))).otherwise(pl.col("lo")).alias("lo"),
        pl.when(one_run).then(pl.col("ci_hi").fill_null(pl.col("hi"))).otherwise(pl.col("hi")).alias("hi"),
    ).drop("ci_lo", "ci_hi")
    return line_band(frame, x="edit", x_title="edits", y_title="%", facet="quantity", facet_title=None, band=band, title=title)


def downstream_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions(), *, readings: Sequence[str] = ("f1", "f1_ll", "accuracy_ll")) -> alt.TopLevelMixin:
    """Downstream score per task (columns) and reading (rows) against edits."""
    downstream, band = tables.get("downstream"), opts.band
    title = "Downstream ability"
    if downstream is None or downstream.height == 0:
        return no_data(title)
    df = downstream.filter(pl.col("metric").is_in(list(readings)))
    if df.height == 0:
        return no_data(title)
    frame = aggregate_samples(df.rename({"item": "task", "metric": "reading"}), "edit", "value", by=["reading", "task"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="score", facet="task", facet_title="task", row="reading", band=band, title=title)


# (quantity, reading label, context, metric) of the readings figure: teacher-forced beside generated
READINGS = (
    ("efficacy", "teacher-forced: P(new) > P(old)", "teacher_forced", "es"),
    ("efficacy", "teacher-forced: argmax match", "teacher_forced", "efficacy_em"),
    ("paraphrase", "teacher-forced: P(new) > P(old)", "teacher_forced", "ps"),
    ("paraphrase", "teacher-forced: argmax match", "teacher_forced", "paraphrase_em"),
    ("portability", "teacher-forced: P(new) > P(old)", "teacher_forced", "port_s"),
    ("portability", "teacher-forced: argmax match", "teacher_forced", "portability_em"),
)
GENERATED = (("efficacy", "efficacy_em"), ("paraphrase", "paraphrase_em"), ("portability", "portability_em"))


def readings_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions()) -> alt.TopLevelMixin:
    """Teacher-forced against generated success (metric `answers`, the same edits and prompts in
    both readings) per quantity (columns) and reading (rows) against edits: the mean over the
    checkpoint's sample of each run, then over a series' runs."""
    answers, band = tables.get("answers"), opts.band
    title = "Teacher-forced vs generated answers"
    if answers is None or answers.height == 0 or "context" not in answers.columns:
        return no_data(title)
    spec = [*READINGS, *((q, f"generated ({c}): exact match", c, m) for c in sorted(set(answers["context"]) - {"teacher_forced"})
                         for q, m in GENERATED)]
    parts = []
    for quantity, label, context, metric in spec:
        sel = answers.filter((pl.col("context") == context) & (pl.col("metric") == metric))
        if sel.height:
            per_run = sel.group_by([c for c in META if c in sel.columns] + ["edit"]).agg(pl.col("value").mean())
            parts.append(per_run.with_columns(pl.lit(quantity).alias("quantity"), pl.lit(label).alias("reading")))
    if not parts:
        return no_data(title)
    frame = aggregate_samples(pl.concat(parts, how="diagonal_relaxed"), "edit", "value", by=["reading", "quantity"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="success", facet="quantity", facet_title=None, row="reading",
                     facet_sort=["efficacy", "paraphrase", "portability"], band=band, title=title)


def weights_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions(), *, metric: str = "fro") -> alt.TopLevelMixin:
    """Distance of each edited module from the base weights (metric `metric`) against edits."""
    weights, band = tables.get("weights"), opts.band
    title = f"Weight distance from the base model ({metric})"
    if weights is None or weights.height == 0:
        return no_data(title)
    df = weights.filter(pl.col("metric") == metric)
    if df.height == 0:
        return no_data(title)
    frame = aggregate_samples(df.rename({"item": "module"}), "edit", "value", by=["module"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title=metric, facet="module", facet_title="module", band=band, title=title)


# ----------------------------------------------------------------------------------------------
# editscale's figures


NORM_CLASSES = ["normal", "weights metric flag", "detrended z outlier", "both"]


def norms_frame(tables: Mapping[str, pl.DataFrame], runs: Sequence[str] | None = None, *, norm_z: float = robust.OUTLIER_Z) -> pl.DataFrame:
    """Per-edit update norms of every run, with the detrended robust z and the outlier class."""
    runs = runs if runs is not None else _runs(tables)
    frames = []
    w = tables.get("weights")
    for run in runs:
        n = ph.run_norms(tables, run)
        if n is None or n.height == 0 or "update_norm" not in n.columns:
            continue
        n = n.filter(pl.col("update_norm").is_not_null() & (pl.col("update_norm") > 0)).sort("edit_index")
        if n.height == 0:
            continue
        if "outlier" not in n.columns and w is not None and w.height and "edit_index" in w.columns:
            flags = (
                w.filter((pl.col("run") == run) & (pl.col("metric") == "outlier") & pl.col("edit_index").is_not_null())
                .sort("edit")
                .group_by("edit_index")
                .agg(pl.col("value").last().alias("outlier"))
            )
            n = n.join(flags, on="edit_index", how="left")
        z = norm_outlier_z(n["edit_index"].to_numpy(), n["update_norm"].to_numpy())
        mine = z > norm_z
        theirs = n["outlier"].fill_null(0).to_numpy() >= 0.5 if "outlier" in n.columns else np.zeros(len(z), bool)
        cls = np.array(NORM_CLASSES, dtype=object)[mine.astype(int) * 2 + theirs.astype(int)]
        if "case_id" not in n.columns:
            n = n.with_columns(pl.lit(None, pl.Utf8).alias("case_id"))
        frames.append(
            n.select(
                pl.lit(run).alias("run"),
                pl.col("edit_index").cast(pl.Int64),
                pl.col("case_id").cast(pl.Utf8),
                pl.col("update_norm").cast(pl.Float64),
            ).with_columns(pl.Series("z", z, dtype=pl.Float64), pl.Series("outlier", cls.tolist(), dtype=pl.Utf8))
        )
    if not frames:
        return pl.DataFrame(schema={"run": pl.Utf8, "edit_index": pl.Int64, "case_id": pl.Utf8, "update_norm": pl.Float64, "z": pl.Float64, "outlier": pl.Utf8})
    return pl.concat(frames)


def update_norm_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions()) -> alt.TopLevelMixin:
    """Per-edit update norm (log scale), outliers highlighted, one panel per run."""
    norm_z = opts.norm_z
    title = "Update norm per edit"
    df = norms_frame(tables, norm_z=norm_z)
    if df.height == 0:
        return no_data(title)
    subtitle = f"detrended z outlier: robust z of log norm against its rolling median > {norm_z:g}"
    tooltip = ["run:N", "edit_index:Q", "case_id:N", alt.Tooltip("update_norm:Q", format=".4g"), alt.Tooltip("z:Q", title="detrended z", format=".2f"), "outlier:N"]
    base = alt.Chart()
    line = base.mark_line(color="#9e9e9e", strokeWidth=0.8).encode(
        x=alt.X("edit_index:Q", title="edit"), y=alt.Y("update_norm:Q", title="update norm", scale=alt.Scale(type="log"))
    )
    pts = base.mark_point(filled=True).encode(
        x="edit_index:Q",
        y=alt.Y("update_norm:Q", scale=alt.Scale(type="log")),
        color=alt.Color("outlier:N", scale=alt.Scale(domain=NORM_CLASSES, range=["#4c78a8", "#f58518", "#e45756", "#b00020"]), title=None),
        size=alt.Size("outlier:N", scale=alt.Scale(domain=NORM_CLASSES, range=[12, 60, 90, 120]), legend=None),
        tooltip=tooltip,
    )
    layer = alt.layer(line, pts, data=df).properties(width=2 * WIDTH, height=HEIGHT)
    return layer.facet(row=alt.Row("run:N", title=None)).properties(title=alt.TitleParams(title, subtitle=subtitle))


def _normalize(y: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(y), np.nanmax(y)
    return np.full_like(y, 0.5) if not hi > lo else (y - lo) / (hi - lo)


def overview_chart(
    tables: Mapping[str, pl.DataFrame],
    run: str,
    *,
    phase: Mapping | None = None,
    disabling: Sequence[int] = (),
    smooth: int = 1,
    indicator: Mapping | None = None,
) -> alt.TopLevelMixin:
    """Normalized curves of one run with the detected phases shaded.

    `phase` holds onset_k, ci_low, ci_high, collapse_k (a row of the phases table, curve =
    "combined"); `disabling` the flagged edit indices; `indicator` the summary's
    leading_indicator / indicator_lead, named in the title.
    """
    from ..evaluate.registry import curve_specs

    title = f"{run}: overview"
    curves = ph.run_curves(tables, run)
    specs = {spec.name: spec for _, spec in curve_specs()}
    frames = []
    for name, c in curves.items():
        y = np.asarray(c.y, float)
        k = np.asarray(c.k, float)
        spec = specs[name]
        if spec.per_edit and smooth > 1:
            order = np.argsort(k)
            k, y = k[order], pl.Series(y[order]).rolling_mean(window_size=int(smooth), min_samples=1).to_numpy()
        frames.append(pl.DataFrame({"curve": spec.label or name, "edit": k, "raw": y, "normalized": _normalize(y)}))
    if not frames:
        return no_data(title)
    df = pl.concat(frames)
    x = alt.X("edit:Q", title="edits")
    layers = []
    onset = phase.get("onset_k") if phase else None
    if onset is not None and not (isinstance(onset, float) and np.isnan(onset)):
        lo = phase.get("ci_low") if phase.get("ci_low") is not None else onset
        hi = phase.get("ci_high") if phase.get("ci_high") is not None else onset
        end = phase.get("collapse_k") if phase.get("collapse_k") is not None else df["edit"].max()
        shade = pl.DataFrame(
            {
                "start": [float(lo), float(onset)],
                "end": [float(hi), float(max(end, onset))],
                "region": ["onset 95% interval", "gradual-phase end to collapse"],
            }
        )
        layers.append(
            alt.Chart(shade)
            .mark_rect(opacity=0.25)
            .encode(
                x=alt.X("start:Q", title="edits"),
                x2="end:Q",
                color=alt.Color("region:N", scale=alt.Scale(domain=["onset 95% interval", "gradual-phase end to collapse"], range=["#9e9e9e", "#f58518"]), title="phase"),
                tooltip=["region:N", alt.Tooltip("start:Q", format=".0f"), alt.Tooltip("end:Q", format=".0f")],
            )
        )
        title += f" (onset of catastrophic forgetting at {onset:.0f} edits)"
    else:
        title += " (no onset of catastrophic forgetting detected)"
    lead = (indicator or {}).get("leading_indicator")
    if lead:
        by = (indicator or {}).get("indicator_lead")
        title += f"; first indicator to move: {lead}" + (f", {by:.0f} edits ahead" if by is not None and not np.isnan(by) else "")
    if len(disabling):
        dis = pl.DataFrame({"edit": [int(j) for j in disabling], "what": "disabling edit"})
        layers.append(alt.Chart(dis).mark_rule(color="#e45756", strokeDash=[4, 3]).encode(x="edit:Q", tooltip=["what:N", "edit:Q"]))
    layers.append(
        alt.Chart(df)
        .mark_line(point=df.height <= 300)
        .encode(
            x=x,
            y=alt.Y("normalized:Q", title="normalized (min-max per curve)"),
            stroke=alt.Stroke("curve:N", title="curve"),
            tooltip=["curve:N", alt.Tooltip("edit:Q"), alt.Tooltip("raw:Q", format=".4g"), alt.Tooltip("normalized:Q", format=".3f")],
        )
    )
    return alt.layer(*layers).resolve_scale(color="independent").properties(width=3 * WIDTH, height=2 * HEIGHT, title=title)


# ----------------------------------------------------------------------------------------------
# all figures


def _runs(tables: Mapping[str, pl.DataFrame]) -> list[str]:
    if "summary" in tables and tables["summary"].height:
        return tables["summary"]["run"].to_list()
    names: set[str] = set()
    for df in tables.values():
        if df is not None and "run" in df.columns:
            names.update(df["run"].drop_nulls().unique().to_list())
    return sorted(names)


def _phase_rows(tables: Mapping[str, pl.DataFrame], runs: Sequence[str]) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """Combined phase and disabling edits per run, from the phases tables or computed."""
    phases_df, dis_df = tables.get("phases"), tables.get("disabling_edits")
    if phases_df is None:
        results = ph.analyze_runs(tables, list(runs))
        phases_df, dis_df = ph.phases_frame(results), ph.disabling_frame(results)
    phase = {r["run"]: r for r in phases_df.filter(pl.col("curve") == "combined").iter_rows(named=True)}
    dis: dict[str, list[int]] = {}
    if dis_df is not None and dis_df.height:
        for r in dis_df.iter_rows(named=True):
            dis.setdefault(r["run"], []).append(int(r["edit_index"]))
    return phase, dis


def make_plots(
    tables: Mapping[str, pl.DataFrame],
    out_dir: str | os.PathLike,
    options: FigureOptions = FigureOptions(),
    *,
    formats: Sequence[str] = FORMATS,
    inline_html: bool = True,
    per_run: bool = True,
) -> list[Path]:
    """Write every figure of the metric registry, then the overview, to `out_dir`; returns the
    files written. `per_run` also writes each run's overview alone as overview_{run}."""
    from ..evaluate.registry import METRICS
    from ..registry import resolve

    out_dir = Path(out_dir)
    charts: dict[str, alt.TopLevelMixin] = {
        stem: resolve(ref, what=f"metric {metric.name!r}: figure {stem!r}")(tables, options) for metric in METRICS.values() for stem, ref in metric.figures.items()
    }
    runs = _runs(tables)
    phase, dis = _phase_rows(tables, runs)
    summary = tables.get("summary")
    leads = {r["run"]: r for r in summary.iter_rows(named=True)} if summary is not None and "leading_indicator" in summary.columns else {}
    overviews = {run: overview_chart(tables, run, phase=phase.get(run), disabling=dis.get(run, []), smooth=options.smooth,
                                     indicator=leads.get(run)) for run in runs}
    charts["overview"] = alt.vconcat(*overviews.values()) if overviews else no_data("overview")
    if per_run:
        for run, chart in overviews.items():
            charts[f"overview_{safe_name(run)}"] = chart
    written = []
    for name, chart in charts.items():
        paths = save_chart(chart, out_dir / name, formats, inline_html=inline_html)
        log.info("wrote %s", ", ".join(str(p) for p in paths))
        written += paths
    return written
