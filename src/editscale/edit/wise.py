"""WISE (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024), in its published form WISE-Retrieve: a side copy of one MLP
output matrix (the side memory) trained on the edits, a router that sends an input to the side
memory when its output there differs enough from the main one; the model's weights stay.

Editing (one case): the rows are the edit's prompt + target in every context template, then one
out-of-scope prompt. n_iter SGD steps (lr edit_lr, weight decay 1e-5) on the side weight W' with
its gradient masked to the shard's random mask (a fraction mask_ratio of the entries, drawn anew
every save_freq edits), W' clamped to W +- norm_constraint after each step. The loss is

    L = NLL(target | prompt) over the template rows (the reference's masked mean)
      + mean+(d_out - d_in + gamma) + mean+(d_out - alpha) + mean+(beta - d_in)

where d(x) = mean over positions of ||act(x W'^T) - act(x W^T)|| (act: the model's MLP
activation), d_in over the template rows, d_out over the out-of-scope row, mean+ the mean of the
positive entries (act_margin = [alpha, beta, gamma]). The loop stops early once the loss is
<= 0.02 and changed by <= 1e-4. The edit's activation d_in (mean over its rows) lowers the side
memory's threshold min_act (the minimum over the shard's edits).

Every save_freq edits W' becomes a knowledge shard (with its min_act) and W' restarts from W;
every merge_freq edits the last merge_freq / save_freq shards are merged into one by TIES
(magnitude-sparsified to `densities`, sign consensus by sum, normalized, weights / n each), its
min_act the minimum of theirs.

Inference (editscale.edit.memory.SideMemory): per sequence, d of W' (mean over the sequence's
positions; their maximum past 100 positions); the main output when d < act_ratio x min_act, else
W''s; then each shard whose d is larger than the best so far and above its own threshold.

State: the side memory (editscale.edit.memory.SideMemory: W' and the shards, in the delta files,
each edit's new W' in the factors files); the edit count, in the method state.

Reference: zjunlp/EasyEdit @14cea82, easyeditor/models/wise/WISE.py (`WISE.edit`,
`_cal_ft_loss`, `_cal_activation_loss`, `WISEAdapter.forward` / `save_weight` / `merge_weight`,
retrieve mode), utils.py (`tokenize`, `get_context_templates`), merge/gta.py;
hparams/WISE/*.yaml. Deviations (docs/fidelity.md): the out-of-scope prompt is one of the run's
model-generated texts, not a dataset question; masks from a generator seeded with the shard's
index; routing per sequence of a batch, over its real (unpadded) positions; the module's bias in
every side output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..data.schema import fill
from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import edited_weight
from . import encoding, timing
from .cost import CostSpec
from .hparams import spec
from .memory import MemoryOp, SideMemory, activation_distances, mlp_activation, side_output
from .methods import LayerMemoryMethod
from .weights import WeightState
from .value_optimization import reused_prefix

FRESH_MIN_ACT = 1e9  # the reference's EditingMeanAct() start: no threshold before the first edit
WEIGHT_DECAY = 1e-5  # the reference's SGD(..., weight_decay=1e-5)
EARLY_STOP = (1e-4, 0.02)  # EarlyStopMeter: |loss - previous| <= 1e-4 and loss <= 0.02


@dataclasses.dataclass(kw_only=True)
class WiseHparams:
    layer: int = spec(minimum=0, doc="the layer whose MLP output matrix gets the side memory")
    mask_ratio: float = spec(0.2, minimum=0, maximum=1, doc="fraction of the side weight's entries a shard trains (WISE: 0.2)")
    edit_lr: float = spec(0.9, minimum=0, doc="SGD learning rate of the side weight (WISE Llama-3: 0.9, GPT-2 XL: 1.0)")
    n_iter: int = spec(30, minimum=1, doc="SGD steps per edit at most (WISE Llama-3: 30)")
    norm_constraint: float = spec(1.0, minimum=0, doc="the side weight stays within W +- this, entrywise")
    act_margin: list[float] = spec([2.0, 20.0, 10.0], minimum=0, doc="[alpha, beta, gamma]: out-of-scope bound, in-scope bound, margin")
    act_ratio: float = spec(0.5, minimum=0, doc="routing threshold as a fraction of the smallest in-scope activation")
    save_freq: int = spec(500, minimum=1, doc="edits per knowledge shard")
    merge_freq: int = spec(1000, minimum=1, doc="edits between TIES merges of the last merge_freq / save_freq shards")
    merge_alg: str = spec("ties", choices=("ties",), doc="how shards merge (WISE: TIES)")
    densities: float = spec(0.53, minimum=0, maximum=1, doc="fraction of each shard's change TIES keeps")
    weights: float = spec(1.0, minimum=0, doc="total weight of the merged shards (1 / n each)")
    retrieve: bool = spec(True, choices=(True,), doc="WISE-Retrieve (the published setting; WISE-Merge is not implemented)")
    replay: bool = spec(False, choices=(False,), doc="replay of past edits while training (off in every published file)")
    objective_optimization: str = spec("only_label", choices=("only_label",), doc="the NLL over the target tokens only")
    context_template_length_params: list[list[int]] = spec([[5, 5], [10, 5]], minimum=1,
                                                           doc="[[new tokens, count], ...] of the greedy context templates (WISE: [[5, 5], [10, 5]])")


def easyedit_rows(model, tok, templates: list[str], case: dict, loc: str, positions: bool = False) -> tuple[dict, torch.Tensor]:
    """The rows EasyEdit's lifelong editors (WISE, MEMOIR) train one edit on (their utils.py
    `tokenize`): the prompt + target in every context template, then one out-of-scope text `loc`,
    left-padded (EasyEdit pads these batches on the left); labels -100 up to the templated prompts'
    padded length, which with left padding is where the targets start, and on padding.
    With `positions`, position ids that start at each row's first real token (EasyEdit passes
    none: the same up to rounding on rotary-position models; on learned positions, GPT-2's, a
    padded row's prompt would sit at shifted positions). Returns (input_ids, attention_mask and
    position_ids on the model's device, labels)."""
    prompt = fill(case["prompt"], case["subject"])
    target = encoding.target_str(case)
    full = [t.format(prompt + " " + target) for t in templates] + [loc]
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        prompt_ids = tok([t.format(prompt) for t in templates], return_tensors="pt", padding=True)["input_ids"]
        tokens = tok(full, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    labels = tokens["input_ids"].clone()
    for i in range(len(templates)):
        labels[i, : prompt_ids.shape[1]] = -100
    labels[tokens["input_ids"] == encoding.pad_id(tok)] = -100
    device = encoding.model_device(model)
    out = {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}
    if positions:
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out, labels.to(device)


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's `_cal_ft_loss` (WISE, MEMOIR) on `easyedit_rows`: per template row the mean
    token NLL from the position before its last prompt token on (a masked mean whose prompt
    positions count in the denominator with NLL 0), averaged over the rows; the last row (the
    out-of-scope text) is not in it."""
    last_prompt = (labels == -100).sum(dim=-1) - 1
    shift_logits, shift_labels = logits[:-1, :-1], labels[:-1, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                            reduction="none").view(shift_labels.shape)
    counted = torch.zeros_like(nll, dtype=torch.bool)
    for i, col in enumerate(last_prompt[:-1].tolist()):
        counted[i, col - 1:] = True
    return ((nll * counted).sum(1) / counted.sum(1)).mean()


def wise_template_groups(method: str, groups) -> tuple[list[str], list[str]]:
    """(context templates, out-of-scope texts): the two groups of the template rule 'wise' that
    EasyEdit's lifelong editors (WISE, MEMOIR) read."""
    if len(groups) != 2:
        raise EditscaleError(f"{method} reads two template groups (the rule 'wise': context templates, out-of-scope texts); "
                             f"got {len(groups)}")
    return groups[0], groups[1]


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries, 0 when there are none (the reference's hinge means)."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else torch.zeros((), dtype=x.dtype, device=x.device)


def ties_merge(base: torch.Tensor, shards: list[torch.Tensor], density: float, total_weight: float) -> torch.Tensor:
    """TIES (the reference's GTA('magnitude', 'sum', normalize=True)): each shard's change from
    `base` kept at its `density` largest magnitudes, weighted total_weight / n, the entries whose
    sign agrees with the sign of the weighted sum averaged, added to `base`."""
    deltas = []
    for shard in shards:
        delta = shard - base
        if density < 1:
            k = int(density * delta.numel())
            if k <= 0:
                raise EditscaleError(f"WISE: densities {density} keeps no entry of a {tuple(delta.shape)} shard")
            mask = torch.zeros_like(delta)
            mask.view(-1)[torch.topk(delta.abs().view(-1).float(), k=k, largest=True).indices] = 1
            delta = delta * mask
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor([total_weight / len(shards)] * len(shards), dtype=stacked.dtype)
    while w.dim() < stacked.dim():
        w = w.unsqueeze(-1)
    weighted = stacked * w
    majority = (weighted.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = weighted.sign().to(base.dtype) == majority
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + mixed / divisor).to(base.dtype)


class Wise(LayerMemoryMethod):
    """A side copy of one MLP output matrix with routing; the weights stay as they are."""

    name = "wise"
    hparams_type = WiseHparams
    memory_type = SideMemory
    template_rule = "wise"

    @classmethod
    def precomputed(cls, hparams: dict) -> dict[str, dict]:
        return {}  # no statistics

    @classmethod
    def validate_hparams(cls, hp: dict, source: str = "hparams") -> None:
        super().validate_hparams(hp, source)
        if len(hp["act_margin"]) != 3:
            raise EditscaleError(f"{source}: act_margin is [alpha, beta, gamma], got {hp['act_margin']!r}")
        if int(hp["merge_freq"]) % int(hp["save_freq"]):
            raise EditscaleError(f"{source}: merge_freq ({hp['merge_freq']}) must be a multiple of save_freq ({hp['save_freq']}): "
                                 "a merge takes the last merge_freq / save_freq shards")

    @classmethod
    def memory_widths(cls, model, hparams) -> dict[str, dict[str, tuple[int, ...]]]:
        # the side weights in the module's stored orientation (GPT-2's Conv1D: (in, out)), as the
        # reference trains and masks them
        return {m: {"weights": tuple(edited_weight(model, m).shape), "min_act": (), "active": ()}
                for m in cls.memory_modules(model, hparams)}

    def __init__(self, model, tok, hparams: dict, stats, context_templates, state=None, memory: SideMemory | None = None):
        super().__init__(model, tok, hparams, stats, context_templates, state, memory)
        self.templates, self.out_of_scope = wise_template_groups("WISE", self.context_templates)
        self.edits_done = int(np.asarray(state["edits_done"])) if state else 0
        self.act = mlp_activation(model)

    def state_dict(self) -> dict:
        return {"edits_done": np.array(self.edits_done, dtype=np.int64)}

    def shard_mask(self, shard: int) -> torch.Tensor:
        """The trainable entries of shard `shard` (a fraction mask_ratio, in the stored
        orientation), from a generator seeded with the shard's index."""
        shape = self.memory_widths(self.model, self.hparams)[self.module]["weights"]
        draws = np.random.default_rng(shard).random(int(np.prod(shape)))
        return torch.from_numpy((draws < float(self.hp.mask_ratio)).astype(np.float32)).reshape(shape)

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        return [self._edit(case) for case in cases]

    # -- one edit ---------------------------------------------------------------------------------

    def rows(self, case: dict) -> tuple[dict, torch.Tensor]:
        loc = self.out_of_scope[int(case.get("edit_index", 0)) % len(self.out_of_scope)]
        return easyedit_rows(self.model, self.tok, self.templates, case, loc)

    def losses(self, tokens: dict, labels: torch.Tensor, side: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(NLL loss, activation loss, d per template row) with the side weight in place of the
        module's (the reference's `_cal_ft_loss` and `_cal_activation_loss`, one case)."""
        module = self.module_obj
        seen = {}

        def swap(name, out):
            x = tr.inputs[name]
            seen["main"] = out
            seen["side"] = side_output(module, x, side.to(x.dtype))
            return seen["side"]

        with Trace(self.model, [self.module], edit_output=swap, keep_outputs=False) as tr:
            logits = self.model(**tokens).logits
        ft = target_nll(logits, labels)
        d = activation_distances(self.act, seen["main"], seen["side"]).mean(dim=-1)  # [rows]
        d_in, d_out = d[:-1], d[-1:]
        alpha, beta, gamma = (float(v) for v in self.hp.act_margin)
        act_loss = positive_mean(d_out.view(-1, 1) - d_in + gamma) + positive_mean(d_out - alpha) + positive_mean(beta - d_in)
        return ft, act_loss, d_in

    def _edit(self, case: dict) -> dict:
        hp, m = self.hp, self.module
        table = self.memory.tables[m]
        # the side weight is trained in float32 whatever the model's dtype (as WeightState keeps
        # W0 + D): a half-precision model sees it cast to its dtype in the forward pass
        base = edited_weight(self.model, m).detach().float()
        if self.memory.size(m) == 0:  # the side memory starts as a copy of the module's weight
            self._set(0, base, FRESH_MIN_ACT, active=1)
        shard = self.edits_done // int(hp.save_freq)
        mask = self.shard_mask(shard).to(device=base.device)
        side = torch.nn.Parameter(torch.from_numpy(table["weights"][0].copy()).to(device=base.device))
        opt = torch.optim.SGD([side], lr=float(hp.edit_lr), weight_decay=WEIGHT_DECAY)
        with timing.phase("keys"):
            tokens, labels = self.rows(case)
        min_act = float(table["min_act"][0])
        previous, current = 0.0, 1e9
        losses, steps, d_edit = [], 0, None
        with timing.phase("optimize"), encoding.frozen_eval(self.model), reused_prefix(self.model, int(hp.layer)):
            for i in range(int(hp.n_iter)):
                ft, act_loss, d_in = self.losses(tokens, labels, side)
                loss = ft + act_loss
                losses.append(float(loss.detach()))
                stop = abs(current - previous) <= EARLY_STOP[0] and current <= EARLY_STOP[1]
                if stop or i == int(hp.n_iter) - 1:
                    d_edit = float(d_in.detach().mean())  # the reference's save_editing_activation
                if stop:
                    break
                opt.zero_grad()
                loss.backward()
                side.grad = side.grad * mask
                opt.step()
                steps += 1
                previous, current = current, float(loss.detach())
                with torch.no_grad():
                    side.copy_(torch.clamp(side, min=base - float(hp.norm_constraint), max=base + float(hp.norm_constraint)))
        self._set(0, side.detach(), min(min_act, d_edit))
        self.edits_done += 1
        row = {"case_id": case.get("case_id"), "v_loss": losses[-1], "loss_before": losses[0], "steps": steps,
               "wise_activation": d_edit, "wise_min_act": min(min_act, d_edit)}
        if self.edits_done % int(hp.save_freq) == 0:
            self._save_shard()
        if self.edits_done % int(hp.merge_freq) == 0:
            self._merge_shards()
        row["wise_shards"] = int(self.memory.tables[m]["active"][1:].sum())
        return row

    # -- shards --------------------------------------------------------------------------------------

    def _set(self, row: int, weights: torch.Tensor | np.ndarray | None, min_act: float | None, active: int | None = None) -> None:
        m = self.module
        if weights is not None:
            w = weights.float().cpu().numpy() if isinstance(weights, torch.Tensor) else weights
            self.memory.apply(MemoryOp(m, "weights", np.array([row]), np.asarray(w, dtype=np.float32)[None]))
        if min_act is not None:
            self.memory.apply(MemoryOp(m, "min_act", np.array([row]), np.array([min_act], dtype=np.float64)))
        if active is not None:
            self.memory.apply(MemoryOp(m, "active", np.array([row]), np.array([active], dtype=np.int8)))

    def _shards(self) -> list[int]:
        """Rows of the current shards, in order (row 0 is the side weight being trained)."""
        return [i for i, a in enumerate(self.memory.tables[self.module]["active"]) if i > 0 and a]

    def _save_shard(self) -> None:
        """The reference's save_weight: the side weight becomes the next shard, and restarts."""
        t = self.memory.tables[self.module]
        row = 1 + len(self._shards())
        self._set(row, t["weights"][0].copy(), float(t["min_act"][0]), active=1)
        self._set(0, edited_weight(self.model, self.module).detach().float(), FRESH_MIN_ACT)

    def _merge_shards(self) -> None:
        """The reference's merge_weight (retrieve): the last merge_freq / save_freq shards merged by
        TIES into the first of them, the rest freed."""
        n = int(self.hp.merge_freq) // int(self.hp.save_freq)
        rows = self._shards()[-n:]
        t = self.memory.tables[self.module]
        base = edited_weight(self.model, self.module).detach().float().cpu()
        merged = ties_merge(base, [torch.from_numpy(t["weights"][r].copy()) for r in rows], float(self.hp.densities), float(self.hp.weights))
        min_act = min(float(t["min_act"][r]) for r in rows)
        self._set(rows[0], merged, min_act)
        for r in rows[1:]:
            self._set(r, None, None, active=0)


class WiseCost(CostSpec):
    """n_iter forward / backward passes over the edit in every context template and one
    out-of-scope text per edit, no closed-form solve; the memory is the side weight and its shards."""

    solve = "memory"

    def device_matrices(self) -> tuple[float, float]:
        return 0.0, 0.0

    def value_prompts(self) -> tuple[int, float]:
        prompts, tokens = super().value_prompts()
        return prompts + 1, tokens  # + the out-of-scope text each edit trains against

    def memory_op_bytes(self, d_out: int, d_in: int) -> float:
        return 4.0 * d_out * d_in + 8  # the side weight after the edit, its threshold

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        return 8.0  # edits_done (int64), which places the shard saves and merges

    def memory_bytes(self, k: int, d_out: int, d_in: int) -> float:
        """The side weight plus the shard rows allocated after k edits (a merge frees rows, which
        the next shards reuse; a row stays allocated)."""
        save, merge = int(self.hparams.get("save_freq", 500)), int(self.hparams.get("merge_freq", 1000))
        active = allocated = 0
        for saved_at in range(save, k + 1, save):
            active += 1
            allocated = max(allocated, active)
            if saved_at % merge == 0:
                active -= merge // save - 1
        return (1 + allocated) * (4.0 * d_out * d_in + 9)
