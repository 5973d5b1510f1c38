"""The results API: a finished study's tables, for notebooks and for `editscale compare`.

    from editscale import results
    res = results.load("results")          # results/studies/<study>/tables/*.parquet + results/{run}/run.json
                                           # (study="methods" picks one of several)
    res.names                              # ['disabling_edits', 'downstream', ..., 'summary']
    res["history"]                         # a tidy polars table, each run's resolved config joined
    res.pandas("summary")                  # the same as a pandas DataFrame (pip install editscale[pandas])
    res.compare(["rome-smollm2-geofacts-s0"], at=[100, "end"])

`load` reads what the report stage wrote: the tables of `results/studies/<study>/tables` (parquet
files; the csv copies are not read) and, for every run in the summary table, its run record
`results/{run}/run.json` (the resolved run config: method, hparams file and values, segment,
seed, config hash). `runs` holds one row per run: the record's scalar keys as columns, and each
hparam as `hp.<key>`, typed (integers, floats, booleans; lists and keys whose type differs between
runs as JSON text). Indexing a table joins those columns on `run` (columns the table already has
are not repeated).
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


def _column(values: list) -> pl.Series:
    """A `runs` column typed by its values: Boolean, Int64, Float64 (integers and floats mixed),
    else text (a value of another type, or types that differ between runs)."""
    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if kinds and kinds <= {bool}:
        return pl.Series(values, dtype=pl.Boolean)
    if kinds and kinds <= {int}:
        return pl.Series(values, dtype=pl.Int64)
    if kinds and kinds <= {int, float}:
        return pl.Series([None if v is None else float(v) for v in values], dtype=pl.Float64)
    return pl.Series([None if v is None else str(v) for v in values], dtype=pl.Utf8)


def runs_frame(records: dict[str, dict]) -> pl.DataFrame:
    """One row per run from the run records (see the module docstring), each column typed by its
    values (`_column`), so that runs of different methods (different hparams, different types) stack."""
    rows = []
    for run, rec in records.items():
        row = {"run": run}
        row.update({k: _cell(v) for k, v in rec.items() if k not in _RECORD_SKIP})
        row.update({f"hp.{k}": _cell(v) for k, v in (rec.get("hparams") or {}).items()})
        row["hparams_overrides"] = json.dumps(rec.get("hparams_overrides") or {}, sort_keys=True)
        rows.append(row)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return pl.DataFrame([_column([r.get(c) for r in rows]).alias(c) for c in cols]) if cols else pl.DataFrame({"run": []}, schema={"run": pl.Utf8})


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

    def compare(self, runs: Sequence[str] | None = None, at: Sequence[int | str] = ("end",), window: int | None = None) -> pl.DataFrame:
        """The comparison table of `editscale compare`; see `compare_table`."""
        return compare_table(self, runs, at, window)

    def __repr__(self) -> str:
        runs = self.tables["summary"]["run"].to_list() if "summary" in self.tables else []
        shown = ", ".join(runs[:4]) + (f", ... {len(runs) - 4} more" if len(runs) > 4 else "")
        return f"Results({str(self.root)!r}: {len(runs)} run(s) [{shown}]; tables {self.names}; runs' config: .runs, {self.runs.width} columns)"


def tables_dir(root: Path, study: str | None) -> Path:
    """Where `load` reads a study's tables: root/studies/<study>/tables; without a study, a merge
    output's root/tables, else the only study's, else the default study's."""
    from ..layout import DEFAULT_STUDY

    if study is None and (root / "tables").is_dir():
        return root / "tables"
    studies = sorted(p.name for p in (root / "studies").iterdir() if (p / "tables").is_dir()) if (root / "studies").is_dir() else []
    if study is None:
        study = studies[0] if len(studies) == 1 else DEFAULT_STUDY
        if len(studies) > 1 and DEFAULT_STUDY not in studies:
            raise EditscaleError(f"{root} holds the tables of several studies ({', '.join(studies)}): name one (study=..., --study)")
    return root / "studies" / study / "tables"


def load(root: str | os.PathLike = "results", tables: Iterable[str] | None = None, study: str | None = None) -> Results:
    """The tables of a study (a config: results/studies/<study>/tables) and its runs' resolved
    configs (module docstring)."""
    root = Path(root)
    tdir = tables_dir(root, study)
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


def compare_table(res: Results, runs: Sequence[str] | None = None, at: Sequence[int | str] = ("end",),
                  window: int | None = None) -> pl.DataFrame:
    """One row per chosen run (default: all): method, model, n_edits, the combined onset with its
    interval, the early fall, the leading collapse indicator and its lead, ES / PS / NS at each count of `at`
    (the summary's window means; "end" or any edit count the run has reached: a count that is not
    a summary column is computed from the tables as the summary computes its columns, over the last
    `window` edits, report.window's default unless given), beside them the summary columns of every
    curve marked `compare` in the metric registry that the study has (e.g. metric answers'
    generated gen_es / gen_ps / gen_port), retention of earlier edits at the end, and the
    perplexity ratio (last checkpoint / unedited)."""
    from ..evaluate.registry import curve_specs
    from .tables import _REPORT, _curves_at

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
        row["early_fall"] = s.get("early_fall") or ""  # where a fast first fall ends (tables before it: empty)
        row["first_to_fall"] = s.get("first_to_fall") or ""  # the task whose own curve broke first
        row["leading_indicator"] = s.get("leading_indicator") or ""
        row["indicator_lead"] = s.get("indicator_lead")
        for label in labels:
            if window is None and f"es_at_{label}" in summary.columns:
                values = s
            else:  # a count the summary has no column for, or another window: from the tables, as the summary computes it
                done = s.get("edits_done")
                count = done if label == "end" else int(label)
                if done is None or count > int(done):
                    raise EditscaleError(f"--at {label}: run {run} has reached {done} edits; counts: any edit count up to that, or 'end'")
                values = _curves_at(res.tables, run, [(label, int(count))], window or _REPORT["window"])
            for col in [f"{q}_at_{label}" for q in PROFICIENCY] + [f"{stem}_at_{label}" for stem in extra]:
                if col in values or col.split("_at_")[0] in PROFICIENCY:
                    row[col] = values.get(col)
        row["retention_at_end"] = s.get("retention_at_end")
        row["perplexity_ratio"] = _perplexity_ratio(res, run)
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None)


def _fmt(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_markdown(df: pl.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table, numbers right-aligned."""
    align = ["---:" if dt.is_numeric() else "---" for dt in df.dtypes]
    rows = [[_fmt(v, digits).replace("|", "\\|") for v in r] for r in df.iter_rows()]
    return "\n".join("| " + " | ".join(r) + " |" for r in [df.columns, align, *rows])


def format_latex(df: pl.DataFrame, digits: int = 3) -> str:
    """A LaTeX tabular (booktabs rules), special characters escaped, numbers right-aligned."""
    def esc(text: str) -> str:
        for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"),
                           ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
            text = text.replace(char, repl)
        return text

    spec = "".join("r" if dt.is_numeric() else "l" for dt in df.dtypes)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(esc(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(_fmt(v, digits)) for v in r) + r" \\" for r in df.iter_rows()]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"])


def format_table(df: pl.DataFrame, digits: int = 3) -> str:
    """Aligned plain text: a header, a rule, one line per row; numbers right-aligned."""
    cells = [[_fmt(v, digits) for v in r] for r in df.iter_rows()]
    numeric = [dt.is_numeric() for dt in df.dtypes]
    width = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, width, numeric)).rstrip()
    return "\n".join([line(df.columns), line(["-" * w for w in width]), *(line(r) for r in cells)])
