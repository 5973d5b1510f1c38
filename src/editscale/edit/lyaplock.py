"""LyapLock (Wang et al., "LyapLock: Bounded Knowledge Preservation in Sequential Large Language
Model Editing", EMNLP 2025): MEMIT whose preservation weight is a virtual queue Z of Lyapunov
optimization, plus the earlier edits' keys and values, so that the preservation loss stays bounded
over long chains.

Targets z, keys K and the residual R (spread over the layers not yet updated) are MEMIT's
(memit.py). For edited layer l with C = E[k k^T] of mlp_out(l) (the layer statistics), W0 its
unedited weight, C_vk = W0 C and C_vv = W0 C W0^T the statistics of its outputs, W its weight
before this step and lambda = mom2_update_weight:

    step 1:        left = R K^T + lambda (C_vk - W C),             A = K K^T + lambda C
    later steps:   left = V R K^T + a Z lambda (C_vk - W C)
                          + V (S_vk - W S_kk),                     A = V K K^T + a Z lambda C + V S_kk
    dW = left A^-1

with S_kk = sum K_e K_e^T and S_vk = sum (W_e K_e) K_e^T over the earlier steps e (W_e the layer's
weight right after step e), V = value_weight. dW is dense after the first step (the term
a Z lambda (W0 - W) C pulls the preserved outputs back towards W0), so each step's update is
stored as a dense matrix (weights.Update, as FT-C's).

The virtual queue, per layer, after its update: the preservation loss

    D(W) = tr(C W^T W) - 2 tr(C_vk W^T) + tr(C_vv)   (= E ||(W - W0) k||^2)

D_base = D after the first step; a = 1 / sqrt(alpha D_base), Z starts at and never falls below
sqrt(alpha D_base) (the reference's '1sqrtD' / '1_sqrtD'), and

    Z <- max(Z + a (D(W) - alpha D_base) + b, sqrt(alpha D_base)).

State (exact replay across segments): per layer S_kk, S_vk, Z, a, D_base; the step count.

Reference: wpwpwpyo/LyapLock @33d2c81, lyaplock/lyaplock_main.py `execute_lyaplock`,
`compute_fro_by_trace`; experiments/evaluate.py (the queue's start: V 1, Z '1sqrtD', a '1_sqrtD',
b 0, zmax '1sqrtD', alpha 60); hparams/LyapLock/*.json. Deviations (docs/fidelity.md): C_vk and
C_vv from editscale's E[k k^T] (exact for the bias-free modules of Llama / Qwen / SmolLM2; the
reference samples the module's outputs, bias included); the update is written as left A^-1 where
the reference previews left A^-1 within the step and writes its transpose product.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..io import EditscaleError
from .cost import CostSpec
from .hparams import spec
from .memit import Memit, MemitSolveHparams, solve_checked
from .weights import Update, WeightState


@dataclasses.dataclass(kw_only=True)
class LyapLockHparams(MemitSolveHparams):
    mom2_update_weight: float = spec(minimum=0, doc="lambda: weight of the preservation term (LyapLock Llama-3: 1000)")
    lyapunov_alpha: float = spec(60.0, minimum=0, doc="alpha: the preservation loss is held near alpha x its value after the first edit (evaluate.py: 60)")
    value_weight: float = spec(1.0, minimum=0, doc="V: weight of the new and earlier edits' terms (evaluate.py: 1)")
    queue_drift: float = spec(0.0, doc="b: added to the virtual queue each step (evaluate.py: 0)")


def preservation_loss(C: torch.Tensor, W: torch.Tensor, C_vk: torch.Tensor, trace_vv: torch.Tensor) -> torch.Tensor:
    """D(W) = tr(C W^T W) - 2 tr(C_vk W^T) + tr(C_vv), as the reference computes it
    (`compute_fro_by_trace`; float64)."""
    return (C @ W.T @ W).trace() - 2 * (C_vk @ W.T).trace() + trace_vv


class LyapLock(Memit):
    """MEMIT with a Lyapunov virtual queue on the preservation loss and the earlier edits' keys."""

    name = "lyaplock"
    hparams_type = LyapLockHparams
    update_kind = "dense"

    @classmethod
    def precomputed(cls, hparams):
        return {"mom2": {}}

    def _needs_cov(self) -> bool:
        return True

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self.steps_done = int(np.asarray(state["steps_done"])) if state else 0
        self.queue: dict[str, dict[str, torch.Tensor]] = {}
        for m in self._modules:
            if state:
                self.queue[m] = {k: torch.from_numpy(np.asarray(state[f"{m}/{k}"])) for k in ("S_kk", "S_vk", "Z", "a", "D_base")}
            else:
                self.queue[m] = {}
        self._out_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_queue: dict[str, float] = {}

    def state_dict(self) -> dict:
        out = {"steps_done": np.array(self.steps_done, dtype=np.int64)}
        for m, q in self.queue.items():
            for k, v in q.items():
                out[f"{m}/{k}"] = v.detach().cpu().numpy()
        return out

    def output_stats(self, module: str, W0: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C_vk = W0 C, tr(C_vv) = tr(W0 C W0^T)) of the unedited module (float64)."""
        if module not in self._out_stats:
            C_vk = W0 @ C
            self._out_stats[module] = (C_vk, (C_vk @ W0.T).trace())
        return self._out_stats[module]

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        rows = super().apply(cases, weights)
        self.steps_done += 1
        return rows

    def solve_layer(self, index: int, module: str, K: torch.Tensor, R: torch.Tensor, weights: WeightState) -> tuple[torch.Tensor, torch.Tensor]:
        C = self.stats[module].to(device=K.device, dtype=torch.float64)
        d = K.shape[0]
        if C.shape != (d, d):
            raise EditscaleError(f"lyaplock: statistics of {module} have shape {tuple(C.shape)}, keys have dimension {d}")
        W0 = weights.base[module].to(device=K.device, dtype=torch.float64)
        C_vk, _ = self.output_stats(module, W0, C)
        W = weights.current(module).to(device=K.device, dtype=torch.float64)
        lam, V = float(self.hp.mom2_update_weight), float(self.hp.value_weight)
        q = self.queue[module]
        if self.steps_done == 0:
            left = R @ K.T + lam * (C_vk - W @ C)
            A = K @ K.T + lam * C
        else:
            scale = q["a"].to(K.device) * q["Z"].to(K.device) * lam
            left = V * (R @ K.T) + scale * (C_vk - W @ C)
            A = V * K @ K.T + scale * C
            if "S_kk" in q:
                S_kk = q["S_kk"].to(K.device)
                left = left + V * (q["S_vk"].to(K.device) - W @ S_kk)
                A = A + V * S_kk
        adj = solve_checked(A, torch.eye(d, dtype=torch.float64, device=K.device), f"lyaplock: the normal matrix of {module}")
        return left, adj

    def write_layer(self, weights: WeightState, module: str, u: torch.Tensor, v: torch.Tensor, meta: dict) -> float:
        left, adj = u, v
        upd = left @ adj.T
        weights.apply(Update(module=module, dense=upd.to(torch.float32), meta=meta))
        self._update_queue(weights, module, self.last_keys.get(module))
        return float(upd.norm())

    def _update_queue(self, weights: WeightState, module: str, K: torch.Tensor | None) -> None:
        """After layer `module`'s update: D_base (first step), the queue Z, and the earlier edits'
        sums S_kk, S_vk with the weight as it is now (the reference's Pre_Cache)."""
        q = self.queue[module]
        C = self.stats[module].to(torch.float64)
        W0 = weights.base[module].to(torch.float64)
        C_vk, trace_vv = self.output_stats(module, W0, C.to(W0.device))
        W = weights.current(module).to(torch.float64)
        D = preservation_loss(C.to(W.device), W, C_vk, trace_vv)
        alpha = float(self.hp.lyapunov_alpha)
        if "D_base" not in q:
            q["D_base"] = D.detach().cpu()
            root = (alpha * q["D_base"]).sqrt()
            if not bool(root > 0):
                raise EditscaleError(f"lyaplock: the preservation loss of {module} after the first edit is {float(D):.3g}; "
                                     "the virtual queue needs it positive")
            q["a"] = 1.0 / root
            q["Z"] = root.clone()
        zmax = (alpha * q["D_base"]).sqrt()
        z = q["Z"] + q["a"] * (D.detach().cpu() - alpha * q["D_base"]) + float(self.hp.queue_drift)
        q["Z"] = torch.maximum(z, zmax)
        self.last_queue[module] = float(q["Z"] / zmax)
        if K is not None:
            values = W @ K
            q["S_vk"] = (q["S_vk"] + (values @ K.T).cpu()) if "S_vk" in q else (values @ K.T).cpu()
            q["S_kk"] = (q["S_kk"] + (K @ K.T).cpu()) if "S_kk" in q else (K @ K.T).cpu()

    def row_extra(self) -> dict:
        return {"lyaplock_queue": max(self.last_queue.values()) if self.last_queue else math.nan}


class LyapLockCost(CostSpec):
    def device_matrices(self) -> tuple[float, float]:
        resident, transient = super().device_matrices()
        return resident + 2.0, transient + 1.0  # S_kk and S_vk kept per layer; the identity solved against

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        # per layer S_kk [d_in x d_in] and S_vk [d_out x d_in] in float64, Z, a, D_base (once the first step is done)
        return 0.0 if k == 0 else 8.0 + sum(8.0 * (d_in * d_in + d_out * d_in + 3) for d_out, d_in in shapes.values())
