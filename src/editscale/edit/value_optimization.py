"""The value optimization: ROME's compute_v / MEMIT's compute_z (the target output v* of the edited
module or layer), its hyper-parameters and checks, and the logit lens it reads the loss through."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..data.schema import fill
from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import arch_spec, get_module, layer_name, n_layers
from .hparams import build as build_hparams
from .hparams import spec
from .subject_keys import layer_of
from .templating import flat_templates
from .timing import phase
from .encoding import check_template, encode_with_subject, frozen_eval, lm_head_module, model_device, pad_id, pad_right, target_str, target_token_ids


EARLY_STOP_RULES = ("loss", "mpes", "none")


@dataclasses.dataclass(kw_only=True)
class ValueHparams:
    """Hyper-parameters of `optimize_value` (v* / z) and of the key computation, shared by every
    method that uses them (ROME's compute_v / MEMIT's compute_z names)."""

    layers: list[int] = spec(doc="edited layers (MLP output matrices)")
    fact_token: str = spec("subject_last", choices=("subject_last",), doc="token whose key and value are edited")
    v_num_grad_steps: int = spec(minimum=0, doc="Adam steps of the value optimization")
    v_lr: float = spec(minimum=0, doc="Adam learning rate")
    v_loss_layer: int = spec(minimum=0, doc="layer whose output the loss reads (see value_loss_layer)")
    v_weight_decay: float = spec(minimum=0, doc="weight on ||delta|| / ||v0||^2")
    clamp_norm_factor: float = spec(minimum=0, doc="||delta|| <= factor * ||v0||")
    kl_factor: float = spec(minimum=0, doc="weight of the essence-drift KL term")
    context_template_length_params: list[list[int]] = spec([[5, 10], [10, 10]], minimum=1, doc="[[length, count], ...] of sampled templates")
    early_stop: str = spec("loss", choices=EARLY_STOP_RULES, doc="loss: stop at loss < 5e-2 (ROME/MEMIT); mpes: also at the "
                           "mpes_steps-th step where the target is the argmax everywhere (ENCORE); none: every step")
    mpes_steps: int = spec(2, minimum=1, doc="early_stop mpes: stop at the N-th step whose predictions are all the target "
                           "(ENCORE's -prob_cutoff: 2 for Llama3-8B, 4 for GPT2-XL)")
KL_PROMPTS = ["{} is a"]
EARLY_STOP_LOSS = 5e-2
# optimize_value re-uses the outputs of the layers below the injection layer across its steps
# (they cannot change: the inputs are fixed and only a vector added at/above that layer is
# trained). Bit-identical to recomputing them; the switch exists for benchmarks/ (before/after).
REUSE_PREFIX = True


class PrefixCache:
    """Re-use the outputs of blocks 0..n-1 across forward passes on the same inputs.

    The first forward inside the context records what each of those blocks returned; later
    forwards skip their computation and return the recorded (detached) outputs, so only the
    embeddings and blocks n.. run again. Only valid while the inputs, and every weight below
    block n, stay fixed: the value optimization guarantees both. The recorded objects are
    returned as they were (tuple or tensor), so no architecture-specific code is needed.
    """

    def __init__(self, model, n_blocks: int, enabled: bool = True):
        self.blocks = [get_module(model, layer_name(model, i)) for i in range(n_blocks)] if enabled else []
        self.recorded: list = [None] * len(self.blocks)

    def _wrap(self, i: int, block: torch.nn.Module):
        original = block.forward

        def forward(*args, **kwargs):
            if self.recorded[i] is None:
                out = original(*args, **kwargs)
                self.recorded[i] = _detached(out)
                return out
            return self.recorded[i]

        return forward

    def __enter__(self) -> "PrefixCache":
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block)  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            del block.forward


def reused_prefix(model, layer: int) -> PrefixCache:
    """The blocks below `layer` computed once for the passes of one optimization whose inputs are
    fixed and whose trained tensor acts at `layer` or above (v*; GRACE's value, WISE's side
    weight, MEMOIR's W_r at their layer's MLP output); off when REUSE_PREFIX is (benchmarks/)."""
    return PrefixCache(model, layer, enabled=REUSE_PREFIX)


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


@phase("optimize")
def optimize_value(model, tok, case: dict, templates, inject_module: str, hp, loss_layer: str = "max") -> tuple[torch.Tensor, dict]:
    """ROME's compute_v: the output v* of `inject_module` at the subject-last token that makes the
    model predict case["target_new"].

    Rewriting prompts: fill(template, case["prompt"]) for every template (groups flattened, as
    the references do) followed by the target tokens except the last
    (token ids are concatenated, so the target tokenization is exactly " " + target_new's); one KL
    prompt "{} is a". A vector delta (zeros) is added to `inject_module`'s output at the subject-last
    token of every prompt; target_init is that output at prompt 0 before the delta. Loss =
    mean token NLL of target_new read from the residual after the loss layer through the final norm
    and LM head, where `loss_layer` is the reference's rule: "max" (MEMIT's compute_z, also EMMET's
    and AlphaEdit's: layer max(v_loss_layer, injection layer)) or "final" (ROME's compute_v: the
    model's final logits whatever v_loss_layer says; `check_loss_layer` rejects a v_loss_layer that
    would make the two readings differ) + kl_factor * KL at the KL prompt's subject position (as the reference
    code computes it: F.kl_div(log p_init, log p_cur, log_target=True), i.e. KL(p_cur || p_init))
    + v_weight_decay * ||delta|| / ||target_init||^2. Adam(v_lr) for at most v_num_grad_steps
    forward passes (the last one only measures), ||delta|| clamped to
    clamp_norm_factor * ||target_init|| after every step. Deterministic, no seed involved; model
    parameters never receive gradients.

    Early stopping (hp.early_stop), checked after each forward pass, before its backward pass:
      loss  stop when loss < 5e-2 (ROME's compute_v, MEMIT's compute_z);
      mpes  most-probable early stopping (ENCORE's compute_z, `prob_cutoff` < 0): count the passes
            at which every target token is the argmax at its position in every rewriting prompt
            but the first (the reference indexes `log_probs[1:]`, which leaves out the plain prompt
            "{}"; the count is cumulative, not reset by a pass that misses), stop when the count
            reaches mpes_steps; the loss < 5e-2 rule also applies, as in that code;
      none  run every step.

    Returns (v* = target_init + delta, float32 [d], log) with log keys v_loss (final NLL),
    v_loss_init, v_prob (mean target prob at the end), kl, weight_decay, steps (optimizer steps
    taken), stop ("loss", "mpes" or "steps": why it stopped), delta_norm, target_init_norm, v_norm
    (||v*||, a collapse indicator of the weights metric).
    """
    hp = build_hparams(ValueHparams, hp)  # a method's typed hparams (or a mapping holding these keys)
    if hp.early_stop not in EARLY_STOP_RULES:
        raise EditscaleError(f"early_stop must be one of {list(EARLY_STOP_RULES)}, got {hp.early_stop!r}")
    batch = RewritingBatch.build(model, tok, case, templates)
    loss_layer_name = layer_name(model, loss_layer_index(model, hp, inject_module, loss_layer))
    last_layer = layer_name(model, n_layers(model) - 1)
    names = list(dict.fromkeys([inject_module, loss_layer_name, last_layer]))
    lens = logit_lens(model)
    injection = Injection(inject_module, batch.inject_mask, batch.init_col, lr=float(hp.v_lr))

    def read_out(h: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lens(h[r, c]).float(), dim=-1)

    kl_init = None
    log: dict = {}
    steps_taken, n_steps = 0, int(hp.v_num_grad_steps)
    stopping = EarlyStopping(hp.early_stop, int(hp.mpes_steps), batch.rows >= 1)  # mpes: rewriting prompts 1.. (ENCORE: log_probs[1:])
    prefix = reused_prefix(model, layer_of(model, inject_module))
    with frozen_eval(model), torch.enable_grad(), prefix:
        for it in range(max(n_steps, 1)):
            injection.zero_grad()
            with Trace(model, names, stop=True, edit_output=injection, keep_inputs=False) as tr:
                model(input_ids=batch.input_ids, attention_mask=batch.mask, use_cache=False)
            delta, target_init = injection.delta, injection.target_init
            logp = read_out(tr.outputs[loss_layer_name], batch.rows, batch.cols)
            nll = -logp.gather(1, batch.targets[:, None]).squeeze(1).mean()
            kl_logp = read_out(tr.outputs[last_layer], batch.kl_rows, batch.kl_cols)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = float(hp.kl_factor) * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = float(hp.v_weight_decay) * (delta.norm() / target_init.norm() ** 2)
            loss = nll + kl + wd
            if it == 0:
                log["v_loss_init"] = float(nll.item())
            log.update(v_loss=float(nll.item()), kl=float(kl.item()), weight_decay=float(wd.item()), loss=float(loss.item()))
            log["v_prob"] = float(torch.exp(-nll).item())
            if stopping.stops(logp, batch.targets, loss) or it >= n_steps - 1:
                break
            loss.backward()
            injection.step(max_norm=float(hp.clamp_norm_factor) * target_init.norm())
            steps_taken += 1
    delta, target_init = injection.delta.detach(), injection.target_init
    v_star = (target_init + delta).float()
    log.update(steps=steps_taken, stop=stopping.reason, delta_norm=float(delta.norm().item()), target_init_norm=float(target_init.norm().item()),
               v_norm=float(v_star.norm().item()))
    return v_star, log


@dataclasses.dataclass
class RewritingBatch:
    """optimize_value's one padded batch: every rewriting prompt followed by the target tokens but
    the last, then the KL prompts; where the target is predicted, the KL positions, and where the
    vector is added (the subject's last token of every prompt)."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # (rows, cols): positions whose next-token prediction is a target token
    cols: torch.Tensor
    targets: torch.Tensor
    kl_rows: torch.Tensor
    kl_cols: torch.Tensor
    inject_mask: torch.Tensor  # 1 at the subject's last token of every prompt
    init_col: int  # that token in prompt 0, where target_init is read

    @classmethod
    def build(cls, model, tok, case: dict, templates) -> "RewritingBatch":
        device = model_device(model)
        check_template(case["prompt"])
        target_ids = target_token_ids(tok, target_str(case))
        n_t = len(target_ids)
        rewriting = [fill(t, case["prompt"]) for t in flat_templates(templates)]
        prompts = rewriting + KL_PROMPTS
        ids, lookup = encode_with_subject(tok, prompts, [case["subject"]] * len(prompts))
        n_rw = len(rewriting)
        prompt_lens = [len(x) for x in ids[:n_rw]]
        seqs = [x + target_ids[:-1] for x in ids[:n_rw]] + ids[n_rw:]
        input_ids, mask = pad_right(seqs, pad_id(tok), device)
        inject_mask = torch.zeros(input_ids.shape, device=device)
        inject_mask[torch.arange(len(prompts), device=device), torch.tensor(lookup, device=device)] = 1.0
        return cls(
            input_ids, mask,
            rows=torch.tensor([i for i in range(n_rw) for _ in range(n_t)], device=device),
            cols=torch.tensor([prompt_lens[i] - 1 + j for i in range(n_rw) for j in range(n_t)], device=device),
            targets=torch.tensor(target_ids * n_rw, device=device),
            kl_rows=torch.arange(n_rw, len(prompts), device=device),
            kl_cols=torch.tensor(lookup[n_rw:], device=device),
            inject_mask=inject_mask,
            init_col=lookup[0],
        )


def loss_layer_index(model, hp, inject_module: str, rule: str) -> int:
    """The layer whose output the value loss reads: "max" (MEMIT's compute_z: max(v_loss_layer,
    injection layer)) or "final" (ROME's compute_v: the last layer)."""
    n_layer = n_layers(model)
    index = int(hp.v_loss_layer)
    if not 0 <= index < n_layer:
        raise EditscaleError(f"v_loss_layer {index} out of range: the model has {n_layer} layers")
    if rule == "final":
        return n_layer - 1
    if rule == "max":
        return max(index, layer_of(model, inject_module))
    raise EditscaleError(f"optimize_value: loss_layer must be 'max' or 'final', got {rule!r}")


class Injection:
    """The trained vector delta added to `module`'s output where `mask` is 1 (a Trace edit_output
    hook); target_init is that output at prompt 0's token `init_col` before any delta. The delta
    and its Adam optimizer are made on the first forward pass (its width is the module's)."""

    def __init__(self, module: str, mask: torch.Tensor, init_col: int, lr: float):
        self.module, self.mask, self.init_col, self.lr = module, mask, init_col, lr
        self.target_init: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.opt = None

    def __call__(self, name, out):
        if name != self.module:
            return out
        if self.target_init is None:
            self.target_init = out[0, self.init_col].detach().float().clone()
            self.delta = torch.zeros(out.shape[-1], device=self.mask.device, dtype=torch.float32, requires_grad=True)
            self.opt = torch.optim.Adam([self.delta], lr=self.lr)
        return out + self.mask[..., None].to(out.dtype) * self.delta.to(out.dtype)

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad()

    def step(self, max_norm: torch.Tensor) -> None:
        """One Adam step, then ||delta|| clamped to max_norm."""
        self.opt.step()
        with torch.no_grad():
            if self.delta.norm() > max_norm:
                self.delta.mul_(max_norm / self.delta.norm())


class EarlyStopping:
    """optimize_value's stopping rules (its doc), checked after each forward pass; `reason` is why
    it stopped ("loss", "mpes", or "steps" when it ran every step)."""

    def __init__(self, rule: str, mpes_steps: int, mpes_rows: torch.Tensor):
        self.rule, self.mpes_steps, self.mpes_rows = rule, mpes_steps, mpes_rows
        self.n_all_correct, self.reason = 0, "steps"

    def stops(self, logp: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor) -> bool:
        if self.rule == "mpes":
            hits = logp[self.mpes_rows].argmax(dim=-1) == targets[self.mpes_rows]
            self.n_all_correct += bool(hits.all())
            if self.n_all_correct == self.mpes_steps:
                self.reason = "mpes"
                return True
        if self.rule != "none" and loss.item() < EARLY_STOP_LOSS:
            self.reason = "loss"
            return True
        return False


def logit_lens(model):
    """h (the residual stream at any layer, [..., d]) -> logits as the model computes them from its
    last layer's output: the final norm, the LM head, and Gemma-2's final logit softcapping
    (cap * tanh(logits / cap), `config.final_logit_softcapping`), so that a loss read at an earlier
    layer or at the last one sees the model's own output function."""
    final_norm = get_module(model, arch_spec(model).final_norm)
    head = lm_head_module(model)
    cap = getattr(model.config, "final_logit_softcapping", None)

    def lens(h: torch.Tensor) -> torch.Tensor:
        logits = head(final_norm(h))
        return torch.tanh(logits / cap) * cap if cap else logits

    return lens



# ---------------------------------------------------------------------------------------------
# Hyper-parameters


def check_common_hparams(hp: dict, source: str = "hparams") -> None:
    """Value checks shared by the methods that use `optimize_value`."""
    layers = hp.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise EditscaleError(f"{source}: 'layers' must be a non-empty list of integers, got {layers!r}")
    if "fact_token" in hp and hp["fact_token"] != "subject_last":
        raise EditscaleError(f"{source}: fact_token {hp['fact_token']!r} is not supported (use subject_last)")
    for key in ("v_num_grad_steps", "v_loss_layer"):
        if key in hp and (not isinstance(hp[key], int) or hp[key] < 0):
            raise EditscaleError(f"{source}: {key!r} must be a non-negative integer, got {hp[key]!r}")
    for key in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor"):
        if key in hp and (not isinstance(hp[key], (int, float)) or isinstance(hp[key], bool) or not math.isfinite(hp[key]) or hp[key] < 0):
            raise EditscaleError(f"{source}: {key!r} must be a non-negative number, got {hp[key]!r}")
    ctp = hp.get("context_template_length_params")
    if ctp is not None and (not isinstance(ctp, list) or not all(isinstance(p, list) and len(p) == 2 for p in ctp)):
        raise EditscaleError(f"{source}: context_template_length_params must be a list of [length, count], got {ctp!r}")


def check_loss_layer(layers_in_model: int, hp: dict, method: str, source: str = "hparams") -> None:
    """ROME's reference reads the value loss from the final logits and never looks at
    v_loss_layer (rome/compute_v.py): a v_loss_layer other than the last layer would be silently
    ignored there, so it is rejected here, naming the value to write."""
    last = layers_in_model - 1
    if int(hp["v_loss_layer"]) != last:
        raise EditscaleError(
            f"{source}: v_loss_layer {hp['v_loss_layer']} is not the last layer ({last}) of this "
            f"{layers_in_model}-layer model; {method} follows ROME's reference, which computes the value loss "
            f"on the final logits whatever v_loss_layer says, so set v_loss_layer: {last}"
        )
