"""Fitting doctor's time model (editscale.planning: Job, Calibration) to the Snakemake benchmark
records of a finished run: `editscale doctor --configfile X --benchmarks results/benchmarks`.

Every job of the workflow leaves `results/benchmarks/.../*.tsv` (rules/*.smk `benchmark:`), whose
`s` column is the job's wall seconds. The jobs of the config (planning.config_jobs) are matched to
their records by path, then:

  fixed[kind]  = mean seconds, for kinds none of whose jobs computes (model preparation, the
                 report tables and figures);
  startup_s    = median seconds of the evaluation jobs that neither load nor run the model (a
                 plugin metric without `device`; the built-in ones all run in the checkpoint
                 jobs, which load it); the default (DEFAULT_STARTUP_S) if none;
  factor[kind] = sum(seconds - startup_s - load) / sum(compute seconds), for every other kind
                 (one edit kind per method, one per metric, corpus, stats, context templates),
                 and the mean per family ("edit:*", "metric:*") for kinds whose computing jobs are
                 not in the records (a new method; history recorded at k = 0 only); a kind whose
                 jobs took less than startup + load (its compute lost in the noise) is fixed at
                 its mean seconds instead.

The fitted constants are relative to the matmul rate measured when fitting, so on another machine
the compute part scales with that machine's rate and the startup stays; refit there for numbers
within the 25 % the fit reaches on its own machine (docs/scale.md). On the machine it was fitted
on (the same `machine` fingerprint: CPU model, CPU count, device, torch) doctor uses the rates
stored with the calibration instead of measuring again: a short matmul loop on a shared VM varies
by 1.5x from one call to the next (63 and 94 GFLOP/s measured an hour apart), which would move
every estimate by as much.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .io import SERVED_MARKER, EditscaleError
from .layout import RESULTS
from .planning import DEFAULT_STARTUP_S, LOAD_BYTES_PER_S, Calibration, Job

MIN_FACTOR = 0.01
MIN_SLOPE = 1.0  # peak RSS per model byte of a job that loads the model (fit_memory)


def record_seconds(path: Path) -> float | None:
    """Wall seconds of one Snakemake benchmark record (the mean over its rows: `--benchmark-repeats`)."""
    if not path.is_file():
        return None
    lines = [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < 2 or lines[0][0] != "s":
        raise EditscaleError(f"{path} is not a Snakemake benchmark record (first column `s`)")
    return sum(float(row[0]) for row in lines[1:]) / (len(lines) - 1)


def _record_column(path: Path, column: str) -> list[float] | None:
    """The values of one column of a Snakemake benchmark record, one per row (its missing values
    left out); None when there is no record."""
    if not path.is_file():
        return None
    lines = [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) < 2 or column not in lines[0]:
        raise EditscaleError(f"{path} is not a Snakemake benchmark record (no `{column}` column)")
    col = lines[0].index(column)
    return [float(row[col]) for row in lines[1:] if row[col] not in ("", "NA", "-")]


def record_cpu_seconds(path: Path) -> float | None:
    """CPU seconds of one Snakemake benchmark record (its `cpu_time` column, the mean over its rows):
    the job's own compute, without the time it waited for a core beside other work."""
    values = _record_column(path, "cpu_time")
    return sum(values) / len(values) if values else None


def record_rss(path: Path) -> float | None:
    """Peak RSS of one Snakemake benchmark record, bytes (its `max_rss` column is in MiB; the
    largest over its rows)."""
    values = _record_column(path, "max_rss")
    return max(values) * 2**20 if values else None


def _served(log: Path) -> bool:
    """Whether the job of this log was served by `editscale forkserver`: its process writes the
    marker as the log's first line (the rest, often megabytes of progress bars, is not read)."""
    if not log.is_file():
        return False
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.readline().startswith(SERVED_MARKER)


def measured(jobs: list[Job], benchmarks: str | Path, read=record_seconds) -> dict[str, float]:
    """record -> seconds (or what `read` reads), for the jobs whose record is under `benchmarks`
    (a results/benchmarks dir)."""
    root = Path(benchmarks)
    if not root.is_dir():
        raise EditscaleError(f"--benchmarks {root}: no such directory (a finished run leaves results/benchmarks/)")
    out, served = {}, []
    for job in jobs:
        rel = Path(job.record).relative_to(RESULTS / "benchmarks")
        s = read(root / rel)
        if s is not None:
            out[job.record] = s
            if _served(root.parent / "logs" / rel.with_suffix(".log")):
                served.append(str(root / rel))
    if served:
        raise EditscaleError(f"--benchmarks {root}: {len(served)} job(s) were served by `editscale forkserver` ({served[0]}"
                             f"{', ...' if len(served) > 1 else ''}): their records measure the process that forwarded them, not "
                             "the job's time and memory; run the study without EDITSCALE_FORKSERVER to calibrate from it")
    if not out:
        raise EditscaleError(f"--benchmarks {root}: no record of any job of this config (is it the run of this config?)")
    return out


def fit(jobs: list[Job], seconds: dict[str, float], rate32: float, rate64: float | None, source: str,
        machine: str = "") -> Calibration:
    """The calibration of the module docstring, from the measured jobs."""
    by_kind: dict[str, list[Job]] = {}
    for job in jobs:
        if job.record in seconds:
            by_kind.setdefault(job.kind, []).append(job)
    # a kind is fixed when none of its jobs in the config computes (not merely the recorded ones:
    # history at k = 0 re-scores nothing, at k > 0 it does)
    computing = {j.kind for j in jobs if j.compute_seconds(rate32, rate64) > 0}
    fixed = {kind: statistics.fmean(seconds[j.record] for j in js) for kind, js in by_kind.items() if kind not in computing}
    light = [seconds[j.record] for kind in fixed if kind.startswith("metric:") for j in by_kind[kind] if j.model_bytes == 0]
    startup = statistics.median(light) if light else DEFAULT_STARTUP_S
    factors = {}
    for kind, js in by_kind.items():
        if kind in fixed:
            continue
        compute = sum(j.compute_seconds(rate32, rate64) for j in js)
        if compute == 0:  # only the kind's non-computing jobs were recorded: the family's mean below
            continue
        rest = sum(seconds[j.record] - startup - j.model_bytes / LOAD_BYTES_PER_S for j in js)
        if rest / compute < MIN_FACTOR:  # faster than startup + load says: its compute is lost in the noise
            fixed[kind] = statistics.fmean(seconds[j.record] for j in js)
            continue
        factors[kind] = rest / compute
    for family in ("edit", "metric"):
        fam = [v for k, v in factors.items() if k.startswith(family + ":")]
        if fam:
            factors[family + ":*"] = statistics.fmean(fam)
    return Calibration(startup_s=startup, factors=factors, fixed=fixed, rate32=rate32, rate64=rate64, machine=machine,
                       source=source)


def comparison(jobs: list[Job], seconds: dict[str, float], calibrations: dict[str, Calibration], rate32: float,
               rate64: float | None) -> list[dict]:
    """Per kind: jobs, measured seconds and each calibration's estimate of the same jobs."""
    rows: dict[str, dict] = {}
    for job in jobs:
        if job.record not in seconds:
            continue
        row = rows.setdefault(job.kind, {"kind": job.kind, "jobs": 0, "measured_s": 0.0, **{name: 0.0 for name in calibrations}})
        row["jobs"] += 1
        row["measured_s"] += seconds[job.record]
        for name, cal in calibrations.items():
            row[name] += cal.seconds(job, rate32, rate64)
    out = sorted(rows.values(), key=lambda r: -r["measured_s"])
    total = {"kind": "all", "jobs": sum(r["jobs"] for r in out), "measured_s": sum(r["measured_s"] for r in out),
             **{name: sum(r[name] for r in out) for name in calibrations}}
    return out + [total]


def fit_memory(jobs: list[Job], rss: dict[str, float], on_device: bool = False) -> dict[str, list[float]]:
    """Per job kind, peak RSS = a x model bytes + b (editscale.memory): a by least squares over its
    recorded jobs, at least MIN_SLOPE for a kind that loads the model, and b the largest residual
    (the line bounds every record), per process of the job (Job.cpu_processes; a job of worker
    processes counts its parent's floor in each worker's share, so its prediction, which adds the
    parent, stays above its record), after taking away what the job's working phase holds beyond
    the weights when it ran on the CPU (Job.device_extra; `on_device`: the records are of a GPU
    run, whose device jobs held that on the GPU). A kind recorded at one model size only (or
    none: nullspace, the report) gets a = its family's mean if it loads a model, else 0;
    a half-precision model on the CPU is fitted apart (kind@half, editscale.memory.fit_key), with
    the float32 fit's slope when it was measured at one size;
    "edit:*" and "metric:*" are the means over their members."""
    from .memory import HALF_ON_CPU, fit_key

    points: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        if job.record in rss:
            cpu = not (on_device and job.uses_device)
            extra = job.device_extra if cpu else 0.0
            per_process = rss[job.record] / (job.cpu_processes if cpu else 1)
            points.setdefault(fit_key(job, on_device), []).append((float(job.model_bytes), per_process - extra))
    fits: dict[str, list[float]] = {}
    single: dict[str, list[tuple[float, float]]] = {}
    for kind, pts in points.items():
        xs = [x for x, _ in pts]
        if len(set(xs)) < 2:
            single[kind] = pts
            continue
        mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in pts)
        a = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        # a job that holds the model holds its weights once at least (a slope below 1 is the
        # records' noise: Snakemake samples RSS at intervals, and file-backed weight pages come
        # and go); b: the largest residual, so that the line bounds every measured peak
        a = max(a, MIN_SLOPE if any(x > 0 for x in xs) else 0.0)
        fits[kind] = [a, max(y - a * x for x, y in pts)]
    families = {fam: [f for k, f in fits.items() if k.startswith(fam + ":")] for fam in ("edit", "metric")}
    for fam, members in families.items():
        if members:
            fits[fam + ":*"] = [statistics.fmean(f[0] for f in members), statistics.fmean(f[1] for f in members)]
    for kind, pts in single.items():
        # one model size: the float32 fit's slope for kind@half, else the family's, else 1
        fam = fits.get(kind[: -len(HALF_ON_CPU)]) if kind.endswith(HALF_ON_CPU) else None
        fam = fam or fits.get(kind.split(":")[0].split("@")[0] + ":*")
        a = (fam[0] if fam else MIN_SLOPE) if any(x > 0 for x, _ in pts) else 0.0
        fits[kind] = [a, max(0.0, max(y - a * x for x, y in pts))]
    return fits


def memory_comparison(jobs: list[Job], rss: dict[str, float], predict) -> list[dict]:
    """Per job kind and model size: jobs, the largest measured peak RSS and `predict(job)`'s
    largest prediction for the same jobs (bytes)."""
    rows: dict[tuple[str, int], dict] = {}
    for job in jobs:
        if job.record not in rss:
            continue
        row = rows.setdefault((job.kind, job.model_bytes), {"kind": job.kind, "model_bytes": job.model_bytes, "jobs": 0,
                                                            "measured": 0.0, "predicted": 0.0})
        row["jobs"] += 1
        row["measured"] = max(row["measured"], rss[job.record])
        row["predicted"] = max(row["predicted"], predict(job))
    return sorted(rows.values(), key=lambda r: (r["kind"], r["model_bytes"]))
