"""Batched model calls shared by every metric: target likelihoods, exact match, greedy generation.

Conventions
-----------
* A (prompt, target) pair is scored as the tokens of `" " + target` (`space=True`, CounterFact's
  convention: targets are stored without the leading space) appended to the tokens of `prompt`.
  Prompt and target are tokenized separately (prompt with the tokenizer's special tokens, e.g. a
  BOS, target without), so the prompt/target token boundary is always where the target starts.
  ROME tokenizes the joined string instead; for byte-level BPE tokenizers (GPT-2, GPT-J, NeoX,
  SmolLM/Llama-3 style) the two agree because the leading space starts a new token.
* NLL is the MEAN per-token negative log-likelihood of the target tokens (ROME's
  `test_batch_prediction`), so exp(-nll) is the geometric-mean token probability.
* Every call pads a batch on the LEFT with explicit position ids, so each sequence ends at the
  last column: only the last `max target length + 1` positions go through the LM head
  (`logits_to_keep`), which keeps memory at B x T x V instead of B x L x V for long few-shot
  prompts. Sequences are sorted by length and batched under a token budget; results come back in
  input order. Padding does not change the result beyond float rounding (tested to 1e-5).
* Prompts longer than the model's context are truncated from the left (the end of a prompt is
  what predicts the target).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..io import EditscaleError
from ..models.prompts import prompt_lengths

DEFAULT_MAX_BATCH_TOKENS = 16384


def pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def max_positions(model) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tok(list(prompts), add_special_tokens=True)["input_ids"]] if prompts else []


def chat_prompt(tok, text: str) -> str:
    """`text` as the user turn of the tokenizer's chat template, up to the start of the assistant's
    answer (an instruct model's question prompt; its answer is then scored without the leading
    space, `space=False`). The template's own BOS text is dropped where encode_prompts adds one."""
    if not getattr(tok, "chat_template", None):
        raise EditscaleError(
            f"chat_template is on but the tokenizer of {getattr(tok, 'name_or_path', 'the model')!r} has no chat template "
            "(a base model, not an instruct one): turn the metric's chat_template off")
    out = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    if bos and out.startswith(bos) and tok.bos_token_id is not None and tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        out = out[len(bos):]
    return out


def encode_targets(tok, targets: Sequence[str], space: bool = True) -> list[list[int]]:
    texts = [(" " + t if space else t) for t in targets]
    out = [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    for t, ids in zip(targets, out):
        if not ids:
            raise ValueError(f"target {t!r} tokenizes to no tokens")
    return out


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> Iterator[list[int]]:
    """Indices grouped into batches, longest first, each under `batch_size` rows and roughly
    `max_batch_tokens` padded tokens (a single over-long sequence still forms its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[r, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@dataclass
class PairScores:
    nll: torch.Tensor  # [n] mean token NLL of the target (nats)
    nll_sum: torch.Tensor  # [n] summed token NLL
    n_tokens: torch.Tensor  # [n] number of target tokens
    match: torch.Tensor  # [n] bool: every target token is the argmax given its prefix
    token_hits: torch.Tensor | None = None  # [n] number of target tokens that are the argmax given their prefix
    argmax: list[list[int]] | None = None  # the argmax token at each target position (teacher forcing)


def score_token_pairs(
    model,
    tok,
    prompt_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    batch_size: int = 64,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> PairScores:
    """Score pre-tokenized pairs (see the module docstring)."""
    n = len(prompt_ids)
    if n != len(target_ids):
        raise ValueError(f"{n} prompts but {len(target_ids)} targets")
    nll_sum = torch.zeros(n, dtype=torch.float64)
    n_tok = torch.zeros(n, dtype=torch.long)
    match = torch.zeros(n, dtype=torch.bool)
    token_hits = torch.zeros(n, dtype=torch.long)
    argmax: list[list[int]] = [[] for _ in range(n)]
    if n == 0:
        return PairScores(nll_sum.clone(), nll_sum, n_tok, match, token_hits, argmax)
    limit = max_positions(model)
    seqs = []
    for p, t in zip(prompt_ids, target_ids):
        p = list(p)[-max(1, limit - len(t)):] if len(p) + len(t) > limit else list(p)
        seqs.append(p + list(t))
    device = model_device(model)
    pad = pad_id(tok)
    with torch.inference_mode():
        for idx in length_batches([len(s) for s in seqs], batch_size, max_batch_tokens):
            ids, mask, pos = left_pad([seqs[i] for i in idx], pad, device)
            t_lens = [len(target_ids[i]) for i in idx]
            t_max = max(t_lens)
            with prompt_lengths([len(seqs[i]) - len(target_ids[i]) for i in idx]):  # for a memory that routes on the prompt
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=t_max + 1, use_cache=False)
            logits = out.logits[:, -(t_max + 1):-1, :].float()  # kept[:, j] predicts position L - t_max + j
            logp = torch.log_softmax(logits, dim=-1)
            # target token t of row r sits at column L - T_r + t, i.e. kept column t_max - T_r + t
            tgt = torch.full((len(idx), t_max), 0, dtype=torch.long, device=device)
            valid = torch.zeros((len(idx), t_max), dtype=torch.bool, device=device)
            for r, i in enumerate(idx):
                T = t_lens[r]
                tgt[r, t_max - T:] = torch.tensor(target_ids[i], dtype=torch.long)
                valid[r, t_max - T:] = True
            tok_lp = logp.gather(-1, tgt[..., None])[..., 0]
            top = logp.argmax(-1)
            tok_hit = top == tgt
            sums = -(tok_lp * valid).sum(-1).double().cpu()
            hits = (tok_hit | ~valid).all(-1).cpu()
            n_hit = (tok_hit & valid).sum(-1).cpu()
            top = top.cpu().tolist()
            for r, i in enumerate(idx):
                nll_sum[i] = sums[r]
                n_tok[i] = t_lens[r]
                match[i] = hits[r]
                token_hits[i] = n_hit[r]
                argmax[i] = top[r][t_max - t_lens[r]:]
    return PairScores(nll_sum / n_tok, nll_sum, n_tok, match, token_hits, argmax)


def score_pairs(
    model,
    tok,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    space: bool = True,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> PairScores:
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return score_token_pairs(
        model, tok, encode_prompts(tok, prompts), encode_targets(tok, targets, space), batch_size, max_batch_tokens
    )


def target_nll(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64, space: bool = True) -> torch.Tensor:
    """Mean token NLL (nats) of `" " + target` after each prompt, shape [n], float64."""
    return score_pairs(model, tok, prompts, targets, batch_size, space).nll


def argmax_match(model, tok, prompts: list[str], targets: list[str], batch_size: int = 64, space: bool = True) -> torch.Tensor:
    """Exact match under teacher forcing: every target token is the argmax given the prompt and the
    target tokens before it. Shape [n], bool."""
    return score_pairs(model, tok, prompts, targets, batch_size, space).match


# ---------------------------------------------------------------------------------------------
# Prompt pass + continuations: one forward pass over each prompt (KV cache), then greedy or
# sampled decoding and the likelihood of candidate continuations both reuse that cache.


@dataclass
class PromptResult:
    new_ids: list[list[int]]  # decoded tokens per prompt (cut at EOS)
    first_lp: torch.Tensor | None  # [n, V] log P(next token | prompt), float32 CPU (keep_first_lp)
    choice_ll: list[list[float]]  # mean token log-likelihood of " " + each choice
    choice_match: list[list[bool]] | None = None  # every choice token is the argmax (teacher forcing)
    choice_token_acc: list[list[float]] | None = None  # fraction of the choice's tokens that are the argmax (EasyEdit's token accuracy)
    choice_argmax: list[list[list[int]]] | None = None  # the argmax token at each of the choice's positions


def _cache_kw(model) -> str:
    """Name of the KV-cache argument: `cache` (transformers >= 5.x) or `past_key_values`."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def _select_cache(cache, index: torch.Tensor):
    """A new cache holding rows `index` of `cache` (the original is left untouched)."""
    if not hasattr(cache, "batch_select_indices"):
        return None
    new = copy.deepcopy(cache)
    new.batch_select_indices(index)
    return new


# One forward pass costs about as much as FORWARD_COST_POSITIONS extra token positions: on a CPU
# every pass reads all the weights (135M fp32 parameters: ~0.1 s), a position costs ~7 ms.
FORWARD_COST_POSITIONS = 16


def length_chunks(widths: Sequence[int], max_rows: int, forward_cost: int = FORWARD_COST_POSITIONS) -> list[list[int]]:
    """Indices of rows with widths > 0 grouped into forward passes of at most `max_rows` rows,
    minimizing sum(forward_cost + rows x max width) over the passes (a chunk pads each row to its
    widest; one long choice among short ones would multiply the work, one pass per width would
    pay the weight reads many times). Exact by dynamic programming over the sorted widths."""
    order = [i for i in sorted(range(len(widths)), key=lambda i: widths[i]) if widths[i] > 0]
    n = len(order)
    best = [0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        w = widths[order[j - 1]]
        for i in range(max(0, j - max_rows), j):
            c = best[i] + forward_cost + (j - i) * w
            if c < best[j]:
                best[j], cut[j] = c, i
    chunks = []
    j = n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def _choice_logliks(model, cache, mask, n_real, last_lp, rows, toks, chunk: int = 64):
    """(mean token log-likelihood, all-argmax flag, argmax fraction, argmax tokens) of each token
    list toks[i] continuing batch row rows[i]; None if the cache cannot be row-selected."""
    top = last_lp.argmax(-1).tolist()
    sums = [float(last_lp[r, t[0]]) for r, t in zip(rows, toks)]  # the first token: off the prompt pass
    argmax = [[top[r]] for r in rows]
    device = mask.device
    for at in length_chunks([len(t) - 1 for t in toks], chunk):
        t_ids = [toks[i] for i in at]
        sel = torch.tensor([rows[i] for i in at], dtype=torch.long, device=device)
        width = max(len(t) for t in t_ids) - 1
        sub = _select_cache(cache, sel)
        if sub is None:
            return None
        ids = torch.zeros((len(at), width), dtype=torch.long)
        cmask = torch.zeros((len(at), width), dtype=torch.long)
        for j, t in enumerate(t_ids):
            ids[j, : len(t) - 1] = torch.tensor(t[:-1])
            cmask[j, : len(t) - 1] = 1
        ids, cmask = ids.to(device), cmask.to(device)
        pos = n_real[sel][:, None] + torch.arange(width, device=device)[None, :]
        lg = model(
            input_ids=ids, attention_mask=torch.cat([mask[sel], cmask], dim=1), position_ids=pos,
            use_cache=True, **{_cache_kw(model): sub},
        ).logits.float()
        lp = torch.log_softmax(lg, dim=-1)
        am = lp.argmax(-1).tolist()
        for j, (i, t) in enumerate(zip(at, t_ids)):
            for q in range(1, len(t)):
                sums[i] += float(lp[j, q - 1, t[q]])
                argmax[i].append(am[j][q - 1])
    hits = [sum(a == b for a, b in zip(am_i, t)) for am_i, t in zip(argmax, toks)]
    return [v / len(t) for v, t in zip(sums, toks)], [h == len(t) for h, t in zip(hits, toks)], \
        [h / len(t) for h, t in zip(hits, toks)], argmax


def shared_prefix_len(seqs: Sequence[Sequence[int]], min_len: int = 4) -> int:
    """Length of the token prefix that every sequence starts with, leaving each at least one
    token of its own (its last position predicts what follows); 0 when shorter than `min_len`
    or when there is only one sequence."""
    if len(seqs) < 2:
        return 0
    p = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        q = 0
        while q < p and s[q] == first[q]:
            q += 1
        p = q
        if p < min_len:
            return 0
    return p


def _prefix_cache(model, prefix: Sequence[int], device):
    """The KV cache of `prefix` (batch 1), or None when the cache cannot be repeated per row."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(prefix), device=device)[None],
                use_cache=True)
    cache = _cache_of(out)
    return cache if cache is not None and hasattr(cache, "batch_repeat_interleave") else None


@dataclass(frozen=True)
class Decoding:
    """run_prompts' decoding after the prompt pass: `max_new_tokens` steps, greedy or
    `pick(step, logits [B, V], prompt indices) -> token ids [B]` (paired sampling), ending a row at
    EOS when `stop_at_eos`, and once its decoded text ends with one of `stop_strings` (that token
    kept: transformers' `stop_strings`, which a natural answer ends at)."""

    max_new_tokens: int = 0
    pick: Callable | None = None
    stop_at_eos: bool = True
    stop_strings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Batching:
    """How run_prompts batches: at most `batch_size` rows and `max_batch_tokens` tokens per pass;
    `share_prefix` runs the token prefix every prompt shares once."""

    batch_size: int = 16
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    share_prefix: bool = True


def run_prompts(model, tok, prompts: Sequence[str], choices: Sequence[Sequence[str]] | None = None, *, decoding: Decoding = Decoding(),
                batching: Batching = Batching(), keep_first_lp: bool = False, space: bool = True) -> PromptResult:
    """One prompt pass per batch (left padded, KV cache), then

    * the mean token log-likelihood of `(" " if space) + choice` for every choice of the prompt
      (single-token choices are read off the prompt pass; longer ones continue the cache),
    * `decoding.max_new_tokens` decoding steps (`Decoding`): greedy, or `decoding.pick`.

    Few-shot prompts repeat one context: with `Batching.share_prefix`, the token prefix that all
    prompts share is run once and its KV cache is copied to every row, and each row runs only its
    own tokens (the gap left by a shorter row is masked). The readings are the same up to float
    rounding (tested); the prompt pass of the downstream probes shrinks ~20-fold.

    Equivalent to `score_pairs` / greedy `model.generate` up to float rounding (tested).
    """
    n = len(prompts)
    choices = [list(c) for c in choices] if choices is not None else [[] for _ in range(n)]
    res = PromptResult([[] for _ in range(n)], None, [[math.nan] * len(c) for c in choices], [[False] * len(c) for c in choices],
                       [[math.nan] * len(c) for c in choices], [[[] for _ in c] for c in choices])
    if n == 0:
        return res
    limit = max_positions(model)
    enc = [p[-max(1, limit - max(decoding.max_new_tokens, 8)):] for p in encode_prompts(tok, prompts)]
    ctoks = [encode_targets(tok, c, space) if c else [] for c in choices]
    device = model_device(model)
    with torch.inference_mode():
        n_prefix = shared_prefix_len(enc) if batching.share_prefix else 0
        prefix = _prefix_cache(model, enc[0][:n_prefix], device) if n_prefix else None
        n_prefix = n_prefix if prefix is not None else 0
        for idx in length_batches([len(s) + decoding.max_new_tokens for s in enc], batching.batch_size, batching.max_batch_tokens):
            out, mask = _prompt_pass(model, tok, [enc[i] for i in idx], prefix, n_prefix, device)
            cache = _cache_of(out)
            last = out.logits[:, -1].float()
            last_lp = torch.log_softmax(last, dim=-1)
            if keep_first_lp:
                if res.first_lp is None:
                    res.first_lp = torch.zeros((n, last_lp.shape[-1]), dtype=torch.float32)
                res.first_lp[torch.tensor(idx)] = last_lp.cpu()
            n_real = mask.sum(-1)
            _score_choices(model, tok, res, enc, ctoks, idx, cache, mask, n_real, last_lp, batching)
            if decoding.max_new_tokens > 0:
                for i, seq in zip(idx, _decode(model, tok, cache, mask, n_real, last, idx, decoding, device)):
                    res.new_ids[i] = seq
    return res


def _prompt_pass(model, tok, rows: list[list[int]], prefix, n_prefix: int, device):
    """(output, attention mask) of one left-padded batch of prompts, each after the shared prefix
    whose KV cache `prefix` holds (copied per row) when there is one."""
    ids, mask, pos = left_pad([r[n_prefix:] for r in rows], pad_id(tok), device)
    kw = {}
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(rows))
        mask = torch.cat([torch.ones((len(rows), n_prefix), dtype=mask.dtype, device=device), mask], dim=1)
        pos = pos + n_prefix
        kw = {_cache_kw(model): cache}
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kw), mask


def _score_choices(model, tok, res: PromptResult, enc, ctoks, idx, cache, mask, n_real, last_lp, batching: Batching) -> None:
    """The candidate continuations of the batch's prompts, before decoding extends the cache:
    their log-likelihood, exact match, token accuracy and argmax tokens, into `res`."""
    rows, toks, where = [], [], []
    for r, i in enumerate(idx):
        for j, t in enumerate(ctoks[i]):
            rows.append(r)
            toks.append(t)
            where.append((i, j))
    if not rows:
        return
    got = None if cache is None else _choice_logliks(model, cache, mask, n_real, last_lp, rows, toks)
    if got is None:  # a cache without row selection: score the pairs from scratch
        sc = score_token_pairs(model, tok, [enc[idx[r]] for r in rows], toks, batching.batch_size, batching.max_batch_tokens)
        got = ((-sc.nll).tolist(), sc.match.tolist(), (sc.token_hits / sc.n_tokens).tolist(), sc.argmax)
    for (i, j), v, h, acc, am in zip(where, *got):
        res.choice_ll[i][j] = v
        res.choice_match[i][j] = bool(h)
        res.choice_token_acc[i][j] = float(acc)
        res.choice_argmax[i][j] = list(am)


def _decode(model, tok, cache, mask, n_real, logits, idx, decoding: Decoding, device) -> list[list[int]]:
    """The new token ids of each row of the batch (up to, not including, EOS)."""
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache; cannot decode")
    eos = tok.eos_token_id if decoding.stop_at_eos else None
    pad = pad_id(tok)
    done = torch.zeros(len(idx), dtype=torch.bool, device=device)
    ends = [None] * len(idx)  # per row: the number of tokens it keeps, once a stop string ended it
    gen = []
    for step in range(decoding.max_new_tokens):
        nxt = decoding.pick(step, logits, idx) if decoding.pick is not None else logits.argmax(-1)
        nxt = nxt.to(device)
        if eos is not None or decoding.stop_strings:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        gen.append(nxt)
        if eos is not None:
            done |= nxt == eos
        if decoding.stop_strings:
            rows = torch.stack(gen, dim=1).tolist()
            for r in (~done).nonzero().flatten().tolist():
                if tok.decode(rows[r], skip_special_tokens=True).endswith(decoding.stop_strings):
                    done[r], ends[r] = True, step + 1
        if (eos is not None or decoding.stop_strings) and bool(done.all()):
            break
        if step == decoding.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=(n_real + step)[:, None],
                    use_cache=True, **{_cache_kw(model): cache})
        cache = _cache_of(out)
        logits = out.logits[:, -1].float()
    out_ids = []
    for seq, end in zip(torch.stack(gen, dim=1).cpu().tolist(), ends):
        seq = seq[:end] if end is not None else seq
        if eos is not None and eos in seq:
            seq = seq[: seq.index(eos)]
        out_ids.append(seq)
    return out_ids


def generate(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16, pick=None,
             stop_at_eos: bool = True) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy (or `pick`) decoding: (new token ids per prompt, log P(next token | prompt) [n, V])."""
    r = run_prompts(model, tok, prompts, keep_first_lp=True, decoding=Decoding(max_new_tokens, pick, stop_at_eos), batching=Batching(batch_size))
    return r.new_ids, r.first_lp


def decode(tok, ids_list: Sequence[Sequence[int]]) -> list[str]:
    return [tok.decode(list(ids), skip_special_tokens=True) for ids in ids_list]
