"""Report figures (altair): the study's figures plus editscale's own.

Every figure is saved as PNG, SVG (rendered by vl-convert) and HTML (tooltips; by default the page
loads vega from the folder's one VEGA_BUNDLE), each written to a temporary file with the right
suffix and renamed; FIGURES_PAGE holds every figure on one page with vega's scripts once (the
report's interactive figures: its size grows with the figures' data, not their number).

Figures (file stems in the output directory; each metric names its figures and their functions in
editscale.evaluate.registry, every function called as fn(tables, FigureOptions)):

- `edit_scores`: editing proficiency, ES / PS / NS of each edit right after it was made, smoothed
  by a rolling mean over the last W edits (the study's smoothing, named in the title when a run
  has more than W edits; W = 1 shows raw scores), one panel per metric.
- `forgetting`: % of earlier (successful) edits forgotten (now, and ever) and % retention (mean ES
  of all earlier edits) against the number of edits, defined in the subtitle; one run's band is
  the 95 % interval of history's sample.
- `downstream`: one panel per task and reading (generation F1 and the log-likelihood readings
  f1_ll / accuracy_ll) that has values, wrapped four to a row.
- `weight_distance`: Frobenius distance of each edited module from the base weights against edits.
- `update_norms`: per-edit update norm (log scale) with outliers highlighted: the detrended robust
  z of editscale.report.disabling above the threshold (the disabling-edit criterion) and/or the
  weights metric's own flag; one panel per run.
- `overview`: every run at a glance, one row per run of the CurveSpec.glance curves on one y range
  per curve; `overview_{run}`: one run's every phase curve as small multiples in their own units.
  Each panel is shaded with the detected phases: an early fall (blue, from the first edit to where
  the fast fall ends), the onset's 95 % interval (grey), onset to collapse (orange), disabling edits
  (ticks along the foot); the title names the onset, its interval, the collapse, the early fall and
  the first collapse indicator to move.

Several runs on one figure are coloured by method, each method in the same colour in every figure
(method_colors: its place in the method registry; the label adds model / dataset when they vary,
and a dash tells such series of one method apart). Runs that share model, method and dataset are
samples of one configuration: the figure shows their mean as the line and a band across samples
(min-max, or mean +- 1 sd with band="sd"). Edit axes have integer ticks, and are symmetric-log
where the checkpoints are log-spaced (a long study's 0, 10, 20, 50, ..., 10,000: `edit_scale`);
legends are never truncated. Every figure renders from a handful of points, and an empty input gives a "no data"
figure.
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
from ..layout import FIGURES_PAGE, VEGA_BUNDLE
from . import phases as ph
from .disabling import norm_outlier_z

log = logging.getLogger(__name__)

FORMATS = ("html", "png", "svg")
WIDTH, HEIGHT = 260, 180
PANEL_WIDTH, PANEL_HEIGHT = 190, 120  # a small multiple (downstream, overview)
GLANCE_WIDTH, GLANCE_HEIGHT = 110, 70  # a panel of the study overview: a row of them fits the report's landing page
# One colour per method, the same in every figure: the method's place in the method registry
# (editscale.edit.methods.METHODS, registration order; unregistered names after, sorted) picks it.
PALETTE = (
    "#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#c9a100", "#b279a2", "#ff9da6", "#9d755d", "#17becf",
    "#1f3d7a", "#8c564b", "#bcbd22", "#9467bd", "#2ca02c", "#e377c2", "#a0522d", "#7f7f7f", "#d62728", "#393b79",
)
LEGEND = {"labelLimit": 0, "titleLimit": 0}  # vega truncates legend labels at 160 px by default
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


HTML_MODES = ("bundle", "inline", "cdn")


def _vega_bundle() -> str:
    import vl_convert as vlc

    return vlc.javascript_bundle()


def _script_json(spec: Mapping) -> str:
    import json

    # "</" inside a spec (a title, a tooltip) must not close the <script> element
    return json.dumps(spec, sort_keys=True).replace("</", "<\\/")


def _page(title: str, scripts: str, body: str) -> str:
    import html

    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"UTF-8\">\n"
            f"<title>{html.escape(title)}</title>\n"
            "<style>body { font-family: sans-serif; margin: 16px; } .vega-embed { display: block; margin-bottom: 32px; }</style>\n"
            f"{scripts}\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _embed(div: str, chart: alt.TopLevelMixin) -> str:
    with alt.data_transformers.disable_max_rows():
        spec = chart.to_dict()
    return f"<div id=\"{div}\"></div>\n<script>vegaEmbed('#{div}', {_script_json(spec)}, {{\"mode\": \"vega-lite\"}}).catch(console.error);</script>"


def save_chart(
    chart: alt.TopLevelMixin,
    stem: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    *,
    html: str = "inline",
    scale_factor: float = 1.0,
) -> list[Path]:
    """Save `chart` as {stem}.{fmt} for each format, atomically; returns the paths written.

    html: "inline" (vega's scripts in the page: opens anywhere, offline, ~0.9 MB), "bundle" (the
    page loads VEGA_BUNDLE from its own folder; write_vega_bundle writes it once per folder) or
    "cdn" (loads vega from jsDelivr: needs the network to view).
    """
    if html not in HTML_MODES:
        raise ValueError(f"html must be one of {HTML_MODES}, not {html!r}")
    written = []
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        with atomic_path(path, suffix=f".tmp.{fmt}") as tmp:
            if fmt == "html" and html == "bundle":
                Path(tmp).write_text(_page(path.stem, f'<script src="{VEGA_BUNDLE}"></script>', _embed("vis", chart)), encoding="utf-8")
            else:
                kwargs = {"inline": html == "inline"} if fmt == "html" else {"scale_factor": scale_factor} if fmt == "png" else {}
                with alt.data_transformers.disable_max_rows():
                    chart.save(str(tmp), format=fmt, **kwargs)
        written.append(path)
    return written


def write_vega_bundle(out_dir: str | os.PathLike) -> Path:
    """VEGA_BUNDLE in `out_dir`: the script every "bundle" page of the folder loads."""
    path = Path(out_dir) / VEGA_BUNDLE
    with atomic_path(path) as tmp:
        Path(tmp).write_text(_vega_bundle(), encoding="utf-8")
    return path


def write_figures_page(charts: Mapping[str, alt.TopLevelMixin], path: str | os.PathLike, title: str = "editscale figures") -> Path:
    """Every chart on one self-contained page, vega's scripts inlined once (the report's
    interactive figures: its size grows with the figures' data, not with their number)."""
    import html

    body = [f"<h1>{html.escape(title)}</h1>", "<ul>" + "".join(f'<li><a href="#fig-{i}">{html.escape(name)}</a></li>' for i, name in enumerate(charts)) + "</ul>"]
    for i, (name, chart) in enumerate(charts.items()):
        body.append(f'<h2 id="fig-{i}">{html.escape(name)}</h2>\n{_embed(f"vis-{i}", chart)}')
    path = Path(path)
    with atomic_path(path, suffix=".tmp.html") as tmp:
        Path(tmp).write_text(_page(title, f"<script>\n{_vega_bundle()}\n</script>", "\n".join(body)), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# helpers


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """method -> colour: the method's place in the method registry, the same in every figure."""
    from ..edit.methods import METHODS

    order = list(METHODS)
    order += sorted(set(methods) - set(order))
    return {m: PALETTE[order.index(m) % len(PALETTE)] for m in methods}


def edits_x(field: str = "edit", title: str = "edits", ticks: Sequence[int] | None = None, **kwargs) -> alt.X:
    """An edit-count axis: integer ticks (no 2.5 edits), thousands separated; `ticks` fixes them."""
    axis = alt.Axis(format=",d", tickMinStep=1, **({"values": list(ticks)} if ticks else {}))
    return alt.X(f"{field}:Q", title=title, axis=axis, **kwargs)


LOG_GRID_RATIO = 20  # checkpoint gaps growing this much from first to last: a log-spaced grid


def edit_scale(checkpoints: Sequence[float], n_edits: int) -> tuple[alt.Scale, list[int] | None, str]:
    """The edit axis of a run: linear, or symmetric-log when its checkpoints are log-spaced (their
    last gap at least LOG_GRID_RATIO times their first: 0, 10, 20, 50, ..., 10,000), where a linear
    axis crowds the first thousand edits, and everything that happens in them, into its left edge.
    (scale, tick values or None, a note for the title: "" or "edits on a log scale")."""
    ks = sorted({float(k) for k in checkpoints})
    gaps = [b - a for a, b in zip(ks, ks[1:]) if b > a]
    top = max(n_edits, 1)
    if len(gaps) >= 3 and gaps[-1] >= LOG_GRID_RATIO * gaps[0]:
        ticks = [0] + [10**e for e in range(1, len(str(int(top)))) if 10**e <= top]
        ticks += [] if ticks[-1] == top else [int(top)]  # the run's end, where it is no power of ten
        return alt.Scale(type="symlog", domain=[0, top], nice=False), ticks, "edits on a log scale"
    return alt.Scale(domain=[0, top], nice=False), None, ""


def series_encodings(frame: pl.DataFrame) -> dict:
    """Colour by the series' method (method_colors); when one method has several series (other
    models or datasets), the series also differ by dash."""
    pairs = frame.select("series", "method").unique().sort("series") if frame.height else pl.DataFrame({"series": [], "method": []})
    colors = method_colors(sorted(set(pairs["method"].to_list())))
    domain = pairs["series"].to_list()
    legend = alt.Legend(symbolType="stroke", symbolStrokeWidth=3, symbolOpacity=1, **LEGEND)
    enc = {"color": alt.Color("series:N", title="method", scale=alt.Scale(domain=domain, range=[colors[m] for m in pairs["method"]]), legend=legend)}
    if pairs.height and pairs["method"].n_unique() < pairs.height:
        enc["strokeDash"] = alt.StrokeDash("series:N", title="series", legend=alt.Legend(**LEGEND))
    return enc


def smoothing_note(smooth: int, n_edits: int) -> str:
    """" (rolling mean over W edits)" when the curves are smoothed, i.e. W > 1 and a run has more
    than W edits; "" otherwise."""
    return f" (rolling mean over {smooth} edits)" if smooth > 1 and n_edits > smooth else ""


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
    return df.with_columns(pl.concat_str(parts, separator=" / ").alias("series"), pl.col("method").fill_null(pl.col("run")).alias("method"))


def aggregate_samples(df: pl.DataFrame, x: str, y: str, by: Sequence[str] = (), band: str = "minmax") -> pl.DataFrame:
    """Mean over runs of one series at each x (and `by`), with a band: min-max or mean +- 1 sd.

    Columns: series (label; "... (n samples)" when several), method, *by, x, mean, lo, hi, sd,
    n_runs (runs in the series), runs (their names).
    """
    if band not in ("minmax", "sd"):
        raise ValueError(f"band must be 'minmax' or 'sd', not {band!r}")
    df = add_series(df).filter(pl.col(y).is_not_null() & pl.col(y).is_not_nan())
    n_runs = df.group_by("series").agg(pl.col("run").n_unique().alias("n_runs"), pl.col("run").unique().sort().str.join(", ").alias("runs"),
                                       pl.col("method").first())
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
    columns: int = 3,
    log_y: bool = False,
    facet_sort: Sequence[str] | None = None,
    band: str = "minmax",
    title: str = "",
    subtitle: Sequence[str] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> alt.TopLevelMixin:
    """Mean line per series (coloured by method), with a band where a series has several samples
    (or one run has an interval); facets wrapped `columns` to a row, each with its own y scale."""
    points = frame.height <= 300
    xenc = edits_x(x, x_title) if x == "edit" else alt.X(f"{x}:Q", title=x_title)
    if x == "edit" and frame.height:  # log-spaced checkpoints: a log edit axis (edit_scale)
        xscale, ticks, note = edit_scale(frame["edit"].to_list(), int(frame["edit"].max()))
        if note:
            xenc, subtitle = edits_x(x, x_title, ticks, scale=xscale), [*subtitle, note]
    yscale = alt.Scale(type="log") if log_y else alt.Scale(zero=True)
    tooltip = [
        alt.Tooltip("series:N", title="series"),
        alt.Tooltip(f"{x}:Q", title=x_title),
        alt.Tooltip("mean:Q", title=y_title, format=".4g"),
        alt.Tooltip("lo:Q", format=".4g"),
        alt.Tooltip("hi:Q", format=".4g"),
        alt.Tooltip("n_runs:Q", title="samples"),
        alt.Tooltip("runs:N"),
    ] + ([alt.Tooltip(f"{facet}:N")] if facet else [])
    enc = series_encodings(frame)
    base = alt.Chart()
    line = base.mark_line(point=points).encode(x=xenc, y=alt.Y("mean:Q", title=y_title, scale=yscale), tooltip=tooltip, **enc)
    area = (
        base.mark_area(opacity=0.2)
        .encode(x=xenc, y=alt.Y("lo:Q", title=y_title, scale=yscale), y2="hi:Q", color=enc["color"], tooltip=tooltip)
        .transform_filter("datum.hi > datum.lo")  # several samples, or one run's interval
    )
    layer = alt.layer(area, line, data=frame).properties(width=width, height=height)
    if facet:
        sort = list(facet_sort) if facet_sort else "ascending"
        chart = layer.facet(facet=alt.Facet(f"{facet}:N", title=facet_title, sort=sort, header=alt.Header(labelLimit=0)), columns=columns)
        chart = chart.resolve_scale(y="independent")
    else:
        chart = layer
    lines = list(subtitle)
    if frame.height and frame["n_runs"].max() > 1:
        lines.append(f"line: mean over samples; band: {'min-max' if band == 'minmax' else 'mean +- 1 sd'} across samples")
    if title:
        chart = chart.properties(title=alt.TitleParams(title, subtitle=lines, anchor="start") if lines else alt.TitleParams(title, anchor="start"))
    return chart


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
    """ES / PS / NS of each edit right after it was made, rolling mean over `opts.smooth` edits
    (said in the title only when a run has more edits than that).

    Longer chains are drawn at every ceil(n / max_points)-th edit (after smoothing).
    """
    edit_scores, smooth, band = tables.get("edit_scores"), opts.smooth, opts.band
    title = "Editing proficiency"
    if edit_scores is None or edit_scores.height == 0:
        return no_data(title)
    present = [m for m in metrics if m in edit_scores.columns]
    if not present:
        return no_data(title)
    title += smoothing_note(smooth, int(edit_scores["edit"].max()))
    df = edit_scores.group_by([*META, "edit"]).agg([pl.col(m).mean() for m in present])
    df = _rolling(df, present, smooth)
    if df.height and df["edit"].max() > max_points:  # thin the smoothed curves for the figure
        stride = -(-int(df["edit"].max()) // max_points)
        df = df.filter((pl.col("edit") % stride == 0) | (pl.col("edit") == pl.col("edit").max().over("run")))
    long = df.unpivot(index=[*META, "edit"], on=present, variable_name="metric", value_name="value")
    frame = aggregate_samples(long, "edit", "value", by=["metric"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="score", facet="metric", facet_title=None, facet_sort=present, band=band, title=title,
                     subtitle=["es: P(new) > P(old) on the edit prompt; ps: on its paraphrases; ns: P(old) > P(new) on neighbourhood prompts; each edit scored right after it was made"])


FORGETTING_DEFINITION = [
    "forgotten: of the earlier edits that held right after they were made (ES >= 0.5), the % that fail now (ES < 0.5)",
    "ever forgotten: the % that failed at this or any earlier checkpoint (once forgotten, always forgotten)",
    "retention: mean ES of all earlier edits, re-scored now",
]


def forgetting_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions()) -> alt.TopLevelMixin:
    """% of earlier successful edits forgotten (now, and ever: once forgotten, always forgotten),
    and % retention, against edits, with their definitions; a series of one run shows the 95 %
    interval of history's sample as its band (zero width when every earlier edit is re-scored)."""
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
    subtitle = [*FORGETTING_DEFINITION]
    if frame.filter(one_run & (pl.col("hi") > pl.col("lo"))).height:
        subtitle.append("band of a single run: 95 % interval of the re-scored sample of earlier edits")
    return line_band(frame, x="edit", x_title="edits", y_title="%", facet="quantity", facet_title=None, facet_sort=list(quantities), band=band,
                     title=title, subtitle=subtitle)


def downstream_chart(tables: Mapping[str, pl.DataFrame], opts: FigureOptions = FigureOptions(), *, readings: Sequence[str] = ("f1", "f1_ll", "accuracy_ll"),
                     columns: int = 4) -> alt.TopLevelMixin:
    """Downstream score per task and reading against edits: one small panel per (task, reading)
    that has values, wrapped `columns` to a row (a page width)."""
    downstream, band = tables.get("downstream"), opts.band
    title = "Downstream ability"
    if downstream is None or downstream.height == 0:
        return no_data(title)
    df = downstream.filter(pl.col("metric").is_in(list(readings)) & pl.col("value").is_not_null() & pl.col("value").is_not_nan())
    if df.height == 0:
        return no_data(title)
    names = {"f1": "generated F1", "f1_ll": "F1 (log-likelihood)", "accuracy_ll": "accuracy (log-likelihood)"}
    df = df.with_columns(pl.format("{}: {}", "item", pl.col("metric").replace_strict(names, default=pl.col("metric"))).alias("panel"))
    order = [p for task in sorted(set(df["item"])) for r in readings if (p := f"{task}: {names.get(r, r)}") in set(df["panel"])]
    frame = aggregate_samples(df, "edit", "value", by=["panel"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="score", facet="panel", facet_title=None, facet_sort=order, columns=columns,
                     band=band, title=title, width=PANEL_WIDTH, height=PANEL_HEIGHT)


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
    long = pl.concat(parts, how="diagonal_relaxed").with_columns(pl.format("{}: {}", "quantity", "reading").alias("panel"))
    order = [f"{q}: {label}" for q in ("efficacy", "paraphrase", "portability") for _, label, _, _ in spec if f"{q}: {label}" in set(long["panel"])]
    frame = aggregate_samples(long, "edit", "value", by=["panel"], band=band)
    return line_band(frame, x="edit", x_title="edits", y_title="success", facet="panel", facet_title=None, facet_sort=list(dict.fromkeys(order)),
                     columns=3, band=band, title=title, width=PANEL_WIDTH, height=PANEL_HEIGHT)


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
    return line_band(frame, x="edit", x_title="edits", y_title=metric, facet="module", facet_title=None, columns=4, band=band, title=title,
                     width=PANEL_WIDTH, height=PANEL_HEIGHT)


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
        x=edits_x("edit_index", "edit"), y=alt.Y("update_norm:Q", title="update norm", scale=alt.Scale(type="log"))
    )
    pts = base.mark_point(filled=True).encode(
        x=edits_x("edit_index", "edit"),
        y=alt.Y("update_norm:Q", scale=alt.Scale(type="log")),
        color=alt.Color("outlier:N", scale=alt.Scale(domain=NORM_CLASSES, range=["#4c78a8", "#f58518", "#e45756", "#b00020"]), title=None,
                        legend=alt.Legend(**LEGEND)),
        size=alt.Size("outlier:N", scale=alt.Scale(domain=NORM_CLASSES, range=[12, 60, 90, 120]), legend=None),
        tooltip=tooltip,
    )
    layer = alt.layer(line, pts, data=df).properties(width=2 * WIDTH, height=HEIGHT)
    return layer.facet(row=alt.Row("run:N", title=None, header=alt.Header(labelLimit=0))).properties(title=alt.TitleParams(title, subtitle=subtitle, anchor="start"))


# the phase marks of the overview panels (grey and orange regions, black ticks of the disabling edits: no method's colour)
PHASE_MARKS = {"early fall": "#4c78a8", "onset 95 % interval": "#9e9e9e", "onset to collapse": "#f58518", "disabling edit": "#222222"}
DISABLING_RUG_PX = 8  # the disabling edits' ticks: this many pixels up from each panel's foot


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def phase_title(run: str, phase: Mapping | None, indicator: Mapping | None = None) -> str:
    """"run: onset of catastrophic forgetting at K edits (95 % CI a-b), collapse at C; first
    indicator to move: name, L edits ahead" (or "no onset ... detected")."""
    onset = (phase or {}).get("onset_k")
    if _finite(onset):
        text = f"{run}: onset of catastrophic forgetting at {onset:,.0f} edits"
        lo, hi = phase.get("ci_low"), phase.get("ci_high")
        if _finite(lo) and _finite(hi):
            text += f" (95 % CI {lo:,.0f}-{hi:,.0f})"
        if _finite(phase.get("collapse_k")):
            text += f", collapse at {phase['collapse_k']:,.0f}"
    else:
        text = f"{run}: no onset of catastrophic forgetting detected"
    fall = (phase or {}).get("early_fall_k")
    if _finite(fall):
        share = phase.get("early_fall_share")
        text += f"; early fall until {fall:,.0f} edits" + (f" ({100 * share:.0f} % of the drop)" if _finite(share) else "")
    lead = (indicator or {}).get("leading_indicator")
    if lead:
        by = (indicator or {}).get("indicator_lead")
        text += f"; first indicator to move: {lead}" + (f", {by:,.0f} edits ahead" if _finite(by) else "")
    return text


def _run_method(tables: Mapping[str, pl.DataFrame], run: str) -> str:
    for df in tables.values():
        if df is not None and df.height and {"run", "method"} <= set(df.columns):
            m = df.filter(pl.col("run") == run)["method"].drop_nulls()
            if m.len():
                return str(m[0])
    return run


def overview_curves(tables: Mapping[str, pl.DataFrame], run: str, *, smooth: int = 1,
                    glance: bool = False) -> list[tuple[str, str, str, bool, bool, pl.DataFrame]]:
    """(curve name, label, note, log scale, per edit, frame of edit / value) of each curve of `run` the
    onset detector reads (only CurveSpec.glance ones with `glance`), in real units; per-edit
    curves of more than `smooth` edits are smoothed (the note says so)."""
    out = []
    for name, (spec, k, y) in ph.curve_values(tables, run).items():
        ok = np.isfinite(y) & ((y > 0) if spec.log else True)
        k, y = k[ok], y[ok]
        if not len(k) or not spec.phases or (glance and not spec.glance):
            continue
        note = ""
        if spec.per_edit and smooth > 1 and len(k) > smooth:
            y = pl.Series(y).rolling_mean(window_size=int(smooth), min_samples=1).to_numpy()
            note = f"rolling mean over {smooth} edits"
        out.append((name, (spec.label or name).removeprefix("log "), note, spec.log, spec.per_edit, pl.DataFrame({"edit": k, "value": y})))
    return out


def overview_chart(
    tables: Mapping[str, pl.DataFrame],
    run: str,
    *,
    phase: Mapping | None = None,
    disabling: Sequence[int] = (),
    smooth: int = 1,
    indicator: Mapping | None = None,
    glance: bool = False,
    columns: int = 4,
    y_domains: Mapping[str, tuple[float, float]] | None = None,
) -> alt.TopLevelMixin:
    """One run's curves as small multiples in their own units (log scale where the curve's spec
    reads log values), each panel shaded with the detected phases: the onset's 95 % interval,
    onset to collapse, an early fall (from the first edit to where it ends), and the disabling
    edits (a rug of ticks along the panel's foot).

    Curves: every curve the onset detector reads (CurveSpec.phases), or with `glance` only the
    CurveSpec.glance ones, in one row (a run's row of the study overview). `phase` holds onset_k,
    ci_low, ci_high, collapse_k (a row of the phases table, curve = "combined") and, where one was
    found, early_fall_k and early_fall_share (the combined early fall's row); `disabling` the
    flagged edit indices; `indicator` the summary's leading_indicator / indicator_lead. The
    title names the onset, its interval, the collapse and the first indicator to move.
    `y_domains` (curve name -> (lo, hi)) fixes a panel's y range (the study overview: one per
    curve across runs, so rows compare).
    """
    title = phase_title(run, phase, indicator)
    panels_data = overview_curves(tables, run, smooth=smooth, glance=glance)
    n_edits = max((int(df["edit"].max()) for *_, df in panels_data), default=0)
    if not panels_data:
        return no_data(title)
    color = method_colors([method := _run_method(tables, run)])[method]
    onset, fall = (phase or {}).get("onset_k"), (phase or {}).get("early_fall_k")
    marks = []
    if _finite(fall):  # the fast first fall: from the first edit to where it ends
        marks.append(("early fall", 0.0, float(fall)))
    if _finite(onset):
        lo = phase.get("ci_low") if _finite(phase.get("ci_low")) else onset
        hi = phase.get("ci_high") if _finite(phase.get("ci_high")) else onset
        end = phase.get("collapse_k") if _finite(phase.get("collapse_k")) else n_edits
        marks.append(("onset 95 % interval", float(lo), float(hi)))
        marks.append(("onset to collapse", float(onset), float(max(end, onset))))
    marks += [("disabling edit", float(j), float(j)) for j in disabling]
    shade = pl.DataFrame({"mark": [m[0] for m in marks], "start": [m[1] for m in marks], "end": [m[2] for m in marks]},
                         schema={"mark": pl.Utf8, "start": pl.Float64, "end": pl.Float64})
    checkpoints = [k for *_, per_edit, df in panels_data if not per_edit for k in df["edit"].to_list()]
    x_scale, ticks, x_note = edit_scale(checkpoints, n_edits)
    legend = alt.Color("mark:N", title="phase", scale=alt.Scale(domain=list(PHASE_MARKS), range=list(PHASE_MARKS.values())),
                       legend=alt.Legend(orient="bottom", direction="horizontal", **LEGEND) if glance else alt.Legend(**LEGEND))
    width, height, font = (GLANCE_WIDTH, GLANCE_HEIGHT, 10) if glance else (PANEL_WIDTH, PANEL_HEIGHT, 11)
    mark_tip = ["mark:N", alt.Tooltip("start:Q", format=",.0f"), alt.Tooltip("end:Q", format=",.0f")]
    panels = []
    for name, label, note, log_y, _, df in panels_data:
        layers = []
        if shade.height:
            regions, rules = shade.filter(pl.col("mark") != "disabling edit"), shade.filter(pl.col("mark") == "disabling edit")
            if regions.height:
                layers.append(alt.Chart(regions).mark_rect(opacity=0.25).encode(x=edits_x("start", "edits", ticks, scale=x_scale), x2="end:Q", color=legend, tooltip=mark_tip))
            if rules.height:  # a rug along the panel's foot: a long chain flags hundreds, which full-height rules would hide the curve under
                layers.append(alt.Chart(rules).mark_rule(opacity=0.6).encode(
                    x=edits_x("start", "edits", ticks, scale=x_scale), y=alt.value(height - DISABLING_RUG_PX), y2=alt.value(height),
                    color=legend, tooltip=mark_tip))
        domain = {"domain": list(y_domains[name])} if name in (y_domains or {}) else {}
        y = alt.Y("value:Q", title=None, scale=alt.Scale(type="log", nice=False, **domain) if log_y else alt.Scale(zero=False, **domain))
        layers.append(alt.Chart(df).mark_line(color=color, point=alt.OverlayMarkDef(color=color, size=12) if df.height <= 60 else False).encode(
            x=edits_x("edit", "edits", ticks, scale=x_scale), y=y, tooltip=[alt.Tooltip("edit:Q", format=",d"), alt.Tooltip("value:Q", title=label, format=".4g")]))
        notes = [n for n in (note, "log scale" if log_y else "") if n]
        panel_title = alt.TitleParams(label, fontSize=font, limit=0, subtitle="; ".join(notes) if notes else "", subtitleFontSize=font - 1)
        panels.append(alt.layer(*layers).properties(width=width, height=height, title=panel_title))
    cols = len(panels) if glance else columns
    head = alt.TitleParams(title, anchor="start", limit=0, subtitle=[f"method: {method}" + (f"; {x_note}" if x_note else "")],
                           fontSize=font + 2 if glance else 13)
    return alt.concat(*panels, columns=cols, spacing=12 if glance else 20).properties(title=head)


def study_overview_chart(tables: Mapping[str, pl.DataFrame], runs: Sequence[str], *, phases: Mapping[str, Mapping], disabling: Mapping[str, Sequence[int]],
                         smooth: int = 1, indicators: Mapping[str, Mapping] | None = None) -> alt.TopLevelMixin:
    """Every run at a glance: one row per run of its CurveSpec.glance curves, phases shaded, each
    curve on the same y range in every row."""
    ranges: dict[str, list[float]] = {}
    for run in runs:
        for name, *_, df in overview_curves(tables, run, smooth=smooth, glance=True):
            ranges.setdefault(name, []).extend([float(df["value"].min()), float(df["value"].max())])
    domains = {name: (min(v), max(v)) for name, v in ranges.items() if max(v) > min(v)}
    rows = [overview_chart(tables, run, phase=phases.get(run), disabling=disabling.get(run, ()), smooth=smooth,
                           indicator=(indicators or {}).get(run), glance=True, y_domains=domains) for run in runs]
    if not rows:
        return no_data("Phases of every run")
    return alt.vconcat(*rows, spacing=30).properties(title=alt.TitleParams("Phases of every run", anchor="start", fontSize=16))


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
    combined = phases_df.filter(pl.col("curve") == "combined")
    if "shape" not in combined.columns:  # (tables made before early falls hold onsets only)
        combined = combined.with_columns(pl.lit(ph.ONSET).alias("shape"))
    phase = {r["run"]: r for r in combined.filter(pl.col("shape") == ph.ONSET).iter_rows(named=True)}
    for r in combined.filter((pl.col("shape") == ph.EARLY_FALL) & pl.col("accepted")).iter_rows(named=True):
        phase.setdefault(r["run"], {}).update(early_fall_k=r["onset_k"], early_fall_share=r["drop_share"])
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
    html: str = "bundle",
    per_run: bool = True,
) -> list[Path]:
    """Write every figure of the metric registry, then the overview, to `out_dir`; returns the
    files written. `per_run` also writes each run's overview alone as overview_{run}.

    With "html" in `formats`, also FIGURES_PAGE (every figure on one self-contained page: the
    report's interactive figures) and, for html="bundle" pages, VEGA_BUNDLE (save_chart).
    """
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
    charts["overview"] = study_overview_chart(tables, runs, phases=phase, disabling=dis, smooth=options.smooth, indicators=leads)
    if per_run:
        for run, chart in overviews.items():
            charts[f"overview_{safe_name(run)}"] = chart
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if "html" in formats and html == "bundle":
        written.append(write_vega_bundle(out_dir))
    for name, chart in charts.items():
        paths = save_chart(chart, out_dir / name, formats, html=html)
        log.info("wrote %s", ", ".join(str(p) for p in paths))
        written += paths
    if "html" in formats:
        # the study overview first: the report's interactive figures open on the phases of every run
        order = ["overview", *(n for n in charts if n != "overview")]
        written.append(write_figures_page({n: charts[n] for n in order}, out_dir / FIGURES_PAGE, "editscale study: every figure"))
        log.info("wrote %s", written[-1])
    return written
