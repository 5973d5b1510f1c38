"""Generation fluency: n-gram entropy of sampled continuations (ROME / the study's measure).

Sampling: top-k (default 5) sampling of `max_new_tokens` (default 100) tokens after each
generation prompt, temperature 1. Each prompt has its own random stream, seeded by (seed, prompt
text): the k-th step draws Gumbel noise for the k top-k slots from that stream, and the token is
argmax(logit + noise) among the top-k, which is an exact sample from the renormalized top-k
distribution. So the same prompt gets the same noise at every checkpoint, whatever the batch it
lands in (common random numbers: k-to-k differences are paired, not sampling noise).
Generation stops early at EOS.

Entropy, as ROME's `compute_n_gram_entropy` (experiments/py/eval_utils_counterfact.py):
  for each text, H_n = entropy in bits of the frequency distribution of its word n-grams, for
  n = 2, 3; the text's score is mean(2/3 * H_2, 4/3 * H_3) (ROME takes the arithmetic mean of
  the WEIGHTED entropies); `ngram_entropy` is the mean over texts. The text is the prompt plus its
  continuation, as in ROME (its generate_fast returns both). Words: ROME uses
  nltk.word_tokenize; here a regex tokenizer (runs of word characters, contractions split as
  "do" "n't", "'s" kept together, every other non-space character its own token), which agrees with nltk on ordinary
  English prose.
  `unigram_entropy_norm` = H_1 / log2(#distinct words) (1 = no word repeated, -> 0 for degenerate
  repetition; 0 when the text has a single distinct word). Normalizing by the number of distinct
  words of the text rather than log(vocabulary) makes it comparable across text lengths.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from typing import Sequence

import polars as pl
import torch

from ..data.schema import fill
from .scoring import Batching, Decoding, decode, run_prompts

_WORD = re.compile(r"\w+(?=n't)|n't|'\w+|\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def entropy_bits(counts: Counter) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    words = word_tokenize(text)
    vals = [w * entropy_bits(ngram_counts(words, n)) for n, w in zip(ns, weights)]
    return sum(vals) / len(vals)


def ngram_entropy(texts: Sequence[str]) -> float:
    return sum(text_ngram_entropy(t) for t in texts) / len(texts) if texts else math.nan


def unigram_entropy_norm(text: str) -> float:
    counts = ngram_counts(word_tokenize(text), 1)
    if len(counts) <= 1:
        return 0.0
    return entropy_bits(counts) / math.log2(len(counts))


def prompt_seed(seed: int, prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()[:8], "little")


def paired_top_k(noise: torch.Tensor, top_k: int):
    """A `pick` for `scoring.run_prompts`: the top-k sample of each row drawn with that prompt's
    own pre-drawn Gumbel noise `noise[prompt, step, slot]`."""

    def pick(step: int, logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
        vals, cand = logits.float().topk(top_k, dim=-1)
        g = noise[idx, step, :].to(logits.device)
        choice = (torch.log_softmax(vals, dim=-1) + g).argmax(-1)
        return cand.gather(-1, choice[:, None])[:, 0]

    return pick


def sample_continuations(
    model, tok, prompts: Sequence[str], max_new_tokens: int = 100, top_k: int = 5, seed: int = 0, batch_size: int = 16
) -> list[str]:
    """Paired top-k samples (see module doc); returns the decoded continuations (without prompt)."""
    prompts = list(prompts)
    noise = torch.empty((len(prompts), max(max_new_tokens, 1), top_k), dtype=torch.float32)
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(prompt_seed(seed, p) % (2**63))
        u = torch.rand((max(max_new_tokens, 1), top_k), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        noise[i] = (-torch.log(-torch.log(u))).float()
    res = run_prompts(model, tok, prompts, decoding=Decoding(max_new_tokens, paired_top_k(noise, top_k)), batching=Batching(batch_size))
    return decode(tok, res.new_ids)


def pick_prompts(cases: Sequence[dict], n_prompts: int | None, seed: int = 0) -> list[str]:
    """A fixed set of generation prompts: one per case for the first `n_prompts` cases of the
    run's edit sequence (edit order, so the set does not depend on k or n_edits, and the prompts
    are about subjects that get edited early), the case's generation prompt picked with
    Random(seed). Cases without generation_prompts contribute their filled edit prompt;
    duplicates are dropped."""
    rng = random.Random(seed)
    out: list[str] = []
    for c in sorted(cases, key=lambda c: int(c.get("edit_index", 0))):
        gp = c.get("generation_prompts") or [fill(c["prompt"], c["subject"])]
        p = gp[rng.randrange(len(gp))]
        if p not in out:
            out.append(p)
        if n_prompts and len(out) >= n_prompts:
            break
    return out


def generation_metrics(model, tok, prompts: Sequence[str], k: int, max_new_tokens: int = 100, top_k: int = 5, seed: int = 0,
                       batch_size: int = 16) -> tuple[pl.DataFrame, list[str]]:
    conts = sample_continuations(model, tok, prompts, max_new_tokens, top_k, seed, batch_size)
    texts = [p + c for p, c in zip(prompts, conts)]
    n_words = [len(word_tokenize(c)) for c in conts]
    m = {
        "ngram_entropy": ngram_entropy(texts),
        "ngram_entropy_continuation": ngram_entropy(conts),
        "unigram_entropy_norm": sum(unigram_entropy_norm(t) for t in texts) / len(texts) if texts else math.nan,
        "words_generated": sum(n_words) / len(n_words) if n_words else math.nan,
        "n_prompts": float(len(texts)),
    }
    df = pl.DataFrame(
        {"k": [k] * len(m), "item": ["all"] * len(m), "metric": list(m), "value": [float(v) for v in m.values()]},
        schema={"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64},
    )
    return df, conts
