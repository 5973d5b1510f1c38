"""EMMET (Gupta, Sajjad, Anumanchipalli 2024, "A Unified Framework for Model Editing"):
equality-constrained batch edit of one MLP output matrix.

For a batch of B cases with template-averaged keys K [d_in x B] and target outputs V [d_out x B],
minimize ||dW K0||^2 (preservation, K0 K0^T ~ C) subject to (W + dW) K = V:

    R  = V - (W K + b)                     residuals of the module output map (bias included)
    D  = K^T C^-1 K  (+ emmet_lambda I when B > 1, against an ill-conditioned D)
    dW = R D^-1 K^T C^-1,  applied as one Update with u = R D^-1 [out x B], v = C^-1 K [in x B]

C = mom2_update_weight * E[k k^T] + update_norm_lambda * I (the reference code's scaling; with both
lambdas 0 the scale cancels). With B = 1 (no lambda) and v_inject "mlp_out" this is exactly r-ROME's update.

Target values: `optimize_value` per case, on the weights before the batch. `v_inject` chooses where
delta is optimized: "layer" (default, the reference EMMET code, MEMIT's compute_z: delta is
optimized on the residual stream at the layer output and R = z - z_init, where z_init is the layer
output at the plain prompt; since the MLP output adds into the layer output this asks the module
for the same change at the plain prompt, with clamp_norm_factor relative to the residual norm) or
"mlp_out" (an editscale extension: v* is the edited module's output, R = v* - (W K + b), ROME's
target; with B = 1 and emmet_lambda 0 the update is then r-ROME's).

Reference: scalable-model-editing/unified-model-editing @23d72b5, emmet/emmet_main.py
`execute_emmet` (C^-1 = torch.inverse of the float32-stored C in float64, D, D^-1, adj_k),
emmet/compute_ks.py (template-group key average), emmet/compute_z.py; context templates from
`get_context_templates` (MEMIT's rule). Measured against it on identical inputs: docs/fidelity.md.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..io import EditscaleError
from ..models.registry import layer_name
from .subject_keys import compute_keys, module_io_at_subject
from .solvers import CovSolver, module_forward
from .value_optimization import optimize_value
from .hparams import spec
from .rome import RRomeHparams, Rome
from .weights import Update, WeightState


@dataclasses.dataclass(kw_only=True)
class EmmetHparams(RRomeHparams):
    # the reference hard-codes MEMIT's templates (emmet_main.py get_context_templates: [(10, 5)])
    context_template_length_params: list[list[int]] = spec([[10, 5]], minimum=1, doc="[[length, count], ...] of sampled templates")
    mom2_update_weight: float = spec(minimum=0, doc="weight of C in (w C + update_norm_lambda I)^-1")
    emmet_lambda: float = spec(0.1, minimum=0, doc="ridge on the B x B constraint system (B > 1)")
    update_norm_lambda: float = spec(0.0, minimum=0, doc="ridge on the d x d system (update norm penalty)")
    v_inject: str = spec("layer", choices=("mlp_out", "layer"), doc="where v* is optimized: the layer output (reference) or the MLP output")


class Emmet(Rome):
    name = "emmet"
    hparams_type = EmmetHparams
    # emmet/emmet_main.py get_context_templates and compute_ks (MEMIT's), emmet/compute_z.py
    template_rule = "memit"
    value_loss_layer = "max"

    @classmethod
    def validate_hparams(cls, hp, source="hparams"):
        super().validate_hparams(hp, source)

    def solver(self, module: str, d_in: int | None = None) -> CovSolver:
        """(mom2_update_weight * C + update_norm_lambda * I)^-1, factored once per method object."""
        if module not in self._solvers:
            hp = self.hp
            if hp.mom2_adjustment:
                if module not in self.stats:
                    raise EditscaleError(f"{self.name}: mom2_adjustment needs the second moment of {module!r}; stats hold {sorted(self.stats)}")
                C, scale = self.stats[module], float(hp.mom2_update_weight)
            else:
                C, scale = torch.eye(int(d_in), dtype=torch.float64), 1.0
            self._solvers[module] = CovSolver(C, module=module, scale=scale, ridge=float(hp.update_norm_lambda))
        return self._solvers[module]

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        if not cases:
            return []
        t0 = time.perf_counter()
        hp, module = self.hp, self.module
        B = len(cases)
        K = compute_keys(self.model, self.tok, module, cases, self.context_templates).T.to(torch.float64)  # [d_in, B]
        inject = module if hp.v_inject == "mlp_out" else layer_name(self.model, int(hp.layers[0]))
        values, logs = [], []
        for case in cases:
            v, log = optimize_value(self.model, self.tok, case, self.context_templates, inject, hp, loss_layer=self.value_loss_layer)
            values.append(v)
            logs.append(log)
        Z = torch.stack(values, dim=1).to(device=K.device, dtype=torch.float64)  # [d, B]
        cur = module_forward(self.model, weights, module, K)  # W K + b, [d_out, B]
        if hp.v_inject == "mlp_out":
            R = Z - cur
        else:
            _, z_init = module_io_at_subject(self.model, self.tok, inject, [c["prompt"] for c in cases], [c["subject"] for c in cases])
            R = Z - z_init.T.to(device=K.device, dtype=torch.float64)
        CinvK = self.solver(module, d_in=K.shape[0]).solve(K)  # [d_in, B]
        D = K.T @ CinvK
        if B > 1 and hp.emmet_lambda:
            D = D + float(hp.emmet_lambda) * torch.eye(B, dtype=D.dtype, device=D.device)
        U = torch.linalg.solve(D, R.T).T  # R D^-1 (D symmetric), [d_out, B]
        meta = {"method": self.name, "case_ids": [c.get("case_id") for c in cases], "batch": B}
        weights.apply(Update(module, u=U.float(), v=CinvK.float(), meta=meta))
        # residual of the constraint after the update (0 up to float error when emmet_lambda = 0)
        after = module_forward(self.model, weights, module, K)
        target = cur + R
        self.last = {"K": K, "V": target, "R": R, "U": U, "CinvK": CinvK, "values": Z}
        resid = ((after - target).norm(dim=0) / target.norm(dim=0).clamp_min(1e-30)).tolist()
        shortfall = ((after - target).norm(dim=0) / R.norm(dim=0).clamp_min(1e-30)).tolist()
        seconds = time.perf_counter() - t0
        update_norm = float((U.float() @ CinvK.float().T).norm().item())
        return [
            {
                "case_id": c.get("case_id"),
                "module": module,
                **log,
                "batch": B,
                "constraint_rel_residual": float(r),  # ||W'k + b - v|| / ||v||
                "constraint_shortfall": float(sf),  # ||W'k + b - v|| / ||v - (Wk + b)||: part of the change not made
                "update_norm": update_norm,
                "seconds": seconds / B,
            }
            for c, log, r, sf in zip(cases, logs, resid, shortfall)
        ]
