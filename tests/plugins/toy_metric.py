"""A toy metric defined outside editscale's sources (the plugin test): the Frobenius norm of the
edited model's MLP output matrices at checkpoint k, from the declared state files. It brings its
config section (metrics.toy_norm), its sub-command, its report curve (phase detection and the
summary's toy_fro_at_N columns), its figure and its registry entry; nothing else."""

from __future__ import annotations

import time

import polars as pl

from editscale.evaluate.registry import CurveSpec, Metric, register_metric
from editscale.io import provenance, write_parquet_atomic


def _add_verb(sub) -> None:
    p = sub.add_parser("toy-norm", help="toy metric: Frobenius norm of the edited matrices at checkpoint k")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--state", nargs="+", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--params-json", default="{}")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args) -> None:
    import torch

    from editscale.config import section
    from editscale.edit.chain import model_at
    from editscale.evaluate.cli import state_files
    from editscale.models.registry import edited_weight, mlp_out_name, n_layers

    t0 = time.time()
    import json

    cfg = section("metrics.toy_norm", json.loads(args.params_json))
    model, _ = model_at(args.model_dir, state_files(args), device="cpu")
    rows = []
    for layer in range(n_layers(model)):
        w = edited_weight(model, mlp_out_name(model, layer)).detach().to(torch.float64)
        rows.append({"k": args.k, "item": f"layer{layer}", "metric": "fro", "value": float(w.norm()) * cfg.scale})
    write_parquet_atomic(pl.DataFrame(rows), args.out, metadata={**provenance(), "seconds": f"{time.time() - t0:.2f}"})


def toy_norm_chart(tables, options):
    """The toy metric's figure: mean Frobenius norm against edits (a FigureOptions is passed)."""
    import altair as alt

    df = tables.get("toy_norm")
    if df is None or df.height == 0:
        return alt.Chart(pl.DataFrame({"m": ["toy_norm: no data"]})).mark_text().encode(text="m:N")
    mean = df.group_by(["run", "edit"]).agg(pl.col("value").mean()).sort("edit")
    return alt.Chart(mean).mark_line().encode(x="edit:Q", y="value:Q", color="run:N").properties(title=f"toy norm (smooth {options.smooth})")


register_metric(Metric(
    "toy_norm", "toy-norm", "toy: Frobenius norm of each MLP output matrix", inputs=("state",), device=False,
    curves=(CurveSpec("toy_fro", "fro", higher_is_better=False, label="toy Frobenius norm", summary="toy_fro"),),
    figures={"toy_norm": "toy_metric:toy_norm_chart"},
    schema={"properties": {"eval_every": {"type": "integer", "minimum": 1, "default": 3},
                           "scale": {"type": "number", "default": 1.0}}},
    add_verb=_add_verb,
))
