"""How far apart are one run's metrics when it is made on two machines? (benchmarks/RESULTS.md 13:
float32 rounding differs between CPU kinds, so statistics, edits and scores do too.)

    python -m benchmarks.machine_kinds A/metrics B/metrics [--files edit_scores/000020 history/000025 ...]

A and B are a run's metric directories (results/<run>/metrics of a workflow directory, or
<run>/metrics of an unpacked record); without --files every file present in both is compared.
Rows are matched on every column but `value`; the `seconds` rows (wall time) are left out; a row
missing on one side or NaN on one side only counts as unmatched. Prints
one Markdown row per (file, metric): rows compared, max and mean |A - B|, the largest relative
difference, and for metrics whose values are all 0 or 1 (ES / PS / NS successes) how many flipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl


def compare_file(a: Path, b: Path) -> list[dict]:
    left, right = (pl.read_parquet(p).filter(pl.col("metric") != "seconds") for p in (a, b))
    keys = [c for c in left.columns if c != "value"]
    both = left.join(right, on=keys, how="full", suffix="_b", nulls_equal=True, coalesce=True)
    rows = []
    for metric, part in sorted(both.group_by("metric"), key=lambda g: g[0][0]):
        matched = part.drop_nulls(["value", "value_b"])
        va, vb = matched["value"].to_numpy(), matched["value_b"].to_numpy()
        nan_a, nan_b = np.isnan(va), np.isnan(vb)  # NaN in both (no neighbourhood prompt, say) is equal
        unmatched = part.height - matched.height + int((nan_a ^ nan_b).sum())
        va, vb = va[~nan_a & ~nan_b], vb[~nan_a & ~nan_b]
        diff, scale = np.abs(va - vb), np.maximum(np.abs(va), np.abs(vb))
        binary = bool(np.isin(np.concatenate([va, vb]), [0.0, 1.0]).all())
        rows.append({"file": str(a.relative_to(a.parents[1])).removesuffix(".parquet"), "metric": metric[0],
                     "rows": part.height, "unmatched": unmatched,
                     "max_abs": float(diff.max(initial=0.0)), "mean_abs": float(diff.mean()) if diff.size else 0.0,
                     "max_rel": float((diff[scale > 0] / scale[scale > 0]).max(initial=0.0)),
                     "flips": int((diff > 0).sum()) if binary else None})
    return rows


def compare(a_dir: Path, b_dir: Path, files: list[str] | None = None) -> list[dict]:
    names = files or sorted(str(p.relative_to(a_dir)).removesuffix(".parquet") for p in a_dir.rglob("*.parquet")
                            if (b_dir / p.relative_to(a_dir)).exists())
    if not names:
        raise SystemExit(f"no metric file is in both {a_dir} and {b_dir}")
    return [row for name in names for row in compare_file(a_dir / f"{name}.parquet", b_dir / f"{name}.parquet")]


def markdown(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    cols = ["file", "metric", "rows", "unmatched", "max_abs", "mean_abs", "max_rel", "flips"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--files", nargs="+", default=None, help="metric files relative to the directories, without .parquet")
    args = p.parse_args(argv)
    print(markdown(compare(args.a, args.b, args.files)))


if __name__ == "__main__":
    main()
