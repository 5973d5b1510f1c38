"""SPHERE (Liu, Gu, Yao, Wang, Peng, "Energy-Regularized Sequential Model Editing on Hyperspheres",
ICLR 2026): AlphaEdit with every layer's update projected away from the principal hyperspherical
directions of the weight it is added to.

The rows of the edited matrix W (out, in) are neurons on a hypersphere. With the rows normalized,
W_hat = W / (||w_i|| + 1e-8), their directions' second moment is C = W_hat^T W_hat / d_out (in x in).
Its eigenvectors, by decreasing eigenvalue, are the principal hyperspherical directions; U holds
the first r of them, r the smallest count whose eigenvalues cover more than `cumulative_ratio`
(eta) of the trace (the reference: r = #{j : cumsum_j / trace <= eta} + 1). The update dW of a
layer becomes

    dW P_soft^T,   P_soft = I - alpha U U^T,   alpha = suppression_strength

so its component along the principal directions shrinks by (1 - alpha) and the rest is kept:
dW U -> (1 - alpha) dW U, dW (I - U U^T) unchanged. With dW = u v^T (AlphaEdit's factors) the
projected update is u (P_soft v)^T, still rank B, stored as low-rank factors. alpha = 0 (or
eta = 0, as the reference's `cumulative_ratio > 0 and suppression_strength > 0` test) is
AlphaEdit itself.

Order, as the reference's apply_SPHERE_to_model: every layer's AlphaEdit update is computed with
the unprojected updates of the layers before it in place (execute_AlphaEdit writes each before
the next layer's keys); the batch's keys for AlphaEdit's cache are then computed on that model
(the unprojected updates still in place); the weights are restored, and each layer's update is
projected against its weight before the batch (W of this edit step) and added.

Reference: zjunlp/EasyEdit @14cea82, easyeditor/models/SPHERE/SPHERE_main.py
(`apply_SPHERE_to_model`, `sparse_projection`, `execute_AlphaEdit`), examples/SPHERE.md. The
reference computes C, its eigh and the projection in the weight's dtype (float32 on the
published runs) and projects the raw parameter, which for GPT-2's Conv1D is the (in, out)
transpose; editscale projects the (out, in) matrix of every architecture (neurons = rows, as the
Llama / Qwen path of the reference and the weights metric's hyperspherical energy) in
`sphere_dtype` (float64 by default; float32 reproduces the reference's arithmetic). Measured in
docs/fidelity.md.

Hyperparameters: AlphaEdit's, plus cumulative_ratio (eta, SPHERE: 0.5), suppression_strength
(alpha, SPHERE: 0.5) and sphere_dtype. Cost (editscale doctor): AlphaEdit's; the projection
holds C, its eigenvectors and P_soft (in x in) at once, fewer than AlphaEdit's solve.
"""

from __future__ import annotations

import dataclasses

import torch

from .alphaedit import AlphaEdit, AlphaEditHparams
from .hparams import spec
from .weights import WeightState, outer_sum

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
ROW_EPSILON = 1e-8  # the reference's guard in W / (||w_i|| + eps)


@dataclasses.dataclass(kw_only=True)
class SphereHparams(AlphaEditHparams):
    cumulative_ratio: float = spec(0.5, minimum=0, maximum=1, doc="share of the trace of C the suppressed principal directions cover (eta; SPHERE: 0.5)")
    suppression_strength: float = spec(0.5, minimum=0, maximum=1, doc="how much of the update along them is removed (alpha; SPHERE: 0.5)")
    sphere_dtype: str = spec("float64", choices=tuple(_DTYPES), doc="dtype of C, its eigh and the projection (the reference: the weight's)")


def principal_directions(W: torch.Tensor, eta: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """U (in x r): the principal hyperspherical directions of W (out, in) covering eta of the trace
    of C = W_hat^T W_hat / d_out (module doc), by decreasing eigenvalue."""
    A = W.to(dtype)
    A_hat = A / (A.norm(dim=1, keepdim=True) + ROW_EPSILON)
    C = (A_hat.T @ A_hat) / A_hat.shape[0]
    evals, evecs = torch.linalg.eigh(C)
    covered = torch.cumsum(evals.flip(0), 0) / evals.sum()
    r = int((covered <= eta).sum().item()) + 1
    return evecs[:, -r:]


def soft_projection(W: torch.Tensor, eta: float, alpha: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """(P_soft = I - alpha U U^T, r) for W (out, in): the reference's `sparse_projection` without B."""
    U = principal_directions(W, eta, dtype)
    P = torch.eye(W.shape[1], dtype=dtype, device=W.device) - alpha * (U @ U.T)
    return P, U.shape[1]


class Sphere(AlphaEdit):
    """AlphaEdit whose updates avoid the weight's principal hyperspherical directions."""

    name = "sphere"
    hparams_type = SphereHparams

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None, projections: dict | None = None):
        super().__init__(model, tok, hparams, stats, context_templates, state, projections)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor, dict]] = []
        self.last_rank: dict[str, int] = {}

    @property
    def projects(self) -> bool:
        return float(self.hp.cumulative_ratio) > 0 and float(self.hp.suppression_strength) > 0

    def write_layer(self, weights: WeightState, module: str, u: torch.Tensor, v: torch.Tensor, meta: dict) -> float:
        if not self.projects:
            return super().write_layer(weights, module, u, v, meta)
        # the unprojected update stays in place for the later layers' keys, as in execute_AlphaEdit
        weights.preview(module, outer_sum(u, v, torch.float64).to(torch.float32))
        self._pending.append((module, u, v, meta))
        return float("nan")

    def finish_layers(self, weights: WeightState, per_layer: dict) -> None:
        if not self.projects:
            return
        pending, self._pending = self._pending, []
        # AlphaEdit's cache keys, computed on the model with the unprojected updates (the reference
        # updates cache_c inside execute_AlphaEdit, before it restores the weights)
        cases = self._cases
        for m in self._modules:
            self.memory.append(m, self.keys(m, cases).T.to(torch.float32))
        for module, *_ in pending:
            weights.restore(module)
        dt = _DTYPES[self.hp.sphere_dtype]
        self.last_rank = {}
        for module, u, v, meta in pending:
            P, r = soft_projection(weights.current(module), float(self.hp.cumulative_ratio), float(self.hp.suppression_strength), dt)
            v_proj = (P @ v.to(device=P.device, dtype=dt)).to(torch.float64)
            per_layer[module] = super().write_layer(weights, module, u, v_proj, {**meta, "sphere_rank": r})
            self.last_rank[module] = r

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        self._cases = cases  # finish_layers computes the batch's cache keys
        return super().apply(cases, weights)

    def after_apply(self, cases: list[dict]) -> None:
        if not self.projects:
            super().after_apply(cases)
        # else: the keys were stored in finish_layers, on the unprojected model

    def row_extra(self) -> dict:
        extra = super().row_extra()
        if self.last_rank:
            extra["sphere_rank_min"] = min(self.last_rank.values())
        return extra
