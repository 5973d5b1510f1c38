"""NAS, Norm-Anchor Scaling (arXiv 2602.02543): AlphaEdit with every target value rescaled to the
norm the unedited model's values have at the edited layer.

Anchor (once per chain, on the unedited model, `begin`): for `nas_restart` cases drawn from the
run's edit sequence (random.Random(nas_seed).sample; all of them when there are fewer), the value
v* = v0 + delta that makes the model predict each target is optimized in batches of
`nas_batch_size` on the bare prompt (no context templates: prompt + target tokens but the last,
one KL prompt "{} is a" per case; MEMIT's loss: mean over cases of the per-case mean target NLL
read at layer max(v_loss_layer, z layer), kl_factor KL(batchmean), v_weight_decay mean over cases
of ||delta_i|| / ||target_init_i||^2; joint stop at loss < 5e-2; per-case clamp), with delta added
to the z layer's output and v0 the MLP output there at the subject's last token. The anchor a is
the mean of ||v*|| after dropping the floor((1 - nas_trim_quantile) n) largest.

Per edit: z = target_init + delta from MEMIT's z optimization (memit.py, with the templates);
with v0 the MLP output of the z layer and r = target_init - v0 the residual before it,
v* = z - r = v0 + delta. If ||v*|| > nas_skip_factor a the edit's change is skipped (v* = v0, so
z = target_init and the update is zero), else v* is scaled to norm a; the target is r + v*. The
update is AlphaEdit's (its base class: null-space projection, the earlier edits' keys), and so is
the stored state, plus the anchor (`nas/anchor_norm`), so later segments and replays use the
same a.

Reference: SasyaTitech/NAS @5acab48, NAS/compute_z.py (v0 from `mlp_module_tmp` at the probe
prompt, `res_pre_mlp = target_init - v0`, skip when `v_star_norm_orig > 2 * mean_norm`,
`scale_vector_to_norm`), util/vstar_stats.py (`_compute_vstar_norms_batched`, batch 16,
`nas_restart` 1000 CounterFact rewrites sampled with seed 0, `_upper_trimmed_mean` at 0.95),
NAS/NAS_main.py (AlphaEdit's solve). The reference samples the anchor's cases from the whole
CounterFact file and optimizes them with the model's MEMIT hparams file (whose value keys equal
the NAS file's for GPT-2 XL and Llama3-8B); editscale samples from the run's edit sequence and
uses the run's hparams (docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from tqdm import tqdm

from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import layer_name, mlp_out_name, n_layers
from . import encoding, subject_keys, templating, value_optimization
from .alphaedit import AlphaEdit, AlphaEditCost, AlphaEditHparams
from .hparams import build as build_hparams
from .hparams import spec
from ..data.schema import fill

ANCHOR_STATE = "nas/anchor_norm"


@dataclasses.dataclass(kw_only=True)
class NasHparams(AlphaEditHparams):
    nas_restart: int = spec(1000, minimum=1, doc="cases whose v* norms give the anchor (NAS: 1000)")
    nas_seed: int = spec(0, minimum=0, doc="seed of the anchor's case sample")
    nas_batch_size: int = spec(16, minimum=1, doc="cases per batch of the anchor's optimization (NAS: 16)")
    nas_trim_quantile: float = spec(0.95, minimum=0, doc="the anchor drops the norms above this quantile (NAS: 0.95)")
    nas_skip_factor: float = spec(2.0, minimum=0, doc="an edit whose ||v*|| exceeds this times the anchor is skipped (NAS: 2)")


def trimmed_mean(values, upper_quantile: float) -> float:
    """Mean after dropping the floor((1 - q) n) largest values (NAS's _upper_trimmed_mean)."""
    arr = np.sort(np.asarray(list(values), dtype=np.float64))
    if arr.size == 0 or not np.isfinite(arr).all():
        raise EditscaleError(f"nas: cannot take the anchor of {arr.size} v* norms (empty or not finite)")
    drop = int(np.floor((1.0 - float(upper_quantile)) * arr.size))
    kept = arr[: arr.size - drop] if drop > 0 else arr
    if kept.size == 0:
        raise EditscaleError("nas: the trimming drops every v* norm; raise nas_restart or nas_trim_quantile")
    return float(kept.mean())


def bare_value_norms(model, tok, cases: list[dict], inject_module: str, value_module: str, hp) -> list[float]:
    """||v0 + delta|| of each case, delta optimized jointly for the batch on the bare prompts (module doc)."""
    hp = build_hparams(value_optimization.ValueHparams, hp)
    device = next(model.parameters()).device
    n_case = len(cases)
    subjects = [c["subject"] for c in cases]
    target_ids = [encoding.target_token_ids(tok, encoding.target_str(c)) for c in cases]
    rw_ids, rw_lookup = encoding.encode_with_subject(tok, [c["prompt"] for c in cases], subjects)
    kl_ids, kl_lookup = encoding.encode_with_subject(tok, value_optimization.KL_PROMPTS * n_case, subjects)
    seqs = [ids + t[:-1] for ids, t in zip(rw_ids, target_ids)] + kl_ids
    input_ids, mask = encoding.pad_right(seqs, encoding.pad_id(tok), device)
    inj_rows = torch.arange(2 * n_case, device=device)
    inj_cols = torch.tensor(rw_lookup + kl_lookup, device=device)
    seq_to_case = torch.cat([torch.arange(n_case), torch.arange(n_case)]).to(device)
    # target positions: (prompt row, position predicting the token, token, 1 / that case's token count)
    rows, cols, toks, weight = [], [], [], []
    for i, (ids, t) in enumerate(zip(rw_ids, target_ids)):
        for j, token in enumerate(t):
            rows.append(i), cols.append(len(ids) - 1 + j), toks.append(token), weight.append(1.0 / len(t))
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    toks_t, weight_t = torch.tensor(toks, device=device), torch.tensor(weight, device=device)
    kl_rows = torch.arange(n_case, 2 * n_case, device=device)
    kl_cols = torch.tensor(kl_lookup, device=device)

    n_layer = n_layers(model)
    loss_module = layer_name(model, max(int(hp.v_loss_layer), subject_keys.layer_of(model, inject_module)))
    last_module = layer_name(model, n_layer - 1)
    lens = value_optimization.logit_lens(model)
    state: dict = {}

    def edit_output(name, out):
        if name != inject_module:
            return out
        if "delta" not in state:
            state["target_init"] = out[inj_rows[:n_case], inj_cols[:n_case]].detach().float().clone()
            state["delta"] = torch.zeros((n_case, out.shape[-1]), device=device, dtype=torch.float32, requires_grad=True)
            state["opt"] = torch.optim.Adam([state["delta"]], lr=float(hp.v_lr))
        return out.index_put((inj_rows, inj_cols), state["delta"][seq_to_case].to(out.dtype), accumulate=True)

    def log_probs(h, r, c):
        return torch.log_softmax(lens(h[r, c]).float(), dim=-1)

    names = list(dict.fromkeys([inject_module, loss_module, last_module]))
    kl_init = None
    n_steps = int(hp.v_num_grad_steps)
    with encoding.frozen_eval(model), torch.enable_grad():
        for it in range(max(n_steps, 1)):
            if "opt" in state:
                state["opt"].zero_grad()
            with Trace(model, names, stop=True, edit_output=edit_output, keep_inputs=False) as tr:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            delta, target_init = state["delta"], state["target_init"]
            token_logp = log_probs(tr.outputs[loss_module], rows_t, cols_t).gather(1, toks_t[:, None]).squeeze(1)
            nll_each = torch.zeros(n_case, device=device).index_add(0, rows_t, -token_logp * weight_t)
            kl_logp = log_probs(tr.outputs[last_module], kl_rows, kl_cols)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = float(hp.kl_factor) * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = float(hp.v_weight_decay) * (delta.norm(dim=1) / target_init.norm(dim=1) ** 2).mean()
            loss = nll_each.mean() + kl + wd
            if loss.item() < value_optimization.EARLY_STOP_LOSS or it >= n_steps - 1:
                break
            loss.backward()
            state["opt"].step()
            with torch.no_grad():
                max_norm = float(hp.clamp_norm_factor) * target_init.norm(dim=1)
                scale = torch.minimum(torch.ones_like(max_norm), max_norm / (delta.norm(dim=1) + 1e-10))
                delta.mul_(scale[:, None])
    _, v0 = subject_keys.module_io_at_subject(model, tok, value_module, [c["prompt"] for c in cases], subjects)
    return (v0 + state["delta"].detach()).norm(dim=1).tolist()


class Nas(AlphaEdit):
    """AlphaEdit with each target value scaled to the unedited model's mean value norm."""

    name = "nas"
    hparams_type = NasHparams

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None, projections=None):
        super().__init__(model, tok, hparams, stats, context_templates, state, projections=projections)
        self.value_module = mlp_out_name(model, self.layers[-1])
        self.anchor: float | None = None
        self.anchor_norms: list[float] = []  # the v* norms the anchor was taken over (begin)
        if state and ANCHOR_STATE in state:
            self.anchor = float(np.asarray(state[ANCHOR_STATE]).reshape(-1)[0])
        elif state:
            raise EditscaleError(f"nas: the previous segment's state has no {ANCHOR_STATE!r} (has {sorted(state)})")

    def begin(self, sequence: list[dict]) -> None:
        """The anchor, from the unedited model and a sample of the run's edit sequence."""
        n = int(self.hp.nas_restart)
        pool = list(sequence)
        sample = pool if n >= len(pool) else random.Random(int(self.hp.nas_seed)).sample(pool, n)
        size = int(self.hp.nas_batch_size)
        norms: list[float] = []
        for s in tqdm(range(0, len(sample), size), desc=f"nas anchor ||v*|| at {self.z_module}", unit="batch"):
            norms += bare_value_norms(self.model, self.tok, sample[s : s + size], self.z_module, self.value_module, self.hp)
        self.anchor = trimmed_mean(norms, float(self.hp.nas_trim_quantile))
        self.anchor_norms = norms

    def compute_targets(self, cases: list[dict]):
        if self.anchor is None:
            raise EditscaleError("nas: no anchor norm: begin(sequence) must run on the unedited model before the first edit")
        Z, logs = super().compute_targets(cases)
        first = templating.flat_templates(self.context_templates)[0]
        prompts = [fill(first, c["prompt"]) for c in cases]
        subjects = [c["subject"] for c in cases]
        _, target_init = subject_keys.module_io_at_subject(self.model, self.tok, self.z_module, prompts, subjects)
        _, v0 = subject_keys.module_io_at_subject(self.model, self.tok, self.value_module, prompts, subjects)
        Z = Z.clone()
        for j in range(len(cases)):
            r = target_init[j] - v0[j]
            v = Z[:, j].to(r.dtype) - r
            norm = float(v.norm())
            skipped = self.anchor > 0 and norm > float(self.hp.nas_skip_factor) * self.anchor
            if skipped:
                v = v0[j]
            elif self.anchor > 0:
                v = v * (self.anchor / (v.norm() + 1e-10))
            Z[:, j] = (r + v).to(Z.dtype)
            logs[j].update(nas_vstar_norm_orig=norm, nas_vstar_norm=float(v.norm()), nas_skipped=int(skipped), nas_anchor=self.anchor)
        return Z, logs

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self.anchor is not None:
            out[ANCHOR_STATE] = np.array([self.anchor], dtype=np.float64)
        return out


class NasCost(AlphaEditCost):
    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        return super().state_bytes(k, shapes) + 8.0  # + the anchor norm, float64

    def begin_flops(self, flops_per_prompt_step: float) -> float:
        """The anchor (module doc): nas_restart bare-prompt optimizations of up to
        v_num_grad_steps steps over the prompt and its KL prompt."""
        return float(self.hparams["nas_restart"]) * int(self.hparams["v_num_grad_steps"]) * 2 * flops_per_prompt_step
