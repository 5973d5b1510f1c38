"""FT-C: constrained fine-tuning of one MLP output matrix (ROME's FT baseline, "FT + L-inf").

The edited matrix W of each layer in `layers` (the study: layer 0) is trained with Adam on the
negative log-likelihood of the new target given the prompt, and after every step it is clamped
elementwise to [W_start - eps, W_start + eps] (eps = `norm_constraint`). W_start is the weight at
the start of this batch of edits (so in a sequential chain the bound is per edit step, as in the
forgetting study, which re-ran ROME's FT on the already edited model).

Objectives (`objective`):
  last_token       ROME's FT code: the log-probabilities of all target tokens are read at the
                   last prompt position and averaged (exact NLL for single-token targets; this is
                   what the paper baselines ran). Default.
  teacher_forced   NLL of the target sequence given the prompt, token by token.

Differences from the reference code, on purpose: padded target positions never enter the loss
(ROME's batched loss counted EOS padding as a target when targets had different lengths), the
optimization runs on an fp32 copy of the weight (from `weights.current`) whatever the model dtype,
and only the matrix (not the bias) is trained. The change is applied once per layer as a dense
update; the update is not low rank, so the factor files store it dense.

Hyperparameters: layers, num_steps, lr, weight_decay, norm_constraint (null: unconstrained),
batch_size, min_loss (ROME: 1e-2; a step is skipped and the loop stops once the loss is below it),
objective.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch.func import functional_call

from ..data.schema import fill
from ..io import EditscaleError
from ..models.registry import edited_weight, from_math, mlp_out_name
from . import encoding, timing
from .hparams import spec
from .methods import EditMethod
from .weights import Update, WeightState
from .cost import CostSpec

OBJECTIVES = ("last_token", "teacher_forced")


def prompt_text(case: dict) -> str:
    return fill(case["prompt"], case["subject"])


class _Batch:
    """Tokenized inputs of a few cases (padded on the right by hand) and, per case, the positions
    whose next-token distribution scores each target token."""

    def __init__(self, tok, cases: list[dict], objective: str, device):
        if objective not in OBJECTIVES:
            raise EditscaleError(f"ft-c objective {objective!r} unknown: use one of {OBJECTIVES}")
        p_ids = [list(x) for x in tok([prompt_text(c) for c in cases])["input_ids"]]
        tids = [encoding.target_token_ids(tok, encoding.target_str(c)) for c in cases]
        t = max(len(x) for x in tids)
        pos = torch.zeros((len(cases), t), dtype=torch.long)
        tgt = torch.zeros((len(cases), t), dtype=torch.long)
        tmask = torch.zeros((len(cases), t), dtype=torch.float32)
        if objective == "last_token":  # ROME's FT: every target token read at the last prompt token
            seqs = p_ids
            for i, p in enumerate(p_ids):
                pos[i, :] = len(p) - 1
        else:  # teacher forcing: prompt + target[:-1], target j read at position len(prompt) - 1 + j
            seqs = [p + x[:-1] for p, x in zip(p_ids, tids)]
            for i, (p, x) in enumerate(zip(p_ids, tids)):
                pos[i, : len(x)] = torch.arange(len(p) - 1, len(p) - 1 + len(x))
        for i, x in enumerate(tids):
            tgt[i, : len(x)] = torch.tensor(x)
            tmask[i, : len(x)] = 1.0
        input_ids, mask = encoding.pad_right(seqs, encoding.pad_id(tok), device)
        self.inputs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        self.pos = pos.to(device)
        self.tgt = tgt.to(device)
        self.tmask = tmask.to(device)
        self.size = len(cases)

    def nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-case mean NLL of the target tokens, [n]."""
        rows = torch.arange(self.size, device=logits.device)[:, None]
        logp = torch.log_softmax(logits[rows, self.pos].float(), dim=-1)  # [n, t, V]
        tok_lp = logp.gather(2, self.tgt[..., None]).squeeze(2)
        return -(tok_lp * self.tmask).sum(1) / self.tmask.sum(1)


@dataclasses.dataclass(kw_only=True)
class FineTuneHparams:
    """ROME's baselines/ft/ft_hparams.py keys that editscale reads."""

    layers: list[int] = spec(doc="fine-tuned layers (MLP output matrices)")
    num_steps: int = spec(minimum=1, doc="optimizer steps per edit")
    lr: float = spec(minimum=0, doc="Adam learning rate")
    norm_constraint: float | None = spec(doc="L-inf bound on the change of each weight (null: unconstrained, FT-L)")
    weight_decay: float = spec(0.0, minimum=0)
    batch_size: int = spec(64, minimum=1, doc="cases per optimizer batch")
    min_loss: float = spec(1e-2, minimum=0, doc="stop once the loss is below this")
    objective: str = spec("last_token", choices=OBJECTIVES, doc="loss on the last target token or teacher-forced over all")


class FineTuneConstrained(EditMethod):
    """ROME's constrained fine-tuning baseline (FT-C / FT-L) as a sequential editing method."""

    name = "ft-c"
    hparams_type = FineTuneHparams
    update_kind = "dense"

    @classmethod
    def precomputed(cls, hparams):
        return {}

    @classmethod
    def validate_hparams(cls, hp: dict, source: str = "hparams") -> None:
        super().validate_hparams(hp, source)
        layers = hp["layers"]
        if not layers:
            raise EditscaleError(f"{source}: 'layers' must be a non-empty list of integers, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise EditscaleError(f"{source}: 'layers' {layers} has duplicates")
        eps = hp["norm_constraint"]
        if eps is not None and not eps > 0:
            raise EditscaleError(f"{source}: 'norm_constraint' must be a positive number or null (unconstrained), got {eps!r}")

    def __init__(self, model, tok, hparams: dict, stats: dict | None = None, context_templates=None, state=None):
        super().__init__(model, tok, hparams, stats if stats is not None else {}, context_templates or ["{}"], state)
        self._modules = self.modules(model, self.hparams)
        for m in self._modules:
            edited_weight(model, m)  # fails early with the nearest names if missing

    @staticmethod
    def modules(model, hparams: dict) -> list[str]:
        return [mlp_out_name(model, int(layer)) for layer in hparams["layers"]]

    def state_dict(self) -> dict:
        return {}

    def _forward_nll(self, work: dict[str, torch.Tensor], batch: _Batch) -> torch.Tensor:
        params = {}
        for m, w in work.items():
            p = edited_weight(self.model, m)
            params[f"{m}.weight"] = from_math(self.model, w).to(p.dtype)
        out = functional_call(self.model, params, args=(), kwargs=dict(batch.inputs), strict=False)
        return batch.nll(out.logits)

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        if not cases:
            return []
        t0 = time.perf_counter()
        hp = self.hp
        model = self.model
        device = next(model.parameters()).device
        eps = hp.norm_constraint
        eps = None if eps in (None, False) else float(eps)
        min_loss = float(hp.min_loss)
        bs = max(1, int(hp.batch_size))
        batches = [_Batch(self.tok, cases[i : i + bs], hp.objective, device) for i in range(0, len(cases), bs)]

        for p in model.parameters():
            p.requires_grad_(False)
        start = {m: weights.current(m).to(device) for m in self._modules}
        work = {m: start[m].clone().requires_grad_(True) for m in self._modules}
        opt = torch.optim.Adam(list(work.values()), lr=float(hp.lr), weight_decay=float(hp.weight_decay))
        lo = {m: start[m] - eps for m in self._modules} if eps is not None else None
        hi = {m: start[m] + eps for m in self._modules} if eps is not None else None

        loss_before: list[float] = []
        steps_run = 0
        was_training = model.training
        model.eval()
        try:
            with timing.phase("optimize"):
                for step in range(int(hp.num_steps)):
                    steps_run = step + 1
                    total = 0.0
                    for batch in batches:
                        opt.zero_grad(set_to_none=True)
                        each = self._forward_nll(work, batch)
                        if step == 0:
                            loss_before.extend(each.detach().cpu().tolist())
                        loss = each.mean()
                        total += loss.item() * batch.size
                        if loss.item() >= min_loss:
                            loss.backward()
                            opt.step()
                        if eps is not None:
                            with torch.no_grad():
                                for m in self._modules:
                                    work[m].copy_(torch.clamp(work[m], min=lo[m], max=hi[m]))
                    if total / len(cases) < min_loss:
                        break
            with torch.no_grad():
                loss_after: list[float] = []
                for batch in batches:
                    loss_after.extend(self._forward_nll(work, batch).cpu().tolist())
        finally:
            model.train(was_training)
            for p in model.parameters():
                p.requires_grad_(False)

        norms = {}
        for m in self._modules:
            dw = (work[m].detach() - start[m]).to(torch.float32)
            norms[m] = {"fro": float(dw.norm()), "max_abs": float(dw.abs().max())}
            weights.apply(
                Update(
                    module=m,
                    dense=dw,
                    meta={"dense": True, "method": self.name, "case_ids": [c.get("case_id") for c in cases]},
                )
            )
        seconds = time.perf_counter() - t0
        rows = []
        for i, c in enumerate(cases):
            rows.append(
                {
                    "case_id": c.get("case_id"),
                    "v_loss": loss_after[i],
                    "loss_before": loss_before[i],
                    "loss_after": loss_after[i],
                    "steps": steps_run,
                    "factor_kind": "dense",
                    "norm_constraint": eps,
                    "update_norm_by_module": {m: v["fro"] for m, v in norms.items()},
                    "update_max_abs": {m: v["max_abs"] for m, v in norms.items()},
                    "batch_size": len(cases),
                    "seconds": seconds / len(cases),
                }
            )
        return rows


class FineTuneCost(CostSpec):
    solve = "none"  # fine-tuning: forward + backward with weight gradients per step, no closed form
