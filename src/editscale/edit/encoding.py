"""Prompts as token ids: target strings and ids, right padding, the subject's last token (ROME's
`fact_token: subject_last`), next-token logits. Every prompt is a template with exactly one "{}"
for the subject; inputs are padded by hand so a left-padding tokenizer cannot move a lookup."""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..data.schema import fill
from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import arch_spec, get_module, layer_name, n_layers




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


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_id(tok) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def check_template(prompt: str) -> None:
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
    check_template(prompt)
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
