"""Building blocks shared by the locate-then-edit methods (ROME, r-ROME, EMMET, MEMIT, AlphaEdit).

Everything here follows the reference implementation of ROME (Meng et al. 2022, `rome/compute_u.py`,
`compute_v.py`, `repr_tools.py`) and its MEMIT variant of the value optimization, re-written for
batched tokenization and for the architectures of `editscale.models.registry`:

- `sample_context_templates`: the random prefixes ROME averages keys over ("{}" first).
- `subject_last_index`: ROME's `fact_token: subject_last` lookup position.
- `module_io_at_subject` / `compute_keys`: module inputs/outputs at that position, one padded
  batch, forward stopped right after the module.
- `optimize_value`: ROME's compute_v (the target output v* of the edited module / layer).
- `CovSolver`: C^-1 applied through a Cholesky factor computed once (float64).

Conventions: every prompt is a template with exactly one "{}" for the subject. Tokenizers are used
with right padding; inputs are padded by hand so a left-padding tokenizer setting cannot change the
lookup positions. Edit cases are dicts in the normalized schema (`subject`, `prompt`,
`target_new`, `case_id`, ...); `target_new` may be a string or CounterFact's {"str": ...}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import unicodedata
from collections import Counter
from typing import Sequence

import torch

from ..data.schema import fill
from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import arch_spec, get_module, layer_name, n_layers
from .hparams import spec


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

OPENERS = ["The", "Therefore", "Because", "I", "You"]
KL_PROMPTS = ["{} is a"]
EARLY_STOP_LOSS = 5e-2
KEY_BATCH = 256  # rows per forward pass when computing keys of many cases x templates
# optimize_value re-uses the outputs of the layers below the injection layer across its steps
# (they cannot change: the inputs are fixed and only a vector added at/above that layer is
# trained). Bit-identical to recomputing them; the switch exists for benchmarks/ (before/after).
REUSE_PREFIX = True

# Seconds spent per phase of an edit ("keys": key / module-input computation, "optimize": the
# value or weight optimization), accumulated until the caller resets it. The edit chain logs them
# per edit; the remainder of an edit's time is the closed-form update.
PHASE_SECONDS: Counter = Counter()
_active_phase: list[str] = []


@contextlib.contextmanager
def phase(name: str):
    """Count the time inside the block towards PHASE_SECONDS[name]; nested phases count towards
    the outermost one only (compute_keys calls module_io_at_subject)."""
    if _active_phase:
        yield
        return
    _active_phase.append(name)
    _sync_device()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync_device()
        PHASE_SECONDS[name] += time.perf_counter() - t0
        _active_phase.pop()


def _sync_device() -> None:
    """Wait for queued GPU work, so that a phase's seconds are its own (CUDA kernels run
    asynchronously: without this, one phase's kernels would be timed in the next)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Small helpers


def target_str(case: dict, field: str = "target_new") -> str:
    """The target string of a case (plain string or CounterFact's {"str": ..., "id": ...})."""
    t = case[field]
    if isinstance(t, dict):
        t = t["str"]
    return str(t)


def target_token_ids(tok, target: str) -> list[int]:
    """Token ids of a target completion, with the leading space ROME adds (" " + target)."""
    text = target if target.startswith(" ") else " " + target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EditscaleError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def _check_template(prompt: str) -> None:
    if prompt.count("{}") != 1:
        raise EditscaleError(f"prompt {prompt!r} must contain exactly one '{{}}' for the subject")


@contextlib.contextmanager
def frozen_eval(model):
    """Eval mode and requires_grad False on every parameter for the duration; restored after.

    Guarantees the value optimization never writes `.grad` of a model parameter and that dropout is
    off (determinism), whatever state the caller left the model in.
    """
    was_training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> (input_ids [n, T], attention_mask [n, T])."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# Subject positions


def _subject_char_end(prompt: str, subject: str) -> int:
    """Index (in fill(prompt, subject)) of the subject's last character."""
    _check_template(prompt)
    if not subject:
        raise EditscaleError(f"empty subject for prompt {prompt!r}")
    return prompt.index("{}") + len(subject) - 1


def encode_with_subject(tok, prompts: Sequence[str], subjects: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Tokenize fill(prompt, subject) for every pair (one batched tokenizer call) and return
    (token id lists, index of the subject's last token in each).

    With a fast tokenizer the index is the token whose character span contains the subject's last
    character (exact for the actual tokenization, BOS included when the tokenizer adds one). Slow
    tokenizers fall back to ROME's rule: len(tok(prefix + subject)) - 1.
    """
    if len(prompts) != len(subjects):
        raise EditscaleError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    texts = [fill(p, s) for p, s in zip(prompts, subjects)]
    char_end = [_subject_char_end(p, s) for p, s in zip(prompts, subjects)]
    if getattr(tok, "is_fast", False):
        enc = tok(texts, return_offsets_mapping=True)
        ids = [list(x) for x in enc["input_ids"]]
        T = max(len(x) for x in ids)
        offs = torch.full((len(ids), T, 2), -1, dtype=torch.long)
        for i, o in enumerate(enc["offset_mapping"]):
            offs[i, : len(o)] = torch.tensor(o, dtype=torch.long).reshape(-1, 2)
        c = torch.tensor(char_end, dtype=torch.long)[:, None]
        hit = (offs[..., 0] <= c) & (c < offs[..., 1])
        pos = torch.arange(T)[None, :].expand_as(hit)
        idx = torch.where(hit, pos, torch.full_like(pos, -1)).max(dim=1).values
        bad = (idx < 0).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise EditscaleError(f"subject {subjects[i]!r} not found among the tokens of {texts[i]!r}")
        return ids, idx.tolist()
    ids = [list(x) for x in tok(texts)["input_ids"]]
    idxs = []
    for p, s in zip(prompts, subjects):
        prefix = p[: p.index("{}")]
        idxs.append(len(tok(prefix + s)["input_ids"]) - 1)
    return ids, idxs


def subject_last_index(tok, prompt: str, subject: str) -> int:
    """Index of the subject's last token in tok(fill(prompt, subject)) (ROME's `subject_last`)."""
    return encode_with_subject(tok, [prompt], [subject])[1][0]


# ---------------------------------------------------------------------------------------------
# Context templates


def next_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at one position per row (default: the last) without running the LM head on every
    position: the forward stops after the last layer, then final norm + LM head on those rows."""
    last = layer_name(model, n_layers(model) - 1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if positions is None:
        positions = attention_mask.sum(dim=1) - 1
    with Trace(model, [last], stop=True, keep_inputs=False) as tr:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h = tr.outputs[last][torch.arange(input_ids.shape[0], device=input_ids.device), positions]
    return lm_head_module(model)(get_module(model, arch_spec(model).final_norm)(h))


TEMPLATE_RULES = ("rome", "memit")
# Bumped whenever the sampling of context templates changes (the context_templates rule takes it as
# a param, so Snakemake re-samples, and re-runs every segment after it, instead of re-using old ones).
TEMPLATE_FORMAT = 2


def _clean_generated(text: str) -> str:
    """The reference's post-processing of generated text (util/generate.py `generate_fast`): NFKD
    normalization and blank lines joined by a space (special tokens are already skipped)."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def _sample_continuations(model, tok, prompt_ids: list[int], n: int, max_len: int, gen: torch.Generator, top_k: int = 5) -> list[str]:
    """n top-k samples continuing `prompt_ids` until the sequence holds `max_len` tokens, prompt
    included (the reference's `generate_fast(..., max_out_len=max_len)` counts the whole sequence),
    decoded without special tokens. The top-k distribution is the reference's (softmax, keep the k
    largest, renormalize); the generator is seeded where the reference uses torch's global one."""
    device = _model_device(model)
    ids = torch.tensor([list(prompt_ids)] * n, dtype=torch.long, device=device)
    for _ in range(max(int(max_len) - len(prompt_ids), 0)):
        logits = next_token_logits(model, ids).float().cpu()
        top_vals, top_idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top_vals, dim=-1)
        choice = torch.multinomial(probs, 1, generator=gen)
        nxt = top_idx.gather(1, choice).to(device)
        ids = torch.cat([ids, nxt], dim=1)
    return [_clean_generated(t) for t in tok.batch_decode(ids, skip_special_tokens=True)]


def _document_start_ids(tok) -> list[int]:
    """ROME's generation prompt "<|endoftext|>" (GPT-2's document separator): that token where the
    tokenizer has it as one special token (GPT-2, SmolLM2, ...), else its BOS, else its EOS token."""
    ids = tok("<|endoftext|>", add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and int(ids[0]) in set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {}):
        return [int(ids[0])]
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise EditscaleError("ROME's context templates start from <|endoftext|>, BOS or EOS, and this tokenizer has none of them")


def _length_pairs(length_params) -> list[tuple[int, int]]:
    pairs = []
    for pair in length_params:
        if len(pair) != 2:
            raise EditscaleError(f"context_template_length_params entries are [length, count], got {pair!r}")
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def sample_context_templates(model, tok, length_params: list[list[int]], seed: int, rule: str = "rome") -> list[list[str]]:
    """Context templates as the reference of each method family samples them, in groups: keys are
    averaged within each group, then over the groups (`compute_keys`); the value optimization uses
    every template once (`flat_templates`). Deterministic for a seed.

    rule "rome" (ROME, r-ROME; rome/rome_main.py `get_context_templates`): one flat group
    ["{}"] + for each [length, count], `count` texts sampled from the document-start token
    ("<|endoftext|>" where the tokenizer has it, else BOS / EOS) with `length` tokens in all (the
    start token counts), each as text + ". {}".

    rule "memit" (MEMIT, EMMET, AlphaEdit; memit/memit_main.py `get_context_templates`): groups
    [["{}"], group per [length, count]]; a group holds count // 5 texts after each of the openers
    "The", "Therefore", "Because", "I", "You" (in that order, opener tokens counted in `length`),
    with "{" and "}" replaced by spaces, + ". {}". editscale extension: when count is not a multiple
    of 5, the remainder goes one each to the first openers (the reference would drop it).

    "{" / "}" in ROME-rule texts are replaced by spaces too: the reference keeps them, which makes
    the template unusable (str.format fails); deliberate deviation, see docs/fidelity.md.
    """
    if rule not in TEMPLATE_RULES:
        raise EditscaleError(f"unknown context template rule {rule!r}; known: {list(TEMPLATE_RULES)}")
    gen = torch.Generator().manual_seed(int(seed))
    pairs = _length_pairs(length_params)
    with frozen_eval(model):
        if rule == "rome":
            start = _document_start_ids(tok)
            group = ["{}"]
            for length, count in pairs:
                if count > 0:
                    group += [_no_braces(t) + ". {}" for t in _sample_continuations(model, tok, start, count, length, gen)]
            return [group]
        groups = [["{}"]]
        for length, count in pairs:
            per, extra = divmod(count, len(OPENERS))
            group = []
            for i, opener in enumerate(OPENERS):
                n = per + (1 if i < extra else 0)
                if n:
                    texts = _sample_continuations(model, tok, tok(opener)["input_ids"], n, length, gen)
                    group += [_no_braces(t) + ". {}" for t in texts]
            if group:
                groups.append(group)
        return groups


def _no_braces(text: str) -> str:
    return text.replace("{", " ").replace("}", " ")


def template_groups(templates) -> list[list[str]]:
    """Templates as groups: a flat list of strings is one group (ROME's flat average)."""
    templates = list(templates)
    if not templates:
        raise EditscaleError("no context templates (expected at least ['{}'])")
    if all(isinstance(t, str) for t in templates):
        return [templates]
    if all(isinstance(g, (list, tuple)) and g and all(isinstance(t, str) for t in g) for g in templates):
        return [list(g) for g in templates]
    raise EditscaleError(f"context templates must be a list of strings or a list of non-empty lists of strings, got {templates!r:.200}")


def flat_templates(templates) -> list[str]:
    """Every template once, in order (the rewriting prompts of the value optimization)."""
    return [t for g in template_groups(templates) for t in g]


# ---------------------------------------------------------------------------------------------
# Keys and module outputs at the subject


@phase("keys")
@torch.no_grad()
def module_io_at_subject(model, tok, module: str, prompts: list[str], subjects: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [n, d_in] and output [n, d_out] of `module` at the subject-last token of each
    fill(prompt, subject); batches of KEY_BATCH right-padded rows, forward stopped after the module."""
    get_module(model, module)  # clear error on a bad name
    ids, idxs = encode_with_subject(tok, prompts, subjects)
    device = _model_device(model)
    ins, outs = [], []
    with frozen_eval(model):
        for s in range(0, len(ids), KEY_BATCH):
            input_ids, mask = pad_right(ids[s : s + KEY_BATCH], _pad_id(tok), device)
            rows = torch.arange(input_ids.shape[0], device=device)
            cols = torch.tensor(idxs[s : s + KEY_BATCH], device=device)
            with Trace(model, [module], stop=True) as tr:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            ins.append(tr.inputs[module][rows, cols].float())
            outs.append(tr.outputs[module][rows, cols].float())
    return torch.cat(ins), torch.cat(outs)


@phase("keys")
@torch.no_grad()
def compute_keys(model, tok, module: str, cases: list[dict], templates) -> torch.Tensor:
    """[n_cases, d_in]: input of `module` at the subject-last token of
    fill(fill(template, case["prompt"]), subject), averaged within each template group and then
    over the groups (memit/compute_ks.py; a flat list is one group, ROME's rome/compute_u.py mean).
    With MEMIT's groups [["{}"], five samples] that is k = 1/2 k("{}") + 1/2 mean(k over samples)."""
    if not cases:
        raise EditscaleError("compute_keys: no cases")
    groups = template_groups(templates)
    flat = [t for g in groups for t in g]
    prompts = [fill(t, c["prompt"]) for c in cases for t in flat]
    subjects = [c["subject"] for c in cases for _ in flat]
    keys, _ = module_io_at_subject(model, tok, module, prompts, subjects)
    per_group = keys.reshape(len(cases), len(flat), -1).split([len(g) for g in groups], dim=1)
    return torch.stack([k.mean(dim=1) for k in per_group], dim=1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Value optimization (ROME compute_v / MEMIT compute_z)


def layer_of(model, module: str) -> int:
    """Index of the transformer block that holds `module` (or is it)."""
    for i in reversed(range(n_layers(model))):
        name = layer_name(model, i)
        if module == name or module.startswith(name + "."):
            return i
    raise EditscaleError(f"{module!r} is not inside any transformer block of {type(model).__name__}")


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


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out


@phase("optimize")
def optimize_value(model, tok, case: dict, templates, inject_module: str, hp: dict, loss_layer: str = "max") -> tuple[torch.Tensor, dict]:
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

    Early stopping (hp["early_stop"]), checked after each forward pass, before its backward pass:
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
    device = _model_device(model)
    subject = case["subject"]
    _check_template(case["prompt"])
    target_ids = target_token_ids(tok, target_str(case))
    n_t = len(target_ids)

    rewriting = [fill(t, case["prompt"]) for t in flat_templates(templates)]
    prompts = rewriting + KL_PROMPTS
    ids, lookup = encode_with_subject(tok, prompts, [subject] * len(prompts))
    n_rw = len(rewriting)
    prompt_lens = [len(x) for x in ids[:n_rw]]
    seqs = [x + target_ids[:-1] for x in ids[:n_rw]] + ids[n_rw:]
    input_ids, mask = pad_right(seqs, _pad_id(tok), device)

    # positions whose next-token prediction is a target token
    rows = torch.tensor([i for i in range(n_rw) for _ in range(n_t)], device=device)
    cols = torch.tensor([prompt_lens[i] - 1 + j for i in range(n_rw) for j in range(n_t)], device=device)
    targets = torch.tensor(target_ids * n_rw, device=device)
    kl_rows = torch.arange(n_rw, len(prompts), device=device)
    kl_cols = torch.tensor(lookup[n_rw:], device=device)

    n_layer = n_layers(model)
    loss_layer_idx = int(hp["v_loss_layer"])
    if not 0 <= loss_layer_idx < n_layer:
        raise EditscaleError(f"v_loss_layer {loss_layer_idx} out of range: the model has {n_layer} layers")
    if loss_layer == "final":
        loss_layer_idx = n_layer - 1
    elif loss_layer == "max":
        loss_layer_idx = max(loss_layer_idx, layer_of(model, inject_module))
    else:
        raise EditscaleError(f"optimize_value: loss_layer must be 'max' or 'final', got {loss_layer!r}")
    loss_layer = layer_name(model, loss_layer_idx)
    last_layer = layer_name(model, n_layer - 1)
    names = list(dict.fromkeys([inject_module, loss_layer, last_layer]))
    lens = logit_lens(model)

    inj_mask = torch.zeros(input_ids.shape, device=device)
    inj_mask[torch.arange(len(prompts), device=device), torch.tensor(lookup, device=device)] = 1.0

    state: dict = {"target_init": None}
    delta_holder: dict = {}

    def edit_output(name, out):
        if name != inject_module:
            return out
        if state["target_init"] is None:
            state["target_init"] = out[0, lookup[0]].detach().float().clone()
            delta_holder["delta"] = torch.zeros(out.shape[-1], device=device, dtype=torch.float32, requires_grad=True)
            delta_holder["opt"] = torch.optim.Adam([delta_holder["delta"]], lr=float(hp["v_lr"]))
        d = delta_holder["delta"]
        return out + inj_mask[..., None].to(out.dtype) * d.to(out.dtype)

    def read_out(h: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lens(h[r, c]).float(), dim=-1)

    kl_init = None
    log: dict = {}
    steps_taken = 0
    n_steps = int(hp["v_num_grad_steps"])
    rule = hp.get("early_stop", "loss")
    if rule not in EARLY_STOP_RULES:
        raise EditscaleError(f"early_stop must be one of {list(EARLY_STOP_RULES)}, got {rule!r}")
    mpes_steps, n_all_correct, stop = int(hp.get("mpes_steps", 2)), 0, "steps"
    mpes_rows = rows >= 1  # target positions of rewriting prompts 1.. (ENCORE: log_probs[1:])
    prefix = PrefixCache(model, layer_of(model, inject_module), enabled=REUSE_PREFIX)
    with frozen_eval(model), torch.enable_grad(), prefix:
        for it in range(max(n_steps, 1)):
            if "opt" in delta_holder:
                delta_holder["opt"].zero_grad()
            with Trace(model, names, stop=True, edit_output=edit_output, keep_inputs=False) as tr:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            delta = delta_holder["delta"]
            target_init = state["target_init"]
            logp = read_out(tr.outputs[loss_layer], rows, cols)
            nll = -logp.gather(1, targets[:, None]).squeeze(1).mean()
            kl_logp = read_out(tr.outputs[last_layer], kl_rows, kl_cols)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = float(hp["kl_factor"]) * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = float(hp["v_weight_decay"]) * (delta.norm() / target_init.norm() ** 2)
            loss = nll + kl + wd
            if it == 0:
                log["v_loss_init"] = float(nll.item())
            log.update(v_loss=float(nll.item()), kl=float(kl.item()), weight_decay=float(wd.item()), loss=float(loss.item()))
            log["v_prob"] = float(torch.exp(-nll).item())
            if rule == "mpes":
                hits = logp[mpes_rows].argmax(dim=-1) == targets[mpes_rows]
                n_all_correct += bool(hits.all())
                if n_all_correct == mpes_steps:
                    stop = "mpes"
                    break
            if rule != "none" and loss.item() < EARLY_STOP_LOSS:
                stop = "loss"
                break
            if it >= n_steps - 1:
                break
            loss.backward()
            delta_holder["opt"].step()
            steps_taken += 1
            max_norm = float(hp["clamp_norm_factor"]) * target_init.norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    delta = delta_holder["delta"].detach()
    target_init = state["target_init"]
    v_star = (target_init + delta).float()
    log.update(steps=steps_taken, stop=stop, delta_norm=float(delta.norm().item()), target_init_norm=float(target_init.norm().item()),
               v_norm=float(v_star.norm().item()))
    return v_star, log


# ---------------------------------------------------------------------------------------------
# Second-moment solves


class CovSolver:
    """x -> (scale * C + ridge * I)^-1 x for a fixed second moment C (float64, factored once).

    Cholesky when C is positive definite; otherwise an LU factorization (C singular up to float64
    precision raises EditscaleError naming the module).
    """

    def __init__(self, C: torch.Tensor, module: str = "", scale: float = 1.0, ridge: float = 0.0, device=None):
        C = torch.as_tensor(C).to(device=device, dtype=torch.float64)
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise EditscaleError(f"second moment of {module!r} must be square, got shape {tuple(C.shape)}")
        A = C * float(scale)
        if ridge:
            A = A + float(ridge) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        self.module = module
        self.dim = A.shape[0]
        self._chol, info = torch.linalg.cholesky_ex(A)
        self._lu = None
        if int(info) != 0:
            self._chol = None
            lu, piv, info = torch.linalg.lu_factor_ex(A)
            if int(info) != 0:
                raise EditscaleError(f"second moment of {module!r} is singular; collect more tokens or add a ridge")
            self._lu = (lu, piv)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """A^-1 x, float64; x of shape [d] or [d, r]."""
        x64 = x.to(dtype=torch.float64, device=(self._chol if self._chol is not None else self._lu[0]).device)
        vec = x64.dim() == 1
        b = x64[:, None] if vec else x64
        if self._chol is not None:
            out = torch.cholesky_solve(b, self._chol)
        else:
            out = torch.linalg.lu_solve(*self._lu, b)
        return out[:, 0] if vec else out


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


def lm_head_module(model) -> torch.nn.Module:
    """The LM head: the registry's name when it exists, else the model's output embeddings
    (transformers 5 renamed GPT-NeoX's `embed_out` to `lm_head`)."""
    name = arch_spec(model).lm_head
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    head = model.get_output_embeddings()
    if head is None:
        raise EditscaleError(f"cannot find the LM head of {type(model).__name__} (registry name {name!r})")
    return head


def module_bias(model, module: str) -> torch.Tensor | None:
    b = getattr(get_module(model, module), "bias", None)
    return None if b is None else b.detach().float()


def module_forward(model, weights, module: str, keys: torch.Tensor) -> torch.Tensor:
    """Output of the (linear) edited module at keys [d_in] or [d_in, n], computed from the current
    fp32 weight in float64: W k + b."""
    W = weights.current(module).to(torch.float64)
    k = keys.to(device=W.device, dtype=torch.float64)
    out = W @ k
    b = module_bias(model, module)
    if b is not None:
        b = b.to(device=W.device, dtype=torch.float64)
        out = out + (b if k.dim() == 1 else b[:, None])
    return out


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
