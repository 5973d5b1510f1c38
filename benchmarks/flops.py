"""The floor: the least arithmetic one ROME edit needs, against the time it takes.

One ROME edit is dominated by the value optimization: `steps + 1` forward passes of the rewriting
prompts (context templates + target) and the KL prompt through the blocks from the edited layer to
the loss layer, with the LM head only at the target positions, and `steps` backward passes
through the blocks above the edited layer (gradients with respect to activations only: no weight
gradients). The blocks below the edited layer run once (prefix reuse), and the keys need one
forward to the edited layer. FLOPs of a matrix product [n, a] x [a, b] count as 2 n a b;
attention adds 4 n T d per layer (scores and weighted sum); norms and activations are ignored.
The floor time divides by the rate this machine reaches on a large fp32 matrix product.
"""

from __future__ import annotations

import time

import torch

from editscale.edit import encoding, templating, value_optimization
from editscale.models.registry import get_module, layer_name, mlp_out_name, n_layers

from .prepare import Bench


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _block_matmul_params(model, i: int) -> int:
    """Weights of block i that multiply activations (every 2-D parameter)."""
    return sum(p.numel() for p in get_module(model, layer_name(model, i)).parameters() if p.dim() == 2)


def rome_edit_flops(bench: Bench, case: dict, steps: int) -> dict:
    model, tok = bench.model, bench.tok
    hp = bench.hparams("rome")
    templates = templating.flat_templates(bench.templates(hp))
    L, n = hp["layers"][0], n_layers(model)
    loss_layer = int(hp["v_loss_layer"])
    d = model.config.hidden_size
    vocab = encoding.lm_head_module(model).weight.shape[0]
    rewriting = [t.format(case["prompt"]) for t in templates]
    ids, _ = encoding.encode_with_subject(tok, rewriting + value_optimization.KL_PROMPTS, [case["subject"]] * (len(rewriting) + 1))
    n_target = len(encoding.target_token_ids(tok, encoding.target_str(case)))
    lens = [len(x) + n_target - 1 for x in ids[: len(rewriting)]] + [len(x) for x in ids[len(rewriting):]]
    tokens = sum(lens)
    attn = sum(4 * t * t * d for t in lens)  # per layer: QK^T and AV over each row

    def fwd(blocks) -> float:
        return sum(2 * _block_matmul_params(model, i) * tokens + attn for i in blocks)

    top = max(loss_layer, n - 1)  # the KL term reads the last layer
    head = 2 * d * vocab * (len(rewriting) * n_target + 1)
    prefix = fwd(range(L))  # once (prefix reuse)
    per_forward = fwd(range(L, top + 1)) + head
    per_backward = fwd(range(L + 1, top + 1)) + head  # activation gradients only
    keys = fwd(range(L + 1))  # k*: forward to the edited layer over the templates (upper bound)
    total = prefix + (steps + 1) * per_forward + steps * per_backward + keys
    return {"tokens_per_pass": tokens, "steps": steps, "gflop": total / 1e9, "gflop_per_step": (per_forward + per_backward) / 1e9}


def floor(bench: Bench, rome_row: dict, n_cases: int = 3) -> dict:
    """FLOPs of a typical ROME edit on this model (the first cases of the sequence, with the steps
    the optimization actually took) against the measured median seconds per edit."""
    bench.fresh_model()
    hp = bench.hparams("rome")
    templates = bench.templates(hp)
    module = mlp_out_name(bench.model, hp["layers"][0])
    gflops, secs = [], []
    for case in bench.cases[1 : 1 + n_cases]:
        t0 = time.perf_counter()
        _, log = value_optimization.optimize_value(bench.model, bench.tok, case, templates, module, hp)
        secs.append(time.perf_counter() - t0)
        gflops.append(rome_edit_flops(bench, case, int(log["steps"]))["gflop"])
    peak = matmul_gflops(bench.threads)
    g = sum(gflops) / len(gflops)
    measured_opt = sum(secs) / len(secs)
    return {
        "gflop_per_edit": g, "matmul_peak_gflops": peak, "floor_s": g / peak, "measured_optimize_s": measured_opt,
        "achieved_gflops": g / measured_opt, "fraction_of_peak": (g / measured_opt) / peak,
        "median_s_per_edit": rome_row.get("s_total") if rome_row else None,
    }
