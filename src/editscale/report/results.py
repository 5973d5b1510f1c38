"""The results API: a finished study's tables, for notebooks and for `editscale compare`.

    from editscale import results
    res = results.load("results")          # results/tables/*.parquet + results/{run}/run.json
    res.names                              # ['disabling_edits', 'downstream', ..., 'summary']
    res["history"]                         # a tidy polars table, each run's resolved config joined
    res.pandas("summary")                  # the same as a pandas DataFrame (pip install editscale[pandas])
    res.compare(["rome-smollm2-geofacts-s0"], at=[100, "end"])

`load` reads what the report stage wrote: the tables of `results/tables` (the report's parquet
files; the csv copies are not read) and, for every run in the summary table, its run record
`results/{run}/run.json` (the resolved run config: method, hparams file and values, segment,
seed, config hash). `runs` holds one row per run: the record's scalar keys as columns, and each
hparam as `hp.<key>` (lists as JSON text). Indexing a table joins those columns on `run`
(columns the table already has are not repeated).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import polars as pl

from ..io import EditscaleError
from .tables import read_tables

# run-record keys that are not columns of `runs`: the hparams are flattened into hp.<key>
_RECORD_SKIP = ("hparams", "hparams_overrides", "name")
PROFICIENCY = ("es", "ps", "ns")


def _cell(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def runs_frame(records: dict[str, dict]) -> pl.DataFrame:
    """One row per run from the run records (see the module docstring); every value is text,
    so that runs of different methods (different hparams, different types) stack."""
    rows = []
    for run, rec in records.items():
        row = {"run": run}
        row.update({k: _cell(v) for k, v in rec.items() if k not in _RECORD_SKIP})
        row.update({f"hp.{k}": _cell(v) for k, v in (rec.get("hparams") or {}).items()})
        row["hparams_overrides"] = json.dumps(rec.get("hparams_overrides") or {}, sort_keys=True)
        rows.append({k: (None if v is None else str(v)) for k, v in row.items()})
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return pl.DataFrame({c: [r.get(c) for r in rows] for c in cols}, schema={c: pl.Utf8 for c in cols})


@dataclass
class Results:
    root: Path
    tables: dict[str, pl.DataFrame]
    runs: pl.DataFrame
    records: dict[str, dict] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.tables)

    def table(self, name: str, join_config: bool = True) -> pl.DataFrame:
        if name not in self.tables:
            raise EditscaleError(f"no report table {name!r} under {self.root / 'tables'}; tables: {self.names}")
        df = self.tables[name]
        if not join_config or "run" not in df.columns or not self.runs.height:
            return df
        extra = [c for c in self.runs.columns if c == "run" or c not in df.columns]
        return df.join(self.runs.select(extra), on="run", how="left")

    __getitem__ = table

    def pandas(self, name: str, join_config: bool = True):
        """The table as a pandas DataFrame (needs pandas and pyarrow: `pip install editscale[pandas]`)."""
        try:
            import pandas  # noqa: F401
        except ModuleNotFoundError as exc:
            raise EditscaleError("the pandas view needs pandas and pyarrow: pip install 'editscale[pandas]'") from exc
        return self.table(name, join_config).to_pandas()

    def compare(self, runs: Sequence[str] | None = None, at: Sequence[int | str] = ("end",)) -> pl.DataFrame:
        """The comparison table of `editscale compare`; see `compare_table`."""
        return compare_table(self, runs, at)


def load(root: str | os.PathLike = "results", tables: Iterable[str] | None = None) -> Results:
    """The tables of a study's results directory and its runs' resolved configs (module docstring)."""
    root = Path(root)
    tdir = root / "tables"
    if not (tdir / "summary.parquet").is_file():
        raise EditscaleError(f"{tdir / 'summary.parquet'} not found: run the study's report first (snakemake --cores all)")
    got = read_tables(tdir, None if tables is None else set(tables) | {"summary"})
    records = {}
    for run in got["summary"]["run"].to_list():
        path = root / run / "run.json"
        if not path.is_file():
            raise EditscaleError(f"run {run!r} is in {tdir / 'summary.parquet'} but its record {path} is missing")
        records[run] = json.loads(path.read_text())
    return Results(root, got, runs_frame(records), records)


def _count_label(c) -> str:
    return "end" if str(c) == "end" else str(int(c))


def _perplexity_ratio(res: Results, run: str) -> float | None:
    """Perplexity at the run's last checkpoint over perplexity of the unedited model (k = 0)."""
    p = res.tables.get("perplexity")
    if p is None or not p.height:
        return None
    p = p.filter((pl.col("run") == run) & (pl.col("metric") == "perplexity"))
    if not p.height or 0 not in p["edit"].to_list():
        return None
    base = float(p.filter(pl.col("edit") == 0)["value"].mean())
    last = float(p.filter(pl.col("edit") == p["edit"].max())["value"].mean())
    return last / base if base > 0 else None


def compare_table(res: Results, runs: Sequence[str] | None = None, at: Sequence[int | str] = ("end",)) -> pl.DataFrame:
    """One row per chosen run (default: all): method, model, n_edits, the combined onset with its
    interval, the leading collapse indicator and its lead, ES / PS / NS at each count of `at`
    (the summary's window means, report.window; a count must be one of the summary's, i.e.
    report.counts up to n_edits, or "end"), beside them the summary columns of every curve marked
    `compare` in the metric registry that the study has (e.g. metric answers' generated gen_es /
    gen_ps / gen_port), retention of earlier edits at the end, and the perplexity ratio (last
    checkpoint / unedited)."""
    from ..evaluate.registry import curve_specs

    extra = [spec.summary for _, spec in curve_specs() if spec.compare and spec.summary]
    summary = res.tables["summary"]
    known = summary["run"].to_list()
    runs = list(runs) if runs else known
    unknown = [r for r in runs if r not in known]
    if unknown:
        raise EditscaleError(f"run(s) {unknown} not in {res.root / 'tables' / 'summary.parquet'}; runs: {known}")
    labels = [_count_label(c) for c in at]
    rows = []
    for run in runs:
        s = summary.filter(pl.col("run") == run).row(0, named=True)
        row = {"run": run, "method": s.get("method"), "model": s.get("model"), "n_edits": s.get("n_edits")}
        lo, hi = s.get("onset_ci_low"), s.get("onset_ci_high")
        row["onset"] = s.get("onset")
        row["onset_ci"] = f"{lo:.0f}-{hi:.0f}" if lo is not None and hi is not None and not math.isnan(lo) and not math.isnan(hi) else ""
        row["leading_indicator"] = s.get("leading_indicator") or ""
        row["indicator_lead"] = s.get("indicator_lead")
        for label in labels:
            for q in PROFICIENCY:
                col = f"{q}_at_{label}"
                if col not in summary.columns:
                    stems = (c[len(f"{q}_at_"):] for c in summary.columns if c.startswith(f"{q}_at_"))
                    have = sorted(s_ for s_ in stems if s_ == "end" or s_.isdigit())
                    raise EditscaleError(f"no {col!r} in the summary: counts there are {have} (report.counts up to n_edits, and 'end')")
                row[col] = s.get(col)
            for stem in extra:
                if f"{stem}_at_{label}" in summary.columns:
                    row[f"{stem}_at_{label}"] = s.get(f"{stem}_at_{label}")
        row["retention_at_end"] = s.get("retention_at_end")
        row["perplexity_ratio"] = _perplexity_ratio(res, run)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def format_table(df: pl.DataFrame, digits: int = 3) -> str:
    """Aligned plain text: a header, a rule, one line per row; numbers right-aligned."""
    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in df.iter_rows()]
    numeric = [dt.is_numeric() for dt in df.dtypes]
    width = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, width, numeric)).rstrip()
    return "\n".join([line(df.columns), line(["-" * w for w in width]), *(line(r) for r in cells)])
