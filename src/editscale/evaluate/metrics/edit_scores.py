"""edit_scores: efficacy / paraphrase / neighborhood of each edit, right after it (one job per segment)."""

from __future__ import annotations

from ...io import EditscaleError
from ..registry import CurveSpec, metric

SCORE_TOKENS_PER_CASE = 200  # doctor: 1 edit + 2 paraphrase + 10 neighborhood prompts, ~16 tokens each


def cost(run, section, corpus, f, k):
    return f * run["segment"] * SCORE_TOKENS_PER_CASE, 0.0  # the segment's edits, after each edit


@metric("edit_scores", "efficacy / paraphrase / neighborhood of each edit right after it", verb="score-edits",
        grid="segments", inputs=("state", "segment_factors", "edits"), table="wide", rule="edit_scores", order=10,
        curves=(CurveSpec("proficiency", "es", label="ES of the new edit", per_edit=True, summary="es", glance=True),
                *(CurveSpec(q, q, per_edit=True, phases=False, summary=q) for q in ("ps", "ns", "score"))),
        figures={"edit_scores": "editscale.report.plots:proficiency_chart"}, cost=cost)
def compute(checkpoint, cfg):
    import polars as pl

    from ..edit_scores import score_cases

    by_index = {int(c["edit_index"]): c for c in checkpoint.edits()}
    locality = cfg.easyedit_locality  # EasyEdit's locality: argmax agreement with the unedited model
    base = None
    base_memo: dict = {}  # the unedited model's neighbourhood argmax, per exact prompt list (case_metrics)
    frames = []
    for j, model, tok in checkpoint.states_in_segment():
        if j not in by_index:
            raise EditscaleError(f"edit {j} of the chain is not in {checkpoint.input('edits')}")
        if locality and base is None:  # one view of the replayed model (updated in place), reused
            base = checkpoint.unedited(model, tok)
        frames.append(score_cases(model, tok, [by_index[j]], k=j, batch_size=cfg.batch_size, base=base, chat=bool(cfg.chat_template),
                                  base_memo=base_memo))
    return pl.concat(frames) if frames else score_cases(None, None, [], k=checkpoint.k)
