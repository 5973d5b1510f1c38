"""The registry of metrics: each entry carries what the workflow, the CLI and the report need.

A metric is evaluated per checkpoint k of a run by one `editscale <verb>` job that writes
results/{run}/metrics/{name}/{k:06d}.parquet (columns k, item, metric, value [, edit_index]).
The rules of rules/evaluate.smk, the report's tables and the schema's metric sections are made
from this registry; a plugin adds a metric with `register_metric(Metric(...))` (its `schema`
fragment becomes metrics.<name> of the config schema, its `add_verb` adds the sub-command).

Inputs a metric job may declare (`inputs`), each a file set the rule passes:
  state            the files that define the model after k edits (delta, or delta + factors)
  edits            the run's edit sequence
  heldout          the held-out token sample of the run's corpus      -> --tokens PATH
  factors_upto     the factors of every segment up to k (edit log)     -> --factors PATHS
  segment_factors  the factors of the segment ending at k (grid "segments") -> --segment N
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..io import EditscaleError


@dataclass(frozen=True)
class Metric:
    name: str
    verb: str
    description: str
    grid: str = "eval_every"  # "eval_every": the section's eval_every grid; "segments": every segment end
    inputs: tuple[str, ...] = ("state", "edits")
    device: bool = True  # the job runs the model (GPU resources, --device)
    table: str = "long"  # report table: "long" (tidy) or "wide" (one row per edit, edit_scores)
    curves: Mapping[str, bool] = field(default_factory=dict)  # metric -> higher is better
    schema: dict | None = None  # plugins: the JSON-schema of metrics.<name> (built-ins: schema.yaml)
    add_verb: Callable | None = None  # plugins: add_verb(subparsers) registers the sub-command
    rule: str = ""  # Snakemake rule name (default metric_<name>)

    @property
    def rule_name(self) -> str:
        return self.rule or f"metric_{self.name}"


METRICS: dict[str, Metric] = {}
INPUT_KINDS = ("state", "edits", "heldout", "factors_upto", "segment_factors")


def register_metric(metric: Metric) -> None:
    """Add a metric; a name already taken by another definition is an error."""
    old = METRICS.get(metric.name)
    if old is not None and old != metric:
        raise EditscaleError(f"metric {metric.name!r} is already registered; pick another name")
    bad = [k for k in metric.inputs if k not in INPUT_KINDS]
    if bad or metric.grid not in ("eval_every", "segments"):
        raise EditscaleError(f"metric {metric.name!r}: inputs {bad} / grid {metric.grid!r} unknown (inputs: {INPUT_KINDS}; grid: eval_every | segments)")
    if old is None and metric.schema is not None and "eval_every" not in (metric.schema.get("properties") or {}) and metric.grid == "eval_every":
        raise EditscaleError(f"metric {metric.name!r}: its schema must define eval_every (the checkpoint grid)")
    METRICS[metric.name] = metric


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise EditscaleError(f"unknown metric {name!r}; registered: {sorted(METRICS)}")
    return METRICS[name]


for _m in (
    Metric("edit_scores", "score-edits", "efficacy / paraphrase / neighborhood of each edit right after it",
           grid="segments", inputs=("state", "segment_factors", "edits"), table="wide", rule="edit_scores",
           curves={"es": True, "ps": True, "ns": True, "score": True}),
    Metric("history", "history", "re-scores every earlier edit at checkpoint k (forgetting)", curves={"es": True, "ps": True}),
    Metric("downstream", "downstream", "few-shot downstream tasks and offline probes", curves={"f1": True, "accuracy_ll": True}),
    Metric("generation", "generation", "n-gram entropy of sampled continuations (fluency)", curves={"entropy": True}),
    Metric("perplexity", "perplexity", "perplexity on the held-out token sample", inputs=("state", "heldout"), curves={"perplexity": False}),
    Metric("weights", "weights", "drift of the edited matrices and update-norm outliers", inputs=("state", "factors_upto"),
           device=False, curves={"fro": False}),
):
    register_metric(_m)
