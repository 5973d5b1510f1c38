"""Is a checkpoint's evaluation flat in k? Its cost at two edit counts, side by side in one run
(issue 29 item 3).

In a study's directory whose run has reached the larger count, the checkpoint job at each count
(`editscale evaluate`: every metric due at k in one process) and the edit-score job of the segment
that holds each count are re-run exactly as Snakemake runs them: the shell command of a dry run
with --force on one of the job's outputs, with its outputs sent to a scratch directory and
EDITSCALE_RECOMPUTE=1, so the study's own files are only read. The counts alternate (A B B A ...),
so that a machine whose load drifts (another study beside this one) treats both alike; each
figure is the median over the repeats.

Reported per metric: seconds at each count, their ratio, and what the metric evaluated there
(history: how many earlier edits it re-scored, its sample; the others evaluate a fixed set),
plus the job's load-and-replay of the model after k edits and the job's wall time. The bar
(issue 29) is a ratio of at most 1.2: no cost that grows with k. History re-scores every earlier
edit up to its sample size, so below that size its cost grows with k by design; its ratio is
given per re-scored edit too, and the history of a count at or above the sample size is the
one that must stay flat.

    python -m benchmarks.eval_cost --workdir ~/long --configfile config/long.yaml \
        --run ultraedit-smollm2-long-s0 --ks 100 10000 --repeats 2 --out benchmarks/eval_cost/ultraedit-long.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BAR = 1.2
DONE = re.compile(r"k=(\d+): (\S+) done in ([\d.]+) s")
LOADED = re.compile(r"model after (\d+) edits: loaded and replayed in ([\d.]+) s")


def job_command(workdir: Path, configfile: str, target: str, bindir: Path) -> list[str]:
    """The shell command Snakemake runs for the job that writes `target` (its dry run with
    --force on that file), without its `2> log` redirection."""
    cmd = [str(bindir / "snakemake"), "-n", "--nolock", "--cores", "1", "--force", target, "--configfile", configfile]
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise SystemExit(f"snakemake dry run for {target} failed ({res.returncode}):\n{text[-3000:]}")
    shells = [line.split("Shell command:", 1)[1].strip() for line in text.splitlines() if "Shell command:" in line]
    if len(shells) != 1:
        raise SystemExit(f"expected one job for {target}, the dry run planned {len(shells)}: is the run past that count?\n{text[-3000:]}")
    words = shlex.split(shells[0])
    if "2>" in words:
        words = words[: words.index("2>")]
    return words


def to_scratch(words: list[str], scratch: Path) -> tuple[list[str], dict[str, Path]]:
    """The command with every output (--metric NAME=OUT, --out OUT) moved under `scratch`;
    metric name -> its scratch file."""
    out, outputs, flag = [], {}, None
    for w in words:
        if w.startswith("--"):
            flag = w
        elif flag == "--metric" and "=" in w:
            name = w.split("=", 1)[0]
            outputs[name] = scratch / f"{name}.parquet"
            w = f"{name}={outputs[name]}"
        elif flag == "--out":
            outputs["edit_scores"] = scratch / "edit_scores.parquet"
            w = str(outputs["edit_scores"])
        out.append(w)
    return out, outputs


def what_it_evaluated(name: str, path: Path) -> dict:
    """Rows of the table, and for per-edit metrics how many edits it scored."""
    import polars as pl

    df = pl.read_parquet(path)
    info = {"rows": df.height}
    if "edit_index" in df.columns and name in ("history", "edit_scores"):
        info["edits_scored"] = df["edit_index"].drop_nulls().n_unique()
    return info


def run_job(words: list[str], workdir: Path, bindir: Path, log_path: Path) -> dict:
    """Run one job command; its wall seconds, per-metric seconds (load and replay apart)."""
    env = {**os.environ, "EDITSCALE_RECOMPUTE": "1", "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        res = subprocess.run(words, cwd=workdir, stderr=log, stdout=subprocess.DEVNULL, env=env, check=False)
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if res.returncode != 0:
        raise SystemExit(f"{shlex.join(words)} failed ({res.returncode}):\n{text[-3000:]}")
    return {"wall_s": wall, **parse_job_log(text)}


def parse_job_log(text: str) -> dict:
    """A checkpoint job's log -> its model load-and-replay seconds and each metric's own seconds."""
    metrics, load, pending = {}, 0.0, 0.0
    for line in text.splitlines():
        if m := LOADED.search(line):
            load += float(m.group(2))
            pending += float(m.group(2))  # inside the next metric's own seconds
        elif m := DONE.search(line):
            metrics[m.group(2)] = float(m.group(3)) - pending
            pending = 0.0
    return {"load_replay_s": load, "metrics": metrics}


def measure(workdir: Path, configfile: str, run: str, ks: list[int], repeats: int, bindir: Path, on_result=None) -> dict:
    """Every job at each count, the counts alternating A B B A ...: {kind: {k: [result per repeat]}}.
    `on_result(results)` after each job: the harness saves what it measured so far, so that a
    timeout or a kill loses at most the job in flight."""
    from editscale.workflow import checkpoint_metrics, eval_groups, load_config, run_by_name, segment_end_for

    config = load_config(workdir / configfile)
    spec = run_by_name(config, run)
    due = {k: metrics for metrics, grid in eval_groups(config, spec) for k in grid}
    commands: dict[str, dict[int, list[str]]] = {"checkpoint": {}, "edit_scores": {}}
    segments = {}
    for k in ks:
        if k not in due:
            raise SystemExit(f"--ks {k}: no checkpoint job of {run} at k={k} (its checkpoints: {sorted(due)})")
        metric = next(m for m in due[k] if m in checkpoint_metrics())
        commands["checkpoint"][k] = job_command(workdir, configfile, f"results/{run}/metrics/{metric}/{k:06d}.parquet", bindir)
        end = segment_end_for(k, int(spec["segment"]))
        segments[k] = [end - int(spec["segment"]) + 1, end]
        commands["edit_scores"][k] = job_command(workdir, configfile, f"results/{run}/metrics/edit_scores/{end:06d}.parquet", bindir)
    results: dict[str, dict[int, list]] = {kind: {k: [] for k in ks} for kind in commands}
    with tempfile.TemporaryDirectory(prefix="eval-cost-") as tmp:
        for r in range(repeats):
            for k in (ks if r % 2 == 0 else ks[::-1]):
                for kind in commands:
                    scratch = Path(tmp) / f"{r}-{kind}-{k}"
                    scratch.mkdir()
                    words, outputs = to_scratch(commands[kind][k], scratch)
                    print(f"[{datetime.now():%H:%M:%S}] {kind} k={k}: repeat {r + 1}/{repeats}", file=sys.stderr, flush=True)
                    res = run_job(words, workdir, bindir, scratch / "job.log")
                    res["evaluated"] = {m: what_it_evaluated(m, path) for m, path in outputs.items() if path.exists()}
                    if kind == "edit_scores":
                        res["metrics"] = {"edit_scores": res["wall_s"]}
                    results[kind][k].append(res)
                    if on_result is not None:
                        on_result(results)
    return {"run": run, "ks": ks, "segment": int(spec["segment"]), "segments": segments, "repeats": repeats,
            "commands": {kind: {k: shlex.join(c) for k, c in cmds.items()} for kind, cmds in commands.items()},
            "results": results}


def summarize(res: dict) -> list[dict]:
    """One row per metric: median seconds at each count, their ratio (larger count / smaller),
    what was evaluated, and whether the cost is flat (ratio <= BAR; for a per-edit metric that
    scored more edits at the larger count, its ratio per scored edit)."""
    lo, hi = res["ks"]

    def med(kind, k, key):
        vals = [r[key] if key in ("wall_s", "load_replay_s") else r["metrics"].get(key) for r in res["results"][kind][k]]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def evaluated(kind, k, metric):
        return res["results"][kind][k][0]["evaluated"].get(metric, {})

    rows = []
    labels = {"load_replay_s": "(model load and replay to k)", "wall_s": "(checkpoint job, wall)"}
    metrics = list(res["results"]["checkpoint"][lo][0]["metrics"])
    lines = [("checkpoint", m, m) for m in metrics] + [("checkpoint", labels[x], x) for x in labels]
    lines.append(("edit_scores", f"edit_scores (segment {res['segments'][lo][0]}-{res['segments'][lo][1]} vs "
                                 f"{res['segments'][hi][0]}-{res['segments'][hi][1]})", "edit_scores"))
    for kind, label, key in lines:
        a, b = med(kind, lo, key), med(kind, hi, key)
        ea, eb = evaluated(kind, lo, key), evaluated(kind, hi, key)
        row = {"metric": label, "s_lo": a, "s_hi": b, "ratio": b / a if a and b is not None else None,
               "scored_lo": ea.get("edits_scored"), "scored_hi": eb.get("edits_scored"), "rows_lo": ea.get("rows"), "rows_hi": eb.get("rows")}
        if a and b is not None and row["scored_lo"] and row["scored_hi"]:
            row["ratio_per_scored_edit"] = (b / row["scored_hi"]) / (a / row["scored_lo"])
        grows_by_design = row["scored_lo"] is not None and row["scored_lo"] != row["scored_hi"]
        judged = row.get("ratio_per_scored_edit") if grows_by_design else row["ratio"]
        row["flat"] = None if judged is None else judged <= BAR
        rows.append(row)
    return rows


def markdown(rows: list[dict], ks: list[int]) -> str:
    lo, hi = ks
    head = (f"| metric | s at k={lo} | s at k={hi} | ratio | evaluated at {lo} / {hi} | ratio per scored edit | <= {BAR} |\n"
            "|---|---:|---:|---:|---|---:|---|\n")
    lines = []
    for r in rows:
        ev = (f"{r.get('scored_lo')} / {r.get('scored_hi')} edits re-scored" if r.get("scored_lo") is not None
              else f"{r.get('rows_lo')} / {r.get('rows_hi')} rows" if r.get("rows_lo") is not None else "")
        f = lambda x, nd=1: "" if x is None else f"{x:.{nd}f}"  # noqa: E731
        lines.append(f"| {r['metric']} | {f(r['s_lo'])} | {f(r['s_hi'])} | {f(r['ratio'], 2)} | {ev} | "
                     f"{f(r.get('ratio_per_scored_edit'), 2)} | {'' if r['flat'] is None else 'yes' if r['flat'] else 'NO'} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None, saved: list | None = None) -> None:
    """`saved` (tests): a copy of the results is appended to it each time they are saved."""
    from editscale.doctor import machine_fingerprint, machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, type=Path, help="the study's directory (its Snakefile, config and results/)")
    ap.add_argument("--configfile", required=True, help="the study's config, relative to --workdir")
    ap.add_argument("--run", required=True)
    ap.add_argument("--ks", type=int, nargs=2, default=[100, 10000], metavar=("K_SMALL", "K_LARGE"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bin", type=Path, default=Path(sys.executable).parent,
                    help="the directory of the snakemake and editscale to run (default: this interpreter's)")
    ap.add_argument("--out", type=Path, required=True, help="JSON of every measurement (a .md table beside it)")
    args = ap.parse_args(argv)
    if args.ks[0] >= args.ks[1]:
        raise SystemExit("--ks: give the smaller count first")
    info = machine_info(args.workdir)
    t0 = time.perf_counter()
    start_load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.json")  # every job's result as it comes; removed when done

    def save(results):
        if saved is not None:
            saved.append(json.loads(json.dumps(results, default=str)))
        partial.write_text(json.dumps({"run": args.run, "ks": args.ks, "results": results}, indent=2, default=str) + "\n")

    res = measure(args.workdir.resolve(), args.configfile, args.run, args.ks, args.repeats, args.bin, on_result=save)
    res.update(rows=summarize(res), machine=machine_fingerprint(info), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               load_avg_start=start_load, load_avg_end=os.getloadavg(), harness_wall_s=time.perf_counter() - t0)
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    partial.unlink(missing_ok=True)
    table = markdown(res["rows"], args.ks)
    args.out.with_suffix(".md").write_text(
        f"Run {args.run} in {args.workdir.name}/ ({args.configfile}), {args.repeats} repeats alternating, medians; "
        f"{res['machine']}, load {start_load[0]:.1f} -> {res['load_avg_end'][0]:.1f}, {res['date']}\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
