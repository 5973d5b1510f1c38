"""Evaluate stage: one metric per checkpoint k, each a long parquet table
`results/{run}/metrics/{metric}/{k:06d}.parquet` with columns k, item, metric, value (+ extras).

Metrics: edit_scores (the edit just made, right after it), history (all earlier edits at k),
downstream (few-shot tasks and offline probes), generation (n-gram entropy), perplexity, weights.
"""

from __future__ import annotations


def eval_grid(n_edits: int, every: int | None = None, segment: int | None = None) -> list[int]:
    """Checkpoints to evaluate: 0, every multiple of `every` below n_edits, and n_edits.

    `every` defaults to `segment` (evaluate at segment ends, where the chain stores a delta, so
    loading the model needs no replay); with neither, only 0 and n_edits.
    """
    n_edits = int(n_edits)
    if n_edits < 0:
        raise ValueError(f"n_edits must be >= 0, got {n_edits}")
    step = every if every is not None else segment
    ks = {0, n_edits}
    if step is not None:
        step = int(step)
        if step <= 0:
            raise ValueError(f"evaluation interval must be > 0, got {step}")
        ks.update(range(0, n_edits + 1, step))
    return sorted(ks)


def segment_ends(n_edits: int, segment: int) -> list[int]:
    """Ends of the chain's segments: segment, 2*segment, ..., and n_edits if not a multiple."""
    if segment <= 0:
        raise ValueError(f"segment must be > 0, got {segment}")
    ends = list(range(segment, n_edits + 1, segment))
    if n_edits > 0 and (not ends or ends[-1] != n_edits):
        ends.append(n_edits)
    return ends
