"""`editscale doctor`: what this machine has, and what a config will cost in time and disk.

Machine: torch version, the device editscale would use (`pick_device("auto")`: cuda if available,
else cpu), GPU name and memory, CPU count, RAM, free disk, and the measured matmul rate. The
per-run estimates and their formulas are editscale.planning's.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from .io import EditscaleError
from .planning import EFFICIENCY, read_calibration, run_estimate, time_estimate


def register(sub) -> None:
    d = sub.add_parser(
        "doctor",
        help="print the device, memory and disk, and per run of a config an estimate of edit/eval time and checkpoint storage",
        description="Machine check plus, for --configfile, per-run estimates from the model's shapes. Storage: factors "
        "4(d_out+d_in) bytes per edited module per edit; dense delta 4 d_out d_in per module per checkpoint; the study's "
        "full-model save N_params x dtype bytes every 20 edits. Time: v_num_grad_steps x (2 + 2f) N x tokens FLOPs per edit "
        "(f: fraction of layers above the edited one; <= 6 N x tokens) plus float64 solves, divided by the measured "
        "matmul rate x 0.5, then scaled per job kind by a calibration fitted to Snakemake's benchmark records of a "
        "measured run (--benchmarks; see editscale.planning, editscale.calibration and docs/scale.md).",
    )
    d.add_argument("--configfile", default=None,
                   help="a config, e.g. config/paper/rome-gpt2-xl.yaml (default: ./config.yaml if there is one)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--storage-only", action="store_true", help="only the storage estimate (no device probe or benchmark)")
    d.add_argument("--flops", type=float, default=None, help="assumed matmul FLOP/s instead of measuring (fp64: half)")
    d.add_argument("--no-bench", action="store_true", help="do not measure the matmul rate (no time estimates)")
    d.add_argument("--cores", type=int, default=None, help="the wall-time estimate's `snakemake --cores N` (default: this machine's CPUs)")
    d.add_argument("--calibration", default=None,
                   help="the time model's constants (default: the file shipped with editscale, measured on a 2-core CPU VM)")
    d.add_argument("--benchmarks", default=None,
                   help="the results/benchmarks directory of a finished run of this config: fit the time model to its "
                        "records and print measured against estimated time per job kind")
    d.add_argument("--save-calibration", default=None, help="with --benchmarks: write the fitted constants here (for --calibration)")
    d.add_argument("--remaining", action="store_true",
                   help="with --benchmarks of a study in progress: what is left of it, the jobs without a record estimated "
                        "by the time model refitted to the finished jobs of each kind (a method's early stopping, this "
                        "machine's load), and the wall time of the rest")
    d.set_defaults(func=run_doctor)


def run_doctor(args) -> None:
    import json

    configfile = args.configfile or ("config.yaml" if Path("config.yaml").exists() else None)
    if args.save_calibration and not args.benchmarks:
        raise EditscaleError("--save-calibration needs --benchmarks (the records to fit)")
    if args.remaining and not args.benchmarks:
        raise EditscaleError("--remaining needs --benchmarks: the study's results/benchmarks directory (its finished jobs' records)")
    report = doctor(configfile, bench=not args.no_bench, flops=args.flops, storage_only=args.storage_only,
                    cores=args.cores, calibration=args.calibration, benchmarks=args.benchmarks, remaining=args.remaining)
    if args.save_calibration:
        from .io import write_text_atomic

        fitted = {**report.get("fitted_calibration", {}), **report.get("fitted_memory", {})}
        write_text_atomic(args.save_calibration, json.dumps(fitted, indent=2) + "\n")
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))


# ---------------------------------------------------------------------------------------------
# Machine


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def machine_info(path: str | Path = ".") -> dict[str, Any]:
    import torch

    from .models.load import pick_device

    device = pick_device("auto")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    mem = _meminfo()
    info["ram_total"] = mem.get("MemTotal")
    info["ram_available"] = mem.get("MemAvailable")
    usage = shutil.disk_usage(Path(path).resolve())
    info["disk_free"] = usage.free
    info["disk_path"] = str(Path(path).resolve())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(gpu_name=props.name, gpu_memory_total=total, gpu_memory_free=free, gpu_count=torch.cuda.device_count(),
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def machine_fingerprint(info: dict[str, Any]) -> str:
    """What decides the matmul rate: CPU model, CPU count, device (GPU name) and torch version."""
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return " | ".join(str(x) for x in (cpu or platform.processor(), info.get("cpu_count"), info.get("device"),
                                        info.get("gpu_name", ""), info.get("torch")))


def busy_load(info: dict[str, Any]) -> float | None:
    """The 1-minute load average when it leaves no CPU core free for the one-thread matmul
    measurement (load >= usable CPUs - 0.5), else None.

    On a CPU device a busy machine measures a rate several times below the idle one (fp32: 12
    GFLOP/s on the 2-core AMD VM with two edit chains running, 92 in the shipped calibration,
    measured idle), and every time estimate grows by as much. On a GPU the rate is the GPU's and
    the load does not matter."""
    if info.get("device") != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    return load if load >= (info.get("cpu_usable") or 1) - 0.5 else None


def measure_flops(device="cpu", dtype=None, seconds: float = 0.15, threads: int | None = None) -> float:
    """Achieved matmul FLOP/s on `device` in `dtype` (default float32; a short loop, a rough, warm
    number), with `threads` torch CPU threads (default: the current setting)."""
    import torch

    device = torch.device(device)
    dtype = dtype or torch.float32
    if threads and device.type == "cpu":
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_flops(device, dtype, seconds)
        finally:
            torch.set_num_threads(before)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                break
    return 2 * n**3 * reps / (time.perf_counter() - t0)



def load_config(configfile: str | Path) -> dict:
    """The workflow's own loader (schema defaults, cross-checks): doctor accepts exactly what the
    workflow accepts."""
    from .workflow import load_config as load

    return load(configfile)


def doctor(configfile: str | Path | None, bench: bool = True, flops: float | None = None, storage_only: bool = False,
           root: str | Path = ".", cores: int | None = None, calibration: str | Path | None = None,
           benchmarks: str | Path | None = None, remaining: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = {}
    rate32 = rate64 = None
    cal = None if storage_only else read_calibration(calibration)
    if not storage_only:
        report["machine"] = machine_info(root)
        report["machine"]["fingerprint"] = machine_fingerprint(report["machine"])
        report["machine"]["matmul_rate_from"] = "measured"
        if flops:
            rate32, rate64 = float(flops), float(flops) / 2
            report["machine"]["matmul_rate_from"] = "--flops"
        elif bench and cal.rate32 and cal.machine and cal.machine == report["machine"]["fingerprint"] and not benchmarks:
            # fitted on this machine: its own rates (calibration.py module doc: why not measure again)
            rate32, rate64 = float(cal.rate32), float(cal.rate64 or cal.rate32 / 2)
            report["machine"]["matmul_rate_from"] = "the calibration's (fitted on this machine)"
        elif bench:
            dev = report["machine"]["device"]
            # one thread on the CPU: the edit and evaluation jobs run with `threads: 1`, side by side
            import torch

            load = busy_load(report["machine"])
            rate32 = measure_flops(dev, torch.float32, threads=1)
            rate64 = measure_flops(dev, torch.float64, threads=1)
            if load is not None:
                report["machine"]["matmul_rate_busy_load"] = load
        report["machine"]["matmul_flops_fp32"] = rate32
        report["machine"]["matmul_flops_fp64"] = rate64
    if configfile:
        config = load_config(configfile)
        report["config"] = str(configfile)
        report["runs"] = [run_estimate(config, r, root) for r in config["runs"]]
        report["gpu_requested"] = bool((config.get("resources") or {}).get("gpu", False))
        if not storage_only:
            report.update(memory_report(config, cal, root, benchmarks))
        if rate32:
            cores = cores or report["machine"]["cpu_usable"]
            report["time"] = time_estimate(config, rate32, rate64, cal, cores, root)
            if benchmarks:
                report.update(calibrate(config, benchmarks, rate32, rate64, cal, cores, root, report["machine"]["fingerprint"], remaining))
        elif benchmarks:
            raise EditscaleError("--benchmarks needs the matmul rate (drop --no-bench / --storage-only)")
    return report


def memory_report(config: dict, cal, root, benchmarks=None) -> dict[str, Any]:
    """Predicted peak memory per job kind (editscale.memory); with `benchmarks`, the memory model
    fitted to the records' max RSS and measured against predicted per kind and model size."""
    import dataclasses

    from . import calibration as cb
    from . import memory
    from .planning import config_jobs

    out: dict[str, Any] = {"memory": memory.memory_rows(config, root, cal), "memory_source": cal.memory_source or "default fit",
                           "memory_on_gpu": memory.on_gpu(config)}
    if benchmarks:
        jobs = config_jobs(config, root)
        rss = cb.measured(jobs, benchmarks, read=cb.record_rss)
        fits = cb.fit_memory(jobs, rss, on_device=memory.on_gpu(config))
        fitted = dataclasses.replace(cal, memory=fits, memory_source=f"fitted to the max_rss of {len(rss)} records in {benchmarks}")
        gpu = memory.on_gpu(config)
        out["fitted_memory"] = {"memory": fits, "memory_source": fitted.memory_source}
        out["memory_check"] = [
            {**row, "fitted": fit_row["predicted"]} for row, fit_row in zip(
                cb.memory_comparison(jobs, rss, lambda j: memory.job_memory(j, cal, gpu).host),
                cb.memory_comparison(jobs, rss, lambda j: memory.job_memory(j, fitted, gpu).host))]
    return out


def calibrate(config: dict, benchmarks, rate32: float, rate64: float | None, used, cores: int, root,
              machine: str = "", remaining: bool = False) -> dict[str, Any]:
    """Fit the time model to a run's records; the comparison per job kind, and the fitted estimate.
    With `remaining` (a study in progress), also what is left of it: the jobs without a record,
    timed by `used` with each kind the records hold refitted to them (a kind not yet recorded
    keeps `used`'s constant; the family means are the refit's)."""
    import dataclasses

    from . import calibration as cb
    from .planning import config_jobs

    jobs = config_jobs(config, root)
    seconds = cb.measured(jobs, benchmarks)
    fitted = cb.fit(jobs, seconds, rate32, rate64, source=f"fitted to {len(seconds)} records in {benchmarks}", machine=machine)
    out = {"fitted_calibration": fitted.to_json(),
           "calibration_check": cb.comparison(jobs, seconds, {"estimate_before": used, "estimate_fitted": fitted}, rate32, rate64),
           "time_fitted": time_estimate(config, rate32, rate64, fitted, cores, root)}
    if remaining:
        # the finished jobs' CPU seconds per thread: what each would take on the machine alone (a study run over
        # sittings shares the machine with other work, whose waits its wall records hold)
        threads = {j.record: max(j.threads, 1) for j in jobs}
        cpu = {r: v / threads[r] for r, v in cb.measured(jobs, benchmarks, read=cb.record_cpu_seconds).items()}
        refit = cb.fit(jobs, cpu, rate32, rate64, source="", machine=machine)
        study = dataclasses.replace(used, startup_s=refit.startup_s, factors={**used.factors, **refit.factors},
                                    fixed={**used.fixed, **refit.fixed},
                                    source=f"{used.source}; refitted per job kind to the CPU seconds of the {len(cpu)} finished jobs in {benchmarks}")
        left = time_estimate(config, rate32, rate64, study, cores, root, done=seconds)
        out["time_remaining"] = {**left, "jobs_done": len(seconds), "jobs_total": len(jobs), "measured_s": sum(seconds.values()),
                                 "measured_cpu_s": sum(cpu.values())}
    return out



# ---------------------------------------------------------------------------------------------
# Text output


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


STORAGE_HEADER = ("| run | model | method | edited modules (d_out x d_in) | edits | checkpoints | factors / checkpoint "
                  "| dense delta / checkpoint | study: full model / 20 edits | factors, all | deltas, all | study, all |")


def storage_rows(report: dict) -> list[str]:
    rows = []
    for est in report.get("runs", []):
        st = est.get("storage")
        if not st:
            rows.append(f"| {est['run']} | {est['model']} | {est['method']} | {est['shapes_from']} | {est['n_edits']} | | | | | | | |")
            continue
        shapes = {tuple(s) for s in st["modules"].values()}
        mods = f"{len(st['modules'])} x " + ", ".join(f"{o}x{i}" for o, i in sorted(shapes))
        rows.append(
            f"| {est['run']} | {est['model']} | {est['method']} | {mods} | {est['n_edits']} | {st['checkpoints']} "
            f"| {fmt_bytes(st['factors_per_checkpoint'])} | {fmt_bytes(st['delta_per_checkpoint'])} "
            f"| {fmt_bytes(st['study_per_save'])} | {fmt_bytes(st['factors_total'])} | {fmt_bytes(st['deltas_total'])} "
            f"| {fmt_bytes(st['study_total'])} |"
        )
    return rows


def render(report: dict) -> str:
    lines = []
    m = report.get("machine")
    if m:
        lines.append("machine")
        lines.append(f"  python {m['python']}, torch {m['torch']}, device {m['device']}"
                     + ("" if m["cuda_available"] else " (no CUDA GPU visible: edits and evaluation run on the CPU)"))
        if "gpu_name" in m:
            lines.append(f"  GPU {m['gpu_name']} x{m['gpu_count']} (compute {m['gpu_capability']}), memory "
                         f"{fmt_bytes(m['gpu_memory_total'])} total, {fmt_bytes(m['gpu_memory_free'])} free")
        lines.append(f"  CPUs {m['cpu_count']} ({m['cpu_usable']} usable, torch threads {m['torch_threads']}), RAM "
                     f"{fmt_bytes(m['ram_total'])} total, {fmt_bytes(m['ram_available'])} available")
        lines.append(f"  disk free at {m['disk_path']}: {fmt_bytes(m['disk_free'])}")
        if m.get("matmul_flops_fp32"):
            lines.append(f"  matmul rate: {m['matmul_flops_fp32'] / 1e9:.0f} GFLOP/s fp32, "
                         f"{(m['matmul_flops_fp64'] or 0) / 1e9:.0f} GFLOP/s fp64 (estimates use x{EFFICIENCY}; "
                         f"{m.get('matmul_rate_from', 'measured')})")
        if m.get("matmul_rate_busy_load") is not None:
            lines.append(f"  the machine was busy while the rate was measured (load average {m['matmul_rate_busy_load']:.2f} on "
                         f"{m['cpu_usable']} usable CPUs): the rate is low and every time estimate below high; measure "
                         "on an idle machine, pass --flops, or fit the study's own records with --benchmarks")
    for est in report.get("runs", []):
        lines.append("")
        lines.append(f"run {est['run']}: {est['method']} on {est['model']} ({est['params'] / 1e6:.0f} M parameters, "
                     f"{est['dtype']}), {est['n_edits']} edits in segments of {est['segment']}; shapes from {est['shapes_from']}")
        st = est.get("storage")
        if st:
            names = list(st["modules"])
            shapes = sorted({f"{o}x{i}" for o, i in st["modules"].values()})
            what = names[0] if len(names) == 1 else f"{len(names)} modules {names[0]} .. {names[-1]}"
            lines.append(f"  edited: {what}, (d_out x d_in) {', '.join(shapes)}")
            lines.append(f"  storage per checkpoint: factors {fmt_bytes(st['factors_per_checkpoint'])} "
                         f"({fmt_bytes(st['factor_bytes_per_edit'])}/edit"
                         + (f" + method state {fmt_bytes(st['state_per_checkpoint'])}" if st.get("state_per_checkpoint") else "")
                         + f"), dense delta {fmt_bytes(st['delta_per_checkpoint'])}; "
                         f"study's full-model save every {st['study_save_every']} edits: {fmt_bytes(st['study_per_save'])}")
            lines.append(f"  storage for the run: {st['checkpoints']} checkpoints = factors {fmt_bytes(st['factors_total'])} + "
                         f"deltas {fmt_bytes(st['deltas_total'])} = {fmt_bytes(st['editscale_total'])} "
                         f"(study: {st['study_saves']} saves = {fmt_bytes(st['study_total'])}); stats {fmt_bytes(st['stats_bytes'])}")
        ed = est.get("edit")
        if ed:
            lines.append(f"  one edit: {ed['steps']} steps x {ed['tokens_per_step']:.0f} tokens -> {ed['flops_model']:.2e} FLOPs "
                         f"(model) + {ed['flops_solve_fp64']:.2e} FLOPs (fp64 solves)")
            t = (report.get("time") or {}).get("runs", {}).get(est["run"])
            if t and t["seconds_per_edit"] is not None:
                lines.append(f"  time: ~{fmt_seconds(t['seconds_per_edit'])} per edit (segment job ~{fmt_seconds(t['segment_s'])}), "
                             f"chain ~{fmt_seconds(t['edit_chain_s'])}; evaluation {t['eval_jobs']} jobs ~{fmt_seconds(t['eval_s'])}")
            mem = est["edit_job_memory"]
            need = mem["total"]
            lines.append(f"  edit job device memory (peak): weights {fmt_bytes(mem['weights'])} + method state "
                         f"{fmt_bytes(mem['method_state'])} + base/delta copies {fmt_bytes(mem['weight_state'])} + "
                         f"activations or solve {fmt_bytes(mem['edit_phase'])} = {fmt_bytes(need)} "
                         "(within 10 % of one H200's peaks: docs/scale.md)")
            if m and "gpu_memory_total" in m and need > m["gpu_memory_total"]:
                lines.append("  WARNING: more than this GPU's memory")
    if report.get("runs") is not None and m:
        if report.get("gpu_requested") and not m["cuda_available"]:
            lines.append("")
            lines.append("WARNING: the config requests a GPU (resources.gpu: true) but none is visible here")
        total = sum((e.get("storage") or {}).get("editscale_total", 0) for e in report["runs"])
        if total > m["disk_free"]:
            lines.append(f"WARNING: the runs need ~{fmt_bytes(total)} of checkpoints, more than the {fmt_bytes(m['disk_free'])} free")
    lines.extend(time_lines(report))
    lines.extend(memory_lines(report))
    if report.get("runs"):
        lines.append("")
        lines.append("storage (1 MB = 1e6 bytes; see `editscale doctor --help` and docs/scale.md for the formulas)")
        lines.append(STORAGE_HEADER)
        lines.append("|" + "---|" * STORAGE_HEADER.count(" | ") + "---|")
        lines.extend(storage_rows(report))
    return "\n".join(lines).lstrip("\n")


def time_lines(report: dict) -> list[str]:
    """The whole config's time, and with --benchmarks the measured run against the estimates."""
    t = report.get("time")
    if not t:
        return []
    lines = ["", f"time for the config (calibration: {t['calibration']}): {fmt_seconds(t['total_job_s'])} of job time; "
             f"`snakemake --cores {t['cores']}` ~{fmt_seconds(t['wall_s'])} wall (longest chain of dependent jobs "
             f"{fmt_seconds(t['critical_path_s'])})"]
    left = report.get("time_remaining")
    if left:
        lines += ["", f"what is left of the study (--remaining): {left['jobs_done']} of {left['jobs_total']} jobs done "
                      f"({fmt_seconds(left['measured_s'])} of job time recorded, {fmt_seconds(left['measured_cpu_s'])} of it computing); "
                      f"{left['jobs_left']} left, {fmt_seconds(left['total_job_s'])} of job time on the machine alone; `snakemake --cores {left['cores']}` ~{fmt_seconds(left['wall_s'])} wall "
                      f"(longest chain left {fmt_seconds(left['critical_path_s'])}; a job in flight counts whole)",
                  "| run | jobs left | edit segments left | edit chain left | per edit | evaluation left |", "|---|---|---|---|---|---|"]
        for name, r in left["runs"].items():
            per_edit = fmt_seconds(r["seconds_per_edit"]) if r["edit_jobs_left"] else "-"
            lines.append(f"| {name} | {r['jobs_left']} | {r['edit_jobs_left']} | {fmt_seconds(r['edit_chain_s'])} | {per_edit} "
                         f"| {fmt_seconds(r['eval_s'])} |")
        lines.append(f"(time model: {left['calibration']})")
    check = report.get("calibration_check")
    if check:
        fitted = report["time_fitted"]
        lines.append(f"fitted to the benchmark records: {fmt_seconds(fitted['total_job_s'])} of job time, "
                     f"~{fmt_seconds(fitted['wall_s'])} wall with --cores {fitted['cores']} (save with --save-calibration FILE)")
        lines.append("| job kind | jobs | measured | estimate before | ratio | estimate fitted | ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in check:
            m = row["measured_s"] or float("nan")
            lines.append(f"| {row['kind']} | {row['jobs']} | {fmt_seconds(row['measured_s'])} | {fmt_seconds(row['estimate_before'])} "
                         f"| {row['estimate_before'] / m:.2f} | {fmt_seconds(row['estimate_fitted'])} | {row['estimate_fitted'] / m:.2f} |")
    return lines


def memory_lines(report: dict) -> list[str]:
    """Predicted peak memory per job kind; with --benchmarks, measured against predicted."""
    rows = report.get("memory")
    if not rows:
        return []
    where = "the GPU" if report.get("memory_on_gpu") else "the CPU (host memory holds the working phase)"
    lines = ["", f"peak memory per job (editscale.memory; host fit: {report['memory_source']}; jobs run on {where}; "
                 "GPU: what the job would need on one)",
             "| job kind | of | jobs | model | host (peak RSS) | GPU |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['owner']} | {r['jobs']} | {fmt_bytes(r['model_bytes'])} | {fmt_bytes(r['host'])} "
                     f"| {fmt_bytes(r['gpu']) if r['gpu'] is not None else '-'} |")
    check = report.get("memory_check")
    if check:
        lines += ["", "measured max RSS (Snakemake records) against predicted, per job kind and model size",
                  "| job kind | model | jobs | measured | predicted before | ratio | fitted | ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in check:
            m = r["measured"] or float("nan")
            lines.append(f"| {r['kind']} | {fmt_bytes(r['model_bytes'])} | {r['jobs']} | {fmt_bytes(r['measured'])} "
                         f"| {fmt_bytes(r['predicted'])} | {r['predicted'] / m:.2f} | {fmt_bytes(r['fitted'])} | {r['fitted'] / m:.2f} |")
        fits = report["fitted_memory"]["memory"]
        lines += ["", "fitted: peak RSS = a x model bytes + b (save with --save-calibration FILE)",
                  "| job kind | a | b |", "|---|---|---|"]
        lines += [f"| {k} | {a:.2f} | {fmt_bytes(b)} |" for k, (a, b) in sorted(fits.items())]
    return lines
