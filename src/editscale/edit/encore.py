"""ENCORE (Gupta et al., "Lifelong Knowledge Editing requires Better Regularization", Findings of
EMNLP 2025): MEMIT with a norm penalty, the keys of every earlier edit in the preserved set, and
most-probable early stopping (MPES) of the z optimization.

Targets z and keys K are MEMIT's (memit.py: same context templates, grouped key average, z at the
last edited layer with the loss at max(v_loss_layer, that layer), the residual spread over the
layers not yet updated). For edited layer l:

    A   = lambda_p C + lambda_n I + Kp Kp^T + K K^T
    dW  = R K^T A^-1,   u = R [out x B],  v = A^-1 K [in x B]

with C = E[k k^T] of mlp_out(l) (the layer statistics), lambda_p = mom2_update_weight, lambda_n =
update_norm_lambda, and Kp the keys of every earlier edit of the chain at this layer, each as it
was used in its own update (the reference adds `layer_ks @ layer_ks.T` to SEQ_CACHE at the layer
step, before solving). dW minimizes

    ||dW K - R||^2 + lambda_p tr(dW C dW^T) + lambda_n ||dW||_F^2 + ||dW Kp||^2,

i.e. MEMIT's objective plus a Frobenius-norm penalty and keeping the earlier edits' keys' outputs
unchanged. `add_prev_edits: false` drops Kp (MEMIT plus the norm penalty). The stored keys are
memit.KeyMemory's (exact replay from the segment's saved state).

MPES (value_optimization.optimize_value, `early_stop: mpes`, ENCORE's default): the z optimization stops at
the `mpes_steps`-th pass at which the new target is the argmax continuation at every target
position of every rewriting prompt (ENCORE's `prob_cutoff: -N`).

Reference: scalable-model-editing/knowledge-editing-regularization @6e3ba9a, encore/encore_main.py
`execute_encore` (cov *= mom2_update_weight; cov += update_norm_lambda * I; cov += SEQ_CACHE;
adj_k = solve(cov + K K^T, K); resid / (n_layers - i)), encore/compute_z.py (the MPES rule),
hparams/ENCORE/{gpt2-xl,llama3-8b}.json. The solve is float64 in both.
"""

from __future__ import annotations

import dataclasses

import torch

from ..io import EditscaleError
from . import value_optimization
from .hparams import spec
from .memit import KeyMemory, Memit, MemitSolveHparams, solve_checked
from .cost import CostSpec
from .weights import WeightState


@dataclasses.dataclass(kw_only=True)
class EncoreHparams(MemitSolveHparams):
    mom2_update_weight: float = spec(minimum=0, doc="lambda_p: weight of the preserved-key second moment C")
    update_norm_lambda: float = spec(minimum=0, doc="lambda_n: weight of the Frobenius-norm penalty ||dW||^2")
    add_prev_edits: bool = spec(True, doc="add the keys of every earlier edit (Kp Kp^T) to the normal equations")
    key_fold_size: int = spec(64, minimum=1, doc="earlier keys folded into Kp Kp^T in chunks of this many (exact replay)")
    early_stop: str = spec("mpes", choices=value_optimization.EARLY_STOP_RULES, doc="z optimization's stopping rule (ENCORE: mpes)")


class Encore(Memit):
    """MEMIT + norm penalty + earlier edits' keys, with MPES."""

    name = "encore"
    hparams_type = EncoreHparams

    @classmethod
    def precomputed(cls, hparams):
        return {"mom2": {}}

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        device = next(model.parameters()).device
        d_in = {m: int(self.stats[m].shape[0]) for m in self._modules}
        self.memory = KeyMemory(self._modules, d_in, int(self.hp.key_fold_size), device, state, owner=self.name)

    def _needs_cov(self) -> bool:
        return True

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    def solve_layer(self, index: int, module: str, K: torch.Tensor, R: torch.Tensor, weights: WeightState) -> tuple[torch.Tensor, torch.Tensor]:
        C = self.stats[module].to(device=K.device, dtype=torch.float64)
        d = K.shape[0]
        if C.shape != (d, d):
            raise EditscaleError(f"encore: statistics of {module} have shape {tuple(C.shape)}, keys have dimension {d}")
        A = float(self.hp.mom2_update_weight) * C
        A = A + float(self.hp.update_norm_lambda) * torch.eye(d, dtype=torch.float64, device=K.device)
        if self.hp.add_prev_edits:
            A = A + self.memory.kkt(module).to(K.device)
        v = solve_checked(A + K @ K.T, K, f"encore: lambda_p C + lambda_n I + Kp Kp^T + K K^T of {module}")
        self.memory.append(module, K.T)  # as used in this update (the reference's SEQ_CACHE)
        return R, v

    def row_extra(self) -> dict:
        return {"n_keys_stored": self.memory.count(self._modules[0])}


class EncoreCost(CostSpec):
    def device_matrices(self) -> tuple[float, float]:
        resident, transient = super().device_matrices()
        return resident + float(self.hparams.get("add_prev_edits", True)), transient  # + Kp Kp^T (KeyMemory)

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        return sum(4.0 * k * d_in for _, d_in in shapes.values())  # KeyMemory: every earlier key, float32
