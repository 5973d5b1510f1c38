"""The registry of metrics: each entry carries what the workflow, the CLI and the report need.

A metric is a function of a checkpoint: `compute(checkpoint, cfg) -> polars.DataFrame`, the long
table (columns k, item, metric, value [, edit_index]) of results/{run}/metrics/{name}/{k:06d}.parquet.
`checkpoint` (editscale.evaluate.job.Checkpoint) hands it lazily what it declared: the replayed
model and tokenizer, the edit cases, the unedited model's readings, its input files; `cfg` is
its config section (metrics.<name>) as a typed object. One generic job (editscale.evaluate.job)
parses the arguments, computes the evaluation key, records provenance and writes the file; no
metric parses arguments or writes files.

The built-in metrics are the modules of `editscale.evaluate.metrics`, each registering itself
with `@metric(...)` on its compute function; a plugin does the same in its own module (its
`schema` fragment becomes metrics.<name> of the config schema). Adding a built-in metric is its
module plus its section in schema.yaml.

Inputs a metric may declare (`inputs`), each a file set the rule hands the job:
  state            the files that define the model after k edits: model manifest, run.json,
                   the checkpoint delta and/or the factors of k's segment  -> --state PATHS
  edits            the run's edit sequence                                -> --edits PATH
  heldout          the held-out token sample of the run's corpus          -> --tokens PATH
  factors_upto     the factors of every segment up to k (edit log)        -> --factors PATHS
  segment_factors  the segment ending at k (grid "segments"): the delta it starts from and its
                   factors                                                -> --segment-files PATHS
  data             the data files the metric's config section names (its `data_files`, e.g.
                   downstream's task files): inputs of the job and part of its evaluation key,
                   so that a changed file re-runs it and a missing one fails at `snakemake -n`
                                                                          -> --data PATHS

What the report makes of a metric is declared here too: its `curves` (CurveSpec: the per-run
curves the phase detector, the disabling-edit criterion, the summary's *_at_N columns and the
overview figure read) and its `figures` (file stem -> "module:function", each function called as
fn(tables, options) with options an editscale.report.plots.FigureOptions); doctor's estimate
reads its `cost` (cost(run, section, corpus, flops_per_token, k) -> (model FLOPs, decode FLOPs));
`snakemake -n` calls its `check_cases` on each run's edit cases (editscale.workflow.check_sequence_lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..io import EditscaleError
from ..registry import Registry


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
    per_item: bool = False  # the detector also reads each item's own curve (a task's), named {name}[{item}]
    joint: str = ""  # joint-drop role of the disabling-edit criterion; curves sharing a role are alternatives (first present wins)
    summary: str = ""  # summary column stem ({summary}_at_{count}); "" = not in the summary
    indicator: bool = False  # a collapse indicator: the summary names the one whose onset came first and its lead
    compare: bool = False  # `editscale compare` / results.compare show its summary columns beside ES / PS / NS
    glance: bool = False  # a panel of the study overview (every run at a glance, the report's first figure)


@dataclass(frozen=True)
class Metric:
    name: str
    compute: str | Callable  # compute(checkpoint, cfg) -> polars.DataFrame, or its "module:function"
    description: str
    grid: str = "eval_every"  # "eval_every": the section's eval_every grid; "segments": every segment end
    inputs: tuple[str, ...] = ("state", "edits")
    device: bool = True  # the job runs the model (GPU resources, --device)
    table: str = "long"  # report table: "long" (tidy) or "wide" (one row per edit, edit_scores)
    curves: tuple[CurveSpec, ...] = ()  # what the report reads from this metric (CurveSpec)
    figures: Mapping[str, str] = field(default_factory=dict)  # figure stem -> "module:function"
    schema: dict | None = None  # plugins: the JSON-schema of metrics.<name> (built-ins: schema.yaml)
    cost: str | Callable | None = None  # doctor's cost model (module doc); None = not estimated
    # plan time: check_cases(section, run, cases) raises EditscaleError when the metric cannot read
    # a run's edit cases (the first n_edits of its sequence), before any edit runs
    check_cases: str | Callable | None = None
    # data_files(section) -> [(config key, path, how to get it)]: the files its config names (input `data`)
    data_files: str | Callable | None = None
    extra: str = ""  # the editscale pip extra its imports need: `--use-conda` environments install it
    rule: str = ""  # Snakemake rule name (default metric_<name>)
    verb: str = ""  # its `editscale` sub-command (default: the name, "_" -> "-")
    order: int = 100  # position among the metrics: report columns, the checkpoint job's order

    @property
    def rule_name(self) -> str:
        return self.rule or f"metric_{self.name}"

    @property
    def command(self) -> str:
        return self.verb or self.name.replace("_", "-")

    def refs(self) -> list[str]:
        """Its lazy `module:function` references (checked when a plugin loads)."""
        return [r for r in (self.compute, self.cost, self.check_cases, self.data_files, *self.figures.values()) if isinstance(r, str)]


# input kind -> the command-line flag that hands its files to the job (module docstring)
INPUT_KINDS = {"state": "--state", "edits": "--edits", "heldout": "--tokens", "factors_upto": "--factors", "segment_factors": "--segment-files",
               "data": "--data"}
MULTI_FILE_KINDS = ("state", "factors_upto", "segment_factors", "data")  # the others are one file each
OPTIONAL_KINDS = ("factors_upto", "data")  # may hand over no file


def _checked(entry: Metric) -> Metric:
    bad = [k for k in entry.inputs if k not in INPUT_KINDS]
    if bad or entry.grid not in ("eval_every", "segments"):
        raise EditscaleError(f"metric {entry.name!r}: inputs {bad} / grid {entry.grid!r} unknown (inputs: {list(INPUT_KINDS)}; grid: eval_every | segments)")
    if ("data" in entry.inputs) != (entry.data_files is not None):
        raise EditscaleError(f"metric {entry.name!r}: input `data` and `data_files` go together (the files of input `data` are those data_files names)")
    if entry.schema is not None and "eval_every" not in (entry.schema.get("properties") or {}) and entry.grid == "eval_every":
        raise EditscaleError(f"metric {entry.name!r}: its schema must define eval_every (the checkpoint grid)")
    return entry


METRICS: Registry[Metric] = Registry(
    "metric", refs=Metric.refs, entry_points="editscale.metrics",
    from_entry_point=lambda name, obj: obj if isinstance(obj, Metric) else None,
    make=lambda name, compute, **meta: _checked(Metric(name, compute, **meta)),
    builtins="editscale.evaluate.metrics", order=lambda m: m.order,
)


def metric(name: str, description: str, **metadata) -> Callable:
    """Decorator registering `compute(checkpoint, cfg)` as metric `name` (Metric's fields as keywords)."""
    return METRICS.register(name, description=description, **metadata)


def register_metric(entry: Metric) -> None:
    """Add a Metric; a name already taken by another definition is an error."""
    METRICS.add(entry.name, _checked(entry))


def curve_specs() -> list[tuple[Metric, CurveSpec]]:
    """Every curve of every registered metric, in registry order."""
    return [(m, c) for m in METRICS.values() for c in m.curves]


def figure_stems() -> list[str]:
    """The report's figure files: every metric's figures, then the per-run overview."""
    return [stem for m in METRICS.values() for stem in m.figures] + ["overview"]


def get_metric(name: str) -> Metric:
    return METRICS[name]
