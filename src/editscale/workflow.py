"""Planning helpers the Snakefile imports: which files a run needs, on which grid.

Kept here (not in the Snakefile) so that they are unit-testable and the rules stay thin.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from .io import EditscaleError
from .models.fetch import TINY_ARCHS
from .models.registry import arch_spec

EMBEDDED_ARCH = {"smollm2-135m-instruct": "llama"}
METRICS_PER_CHECKPOINT = ("history", "downstream", "generation", "perplexity", "weights")
NEEDS_STATS = {"rome": True, "r-rome": True, "emmet": True, "memit": True, "alphaedit": True, "ft-c": False}


def model_arch(config: dict, model: str) -> str:
    """model_type of a configured model, known before the model is fetched (the DAG needs the
    edited module names at planning time)."""
    if model not in config["models"]:
        raise EditscaleError(f"run refers to model {model!r}, which is not under `models:` ({sorted(config['models'])})")
    spec = config["models"][model]
    if spec.get("arch"):
        return spec["arch"]
    kind, _, ref = spec["source"].partition(":")
    if kind == "embedded" and ref in EMBEDDED_ARCH:
        return EMBEDDED_ARCH[ref]
    if kind == "tiny" and ref in TINY_ARCHS:
        return ref
    if kind == "local" and (Path(ref).expanduser() / "config.json").exists():
        return json.loads((Path(ref).expanduser() / "config.json").read_text())["model_type"]
    raise EditscaleError(f"models.{model}.arch is required for source {spec['source']!r} (e.g. gpt2, gptj, gpt_neox, llama)")


def read_hparams(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise EditscaleError(f"hparams file {path} not found")
    return yaml.safe_load(p.read_text()) or {}


def run_hparams(run: dict) -> dict:
    return {**read_hparams(run["hparams"]), **(run.get("hparams_overrides") or {})}


def edited_modules(config: dict, run: dict) -> list[str]:
    hp = run_hparams(run)
    if "layers" not in hp:
        raise EditscaleError(f"hparams file {run['hparams']} has no `layers`")
    template = arch_spec(model_arch(config, run["model"])).mlp_out
    return [template.format(layer) for layer in hp["layers"]]


def template_sampling(run: dict) -> str:
    """How the run's context templates are sampled (the method's reference rule and the format
    version): a param of the context_templates rule, so a change re-samples them."""
    from .edit.common import TEMPLATE_FORMAT
    from .edit.methods import get_method

    return f"{get_method(run['method']).template_rule}-v{TEMPLATE_FORMAT}"


def stats_modules(config: dict, run: dict) -> list[str]:
    return edited_modules(config, run) if NEEDS_STATS[run["method"]] else []


def segment_ends(run: dict) -> list[int]:
    n, seg, per = run["n_edits"], run["segment"], run["edits_per_step"]
    if n % seg:
        raise EditscaleError(f"run {run['name']}: n_edits {n} must be a multiple of segment {seg}")
    if seg % per:
        raise EditscaleError(f"run {run['name']}: segment {seg} must be a multiple of edits_per_step {per}")
    return list(range(seg, n + 1, seg))


def eval_grid(n_edits: int, every: int) -> list[int]:
    """Checkpoints 0, every, 2*every, ..., always including 0 and n_edits."""
    return sorted(set(range(0, n_edits + 1, every)) | {0, n_edits})


def segment_end_for(k: int, segment: int) -> int:
    """The segment whose factors hold the state after edit k (k itself on a boundary)."""
    return -(-k // segment) * segment


def run_by_name(config: dict, name: str) -> dict:
    for run in config["runs"]:
        if run["name"] == name:
            return run
    raise EditscaleError(f"no run named {name!r} in config (runs: {[r['name'] for r in config['runs']]})")


def check_config(config: dict) -> None:
    """Cross-references the JSON schema cannot express; one clear error per problem."""
    names = [r["name"] for r in config["runs"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise EditscaleError(f"runs: duplicate run names {sorted(dup)}")
    for run in config["runs"]:
        for key, section in (("model", "models"), ("dataset", "datasets"), ("corpus", "corpora")):
            if run[key] not in config[section]:
                raise EditscaleError(f"runs[{run['name']}].{key} = {run[key]!r} is not defined under `{section}:` ({sorted(config[section])})")
        segment_ends(run)
        edited_modules(config, run)


# ---------------------------------------------------------------------------------------------
# Copies of the workflow and dry-run plans (tests and benchmarks run snakemake on a copy)

WORKFLOW_FILES = ["Snakefile", "config.yaml", "config", "rules", "envs", "profiles", "report"]


def copy_workflow(repo: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    return dest


def planned_jobs(res) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    text = res.stdout + res.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[-1]
    jobs = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        jobs[m.group(1)] = int(m.group(2))
    jobs.pop("total", None)
    return jobs
