"""Planning helpers the Snakefile imports: which files a run needs, on which grid.

Kept here (not in the Snakefile) so that they are unit-testable and the rules stay thin.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path


from . import layout
from .io import EditscaleError
from .models.fetch import TINY_FAMILIES, TINY_LAYERS
from .models.registry import KNOWN_CONFIGS, arch_spec, config_json_layers



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
    if spec["source"] in KNOWN_CONFIGS:  # the embedded models and the published hf: configs
        return KNOWN_CONFIGS[spec["source"]][0]
    if kind == "tiny":
        if ref not in TINY_FAMILIES:
            raise EditscaleError(f"models.{model}.source = {spec['source']!r}: {ref!r} is not a tiny architecture ({', '.join(TINY_FAMILIES)})")
        return ref
    if kind == "embedded":
        known = sorted(s for s in KNOWN_CONFIGS if s.startswith("embedded:"))
        raise EditscaleError(f"models.{model}.source = {spec['source']!r}: no embedded model {ref!r} ({', '.join(known)})")
    if kind == "local":
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise EditscaleError(f"models.{model}.source = {spec['source']!r}: directory {path} does not exist")
        if not (path / "config.json").exists():
            raise EditscaleError(f"models.{model}.source = {spec['source']!r}: {path} has no config.json (not a Hugging Face model directory)")
        return json.loads((path / "config.json").read_text())["model_type"]
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


@functools.lru_cache(maxsize=None)
def _resolved_hparams(method: str, path: str, overrides_json: str, run_name: str, layers_in_model: int | None) -> str:
    from .edit.hparams import read_file
    from .edit.methods import get_method

    overrides = json.loads(overrides_json)
    data = read_file(path)
    cls = get_method(method, {**data, **overrides})
    source = f"hparams file {path} (runs[{run_name}].hparams, method {method})"
    # an override is checked on its own first, so that its error names hparams_overrides, not the file
    cls.validate_hparams_partial(overrides, f"runs[{run_name}].hparams_overrides")
    hp = {**cls.default_hparams, **data, **overrides}
    if overrides:
        source += f" with runs[{run_name}].hparams_overrides {sorted(overrides)}"
    typed = cls.resolve_hparams(hp, source, layers_in_model)  # the method's dataclass, built at plan time
    return json.dumps(canonical({**dataclasses.asdict(typed), **cls.forced_hparams}))


def run_hparams(run: dict, layers_in_model: int | None = None) -> dict:
    """The run's resolved hyper-parameters: method defaults, the file, `hparams_overrides` and what
    the method forces, validated (unknown / missing keys, types, allowed values, layer range when
    the model's layer count is known). This, not the file's text, decides re-running."""
    overrides = run.get("hparams_overrides") or {}
    return json.loads(_resolved_hparams(run["method"], run["hparams"], json.dumps(overrides, sort_keys=True), run["name"], layers_in_model))


def model_layers(config: dict, model: str, model_dir: str | Path | None = None) -> int | None:
    """Layer count of a configured model before any job runs: its config.json where it is already
    on disk (fetched, or a local: source), the tiny models' and the published configs' known shapes
    (editscale.models.registry.KNOWN_CONFIGS); None for another hf: model not yet downloaded (the
    run_config job checks it once the model is there)."""
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
    if spec["source"] in KNOWN_CONFIGS:  # embedded models and the published hf: configs
        model_type, fields = KNOWN_CONFIGS[spec["source"]]
        return int(fields[arch_spec(model_type).n_layers_attr])
    return None


def edited_modules(config: dict, run: dict) -> list[str]:
    """The run's edited modules before any model is loaded: the method's `modules`, given the
    model's architecture name (the registry's names need nothing else)."""
    from .edit.methods import get_method

    hp = run_hparams(run, model_layers(config, run["model"]))
    return get_method(run["method"], hp).modules(model_arch(config, run["model"]), hp)


def memory_modules(config: dict, run: dict) -> list[str]:
    """The modules the run's method hooks a memory into ([] for a method that keeps none)."""
    from .edit.methods import get_method

    hp = run_hparams(run, model_layers(config, run["model"]))
    cls = get_method(run["method"], hp)
    return cls.memory_modules(model_arch(config, run["model"]), hp) if cls.memory_type is not None else []


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
    from .edit.templating import TEMPLATE_FORMAT
    from .edit.methods import get_method

    return f"{get_method(run['method'], run_hparams(run)).template_rule}-v{TEMPLATE_FORMAT}"


def precomputed(config: dict, run: dict) -> dict[str, dict]:
    """What the run's method needs from the stats stage (`EditMethod.precomputed`)."""
    from .edit.methods import get_method

    hp = run_hparams(run, model_layers(config, run["model"]))
    return get_method(run["method"], hp).precomputed(hp)


def stats_modules(config: dict, run: dict) -> list[str]:
    """Edited modules whose second moment the edit jobs read."""
    return edited_modules(config, run) if "mom2" in precomputed(config, run) else []


def stats_files(config: dict, run: dict) -> dict[str, str]:
    """module -> the second-moment file an edit job of the run reads."""
    return {m: str(layout.stats_path(run["model"], run["corpus"], m)) for m in stats_modules(config, run)}


def projection_files(config: dict, run: dict) -> dict[str, str]:
    """module -> the null-space projection file an edit job reads, for methods that declare one."""
    spec = precomputed(config, run).get("nullspace")
    if spec is None:
        return {}
    return {m: str(layout.projection_path(run["model"], run["corpus"], m, spec["threshold"], spec.get("rule", "eigh64")))
            for m in edited_modules(config, run)}


def precomputed_files(config: dict, run: dict) -> dict[str, dict[str, str]]:
    """kind -> module -> the file an edit job of the run reads, for each kind the method declares."""
    files = {"mom2": stats_files(config, run), "nullspace": projection_files(config, run)}
    return {kind: paths for kind, paths in files.items() if paths}


def precomputed_flags(config: dict, run: dict) -> str:
    """The edit job's --precomputed arguments (KIND:MODULE=PATH)."""
    return " ".join(f"{kind}:{m}={p}" for kind, paths in precomputed_files(config, run).items() for m, p in paths.items())


def segment_ends(run: dict) -> list[int]:
    n, seg, per = run["n_edits"], run["segment"], run["edits_per_step"]
    if n % seg:
        raise EditscaleError(f"run {run['name']}: n_edits {n} must be a multiple of segment {seg}")
    if seg % per:
        raise EditscaleError(f"run {run['name']}: segment {seg} must be a multiple of edits_per_step {per}")
    return list(range(seg, n + 1, seg))


def eval_grid(n_edits: int, every) -> list[int]:
    """The checkpoints of a metric's grid `every` (schema.yaml's $defs.eval_grid) up to n_edits,
    always with 0 and n_edits: an int N (0, N, 2N, ...), {per_decade: D, start: S} (log-spaced)
    or a list. Each form is a fixed set of points cut at n_edits, so a longer run only adds points."""
    if isinstance(every, bool) or not isinstance(every, (int, dict, list, tuple)):
        raise EditscaleError(f"eval_every must be an integer, {{per_decade: D, start: S}} or a list of checkpoints, got {every!r}")
    if isinstance(every, dict):
        points = log_grid(n_edits, int(every["per_decade"]), int(every.get("start", 1)))
    elif isinstance(every, (list, tuple)):
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in every):
            raise EditscaleError(f"eval_every: a list of checkpoints must hold integers >= 0, got {list(every)}")
        points = [k for k in every if k <= n_edits]
    else:
        if every < 1:
            raise EditscaleError(f"eval_every must be >= 1, got {every}")
        points = range(0, n_edits + 1, every)
    return sorted(set(points) | {0, n_edits})


def log_grid(n_edits: int, per_decade: int, start: int = 1) -> list[int]:
    """start <= k <= n_edits at `per_decade` points per decade: mantissas 10^(i / per_decade)
    rounded to 1 significant digit (per_decade <= 3: 1, 2, 5 for 3) or 2 (finer), times powers
    of ten, rounded to integers; the same points whatever n_edits is."""
    if per_decade < 1 or start < 1:
        raise EditscaleError(f"eval_every: per_decade and start must be >= 1, got {per_decade}, {start}")
    digits = 1 if per_decade <= 3 else 2
    mantissas = sorted({float(f"{10 ** (i / per_decade):.{digits}g}") for i in range(per_decade)})
    points, decade = set(), 1
    while decade <= max(n_edits, 1):
        points |= {round(m * decade) for m in mantissas}
        decade *= 10
    return sorted(k for k in points if start <= k <= n_edits)


def segment_end_for(k: int, segment: int) -> int:
    """The segment whose factors hold the state after edit k (k itself on a boundary)."""
    return -(-k // segment) * segment


# ---------------------------------------------------------------------------------------------
# Resources and plugins (the Snakefile's)


def model_mem_mb(config: dict, model: str) -> int:
    """Job memory from the model size: the weights in the configured dtype (once, in MB), plus
    half again for activations, optimizer state of v* and the fp32 copies of edited matrices."""
    spec = config["models"][model]
    bytes_per = 4 if spec["dtype"] == "float32" else 2
    return int(2000 + 1.5 * spec["params_m"] * bytes_per)


def gpu_resources(config: dict) -> dict:
    return {"slurm_extra": "'--gres=gpu:1'", "gpu": 1} if config["resources"]["gpu"] else {}


def export_job_environment(config: dict) -> None:
    """What every job reads from the environment it inherits from the Snakemake process (which
    parses the Snakefile, on a cluster node too), not from rule params, because a param re-plans
    every job of its rule when it changes while these change no result: the config's plugins
    (EDITSCALE_PLUGINS, imported by editscale.cli), each run's n_edits for the sequence job
    (EDITSCALE_REQUIRED_EDITS: raising n_edits must not rebuild the sequence), and the device
    (EDITSCALE_DEVICE, io.job_device: "auto" and the "cpu" it resolves to are one device); and
    EDITSCALE_WORKFLOW_JOB, which makes a job die with the shell it runs in (cli.die_with_wrapper)."""
    import os

    from .io import DEVICE_ENV, JOB_ENV

    os.environ.update(EDITSCALE_PLUGINS=",".join(config["plugins"]), **{JOB_ENV: "1"},
                      EDITSCALE_REQUIRED_EDITS=canonical_json({r["name"]: r["n_edits"] for r in config["runs"]}),
                      **{DEVICE_ENV: config["resources"]["device"]})


CONDA_TEMPLATE = "envs/editscale.yaml"  # `conda env create -f` it from a checkout as it is (`-e ../`: the checkout)


def conda_env(config: dict, workflow_dir: str | Path) -> str:
    """envs/editscale.yaml for `snakemake --use-conda`: editscale installed from the workflow's own
    directory (an absolute path: Snakemake copies the file under .snakemake/conda/, where the
    template's `-e ../` would name the wrong directory), with the pip extras the config's metrics
    need (their registry entry's `extra`, e.g. lm-eval for plugin editscale.evaluate.harness)."""
    workflow_dir = Path(workflow_dir).resolve()
    registry = metrics_registry()
    extras = sorted({registry[m].extra for m in config["metrics"] if m in registry and registry[m].extra})
    target = f"- -e {workflow_dir}" + (f"[{','.join(extras)}]" if extras else "")
    lines = (workflow_dir / CONDA_TEMPLATE).read_text(encoding="utf-8").splitlines()
    editable = [i for i, line in enumerate(lines) if line.strip().startswith("- -e ")]
    if len(editable) != 1:
        raise EditscaleError(f"{workflow_dir / CONDA_TEMPLATE}: expected one `- -e ../` line (editscale itself), found {len(editable)}")
    i = editable[0]
    lines[i] = lines[i][: len(lines[i]) - len(lines[i].lstrip())] + target
    return "\n".join(["# Rendered from envs/editscale.yaml by the Snakefile (editscale.workflow.conda_env); do not edit.", *lines]) + "\n"


def write_conda_env(config: dict, workflow_dir: str | Path, out: str | Path = ".snakemake/editscale/conda-env.yaml") -> Path:
    """The rendered environment file (`conda_env`), rewritten only when its text changes (Snakemake
    keys an environment by the file's content); its absolute path, the rules' `conda:`."""
    from .io import write_text_atomic

    out = Path(out).resolve()
    text = conda_env(config, workflow_dir)
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        write_text_atomic(out, text)
    return out


def check_sequence_lengths(config: dict) -> None:
    """Each run's n_edits fits its usable edit sequence, and each metric reads its cases (a
    metric's `check_cases`: e.g. answers' question contexts need a question for every edit),
    checked at plan time wherever the sequence can be known: from results/{run}/edits.jsonl once
    built (a raised n_edits), else from the built dataset, else from a local dataset source read
    here. A sequence that depends on a download not made yet is checked by its jobs."""
    from .data.readers import load_cases
    from .data.sequence import read_order, check_length, usable_cases
    from .io import read_jsonl
    from .registry import resolve

    registry = metrics_registry()
    case_checks = [(name, resolve(registry[name].check_cases, f"metric {name}'s check_cases"))
                   for name in config["metrics"] if name in registry and registry[name].check_cases]
    built: dict[str, list[dict]] = {}
    for run in config["runs"]:
        what = f"runs[{run['name']}]"
        seq = layout.run_dir(run["name"]) / "edits.jsonl"
        if seq.exists():
            if not case_checks:  # counting the lines is enough
                with open(seq) as fh:
                    n = sum(1 for line in fh if line.strip())
                check_length(run["n_edits"], n, f"{seq} holds {n} edits", what)
                continue
            chain = read_jsonl(seq)
            check_length(run["n_edits"], len(chain), f"{seq} holds {len(chain)} edits", what)
        else:
            name = run["dataset"]
            spec = config["datasets"][name]
            if name not in built:
                path = Path(f"data/datasets/{name}.jsonl")
                if path.exists():
                    built[name] = read_jsonl(path)
                elif not spec.get("url"):
                    built[name] = load_cases(dataset_spec(config, name))
                else:
                    continue
            order = order_file(config, run)
            if order is not None and not Path(order).exists():
                continue  # the sequence rule reports a missing order file
            ids = read_order(order, str(run["sample"])) if order else None
            chain, why = usable_cases(built[name], run["sample"], run["seed"], ids, f"dataset {name}")
            check_length(run["n_edits"], len(chain), why, what)
        for name, check in case_checks:
            check(config["metrics"][name], run, chain[: run["n_edits"]])


# ---------------------------------------------------------------------------------------------
# Downloads and datasets


def download_path(config: dict, name: str) -> str:
    """data/downloads/{file} a dataset with a `url` reads: its `path` (which must lie there) or the
    URL's file name."""
    import os

    from .data.download import DOWNLOAD_DIR

    spec = config["datasets"][name]
    path = spec.get("path") or f"{DOWNLOAD_DIR}/{spec['url'].rstrip('/').rsplit('/', 1)[-1]}"
    if not isinstance(path, str) or os.path.dirname(os.path.normpath(path)) != DOWNLOAD_DIR:
        raise EditscaleError(
            f"datasets.{name} has a url, so its path must be a file directly under {DOWNLOAD_DIR}/ "
            f"(where the download rule writes it) or empty, got {path!r}"
        )
    return os.path.normpath(path)


def downloads(config: dict) -> dict[str, tuple[str, str | None]]:
    """file name under data/downloads -> (url, sha256 or None): every dataset url, and the
    well-known files (editscale.data.download.KNOWN_FILES) a config refers to by path."""
    import os

    from .data.download import DOWNLOAD_DIR, KNOWN_FILES

    out = {name: tuple(v) for name, v in KNOWN_FILES.items()}
    claimed: dict[str, tuple[str, str]] = {}
    for name, spec in config["datasets"].items():
        if spec.get("url"):
            file = os.path.basename(download_path(config, name))
            if file in claimed and claimed[file][1] != spec["url"]:
                raise EditscaleError(
                    f"datasets.{claimed[file][0]} and datasets.{name} download different URLs "
                    f"to the same file {DOWNLOAD_DIR}/{file}; give one of them another `path`"
                )
            claimed[file] = (name, spec["url"])
            known = KNOWN_FILES.get(file)
            out[file] = (spec["url"], known[1] if known and known[0] == spec["url"] else None)
    return out


def alternatives(names) -> str:
    """A wildcard constraint matching exactly these names (none: matching nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def dataset_spec(config: dict, name: str) -> dict:
    spec = dict(config["datasets"][name])
    if spec.get("url"):
        spec["path"] = download_path(config, name)
    return spec


def dataset_inputs(config: dict, name: str) -> list[str]:
    return [download_path(config, name)] if config["datasets"][name].get("url") else []


def order_file(config: dict, run: dict) -> str | None:
    return config["datasets"][run["dataset"]]["order_file"]


# ---------------------------------------------------------------------------------------------
# Results layout and the inputs of each job (the rules import these; one place names the files)


def delta_file(run_name: str, k: int) -> str:
    return str(layout.delta_path(layout.run_dir(run_name), k))


def factors_file(run_name: str, k: int) -> str:
    return str(layout.factors_path(layout.run_dir(run_name), k))


def metric_file(run_name: str, metric: str, k: int) -> str:
    return str(layout.metric_path(layout.run_dir(run_name), metric, k))


def metrics_registry() -> dict:
    """name -> Metric of every registered metric (built-ins and plugins)."""
    from .evaluate.registry import METRICS

    return dict(METRICS)


def report_figures() -> list[str]:
    """The report's figure stems: each registered metric's figures, then the overview."""
    from .evaluate.registry import figure_stems

    return figure_stems()


def state_files(run: dict, k: int) -> list[str]:
    """Files that define the model after k edits: the checkpoint's delta, or the previous
    checkpoint plus the factors of k's segment (replayed)."""
    files = [f"data/models/{run['model']}/manifest.json", f"results/{run['name']}/run.json"]
    if k == 0:
        return files
    seg = run["segment"]
    if k % seg == 0:
        return files + [delta_file(run["name"], k)]
    end = segment_end_for(k, seg)
    start = [delta_file(run["name"], end - seg)] if end > seg else []
    return files + start + [factors_file(run["name"], end)]


def metric_grid(config: dict, run: dict, metric: str) -> list[int]:
    """Checkpoints at which `metric` is evaluated for the run."""
    from .evaluate.registry import get_metric

    if get_metric(metric).grid == "segments":
        return segment_ends(run)
    return eval_grid(run["n_edits"], config["metrics"][metric]["eval_every"])


def checkpoint_metrics() -> list[str]:
    """The metrics evaluated by the checkpoint jobs (`editscale evaluate`): every metric on an
    eval_every grid; edit_scores (grid "segments") keeps its own job per segment."""
    from .evaluate.registry import get_metric

    return [m for m in metrics_registry() if get_metric(m).grid == "eval_every"]


def eval_groups(config: dict, run: dict) -> list[tuple[tuple[str, ...], list[int]]]:
    """The run's checkpoint jobs, grouped by the set of metrics due at a checkpoint: (metrics,
    checkpoints) for each set, so that one rule per set makes one job per checkpoint."""
    by_k: dict[int, list[str]] = {}
    for metric in checkpoint_metrics():
        for k in metric_grid(config, run, metric):
            by_k.setdefault(k, []).append(metric)
    groups: dict[tuple[str, ...], list[int]] = {}
    for k in sorted(by_k):
        groups.setdefault(tuple(by_k[k]), []).append(k)
    return sorted(groups.items(), key=lambda g: g[1][0])


def eval_group_rule(run: dict, metrics: tuple[str, ...]) -> str:
    """The rule name of a run's checkpoint jobs that evaluate `metrics`."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", run["name"]).strip("_")
    return f"evaluate__{slug}__{'_'.join(metrics)}"


def eval_group_inputs(config: dict, run: dict, metrics: tuple[str, ...], k: int) -> dict[str, list[str]]:
    """The named inputs of a checkpoint job: per input kind, the files of every metric that
    declares it (the same files for all of them, at one run and checkpoint)."""
    out: dict[str, list[str]] = {}
    for metric in metrics:
        for kind, files in metric_inputs(config, run, metric, k).items():
            out.setdefault(kind, [])
            out[kind] += [f for f in files if f not in out[kind]]
    return out


def eval_group_flags(inputs) -> str:
    """The `editscale evaluate` flags that hand a checkpoint job its declared inputs by kind."""
    from .evaluate.registry import INPUT_KINDS

    return input_flags([kind for kind in INPUT_KINDS if hasattr(inputs, kind)], inputs)


def input_flags(kinds, inputs) -> str:
    """`--flag FILE ...` for each input kind of `kinds` that has files (registry.INPUT_KINDS)."""
    from .evaluate.registry import INPUT_KINDS

    return " ".join(f"{INPUT_KINDS[kind]} " + " ".join(getattr(inputs, kind)) for kind in kinds if getattr(inputs, kind))


def metric_params_json(config: dict, metric: str) -> str:
    """The params of a metric's jobs: its config section without eval_every, since the grid says
    which checkpoints exist, not what a checkpoint computes (a new grid plans only new points)."""
    return canonical_json({k: v for k, v in config["metrics"][metric].items() if k != "eval_every"})


def metric_config_file(config: dict, metric: str) -> str:
    """The checkpoint jobs' input that holds the metric's section (layout.metric_config_path)."""
    return str(layout.metric_config_path(metric, json.loads(metric_params_json(config, metric))))


def metric_files(config: dict, run: dict, metric: str) -> list[str]:
    return [metric_file(run["name"], metric, k) for k in metric_grid(config, run, metric)]


def previous_segment(run: dict, k: int) -> list[str]:
    """The chain's state before the segment ending at k (nothing for the first segment)."""
    k_prev = k - run["segment"]
    return [] if k_prev <= 0 else [delta_file(run["name"], k_prev), factors_file(run["name"], k_prev)]


def all_metric_files(config: dict) -> list[str]:
    return [f for run in config["runs"] for m in metrics_registry() for f in metric_files(config, run, m)]


def all_segment_files(config: dict, kind: str) -> list[str]:
    """Every delta ("deltas") or factors ("factors") file of every run."""
    name = {"deltas": delta_file, "factors": factors_file}[kind]
    return [name(run["name"], k) for run in config["runs"] for k in segment_ends(run)]


def runs_meta(config: dict) -> str:
    """The run descriptions the report reads (its param)."""
    keys = ("name", "model", "method", "hparams", "dataset", "sample", "n_edits", "segment")
    return canonical_json([{k: run[k] for k in keys} for run in config["runs"]])


def metric_inputs(config: dict, run: dict, metric: str, k: int) -> dict[str, list[str]]:
    """The named inputs of the job evaluating `metric` at checkpoint k (what the metric declares)."""
    from .evaluate.registry import get_metric

    files = {
        "state": lambda: state_files(run, k),
        "edits": lambda: [f"results/{run['name']}/edits.jsonl"],
        "heldout": lambda: [f"data/corpora/{run['model']}/{run['corpus']}/heldout.npy"],
        "factors_upto": lambda: [factors_file(run["name"], e) for e in segment_ends(run) if e <= segment_end_for(k, run["segment"])],
        "segment_factors": lambda: ([delta_file(run["name"], k - run["segment"])] if k > run["segment"] else []) + [factors_file(run["name"], k)],
        "data": lambda: [path for _, path, _ in metric_data_files(config, metric)],
    }
    return {kind: files[kind]() for kind in get_metric(metric).inputs}


def metric_data_files(config: dict, metric: str) -> list[tuple[str, str, str]]:
    """(config key, path, how to get it) of each data file metric's config section names (its
    registry entry's `data_files`; input `data`)."""
    from .evaluate.registry import get_metric
    from .registry import resolve

    entry = get_metric(metric)
    if entry.data_files is None or metric not in config["metrics"]:
        return []
    return [(f"metrics.{metric}.{key}", path, how) for key, path, how in resolve(entry.data_files)(config["metrics"][metric])]


def check_data_files(config: dict) -> None:
    """Every data file a metric's config names exists (no rule makes them): one error listing each
    missing file with its config key and how to get it, at `snakemake -n`, not inside a job."""
    from .io import Problems

    problems = Problems()
    for metric in config["metrics"]:
        if metric not in metrics_registry():
            continue
        for key, path, how in metric_data_files(config, metric):
            if not Path(path).is_file():
                problems.messages.append(f"{key} = {path}: no such file, and no rule makes it; {how}")
    problems.raise_all()


def metric_flags(run: dict, metric: str, inputs) -> str:
    """Command-line flags that hand a metric job exactly its declared inputs."""
    from .evaluate.registry import get_metric

    return input_flags(get_metric(metric).inputs, inputs)


def study_path(config: dict, *parts: str) -> str:
    """A file of the config's study (layout.study_dir): its tables, plots, audit, report."""
    return str(layout.study_dir(config["study"]).joinpath(*parts))


def study_benchmark(config: dict, job: str) -> str:
    """Snakemake's record of a study job (report, audit), beside every other job's record under
    results/benchmarks/ (editscale.calibration reads them there)."""
    return str(layout.RESULTS / "benchmarks" / "studies" / config["study"] / f"{job}.tsv")


def audit_files(config: dict) -> list[str]:
    """Every file the audit checks (its rule's inputs, so that a change to any re-runs it): the
    runs' model manifests, stats and projections, and per run its record, edit sequence,
    templates, every delta and factors file and every metric file."""
    files: set[str] = set()
    for run in config["runs"]:
        files.add(f"data/models/{run['model']}/manifest.json")
        files |= set(stats_files(config, run).values())
        for module, path in projection_files(config, run).items():
            files |= {path, str(layout.stats_path(run["model"], run["corpus"], module))}
        rd = layout.run_dir(run["name"])
        files |= {str(rd / "run.json"), str(rd / "edits.jsonl"), str(rd / "context_templates.json")}
        files |= {name(run["name"], k) for k in segment_ends(run) for name in (delta_file, factors_file)}
        files |= {f for m in metrics_registry() for f in metric_files(config, run, m)}
    return sorted(files)


def run_targets(config: dict, run: dict) -> list[str]:
    """The files that finish one run (its audited files; `snakemake $(editscale targets ...)` runs
    that run alone, e.g. one run per machine, merged later with `editscale merge`)."""
    one = {**config, "runs": [run]}
    return audit_files(one)


def stopped_run(config: dict, run: dict, until: int) -> dict:
    """The run as a chain stopped at edit `until` (`export-run --until`, `targets --until`): its
    n_edits cut to `until`, which must be a segment end below n_edits that every metric of the run
    evaluates. Then the stopped run's files are files of the whole run (a stopped grid adds its end
    as a checkpoint, which the evaluate rules make only where the whole run's grid has it)."""
    if isinstance(until, bool) or not isinstance(until, int) or not 0 < until < run["n_edits"] or until % run["segment"]:
        raise EditscaleError(f"--until {until}: must be a segment end (a multiple of {run['segment']}) below the run "
                             f"{run['name']}'s n_edits {run['n_edits']}")
    grids = {metric: metric_grid(config, run, metric) for metric in metrics_registry()}
    off = [metric for metric, grid in grids.items() if until not in grid]
    if off:
        everywhere = set.intersection(*map(set, grids.values())) - {0}
        below = [k for k in sorted(everywhere) if k < until]
        raise EditscaleError(f"--until {until}: run {run['name']} evaluates no checkpoint there for {', '.join(off)} (the "
                             f"{off[0]} grid has {max(k for k in grids[off[0]] if k < until)}, then "
                             f"{min(k for k in grids[off[0]] if k > until)}); stop where every metric evaluates"
                             + (f", e.g. at {below[-1]}" if below else ""))
    return {**run, "n_edits": until}


def record_file(run: str) -> str:
    """The run_record rule's output: the run's packed record (layout.record_path)."""
    return str(layout.record_path(run))


def single_configfile(configfiles: list) -> str:
    """The one config file `editscale export-run` reads in the run_record rule; it re-reads the
    config from that file, so a study given as several files (or with --config) cannot be recorded
    by the rule: export by hand."""
    if len(configfiles) != 1:
        raise EditscaleError(f"the run_record rule reads the study from one config file, not {len(configfiles)} "
                             f"({', '.join(map(str, configfiles))}): run `editscale export-run` by hand")
    return str(configfiles[0])


def run_by_name(config: dict, name: str) -> dict:
    for run in config["runs"]:
        if run["name"] == name:
            return run
    raise EditscaleError(f"no run named {name!r} in config (runs: {[r['name'] for r in config['runs']]})")


def check_config(config: dict) -> None:
    """Cross-references the JSON schema cannot express: every problem in one error (io.Problems),
    each naming its key."""
    from .data.readers import READERS, check_reader_options
    from .edit.methods import get_method
    from .evaluate.registry import curve_specs
    from .io import Problems

    problems = Problems()
    names = [r["name"] for r in config["runs"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        problems.messages.append(f"runs: duplicate run names {sorted(dup)}")
    for run in config["runs"]:
        with problems.check():
            try:
                get_method(run["method"])
            except EditscaleError as exc:
                raise EditscaleError(f"runs[{run['name']}].method: {exc}") from None
            missing = [f"runs[{run['name']}].{key} = {run[key]!r} is not defined under `{section}:` ({sorted(config[section])})"
                       for key, section in (("model", "models"), ("dataset", "datasets"), ("corpus", "corpora")) if run[key] not in config[section]]
            if missing:
                raise EditscaleError("; ".join(missing))
            segment_ends(run)
            edited_modules(config, run)
            cls = get_method(run["method"], run_hparams(run))
            if run["edits_per_step"] > 1 and not cls.batch_edits:
                raise EditscaleError(f"runs[{run['name']}].edits_per_step = {run['edits_per_step']}: method {run['method']!r} edits one "
                                     "case at a time (its update has no batch form); use edits_per_step: 1, or a method with "
                                     "batches (editscale methods: 'batches: yes')")
    for name, spec in config["datasets"].items():
        with problems.check():
            if spec["reader"] not in READERS:
                raise EditscaleError(f"datasets.{name}.reader = {spec['reader']!r} is not a known reader ({sorted(READERS)})")
            check_reader_options(spec, f"datasets.{name}")
    with problems.check():
        downloads(config)  # dataset urls and paths agree (one error naming the dataset)
    with problems.check():
        check_chat_template(config)
    phase_curves = sorted(spec.name for _, spec in curve_specs() if spec.phases)
    unknown = [c for c in config["report"]["decision_curves"] if c not in phase_curves]
    if unknown:
        problems.messages.append(f"report.decision_curves: {unknown} are not curves of the registered metrics (phase curves: {phase_curves})")
    problems.raise_all()


CHAT_CASE_METRICS = ("edit_scores", "history")  # the metrics that put an edit case's prompts to the model


def check_chat_template(config: dict, root: str | Path = ".") -> None:
    """`metrics.<edit_scores|history>.chat_template` frames a case's prompts as questions: every run
    must read a question-style dataset (its reader's `prompts`); and any metric's chat_template
    (or answers' context `chat`) needs each model's tokenizer to have a chat template, checked here once the model is prepared
    (else when the job loads it)."""
    from .data.readers import READERS

    metrics = config.get("metrics") or {}
    # chat_template: true, or a context of the chat template (answers' contexts: [chat])
    on = sorted(m for m, sec in metrics.items() if isinstance(sec, dict) and (sec.get("chat_template") or "chat" in (sec.get("contexts") or [])))
    if not on:
        return
    for m in (m for m in on if m in CHAT_CASE_METRICS):
        for run in config["runs"]:
            reader = config["datasets"][run["dataset"]]["reader"]
            if getattr(READERS[reader], "prompts", "cloze") != "question":
                raise EditscaleError(
                    f"metrics.{m}.chat_template is on, but run {run['name']}'s dataset {run['dataset']!r} (reader {reader!r}) "
                    "has cloze prompts, not questions; turn it off, or use a question dataset (zsre_mend)")
    for run in config["runs"]:
        prepared = Path(root) / "data" / "models" / run["model"]
        if (prepared / "tokenizer_config.json").exists() and not _has_chat_template(prepared):
            raise EditscaleError(f"metrics.{on[0]} asks through the chat template (chat_template: true or context 'chat'), but model "
                                 f"{run['model']!r} ({prepared}) has no chat template (a base model): turn it off for this config")


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").exists() or (model_dir / "chat_template.json").exists():
        return True
    return bool(json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))


def prepare(config: dict, source: str = "config", root: Path | None = None) -> dict:
    """A loaded config validated against the schema (defaults filled in, plugins imported) and
    cross-checked (`check_config`), in place: what the Snakefile and every verb
    that reads a config (through `load_config`) accept. `root`: the workflow directory relative
    hparams paths are resolved against when the caller runs elsewhere."""
    from .config import validate
    from .evaluate.registry import METRICS  # noqa: F401 - the registry whose plugin and entry-point metrics add schema sections

    validate(config, source)
    if not config.get("study"):
        config["study"] = layout.study_name(source.split(", ")[0])
    if root is not None:
        for run in config["runs"]:
            hp = Path(run["hparams"])
            if not hp.is_absolute() and not hp.exists() and (root / hp).exists():
                run["hparams"] = str(root / hp)
    check_config(config)
    return config


def load_config(configfile: str | Path) -> dict:
    """A config file, prepared (`prepare`); the runs' hparams paths resolved against the workflow
    directory the file belongs to."""
    import yaml

    path = Path(configfile)
    if not path.exists():
        raise EditscaleError(f"config file {path} not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EditscaleError(f"config file {path} is not valid YAML: {exc}") from exc
    return prepare(config, str(path), workflow_root(path))


def report_requested(argv: list[str]) -> bool:
    """Whether this snakemake invocation renders the report (`--report [FILE]`)."""
    return any(a == "--report" or a.startswith("--report=") for a in argv)


def check_report_ready(outputs: list[str], configfiles: str) -> None:
    """The report's files of this config exist; else one error naming them and the command."""
    missing = [f for f in outputs if not Path(f).exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EditscaleError(
            f"the report of {configfiles} needs its finished run, but {shown} do not exist. Run it first "
            f"(`snakemake --cores all --configfile={configfiles}`), and if the run used --configfile, pass the "
            f"same one to the report: `snakemake --report results/studies/<study>/report.html --configfile=FILE` (with `=`, so "
            f"that the words after it are not read as config files)")
