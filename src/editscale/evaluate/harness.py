"""lm-evaluation-harness (EleutherAI `lm-eval` 0.4.x) as a downstream backend: metric `lm_eval`.

Enable it with `plugins: [editscale.evaluate.harness]` and a `metrics.lm_eval` section (it is a
plugin so that studies without it need neither the package nor its jobs):

    plugins: [editscale.evaluate.harness]
    metrics:
      lm_eval:
        eval_every: 20
        tasks: {editscale_sst2: {limit: 100}, editscale_mmlu: {limit: 100}}   # online: mmlu, hellaswag, arc_easy, ...
        num_fewshot: 0

At checkpoint k the replayed model and its tokenizer go to the harness's Hugging Face wrapper
(`lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tok)`: in memory, nothing re-saved;
inside a checkpoint job the model is the job's shared one). Each task's results are written with
the harness's names kept: item = task, metric = the harness's results key ("acc,none",
"acc_stderr,none", ...).

Offline tasks shipped with editscale (`harness_tasks/*.yaml`): `editscale_sst2`, `editscale_mmlu`
(GLUE SST-2 and MMLU in the prompts of editscale's own downstream formats), read from local JSONL
(`dataset_path: json`, `data_files`) under `data_dir` (default ../shared/data/downstream). Their
file hashes go into each output's provenance. `include_path` adds a directory of your own task
YAMLs. The harness is run with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set unless `online: true`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

from ..io import EditscaleError
from .registry import CurveSpec, metric

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).with_name("harness_tasks")
SHIPPED = {p.stem: p for p in sorted(TASK_DIR.glob("*.yaml"))}  # task name -> template (name = file stem)
DATA_DIR_MARK = "{{data_dir}}"  # each template names its data file as "{{data_dir}}/<file>.jsonl"


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise EditscaleError("metric lm_eval needs lm-evaluation-harness: pip install 'editscale[lm-eval]' (lm-eval 0.4.x)")


def render_tasks(names, data_dir: str | Path, out_dir: Path) -> dict[str, Path]:
    """The shipped task templates among `names`, written to `out_dir` with their data file's
    absolute path; task name -> data file."""
    data_dir = Path(data_dir).resolve()
    files = {}
    for name in names:
        if name not in SHIPPED:
            continue
        template = SHIPPED[name].read_text()
        data = data_dir / re.search(re.escape(DATA_DIR_MARK) + r'/([^"\s]+)', template).group(1)
        if not data.is_file():
            raise EditscaleError(f"lm_eval task {name!r}: data file {data} not found (metrics.lm_eval.data_dir)")
        (out_dir / f"{name}.yaml").write_text(template.replace(DATA_DIR_MARK, str(data_dir)))
        files[name] = data
    return files


def harness_rows(k: int, results: dict):
    """Long rows (k, item = task, metric = the harness's key, value) of `simple_evaluate`'s results."""
    import polars as pl

    rows = []
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            rows.append({"k": k, "item": task, "metric": key, "value": float(value)})
    return pl.DataFrame(rows, schema={"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64})


def evaluate_harness(model, tok, tasks: dict, num_fewshot: int | None, batch_size: int, data_dir, include_path: str | None,
                     seed: int = 0, online: bool = False, log_samples: bool = False):
    """(results, samples, data files) of the harness on the in-memory model."""
    _require_lm_eval()
    if not online:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="editscale-lm-eval-") as tmp:
        files = render_tasks(tasks, data_dir, Path(tmp))
        include = [tmp] + ([str(Path(include_path).resolve())] if include_path else [])
        manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise EditscaleError(f"lm_eval: unknown task(s) {unknown}; shipped offline tasks: {sorted(SHIPPED)} (others need `online: true` or `include_path`)")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
        results, samples = {}, {}
        for name, spec in tasks.items():  # one call per task: each keeps its own limit
            out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=num_fewshot,
                                          limit=(spec or {}).get("limit"), log_samples=log_samples, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          bootstrap_iters=0)
            results.update(out["results"])
            samples.update(out.get("samples") or {})
    return results, samples, files


SCHEMA = {
    "properties": {
        "eval_every": {"type": "integer", "minimum": 1, "default": 50},
        "tasks": {"type": "object", "default": {}, "description": "harness task name -> {limit: N} (null: every item)",
                  "additionalProperties": {"oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": False,
                                                                      "properties": {"limit": {"type": "integer", "minimum": 1}}}]}},
        "num_fewshot": {"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 0}], "default": 0},
        "batch_size": {"type": "integer", "minimum": 1, "default": 8},
        "data_dir": {"type": "string", "default": "../shared/data/downstream", "description": "where the shipped offline tasks' JSONL files are"},
        "include_path": {"oneOf": [{"type": "null"}, {"type": "string"}], "default": None, "description": "a directory of your own task YAMLs"},
        "seed": {"type": "integer", "default": 0},
        "online": {"type": "boolean", "default": False, "description": "let the harness download datasets (hub tasks)"},
    }
}

_require_lm_eval()  # at import, i.e. when the config's plugins are loaded (snakemake -n), not after hours of edits


@metric("lm_eval", "lm-evaluation-harness tasks (EleutherAI lm-eval 0.4.x) on the in-memory model",
        curves=(CurveSpec("lm_eval_acc", "acc,none", label="lm-eval accuracy (mean over tasks)", summary="lm_eval_acc", per_item=True),),
        schema=SCHEMA, extra="lm-eval")
def compute(checkpoint, cfg):
    tasks = {name: dict(spec or {}) for name, spec in (cfg.tasks or {}).items()}
    if not tasks:
        raise EditscaleError("metrics.lm_eval.tasks is empty: name harness tasks, e.g. {editscale_sst2: {limit: 100}}")
    model, tok = checkpoint.model()
    results, _, files = evaluate_harness(model, tok, tasks, cfg.num_fewshot, cfg.batch_size, cfg.data_dir, cfg.include_path,
                                         cfg.seed, cfg.online)
    log.info("lm_eval at k=%d: %s", checkpoint.k, {t: {m: round(v, 4) for m, v in r.items() if isinstance(v, float)} for t, r in results.items()})
    for task, path in files.items():
        checkpoint.uses(f"task:{task}", path)
    return harness_rows(checkpoint.k, results)
