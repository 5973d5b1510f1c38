"""UltraEdit (Gu et al., "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large
Language Models", arXiv 2505.14679): one forward and backward pass per group of cases, a running
normalization over every edit so far, and a closed-form ridge update of each edited matrix.

Per `apply` (one step of B cases):

1. The cases are sorted by token count (longest first, stable) and grouped in tuples of
   `tuple_size` (UltraEdit's dataset.batch_size). Each tuple is the right-padded batch of
   prompt tokens + target tokens but the last; the loss is the cross entropy of the target tokens
   (mean over every target token of the tuple), at the positions that predict them.
2. For every edited module and every such position: the key h (module input) and the gradient g
   of the loss with respect to the module output, both from that one forward / backward pass on
   the model before the step. After each tuple, the running statistics of [h | g] are updated,
   module after module (RunningMeanStd: n, mean, var += m var_unbiased(x) + n m delta^2 / (n + m),
   std = sqrt(var / (n + m - 1 + eps)); a single row adds no variance term, where the reference's
   torch.var would give NaN), one set per matrix shape (d_in, d_out), shared by the modules of
   that shape as in the reference.
3. For every module, with H [N x d_in] and G [N x d_out] all positions of the step:
   [H^ | G^] = ([H | G] - mean) / (std + eps), V^ = -lr ||h^||^2 g^ (per row),
   dW = V^T H (H^T H + I)^-1,   u = V^T [d_out x N], v = (H^T H + I)^-1 H^T [d_in x N],
   written as one low-rank update u v^T per module, every module from the same pass.

State: the running statistics (`normalizer/{d_in}x{d_out}/n|mean|var|std`, float32 as computed),
saved with every segment, so that the chain resumed from any checkpoint normalizes exactly as the
uninterrupted one.

Edited modules: `mlp_in_layers` (each layer's first MLP input matrix: gate_proj, c_fc, fc_in,
dense_h_to_4h), `mlp_up_layers` (Llama family's up_proj) and `layers` (MLP output matrices, as the
other methods edit), in that order. No second moments, no context templates, no subject.

Reference: XiaojieGu/UltraEdit @0beb222, editor/ultraedit.py (`cache`, `predict_param_shifts`),
nets.py `RunningMeanStd`, util.py `Tracer` (keys at labels != -100, `register_full_backward_hook`
gradients), data/base.py + data/zsre.py (tuples: prompt + answer[:-1], labels shifted, sorted by
length within a step of n_edits, batch_size per tuple), config/editor/ultraedit.yaml (lr 1e-6,
token ans), config/model/*.yaml (edited modules). The reference solves in float32; editscale in
float64 (docs/fidelity.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import arch_spec, edited_weight, mlp_out_name, to_math
from . import encoding, timing
from .hparams import check_layers, spec
from .methods import EditMethod
from .weights import Update, WeightState
from ..data.schema import fill
from .cost import CostSpec

EPS32 = float(torch.finfo(torch.float32).eps)  # the reference's eps (float32 features)


@dataclasses.dataclass(kw_only=True)
class UltraEditHparams:
    mlp_in_layers: list[int] = spec([], doc="layers whose (first) MLP input matrix is edited (gate_proj, c_fc, fc_in, dense_h_to_4h)")
    mlp_up_layers: list[int] = spec([], doc="layers whose up_proj is edited (gated MLPs of the Llama family)")
    layers: list[int] = spec([], doc="layers whose MLP output matrix is edited (UltraEdit's GPT-J setting: fc_out)")
    lr: float = spec(1e-6, minimum=0, doc="step size of the pseudo-value -lr ||h^||^2 g^ (UltraEdit: 1e-6)")
    tuple_size: int = spec(10, minimum=1, doc="cases per forward / backward pass of a step (UltraEdit's dataset.batch_size: 10)")
    solve_dtype: str = spec("float64", choices=("float64", "float32"),
                            doc="dtype of (H^T H + I)^-1 H^T: float64 (editscale), float32 (the reference, as published)")


class RunningMeanStd:
    """The reference's RunningMeanStd (nets.py), float32, as plain tensors."""

    def __init__(self, size: int, device=None, state: dict | None = None):
        z = torch.zeros(size, dtype=torch.float32, device=device)
        self.n = torch.zeros(1, dtype=torch.float32, device=device)
        self.mean, self.var, self.std = z.clone(), z.clone(), z.clone()
        if state is not None:
            for key in ("n", "mean", "var", "std"):
                setattr(self, key, torch.from_numpy(np.asarray(state[key], dtype=np.float32).copy()).to(device))

    def update(self, x: torch.Tensor) -> None:
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean = self.mean + m * delta / n
        # one row has no unbiased variance (torch gives NaN, which would poison every later edit):
        # it contributes none (the reference's tuples of 10 cases never have a single row)
        spread = x.var(0) if m > 1 else torch.zeros_like(self.mean)
        self.var = self.var + m * spread + self.n * m * delta.pow(2) / n
        self.std = (self.var / (n - 1 + EPS32)).sqrt()
        self.n = n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + EPS32)

    def state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).detach().cpu().numpy().astype(np.float32) for k in ("n", "mean", "var", "std")}


def case_tokens(tok, case: dict) -> tuple[list[int], list[int]]:
    """(input ids, label ids) of one case: tok(prompt) + target[:-1]; labels -100 except the
    target tokens, each at the position that predicts it (data/zsre.py `tok_tuples`)."""
    text = fill(case["prompt"], case["subject"])
    prompt = list(tok(text)["input_ids"])
    target = encoding.target_token_ids(tok, encoding.target_str(case))
    return prompt + target[:-1], [-100] * (len(prompt) - 1) + target


class UltraEdit(EditMethod):
    """Lifelong normalization of [key | output gradient] and a closed-form ridge update per module."""

    name = "ultraedit"
    hparams_type = UltraEditHparams

    @classmethod
    def precomputed(cls, hparams):
        return {}

    @staticmethod
    def modules(model, hparams: dict) -> list[str]:
        spec_ = arch_spec(model)
        if hparams.get("mlp_up_layers") and not spec_.mlp_up:
            raise EditscaleError("ultraedit: mlp_up_layers is set but this architecture's MLP has one input matrix "
                                 f"({spec_.mlp_in.format('N')}): use mlp_in_layers")
        if hparams.get("mlp_in_layers") and not spec_.mlp_in:
            raise EditscaleError("ultraedit: mlp_in_layers is set but the architecture names no MLP input matrix")
        names = [spec_.mlp_in.format(int(x)) for x in hparams.get("mlp_in_layers", [])]
        names += [spec_.mlp_up.format(int(x)) for x in hparams.get("mlp_up_layers", [])]
        names += [mlp_out_name(model, int(x)) for x in hparams.get("layers", [])]
        return names

    @classmethod
    def validate_hparams(cls, hp: dict, source: str = "hparams") -> None:
        super().validate_hparams(hp, source)
        keys = ("mlp_in_layers", "mlp_up_layers", "layers")
        if not any(hp.get(k) for k in keys):
            raise EditscaleError(f"{source}: ultraedit edits no module: set at least one of {list(keys)}")
        for k in keys:
            if hp.get(k) and hp[k] != sorted(set(hp[k])):
                raise EditscaleError(f"{source}: {k} {hp[k]} must be strictly ascending")

    @classmethod
    def check_for_model(cls, hp: dict, layers_in_model: int, source: str = "hparams") -> None:
        check_layers(hp, layers_in_model, source, keys=("mlp_in_layers", "mlp_up_layers", "layers"))

    def __init__(self, model, tok, hparams: dict, stats: dict, context_templates, state=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self._modules = self.modules(model, self.hparams)
        self.device = next(model.parameters()).device
        self.shape_of: dict[str, tuple[int, int]] = {}
        for m in self._modules:
            d_out, d_in = to_math(model, edited_weight(model, m)).shape
            self.shape_of[m] = (int(d_in), int(d_out))  # the reference's get_shape order
        self.normalizer: dict[tuple[int, int], RunningMeanStd] = {}
        for shape in dict.fromkeys(self.shape_of.values()):
            key = _state_prefix(shape)
            own = {k: state[f"{key}/{k}"] for k in ("n", "mean", "var", "std")} if state and f"{key}/n" in state else None
            if state and own is None:
                raise EditscaleError(f"ultraedit: the previous segment's state has no {key}/n (has {sorted(state)})")
            self.normalizer[shape] = RunningMeanStd(shape[0] + shape[1], self.device, own)

    def state_dict(self) -> dict:
        return {f"{_state_prefix(shape)}/{k}": v for shape, norm in self.normalizer.items() for k, v in norm.state().items()}

    # -- one forward / backward pass per tuple --------------------------------------------------

    def keys_and_gradients(self, cases: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
        """Keys and output gradients at the target positions of one tuple (module doc), float32;
        and the tuple's loss."""
        seqs = [case_tokens(self.tok, c) for c in cases]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, (ids, lab) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        input_ids, mask, labels = input_ids.to(self.device), mask.to(self.device), labels.to(self.device)
        where = torch.where(labels != -100)
        outputs: dict[str, torch.Tensor] = {}

        def keep_grad(name, out):
            if out.grad_fn is None:
                out.requires_grad_(True)  # the first edited module: nothing below needs a gradient
            else:
                out.retain_grad()
            outputs[name] = out
            return out

        with encoding.frozen_eval(self.model), torch.enable_grad():
            with Trace(self.model, self._modules, edit_output=keep_grad) as tr:
                logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[where].float(), labels[where])
            loss.backward()
        keys = {m: tr.inputs[m][where].detach().float() for m in self._modules}
        grads = {m: outputs[m].grad[where].detach().float() for m in self._modules}
        return keys, grads, float(loss.item())

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        if not cases:
            return []
        t0 = time.perf_counter()
        order = sorted(cases, key=lambda c: len(case_tokens(self.tok, c)[0]), reverse=True)
        size = int(self.hp.tuple_size)
        keys: dict[str, list[torch.Tensor]] = {m: [] for m in self._modules}
        grads: dict[str, list[torch.Tensor]] = {m: [] for m in self._modules}
        loss_of: dict = {}
        with timing.phase("keys"):
            for s in range(0, len(order), size):
                group = order[s : s + size]
                k, g, loss = self.keys_and_gradients(group)
                for m in self._modules:
                    self.normalizer[self.shape_of[m]].update(torch.cat([k[m], g[m]], dim=-1))
                    keys[m].append(k[m])
                    grads[m].append(g[m])
                for c in group:
                    loss_of[id(c)] = loss
        lr = float(self.hp.lr)
        norms = {}
        for m in self._modules:
            H, G = torch.cat(keys[m]), torch.cat(grads[m])
            d_in, d_out = self.shape_of[m]
            h_hat, g_hat = self.normalizer[self.shape_of[m]](torch.cat([H, G], dim=-1)).split([d_in, d_out], dim=-1)
            v_hat = -lr * (h_hat * h_hat).sum(-1, keepdim=True) * g_hat  # [N, d_out] pseudo-values
            dt = torch.float64 if self.hp.solve_dtype == "float64" else torch.float32
            Hs = H.to(dt)
            A = Hs.T @ Hs + torch.eye(d_in, dtype=dt, device=H.device)
            v = torch.linalg.solve(A, Hs.T)  # (H^T H + I)^-1 H^T, [d_in x N]
            u = v_hat.to(dt).T  # [d_out x N]
            u32, v32 = u.float().contiguous(), v.float().contiguous()
            weights.apply(Update(module=m, u=u32, v=v32, meta={"method": self.name, "rows": int(H.shape[0]),
                                                               "case_ids": [c.get("case_id") for c in cases]}))
            norms[m] = float(((u32.double().T @ u32.double()) * (v32.double().T @ v32.double())).sum().clamp_min(0).sqrt())
        seconds = time.perf_counter() - t0
        n_rows = int(sum(k.shape[0] for k in keys[self._modules[0]]))
        return [{"case_id": c.get("case_id"), "v_loss": loss_of[id(c)], "rows": n_rows, "update_norm_by_module": norms,
                 "normalizer_n": float(self.normalizer[self.shape_of[self._modules[0]]].n.item()),
                 "batch_size": len(cases), "seconds": seconds / len(cases)} for c in cases]


def _state_prefix(shape: tuple[int, int]) -> str:
    return f"normalizer/{shape[0]}x{shape[1]}"


class UltraEditCost(CostSpec):
    solve = "gradient"

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        # one RunningMeanStd per distinct module shape: n, and mean / var / std over d_out + d_in, float32
        return sum(4.0 * (1 + 3 * (d_out + d_in)) for d_out, d_in in set(shapes.values()))

    def value_prompts(self) -> tuple[int, float]:
        return int(self.hparams.get("tuple_size", 10)), 16.0  # one forward / backward pass per tuple of cases

    def factor_rank(self, target_tokens: float) -> float:
        return target_tokens  # one factor column per target token of the case (step 3)
