"""perplexity: perplexity on a fixed held-out token sample.

Input: int64 token ids [n_seq, seq_len] (an .npy written by the stats stage from its held-out
corpus). Every sequence is scored as one causal window: tokens 1..L-1 are predicted from their
prefix, so a sample has n_seq * (seq_len - 1) scored tokens. perplexity = exp(mean NLL over all
scored tokens) (token-weighted, not a mean of per-sequence perplexities). Sequences all have the
same length, so batches need no padding. Token ids equal to `ignore_id` (if given) are not
scored (e.g. padding in a ragged sample).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from ...io import EditscaleError
from ..registry import CurveSpec, metric


def load_tokens(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"token file {path} not found")
    arr = np.load(path)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise EditscaleError(f"{path}: expected an integer array [n_seq, seq_len], got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def perplexity(model, tokens, batch_size: int | None = None, ignore_id: int | None = None) -> dict[str, float]:
    """{'nll': mean token NLL (nats), 'perplexity': exp(nll), 'n_tokens': scored tokens}.

    `batch_size` defaults to as many sequences as fit 2048 tokens (the logits are B x L x V).
    """
    import torch  # here, not at the top: every command's parser imports the metric modules

    from ..scoring import model_device

    toks = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if toks.dim() == 1:
        toks = toks[None]
    if toks.shape[1] < 2:
        raise EditscaleError("perplexity needs sequences of at least 2 tokens")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and int(toks.max()) >= vocab:
        raise EditscaleError(f"token id {int(toks.max())} >= vocabulary size {vocab}: tokens from another tokenizer?")
    if not batch_size:
        batch_size = max(1, 2048 // toks.shape[1])
    device = model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, toks.shape[0], batch_size):
            x = toks[s : s + batch_size].to(device)
            mask = torch.ones_like(x) if ignore_id is None else (x != ignore_id).long()
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            tgt = x[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            keep = mask[:, 1:].reshape(-1).bool()
            total += float(nll[keep].double().sum())
            count += int(keep.sum())
    mean = total / count if count else math.nan
    return {"nll": mean, "perplexity": math.exp(mean) if count else math.nan, "n_tokens": float(count)}


def perplexity_rows(k: int, result: dict[str, float], item: str = "all") -> pl.DataFrame:
    return pl.DataFrame(
        {"k": [k] * len(result), "item": [item] * len(result), "metric": list(result), "value": [float(v) for v in result.values()]},
        schema={"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64},
    )


def cost(run, section, corpus, f, k):
    return f * int(corpus["heldout_tokens"]), 0.0


@metric("perplexity", "perplexity on the held-out token sample", inputs=("state", "heldout"), order=40,
        curves=(CurveSpec("perplexity", "perplexity", higher_is_better=False, label="log perplexity", log=True, summary="perplexity", indicator=True, glance=True),),
        cost=cost)
def compute(checkpoint, cfg) -> pl.DataFrame:
    path = checkpoint.input("heldout")
    tokens = load_tokens(path)
    model, _ = checkpoint.model()
    result = perplexity(model, tokens, batch_size=cfg.batch_size, ignore_id=cfg.ignore_id)
    checkpoint.uses("tokens", path)
    return perplexity_rows(checkpoint.k, result)
