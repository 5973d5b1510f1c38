"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") and r-ROME
(Gupta et al. 2024, "Rebuilding ROME").

One edit changes the MLP output matrix W of layer L = hparams["layers"][0] by a rank-one update

    dW = right u^T,   u = C^-1 k* / ||C^-1 k*||,   right = (v* - W k - b) / (k . u)

where k* is the module input at the subject's last token averaged over the context templates, C
the second moment E[k k^T] of the module's inputs (identity when mom2_adjustment is false), v* the
module output found by `optimize_value`, and (k, W k + b):
  - key_averaging "prompt" (original ROME): input/output of the module at the plain edit prompt;
  - key_averaging "templates" (r-ROME): k = k*, output W k* + b computed from the current weights.
After the update W' k + b = v* (exactly, up to float error). Several cases given to `apply` are
edited one after another, each on the weights left by the previous one (as ROME does).

Reference: kmeng01/rome @0874014c, rome/rome_main.py `execute_rome` and `get_context_templates`
(["{}"] + samples from "<|endoftext|>", one flat key average), rome/compute_u.py (u = C^-1 k* in
float32 there, float64 here), rome/compute_v.py (the loss on the final logits: v_loss_layer must be
the last layer). r-ROME: scalable-model-editing/rebuilding-rome (the key k* in both places).
Measured against the reference on identical inputs: docs/fidelity.md.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..io import EditscaleError
from .subject_keys import compute_keys, module_io_at_subject
from .solvers import CovSolver, module_forward
from .value_optimization import ValueHparams, check_common_hparams, check_loss_layer, optimize_value
from .hparams import spec
from .methods import EditMethod
from .weights import Update, WeightState
from .cost import CostSpec


@dataclasses.dataclass(kw_only=True)
class RRomeHparams(ValueHparams):
    """The keys of ROME's hparams/ROME/*.json that editscale reads (module names come from the
    architecture registry, the statistics from the workflow)."""

    mom2_adjustment: bool = spec(doc="u = C^-1 k* (False: u = k*)")
    context_template_length_params: list[list[int]] = spec(minimum=1, doc="[[length, count], ...] of sampled templates")


@dataclasses.dataclass(kw_only=True)
class RomeHparams(RRomeHparams):
    key_averaging: str = spec("prompt", choices=("prompt", "templates"), doc="key of the update's denominator: the plain prompt (ROME) or k* (r-ROME)")


class Rome(EditMethod):
    name = "rome"
    hparams_type = RomeHparams
    # rome/rome_main.py get_context_templates (flat, from <|endoftext|>); rome/compute_v.py reads
    # the loss from the final logits
    template_rule = "rome"
    value_loss_layer = "final"
    batch_edits = False  # one rank-one update per case (EMMET is the batched ROME)

    @classmethod
    def precomputed(cls, hparams):
        return {"mom2": {}} if hparams.get("mom2_adjustment", True) else {}

    def __init__(self, model, tok, hparams, stats, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self.module = self.modules(model, self.hparams)[0]
        self._solvers: dict[str, CovSolver] = {}
        # diagnostics of the last edit (tests, debugging): k_star, u, v_star, key, key_output, right
        self.last: dict[str, torch.Tensor] = {}

    @classmethod
    def validate_hparams(cls, hp, source="hparams"):
        super().validate_hparams(hp, source)
        check_common_hparams(hp, source)
        if len(hp["layers"]) != 1:
            raise EditscaleError(f"{source}: {cls.name} edits exactly one layer, got layers {hp['layers']}")

    @classmethod
    def check_for_model(cls, hp, layers_in_model, source="hparams"):
        super().check_for_model(hp, layers_in_model, source)
        if cls.value_loss_layer == "final":
            check_loss_layer(layers_in_model, hp, cls.name, source)

    @property
    def key_averaging(self) -> str:
        """The key of the update's denominator: the file's (ROME) or the one the method forces (r-ROME)."""
        return self.forced_hparams.get("key_averaging") or self.hp.key_averaging

    def solver(self, module: str) -> CovSolver:
        """C^-1 for `module`, factored once per method object (i.e. once per segment)."""
        if module not in self._solvers:
            if module not in self.stats:
                raise EditscaleError(f"{self.name}: mom2_adjustment needs the second moment of {module!r}; stats hold {sorted(self.stats)}")
            self._solvers[module] = CovSolver(self.stats[module], module=module)
        return self._solvers[module]

    def left_vector(self, k_star: torch.Tensor) -> torch.Tensor:
        """u = C^-1 k* / ||C^-1 k*|| (float64); k* / ||k*|| without mom2_adjustment."""
        u = self.solver(self.module).solve(k_star) if self.hp.mom2_adjustment else k_star.to(torch.float64)
        return u / u.norm()

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        return [self.edit_one(case, weights) for case in cases]

    def edit_one(self, case: dict, weights: WeightState) -> dict:
        t0 = time.perf_counter()
        hp, module = self.hp, self.module
        k_star = compute_keys(self.model, self.tok, module, [case], self.context_templates)[0]
        u = self.left_vector(k_star)
        v_star, vlog = optimize_value(self.model, self.tok, case, self.context_templates, module, hp, loss_layer=self.value_loss_layer)
        if self.key_averaging == "prompt":
            k_in, k_out = module_io_at_subject(self.model, self.tok, module, [case["prompt"]], [case["subject"]])
            cur_in, cur_out = k_in[0].to(torch.float64), k_out[0].to(torch.float64)
        else:
            cur_in = k_star.to(torch.float64)
            cur_out = module_forward(self.model, weights, module, k_star)
        u = u.to(cur_in.device)
        denom = torch.dot(cur_in, u)
        right = (v_star.to(torch.float64) - cur_out) / denom
        meta = {"method": self.name, "case_id": case.get("case_id"), "key_averaging": self.key_averaging}
        weights.apply(Update(module, u=right.float()[:, None], v=u.float()[:, None], meta=meta))
        self.last = {"k_star": k_star, "u": u, "v_star": v_star, "key": cur_in, "key_output": cur_out, "right": right}
        return {
            "case_id": case.get("case_id"),
            "module": module,
            **vlog,
            "update_norm": float(right.norm().item()),  # ||right u^T||_F, u has unit norm
            "key_dot_u": float(denom.item()),
            "residual_norm": float((v_star.to(torch.float64) - cur_out).norm().item()),
            "seconds": time.perf_counter() - t0,
        }


class RRome(Rome):
    """r-ROME: ROME with key_averaging forced to "templates" (its hparams files have no
    key_averaging: the method is what decides it)."""

    name = "r-rome"
    hparams_type = RRomeHparams
    forced_hparams = {"key_averaging": "templates"}


class RomeCost(CostSpec):
    """ROME / r-ROME: one factorization of C per segment, a triangular solve per edit."""

    solve = "per_segment"
