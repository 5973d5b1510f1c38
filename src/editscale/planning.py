"""Cost estimates of a study before it runs: checkpoint storage, edit and evaluation FLOPs, time
and device memory per run (what `editscale doctor` prints; the machine side is editscale.doctor).

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

from pathlib import Path
from typing import Any

from .models.registry import model_config, module_shapes, n_params
from .workflow import edited_modules, run_hparams, stats_modules

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
    from .edit.methods import get_method

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


# The evaluation cost of each metric over a run: fn(run, section, corpus, flops_per_token, ks) ->
# (forward FLOPs, decode FLOPs), with ks the metric's checkpoints; each metric names its own in
# the registry (Metric.cost), a plugin metric without one is counted as free (and reported so).


def edit_scores_cost(run, section, corpus, f, ks):
    return f * run["n_edits"] * SCORE_TOKENS_PER_CASE, 0.0


def history_cost(run, section, corpus, f, ks):
    return f * sum(ks) * HISTORY_TOKENS_PER_CASE, 0.0


def downstream_cost(run, section, corpus, f, ks):
    per_ckpt = 0.0
    for spec in (section.get("tasks") or {}).values():
        items, tok_per_item, _ = _task_tokens(spec or {})
        per_ckpt += items * tok_per_item
    return f * per_ckpt * len(ks), 0.0


def generation_cost(run, section, corpus, f, ks):
    return 0.0, f * len(ks) * int(section["n_prompts"]) * (int(section["max_new_tokens"]) + 16)


def perplexity_cost(run, section, corpus, f, ks):
    return f * len(ks) * int(corpus["heldout_tokens"]), 0.0


def no_model_cost(run, section, corpus, f, ks):
    """Metrics that never run the model (weights: norms of the stored factors)."""
    return 0.0, 0.0


def eval_estimate(config: dict, run: dict, params: int) -> dict[str, Any]:
    """Jobs and forward-pass FLOPs of each registered metric over the run (decode FLOPs apart)."""
    import importlib

    from .evaluate.registry import METRICS
    from .workflow import metric_grid

    out: dict[str, Any] = {}
    for metric in METRICS.values():
        ks = metric_grid(config, run, metric.name)
        flops = decode = 0.0
        if metric.cost:
            module, _, name = metric.cost.partition(":")
            cost = getattr(importlib.import_module(module), name)
            section = (config.get("metrics") or {}).get(metric.name) or {}  # defaults filled in by load_config
            flops, decode = cost(run, section, config["corpora"][run["corpus"]], 2.0 * params, ks)
        out[metric.name] = {"jobs": len(ks), "flops": float(flops), "decode_flops": float(decode), "cost_model": bool(metric.cost)}
    return out


def run_estimate(config: dict, run: dict, rate32: float | None, rate64: float | None, root: str | Path = ".") -> dict[str, Any]:
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
    hp = run_hparams(run)
    est["params"] = params
    est["storage"] = storage_estimate(run, shapes, params, dtype, stats_modules(config, run))
    fl = edit_flops(run["method"], hp, params, shapes, run["segment"], getattr(cfg, "num_hidden_layers", None))
    est["edit"] = {"flops_model": fl["model"], "flops_solve_fp64": fl["solve"], "tokens_per_step": fl["tokens"],
                   "steps": fl["steps"]}
    ev = eval_estimate(config, run, params)
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
