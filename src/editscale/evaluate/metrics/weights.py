"""weights: drift of the edited matrices, collapse indicators and per-edit update-norm outliers.

No model is loaded (the checkpoint job may hold one for other metrics): the replayed delta and
the edited matrices of the model's safetensors are all it reads; a shapes-only model gives their
names and orientation."""

from __future__ import annotations

import logging

from ..registry import CurveSpec, metric

log = logging.getLogger(__name__)


def cost(run, section, corpus, f, k):
    """Never runs the model: norms of the stored factors."""
    return 0.0, 0.0


@metric("weights", "drift of the edited matrices, collapse indicators and update-norm outliers", inputs=("state", "factors_upto"),
        device=False, order=60,
        curves=(CurveSpec("weight_norm", "weight_fro", higher_is_better=False, label="||W_k||_F (mean over edited matrices)", log=True, summary="weight_fro", indicator=True),
                CurveSpec("condition_number", "cond", higher_is_better=False, label="condition number of W_k", log=True, summary="cond", indicator=True),
                CurveSpec("top_singular_value", "sv_1", higher_is_better=False, label="largest singular value of W_k", log=True, indicator=True),
                CurveSpec("hyperspherical_energy", "hyperspherical_energy", higher_is_better=False, label="hyperspherical energy of W_k's rows", summary="hyperspherical_energy", indicator=True),
                CurveSpec("v_norm", "v_norm_recent", higher_is_better=False, label="||v*|| (median of recent edits)", log=True, summary="v_norm", indicator=True)),
        figures={"weight_distance": "editscale.report.plots:weights_chart", "update_norms": "editscale.report.plots:update_norm_chart"}, cost=cost)
def compute(checkpoint, cfg):
    import polars as pl
    import torch
    from transformers import AutoConfig

    from ...edit.chain import replay
    from ...models.load import DTYPES, model_sha, read_weights
    from ...models.registry import edited_weight, meta_model, to_math
    from ..weights import read_edit_logs, update_norm_rows, weight_drift

    k = checkpoint.k
    shell = meta_model(AutoConfig.from_pretrained(checkpoint.model_dir))
    if k > 0:
        delta = replay(checkpoint.state, model_sha(checkpoint.model_dir))
    else:  # the unedited matrices: the indicators' baseline
        delta = {m: torch.zeros(tuple(to_math(shell, edited_weight(shell, m)).shape), dtype=torch.float32)
                 for m in checkpoint.edited_modules(shell)}
    # W0 as the run's jobs hold it (a half-precision run edits the rounded weights: cast as load_model casts), in float32
    raw = read_weights(checkpoint.model_dir, [f"{m}.weight" for m in delta])
    base = {m: to_math(shell, raw[f"{m}.weight"].to(DTYPES[checkpoint.dtype])).to(torch.float32) for m in delta}
    log.info("weights at k=%d: drift%s of %s", k, " and collapse indicators (singular values, hyperspherical energy)" if cfg.indicators else "", sorted(delta))
    frames = [weight_drift(delta, base, k=k, indicators=bool(cfg.indicators)).with_columns(pl.lit(None, dtype=pl.Int64).alias("edit_index"))]
    frames.append(update_norm_rows(read_edit_logs(checkpoint.files.get("factors_upto", []), k), k, float(cfg.outlier_z), recent=int(cfg.recent)))
    cols = ["k", "item", "edit_index", "metric", "value"]
    return pl.concat([f.select(cols) for f in frames])
