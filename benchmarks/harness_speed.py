"""lm-evaluation-harness (metric lm_eval) against editscale's own log-likelihood reading on the
same items: the shipped offline tasks, zero-shot, 100 items each, one thread (RESULTS.md 7c).

    python -m benchmarks.harness_speed MODEL_DIR [DATA_DIR]
"""

from __future__ import annotations

import sys
import time

import torch


def main(model_dir: str, data_dir: str = "../shared/data/downstream", n: int = 100) -> None:
    from editscale.evaluate.downstream import build_task
    from editscale.evaluate.harness import evaluate_harness
    from editscale.evaluate.tasks import evaluate_task
    from editscale.io import read_jsonl
    from editscale.models.load import load_model

    torch.set_num_threads(1)
    model, tok = load_model(model_dir, device="cpu")[:2]
    for name in ("sst2", "mmlu"):
        t = time.perf_counter()
        res, _, _ = evaluate_harness(model, tok, {f"editscale_{name}": {"limit": n}}, 0, 8, data_dir, None)
        harness_s = time.perf_counter() - t
        task = build_task(name, read_jsonl(f"{data_dir}/{name}.jsonl")[:n], name, n_eval=None, n_shots=0)
        t = time.perf_counter()
        mine, _ = evaluate_task(model, tok, task, generation=False)
        own_s = time.perf_counter() - t
        print(f"{name}: harness acc {res[f'editscale_{name}']['acc,none']:.3f} in {harness_s:.1f} s; "
              f"editscale accuracy_ll {mine['accuracy_ll']:.3f} in {own_s:.1f} s ({n} items, zero-shot, 1 thread)")


if __name__ == "__main__":
    main(*sys.argv[1:])
