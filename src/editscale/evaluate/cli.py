"""`editscale evaluate | metric-config | <metric>`: the metric jobs' command line.

Every registered metric gets one sub-command (its `command`: score-edits, history, downstream,
generation, perplexity, weights, and a plugin's) with the same flags: the checkpoint (--model-dir,
--k), the files of the inputs it declares (--state, --edits, --tokens, --factors,
--segment-files), its section (--params-json: a JSON object, @FILE or a .json path), --out,
--dtype, --device. Each runs editscale.evaluate.job.run_metric, which computes and writes.

`evaluate` is the checkpoint job of the workflow: several metrics at one checkpoint in one
process, so that the model is loaded and replayed to k once for all of them (the job's
ModelCache), and each metric still writes its own file. Snakemake keeps those files (they are
`update()` outputs of the job) and the job recomputes only the metrics whose file is missing or
stale: its recorded evaluation_key (the hash of the metric's params and of the content of every
input file it declares) differs from the current one, or its values no longer hash to its
recorded table_sha256. A job in which no metric is stale was started for a reason the files do
not show (a forced re-run, a touched input, a grid change that moved the checkpoint to another
rule): it keeps every file and says so; EDITSCALE_RECOMPUTE=1 in the environment recomputes all.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..io import EditscaleError, job_device
from ..layout import metric_config_path, metric_section_text
from .job import Checkpoint, ModelCache, declared_files, metric_section, parse_params, run_metric
from .registry import INPUT_KINDS, METRICS, MULTI_FILE_KINDS, OPTIONAL_KINDS, get_metric

log = logging.getLogger(__name__)

INPUT_HELP = {
    "state": "the files that define the model after k edits (the rule's inputs): the run's run.json, the checkpoint "
             "delta at or before k, and the factors of k's segment when k is inside one",
    "edits": "the run's edit sequence (results/{run}/edits.jsonl)",
    "heldout": ".npy of int64 token ids [n_seq, seq_len]: the corpus's held-out sample",
    "factors_upto": "factors files of the segments up to k (the rule's inputs): the per-edit log",
    "segment_factors": "the segment ending at k: the delta it starts from (none for the first) and its factors",
    "data": "the data files the metric's config names (e.g. downstream's task files): their content is part of the evaluation key",
}


def _flag_attr(flag: str) -> str:
    """The argparse attribute of an input flag (--segment-files -> segment_files)."""
    return flag.lstrip("-").replace("-", "_")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="several metrics at one checkpoint k in one process (the workflow's checkpoint job)")
    p.add_argument("--model-dir", required=True, help="prepared model directory (data/models/{model})")
    p.add_argument("--k", type=int, required=True, help="checkpoint: the model after k edits (0 = unedited)")
    p.add_argument("--metric", nargs="+", required=True, metavar="NAME=OUT", help="each metric to evaluate and the parquet file it writes")
    p.add_argument("--configs", nargs="+", required=True, help="each metric's config section, results/config/metrics/NAME/DIGEST.json (`metric-config`)")
    p.add_argument("--device", default=job_device(), help="auto | cpu | cuda | cuda:N (default: $EDITSCALE_DEVICE, else auto)")
    for kind, flag in INPUT_KINDS.items():
        p.add_argument(flag, nargs="*", default=[], help=f"the checkpoint's `{kind}` input files (editscale.evaluate.registry); each metric gets those it declares")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("metric-config", help="validate one metric's config section and write it as canonical JSON (the checkpoint jobs' input)")
    p.add_argument("--metric", required=True)
    p.add_argument("--params-json", required=True, help="the section (without eval_every, which decides only which checkpoints exist)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_metric_config)

    for entry in METRICS.values():
        p = sub.add_parser(entry.command, help=f"metric {entry.name}: {entry.description} at checkpoint k")
        p.add_argument("--model-dir", required=True, help="prepared model directory (data/models/{model})")
        p.add_argument("--k", type=int, required=True, help="checkpoint: the model after k edits (0 = unedited)")
        for kind in entry.inputs:
            optional = kind in OPTIONAL_KINDS
            p.add_argument(INPUT_KINDS[kind], nargs=("*" if optional else "+") if kind in MULTI_FILE_KINDS else None, required=not optional,
                           default=[] if optional else None, help=INPUT_HELP[kind])
        p.add_argument("--out", required=True, help="output parquet")
        p.add_argument("--params-json", default="{}", help="the metric's config section as JSON (or @file.json)")
        p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the run's, else float32)")
        p.add_argument("--device", default=job_device(), help="auto | cpu | cuda | cuda:N (default: $EDITSCALE_DEVICE, else auto)")
        p.set_defaults(func=cmd_metric, metric=entry.name)


def _files(args, kinds) -> dict[str, list[str]]:
    """Input kind -> the files given by its flag."""
    out = {}
    for kind in kinds:
        value = getattr(args, _flag_attr(INPUT_KINDS[kind]), None)
        out[kind] = [] if value is None else [value] if isinstance(value, str) else list(value)
    return out


def cmd_metric(args) -> None:
    entry = get_metric(args.metric)
    files = _files(args, entry.inputs)
    checkpoint = Checkpoint(args.model_dir, args.k, declared_files(entry, files), device=args.device, dtype=args.dtype)
    run_metric(entry, checkpoint, parse_params(args.params_json), args.out)


def _outputs(items) -> dict[str, str]:
    outs = {}
    for item in items:
        name, sep, out = item.partition("=")
        if not sep or not out:
            raise EditscaleError(f"--metric {item!r}: expected NAME=OUT")
        outs[name] = out
    return outs


def cmd_evaluate(args) -> None:
    """Every listed metric at checkpoint k in this process (module doc)."""
    import polars as pl

    from ..io import read_parquet_metadata, table_sha256

    t0 = time.time()
    configs = {Path(c).parent.name: c for c in args.configs}
    outs = _outputs(args.metric)
    unknown = sorted(set(outs) - set(configs))
    if unknown:
        raise EditscaleError(f"--configs has no config file for {unknown} (results/config/metrics/NAME/DIGEST.json)")
    files = _files(args, INPUT_KINDS)
    cache = ModelCache()  # the job's: its metrics share one load and replay of the checkpoint
    jobs = {}
    for name in outs:
        entry = get_metric(name)
        checkpoint = Checkpoint(args.model_dir, args.k, declared_files(entry, files), device=args.device, cache=cache)
        jobs[name] = (entry, checkpoint, _read_config(name, configs[name]))

    def stale(name) -> bool:
        path = Path(outs[name])
        if not path.exists():
            return True
        try:
            meta = read_parquet_metadata(path)
            if meta.get("evaluation_key") != jobs[name][1].evaluation_key(jobs[name][2]):
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
    for name in todo:
        ts = time.time()
        run_metric(*jobs[name], outs[name])
        log.info("k=%d: %s done in %.1f s -> %s", args.k, name, time.time() - ts, outs[name])
    log.info("k=%d: %d metrics in %.1f s", args.k, len(todo), time.time() - t0)


def _read_config(metric: str, path) -> dict:
    """A metric's section from its file, which must be the file its content names
    (layout.metric_config_path): a section edited by hand is refused, not evaluated."""
    path = Path(path)
    if not path.is_file():
        raise EditscaleError(f"{path} not found: the metric's config section (rule metric_config)")
    params = parse_params(path.read_text())
    expected = metric_config_path(metric, params)
    if path.name != expected.name:
        raise EditscaleError(f"{path}: its content is metrics.{metric} section {expected.name}, not the one its name says "
                             f"(edited by hand?); delete it and run snakemake again")
    return params


def cmd_metric_config(args) -> None:
    from ..io import atomic_path

    params = parse_params(args.params_json)
    get_metric(args.metric)
    metric_section(args.metric, params)  # one clear error for a bad section
    expected = metric_config_path(args.metric, params)
    if Path(args.out).name != expected.name:
        raise EditscaleError(f"--out {args.out}: the metrics.{args.metric} section given is named {expected.name} "
                             f"(its content's digest, layout.metric_config_path); a file with another name would be another section's")
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(metric_section_text(params) + "\n")
    log.info("wrote %s", args.out)
