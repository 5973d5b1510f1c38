"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update projected onto the null space of the
preserved knowledge.

Targets z and keys K are MEMIT's (see memit.py). For edited layer l (i-th of the list):

    P   = U0 U0^T, U0 = eigenvectors of C = E[k k^T] (preserved knowledge, the layer statistics)
          with eigenvalue < nullspace_threshold          (computed once; or passed in / restored)
    Kp  = keys of every earlier edit of the chain at this layer (AlphaEdit's cache_c = Kp Kp^T)
    M   = P (Kp Kp^T + K K^T) + L2 I
    dW  = (M^-1 P K R^T)^T = R K^T P (Kp Kp^T P + K K^T P + L2 I)^-1

as in AlphaEdit_main.py (`torch.linalg.solve(P @ (K K^T + cache_c) + L2 I, P @ K @ R^T)`, there in
float32, here in float64). It is applied as one low-rank update u v^T with u = R [out x B] and
v = M^-1 P K [in x B]. For any k0 with P k0 = 0 (the preserved space), M k0 = L2 k0, so
dW k0 = R K^T P k0 / L2 = 0: the edit leaves the preserved keys' outputs unchanged.

Unlike MEMIT, the covariance itself does not enter the solve; mom2_update_weight is unused.
After the batch is written, the keys of the batch are recomputed at every edited layer on the
edited model and appended to Kp (the reference code does exactly this to update cache_c).

State: the keys of all earlier edits per layer (memit.KeyMemory: `state_dict()` ->
{f"{module}/keys": [n, d_in] float32}, with Kp Kp^T folded in fixed chunks of `key_fold_size`
keys so that a restored chain rebuilds exactly the same matrix).

Reference: jianghoucheng/AlphaEdit @f5248d3, AlphaEdit/AlphaEdit_main.py
`apply_AlphaEdit_to_model` (MEMIT's context templates, grouped key average and compute_z; the
solve in float32 there, float64 here; measured in docs/fidelity.md; `projection_rule: svd32` and
`solve_dtype: float32` reproduce the reference's float32 projector and solve).

Hyperparameters: MEMIT's names, plus nullspace_threshold (AlphaEdit: 2e-2, an absolute bound on
the eigenvalues of C, so it depends on the activation scale of the model), L2 (AlphaEdit: 10),
key_fold_size (64) and projection_dtype (float64; float32 halves the memory for GPT-J-size
matrices, as the reference stores P).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..io import EditscaleError
from .hparams import spec
from .memit import KeyMemory, Memit, MemitSolveHparams, solve_checked

from ..stats.mom2 import PROJECTION_RULES, null_space_projection_by_rule
from .cost import CostSpec
from .weights import WeightState


def null_space_projection(mom2, threshold: float, device="cpu", rule: str = "eigh64") -> torch.Tensor:
    """P = U0 U0^T (float64 tensor on `device`) by editscale.stats.mom2's `rule` (eigh64: the
    eigenvectors of the float64 `mom2` with eigenvalue < threshold; svd32: the reference's float32
    SVD), computed on `device`."""
    m = torch.as_tensor(mom2).detach().to(torch.float64)
    P, _, _ = null_space_projection_by_rule(m.cpu().numpy(), float(threshold), rule=rule, device=str(device))
    return torch.from_numpy(P).to(device)


log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass(kw_only=True)
class AlphaEditHparams(MemitSolveHparams):
    """AlphaEdit reads C only through P: MEMIT's mom2_adjustment / mom2_update_weight do not exist here."""

    nullspace_threshold: float = spec(minimum=0, doc="eigenvalues of C below it span the null space")
    L2: float = spec(minimum=0, doc="ridge of P (Kp Kp^T + K K^T) + L2 I")
    key_fold_size: int = spec(64, minimum=1, doc="earlier keys folded into Kp Kp^T in chunks of this many (exact replay)")
    projection_dtype: str = spec("float64", choices=tuple(_DTYPES), doc="dtype of P in the solve")
    projection_rule: str = spec("eigh64", choices=PROJECTION_RULES,
                                doc="eigh64: eigh of the float64 C; svd32: the reference's float32 SVD (reproduces its P)")
    solve_dtype: str = spec("float64", choices=tuple(_DTYPES), doc="dtype of the solve (the reference: float32)")


class AlphaEdit(Memit):
    """Null-space constrained MEMIT for sequential editing."""

    name = "alphaedit"
    hparams_type = AlphaEditHparams

    @classmethod
    def precomputed(cls, hparams):
        # C enters only through P: the edit jobs read the projections, not the float64 covariances
        return {"nullspace": {"threshold": hparams["nullspace_threshold"], "rule": hparams.get("projection_rule", "eigh64")}}

    def __init__(
        self,
        model,
        tok,
        hparams: dict,
        stats: dict,
        context_templates,
        state=None,
        projections: dict | None = None,
    ):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        pdt = _DTYPES[self.hp.projection_dtype]
        device = next(model.parameters()).device
        self.P: dict[str, torch.Tensor] = {}
        for m in self._modules:
            if projections is not None and m in projections:
                P = torch.as_tensor(projections[m])
            elif m in self.stats:
                P = null_space_projection(self.stats[m], float(self.hp.nullspace_threshold), device=device,
                                          rule=self.hp.projection_rule)
            else:
                raise EditscaleError(f"alphaedit: neither a null-space projection nor statistics for {m}")
            self.P[m] = P.to(device=device, dtype=pdt)
        # dimension of the null space (trace of the projector): 0 means every update is zero
        self.null_dim = {m: int(round(float(torch.diagonal(P).sum()))) for m, P in self.P.items()}
        for m, r in self.null_dim.items():
            if r == 0:
                log.warning("alphaedit: the null space of %s is empty (threshold %g): every update will be zero", m, self.hp.nullspace_threshold)
            elif r == self.P[m].shape[0]:
                log.warning("alphaedit: the null space of %s is everything (threshold %g): no knowledge is preserved", m, self.hp.nullspace_threshold)
        d_in = {m: self.P[m].shape[0] for m in self._modules}
        self.memory = KeyMemory(self._modules, d_in, int(self.hp.key_fold_size), device, state, owner=self.name)

    def _needs_cov(self) -> bool:
        return False  # C enters only through P

    # -- earlier keys (memit.KeyMemory) -------------------------------------------------------

    def _append_keys(self, module: str, new: torch.Tensor) -> None:
        self.memory.append(module, new)

    def prior_kkt(self, module: str) -> torch.Tensor:
        return self.memory.kkt(module)

    def prior_keys(self, module: str) -> torch.Tensor:
        return self.memory.keys(module)

    def n_prior_keys(self, module: str) -> int:
        return self.memory.count(module)

    def state_dict(self) -> dict:
        return self.memory.state_dict()

    # -- the update -----------------------------------------------------------------------------

    def solve_layer(self, index: int, module: str, K: torch.Tensor, R: torch.Tensor, weights: WeightState) -> tuple[torch.Tensor, torch.Tensor]:
        dt = _DTYPES[self.hp.solve_dtype]
        P = self.P[module].to(device=K.device, dtype=dt)
        d = K.shape[0]
        if P.shape != (d, d):
            raise EditscaleError(f"alphaedit: projection of {module} has shape {tuple(P.shape)}, keys have dimension {d}")
        Kd = K.to(dt)
        A = self.prior_kkt(module).to(device=K.device, dtype=dt) + Kd @ Kd.T
        M = P @ A + float(self.hp.L2) * torch.eye(d, dtype=dt, device=K.device)
        v = solve_checked(M, P @ Kd, f"alphaedit: P (Kp Kp^T + K K^T) + L2 I of {module}")
        return R, v.to(torch.float64)

    def row_extra(self) -> dict:
        return {
            "n_keys_stored": self.n_prior_keys(self._modules[0]),
            "null_dim_min": min(self.null_dim.values()),
        }

    def after_apply(self, cases: list[dict]) -> None:
        for m in self._modules:
            K = self.keys(m, cases).T.to(torch.float32)  # [B, d_in], on the edited model
            self.memory.append(m, K)


class AlphaEditCost(CostSpec):
    def device_matrices(self) -> tuple[float, float]:
        resident, _ = super().device_matrices()
        return resident + 1, 4.0  # + Kp Kp^T (KeyMemory); the solve: A, P A, M and its factor

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        return sum(4.0 * k * d_in for _, d_in in shapes.values())  # KeyMemory: every earlier key, float32
