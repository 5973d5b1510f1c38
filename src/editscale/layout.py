"""The results layout: where each stored stage output of a run lives, in one place.

    results/{run}/run.json                     the run record (editscale.workflow.run_record)
    results/{run}/edits.jsonl                  the edit sequence
    results/{run}/deltas/{k:06d}.h5            cumulative dense delta after k edits (a segment end)
    results/{run}/factors/{k:06d}.h5           the low-rank updates of the segment ending at k
    results/{run}/metrics/{metric}/{k:06d}.parquet
    results/studies/{study}/tables/            a study's (a config's) report tables ...
    results/studies/{study}/plots/             ... its figures ({figure}.png / .svg / .html; FIGURES_PAGE:
                                               every figure on one page; VEGA_BUNDLE: the pages' script)
    results/studies/{study}/audit.json         ... its audit's report (a failed one: audit.failed.json)
    results/records/{run}.record.tar.xz        a finished run's packed record (editscale.merge; the
                                               run_record rule, a target outside `all`)
    results/config/metrics/{metric}/{digest}.json  a checkpoint metric's config section, named by
                                               its content (metric_config_path)

The workflow plans these paths (editscale.workflow, for the rules); the commands are handed them
as their rule's inputs and resolve a checkpoint's files with `StateFiles`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .io import EditscaleError

RESULTS = Path("results")
DEFAULT_STUDY = "default"  # the study of config.yaml
FIGURES_PAGE = "figures.html"  # in a plots folder: every figure on one page (editscale.report.plots.make_plots)
VEGA_BUNDLE = "vega-embed.js"  # in a plots folder: vega, vega-lite and vega-embed, loaded by each figure's page


def study_dir(study: str) -> Path:
    """Where a study's report tables, figures, audit and report go (runs stay in results/{run})."""
    return RESULTS / "studies" / study


def study_name(config_file: str | Path) -> str:
    """A config's default study name: its file name without the suffix (config.yaml: default)."""
    stem = Path(config_file).stem
    return DEFAULT_STUDY if stem == "config" else stem


def run_dir(run: str) -> Path:
    return RESULTS / run


RECORD_SUFFIX = ".record.tar.xz"  # a packed run record (editscale.merge.pack_record)


def record_path(run: str) -> Path:
    """Where the workflow writes a finished run's packed record (`editscale export-run --pack`)."""
    return RESULTS / "records" / f"{run}{RECORD_SUFFIX}"


def metric_section_text(params: dict) -> str:
    """A checkpoint metric's config section as its file holds it (rule metric_config)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def metric_config_path(metric: str, params: dict) -> Path:
    """The file of a metric's config section, the input of the checkpoint jobs that evaluate it.

    Named by its content, not by the metric alone: configs that share a results directory but set
    a metric differently (methods.yaml's history samples every edit, long.yaml 500) each have their
    own file. One file per metric made each config's run re-plan the other's checkpoint jobs, and
    two configs evaluated at once could read each other's section."""
    digest = hashlib.sha256(metric_section_text(params).encode()).hexdigest()[:16]
    return RESULTS / "config" / "metrics" / metric / f"{digest}.json"


def delta_path(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / "deltas" / f"{k:06d}.h5"


def factors_path(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / "factors" / f"{k:06d}.h5"


def metric_path(run_dir: str | Path, metric: str, k: int) -> Path:
    return Path(run_dir) / "metrics" / metric / f"{k:06d}.parquet"


def stats_path(model: str, corpus: str, module: str) -> Path:
    """The second moment E[k k^T] of a module's inputs over a corpus."""
    return RESULTS / "stats" / model / corpus / f"{module}.h5"


def projection_path(model: str, corpus: str, module: str, threshold, rule: str = "eigh64") -> Path:
    """AlphaEdit's null-space projection computed from stats_path(model, corpus, module) by `rule`
    (editscale.stats.mom2.PROJECTION_RULES; the default's folder is nullspace/, another rule's
    nullspace-<rule>/)."""
    folder = "nullspace" if rule == "eigh64" else f"nullspace-{rule}"
    return RESULTS / "stats" / model / corpus / folder / f"{module}.t{threshold}.h5"


def segment_start(k: int, segment: int) -> int:
    """The checkpoint at or before edit count k (0: the base model)."""
    return (k // segment) * segment


def find_declared(paths: Iterable[str | Path], rel: Path | None, what: str) -> Path | None:
    """The one file among `paths` whose last two parts are those of `rel` (deltas/000004.h5)."""
    if rel is None:
        return None
    paths = [Path(p) for p in paths]
    hits = [p for p in paths if p.parent.name == rel.parent.name and p.name == rel.name]
    if len(hits) != 1:
        raise EditscaleError(f"{what} needs {rel.parent.name}/{rel.name} among the given files ({', '.join(map(str, paths)) or 'none'})")
    return hits[0]


def segment_files(paths: Iterable[str | Path], k_end: int, segment: int) -> tuple[Path | None, Path]:
    """(delta the segment starts from, or None for the first; its factors) of the segment ending
    at k_end, among declared files."""
    what = f"the segment ending at edit {k_end}"
    start = k_end - segment
    return (find_declared(paths, delta_path(".", start), what) if start > 0 else None,
            find_declared(paths, factors_path(".", k_end), what))


@dataclass(frozen=True)
class StateFiles:
    """The stored files that define a run's model after k edits: the delta of the checkpoint at
    or before k (none at 0), and, when k falls inside a segment, the factors of that segment
    (replayed up to edit k)."""

    k: int
    segment: int
    delta: Path | None
    factors: Path | None

    @classmethod
    def in_run(cls, run_dir: str | Path, k: int, segment: int) -> "StateFiles":
        """By the layout's names, in a run directory."""
        if k < 0:
            raise EditscaleError(f"edit count {k} must be >= 0")
        start = segment_start(k, segment)
        return cls(k, segment, delta_path(run_dir, start) if start else None,
                   factors_path(run_dir, start + segment) if k != start else None)

    @classmethod
    def among(cls, paths: Iterable[str | Path], k: int, segment: int) -> "StateFiles":
        """From the files a rule declared (and nothing else): the ones checkpoint k needs, found
        by their layout names; one that is missing is an error naming it."""
        want = cls.in_run(Path("."), k, segment)
        what = f"the state after {k} edits"
        return cls(k, segment, find_declared(paths, want.delta, what), find_declared(paths, want.factors, what))

    @classmethod
    def unedited(cls) -> "StateFiles":
        """The base model (no file)."""
        return cls(0, 1, None, None)

    def files(self) -> list[Path]:
        return [p for p in (self.delta, self.factors) if p is not None]


@dataclass(frozen=True)
class SegmentFiles:
    """What one segment of the edit chain (edits k_end - segment + 1 .. k_end) reads and writes:
    the edit sequence, the previous checkpoint's delta and factors (none for the first segment),
    and the delta and factors it writes."""

    k_end: int
    segment: int
    edits: Path
    previous_delta: Path | None
    previous_factors: Path | None
    delta: Path
    factors: Path

    @property
    def k_start(self) -> int:
        return self.k_end - self.segment

    @classmethod
    def in_run(cls, run_dir: str | Path, k_end: int, segment: int) -> "SegmentFiles":
        """By the layout's names, in a run directory."""
        start = k_end - segment
        return cls(k_end, segment, Path(run_dir) / "edits.jsonl", delta_path(run_dir, start) if start > 0 else None,
                   factors_path(run_dir, start) if start > 0 else None, delta_path(run_dir, k_end), factors_path(run_dir, k_end))

    @classmethod
    def declared(cls, k_end: int, segment: int, edits: str | Path, previous: Iterable[str | Path], delta: str | Path,
                 factors: str | Path) -> "SegmentFiles":
        """From the files a rule declared: the previous checkpoint found among `previous`."""
        start = k_end - segment
        what = f"the segment ending at edit {k_end}"
        prev_delta = find_declared(previous, delta_path(".", start), what) if start > 0 else None
        prev_factors = find_declared(previous, factors_path(".", start), what) if start > 0 else None
        return cls(k_end, segment, Path(edits), prev_delta, prev_factors, Path(delta), Path(factors))
