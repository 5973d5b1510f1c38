"""PRUNE (Ma et al., "Perturbation-Restrained Sequential Model Editing", ICLR 2025): a restraint
on the condition number of the edited matrices, on top of ROME, MEMIT, AlphaEdit (or any method
of `bases()`), chosen by the hparams key `base:`.

The base method edits as usual. Let D_raw be the sum of every update the base method made to a
module so far and sigma_max the largest singular value of the unedited W0. With D_raw = U S V^T,
every singular value above sigma_max is mapped to

    g(s) = log(s) - log(sigma_max) + sigma_max            (natural log, `restraint: log`)

and the module's weight becomes W0 + U g(S) V^T. The correction C = U_r (g(S_r) - S_r) V_r^T (r:
the restrained singular values) is low rank, so it is written as one more low-rank update; at the
next restraint the previous correction is taken back in the same update, so g always applies to
the unrestrained sum D_raw (never to an already restrained one): after every restraint the live
delta is D_raw + C(D_raw).

Exact replay: the restraint is an ordinary low-rank update u v^T (u = [-u_prev, U_r (g - S_r)],
v = [v_prev, V_r], float32 as applied) in the segment's factors, and the current correction's
factors are the method's state (`{module}/prune_u`, `{module}/prune_v`), saved with every segment
so that the next segment takes back exactly what was added.

When: after every edit (batch) whose last edit index is a multiple of `restrain_every`. The base
method's next edits are then computed on the restrained model. Reference: mjy1111/PRUNE,
easyeditor/editors/bi_editor_loadw.py `func_log` / `read_weights` (delta = saved edited weight -
W0, np.linalg.svd, s >= sigma_max(W0) -> log s + sigma_max - log sigma_max, w = W0 + U g(S) V^T),
and the same rule in jianghoucheng/AlphaEdit experiments/evaluate.py (MEMIT_prune, torch.svd,
s > sigma_max): both apply it once to the unrestrained accumulated delta of a finished sequence
before evaluating; `restrain_every` = the run's n_edits gives that final model exactly, a smaller
value restrains during the sequence (docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from ..io import EditscaleError
from .hparams import spec
from .methods import EditMethod, get_method
from .weights import Update, WeightState
from .cost import CostSpec

def bases() -> list[str]:
    """The methods PRUNE can restrain: every registered one that edits by itself with low-rank
    updates (the registry's metadata, so a new such method is a base without a change here)."""
    from .methods import METHODS

    return [n for n in METHODS if not get_method(n).wraps and get_method(n).update_kind == "lowrank"]


@dataclasses.dataclass(kw_only=True)
class PruneHparams:
    base: str = spec(doc="the editing method whose accumulated updates are restrained (`bases()`)")
    restrain_every: int = spec(1, minimum=1, doc="restrain after every edit whose index is a multiple of this")
    restraint: str = spec("log", choices=("log",), doc="g(s) = log s - log sigma_max + sigma_max (PRUNE's func_log)")


def restrained_singular_values(s: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """g(s) for s > sigma_max, s elsewhere."""
    return torch.where(s > sigma_max, torch.log(s) - math.log(sigma_max) + sigma_max, s)


class PruneMixin:
    """The restraint, combined with a base method class by `Prune.variant`."""

    name = "prune"

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None, **kw):
        state = dict(state or {})
        own = {k: state.pop(k) for k in [k for k in state if k.endswith(("/prune_u", "/prune_v"))]}
        super().__init__(model, tok, hparams, stats, context_templates, state=state or None, **kw)
        self._restrained = self.modules(model, self.hparams)
        self.correction: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in self._restrained:
            if f"{m}/prune_u" in own:
                u = torch.from_numpy(np.asarray(own[f"{m}/prune_u"], dtype=np.float32))
                v = torch.from_numpy(np.asarray(own[f"{m}/prune_v"], dtype=np.float32))
                self.correction[m] = (u, v)
        self.sigma_max: dict[str, float] = {}
        self.last_restraint: dict = {}

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        rows = super().apply(cases, weights)
        self.last_restraint = {}
        if cases and int(cases[-1].get("edit_index", 0)) % int(self.hp.restrain_every) == 0:
            self.restrain(weights)
        extra = {
            "prune_restrained": int(sum(r for r, _ in self.last_restraint.values())) if self.last_restraint else -1,
            "prune_top_sigma": max((s for _, s in self.last_restraint.values()), default=float("nan")),
        }
        return [{**row, **extra} for row in rows]

    def restrain(self, weights: WeightState) -> None:
        """Replace the live delta of every edited module by D_raw + C(D_raw) (module doc)."""
        for m in self._restrained:
            device = weights.delta[m].device
            if m not in self.sigma_max:
                self.sigma_max[m] = float(torch.linalg.matrix_norm(weights.base[m].double(), ord=2))
            sigma_max = self.sigma_max[m]
            raw = weights.delta[m].double()
            prev = self.correction.get(m)
            if prev is not None:
                raw = raw - prev[0].double().to(device) @ prev[1].double().to(device).T
            U, S, Vh = torch.linalg.svd(raw, full_matrices=False)
            over = S > sigma_max
            r = int(over.sum())
            new_u = (U[:, over] * (restrained_singular_values(S[over], sigma_max) - S[over])).to(torch.float32).contiguous()
            new_v = Vh[over].T.to(torch.float32).contiguous()
            self.last_restraint[m] = (r, float(S[0]) if S.numel() else 0.0)
            if prev is None and r == 0:
                continue  # nothing to take back, nothing to restrain
            parts_u = ([-prev[0].to(device)] if prev is not None else []) + [new_u]
            parts_v = ([prev[1].to(device)] if prev is not None else []) + [new_v]
            weights.apply(Update(module=m, u=torch.cat(parts_u, dim=1), v=torch.cat(parts_v, dim=1),
                                 meta={"method": "prune", "restraint": "log", "restrained": r, "sigma_max": sigma_max}))
            if r:
                self.correction[m] = (new_u.cpu(), new_v.cpu())
            else:
                del self.correction[m]

    def state_dict(self) -> dict:
        out = dict(super().state_dict())
        for m, (u, v) in self.correction.items():
            out[f"{m}/prune_u"] = u.numpy().astype(np.float32)
            out[f"{m}/prune_v"] = v.numpy().astype(np.float32)
        return out


class Prune(EditMethod):
    """PRUNE's restraint on the method named by `base:` (the registered class; `variant` builds
    the one that edits)."""

    name = "prune"
    hparams_type = PruneHparams
    wraps = "base"
    template_rule = "the base method's"

    @classmethod
    def variant(cls, hparams: dict) -> type:
        base = (hparams or {}).get("base")
        if base is None:
            raise EditscaleError(f"prune: hparams key 'base' is missing (the method PRUNE restrains: one of {bases()})")
        if base not in bases():
            raise EditscaleError(f"prune: base {base!r} is not one of {bases()}")
        return _combined(base)


@functools.lru_cache(maxsize=None)
def _combined(base: str) -> type:
    base_cls = get_method(base)
    hp_type = dataclasses.make_dataclass(f"Prune{base_cls.__name__}Hparams", [], bases=(PruneHparams, base_cls.hparams_type), kw_only=True)
    return type(f"PruneOn{base_cls.__name__}", (PruneMixin, base_cls), {"hparams_type": hp_type, "__module__": __name__,
                                                                          "__doc__": f"PRUNE on {base_cls.__name__}", "wraps": ""})


class PruneCost(CostSpec):
    """The wrapped method's cost (`base:`), plus a thin SVD of each accumulated delta per restraint."""

    def __init__(self, method_cls, hparams: dict):
        from .cost import method_cost

        super().__init__(method_cls, hparams)
        self.base = method_cost(hparams["base"], hparams)
        self.solve = self.base.solve

    def extra_solve_flops(self, shapes: dict[str, tuple[int, int]]) -> float:
        # ~4 d_out d_in min(d_out, d_in) per SVD
        svd = sum(4.0 * o * i * min(o, i) for o, i in shapes.values()) / int(self.hparams.get("restrain_every", 1))
        return self.base.extra_solve_flops(shapes) + svd

    def factor_rank(self, target_tokens: float) -> float:
        return self.base.factor_rank(target_tokens)

    def begin_flops(self, flops_per_prompt_step: float) -> float:
        return self.base.begin_flops(flops_per_prompt_step)

    def device_matrices(self) -> tuple[float, float]:
        return self.base.device_matrices()

    def value_prompts(self) -> tuple[int, float]:
        return self.base.value_prompts()

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        """The wrapped method's state plus the current correction's factors, float32 [d_out, r] and
        [d_in, r] per module. r, the number of singular values above sigma_max(W0), depends on the
        spectrum: this counts its bound min(k, d_out, d_in) (the delta of k edits has at most rank k)."""
        own = sum(4.0 * min(k, o, i) * (o + i) for o, i in shapes.values())
        return self.base.state_bytes(k, shapes) + own
