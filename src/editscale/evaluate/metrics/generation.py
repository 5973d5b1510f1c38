"""generation: n-gram entropy of sampled continuations (fluency)."""

from __future__ import annotations

import logging

from ..registry import CurveSpec, metric

log = logging.getLogger(__name__)


def cost(run, section, corpus, f, k):
    return 0.0, f * int(section["n_prompts"]) * (int(section["max_new_tokens"]) + 16)


@metric("generation", "n-gram entropy of sampled continuations (fluency)", order=50,
        curves=(CurveSpec("fluency", "ngram_entropy", label="generation n-gram entropy", joint="fluency", summary="ngram_entropy"),), cost=cost)
def compute(checkpoint, cfg):
    from ..generation import generation_metrics, pick_prompts

    prompts = cfg.prompts or pick_prompts(checkpoint.edits(), cfg.n_prompts, cfg.seed)
    model, tok = checkpoint.model()
    df, conts = generation_metrics(model, tok, prompts, checkpoint.k, cfg.max_new_tokens, cfg.top_k, cfg.seed, cfg.batch_size)
    for p, c in list(zip(prompts, conts))[:3]:
        log.info("k=%d sample: %r -> %r", checkpoint.k, p, c[:200])
    return df
