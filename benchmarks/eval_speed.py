"""Evaluation and statistics throughput, each against its naive counterpart in the same run:

- the batched scorer (length-sorted, left-padded batches under torch.inference_mode) against
  one forward pass per prompt, on the prompts the current-edit metric scores;
- second-moment collection stopped right after the edited layer against running the whole
  model, LM head included, on the same tokens;
- an edit-score job's readings of the unedited model (EasyEdit's locality) run once per distinct
  neighbourhood list (`base_memo`) against once per edit.
"""

from __future__ import annotations

import time

import torch

from editscale.evaluate.edit_scores import score_cases
from editscale.evaluate.scoring import score_pairs
from editscale.models.registry import mlp_out_name
from editscale.stats.mom2 import compute_mom2

from .prepare import Bench


def edit_score_pairs(cases: list[dict]) -> tuple[list[str], list[str]]:
    """(prompt, target) pairs of the edit-score metric: every prompt of a case against both
    target_new and target_true."""
    prompts, targets = [], []
    for c in cases:
        texts = [c["prompt"].format(c["subject"]), *c["paraphrase_prompts"], *c["neighborhood_prompts"]]
        for t in texts:
            for target in (c["target_new"], c["target_true"]):
                prompts.append(t)
                targets.append(target)
    return prompts, targets


def scorer(bench: Bench, n_cases: int) -> dict:
    bench.fresh_model()
    prompts, targets = edit_score_pairs(bench.cases[:n_cases])
    t0 = time.perf_counter()
    batched = score_pairs(bench.model, bench.tok, prompts, targets)
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [score_pairs(bench.model, bench.tok, [p], [t]).nll[0] for p, t in zip(prompts, targets)]
    t_loop = time.perf_counter() - t0
    diff = float((batched.nll - torch.stack([torch.as_tensor(x) for x in single])).abs().max())
    return {"pairs": len(prompts), "batched_pairs_per_s": len(prompts) / t_batch, "loop_pairs_per_s": len(prompts) / t_loop,
            "speedup": t_loop / t_batch, "max_abs_nll_diff": diff}


def base_memo(bench: Bench, n_cases: int) -> dict:
    """Seconds per edit of the edit-score job's scoring (one case at a time, with the unedited
    model for EasyEdit's locality) without and with `base_memo`, kept across the cases as the job
    keeps it; the two alternate in order from case to case. Checks every row is bit-identical."""
    bench.fresh_model()
    base, memo = (bench.model, bench.tok), {}
    spent = {False: 0.0, True: 0.0}
    identical = True
    for i, case in enumerate(bench.cases[:n_cases]):
        rows = {}
        for use in ((False, True) if i % 2 == 0 else (True, False)):
            t0 = time.perf_counter()
            rows[use] = score_cases(bench.model, bench.tok, [case], k=i + 1, base=base, base_memo=memo if use else None)
            spent[use] += time.perf_counter() - t0
        identical &= rows[False].equals(rows[True])
    return {"before_s": spent[False] / n_cases, "after_s": spent[True] / n_cases, "speedup": spent[False] / spent[True],
            "bit_identical": identical, "cases": n_cases, "distinct_neighbourhood_lists": len(memo)}


def stats_throughput(bench: Bench, n_tokens: int) -> dict:
    """Tokens per second of E[kk^T] collection for the ROME layer: forward stopped after the
    module (what the stats stage does) vs the full model with its LM head."""
    bench.fresh_model()
    module = mlp_out_name(bench.model, bench.hparams("rome")["layers"][0])
    out = {"module": module, "tokens": n_tokens}
    results = {}
    for stop in (False, True):
        t0 = time.perf_counter()
        results[stop] = compute_mom2(bench.model, bench.tok, [module], bench.texts, max_tokens=n_tokens, seq_len=64, batch_size=16,
                                     progress=False, stop_early=stop)
        out["stop_tok_s" if stop else "full_tok_s"] = n_tokens / (time.perf_counter() - t0)
    a, b = results[True][module][0], results[False][module][0]
    out["speedup"] = out["stop_tok_s"] / out["full_tok_s"]
    out["same_result"] = bool((abs(a - b).max() <= 1e-6 * abs(b).max()))
    return out
