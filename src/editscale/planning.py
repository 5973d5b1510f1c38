"""Cost estimates of a study before it runs: checkpoint storage, edit and evaluation FLOPs, time
and device memory per run (what `editscale doctor` prints; the machine side is editscale.doctor).

Per run of the config, from the model's shapes (a meta-device model built from its config: the
model's own config.json once prepared, else the Hugging Face cache, else the published configs in
KNOWN_CONFIGS; no weights are read or downloaded):

Storage (exact up to HDF5 overhead of a few KB per file; 1 MB = 1e6 bytes):
  factors   results/{run}/factors/{k}.h5: every update of the segment as fp32 factors; one edit of a
            rank-one method writes u (d_out) and v (d_in) per edited module:
                bytes/edit = sum over edited modules of 4 (d_out + d_in)
            (RECT's masked updates: 8 (d_out + d_in) + d_out d_in / 8, float64 factors and a mask
            bit per entry; FT-C's dense updates: 4 d_out d_in)
            (plus ~100 B of per-edit log and a few KB of attributes per file, not counted)
            (MEMIT with edits_per_step = b writes rank-b factors once per step: the same total.)
            (a method writing one rank per target token: x TARGET_TOKENS, its cost spec's factor_rank.)
  deltas    results/{run}/deltas/{k}.h5: the cumulative dense fp32 delta of every edited module:
                bytes/checkpoint = sum over edited modules of 4 d_out d_in
  study     the forgetting study's code saves the full model every 20 edits
            (`model.save_pretrained`, fp32 as loaded):  bytes/save = N_params x bytes per parameter
  stats     results/stats/...: E[kk^T] in float64, 8 d_in^2 per module.
  A run writes n_edits / segment checkpoints, each a factors file and a delta file.

Time (an order-of-magnitude estimate, expect a factor 2-3 either way):
  one ROME/MEMIT edit optimizes v* for v_num_grad_steps steps, each a forward + backward pass of
  the whole model over the rewriting prompts (context templates x prompt + the KL prompt):
      FLOPs/edit ~= v_num_grad_steps x (2 + 2 f) x N_params x tokens,
      tokens = (1 + sum of template counts + 1) x (mean template length + PROMPT_TOKENS)
  where f is the fraction of layers above the last edited layer: the backward pass needs only
  activation gradients from the loss down to the edited layer (no weight gradients; the usual
  6 N per token of training is the upper bound); plus the keys' forward passes, 2 N x tokens per
  edited layer; plus the float64 solves: ROME factors C once per segment (d_in^3 / 3) and solves
  with it per edit; MEMIT, EMMET and AlphaEdit solve a fresh d_in x d_in system per edited layer
  per edit (2/3 d_in^3).
  The v* optimization stops early once the new target's loss is below 5e-2, so the step count is
  an upper bound, and so is the estimate for edits that converge fast.
  A method's work before its first edit (its cost spec's begin_flops, editscale.edit.cost, e.g. an anchor of bare-prompt v*
  optimizations, in optimization steps over PROMPT_TOKENS-token prompts; an upper bound since
  they stop early as the edits do) is counted once per chain, in the first segment's job.
  Seconds = FLOPs / (the device's measured matmul rate x EFFICIENCY). The rate is measured in a
  ~0.3 s matmul loop on the device editscale would use (fp32 and fp64); `--flops` overrides it.
  Evaluation: forward passes, 2 N FLOPs per token, counted by each metric's `cost` (in its module,
  editscale.evaluate.metrics): tokens per case for the edit scores after every edit, per earlier
  edit re-scored by history (all k earlier edits at checkpoint k, or min(k, sample)), the
  downstream task prompts (few-shot context + item; measured from the task files when present),
  generation (n_prompts x max_new_tokens, decoding at DECODE_EFFICIENCY) and perplexity (heldout
  tokens); each job also loads the model (bytes / LOAD_BYTES_PER_S).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping

from .models.registry import arch_spec, model_config, module_shapes, n_params
from .workflow import edited_modules, memory_modules, run_hparams, stats_modules

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STUDY_SAVE_EVERY = 20
PROMPT_TOKENS = 12  # edit prompt with subject + target tokens (CounterFact: ~10 + 2)
# target tokens per case: geofacts on SmolLM2's tokenizer has 1.79 (per-token factors measured at
# 166 kB/edit against 92.9 kB per rank, benchmarks/RESULTS.md 1b)
TARGET_TOKENS = 1.8
EFFICIENCY = 0.5  # fraction of the matmul rate a transformer pass of a few hundred tokens reaches
DECODE_EFFICIENCY = 0.05  # token-by-token generation is latency bound
LOAD_BYTES_PER_S = 1e9
DEFAULT_STARTUP_S = 8.0  # python + torch + transformers imports of one job, 2-core VM
SHIPPED_CALIBRATION = Path(__file__).with_name("doctor_calibration.json")


# bytes per edit and edited (d_out x d_in) module, by the method's update kind (weights.Update)
UPDATE_BYTES = {
    "lowrank": lambda o, i: 4 * (o + i),                    # u, v fp32
    "masked": lambda o, i: 8 * (o + i) + -(-o * i // 8),    # u, v fp64 + one mask bit per entry
    "dense": lambda o, i: 4 * o * i,                        # the matrix, fp32
}


def storage_estimate(run: dict, shapes: dict[str, tuple[int, int]], params: int | None, dtype: str = "float32",
                     stats_modules: list[str] | None = None, update_kind: str = "lowrank", rank: float = 1.0,
                     cost=None) -> dict[str, Any]:
    """Bytes of the run's checkpoints (see module doc); exact for the tensors, HDF5 overhead aside;
    `rank`: the stored factors' rank per edit and module (editscale.edit.cost.CostSpec.factor_rank);
    a memory method's bytes from its cost spec (`cost.memory_op_bytes`, `cost.memory_bytes`), and
    the method state every factors file also holds (`cost.state_bytes`; factors_per_checkpoint
    counts the last checkpoint's, the largest)."""
    n, seg = run["n_edits"], run["segment"]
    n_ckpt = n // seg
    if update_kind == "memory":  # each edit's memory ops; a checkpoint holds the memory so far, no dense delta
        per_edit = int(round(sum(cost.memory_op_bytes(o, i) for o, i in shapes.values())))
        held = [sum(cost.memory_bytes(c * seg, o, i) for o, i in shapes.values()) for c in range(1, n_ckpt + 1)]
        delta_ckpt, deltas_total = int(round(held[-1])) if held else 0, int(round(sum(held)))
        factors_ckpt = seg * per_edit
    else:
        per_edit = int(round(rank * sum(UPDATE_BYTES[update_kind](o, i) for o, i in shapes.values())))
        factors_ckpt = seg * per_edit
        delta_ckpt = sum(4 * o * i for o, i in shapes.values())
        deltas_total = n_ckpt * delta_ckpt
    # the method state each factors file carries (editscale.edit.cost.CostSpec.state_bytes)
    states = [cost.state_bytes(c * seg, shapes) if cost is not None else 0.0 for c in range(1, n_ckpt + 1)]
    state_ckpt, state_total = (int(round(states[-1])) if states else 0), int(round(sum(states)))
    factors_total = n_ckpt * factors_ckpt + state_total
    factors_ckpt += state_ckpt
    study_save = None if params is None else params * DTYPE_BYTES[dtype]
    n_saves = n // STUDY_SAVE_EVERY
    stats = sum(8 * shapes[m][1] ** 2 for m in (stats_modules if stats_modules is not None else shapes))
    return {
        "modules": {m: list(s) for m, s in shapes.items()},
        "checkpoints": n_ckpt,
        "factor_bytes_per_edit": per_edit,
        "factors_per_checkpoint": factors_ckpt,
        "delta_per_checkpoint": delta_ckpt,
        "study_save_every": STUDY_SAVE_EVERY,
        "study_saves": n_saves,
        "study_per_save": study_save,
        "state_per_checkpoint": state_ckpt,
        "factors_total": factors_total,
        "deltas_total": deltas_total,
        "editscale_total": factors_total + deltas_total,
        "study_total": None if study_save is None else n_saves * study_save,
        "stats_bytes": stats,
    }


def _template_counts(hp: dict) -> tuple[int, float]:
    params = hp.get("context_template_length_params", [[5, 10], [10, 10]])
    n = 1 + sum(int(c) for _, c in params)
    mean_len = sum(int(length) * int(c) for length, c in params) / max(n, 1)
    return n, mean_len


def edit_flops(method: str, hp: dict, params: int, shapes: dict[str, tuple[int, int]], segment: int,
               n_layers: int | None = None) -> dict[str, float]:
    """FLOPs of one edit (see module doc): "model" (forward/backward passes, model dtype) and
    "solve" (float64 linear algebra). Per v* step and token: 2 N forward plus 2 N x (fraction of
    layers above the last edited one) backward, since only activation gradients are needed (no
    weight gradients; 6 N with them, the usual training figure, is the upper bound)."""
    from .edit.cost import method_cost

    cost = method_cost(method, hp)
    layers = [int(x) for x in hp.get("layers") or [0]]
    frac_above = 1.0 if not n_layers else max(n_layers - max(layers), 1) / n_layers
    per_token = (2 + 2 * frac_above) * params
    if cost.solve == "none":  # fine-tuning: forward + backward with weight gradients per step
        steps = int(hp.get("num_steps", 1))
        return {"model": steps * 6 * params * 2 * PROMPT_TOKENS, "solve": 0.0, "tokens": 2 * PROMPT_TOKENS, "steps": steps,
                "flops_per_token_step": 6 * params, "template_tokens": 0.0}
    if cost.solve == "memory":  # n_iter forward + activation backward passes to the memory's layer (GRACE, WISE)
        lowest = int(hp.get("layer", 0))
        frac = 1.0 if not n_layers else max(n_layers - lowest, 1) / n_layers
        steps = int(hp.get("n_iter", 1))
        per_tok = (2 + 2 * frac) * params
        prompts, tokens = cost.value_prompts()
        return {"model": float(steps * per_tok * prompts * tokens), "solve": 0.0, "tokens": float(prompts * tokens), "steps": steps,
                "flops_per_token_step": per_tok, "template_tokens": 0.0}
    if cost.solve == "gradient":  # one forward + activation backward to the lowest edited layer
        lowest = min(int(x) for k in ("mlp_in_layers", "mlp_up_layers", "layers") for x in hp.get(k) or [0])
        frac = 1.0 if not n_layers else max(n_layers - lowest, 1) / n_layers
        per_tok = (2 + 2 * frac) * params
        solve = sum(2 / 3 * d**3 + 2 * d**2 for _, d in shapes.values())
        return {"model": float(per_tok * PROMPT_TOKENS), "solve": float(solve), "tokens": float(PROMPT_TOKENS), "steps": 1,
                "flops_per_token_step": per_tok, "template_tokens": 0.0}
    n_tpl, mean_len = _template_counts(hp)
    tokens = (n_tpl + 1) * (mean_len + PROMPT_TOKENS)
    # a plugin method whose hparams name no step count (and no cost spec) counts one optimization step
    steps = int(hp.get("v_num_grad_steps", 1))
    model = steps * per_token * tokens + len(shapes) * 2 * params * n_tpl * (mean_len + PROMPT_TOKENS)
    d_ins = [i for _, i in shapes.values()]
    if cost.solve == "per_edit":
        solve = sum(2 / 3 * d**3 + 2 * d**2 for d in d_ins)
    else:  # "per_segment" (ROME family): one Cholesky per segment, a triangular solve per edit
        solve = sum(d**3 / 3 / segment + 2 * d**2 for d in d_ins)
    solve += cost.extra_solve_flops(shapes)
    return {"model": float(model), "solve": float(solve), "tokens": float(tokens), "steps": steps,
            "flops_per_token_step": per_token, "template_tokens": float(n_tpl * mean_len),
            "begin": float(cost.begin_flops(per_token * PROMPT_TOKENS))}


# ---------------------------------------------------------------------------------------------
# Jobs and their time: every job the workflow runs for a config, with its compute, and the time
# model that turns compute into seconds:
#     seconds = startup_s + model bytes / load_bytes_per_s + factor[kind] x compute seconds,
#     compute seconds = FLOPs / (matmul rate x EFFICIENCY) (+ fp64 solves at the fp64 rate, + decode
#     FLOPs at DECODE_EFFICIENCY),
# or fixed[kind] seconds for kinds without model compute (the report). The factors are fitted from
# the Snakemake benchmark records of a finished run (editscale.calibration); they absorb what the
# FLOP count leaves out (small matmuls, Python overhead, two jobs sharing the cores).


@dataclass(frozen=True)
class Job:
    kind: str  # "edit:<method>", "metric:<name>" ("metric:evaluate": a checkpoint job), "corpus", "stats", "context_templates", "model", "report_tables", ...
    record: str  # its Snakemake benchmark record (rules/*.smk `benchmark:`)
    run: str | None = None  # None: shared by the runs (model, corpus, stats, report)
    flops: float = 0.0  # model-dtype matmul FLOPs
    flops64: float = 0.0  # float64 solves
    decode_flops: float = 0.0  # token-by-token generation
    model_bytes: int = 0  # what the job loads
    threads: int = 1  # the rule's `threads:` (rules/stats.smk: corpus and stats take 2)
    model: str | None = None  # the model of a shared job (model, corpus, stats, nullspace)
    uses_device: bool = False  # runs its model on the configured device (editscale.memory: GPU or host)
    device_extra: float = 0.0  # bytes its working phase holds beyond the weights (editscale.memory)
    dtype: str = "float32"  # the model's dtype (half precision on the CPU has its own memory fit)
    cpu_processes: int = 1  # processes that each hold the model when it runs on the CPU (self-sampling: one per thread)

    def compute_seconds(self, rate32: float, rate64: float | None) -> float:
        r64 = rate64 or rate32 / 2
        return (self.flops / (rate32 * EFFICIENCY) + self.flops64 / (r64 * EFFICIENCY)
                + self.decode_flops / (rate32 * DECODE_EFFICIENCY))


@dataclass(frozen=True)
class Calibration:
    """The time model's constants (see above); `source` says where they were measured."""

    startup_s: float = DEFAULT_STARTUP_S
    load_bytes_per_s: float = LOAD_BYTES_PER_S
    factors: dict = field(default_factory=dict)  # kind -> multiplier of the compute seconds (1 if absent)
    fixed: dict = field(default_factory=dict)  # kind -> seconds of a job without model compute
    rate32: float | None = None  # the matmul rates the factors were fitted at
    rate64: float | None = None
    machine: str = ""  # doctor.machine_fingerprint() of the machine it was fitted on
    source: str = "uncalibrated FLOP model"
    memory: dict = field(default_factory=dict)  # kind -> [a, b]: peak RSS = a x model bytes + b (editscale.memory)
    memory_source: str = ""

    def factor(self, kind: str) -> float:
        if kind in self.factors:
            return float(self.factors[kind])
        family = kind.split(":")[0] + ":*"  # e.g. a method never calibrated: the mean of its family
        return float(self.factors.get(family, 1.0))

    def seconds(self, job: Job, rate32: float, rate64: float | None) -> float:
        if job.kind in self.fixed:
            return float(self.fixed[job.kind])
        return self.startup_s + job.model_bytes / self.load_bytes_per_s + self.factor(job.kind) * job.compute_seconds(rate32, rate64)

    def to_json(self) -> dict:
        return {"startup_s": self.startup_s, "load_bytes_per_s": self.load_bytes_per_s, "factors": dict(self.factors),
                "fixed": dict(self.fixed), "rate32": self.rate32, "rate64": self.rate64, "machine": self.machine,
                "source": self.source, "memory": dict(self.memory), "memory_source": self.memory_source}

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        known = {"startup_s", "load_bytes_per_s", "factors", "fixed", "rate32", "rate64", "machine", "source", "memory", "memory_source"}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_calibration(path: str | Path | None = None) -> Calibration:
    """A calibration file (`editscale doctor --benchmarks ... --save-calibration FILE`); default: the
    one shipped with editscale, measured on the 2-core CPU machine (its `source` says which run)."""
    import json

    from .io import EditscaleError

    path = Path(path) if path else SHIPPED_CALIBRATION
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise EditscaleError(f"calibration file {path}: {exc}") from None


def _model_bytes(config: dict, model: str, root) -> tuple[int, int | None, Any]:
    spec = config["models"][model]
    cfg, _ = model_config(config, model, root)
    params = n_params(cfg) if cfg is not None else int(spec.get("params_m", 150) * 1e6)
    return params, params * DTYPE_BYTES[spec.get("dtype", "float32")], cfg


def run_jobs(config: dict, run: dict, root: str | Path = ".") -> list[Job]:
    """The edit, template and evaluation jobs of one run, with their compute."""
    from .evaluate.registry import METRICS
    from .layout import RESULTS
    from .registry import resolve
    from .workflow import checkpoint_metrics, metric_grid, segment_ends

    params, model_bytes, cfg = _model_bytes(config, run["model"], root)
    if cfg is None:
        return []
    shapes = module_shapes(cfg, edited_modules(config, run) or memory_modules(config, run))
    hp = run_hparams(run)
    fl = edit_flops(run["method"], hp, params, shapes, run["segment"], getattr(cfg, "num_hidden_layers", None))
    bench = RESULTS / "benchmarks" / run["name"]
    seg = run["segment"]
    dtype = config["models"][run["model"]].get("dtype", "float32")
    from .edit.cost import method_cost

    edit_extra = edit_job_memory(method_cost(run["method"], hp), cfg, dtype, shapes)
    edit_extra = edit_extra["total"] - edit_extra["weights"]
    jobs = [Job("context_templates", str(bench / "context_templates.tsv"), run["name"],
                decode_flops=2.0 * params * fl.get("template_tokens", 0.0), model_bytes=model_bytes, uses_device=True,
                device_extra=inference_extra(cfg, dtype, TEMPLATE_TOKENS, TEMPLATE_TOKENS))]
    jobs += [Job(f"edit:{run['method']}", str(bench / f"edit_segment_{k:06d}.tsv"), run["name"],
                 flops=seg * fl["model"] + (fl.get("begin", 0.0) if k == seg else 0.0),  # begin: once, in the first segment
                 flops64=seg * fl["solve"], model_bytes=model_bytes, uses_device=True, device_extra=edit_extra)
             for k in segment_ends(run)]
    scoring = inference_extra(cfg, dtype, SCORING_TOKENS, LOGIT_ROWS)
    evaluation = max(scoring, inference_extra(cfg, dtype, PERPLEXITY_TOKENS, PERPLEXITY_TOKENS))
    corpus = config["corpora"][run["corpus"]]
    grouped = set(checkpoint_metrics())
    checkpoint: dict[int, list[float]] = {}  # k -> [flops, decode flops, loads the model]
    for metric in METRICS.values():
        section = (config.get("metrics") or {}).get(metric.name) or {}  # defaults filled in by load_config
        # each metric's cost(run, section, corpus, flops_per_token, k) -> (forward FLOPs, decode FLOPs) of its
        # job at k (editscale.evaluate.registry); a plugin metric without one is counted as model load only
        cost = resolve(metric.cost, what=f"metric {metric.name!r}: cost") if metric.cost else None
        for k in metric_grid(config, run, metric.name):
            flops, decode = cost(run, section, corpus, 2.0 * params, k) if cost else (0.0, 0.0)
            if metric.name in grouped:  # one checkpoint job per k for all of them: one start-up, one load
                acc = checkpoint.setdefault(k, [0.0, 0.0, 0.0])
                acc[0], acc[1], acc[2] = acc[0] + float(flops), acc[1] + float(decode), max(acc[2], float(metric.device))
            else:
                jobs.append(Job(f"metric:{metric.name}", str(bench / f"{metric.name}_{k:06d}.tsv"), run["name"], flops=float(flops),
                                decode_flops=float(decode), model_bytes=model_bytes if metric.device else 0,
                                uses_device=bool(metric.device), device_extra=scoring if metric.device else 0.0))
    jobs += [Job("metric:evaluate", str(bench / f"evaluate_{k:06d}.tsv"), run["name"], flops=f, decode_flops=d, model_bytes=model_bytes if dev else 0,
                 uses_device=bool(dev), device_extra=evaluation if dev else 0.0)
             for k, (f, d, dev) in sorted(checkpoint.items())]
    return [dataclasses.replace(j, dtype=dtype) for j in jobs]


def shared_jobs(config: dict, root: str | Path = ".") -> list[Job]:
    """The jobs the runs share: model preparation, corpus sample, statistics, null-space
    projections, report, audit."""
    from .layout import RESULTS
    from .workflow import projection_files

    bench = RESULTS / "benchmarks"
    jobs, seen = [], set()
    for run in config["runs"]:
        params, model_bytes, cfg = _model_bytes(config, run["model"], root)
        model = run["model"]
        dtype = config["models"][model].get("dtype", "float32")
        corpus = config["corpora"][run["corpus"]]
        tokens = float(corpus.get("n_tokens", 0)) + float(corpus.get("heldout_tokens", 0))
        decode = 2.0 * params * tokens if corpus.get("kind") == "self_sample" else 0.0
        shapes = module_shapes(cfg, edited_modules(config, run)) if cfg is not None else {}
        wanted = [Job("model", str(bench / "model" / f"{model}.tsv"), model_bytes=model_bytes, model=model),
                  Job("corpus", str(bench / "corpus" / model / f"{run['corpus']}.tsv"), decode_flops=decode,
                      flops=0.0 if decode else 2.0 * params * tokens, model_bytes=model_bytes, threads=2, model=model,
                      uses_device=True, device_extra=corpus_extra(cfg, dtype, corpus) if cfg is not None else 0.0,
                      cpu_processes=2 if decode else 1)]  # SamplingPool: one worker per thread (threads=2)
        wanted += [Job("stats", str(bench / "stats" / model / run["corpus"] / f"{m}.tsv"),
                       flops=2.0 * params * float(corpus.get("n_tokens", 0)), model_bytes=model_bytes, threads=2, model=model,
                       uses_device=True, device_extra=stats_extra(shapes[m][1], dtype, corpus) if m in shapes else 0.0)
                   for m in stats_modules(config, run)]
        for m, path in projection_files(config, run).items():
            p = Path(path)
            d = shapes[m][1] if m in shapes else 0
            wanted.append(Job("nullspace", str(bench / "stats" / model / run["corpus"] / f"{p.parent.name}-{m}-{p.name[len(m) + 2:-3]}.tsv"),
                              flops64=10.0 * d**3, model=model, device_extra=NULLSPACE_MATRICES * 8.0 * d * d))
        for job in wanted:
            if job.record not in seen:
                seen.add(job.record)
                jobs.append(dataclasses.replace(job, dtype=dtype))
    biggest = max((_model_bytes(config, m, root)[1] for m in {r["model"] for r in config["runs"]}), default=0)
    from .workflow import study_benchmark

    jobs += [Job("report_tables", study_benchmark(config, "report_tables")), Job("report_plots", study_benchmark(config, "report_plots")),
             Job("audit", study_benchmark(config, "audit"), model_bytes=biggest)]
    return jobs


def config_jobs(config: dict, root: str | Path = ".") -> list[Job]:
    return shared_jobs(config, root) + [j for run in config["runs"] for j in run_jobs(config, run, root)]


def time_estimate(config: dict, rate32: float, rate64: float | None, calibration: Calibration, cores: int,
                  root: str | Path = ".", done: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Seconds of every job, per run (edit chain, evaluation) and for the whole config: the sum of job
    times, and the wall time of `snakemake --cores {cores}` = max(the longest chain of dependent jobs,
    the core-seconds / cores), a job holding min(its threads, cores) cores (the corpus and the
    statistics run two threads: on 2 cores nothing runs beside them).

    `done` (record -> measured seconds: the jobs of a study in progress that have finished) makes
    it the estimate of what is left: those jobs count 0 and the chains start where they stopped
    (a job in flight has no record yet and counts whole); jobs_left says how many are left."""
    done = done or {}

    def seconds(j: Job) -> float:
        return 0.0 if j.record in done else calibration.seconds(j, rate32, rate64)

    shared = shared_jobs(config, root)
    sec = {j.record: seconds(j) for j in shared}
    core_s = sum(sec[j.record] * min(j.threads, max(cores, 1)) for j in shared)
    setup = {}
    for run in config["runs"]:  # model -> corpus -> the slowest stats file, before the run's first edit
        rj = [j for j in shared if j.kind in ("model", "corpus", "stats") and f"/{run['model']}" in j.record
              and (j.kind == "model" or f"/{run['corpus']}" in j.record)]
        setup[run["name"]] = sum(sec[j.record] for j in rj if j.kind != "stats") + max(
            [sec[j.record] for j in rj if j.kind == "stats"], default=0.0)
    runs, total, critical = {}, sum(sec.values()), 0.0
    for run in config["runs"]:
        jobs = run_jobs(config, run, root)
        s = {j.record: seconds(j) for j in jobs}
        edit = sum(s[j.record] for j in jobs if j.kind.startswith("edit:"))
        evaluation = sum(s[j.record] for j in jobs if j.kind.startswith("metric:"))
        templates = sum(s[j.record] for j in jobs if j.kind == "context_templates")
        last = max([s[j.record] for j in jobs if j.kind.startswith("metric:") and j.record.endswith(f"_{run['n_edits']:06d}.tsv")],
                   default=0.0)
        n_edit_jobs = sum(j.kind.startswith("edit:") for j in jobs)
        left = [j for j in jobs if j.record not in done]
        edits_left = sum(j.kind.startswith("edit:") for j in left)
        edits = min(edits_left * run["segment"], run["n_edits"]) if done else run["n_edits"]
        runs[run["name"]] = {"edit_chain_s": edit, "seconds_per_edit": (edit / edits) if jobs and edits else None,
                             "segment_s": edit / max(edits_left if done else n_edit_jobs, 1), "eval_s": evaluation,
                             "eval_jobs": len(jobs) - 1 - n_edit_jobs, "jobs_left": len(left), "edit_jobs_left": edits_left,
                             "jobs": {j.record: s[j.record] for j in jobs}}
        total += sum(s.values())
        core_s += sum(s[j.record] * min(j.threads, max(cores, 1)) for j in jobs)
        critical = max(critical, setup[run["name"]] + templates + edit + last)
    report_s = sum(sec[j.record] for j in shared if j.kind.startswith("report"))
    critical += report_s
    return {"runs": runs, "shared_s": sum(sec.values()), "total_job_s": total, "critical_path_s": critical, "cores": cores,
            "wall_s": max(critical, core_s / max(cores, 1)), "calibration": calibration.source,
            "shared_jobs": sec, "jobs_left": sum(j.record not in done for j in shared) + sum(r["jobs_left"] for r in runs.values())}


# Activation bytes kept for the backward pass of one optimization step, per (token x hidden x layer
# in the graph x dtype byte): fitted to ROME's peak at GPT-2 XL's shape on one H200 (benchmarks/
# RESULTS.md section 8), where the optimization sets the peak; holds the other nine there to 10 %.
ACTIVATION_FACTOR = 28.0


def edit_job_memory(cost, cfg, dtype: str, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Peak device bytes of an edit job, by part: the weights in `dtype`; what the method keeps
    for the segment (`CostSpec.device_matrices`: float64 d_in x d_in per edited module); the
    WeightState (W0 and the delta, float32, per edited matrix); and the larger of the two phases
    of an edit, the optimization's activations (`CostSpec.value_prompts` x hidden x the layers
    from the lowest edited one up x ACTIVATION_FACTOR) and one module's solve (transient
    matrices). Peaks at GPT-2 XL (float32) and Llama-3-8B (bfloat16) shapes on an H200 sit within
    10 % of it (tests/test_doctor_memory.py)."""
    from .edit.subject_keys import layer_of
    from .models.registry import meta_model

    model = meta_model(cfg)
    dbytes = DTYPE_BYTES[dtype]
    params = n_params(cfg)
    resident, transient = cost.device_matrices()
    d_in = {m: i for m, (_, i) in shapes.items()}
    n_prompts, tokens = cost.value_prompts()
    lowest = min(layer_of(model, m) for m in shapes)
    n_layer = int(getattr(cfg, arch_spec(cfg.model_type).n_layers_attr))
    hidden = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    activations = ACTIVATION_FACTOR * n_prompts * tokens * hidden * (n_layer - lowest) * dbytes
    solve = transient * 8 * max(d ** 2 for d in d_in.values())
    parts = {
        "weights": float(params * dbytes),
        "method_state": float(resident * sum(8 * d ** 2 for d in d_in.values())),
        "weight_state": float(sum(8 * o * i for o, i in shapes.values())),
        "edit_phase": float(max(activations, solve)),
    }
    parts["total"] = sum(parts.values())
    return parts


def edit_job_memory_parts(config: dict, run_name: str, root: str | Path = ".") -> str:
    """"weights 15.0, method state 7.7, ..." (GiB) of a run's edit job, for the plan-time error."""
    run = next(r for r in config["runs"] if r["name"] == run_name)
    est = run_estimate(config, run, root).get("edit_job_memory")
    if not est:
        return ""
    return ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.1f}" for k, v in est.items() if k != "total")


# What a job's working phase holds beyond the weights (editscale.memory's module doc says where
# each figure comes from): forward passes without gradients, the statistics pass, sampling.
PERPLEXITY_TOKENS = 2048  # perplexity's batch: as many sequences as fit 2,048 tokens, logits at all of them
SCORING_TOKENS = 16384  # evaluate.scoring.DEFAULT_MAX_BATCH_TOKENS
LOGIT_ROWS = 64  # prompt scoring reads logits at the target positions only: a few per row of a batch
TEMPLATE_TOKENS = 512  # context templates: a few dozen short generations
STATS_ACT = 10.0  # d_in-wide activations per token of the statistics pass, in the model's dtype (H200-fitted)
NULLSPACE_MATRICES = 5  # C, its eigenvectors, the projector and work arrays, float64 d x d


def _dims(cfg) -> tuple[int, int, int, int]:
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))
    d_ff = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0))
    return hidden, d_ff, layers, int(cfg.vocab_size)


def inference_extra(cfg, dtype: str, tokens: int, logit_rows: int) -> float:
    """A forward pass without gradients over `tokens` tokens: the MLP-wide and residual-wide
    activations of one layer in the model's dtype, and float32 logits plus log-softmax at
    `logit_rows` positions."""
    if cfg is None:
        return 0.0
    hidden, d_ff, _, vocab = _dims(cfg)
    return float(tokens * (d_ff + 4 * hidden) * DTYPE_BYTES[dtype] + logit_rows * vocab * 8)


def stats_extra(d_in: int, dtype: str, corpus: dict) -> float:
    """One module's statistics job: the float64 accumulator, the batch's keys in float64 and the
    d_in-wide activations of one forward pass."""
    bt = int(corpus.get("batch_size", 32)) * int(corpus.get("seq_len", 128))
    return float(8 * d_in * d_in + bt * d_in * (8 + STATS_ACT * DTYPE_BYTES[dtype]))


def corpus_extra(cfg, dtype: str, corpus: dict) -> float:
    """Sampling the corpus from the model: the KV cache of a batch and one step's logits."""
    hidden, _, layers, vocab = _dims(cfg)
    b, t = int(corpus.get("batch_size", 32)), int(corpus.get("seq_len", 128))
    if corpus.get("kind") != "self_sample":
        return 0.0
    return float(2 * layers * b * t * hidden * DTYPE_BYTES[dtype] + b * vocab * 8)


def run_estimate(config: dict, run: dict, root: str | Path = ".") -> dict[str, Any]:
    """Shapes, storage, per-edit FLOPs and device memory of one run (time: time_estimate)."""
    from .workflow import checkpoint_metrics, metric_grid, metrics_registry

    spec = config["models"][run["model"]]
    dtype = spec.get("dtype", "float32")
    cfg, where = model_config(config, run["model"], root)
    est: dict[str, Any] = {"run": run["name"], "model": run["model"], "method": run["method"], "n_edits": run["n_edits"],
                           "segment": run["segment"], "shapes_from": where, "dtype": dtype}
    modules = edited_modules(config, run) or memory_modules(config, run)
    if cfg is None:
        params = int(spec.get("params_m", 150) * 1e6)
        est.update(params=params, params_from="params_m", storage=None, edit=None, eval=None)
        return est
    params = n_params(cfg)
    shapes = module_shapes(cfg, modules)
    hp = run_hparams(run)
    est["params"] = params
    from .edit.cost import method_cost
    from .edit.methods import get_method

    cls, cost = get_method(run["method"], hp), method_cost(run["method"], hp)
    est["storage"] = storage_estimate(run, shapes, params, dtype, stats_modules(config, run), cls.update_kind, cost.factor_rank(TARGET_TOKENS), cost)
    fl = edit_flops(run["method"], hp, params, shapes, run["segment"], getattr(cfg, "num_hidden_layers", None))
    est["edit"] = {"flops_model": fl["model"], "flops_solve_fp64": fl["solve"], "tokens_per_step": fl["tokens"],
                   "steps": fl["steps"]}
    # one job per segment for the edit scores, one checkpoint job per k of any other metric's grid
    grouped = checkpoint_metrics()
    est["eval_jobs"] = sum(len(metric_grid(config, run, m)) for m in metrics_registry() if m not in grouped) + len(
        set().union(*(metric_grid(config, run, m) for m in grouped)) if grouped else set())
    est["memory"] = {
        "weights": params * DTYPE_BYTES[dtype],
        "stats_on_device": sum(8 * shapes[m][1] ** 2 for m in stats_modules(config, run)),
        "weight_state": sum(8 * o * i for o, i in shapes.values()),
    }
    est["edit_job_memory"] = edit_job_memory(cost, cfg, dtype, shapes)
    return est
