"""`editscale doctor`: what this machine has, and what a config will cost in time and disk.

Machine: torch version, the device editscale would use (`pick_device("auto")`: cuda if available,
else cpu), GPU name and memory, CPU count, RAM, free disk.

Per run of the config, from the model's shapes (a meta-device model built from its config: the
model's own config.json once prepared, else the Hugging Face cache, else the published configs in
KNOWN_CONFIGS; no weights are read or downloaded):

Storage (exact up to HDF5 overhead of a few KB per file; 1 MB = 1e6 bytes):
  factors   results/{run}/factors/{k}.h5: every update of the segment as fp32 factors; one edit of a
            rank-one method writes u (d_out) and v (d_in) per edited module:
                bytes/edit = sum over edited modules of 4 (d_out + d_in)
            (plus ~100 B of per-edit log and a few KB of attributes per file, not counted)
            (MEMIT with edits_per_step = b writes rank-b factors once per step: the same total.)
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
  Seconds = FLOPs / (the device's measured matmul rate x EFFICIENCY). The rate is measured in a
  ~0.3 s matmul loop on the device editscale would use (fp32 and fp64); `--flops` overrides it.
  Evaluation: forward passes, 2 N FLOPs per token: SCORE_TOKENS_PER_CASE tokens per case for the
  edit scores after every edit, HISTORY_TOKENS_PER_CASE per earlier edit re-scored by history (all
  k earlier edits at checkpoint k), the downstream task prompts (few-shot context + item; measured
  from the task files when present), generation (n_prompts x max_new_tokens, decoding at
  DECODE_EFFICIENCY) and perplexity (heldout tokens); each job also loads the model
  (bytes / LOAD_BYTES_PER_S).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch


log = logging.getLogger(__name__)

# Published configs (config.json of each repo) so that shapes are known before any download.
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    "hf:gpt2-xl": ("gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "hf:openai-community/gpt2-xl": ("gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "hf:EleutherAI/gpt-j-6B": ("gptj", {"vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
                                        "rotary_dim": 64}),
    "embedded:smollm2-135m-instruct": ("llama", {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                                                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                                 "max_position_embeddings": 8192, "tie_word_embeddings": True}),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
STUDY_SAVE_EVERY = 20
PROMPT_TOKENS = 12  # edit prompt with subject + target tokens (CounterFact: ~10 + 2)
SCORE_TOKENS_PER_CASE = 200  # edit scores: 1 edit + 2 paraphrase + 10 neighborhood prompts, ~16 tokens each
HISTORY_TOKENS_PER_CASE = 60  # history: the edit and 2 paraphrase prompts
DEFAULT_TASK_ITEMS = 500
DEFAULT_TOKENS_PER_ITEM = 300
CHARS_PER_TOKEN = 4.0
EFFICIENCY = 0.5  # fraction of the matmul rate a transformer pass of a few hundred tokens reaches
DECODE_EFFICIENCY = 0.05  # token-by-token generation is latency bound
LOAD_BYTES_PER_S = 1e9


# ---------------------------------------------------------------------------------------------
# Shapes from configs


def _config_from_known(source: str):
    from transformers import AutoConfig

    model_type, kwargs = KNOWN_CONFIGS[source]
    return AutoConfig.for_model(model_type, **kwargs)


def model_config(config: dict, name: str, root: str | Path = ".") -> tuple[Any | None, str]:
    """(transformers config or None, where it came from) for a configured model; reads no weights."""
    from transformers import AutoConfig

    spec = config["models"][name]
    source = spec["source"]
    prepared = Path(root) / "data" / "models" / name / "config.json"
    if prepared.exists():
        return AutoConfig.from_pretrained(str(prepared.parent)), str(prepared)
    kind, _, ref = source.partition(":")
    if kind == "local" and (Path(ref).expanduser() / "config.json").exists():
        return AutoConfig.from_pretrained(str(Path(ref).expanduser())), ref
    if kind == "tiny":
        from .fetch import build_tiny_model

        return build_tiny_model(ref)[0].config, "tiny model"
    if kind == "hf":
        try:
            return AutoConfig.from_pretrained(ref, revision=spec.get("revision"), local_files_only=True), "Hugging Face cache"
        except Exception:  # not cached: fall through to the published table
            pass
    if source in KNOWN_CONFIGS:
        return _config_from_known(source), "published config (editscale.models.doctor.KNOWN_CONFIGS)"
    return None, "unknown until the model is prepared (rule `model`)"


_META: dict[str, torch.nn.Module] = {}


def meta_model(cfg):
    """The model of `cfg` on the meta device (shapes only, no memory); cached per config."""
    from transformers import AutoModelForCausalLM

    key = cfg.to_json_string(use_diff=False)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = AutoModelForCausalLM.from_config(cfg)
    return _META[key]


def n_params(cfg) -> int:
    return sum(p.numel() for p in meta_model(cfg).parameters())


def module_shapes(cfg, modules: list[str]) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} of edited matrices, in editscale's (out, in) orientation; a missing
    module name is an EditscaleError listing the nearest names."""
    from .registry import edited_weight, to_math

    model = meta_model(cfg)
    return {m: tuple(to_math(model, edited_weight(model, m)).shape) for m in modules}


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
    from .load import pick_device

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


def measure_flops(device: str | torch.device = "cpu", dtype=torch.float32, seconds: float = 0.15) -> float:
    """Achieved matmul FLOP/s on `device` in `dtype` (a short loop; a rough, warm number)."""
    device = torch.device(device)
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


# ---------------------------------------------------------------------------------------------
# Estimates


def _hparams(run: dict) -> dict:
    from ..workflow import run_hparams

    return run_hparams(run)


def _grid(n: int, every: int) -> list[int]:
    from ..workflow import eval_grid

    return eval_grid(n, every)


def storage_estimate(run: dict, shapes: dict[str, tuple[int, int]], params: int | None, dtype: str = "float32",
                     stats_modules: list[str] | None = None) -> dict[str, Any]:
    """Bytes of the run's checkpoints (see module doc); exact for the tensors, HDF5 overhead aside."""
    n, seg = run["n_edits"], run["segment"]
    n_ckpt = n // seg
    per_edit = sum(4 * (o + i) for o, i in shapes.values())
    factors_ckpt = seg * per_edit
    delta_ckpt = sum(4 * o * i for o, i in shapes.values())
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
        "factors_total": n_ckpt * factors_ckpt,
        "deltas_total": n_ckpt * delta_ckpt,
        "editscale_total": n_ckpt * (factors_ckpt + delta_ckpt),
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
    from ..edit.methods import get_method

    cls = get_method(method)
    layers = [int(x) for x in hp.get("layers", [0])]
    frac_above = 1.0 if not n_layers else max(n_layers - max(layers), 1) / n_layers
    per_token = (2 + 2 * frac_above) * params
    if cls.solve_cost == "none":  # fine-tuning: forward + backward with weight gradients per step
        steps = int(hp["num_steps"])
        return {"model": steps * 6 * params * 2 * PROMPT_TOKENS, "solve": 0.0, "tokens": 2 * PROMPT_TOKENS, "steps": steps,
                "flops_per_token_step": 6 * params}
    n_tpl, mean_len = _template_counts(hp)
    tokens = (n_tpl + 1) * (mean_len + PROMPT_TOKENS)
    steps = int(hp["v_num_grad_steps"])
    model = steps * per_token * tokens + len(shapes) * 2 * params * n_tpl * (mean_len + PROMPT_TOKENS)
    d_ins = [i for _, i in shapes.values()]
    if cls.solve_cost == "per_edit":
        solve = sum(2 / 3 * d**3 + 2 * d**2 for d in d_ins)
    else:  # "per_segment" (ROME family): one Cholesky per segment, a triangular solve per edit
        solve = sum(d**3 / 3 / segment + 2 * d**2 for d in d_ins)
    return {"model": float(model), "solve": float(solve), "tokens": float(tokens), "steps": steps,
            "flops_per_token_step": per_token}


def _task_tokens(spec: dict) -> tuple[int, float, str]:
    """(items evaluated, tokens per item, basis) of one downstream task."""
    path = Path(str(spec.get("path", "")))
    shots = int(spec.get("n_shots", 4))
    n_eval = spec.get("n_eval", 100)
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines:
            chars = sum(len(ln) for ln in lines) / len(lines)
            items = min(n_eval, len(lines) - shots) if n_eval else len(lines) - shots
            return max(items, 0), (shots + 1) * chars / CHARS_PER_TOKEN, "file"
    items = n_eval or DEFAULT_TASK_ITEMS
    return items, DEFAULT_TOKENS_PER_ITEM * (shots + 1) / 5, "assumed"


def eval_estimate(run: dict, metrics: dict, corpus: dict, params: int) -> dict[str, Any]:
    """Jobs and forward-pass FLOPs of each metric over the run (decode FLOPs counted separately)."""
    n, seg = run["n_edits"], run["segment"]
    f = 2.0 * params
    out: dict[str, Any] = {}
    n_ckpt = n // seg
    out["edit_scores"] = {"jobs": n_ckpt, "flops": f * n * SCORE_TOKENS_PER_CASE, "decode_flops": 0.0}
    for name in ("history", "downstream", "generation", "perplexity", "weights"):
        cfg = metrics[name]  # defaults filled in by load_config (the schema)
        ks = _grid(n, int(cfg["eval_every"]))
        flops = decode = 0.0
        if name == "history":
            flops = f * sum(ks) * HISTORY_TOKENS_PER_CASE
        elif name == "downstream":
            per_ckpt = 0.0
            for spec in (cfg.get("tasks") or {}).values():
                items, tok_per_item, _ = _task_tokens(spec or {})
                per_ckpt += items * tok_per_item
            flops = f * per_ckpt * len(ks)
        elif name == "generation":
            decode = f * len(ks) * int(cfg["n_prompts"]) * (int(cfg["max_new_tokens"]) + 16)
        elif name == "perplexity":
            flops = f * len(ks) * int(corpus["heldout_tokens"])
        out[name] = {"jobs": len(ks), "flops": flops, "decode_flops": decode}
    return out


def run_estimate(config: dict, run: dict, rate32: float | None, rate64: float | None, root: str | Path = ".") -> dict[str, Any]:
    from ..workflow import edited_modules, stats_modules

    spec = config["models"][run["model"]]
    dtype = spec.get("dtype", "float32")
    cfg, where = model_config(config, run["model"], root)
    est: dict[str, Any] = {"run": run["name"], "model": run["model"], "method": run["method"], "n_edits": run["n_edits"],
                           "segment": run["segment"], "shapes_from": where, "dtype": dtype}
    modules = edited_modules(config, run)
    if cfg is None:
        params = int(spec.get("params_m", 150) * 1e6)
        est.update(params=params, params_from="params_m", storage=None, edit=None, eval=None)
        return est
    params = n_params(cfg)
    shapes = module_shapes(cfg, modules)
    hp = _hparams(run)
    est["params"] = params
    est["storage"] = storage_estimate(run, shapes, params, dtype, stats_modules(config, run))
    fl = edit_flops(run["method"], hp, params, shapes, run["segment"], getattr(cfg, "num_hidden_layers", None))
    est["edit"] = {"flops_model": fl["model"], "flops_solve_fp64": fl["solve"], "tokens_per_step": fl["tokens"],
                   "steps": fl["steps"]}
    ev = eval_estimate(run, config.get("metrics") or {}, config["corpora"][run["corpus"]], params)
    est["eval"] = ev
    model_bytes = params * DTYPE_BYTES[dtype]
    jobs = sum(v["jobs"] for v in ev.values())
    est["eval_jobs"] = jobs
    est["memory"] = {
        "weights": model_bytes,
        "stats_on_device": sum(8 * shapes[m][1] ** 2 for m in stats_modules(config, run)),
        "weight_state": sum(8 * o * i for o, i in shapes.values()),
    }
    if rate32:
        eff32 = rate32 * EFFICIENCY
        eff64 = (rate64 or rate32 / 2) * EFFICIENCY
        per_edit = fl["model"] / eff32 + fl["solve"] / eff64
        est["edit"]["seconds_per_edit"] = per_edit
        est["edit"]["chain_hours"] = per_edit * run["n_edits"] / 3600
        eval_s = sum(v["flops"] / eff32 + v["decode_flops"] / (rate32 * DECODE_EFFICIENCY) for v in ev.values())
        load_s = (jobs + run["n_edits"] // run["segment"]) * model_bytes / LOAD_BYTES_PER_S
        est["eval_hours"] = eval_s / 3600
        est["model_load_hours"] = load_s / 3600
    return est


def load_config(configfile: str | Path) -> dict:
    """The workflow's own loader (schema defaults, cross-checks): doctor accepts exactly what the
    workflow accepts."""
    from ..config import load_config as load

    return load(configfile)


def doctor(configfile: str | Path | None, bench: bool = True, flops: float | None = None, storage_only: bool = False,
           root: str | Path = ".") -> dict[str, Any]:
    report: dict[str, Any] = {}
    rate32 = rate64 = None
    if not storage_only:
        report["machine"] = machine_info(root)
        if flops:
            rate32, rate64 = float(flops), float(flops) / 2
        elif bench:
            dev = report["machine"]["device"]
            rate32 = measure_flops(dev, torch.float32)
            rate64 = measure_flops(dev, torch.float64)
        report["machine"]["matmul_flops_fp32"] = rate32
        report["machine"]["matmul_flops_fp64"] = rate64
    if configfile:
        config = load_config(configfile)
        report["config"] = str(configfile)
        report["runs"] = [run_estimate(config, r, rate32, rate64, root) for r in config["runs"]]
        report["gpu_requested"] = bool((config.get("resources") or {}).get("gpu", False))
    return report


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
                         f"{(m['matmul_flops_fp64'] or 0) / 1e9:.0f} GFLOP/s fp64 (estimates use x{EFFICIENCY})")
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
                         f"({fmt_bytes(st['factor_bytes_per_edit'])}/edit), dense delta {fmt_bytes(st['delta_per_checkpoint'])}; "
                         f"study's full-model save every {st['study_save_every']} edits: {fmt_bytes(st['study_per_save'])}")
            lines.append(f"  storage for the run: {st['checkpoints']} checkpoints = factors {fmt_bytes(st['factors_total'])} + "
                         f"deltas {fmt_bytes(st['deltas_total'])} = {fmt_bytes(st['editscale_total'])} "
                         f"(study: {st['study_saves']} saves = {fmt_bytes(st['study_total'])}); stats {fmt_bytes(st['stats_bytes'])}")
        ed = est.get("edit")
        if ed:
            lines.append(f"  one edit: {ed['steps']} steps x {ed['tokens_per_step']:.0f} tokens -> {ed['flops_model']:.2e} FLOPs "
                         f"(model) + {ed['flops_solve_fp64']:.2e} FLOPs (fp64 solves)")
            if "seconds_per_edit" in ed:
                lines.append(f"  time: ~{fmt_seconds(ed['seconds_per_edit'])} per edit, chain ~{fmt_seconds(ed['chain_hours'] * 3600)}; "
                             f"evaluation ({est['eval_jobs']} jobs) ~{fmt_seconds(est['eval_hours'] * 3600)} compute "
                             f"+ ~{fmt_seconds(est['model_load_hours'] * 3600)} loading the model")
            mem = est["memory"]
            need = mem["weights"] + mem["stats_on_device"] + mem["weight_state"]
            lines.append(f"  edit job device memory: weights {fmt_bytes(mem['weights'])} + stats {fmt_bytes(mem['stats_on_device'])} "
                         f"+ base/delta copies {fmt_bytes(mem['weight_state'])} = {fmt_bytes(need)} plus activations")
            if m and "gpu_memory_total" in m and need > m["gpu_memory_total"]:
                lines.append("  WARNING: more than this GPU's memory")
    if report.get("runs") is not None and m:
        if report.get("gpu_requested") and not m["cuda_available"]:
            lines.append("")
            lines.append("WARNING: the config requests a GPU (resources.gpu: true) but none is visible here")
        total = sum((e.get("storage") or {}).get("editscale_total", 0) for e in report["runs"])
        if total > m["disk_free"]:
            lines.append(f"WARNING: the runs need ~{fmt_bytes(total)} of checkpoints, more than the {fmt_bytes(m['disk_free'])} free")
    if report.get("runs"):
        lines.append("")
        lines.append("storage (1 MB = 1e6 bytes; see `editscale doctor --help` and docs/scale.md for the formulas)")
        lines.append(STORAGE_HEADER)
        lines.append("|" + "---|" * STORAGE_HEADER.count(" | ") + "---|")
        lines.extend(storage_rows(report))
    return "\n".join(lines).lstrip("\n")
