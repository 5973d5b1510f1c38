"""Evaluate stage: one metric per checkpoint k, each a long parquet table
`results/{run}/metrics/{metric}/{k:06d}.parquet` with columns k, item, metric, value (+ extras).

Metrics: edit_scores (the edit just made, right after it), history (all earlier edits at k),
downstream (few-shot tasks and offline probes), generation (n-gram entropy), perplexity, weights.
"""

# The checkpoint grids are planned in editscale.workflow (eval_grid, segment_ends): one definition.
