"""Peak memory of every job of a config, on the device and on the host: what `editscale doctor`
prints, what each rule asks the scheduler for (`resources: mem_mb`), and what the plan refuses
when a configured machine cannot hold it (`resources.mem_mb`, `resources.gpu_mem_gb`).

Every job is one of editscale.planning's Jobs (kind, the model bytes it loads). Beyond the
weights, a job's working phase holds (`device_extra`, bytes; editscale.planning fills it in):

  edit:<method>      planning.edit_job_memory minus the weights: the method's resident matrices,
                     W0 and the delta in float32, the optimization's activations or one solve
                     (within 10 % of the peaks one H200 measured, tests/test_doctor_memory.py)
  stats              8 d_in^2 (the float64 accumulator) + batch tokens x d_in x (8 + STATS_ACT x
                     dtype bytes): the keys in float64, and the activations of d_in-wide tensors
                     of one forward (STATS_ACT = 10 holds the H200's two statistics peaks, GPT-2
                     XL float32 and Llama-3-8B bfloat16 with five modules, to 2 %)
  corpus             sampling from the model: the KV cache (2 x layers x batch x seq_len x hidden x
                     dtype bytes) + one step's logits (batch x vocab x 8: float32 and log-softmax)
  metric:evaluate,   forward passes without gradients: tokens x (d_ff + 4 hidden) x dtype bytes
  metric:edit_scores + logit rows x vocab x 8; the largest of perplexity (2,048 tokens, all of
  context_templates  them logit rows) and prompt scoring (16,384 tokens, LOGIT_ROWS rows)
  nullspace          on the CPU always: 5 x 8 d^2 (C, eigenvectors, projector, work)

  GPU bytes  = model bytes + device_extra, for jobs that run on the device (when the config's
               device is a GPU: resources.gpu, or resources.device cuda*); not measured on a GPU
               for corpus, nullspace and the evaluation kinds, whose formulas are the analysis above
  host bytes = a[kind] x model bytes + b[kind] + (device_extra when the job runs on the CPU)

with a, b of kind@half for a half-precision model on the CPU, where PyTorch casts the weights in
every matmul (measured: the checkpoint jobs of SmolLM2 in bfloat16 peak at ~2x the float32 ones'
RSS, not half; benchmarks/RESULTS.md section 9), else the kind's float32 fit.

a and b (peak RSS) are fitted per job kind to the `max_rss` of Snakemake's benchmark records of a
measured run (`editscale doctor --benchmarks DIR`; editscale.calibration.fit_memory), the
shipped ones to benchmarks/memory/smollm2-dtypes.yaml: a tiny GPT-2, SmolLM2-135M in float32 and
in bfloat16 (benchmarks/RESULTS.md section 9). A kind never measured takes its family's mean
("edit:*", "metric:*"), else DEFAULT_HOST_FIT.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import EditscaleError
from .planning import Calibration, Job, config_jobs, read_calibration

MB = 1_000_000
# peak RSS of a job with nothing fitted for its kind: a model load (the weights once, plus
# transformers' transient copy while it builds the model) and Python + torch
DEFAULT_HOST_FIT = (1.5, 700 * MB)
RULE_MARGIN = 1.2  # the rules ask the scheduler for the predicted peak x this


@dataclass(frozen=True)
class JobMemory:
    job: Job
    host: float  # bytes, peak RSS
    gpu: float | None  # bytes it needs on a GPU; None: it does not use the device


def on_gpu(config: dict) -> bool:
    res = config.get("resources") or {}
    return bool(res.get("gpu")) or str(res.get("device", "auto")).startswith("cuda")


HALF_ON_CPU = "@half"  # the fit of a job kind whose model runs in half precision on the CPU


def fit_key(job: Job, gpu: bool) -> str:
    """The memory fit a job takes: its kind, or kind@half for a half-precision model on the CPU
    (there every matmul casts its weights: peak RSS does not halve with the model bytes)."""
    half_on_cpu = job.dtype != "float32" and job.model_bytes > 0 and not (gpu and job.uses_device)
    return job.kind + HALF_ON_CPU if half_on_cpu else job.kind


def host_fit(calibration: Calibration, kind: str) -> tuple[float, float]:
    fits = calibration.memory or {}
    if kind not in fits and kind.endswith(HALF_ON_CPU):  # never measured in half precision: the float32 fit
        kind = kind[: -len(HALF_ON_CPU)]
    if kind in fits:
        a, b = fits[kind]
        return float(a), float(b)
    family = kind.split(":")[0] + ":*"
    if family in fits:
        a, b = fits[family]
        return float(a), float(b)
    return DEFAULT_HOST_FIT


def job_memory(job: Job, calibration: Calibration, gpu: bool) -> JobMemory:
    a, b = host_fit(calibration, fit_key(job, gpu))
    on_device = gpu and job.uses_device
    per_process = a * job.model_bytes + b + (0.0 if on_device else job.device_extra)
    processes = 1 if on_device else job.cpu_processes
    # worker processes each hold the model; their parent holds none, only Python and torch (b)
    host = per_process * processes + (b if processes > 1 else 0.0)
    return JobMemory(job, host, (job.model_bytes + job.device_extra) if job.uses_device else None)


def config_memory(config: dict, root: str | Path = ".", calibration: Calibration | None = None) -> list[JobMemory]:
    cal = calibration or read_calibration()
    gpu = on_gpu(config)
    return [job_memory(job, cal, gpu) for job in config_jobs(config, root)]


class MemoryPlan:
    """The rules' `mem_mb`: the largest predicted host peak of the jobs of one kind and owner (a
    run, or a model for the shared jobs) x RULE_MARGIN, in MB. Built once per Snakefile parse;
    owners whose model shapes are unknown before preparation (an uncached hf: model) fall back to
    editscale.workflow.model_mem_mb."""

    def __init__(self, config: dict, root: str | Path = "."):
        self.config, self.root = config, root

    @functools.cached_property
    def jobs(self) -> list[JobMemory]:
        """Every job's prediction, computed once (the plan-time check and the rules share it) and
        only when first asked: a job that re-reads the Snakefile asks for none."""
        return config_memory(self.config, self.root)

    @functools.cached_property
    def peaks(self) -> dict[tuple[str, str | None], float]:
        peaks: dict[tuple[str, str | None], float] = {}
        for jm in self.jobs:
            key = (rule_kind(jm.job.kind), jm.job.run or jm.job.model)
            peaks[key] = max(peaks.get(key, 0.0), jm.host)
        return peaks

    def mem_mb(self, kind: str, owner: str | None = None, model: str | None = None) -> int:
        """MB for the rule's jobs of `kind` owned by `owner` (a run name, or a model name for the
        shared jobs; None for the report); `model`: the fallback's model."""
        from .workflow import model_mem_mb

        peak = self.peaks.get((kind, owner))
        if peak is None:
            return model_mem_mb(self.config, model) if model else 4000
        return int(100 * math.ceil(peak * RULE_MARGIN / MB / 100))


def rule_kind(kind: str) -> str:
    """A Job kind as the rules name it: one edit kind for every method."""
    return "edit" if kind.startswith("edit:") else kind


def check_memory(config: dict, root: str | Path = ".", calibration: Calibration | None = None,
                 memories: list[JobMemory] | None = None) -> None:
    """Refuse, at plan time, every job predicted to need more host memory than `resources.mem_mb`
    or more GPU memory than `resources.gpu_mem_gb`: one error naming each job kind, its owner and
    the figures (the edit jobs' GPU parts as editscale.planning.edit_job_memory splits them).
    `memories`: the predictions when already made (MemoryPlan.jobs), else config_memory's."""
    from .planning import edit_job_memory_parts

    res = config.get("resources") or {}
    host_limit = res.get("mem_mb")
    gpu_limit = res.get("gpu_mem_gb")
    if not host_limit and not gpu_limit:
        return
    worst: dict[tuple[str, str, str], JobMemory] = {}
    for jm in memories if memories is not None else config_memory(config, root, calibration):
        job = jm.job
        owner = job.run or job.model or "study"
        checks = [("host", jm.host, host_limit and float(host_limit) * MB),
                  # a stated GPU size checks the device jobs even where this config runs on the CPU
                  ("gpu", jm.gpu, gpu_limit and float(gpu_limit) * 2**30)]
        for where, need, limit in checks:
            key = (where, job.kind, owner)
            if limit and need is not None and need > limit and (key not in worst or need > getattr(worst[key], where)):
                worst[key] = jm
    if not worst:
        return
    lines = []
    for (where, kind, owner), jm in sorted(worst.items()):
        rule = RULES.get(rule_kind(kind), rule_kind(kind))
        dtype = _dtype(config, jm.job)
        if where == "host":
            lines.append(f"{owner}: its {kind} jobs (rule {rule}) need about {jm.host / MB:,.0f} MB of host memory"
                         f"{dtype}, more than resources.mem_mb = {host_limit}")
        elif kind.startswith("edit:"):
            parts = edit_job_memory_parts(config, jm.job.run, root)
            detail = f" ({parts} GiB)" if parts else ""
            lines.append(f"run {owner}: its edit jobs (rule edit_segment) need about {jm.gpu / 2**30:.1f} GiB of GPU memory"
                         f"{detail}{dtype}, more than resources.gpu_mem_gb = {gpu_limit}")
        else:
            lines.append(f"{owner}: its {kind} jobs (rule {rule}) need about {jm.gpu / 2**30:.1f} GiB of GPU memory"
                         f"{dtype}, more than resources.gpu_mem_gb = {gpu_limit}")
    raise EditscaleError(
        f"{len(lines)} job kind(s) cannot fit the configured machines:\n  " + "\n  ".join(lines)
        + "\n(predictions: `editscale doctor --configfile ...`; load the model in bfloat16, edit fewer layers, lower the "
          "corpus batch_size, or raise the limits)")


RULES = {"edit": "edit_segment", "corpus": "corpus_tokens", "metric:evaluate": "evaluate_*", "metric:edit_scores": "edit_scores"}


def _dtype(config: dict, job: Job) -> str:
    from .workflow import run_by_name

    model = job.model or (run_by_name(config, job.run)["model"] if job.run else None)
    return f" (model {model} in {job.dtype})" if model else ""


def memory_rows(config: dict, root: str | Path = ".", calibration: Calibration | None = None) -> list[dict[str, Any]]:
    """Per job kind and owner: jobs, model bytes, predicted host and GPU peaks (doctor's table)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for jm in config_memory(config, root, calibration):
        owner = jm.job.run or jm.job.model or "study"
        row = rows.setdefault((jm.job.kind, owner), {"kind": jm.job.kind, "owner": owner, "jobs": 0, "model_bytes": jm.job.model_bytes,
                                                     "host": 0.0, "gpu": None})
        row["jobs"] += 1
        row["host"] = max(row["host"], jm.host)
        if jm.gpu is not None:
            row["gpu"] = max(row["gpu"] or 0.0, jm.gpu)
    return list(rows.values())
