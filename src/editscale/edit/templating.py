"""The context templates ROME and MEMIT average keys over: random prefixes sampled from the model
("{}" first), in the reference's two rules (`sample_context_templates`)."""

from __future__ import annotations

import unicodedata

import torch

from ..io import EditscaleError
from .encoding import frozen_eval, model_device, next_token_logits



OPENERS = ["The", "Therefore", "Because", "I", "You"]


TEMPLATE_RULES = ("rome", "memit", "wise")
WISE_OPENERS = ["I", "You", "Because", "Yes", "Q: "]
# WISE's out-of-scope prompts: texts sampled after MEMIT's openers, this many tokens, this many
OUT_OF_SCOPE_TOKENS, OUT_OF_SCOPE_TEXTS = 16, 20
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
    device = model_device(model)
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

    rule "wise" (WISE; wise/utils.py `get_context_templates`): two groups. The first is ["{}"] +
    for each [length, count], count // 5 continuations of `length` new tokens after each of the
    openers "I", "You", "Because", "Yes", "Q: " by beam search (count 5: greedy), each as
    text + " {}". The second holds OUT_OF_SCOPE_TEXTS texts of OUT_OF_SCOPE_TOKENS tokens sampled
    (top-k, as MEMIT's) after MEMIT's five openers: the out-of-scope prompts WISE trains its router against
    (the reference reads the dataset's unrelated question there; editscale keeps every dataset
    prompt for the evaluation).

    "{" / "}" in ROME-rule texts are replaced by spaces too: the reference keeps them, which makes
    the template unusable (str.format fails); deliberate deviation, see docs/fidelity.md.
    """
    if rule not in TEMPLATE_RULES:
        raise EditscaleError(f"unknown context template rule {rule!r}; known: {list(TEMPLATE_RULES)}")
    gen = torch.Generator().manual_seed(int(seed))
    pairs = _length_pairs(length_params)
    with frozen_eval(model):
        if rule == "wise":
            return _wise_groups(model, tok, pairs, gen)
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


def _wise_groups(model, tok, pairs, gen: torch.Generator) -> list[list[str]]:
    device = model_device(model)
    group = ["{}"]
    for length, count in pairs:
        if count % len(WISE_OPENERS):
            raise EditscaleError(f"WISE's context templates are count // 5 beams after each of {len(WISE_OPENERS)} openers; "
                                 f"context_template_length_params count {count} is not a multiple of 5")
        beams = count // len(WISE_OPENERS)
        for opener in WISE_OPENERS:
            ids = torch.tensor([tok(opener)["input_ids"]], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(length), num_beams=beams,
                                 num_return_sequences=beams, do_sample=False, pad_token_id=tok.eos_token_id)
            group += [_no_braces(t) + " {}" for t in tok.batch_decode(out, skip_special_tokens=True)]
    per = OUT_OF_SCOPE_TEXTS // len(OPENERS)
    texts = [t.strip() for opener in OPENERS
             for t in _sample_continuations(model, tok, tok(opener)["input_ids"], per, OUT_OF_SCOPE_TOKENS, gen) if t.strip()]
    if not texts:
        raise EditscaleError("WISE's out-of-scope texts sampled from the model are all empty")
    return [group, texts]


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
