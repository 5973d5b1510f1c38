"""RECT (Gu et al., "Model Editing Harms General Abilities of Large Language Models:
Regularization to the Rescue", EMNLP 2024): MEMIT with each update sparsified by its relative
change, so that an edit touches only the weights it changes most.

For a batch of cases, MEMIT's update dW_l = R K^T (lambda C + K K^T)^-1 of every edited layer is
computed exactly as memit.py does (the unmasked update of layer l is in place while the keys and
residuals of the later layers are computed). Then every layer's update is replaced by

    dW_l * M_l,   M_l = |dW_l / (W_l + 1e-8)| >= t_l,
    t_l = the n-th smallest |dW_l / (W_l + 1e-8)|, n = int(numel * (100 - rect_keep_percent) / 100)

with W_l the weight before the batch: the top rect_keep_percent % entries of the relative change
(numel - n + 1 of them, ties aside) keep their value and the rest are zero.

Storage: the update is kept as its float64 factors (u = R, v = A^-1 K) and the mask, one bit per
entry (kind "masked", weights.Update), i.e. 8 (d_out + d_in) B + d_out d_in / 8 bytes per module
and batch of B, instead of 4 d_out d_in for the dense sparse matrix; replay recomputes
(u v^T) * M as a float64 sum of outer products, the same operations as the chain, so it is exact.

Reference: jianghoucheng/AlphaEdit @f5248d3, memit/memit_rect_main.py `apply_memit_rect_to_model`
(k_percent = 40, epsilon = 1e-8, torch.kthvalue at int(numel * (100 - k) / 100), mask >=
threshold, w[mask] += upd[mask].float(), upd = MEMIT's resid @ adj_k.T in float64; the deltas of
all layers come from `execute_memit`, which restores the weights before the masked updates are
added). Hyperparameters are MEMIT's plus rect_keep_percent.
"""

from __future__ import annotations

import dataclasses

import torch

from .hparams import spec
from .memit import Memit, MemitHparams
from .weights import Update, WeightState, outer_sum

EPSILON = 1e-8  # the reference's guard against zero weights in |dW / W|


@dataclasses.dataclass(kw_only=True)
class RectHparams(MemitHparams):
    rect_keep_percent: float = spec(40.0, minimum=0, doc="percent of entries of each update kept (largest |dW / W|; RECT: 40)")


def relative_change_mask(dW: torch.Tensor, W: torch.Tensor, keep_percent: float) -> torch.Tensor:
    """The reference's mask: |dW / (W + eps)| >= its n-th smallest value, n = int(numel (100 - k) / 100)
    (dW float64, W the float32 weight it is added to; both (out, in))."""
    ratio = (dW / (W.to(dW.device) + EPSILON)).abs()
    n = int(ratio.numel() * (100 - float(keep_percent)) / 100)
    if n < 1:  # keep everything (the reference's kthvalue needs n >= 1)
        return torch.ones_like(ratio, dtype=torch.bool)
    threshold = torch.kthvalue(ratio.reshape(-1), n).values
    return ratio >= threshold


class Rect(Memit):
    """MEMIT with every update sparsified to its largest relative changes."""

    name = "rect"
    hparams_type = RectHparams
    update_kind = "masked"

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, dict]] = []
        self.last_kept: dict[str, float] = {}

    def write_layer(self, weights: WeightState, module: str, u: torch.Tensor, v: torch.Tensor, meta: dict) -> float:
        # the unmasked update stays in place for the later layers' keys, as in execute_memit
        weights.preview(module, outer_sum(u, v, torch.float64).to(torch.float32))
        self._pending.append((module, u, v, meta))
        return float("nan")

    def finish_layers(self, weights: WeightState, per_layer: dict) -> None:
        pending, self._pending = self._pending, []
        for module, _, _, _ in pending:
            weights.restore(module)
        self.last_kept = {}
        for module, u, v, meta in pending:
            dW = outer_sum(u, v, torch.float64)
            mask = relative_change_mask(dW, weights.current(module), float(self.hp.rect_keep_percent))
            weights.apply(Update(module=module, u=u.contiguous(), v=v.contiguous(), mask=mask, meta=meta))
            kept = torch.where(mask, dW, 0.0)
            per_layer[module] = float(kept.norm())
            self.last_kept[module] = float(mask.double().mean())

    def row_extra(self) -> dict:
        return {"rect_kept_fraction": min(self.last_kept.values()) if self.last_kept else float("nan")}
