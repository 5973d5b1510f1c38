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
  version, the hashes of files that record it and the edit log's per-step seconds.

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


def compare(before: Path, after: Path, configs: list[str]) -> int:
    bad = tables = state_files = 0
    for cfg in configs:
        b, a = before / cfg, after / cfg
        files = sorted(p.relative_to(b) for p in (b / "results").glob("*/metrics/**/*.parquet"))
        other = sorted(p.relative_to(a) for p in (a / "results").glob("*/metrics/**/*.parquet"))
        if files != other:
            print(cfg, "metric file sets differ:", sorted(set(files) ^ set(other)))
            bad += 1
        for rel in (r for r in files if (a / r).exists()):
            tables += 1
            x, y = pl.read_parquet(b / rel), pl.read_parquet(a / rel)
            if "metric" in x.columns:
                x, y = x.filter(pl.col("metric") != "seconds"), y.filter(pl.col("metric") != "seconds")
            if x.schema != y.schema or not x.equals(y):
                print("TABLE DIFFERS", cfg, rel)
                bad += 1
            mx, my = read_parquet_metadata(b / rel), read_parquet_metadata(a / rel)
            for key in sorted((set(mx) | set(my)) - IGNORED_METADATA):
                vx, vy = mx.get(key), my.get(key)
                if key == "inputs":
                    vx, vy = (strip_state_hashes(json.loads(v)) for v in (vx, vy))
                if vx != vy:
                    print("METADATA DIFFERS", cfg, rel, key, vx, "|", vy)
                    bad += 1
        for p in sorted(list((b / "results").glob("*/deltas/*")) + list((b / "results").glob("*/factors/*"))):
            q = a / p.relative_to(b)
            if not q.exists() or h5_content(p) != h5_content(q):
                print("STATE FILE DIFFERS", cfg, p.relative_to(b))
                bad += 1
            else:
                state_files += 1
    print(f"{tables} metric tables compared, {state_files} delta / factors files equal in content; {bad} differences")
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
