"""Planning helpers the Snakefile imports: which files a run needs, on which grid.

Kept here (not in the Snakefile) so that they are unit-testable and the rules stay thin.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import yaml

from .io import EditscaleError
from .models.fetch import TINY_ARCHS, TINY_LAYERS
from .models.registry import arch_spec

EMBEDDED_ARCH = {"smollm2-135m-instruct": "llama"}
EMBEDDED_LAYERS = {"smollm2-135m-instruct": 30}
METRICS_PER_CHECKPOINT = ("history", "downstream", "generation", "perplexity", "weights")
NEEDS_STATS = {"rome": True, "r-rome": True, "emmet": True, "memit": True, "alphaedit": True, "ft-c": False}


def workflow_root(configfile: str | Path) -> Path:
    """The workflow directory a config belongs to (the nearest ancestor with a Snakefile), else the
    current directory: relative paths in a config (hparams files) are relative to it."""
    for parent in Path(configfile).resolve().parents:
        if (parent / "Snakefile").exists():
            return parent
    return Path.cwd()


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


def canonical(obj):
    """`obj` with mapping keys sorted and integral floats as ints (15000.0 -> 15000), recursively:
    two configs that differ only in key order or number spelling give the same value."""
    if isinstance(obj, dict):
        return {str(k): canonical(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    return obj


def canonical_json(obj) -> str:
    """The one serialization of rule params: only a change of value changes it."""
    return json.dumps(canonical(obj), sort_keys=True)


def read_hparams(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise EditscaleError(f"hparams file {path} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise EditscaleError(f"hparams file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EditscaleError(f"hparams file {path} must hold a mapping of names to values")
    return data


@functools.lru_cache(maxsize=None)
def _resolved_hparams(method: str, path: str, overrides_json: str, run_name: str, layers_in_model: int | None) -> str:
    from .edit.methods import get_method

    cls = get_method(method)
    overrides = json.loads(overrides_json)
    data = read_hparams(path)
    source = f"hparams file {path} (runs[{run_name}].hparams, method {method})"
    # an override is checked on its own first, so that its error names hparams_overrides, not the file
    cls.validate_hparams_partial(overrides, f"runs[{run_name}].hparams_overrides")
    hp = {**cls.default_hparams, **data, **overrides}
    if overrides:
        source += f" with runs[{run_name}].hparams_overrides {sorted(overrides)}"
    cls.validate_hparams(hp, source)
    if layers_in_model is not None:
        cls.check_for_model(hp, layers_in_model, source)
    return json.dumps(canonical({**hp, **cls.forced_hparams}))


def run_hparams(run: dict, layers_in_model: int | None = None) -> dict:
    """The run's resolved hyper-parameters: method defaults, the file, `hparams_overrides` and what
    the method forces, validated (unknown / missing keys, types, allowed values, layer range when
    the model's layer count is known). This, not the file's text, decides re-running."""
    overrides = run.get("hparams_overrides") or {}
    return json.loads(_resolved_hparams(run["method"], run["hparams"], json.dumps(overrides, sort_keys=True), run["name"], layers_in_model))


def model_layers(config: dict, model: str, model_dir: str | Path | None = None) -> int | None:
    """Layer count of a configured model before any job runs: its config.json where it is already
    on disk (fetched, or a local: source), the tiny and embedded models' known shapes; None for an
    hf: model not yet downloaded (the run_config job checks it once the model is there)."""
    spec = config["models"][model]
    kind, _, ref = spec["source"].partition(":")
    candidates = [Path(model_dir or f"data/models/{model}") / "config.json"]
    if kind == "local":
        candidates.append(Path(ref).expanduser() / "config.json")
    for path in candidates:
        if path.exists():
            return config_json_layers(path)
    if kind == "tiny":
        return TINY_LAYERS
    if kind == "embedded":
        return EMBEDDED_LAYERS.get(ref)
    return None


def config_json_layers(path: str | Path) -> int:
    cfg = json.loads(Path(path).read_text())
    attr = arch_spec(cfg["model_type"]).n_layers_attr
    return int(cfg[attr])


def edited_modules(config: dict, run: dict) -> list[str]:
    hp = run_hparams(run, model_layers(config, run["model"]))
    template = arch_spec(model_arch(config, run["model"])).mlp_out
    return [template.format(layer) for layer in hp["layers"]]


def run_record(config: dict, run: dict) -> dict:
    """What results/{run}/run.json holds (the run_config rule's param, canonical): the run entry
    without n_edits (raising it must not re-run finished segments), the model dtype, the hparams
    file's path and the resolved hparams (so that editing the file re-runs the run)."""
    record = {k: v for k, v in run.items() if k not in ("n_edits", "hparams")}
    record.update(hparams_file=run["hparams"], hparams=run_hparams(run, model_layers(config, run["model"])),
                  dtype=config["models"][run["model"]]["dtype"])
    return canonical(record)


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
    if int(every) < 1:
        raise EditscaleError(f"eval_every must be >= 1, got {every}")
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
