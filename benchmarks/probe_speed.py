"""Seconds of the downstream metric's six built-in probes (50 items each, both readings) on one
thread, and their accuracies, for one source tree: run it once per revision, alternating, to
compare (RESULTS.md section 7b):

    PYTHONPATH=TREE/src python -m benchmarks.probe_speed MODEL_DIR
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(model_dir: str, n_eval: int = 50) -> dict:
    from editscale.evaluate.probes import PROBES, build_probe
    from editscale.evaluate.tasks import evaluate_task
    from editscale.models.load import load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, device="cpu")[:2]
    out = {}
    for name in PROBES:
        task = build_probe(name, {"n_eval": n_eval})
        t0 = time.perf_counter()
        metrics, _ = evaluate_task(model, tok, task, generation=True)
        out[name] = {"seconds": round(time.perf_counter() - t0, 2), **{m: metrics[m] for m in ("accuracy", "accuracy_ll", "accuracy_cal")}}
    out["total_seconds"] = round(sum(v["seconds"] for v in out.values()), 1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
