"""A toy metric defined outside editscale's sources (the plugin test): the Frobenius norm of the
edited model's MLP output matrices at checkpoint k, from the declared state files. It brings its
config section (metrics.toy_norm), its sub-command and its registry entry; nothing else."""

from __future__ import annotations

import time

import polars as pl

from editscale.evaluate.registry import Metric, register_metric
from editscale.io import provenance, write_parquet_atomic


def _add_verb(sub) -> None:
    p = sub.add_parser("toy-norm", help="toy metric: Frobenius norm of the edited matrices at checkpoint k")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--params-json", default="{}")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args) -> None:
    import torch

    from editscale.config import section
    from editscale.edit.chain import model_at
    from editscale.models.registry import edited_weight, mlp_out_name, n_layers

    t0 = time.time()
    import json

    cfg = section("metrics.toy_norm", json.loads(args.params_json))
    model, _ = model_at(args.model_dir, args.run_dir, args.k, device="cpu")
    rows = []
    for layer in range(n_layers(model)):
        w = edited_weight(model, mlp_out_name(model, layer)).detach().to(torch.float64)
        rows.append({"k": args.k, "item": f"layer{layer}", "metric": "fro", "value": float(w.norm()) * cfg.scale})
    write_parquet_atomic(pl.DataFrame(rows), args.out, metadata={**provenance(), "seconds": f"{time.time() - t0:.2f}"})


register_metric(Metric(
    "toy_norm", "toy-norm", "toy: Frobenius norm of each MLP output matrix", inputs=("state",), device=False,
    curves={"fro": False},
    schema={"properties": {"eval_every": {"type": "integer", "minimum": 1, "default": 3},
                           "scale": {"type": "number", "default": 1.0}}},
    add_verb=_add_verb,
))
