"""MEMOIR (Wang, Qin, Dimitriadis, Favero, Frossard, "MEMOIR: Lifelong Model Editing with Minimal
Overwrite and Informed Retention for LLMs", 2025): a residual memory beside one MLP output module,
written sparsely and read only by inputs whose activations match an edit's; the weights stay.

The residual memory is a zero-initialized matrix W_r of the module's shape (d_out x d_in); the
module's output becomes  out(x) + (x * m) W_r^T  with m a 0/1 mask over the d_in input features.

TopHash mask of an input: the mean of the module's input over the prompt tokens, minus the
background mean (`prompt_feature_agg` mean_decentered: the mean input over out-of-scope texts),
its top_k features by magnitude, mapped through a fixed random permutation of the d_in features
(`hash_seed`); m is 1 at the permuted indices.

Editing (one case): the rows are the prompt + target in every context template, then one
out-of-scope text (EasyEdit's `tokenize`, as WISE's), left-padded. The mask comes from the first row (the bare
prompt): its features averaged from its first position that differs from its padding (the
reference's `count_padding_tokens`) to the last prompt token; it is stored unless an earlier edit
stored the same mask. n_iter SGD steps (lr edit_lr, weight decay 1e-5, gradient norm clipped to
1) on W_r, every row read through the mask; the loss is the target NLL of the template rows
(WISE's `_cal_ft_loss`); the loop stops early once the loss is <= 0.02 and changed by <= 1e-4.

Inference (`ResidualMemory`): per sequence, the TopHash mask of its prompt (the whole input of a
pass that publishes no prompt lengths, editscale.models.prompts); the stored mask overlapping it
most (|m & m_i| / top_k, the first on ties); when that overlap reaches irr_threshold the sequence
reads W_r through the stored mask at every position, else the module's output is left as it is.
A one-position pass (a decoding step with a KV cache) keeps each row's choice from the pass before.

State (editscale.edit.memory): W_r, the stored masks, the background mean and the permutation, in
the delta files (each edit's changes in the factors files), so the model after any edit replays
exactly.

Reference: the MEMOIR authors' EasyEdit module easyeditor/models/memoir/MEMOIR.py (`TopHasher`,
`MEMOIR.edit`, `_cal_ft_loss`, `MEMOIRAdapter.new_weight_forward`, `aggregate_prompt_features`,
`count_padding_tokens`) and its batched port SasyaTitech/NAS @38ac1c8 baselines/memoir/
(memoir_model.py, memoir_main.py; hparams/MEMOIR/Llama3-8B.json, EleutherAI_gpt-j-6B.json).
Deviations (docs/fidelity.md): position ids from each row's first real token in the training
rows (the reference passes none: the same up to rounding on rotary-position models, while on
GPT-2's learned positions a padded row's prompt would sit elsewhere than at inference); the first
row's left padding read from the attention mask (the reference's `count_padding_tokens` counts
the positions whose input equals the first one's: the same count, tested); the background mean
over the run's out-of-scope texts, each over its own tokens (the reference loads 100 feature
vectors saved from an earlier pass over a dataset); the permutation from a seeded generator (the
reference's global RNG); batched inference with the prompt lengths scoring publishes (the
reference scores one sequence at a time); W_r in the module's mathematical orientation for
GPT-2's Conv1D too (the reference edits Linear modules).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.prompts import current_prompt_lengths
from ..models.registry import edited_weight, to_math
from . import encoding, timing
from .hparams import spec
from .memory import Memory, MemoryOp
from .methods import LayerMemoryMethod
from .weights import WeightState
from .wise import EARLY_STOP, WEIGHT_DECAY, WiseCost, easyedit_rows, target_nll, wise_template_groups
from .value_optimization import reused_prefix

CLIP_NORM = 1.0  # the reference's clip_grad_norm_(new_weight, max_norm=1.0)
BACKGROUND_TEXTS = 100  # the reference's mean over the first 100 saved background feature vectors


@dataclasses.dataclass(kw_only=True)
class MemoirHparams:
    layer: int = spec(minimum=0, doc="the layer whose MLP output module gets the residual memory")
    edit_lr: float = spec(1.0, minimum=0, doc="SGD learning rate of the residual memory (MEMOIR Llama-3, GPT-J: 1.0)")
    n_iter: int = spec(30, minimum=1, doc="SGD steps per edit at most (MEMOIR Llama-3: 30, GPT-J: 70)")
    top_k: int = spec(4096, minimum=1, doc="input features a mask keeps (MEMOIR: 4096 of Llama-3's 14336)")
    irr_threshold: float = spec(0.4, minimum=0, maximum=1, doc="mask overlap from which a sequence reads the memory (Llama-3: 0.4, GPT-J: 0.46)")
    prompt_feature_agg: str = spec("mean_decentered", choices=("mean_decentered", "mean", "last"),
                                   doc="the prompt's features: mean minus the background mean, mean, or the last prompt token's")
    hash_seed: int = spec(0, minimum=0, doc="seed of the TopHash permutation of the input features")
    objective_optimization: str = spec("only_label", choices=("only_label",), doc="the NLL over the target tokens only")
    context_template_length_params: list[list[int]] = spec([[5, 5], [10, 5]], minimum=1,
                                                           doc="[[new tokens, count], ...] of the greedy context templates (MEMOIR: [[5, 5], [10, 5]])")


def tophash_mask(features: torch.Tensor, permutation: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool [..., d]: 1 at permutation[the top_k indices of |features|] (the reference's
    `TopHasher.get_active_indices`, as a mask)."""
    idx = torch.topk(features.abs(), top_k, dim=-1).indices
    mask = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    return mask.scatter_(-1, permutation.to(features.device)[idx], True)


class ResidualMemory(Memory):
    """MEMOIR's memory at one module (editscale.edit.memoir): the residual matrix W_r (row 0 of
    `weights`, d_out x d_in), the masks of the edits (one row each, distinct), the background mean
    of the input features and the TopHash permutation (row 0 each)."""

    fields = {"weights": (np.dtype(np.float32), "residual memory W_r (d_out x d_in)"),
              "masks": (np.dtype(np.int8), "an edit's TopHash mask over the input features"),
              "background": (np.dtype(np.float32), "mean input features of out-of-scope texts"),
              "permutation": (np.dtype(np.int64), "TopHash permutation of the input features")}

    def __init__(self, modules, widths, state=None):
        super().__init__(modules, widths, state)
        self.top_k = self.irr_threshold = self.agg = None
        self._mask: torch.Tensor | None = None
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._routed: dict[str, torch.Tensor] = {}  # module -> the masks [batch, d] the last pass read

    def configure(self, model, hparams: dict) -> None:
        self.top_k, self.irr_threshold = int(hparams["top_k"]), float(hparams["irr_threshold"])
        self.agg = str(hparams["prompt_feature_agg"])

    def apply(self, op: MemoryOp) -> None:
        super().apply(op)
        self._cache.pop((op.module, op.field), None)

    def tensor(self, module: str, field: str, device, dtype=None) -> torch.Tensor:
        key = (module, field)
        t = self._cache.get(key)
        if t is None or t.device != torch.device(device) or (dtype is not None and t.dtype != dtype):
            t = torch.from_numpy(self.tables[module][field]).to(device=device, dtype=dtype)
            self._cache[key] = t
        return t

    def attach(self, model) -> list:
        if self.top_k is None:
            raise EditscaleError("ResidualMemory.configure(model, hparams) must be called before attach (new_memory does)")
        self._routed = {}

        def keep_mask(module, args, kwargs):
            self._mask = kwargs.get("attention_mask")

        return [model.register_forward_pre_hook(keep_mask, with_kwargs=True), *super().attach(model)]

    def features(self, module: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float32 [d]: one sequence's prompt features (`prompt_feature_agg`) over its input x
        [positions, d] at the prompt positions `positions` (indices, in order)."""
        if self.agg == "last":
            return x[positions[-1]].float()
        mean = x[positions].float().mean(dim=0)
        if self.agg == "mean_decentered":
            mean = mean - self.tensor(module, "background", x.device)[0]
        return mean

    def route(self, module: str, inputs: torch.Tensor) -> torch.Tensor:
        """float [batch, d]: the stored mask each sequence reads the memory through (zeros: it
        does not read it)."""
        b, n, _ = inputs.shape
        last = self._routed.get(module)
        if n == 1 and last is not None and last.shape[0] == b:
            return last  # a decoding step continues the sequences of the pass before
        real = (self._mask[:, -n:] != 0) if self._mask is not None and self._mask.dim() == 2 and self._mask.shape[0] == b \
            else torch.ones((b, n), dtype=torch.bool)
        lengths = current_prompt_lengths()
        if lengths is not None and len(lengths) != b:
            lengths = None
        feats = []
        for r in range(b):
            pos = torch.nonzero(real[r].to(inputs.device)).flatten()
            if lengths is not None:
                pos = pos[: lengths[r]]
            if pos.numel() == 0:
                pos = torch.arange(n, device=inputs.device)
            feats.append(self.features(module, inputs[r], pos))
        mask = tophash_mask(torch.stack(feats), self.tensor(module, "permutation", inputs.device)[0], self.top_k)
        stored = self.tensor(module, "masks", inputs.device, torch.float32)
        overlap = mask.float() @ stored.T / self.top_k  # [batch, stored]
        best, which = overlap.max(dim=1)
        routed = torch.where((best >= self.irr_threshold)[:, None], stored[which], torch.zeros_like(stored[which]))
        self._routed[module] = routed
        return routed

    def rewrite(self, module: str, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        t = self.tables[module]
        if len(t["masks"]) == 0 or len(t["weights"]) == 0:
            return output
        routed = self.route(module, inputs)
        reads = routed.any(dim=1)
        if not bool(reads.any()):
            return output
        w = self.tensor(module, "weights", output.device, output.dtype)[0]
        extra = torch.nn.functional.linear(inputs[reads] * routed[reads][:, None, :].to(inputs.dtype), w)
        out = output.clone()
        out[reads] = output[reads] + extra.to(output.dtype)
        return out


class Memoir(LayerMemoryMethod):
    """A residual memory beside one MLP output matrix, written and read through TopHash masks."""

    name = "memoir"
    hparams_type = MemoirHparams
    memory_type = ResidualMemory
    template_rule = "wise"

    @classmethod
    def precomputed(cls, hparams: dict) -> dict[str, dict]:
        return {}  # no statistics: the background mean comes from the run's out-of-scope texts

    @classmethod
    def memory_widths(cls, model, hparams) -> dict[str, dict[str, tuple[int, ...]]]:
        out = {}
        for m in cls.memory_modules(model, hparams):
            d_out, d_in = to_math(model, edited_weight(model, m)).shape  # (out, in) in every architecture
            out[m] = {"weights": (d_out, d_in), "masks": (d_in,), "background": (d_in,), "permutation": (d_in,)}
        return out

    def __init__(self, model, tok, hparams: dict, stats, context_templates, state=None, memory: ResidualMemory | None = None):
        super().__init__(model, tok, hparams, stats, context_templates, state, memory)
        self.d_out, self.d_in = self.memory_widths(model, self.hparams)[self.module]["weights"]
        if int(self.hp.top_k) > self.d_in:
            raise EditscaleError(f"memoir hparams: top_k {self.hp.top_k} exceeds the {self.d_in} input features of {self.module}")
        self.templates, self.out_of_scope = wise_template_groups("MEMOIR", self.context_templates)

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        return [self._edit(case) for case in cases]

    # -- the memory's constants, set once before the first edit ----------------------------------

    def module_inputs(self, tokens: dict) -> torch.Tensor:
        """The module's input [rows, positions, d_in] for a batch (its output is not needed)."""
        with torch.no_grad(), encoding.frozen_eval(self.model), Trace(self.model, [self.module], stop=True, keep_outputs=False) as tr:
            self.model(**tokens)
        return tr.inputs[self.module].detach()

    def _start(self) -> None:
        """The background mean (each out-of-scope text's mean input, averaged over the first
        BACKGROUND_TEXTS) and the TopHash permutation."""
        device = encoding.model_device(self.model)
        means = []
        for text in self.out_of_scope[:BACKGROUND_TEXTS]:
            ids = self.tok(text, return_tensors="pt")["input_ids"].to(device)
            means.append(self.module_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].float().mean(dim=0))
        background = torch.stack(means).mean(dim=0).cpu().numpy()
        gen = torch.Generator().manual_seed(int(self.hp.hash_seed))
        permutation = torch.randperm(self.d_in, generator=gen).numpy()
        m = self.module
        self.memory.apply(MemoryOp(m, "background", np.array([0]), background[None]))
        self.memory.apply(MemoryOp(m, "permutation", np.array([0]), permutation[None]))
        self.memory.apply(MemoryOp(m, "weights", np.array([0]), np.zeros((1, self.d_out, self.d_in), dtype=np.float32)))

    # -- one edit ---------------------------------------------------------------------------------

    def rows(self, case: dict) -> tuple[dict, torch.Tensor]:
        loc = self.out_of_scope[int(case.get("edit_index", 0)) % len(self.out_of_scope)]
        return easyedit_rows(self.model, self.tok, self.templates, case, loc, positions=True)

    def edit_mask(self, x0: torch.Tensor, labels0: torch.Tensor, n_pad: int) -> torch.Tensor:
        """Bool [d_in]: the TopHash mask of an edit, from its first row's module input x0
        [positions, d_in], labels and left padding (the reference's training branch of
        `new_weight_forward`: the features from the first real token to the last prompt token)."""
        boundary = int((labels0 == -100).sum()) - 1
        start = n_pad
        positions = torch.arange(start, boundary + 1, device=x0.device)
        if positions.numel() == 0:  # a prompt no longer than the padding count: its last token
            positions = torch.tensor([boundary], device=x0.device)
        feats = self.memory.features(self.module, x0, positions)
        return tophash_mask(feats, self.memory.tensor(self.module, "permutation", x0.device)[0], int(self.hp.top_k))

    def _edit(self, case: dict) -> dict:
        hp, m = self.hp, self.module
        table = self.memory.tables[m]
        if len(table["permutation"]) == 0:
            with timing.phase("keys"):
                self._start()
        with timing.phase("keys"):
            tokens, labels = self.rows(case)
            x = self.module_inputs(tokens)
            mask = self.edit_mask(x[0], labels[0], int((tokens["attention_mask"][0] == 0).sum()))
        stored = self.memory.tables[m]["masks"].astype(bool)
        new_mask = not any(np.array_equal(mask.cpu().numpy(), s) for s in stored)
        if new_mask:
            self.memory.apply(MemoryOp(m, "masks", np.array([len(stored)]), mask.cpu().numpy().astype(np.int8)[None]))
        # W_r is trained in float32 whatever the model's dtype (as WeightState keeps W0 + D)
        device = encoding.model_device(self.model)
        w = torch.nn.Parameter(torch.from_numpy(self.memory.tables[m]["weights"][0].copy()).to(device))
        opt = torch.optim.SGD([w], lr=float(hp.edit_lr), weight_decay=WEIGHT_DECAY)
        read = mask.to(device)

        def residual(name, out):
            xin = tr.inputs[name]
            return out + torch.nn.functional.linear(xin * read.to(xin.dtype), w.to(xin.dtype)).to(out.dtype)

        previous, current = 0.0, 1e9
        losses, steps = [], 0
        with timing.phase("optimize"), encoding.frozen_eval(self.model), reused_prefix(self.model, int(hp.layer)):
            for _ in range(int(hp.n_iter)):
                with Trace(self.model, [m], edit_output=residual, keep_outputs=False) as tr:
                    logits = self.model(**tokens).logits
                loss = target_nll(logits, labels)
                losses.append(float(loss.detach()))
                if abs(current - previous) <= EARLY_STOP[0] and current <= EARLY_STOP[1]:
                    break
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(w, max_norm=CLIP_NORM)
                opt.step()
                steps += 1
                previous, current = current, float(loss.detach())
        self.memory.apply(MemoryOp(m, "weights", np.array([0]), w.detach().float().cpu().numpy()[None]))
        return {"case_id": case.get("case_id"), "v_loss": losses[-1], "loss_before": losses[0], "steps": steps,
                "memoir_masks": len(self.memory.tables[m]["masks"]), "memoir_new_mask": int(new_mask)}


class MemoirCost(WiseCost):
    """As WISE's (n_iter forward / backward passes over the edit in every context template and one
    out-of-scope text, no closed-form solve); the memory is W_r and one mask per edit."""

    def memory_op_bytes(self, d_out: int, d_in: int) -> float:
        return 4.0 * d_out * d_in + d_in  # W_r after the edit, the edit's mask (int8)

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        return 0.0  # no method state: everything is in the memory

    def memory_bytes(self, k: int, d_out: int, d_in: int) -> float:
        return 4.0 * d_out * d_in + k * d_in + 4.0 * d_in + 8.0 * d_in  # W_r, <= k masks, background, permutation
