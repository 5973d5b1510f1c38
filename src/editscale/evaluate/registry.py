"""The registry of metrics: each entry carries what the workflow, the CLI and the report need.

A metric is evaluated per checkpoint k of a run by one `editscale <verb>` job that writes
results/{run}/metrics/{name}/{k:06d}.parquet (columns k, item, metric, value [, edit_index]).
The rules of rules/evaluate.smk, the report's tables and the schema's metric sections are made
from this registry; a plugin adds a metric with `register_metric(Metric(...))` (its `schema`
fragment becomes metrics.<name> of the config schema, its `add_verb` adds the sub-command).

Inputs a metric job may declare (`inputs`), each a file set the rule hands its command:
  state            the files that define the model after k edits: model manifest, run.json,
                   the checkpoint delta and/or the factors of k's segment  -> --state PATHS
  edits            the run's edit sequence                                -> --edits PATH
  heldout          the held-out token sample of the run's corpus          -> --tokens PATH
  factors_upto     the factors of every segment up to k (edit log)        -> --factors PATHS
  segment_factors  the segment ending at k (grid "segments"): the delta it starts from and its
                   factors                                                -> --segment-files PATHS

What the report makes of a metric is declared here too: its `curves` (CurveSpec: the per-run
curves the phase detector, the disabling-edit criterion, the summary's *_at_N columns and the
overview figure read) and its `figures` (file stem -> "module:function", each function called as
fn(tables, options) with options an editscale.report.plots.FigureOptions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..io import EditscaleError


@dataclass(frozen=True)
class CurveSpec:
    """One curve per run that a metric yields: at each checkpoint (or each edit, `per_edit`), the
    mean over items of one reading.

    `reading` is a `metric` value of the metric's long table, or a column of a wide table (the
    metric's own when `table` is "", else the named derived report table, e.g. "forgetting").
    """

    name: str  # the curve's name: phases table, report.decision_curves, overview legend key
    reading: str
    higher_is_better: bool = True
    label: str = ""  # overview legend
    table: str = ""  # report table read ("" = the metric's own)
    per_edit: bool = False  # x = edit index: the summary averages a window of edits, the overview smooths it
    log: bool = False  # the phase detector and the overview read log(value)
    phases: bool = True  # onset detection runs on this curve
    joint: str = ""  # joint-drop role of the disabling-edit criterion; curves sharing a role are alternatives (first present wins)
    summary: str = ""  # summary column stem ({summary}_at_{count}); "" = not in the summary
    indicator: bool = False  # a collapse indicator: the summary names the one whose onset came first and its lead


@dataclass(frozen=True)
class Metric:
    name: str
    verb: str
    description: str
    grid: str = "eval_every"  # "eval_every": the section's eval_every grid; "segments": every segment end
    inputs: tuple[str, ...] = ("state", "edits")
    device: bool = True  # the job runs the model (GPU resources, --device)
    table: str = "long"  # report table: "long" (tidy) or "wide" (one row per edit, edit_scores)
    curves: tuple[CurveSpec, ...] = ()  # what the report reads from this metric (CurveSpec)
    figures: Mapping[str, str] = field(default_factory=dict)  # figure stem -> "module:function"
    schema: dict | None = None  # plugins: the JSON-schema of metrics.<name> (built-ins: schema.yaml)
    add_verb: Callable | None = None  # plugins: add_verb(subparsers) registers the sub-command
    cost: str = ""  # doctor's cost model, "module:function" (editscale.planning's signature); "" = not estimated
    rule: str = ""  # Snakemake rule name (default metric_<name>)

    @property
    def rule_name(self) -> str:
        return self.rule or f"metric_{self.name}"


METRICS: dict[str, Metric] = {}
# input kind -> the command-line flag that hands its files to the command (module docstring)
INPUT_KINDS = {"state": "--state", "edits": "--edits", "heldout": "--tokens", "factors_upto": "--factors", "segment_factors": "--segment-files"}


def register_metric(metric: Metric) -> None:
    """Add a metric; a name already taken by another definition is an error."""
    old = METRICS.get(metric.name)
    if old is not None and old != metric:
        raise EditscaleError(f"metric {metric.name!r} is already registered; pick another name")
    bad = [k for k in metric.inputs if k not in INPUT_KINDS]
    if bad or metric.grid not in ("eval_every", "segments"):
        raise EditscaleError(f"metric {metric.name!r}: inputs {bad} / grid {metric.grid!r} unknown (inputs: {list(INPUT_KINDS)}; grid: eval_every | segments)")
    if old is None and metric.schema is not None and "eval_every" not in (metric.schema.get("properties") or {}) and metric.grid == "eval_every":
        raise EditscaleError(f"metric {metric.name!r}: its schema must define eval_every (the checkpoint grid)")
    METRICS[metric.name] = metric


def curve_specs() -> list[tuple[Metric, CurveSpec]]:
    """Every curve of every registered metric, in registry order."""
    return [(m, c) for m in METRICS.values() for c in m.curves]


def figure_stems() -> list[str]:
    """The report's figure files: every metric's figures, then the per-run overview."""
    return [stem for m in METRICS.values() for stem in m.figures] + ["overview"]


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise EditscaleError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    return METRICS[name]


_PLOTS, _COST = "editscale.report.plots", "editscale.planning"

for _m in (
    Metric("edit_scores", "score-edits", "efficacy / paraphrase / neighborhood of each edit right after it",
           grid="segments", inputs=("state", "segment_factors", "edits"), table="wide", rule="edit_scores",
           curves=(CurveSpec("proficiency", "es", label="ES of the new edit", per_edit=True, summary="es"),
                   *(CurveSpec(q, q, per_edit=True, phases=False, summary=q) for q in ("ps", "ns", "score"))),
           figures={"edit_scores": f"{_PLOTS}:proficiency_chart"}, cost=f"{_COST}:edit_scores_cost"),
    Metric("history", "history", "re-scores every earlier edit at checkpoint k (forgetting)",
           curves=(CurveSpec("efficacy", "retention", label="retention of earlier edits (ES)", table="forgetting", joint="efficacy", summary="retention"),
                   CurveSpec("forgotten_pct", "forgotten_pct", higher_is_better=False, table="forgetting", phases=False, summary="forgotten_pct")),
           figures={"forgetting": f"{_PLOTS}:forgetting_chart"}, cost=f"{_COST}:history_cost"),
    Metric("downstream", "downstream", "few-shot downstream tasks and offline probes",
           curves=(CurveSpec("downstream_f1", "f1", label="downstream F1 (mean over tasks)", joint="downstream", summary="downstream_f1"),
                   CurveSpec("downstream_ll", "accuracy_ll", label="downstream accuracy (log-likelihood)", joint="downstream", summary="downstream_accuracy_ll")),
           figures={"downstream": f"{_PLOTS}:downstream_chart"}, cost=f"{_COST}:downstream_cost"),
    Metric("perplexity", "perplexity", "perplexity on the held-out token sample", inputs=("state", "heldout"),
           curves=(CurveSpec("perplexity", "perplexity", higher_is_better=False, label="log perplexity", log=True, summary="perplexity", indicator=True),), cost=f"{_COST}:perplexity_cost"),
    Metric("generation", "generation", "n-gram entropy of sampled continuations (fluency)",
           curves=(CurveSpec("fluency", "ngram_entropy", label="generation n-gram entropy", joint="fluency", summary="ngram_entropy"),), cost=f"{_COST}:generation_cost"),
    Metric("weights", "weights", "drift of the edited matrices, collapse indicators and update-norm outliers", inputs=("state", "factors_upto"),
           device=False,
           curves=(CurveSpec("weight_norm", "weight_fro", higher_is_better=False, label="||W_k||_F (mean over edited matrices)", log=True, summary="weight_fro", indicator=True),
                   CurveSpec("condition_number", "cond", higher_is_better=False, label="condition number of W_k", log=True, summary="cond", indicator=True),
                   CurveSpec("top_singular_value", "sv_1", higher_is_better=False, label="largest singular value of W_k", log=True, indicator=True),
                   CurveSpec("hyperspherical_energy", "hyperspherical_energy", higher_is_better=False, label="hyperspherical energy of W_k's rows", summary="hyperspherical_energy", indicator=True),
                   CurveSpec("v_norm", "v_norm_recent", higher_is_better=False, label="||v*|| (median of recent edits)", log=True, summary="v_norm", indicator=True)), figures={"weight_distance": f"{_PLOTS}:weights_chart", "update_norms": f"{_PLOTS}:update_norm_chart"}, cost=f"{_COST}:no_model_cost"),
):
    register_metric(_m)
