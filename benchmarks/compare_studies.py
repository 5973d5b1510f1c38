"""Do two finished studies hold the same results? (issue 26's check that a refactor changed no
metric table and no edit delta.)

    python -m benchmarks.compare_studies BEFORE AFTER [--config test-tiny --config test-methods-tiny]

BEFORE and AFTER each hold one finished workflow directory per config name (e.g. made by copying
the workflow files of two checkouts and running `snakemake --cores 2 --configfile
config/NAME.yaml` in BEFORE/NAME and AFTER/NAME). Compared:

- every results/*/metrics/**/*.parquet: the same files, values, schema and row order, except the
  downstream rows metric == "seconds" (each task's wall time, different in any two runs); their
  metadata equal except git_commit, seconds, table_sha256 (which hashes those seconds rows),
  evaluation_key and the sha256 of delta / factors inputs (those files record the code version);
- every results/*/deltas/* and factors/*: every dataset and attribute equal, except the code
  version, the hashes of files that record it and the edit log's per-step seconds;
- every results/studies/*/tables/*.parquet (the report): equal values, without the rows and columns that
  measure time (downstream's `seconds` rows, the edit log's and summary's *seconds* columns).

`compare_dirs(A, B)` is the same check of two workflow directories (tests/test_kill.py compares a
study stopped and continued in a fresh copy with the uninterrupted one).

Prints each difference and a count; exit status 1 when any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import polars as pl

from editscale.io import read_parquet_metadata

IGNORED_ATTRS = {"git_commit", "factors_sha256", "prev_delta_sha256"}  # the code version, and hashes of files that record it
IGNORED_METADATA = {"git_commit", "seconds", "table_sha256", "evaluation_key"}


def strip_state_hashes(d):
    """{path, sha256} of a delta / factors file -> its path (those files record the code version)."""
    if isinstance(d, dict):
        if set(d) == {"path", "sha256"} and ("/deltas/" in d["path"] or "/factors/" in d["path"]):
            return d["path"]
        return {k: strip_state_hashes(v) for k, v in d.items()}
    return d


def h5_content(path: Path) -> dict:
    """Every group's and dataset's attributes and every dataset's dtype, shape and bytes (module doc)."""
    out = {}

    def visit(name, obj):
        if "seconds" in name.rsplit("/", 1)[-1]:
            return
        attrs = {k: (v.tobytes() if hasattr(v, "tobytes") else v) for k, v in obj.attrs.items() if k not in IGNORED_ATTRS}
        if "inputs" in attrs:
            attrs["inputs"] = strip_state_hashes(json.loads(attrs["inputs"]))
        data = None
        if isinstance(obj, h5py.Dataset):
            value = obj[()]
            data = (obj.dtype.str, obj.shape, value if obj.shape == () else value.tolist() if obj.dtype.kind == "O" else value.tobytes())
        out[name] = (attrs, data)

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return out


def _without_timing(df: pl.DataFrame) -> pl.DataFrame:
    """A table without what measures time: downstream's `seconds` rows, the edit log's and the
    summary's *seconds* columns (different in any two executions)."""
    if "metric" in df.columns:
        df = df.filter(pl.col("metric") != "seconds")
    return df.drop([c for c in df.columns if "seconds" in c])


def compare_dirs(b: Path, a: Path, label: str = "") -> tuple[list[str], dict[str, int]]:
    """The differences between two finished workflow directories (module doc), plus the report
    tables (results/studies/*/tables/*.parquet, timing left out); and counts of what was compared."""
    diffs: list[str] = []
    counts = {"metric_tables": 0, "state_files": 0, "report_tables": 0}
    files = sorted(p.relative_to(b) for p in (b / "results").glob("*/metrics/**/*.parquet"))
    other = sorted(p.relative_to(a) for p in (a / "results").glob("*/metrics/**/*.parquet"))
    if files != other:
        diffs.append(f"{label} metric file sets differ: {sorted(set(files) ^ set(other))}")
    for rel in (r for r in files if (a / r).exists()):
        counts["metric_tables"] += 1
        x, y = _without_timing(pl.read_parquet(b / rel)), _without_timing(pl.read_parquet(a / rel))
        if x.schema != y.schema or not x.equals(y):
            diffs.append(f"TABLE DIFFERS {label} {rel}")
        mx, my = read_parquet_metadata(b / rel), read_parquet_metadata(a / rel)
        for key in sorted((set(mx) | set(my)) - IGNORED_METADATA):
            vx, vy = mx.get(key), my.get(key)
            if key == "inputs":
                vx, vy = (strip_state_hashes(json.loads(v)) for v in (vx, vy))
            if vx != vy:
                diffs.append(f"METADATA DIFFERS {label} {rel} {key} {vx} | {vy}")
    for p in sorted(list((b / "results").glob("*/deltas/*")) + list((b / "results").glob("*/factors/*"))):
        q = a / p.relative_to(b)
        if not q.exists() or h5_content(p) != h5_content(q):
            diffs.append(f"STATE FILE DIFFERS {label} {p.relative_to(b)}")
        else:
            counts["state_files"] += 1
    for p in sorted((b / "results").glob("studies/*/tables/*.parquet")):
        q = a / p.relative_to(b)
        counts["report_tables"] += 1
        if not q.exists() or not _without_timing(pl.read_parquet(p)).equals(_without_timing(pl.read_parquet(q))):
            diffs.append(f"REPORT TABLE DIFFERS {label} {p.relative_to(b)}")
    return diffs, counts


def compare(before: Path, after: Path, configs: list[str]) -> int:
    bad, total = 0, {"metric_tables": 0, "state_files": 0, "report_tables": 0}
    for cfg in configs:
        diffs, counts = compare_dirs(before / cfg, after / cfg, cfg)
        for line in diffs:
            print(line)
        bad += len(diffs)
        total = {k: total[k] + counts[k] for k in total}
    print(f"{total['metric_tables']} metric tables compared, {total['state_files']} delta / factors files equal in content, "
          f"{total['report_tables']} report tables; {bad} differences")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--config", action="append", default=None, help="config names (default: test-tiny, test-methods-tiny)")
    args = p.parse_args(argv)
    return 1 if compare(args.before, args.after, args.config or ["test-tiny", "test-methods-tiny"]) else 0


if __name__ == "__main__":
    sys.exit(main())
