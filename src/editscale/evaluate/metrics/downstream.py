"""downstream: few-shot downstream tasks and offline probes at checkpoint k."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from ...io import EditscaleError
from ..registry import CurveSpec, metric

log = logging.getLogger(__name__)

# doctor's token counts of one task item
DEFAULT_TASK_ITEMS = 500
DEFAULT_TOKENS_PER_ITEM = 300
PROBE_TOKENS_PER_CHOICE = 60  # 4 shots + the item
CHARS_PER_TOKEN = 4.0


def task_tokens(spec: dict) -> tuple[int, float, str]:
    """(items evaluated, tokens per item, basis) of one downstream task (doctor)."""
    path = Path(str(spec.get("path", "")))
    shots = int(spec.get("n_shots", 4))
    n_eval = spec.get("n_eval", 100)
    if path.is_file():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines:
            chars = sum(len(ln) for ln in lines) / len(lines)
            items = min(n_eval, len(lines) - shots) if n_eval else len(lines) - shots
            return max(items, 0), (shots + 1) * chars / CHARS_PER_TOKEN, "file"
    items = n_eval or DEFAULT_TASK_ITEMS
    return items, DEFAULT_TOKENS_PER_ITEM * (shots + 1) / 5, "assumed"


def data_files(section: dict) -> list[tuple[str, str, str]]:
    """The task files of the section (`tasks.<name>.path`): inputs of the jobs (registry input `data`)."""
    return [(f"tasks.{name}.path", str(spec["path"]), "a task file is a JSONL of your own, or one of the forgetting study's GLUE "
             "subsets (docs/scale.md, \"Downstream files\": copy or convert them first)")
            for name, spec in (section.get("tasks") or {}).items() if isinstance(spec, dict) and spec.get("path")]


def cost(run, section, corpus, f, k):
    per_ckpt = 0.0
    for spec in (section.get("tasks") or {}).values():
        items, tok_per_item, _ = task_tokens(spec or {})
        per_ckpt += items * tok_per_item
    probes = section.get("probes", {})
    if probes is not None and probes is not False:  # the built-in probes (evaluate.probes), 4 choices each
        from ..probes import PROBES

        names = probes.get("names", list(PROBES))
        per_ckpt += len(names) * int(probes.get("n_eval", 100) or 100) * 4 * PROBE_TOKENS_PER_CHOICE
    return f * per_ckpt, 0.0


@metric("downstream", "few-shot downstream tasks and offline probes", order=30,
        curves=(CurveSpec("downstream_f1", "f1", label="downstream F1 (mean over tasks)", joint="downstream", summary="downstream_f1", glance=True,
                          per_item=True),
                CurveSpec("downstream_ll", "accuracy_ll", label="downstream accuracy (log-likelihood)", joint="downstream", summary="downstream_accuracy_ll", glance=True,
                          per_item=True)),
        figures={"downstream": "editscale.report.plots:downstream_chart"}, cost=cost,
        inputs=("state", "edits", "data"), data_files=data_files)
def compute(checkpoint, cfg):
    import polars as pl

    from ..downstream import build_tasks, evaluate_task, metrics_rows, task_config
    from ..tasks import chat_task
    from ..probes import keep_solved

    tasks_cfg = task_config({k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval_every"})
    if not tasks_cfg:
        raise EditscaleError("downstream: no tasks: set `tasks` and/or `probes` in the config's metrics.downstream")
    n_edits = cfg.exclude_edits
    excluded = [c["subject"] for c in checkpoint.edits() if n_edits is None or int(c["edit_index"]) <= int(n_edits)]
    log.info("probes leave out the %d subjects of edits 1..%s", len(excluded), n_edits if n_edits is not None else "all")
    tasks = build_tasks(tasks_cfg, excluded)
    bs, generation = cfg.batch_size, cfg.generation
    # optional per-task "keep_solved": restrict to the items the UNEDITED model gets right
    need_base = [i for i, t in enumerate(tasks) if (tasks_cfg.get(t.name) or {}).get("keep_solved")]
    model, tok = checkpoint.model()
    if cfg.chat_template:  # question-format tasks as the user turn of the instruct model's chat template
        tasks = [chat_task(t, tok) for t in tasks]
    if need_base:  # read on the unedited model: a view of this one (no second copy of the weights)
        with checkpoint.unedited(model, tok) as (base, btok):
            for i in need_base:
                reading = tasks_cfg[tasks[i].name]["keep_solved"]
                tasks[i] = keep_solved(base, btok, tasks[i], reading if isinstance(reading, str) else "ll", bs)
    frames = []
    for task in tasks:
        ts = time.time()
        metrics, _ = evaluate_task(model, tok, task, batch_size=bs, generation=generation)
        metrics["seconds"] = time.time() - ts
        frames.append(metrics_rows(checkpoint.k, task.name, metrics))
        path = (tasks_cfg.get(task.name) or {}).get("path")
        if path and Path(path).exists():
            checkpoint.uses(f"task:{task.name}", path)
        log.info("%s: %s", task.name, {m: round(v, 4) for m, v in metrics.items()})
    return pl.concat(frames)
