"""`editscale score-edits | history | downstream | generation | perplexity | weights | evaluate`.

Each metric verb evaluates one checkpoint k of a run and writes one long parquet table
(`results/{run}/metrics/{metric}/{k:06d}.parquet`: k, item, metric, value [, edit_index]) with
provenance metadata (config_hash = sha256 of the metric's params JSON, input hashes, device).
`--params-json` takes a JSON object, or @FILE / a path to a .json file holding one.

`evaluate` is the checkpoint job of the workflow: it runs the verbs of several metrics at one
checkpoint in one process, so that the model is loaded and replayed to k once for all of them
(the verbs share a model cache for the job's lifetime), and each metric still writes its own
file. Snakemake keeps those files (they are `update()` outputs of the job) and the job
recomputes only the metrics whose file is missing or stale: its recorded evaluation_key (the
hash of the metric's params and of the content of every input file it declares) differs from
the current one, or its values no longer hash to its recorded table_sha256. A job in which no
metric is stale was started for a reason the files do not show (a forced re-run, a touched
input, a grid change that moved the checkpoint to another rule): it keeps every file and says
so; EDITSCALE_RECOMPUTE=1 in the environment recomputes all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from pathlib import Path

from ..io import EditscaleError, provenance, read_jsonl, sha256_json, write_parquet_atomic
from .registry import INPUT_KINDS as INPUT_FLAGS  # input kind -> the flag of the metric verbs

log = logging.getLogger(__name__)

# (model_dir, delta, factors, k, dtype, device) -> (model, tokenizer) while an `evaluate` job runs:
# its metrics share one load and replay of the checkpoint (None: no cache, each verb loads)
_MODEL_CACHE: dict | None = None


def _common(p, segment: bool = False, edits: bool = True) -> None:
    p.add_argument("--model-dir", required=True, help="prepared model directory (data/models/{model})")
    p.add_argument("--state", nargs="+", required=True,
                   help="the files that define the model after k edits (the rule's inputs): the run's run.json, the "
                   "checkpoint delta at or before k, and the factors of k's segment when k is inside one")
    p.add_argument("--k", type=int, required=True, help="checkpoint: the model after k edits (0 = unedited)")
    if edits:
        p.add_argument("--edits", required=True, help="the run's edit sequence (results/{run}/edits.jsonl)")
    if segment:
        p.add_argument("--segment-files", nargs="+", required=True,
                       help="the segment ending at k: the delta it starts from (none for the first) and its factors")
    p.add_argument("--out", required=True, help="output parquet")
    p.add_argument("--params-json", default="{}", help="the metric's config section as JSON (or @file.json)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the run's, else float32)")
    p.add_argument("--device", default="auto")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="several metrics at one checkpoint k in one process (the workflow's checkpoint job)")
    p.add_argument("--model-dir", required=True, help="prepared model directory (data/models/{model})")
    p.add_argument("--k", type=int, required=True, help="checkpoint: the model after k edits (0 = unedited)")
    p.add_argument("--metric", nargs="+", required=True, metavar="NAME=OUT", help="each metric to evaluate and the parquet file it writes")
    p.add_argument("--configs", nargs="+", required=True, help="each metric's config section, results/config/metrics/{name}.json (`metric-config`)")
    p.add_argument("--device", default="auto")
    for kind, flag in INPUT_FLAGS.items():
        p.add_argument(flag, nargs="*", default=[], help=f"the checkpoint's `{kind}` input files (editscale.evaluate.registry); each metric gets those it declares")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("metric-config", help="validate one metric's config section and write it as canonical JSON (the checkpoint jobs' input)")
    p.add_argument("--metric", required=True)
    p.add_argument("--params-json", required=True, help="the section (without eval_every, which decides only which checkpoints exist)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_metric_config)

    p = sub.add_parser("score-edits", help="efficacy / paraphrase / neighborhood scores of each edit of a segment, right after it")
    _common(p, segment=True)
    p.set_defaults(func=cmd_score_edits)

    p = sub.add_parser("history", help="re-score every edit made so far on the model after k edits")
    _common(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("downstream", help="few-shot downstream tasks and offline probes at checkpoint k")
    _common(p)
    p.add_argument("--n-edits", type=int, default=None,
                   help="the run's n_edits: probes leave out the subjects of edits 1..n_edits (default: every edit of the sequence)")
    p.set_defaults(func=cmd_downstream)

    p = sub.add_parser("generation", help="n-gram entropy of sampled continuations at checkpoint k")
    _common(p)
    p.set_defaults(func=cmd_generation)

    p = sub.add_parser("perplexity", help="perplexity on a held-out token sample at checkpoint k")
    _common(p, edits=False)
    p.add_argument("--tokens", required=True, help=".npy of int64 token ids [n_seq, seq_len]")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("weights", help="drift of the edited matrices and per-edit update-norm outliers at checkpoint k")
    _common(p, edits=False)
    p.add_argument("--factors", nargs="*", default=[], help="factors files of the segments up to k (the rule's inputs): the per-edit log")
    p.set_defaults(func=cmd_weights)


# ---------------------------------------------------------------------------------------------
# helpers


def _section(args, metric: str):
    """(typed section, its dict) of metrics.<metric>: the schema's defaults updated with
    --params-json; the dict is what the output's provenance records: everything but eval_every,
    which the rule leaves out (a checkpoint's table does not depend on the grid around it)."""
    import dataclasses

    from ..config import section

    cfg = section(f"metrics.{metric}", parse_params(args.params_json))
    return cfg, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval_every"}


def parse_params(text: str | None) -> dict:
    if not text:
        return {}
    text = text.strip()
    if text.startswith("@") or (text.endswith(".json") and Path(text).exists()):
        path = Path(text.lstrip("@"))
        if not path.exists():
            raise EditscaleError(f"--params-json file {path} not found")
        text = path.read_text()
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--params-json is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise EditscaleError("--params-json must be a JSON object")
    return params


def _run_info(args) -> dict:
    """The run record: the run.json among --state."""
    hits = [Path(p) for p in args.state if Path(p).name == "run.json"]
    if len(hits) != 1:
        raise EditscaleError(f"--state must hold the run's run.json exactly once (got {args.state})")
    return json.loads(hits[0].read_text())


def _segment(args) -> int:
    segment = int(_run_info(args).get("segment", 0) or 0)
    if segment <= 0:
        raise EditscaleError(f"the run.json among --state has no `segment` ({args.state})")
    return segment


def state_files(args):
    """The StateFiles of checkpoint --k among the --state files."""
    from ..layout import StateFiles

    return StateFiles.among(args.state, args.k, _segment(args)) if args.k > 0 else StateFiles.unedited()


def _dtype(args) -> str:
    return args.dtype or _run_info(args).get("dtype") or "float32"


def _edits(args) -> list[dict]:
    path = Path(args.edits)
    if not path.exists():
        raise EditscaleError(f"{path} not found: the run's edit sequence (rule `sequence`) must exist")
    cases = read_jsonl(path)
    for c in cases:
        if "edit_index" not in c:
            raise EditscaleError(f"{path}: case {c.get('case_id')!r} has no edit_index")
    return sorted(cases, key=lambda c: int(c["edit_index"]))


def _inputs(args, extra: dict | None = None) -> dict:
    """Provenance inputs: the model's sha256, and {path, sha256} of each declared file the result
    was computed from (the audit re-hashes those paths)."""
    from ..models.load import model_sha

    out: dict = {"model": model_sha(args.model_dir)}
    files = {"edits": getattr(args, "edits", None)}
    state = state_files(args)
    files.update(delta=state.delta, factors=state.factors)
    if getattr(args, "segment_files", None):
        from ..layout import segment_files

        files["segment_start"], files["segment_factors"] = segment_files(args.segment_files, args.k, _segment(args))
    for role, path in files.items():
        if path is not None and Path(path).exists():
            out[role] = {"path": str(path), "sha256": sha256_file(path)}
    out.update(extra or {})
    return out


def _write(df, args, params: dict, extra_inputs: dict[str, str] | None = None, seconds: float | None = None) -> None:
    from ..models.load import pick_device

    meta = provenance(config_hash=sha256_json(params), inputs=_inputs(args, extra_inputs), device=str(pick_device(args.device)))
    meta["params"] = json.dumps(params, sort_keys=True)
    meta["evaluation_key"] = evaluation_key(args)
    if seconds is not None:
        meta["seconds"] = f"{seconds:.2f}"
    write_parquet_atomic(df, args.out, metadata=meta)
    log.info("wrote %s (%d rows%s)", args.out, df.height, f", {seconds:.1f} s" if seconds is not None else "")


def sha256_file(path) -> str:
    """io.sha256_file, once per file content in this process: a checkpoint job's metrics all
    hash the same delta and factors files (staleness check, evaluation key, provenance)."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    from ..io import sha256_file as hash_file

    return hash_file(path)


def _flag_attr(flag: str) -> str:
    """The argparse attribute of an input flag (--segment-files -> segment_files)."""
    return flag.lstrip("-").replace("-", "_")


def evaluation_key(args) -> str:
    """What a metric file was computed from, as one hash: the params JSON its verb was given and
    the content of every input file handed to it (`evaluate` recomputes a file whose key differs)."""
    files = sorted({str(p) for flag in INPUT_FLAGS.values() for p in _as_list(getattr(args, _flag_attr(flag), None))})
    return sha256_json({"params": parse_params(args.params_json), "files": {p: sha256_file(p) for p in files if Path(p).is_file()},
                        "k": args.k, "model": str(args.model_dir)})


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, Path)) else list(value)


def _model_at(args):
    """The model after --k edits; from the job's cache inside `evaluate` (the metric verbs only
    read the model)."""
    from ..edit.chain import model_at

    state = state_files(args)
    key = (str(args.model_dir), str(state.delta), str(state.factors), state.k, _dtype(args), args.device)
    if _MODEL_CACHE is not None and key in _MODEL_CACHE:
        log.info("model after %d edits: loaded and replayed once for this checkpoint job, re-used", state.k)
        return _MODEL_CACHE[key]
    loaded = model_at(args.model_dir, state, dtype=_dtype(args), device=args.device)
    if _MODEL_CACHE is not None:
        _MODEL_CACHE[key] = loaded
    return loaded


# ---------------------------------------------------------------------------------------------
# verbs


def _locality_base(args, cfg, k: int, model, tok):
    """What EasyEdit's locality compares with: the unedited model as a view of the edited `model`
    (its edited matrices swapped back to the base weights while the base readings are taken: no
    second copy of the model), "self" at k = 0, None when the metric's `easyedit_locality` is off."""
    if not cfg.easyedit_locality or "neighborhood" not in getattr(cfg, "parts", ("neighborhood",)):
        return None
    return "self" if k == 0 else _unedited_view(args, model, tok)


def _unedited_view(args, model, tok):
    """models.load.UneditedView of the job's edited model: the run's edited matrices swapped back
    to the base weights inside a `with` block (instead of a second model in memory)."""
    from ..edit.methods import get_method
    from ..models.load import UneditedView

    run = _run_info(args)
    return UneditedView(model, tok, args.model_dir, get_method(run["method"], run["hparams"]).modules(model, run["hparams"]))


def cmd_score_edits(args) -> None:
    import polars as pl

    from ..edit.chain import states_in_segment
    from .edit_scores import score_cases

    t0 = time.time()
    cfg, params = _section(args, "edit_scores")
    from ..layout import segment_files

    start_delta, factors = segment_files(args.segment_files, args.k, _segment(args))
    by_index = {int(c["edit_index"]): c for c in _edits(args)}
    base = None
    frames = []
    for j, model, tok in states_in_segment(args.model_dir, start_delta, factors, dtype=_dtype(args), device=args.device):
        if j not in by_index:
            raise EditscaleError(f"edit {j} of the chain is not in {args.edits}")
        base = base or _locality_base(args, cfg, 1, model, tok)  # one view of the replayed model, reused
        frames.append(score_cases(model, tok, [by_index[j]], k=j, batch_size=cfg.batch_size, base=base))
    df = pl.concat(frames) if frames else score_cases(None, None, [], k=args.k)
    _write(df, args, params, seconds=time.time() - t0)


def cmd_history(args) -> None:
    from .history import score_history

    t0 = time.time()
    cfg, params = _section(args, "history")
    cases = _edits(args)
    model, tok = _model_at(args)
    size = None if cfg.sample == "all" else int(cfg.sample)
    log.info("history at k=%d: re-scoring %s earlier edits (%s)", args.k, "all" if size is None else f"at most {size}",
             "every one" if size is None else f"{cfg.strata} age strata, seed {cfg.seed}")
    df = score_history(model, tok, cases, args.k, parts=tuple(cfg.parts), batch_size=cfg.batch_size,
                       sample=size, strata=cfg.strata, seed=cfg.seed, base=_locality_base(args, cfg, args.k, model, tok))
    _write(df, args, params, seconds=time.time() - t0)


def cmd_downstream(args) -> None:
    import polars as pl

    from .downstream import build_tasks, evaluate_task, metrics_rows, task_config
    from .probes import keep_solved

    t0 = time.time()
    cfg, params = _section(args, "downstream")
    tasks_cfg = task_config(params)
    if not tasks_cfg:
        raise EditscaleError("downstream: no tasks: set `tasks` and/or `probes` in the config's metrics.downstream")
    n_edits = args.n_edits if args.n_edits is not None else cfg.exclude_edits
    excluded = [c["subject"] for c in _edits(args) if n_edits is None or int(c["edit_index"]) <= int(n_edits)]
    log.info("probes leave out the %d subjects of edits 1..%s", len(excluded), n_edits if n_edits is not None else "all")
    tasks = build_tasks(tasks_cfg, excluded)
    bs, generation = cfg.batch_size, cfg.generation
    # optional per-task "keep_solved": restrict to the items the UNEDITED model gets right
    need_base = [i for i, t in enumerate(tasks) if (tasks_cfg.get(t.name) or {}).get("keep_solved")]
    model, tok = _model_at(args)
    if need_base:  # read on the unedited model: a view of this one (no second copy of the weights)
        with contextlib.nullcontext((model, tok)) if args.k == 0 else _unedited_view(args, model, tok) as (base, btok):
            for i in need_base:
                reading = tasks_cfg[tasks[i].name]["keep_solved"]
                tasks[i] = keep_solved(base, btok, tasks[i], reading if isinstance(reading, str) else "ll", bs)
    frames = []
    files = {}
    for task in tasks:
        ts = time.time()
        metrics, _ = evaluate_task(model, tok, task, batch_size=bs, generation=generation)
        metrics["seconds"] = time.time() - ts
        frames.append(metrics_rows(args.k, task.name, metrics))
        path = (tasks_cfg.get(task.name) or {}).get("path")
        if path and Path(path).exists():
            files[f"task:{task.name}"] = sha256_file(path)
        log.info("%s: %s", task.name, {m: round(v, 4) for m, v in metrics.items()})
    _write(pl.concat(frames), args, params, files, seconds=time.time() - t0)


def cmd_generation(args) -> None:
    from .generation import generation_metrics, pick_prompts

    t0 = time.time()
    cfg, params = _section(args, "generation")
    prompts = cfg.prompts or pick_prompts(_edits(args), cfg.n_prompts, cfg.seed)
    model, tok = _model_at(args)
    df, conts = generation_metrics(model, tok, prompts, args.k, cfg.max_new_tokens, cfg.top_k, cfg.seed, cfg.batch_size)
    for p, c in list(zip(prompts, conts))[:3]:
        log.info("k=%d sample: %r -> %r", args.k, p, c[:200])
    _write(df, args, params, seconds=time.time() - t0)


def cmd_perplexity(args) -> None:
    from .perplexity import load_tokens, perplexity, perplexity_rows

    t0 = time.time()
    cfg, params = _section(args, "perplexity")
    tokens = load_tokens(args.tokens)
    model, tok = _model_at(args)
    res = perplexity(model, tokens, batch_size=cfg.batch_size, ignore_id=cfg.ignore_id)
    _write(perplexity_rows(args.k, res), args, params, {"tokens": sha256_file(args.tokens)}, seconds=time.time() - t0)


def cmd_weights(args) -> None:
    import polars as pl
    import torch

    from transformers import AutoConfig

    from ..edit.chain import replay
    from ..edit.methods import get_method
    from ..models.load import DTYPES, model_sha, read_weights
    from ..models.registry import edited_weight, meta_model, to_math
    from .weights import read_edit_logs, update_norm_rows, weight_drift

    t0 = time.time()
    cfg, params = _section(args, "weights")
    threshold = float(cfg.outlier_z)
    # only the edited matrices are read (no model is loaded: the job may hold one for other metrics);
    # the shapes-only model gives their names and orientation
    shell = meta_model(AutoConfig.from_pretrained(str(args.model_dir)))
    if args.k > 0:
        delta = replay(state_files(args), model_sha(args.model_dir))
    else:  # the unedited matrices: the indicators' baseline
        run = _run_info(args)
        modules = get_method(run["method"]).modules(shell, run["hparams"])
        delta = {m: torch.zeros(tuple(to_math(shell, edited_weight(shell, m)).shape), dtype=torch.float32) for m in modules}
    # W0 as the run's jobs hold it (a half-precision run edits the rounded weights: cast as load_model casts), in float32
    raw = read_weights(args.model_dir, [f"{m}.weight" for m in delta])
    base = {m: to_math(shell, raw[f"{m}.weight"].to(DTYPES[_dtype(args)])).to(torch.float32) for m in delta}
    log.info("weights at k=%d: drift%s of %s", args.k, " and collapse indicators (singular values, hyperspherical energy)" if cfg.indicators else "", sorted(delta))
    frames = [weight_drift(delta, base, k=args.k, indicators=bool(cfg.indicators)).with_columns(pl.lit(None, dtype=pl.Int64).alias("edit_index"))]
    frames.append(update_norm_rows(read_edit_logs(args.factors, args.k), args.k, threshold, recent=int(cfg.recent)))
    cols = ["k", "item", "edit_index", "metric", "value"]
    df = pl.concat([f.select(cols) for f in frames])
    _write(df, args, params, seconds=time.time() - t0)


def cmd_evaluate(args) -> None:
    """Every listed metric at checkpoint k in this process (module doc)."""
    global _MODEL_CACHE
    import polars as pl

    from .. import cli as top
    from ..io import read_parquet_metadata, table_sha256
    from .registry import get_metric

    t0 = time.time()
    configs = {Path(c).stem: c for c in args.configs}
    outs = {}
    for item in args.metric:
        name, sep, out = item.partition("=")
        if not sep or not out:
            raise EditscaleError(f"--metric {item!r}: expected NAME=OUT")
        outs[name] = out
    unknown = sorted(set(outs) - set(configs))
    if unknown:
        raise EditscaleError(f"--configs has no config file for {unknown} (results/config/metrics/NAME.json)")
    parser = top.build_parser()
    verbs = {}
    for name, out in outs.items():
        metric = get_metric(name)
        argv = [metric.verb, "--model-dir", str(args.model_dir), "--k", str(args.k), "--out", out,
                # the section itself, not @FILE: a plugin verb may only parse a JSON object
                "--params-json", _read_config(configs[name]), "--device", args.device]
        for kind in metric.inputs:
            files = getattr(args, _flag_attr(INPUT_FLAGS[kind]))
            if files:
                argv += [INPUT_FLAGS[kind], *(files if kind in ("state", "factors_upto", "segment_factors") else files[:1])]
        verbs[name] = parser.parse_args(argv)

    def stale(name) -> bool:
        path = Path(outs[name])
        if not path.exists():
            return True
        try:
            meta = read_parquet_metadata(path)
            if meta.get("evaluation_key") != evaluation_key(verbs[name]):
                return True
            # a file whose values were changed after it was written is recomputed too (the audit's check)
            return table_sha256(pl.read_parquet(path)) != meta.get("table_sha256")
        except Exception:  # noqa: BLE001 - unreadable (polars raises several kinds): recompute
            return True

    recompute = os.environ.get("EDITSCALE_RECOMPUTE", "") not in ("", "0")
    todo = list(outs) if recompute else [n for n in outs if stale(n)]
    if not todo:
        log.info("k=%d: every metric file is up to date by its evaluation key (params and input contents): kept. Snakemake "
                 "re-ran the job for a reason the keys do not see (a forced run, a touched input, another set of inputs); "
                 "EDITSCALE_RECOMPUTE=1 recomputes them", args.k)
    log.info("k=%d: evaluating %s in one process (up to date, kept: %s)", args.k, todo, [n for n in outs if n not in todo] or "none")
    _MODEL_CACHE = {}
    try:
        for name in todo:
            ts = time.time()
            verbs[name].func(verbs[name])
            log.info("k=%d: %s done in %.1f s -> %s", args.k, name, time.time() - ts, outs[name])
    finally:
        _MODEL_CACHE = None
    log.info("k=%d: %d metrics in %.1f s", args.k, len(todo), time.time() - t0)


def _read_config(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise EditscaleError(f"{path} not found: the metric's config section (rule metric_config)")
    return path.read_text().strip()


def cmd_metric_config(args) -> None:
    from ..io import atomic_path

    params = parse_params(args.params_json)
    _section(args, args.metric)  # one clear error for a bad section
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(params, sort_keys=True, separators=(",", ":")) + "\n")
    log.info("wrote %s", args.out)
