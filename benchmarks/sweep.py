"""A small sequential hyper-parameter sweep of one editing method, on a workflow's own inputs.

    python -m benchmarks.sweep --study /path/to/workdir --run memit-smollm2-geofacts-s0 \
        --set mom2_update_weight=5000,15000,50000 --n-edits 20 --workers 2

For each value of the swept key: the run's resolved hparams with that value, the run's first
`--n-edits` cases of results/{run}/edits.jsonl, its context_templates.json and statistics (read
from the work dir a `snakemake` of the run's stats and templates left there), edited one after
another from the unedited model; each edit is scored right after it (ES / PS / NS, as the
edit_scores metric), and all of them again after the last edit (retention, as the history metric).
Prints one row per value (means over the edits) and, with --out, writes them as JSON. Settings run
in parallel worker processes (one thread each, as the workflow runs chains).

It is a tuning aid, not a measurement of the study: the workflow's runs are what the report uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else math.nan


def run_setting(study: str, run_name: str, key: str, value, n_edits: int, threads: int = 1) -> dict:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(threads)
    from editscale.edit.chain import load_precomputed, read_run, read_templates
    from editscale.edit.methods import get_method
    from editscale.edit.weights import WeightState
    from editscale.evaluate.edit_scores import case_metrics
    from editscale.io import read_jsonl
    from editscale.models.load import load_model, model_sha
    from editscale.stats.mom2 import read_projection

    study_dir = Path(study)
    run_dir = study_dir / "results" / run_name
    run = read_run(Path(run_dir) / "run.json")
    model_dir = study_dir / "data" / "models" / run["model"]
    hp = {**run["hparams"], key: value}
    cls = get_method(run["method"], hp)
    model, tok = load_model(model_dir)
    modules = cls.modules(model, hp)
    sha = model_sha(model_dir)
    stats_dir = study_dir / "results" / "stats" / run["model"] / run["corpus"]
    stats = load_precomputed({"mom2": {m: str(stats_dir / f"{m}.h5") for m in modules if (stats_dir / f"{m}.h5").exists()}}, modules, sha, "cpu")["stats"]
    extra = {}
    nullspace = cls.precomputed(hp).get("nullspace")
    if nullspace:  # cached projections where the workflow left them; the method derives the rest from stats
        cached = {m: stats_dir / "nullspace" / f"{m}.t{nullspace['threshold']}.h5" for m in modules}
        extra["projections"] = {m: torch.from_numpy(read_projection(p, expected_model_sha=sha)) for m, p in cached.items() if p.exists()}
    templates = read_templates(run_dir / "context_templates.json", cls.template_rule)
    sequence = read_jsonl(run_dir / "edits.jsonl")
    cases = sequence[:n_edits]
    editor = cls(model, tok, hp, stats, templates, **extra)
    editor.begin(sequence)  # as the chain does at k = 0 (NAS: its anchor)
    weights = WeightState(model, modules)
    memory = getattr(editor, "memory", None)

    def scored(some):  # the model as the metrics evaluate it: with the method's memory attached (GRACE)
        handles = memory.attach(model) if memory is not None else []
        try:
            return case_metrics(model, tok, some)
        finally:
            for h in handles:
                h.remove()

    now, steps, edit_s = [], [], 0.0
    t0 = time.perf_counter()
    for case in tqdm(cases, desc=f"{run['method']} {key}={value}", unit="edit"):
        t_edit = time.perf_counter()
        rows = editor.apply([case], weights)
        edit_s += time.perf_counter() - t_edit
        steps.append(rows[0].get("steps") if rows else None)
        now.append(scored([case])[0])
    seconds = (time.perf_counter() - t0) / len(cases)
    after = scored(cases)
    norms = {m: float((weights.current(m) - weights.base[m]).norm()) for m in modules}
    return {
        "method": run["method"], "key": key, "value": value, "n_edits": len(cases),
        **{f"{m}_now": _mean(r[m] for r in now) for m in ("es", "ps", "ns", "score")},
        **{f"{m}_after": _mean(r[m] for r in after) for m in ("es", "ps", "ns")},
        "delta_norm": math.sqrt(sum(v * v for v in norms.values())), "s_per_edit": seconds,
        "s_per_edit_update": edit_s / len(cases), "steps_per_edit": _mean(steps),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="workflow work dir holding data/ and results/")
    p.add_argument("--run", required=True, help="run name (its run.json, edits.jsonl, context_templates.json, stats)")
    p.add_argument("--set", required=True, help="KEY=V1,V2,... the hparam and its values")
    p.add_argument("--n-edits", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    key, _, values = args.set.partition("=")
    values = [_parse_value(v) for v in values.split(",") if v]
    if not key or not values:
        raise SystemExit("--set expects KEY=V1,V2,...")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = [pool.submit(run_setting, args.study, args.run, key, v, args.n_edits) for v in values]
        rows = [f.result() for f in futures]
    cols = ["value", "es_now", "ps_now", "ns_now", "score_now", "es_after", "ps_after", "ns_after", "delta_norm", "s_per_edit",
            "s_per_edit_update", "steps_per_edit"]
    print(f"{rows[0]['method']} {key} over {args.n_edits} sequential edits ({args.run})")
    print("  ".join(f"{c:>10s}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>10.4g}" if isinstance(r[c], float) else f"{str(r[c]):>10s}" for c in cols))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
