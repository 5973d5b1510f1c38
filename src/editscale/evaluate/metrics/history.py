"""history: every edit made so far, re-scored on the model after k edits (forgetting)."""

from __future__ import annotations

import logging

from ..registry import CurveSpec, metric

log = logging.getLogger(__name__)

HISTORY_TOKENS_PER_CASE = 60  # doctor: the edit and 2 paraphrase prompts


def cost(run, section, corpus, f, k):
    sample = section.get("sample", "all")
    cases = k if sample == "all" else min(k, int(sample))  # all k earlier edits, or the bounded sample
    return f * cases * HISTORY_TOKENS_PER_CASE, 0.0


@metric("history", "re-scores every earlier edit at checkpoint k (forgetting)", order=20,
        curves=(CurveSpec("efficacy", "retention", label="retention of earlier edits (ES)", table="forgetting", joint="efficacy", summary="retention", glance=True),
                CurveSpec("forgotten_pct", "forgotten_pct", higher_is_better=False, table="forgetting", phases=False, summary="forgotten_pct")),
        figures={"forgetting": "editscale.report.plots:forgetting_chart"}, cost=cost)
def compute(checkpoint, cfg):
    from ..history import score_history

    cases = checkpoint.edits()
    model, tok = checkpoint.model()
    size = None if cfg.sample == "all" else int(cfg.sample)
    log.info("history at k=%d: re-scoring %s earlier edits (%s)", checkpoint.k, "all" if size is None else f"at most {size}",
             "every one" if size is None else f"{cfg.strata} age strata, seed {cfg.seed}")
    base = None  # EasyEdit's locality: against the unedited model ("self" at k = 0)
    if cfg.easyedit_locality and "neighborhood" in cfg.parts:
        base = "self" if checkpoint.k == 0 else checkpoint.unedited(model, tok)
    return score_history(model, tok, cases, checkpoint.k, parts=tuple(cfg.parts), batch_size=cfg.batch_size,
                         sample=size, strata=cfg.strata, seed=cfg.seed, base=base, chat=bool(cfg.chat_template))
