"""A toy metric defined outside editscale's sources (the plugin test): the Frobenius norm of the
edited model's MLP output matrices at checkpoint k. It brings its compute function, its config
section (metrics.toy_norm), its report curve (phase detection and the summary's toy_fro_at_N
columns) and its figure, through the public protocol only; its sub-command, argument parsing,
provenance and file writing come from editscale's metric job."""

from __future__ import annotations

import polars as pl

from editscale.evaluate.registry import CurveSpec, metric


def toy_norm_chart(tables, options):
    """The toy metric's figure: mean Frobenius norm against edits (a FigureOptions is passed)."""
    import altair as alt

    df = tables.get("toy_norm")
    if df is None or df.height == 0:
        return alt.Chart(pl.DataFrame({"m": ["toy_norm: no data"]})).mark_text().encode(text="m:N")
    mean = df.group_by(["run", "edit"]).agg(pl.col("value").mean()).sort("edit")
    return alt.Chart(mean).mark_line().encode(x="edit:Q", y="value:Q", color="run:N").properties(title=f"toy norm (smooth {options.smooth})")


@metric("toy_norm", "toy: Frobenius norm of each MLP output matrix", inputs=("state",), device=False,
        curves=(CurveSpec("toy_fro", "fro", higher_is_better=False, label="toy Frobenius norm", summary="toy_fro"),),
        figures={"toy_norm": "toy_metric:toy_norm_chart"},
        schema={"properties": {"eval_every": {"type": "integer", "minimum": 1, "default": 3},
                               "scale": {"type": "number", "default": 1.0}}})
def toy_norm(checkpoint, cfg) -> pl.DataFrame:
    import torch

    from editscale.models.registry import edited_weight, mlp_out_name, n_layers

    model, _ = checkpoint.model()
    rows = []
    for layer in range(n_layers(model)):
        w = edited_weight(model, mlp_out_name(model, layer)).detach().to(torch.float64)
        rows.append({"k": checkpoint.k, "item": f"layer{layer}", "metric": "fro", "value": float(w.norm()) * cfg.scale})
    return pl.DataFrame(rows)
