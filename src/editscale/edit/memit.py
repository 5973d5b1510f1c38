"""MEMIT (Meng et al., ICLR 2023): mass-editing memory in a transformer.

For a batch of B cases:

1. z_i (one per case): the residual stream output of the last edited layer L at the subject-last
   token that makes the model predict target_new (value_optimization.optimize_value with inject_module =
   the block of layer L; ROME/MEMIT's compute_z).
2. For each edited layer l in ascending order, on the model as updated so far:
     K   = template-averaged keys at the input of mlp_out(l) (subject_keys.compute_keys), d_in x B
     Z0  = the current residual output of layer L at the subject-last token of the plain prompt
     R   = (Z - Z0) / (number of layers not yet updated, l included)
     dW  = R K^T (lambda C + K K^T)^-1,  lambda = mom2_update_weight, C = E[k k^T] of mlp_out(l)
   dW minimizes ||dW K - R||^2 + lambda tr(dW C dW^T); it is solved in float64 and applied as one
   low-rank update u v^T with u = R (out x B) and v = (lambda C + K K^T)^-1 K (in x B), so the
   recorded factors are the update. Keys of the next layer are then recomputed on the edited
   model (the reference code does the same: compute_ks is called inside the layer loop).

Reference: kmeng01/memit @80426fd9, memit/memit_main.py `execute_memit` and
`get_context_templates` (groups [["{}"], five samples after "The", "Therefore", "Because", "I",
"You"]), memit/compute_ks.py (keys averaged within each group, then over the groups),
memit/compute_z.py (loss read at layer max(v_loss_layer, z layer)). The solve is float64 in both;
the reference's C is stored in float32, editscale's in float64 (docs/fidelity.md measures both).

`mom2_adjustment: false` replaces C by the identity (a ridge penalty); the published MEMIT
configurations all use the covariance. Hyperparameter names follow MEMIT's hparams files.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..io import EditscaleError
from ..models.registry import get_module, layer_name, mlp_out_name
from . import subject_keys, value_optimization
from .hparams import spec
from .methods import EditMethod
from .weights import Update, WeightState


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def solve_checked(A: torch.Tensor, B: torch.Tensor, what: str) -> torch.Tensor:
    """A^-1 B (float64 LU); a singular A raises EditscaleError naming `what`."""
    X, info = torch.linalg.solve_ex(A, B)
    if int(info) != 0 or not torch.isfinite(X).all():
        raise EditscaleError(f"{what} is singular (LU pivot {int(info)}): collect statistics over more tokens")
    return X


class KeyMemory:
    """The keys of every earlier edit of the chain, per edited module, and their Gram matrix
    Kp Kp^T (float64), which AlphaEdit and ENCORE add to their normal equations.

    Kp Kp^T is kept as a sum over fixed chunks of `fold` consecutive keys (by their index in the
    chain, not by batch or segment) plus the not yet folded tail, so that a chain restored from its
    keys (`state_dict()` -> {f"{module}/keys": [n, d_in] float32}, saved with every segment)
    rebuilds exactly the same matrix as the uninterrupted chain: the next update is identical.
    """

    def __init__(self, modules: list[str], d_in: dict[str, int], fold: int, device, state: dict | None = None, owner: str = ""):
        self.modules, self.fold, self.owner = list(modules), int(fold), owner
        self._blocks: dict[str, list[torch.Tensor]] = {m: [] for m in self.modules}
        self._pending = {m: torch.zeros((0, d_in[m]), dtype=torch.float32, device=device) for m in self.modules}
        self._folded = {m: torch.zeros((d_in[m], d_in[m]), dtype=torch.float64, device=device) for m in self.modules}
        for m in self.modules if state else ():
            key = f"{m}/keys"
            if key not in state:
                raise EditscaleError(f"{owner}: state has no {key!r} (has {sorted(state)})")
            arr = torch.from_numpy(np.ascontiguousarray(np.asarray(state[key], dtype=np.float32)))
            if arr.dim() != 2 or arr.shape[1] != d_in[m]:
                raise EditscaleError(f"{owner}: state {key!r} has shape {tuple(arr.shape)}, expected [n, {d_in[m]}]")
            self.append(m, arr.to(device))

    def append(self, module: str, new: torch.Tensor) -> None:
        """Append keys [n, d_in] (stored float32) and fold every completed chunk of `fold` keys."""
        pending = torch.cat([self._pending[module], new.to(device=self._pending[module].device, dtype=torch.float32)], dim=0)
        while pending.shape[0] >= self.fold:
            chunk = pending[: self.fold].clone()
            c64 = chunk.to(torch.float64).clone()  # fresh, aligned storage: same op on same data
            self._folded[module].add_(c64.T @ c64)
            self._blocks[module].append(chunk)
            pending = pending[self.fold :]
        self._pending[module] = pending.clone()

    def kkt(self, module: str) -> torch.Tensor:
        """Kp Kp^T of all earlier edits at `module`, float64 [d_in x d_in]."""
        tail = self._pending[module].to(torch.float64).clone()
        if tail.shape[0] == 0:
            return self._folded[module].clone()
        return self._folded[module] + tail.T @ tail

    def keys(self, module: str) -> torch.Tensor:
        """All earlier keys at `module` in chain order, float32 [n, d_in]."""
        return torch.cat([*self._blocks[module], self._pending[module]], dim=0)

    def count(self, module: str) -> int:
        return sum(b.shape[0] for b in self._blocks[module]) + int(self._pending[module].shape[0])

    def state_dict(self) -> dict:
        return {f"{m}/keys": self.keys(m).detach().cpu().numpy().astype(np.float32) for m in self.modules}


@dataclasses.dataclass(kw_only=True)
class MemitSolveHparams(value_optimization.ValueHparams):
    """What MEMIT and its null-space variant share (memit/memit_hparams.py minus module names and
    statistics, which the registry and the workflow supply)."""

    layer_selection: str = spec("all", choices=("all",), doc="the update of every layer in one step, as published")
    # MEMIT's memit_main.get_context_templates: ["{}"] + 5 samples of length 10
    context_template_length_params: list[list[int]] = spec([[10, 5]], minimum=1, doc="[[length, count], ...] of sampled templates")


@dataclasses.dataclass(kw_only=True)
class MemitHparams(MemitSolveHparams):
    mom2_adjustment: bool = spec(True, doc="(w C + K K^T)^-1 (False: (I + K K^T)^-1)")
    mom2_update_weight: float = spec(minimum=0, doc="weight w of the preserved-key second moment C")


class Memit(EditMethod):
    """MEMIT's multi-layer least-squares update, one batch of cases per `apply`."""

    name = "memit"
    # memit/memit_main.py get_context_templates + compute_ks (grouped key average), compute_z
    # (loss at max(v_loss_layer, z layer))
    template_rule = "memit"
    value_loss_layer = "max"
    hparams_type = MemitHparams

    @classmethod
    def precomputed(cls, hparams):
        return {"mom2": {}} if hparams.get("mom2_adjustment", True) else {}

    @classmethod
    def validate_hparams(cls, hp: dict, source: str = "hparams") -> None:
        super().validate_hparams(hp, source)
        value_optimization.check_common_hparams(hp, source)
        layers = hp["layers"]
        if layers != sorted(set(layers)):
            raise EditscaleError(f"{source}: layers {layers} must be strictly ascending")

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self.layers = [int(x) for x in self.hp.layers]
        self._modules = self.modules(model, self.hparams)
        for m in self._modules:
            get_module(model, m)
        if self._needs_cov():
            missing = [m for m in self._modules if m not in self.stats]
            if missing:
                raise EditscaleError(f"{self.name}: no second-moment statistics for {missing}; compute the stats stage first")
        self.z_module = layer_name(model, self.layers[-1])
        # diagnostics of the last apply (tests, debugging): keys and residual per module
        self.last_keys: dict[str, torch.Tensor] = {}
        self.last_resid: dict[str, torch.Tensor] = {}

    @staticmethod
    def modules(model, hparams: dict) -> list[str]:
        return [mlp_out_name(model, int(layer)) for layer in hparams["layers"]]

    def _needs_cov(self) -> bool:
        return bool(getattr(self.hp, "mom2_adjustment", True))  # the methods without the switch always use C

    def state_dict(self) -> dict:
        return {}

    # -- pieces shared with AlphaEdit ---------------------------------------------------------

    def compute_targets(self, cases: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """z of every case at the last edited layer, stacked as columns [d_model x B]."""
        zs, logs = [], []
        for case in cases:
            z, lg = value_optimization.optimize_value(self.model, self.tok, case, self.context_templates, self.z_module, self.hp, loss_layer=self.value_loss_layer)
            zs.append(z.detach().reshape(-1))
            logs.append(lg or {})
        return torch.stack(zs, dim=1), logs

    def current_z(self, cases: list[dict]) -> torch.Tensor:
        """Residual output of the last edited layer at the subject-last token of each prompt [d x B]."""
        _, out = subject_keys.module_io_at_subject(
            self.model, self.tok, self.z_module, [c["prompt"] for c in cases], [c["subject"] for c in cases]
        )
        return out.detach().T

    def keys(self, module: str, cases: list[dict]) -> torch.Tensor:
        """Template-averaged keys at the input of `module` [d_in x B]."""
        return subject_keys.compute_keys(self.model, self.tok, module, cases, self.context_templates).detach().T

    def solve_layer(self, index: int, module: str, K: torch.Tensor, R: torch.Tensor, weights: WeightState) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) with dW = u v^T; K [d_in x B], R [d_out x B], both float64; `weights`: the chain's
        weights as the earlier layers' updates of this step left them."""
        lam = float(self.hp.mom2_update_weight)
        if self._needs_cov():
            C = self.stats[module].to(device=K.device, dtype=torch.float64)
            if C.shape != (K.shape[0], K.shape[0]):
                raise EditscaleError(f"{self.name}: statistics of {module} have shape {tuple(C.shape)}, keys have dimension {K.shape[0]}")
            A = lam * C + K @ K.T
        else:
            A = lam * torch.eye(K.shape[0], dtype=torch.float64, device=K.device) + K @ K.T
        return R, solve_checked(A, K, f"{self.name}: lambda C + K K^T of {module}")

    def write_layer(self, weights: WeightState, module: str, u: torch.Tensor, v: torch.Tensor, meta: dict) -> float:
        """Write layer `module`'s update u v^T (float64 factors) before the next layer's keys are
        computed; returns ||u v^T||_F. RECT defers the write to `finish_layers`."""
        u32 = u.to(torch.float32).contiguous()
        v32 = v.to(torch.float32).contiguous()
        weights.apply(Update(module=module, u=u32, v=v32, meta=meta))
        # ||u v^T||_F without forming the matrix: sqrt(sum((u^T u) * (v^T v)))
        return float(((u32.double().T @ u32.double()) * (v32.double().T @ v32.double())).sum().clamp_min(0).sqrt())

    def finish_layers(self, weights: WeightState, per_layer: dict) -> None:
        """Run once every layer's update is computed (RECT writes its sparsified updates here)."""

    def after_apply(self, cases: list[dict]) -> None:
        """Hook run once the batch is fully written (AlphaEdit stores the new keys here)."""

    def row_extra(self) -> dict:
        """Method-specific columns added to every log row of the last apply."""
        return {}

    # -- the update ---------------------------------------------------------------------------

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        if not cases:
            return []
        t0 = time.perf_counter()
        Z, vlogs = self.compute_targets(cases)
        Z = Z.to(torch.float64)
        t_z = time.perf_counter() - t0
        n = len(self.layers)
        self.last_keys, self.last_resid = {}, {}
        z_err_first = None
        per_layer = {}
        for i, module in enumerate(self._modules):
            K = self.keys(module, cases).to(torch.float64)
            cur = self.current_z(cases).to(torch.float64)
            err = Z - cur
            if z_err_first is None:
                z_err_first = err.norm(dim=0)
            R = err / (n - i)
            u, v = self.solve_layer(i, module, K, R, weights)
            self.last_keys[module] = K
            self.last_resid[module] = R
            meta = {"method": self.name, "layer_index": i, "case_ids": [c.get("case_id") for c in cases]}
            per_layer[module] = self.write_layer(weights, module, u, v, meta)
        self.finish_layers(weights, per_layer)
        z_err_last = (Z - self.current_z(cases).to(torch.float64)).norm(dim=0)
        self.after_apply(cases)
        seconds = time.perf_counter() - t0
        rows = []
        for j, case in enumerate(cases):
            lg = vlogs[j]
            rows.append(
                {
                    "case_id": case.get("case_id"),
                    **{k: v for k, v in lg.items() if isinstance(v, (int, float, str))},
                    "v_loss": _num(lg.get("v_loss")),
                    "z_error_before": float(z_err_first[j]),
                    "z_error_after": float(z_err_last[j]),
                    "update_norm_by_module": per_layer,
                    "factor_kind": self.update_kind,
                    "batch_size": len(cases),
                    "seconds_z": t_z / len(cases),
                    "seconds": seconds / len(cases),
                    **self.row_extra(),
                }
            )
        return rows
