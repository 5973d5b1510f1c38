"""`editscale report-tables | report-plots | phases | compare`: the report stage."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

TABLE_PARAMS = ["window", "counts"]
PHASE_PARAMS = ["seed", "slope_ratio", "min_delta_bic", "alpha", "min_agree", "drop_z", "norm_z", "decision_curves"]
# the phases verb's command-line overrides of the report section: (key, type)
PHASE_FLAGS = (("seed", int), ("slope_ratio", float), ("min_delta_bic", float), ("alpha", float), ("min_agree", int),
               ("drop_z", float), ("norm_z", float))
PARAMS_HELP = "the config's `report` section, inline JSON or a file (the schema's defaults fill the rest); keys used here: "


def register(sub) -> None:
    p = sub.add_parser("report-tables", help="gather every metric into tidy tables (parquet + csv) and a per-run summary")
    p.add_argument("--runs-json", required=True, help="run descriptions, inline JSON or a JSON file: a list of runs, {'runs': [...]}, or name -> run")
    p.add_argument("--metrics", nargs="*", default=[], help="the metric files ({run}/metrics/{family}/{k}.parquet) the rule declared")
    p.add_argument("--factors", nargs="*", default=[], help="the factors files ({run}/factors/{k}.h5): the per-edit log")
    p.add_argument("--deltas", nargs="*", default=[], help="the delta files ({run}/deltas/{k}.h5): with --factors, the storage per run")
    p.add_argument("--out-dir", required=True, help="e.g. results/studies/<study>/tables")
    p.add_argument("--edit-log", default=None, help="per-edit log table (parquet/csv): run, edit_index, case_id, seconds, update_norm, update_rel, v_loss")
    p.add_argument("--storage-json", default=None, help="JSON {run: bytes}; default: size of the --deltas and --factors files")
    p.add_argument("--params-json", default=None, help=PARAMS_HELP + ", ".join(TABLE_PARAMS + PHASE_PARAMS))
    p.add_argument("--window", type=int, default=None, help="edits averaged for the summary's scores at each edit count (default: the config's report.window)")
    p.add_argument("--seed", type=int, default=None, help="seed of the phase-detection bootstrap (default: report.seed)")
    p.set_defaults(func=run_tables)

    p = sub.add_parser("report-plots", help="altair figures (html, png, svg) from the report tables")
    p.add_argument("--tables", nargs="+", required=True, help="the report's table files (parquet), or one directory holding them "
                   "(results/studies/<study>/tables)")
    p.add_argument("--out-dir", required=True, help="e.g. results/studies/<study>/plots")
    p.add_argument("--params-json", default=None, help=PARAMS_HELP + "smooth, norm_z")
    p.add_argument("--smooth", type=int, default=None, help="rolling mean over W edits for per-edit curves (1: raw); overrides report.smooth")
    p.add_argument("--norm-z", type=float, default=None, help="robust z above which an update norm is an outlier; overrides report.norm_z")
    p.add_argument("--band", choices=["minmax", "sd"], default="minmax", help="band across samples of one configuration")
    p.add_argument("--formats", default="html,png,svg", help="comma-separated subset of html,png,svg")
    p.add_argument("--html", choices=("bundle", "inline", "cdn"), default="bundle",
                   help="how each figure's HTML page gets vega: 'bundle' (default) loads vega-embed.js, written once into --out-dir; "
                        "'inline' embeds it in every page (~0.9 MB each); 'cdn' loads it from jsDelivr (needs the network to view). "
                        "figures.html, every figure on one page, always embeds it once")
    p.add_argument("--no-per-run", action="store_true", help="skip the per-run copies overview_{run} of the overview figure")
    p.set_defaults(func=run_plots)

    p = sub.add_parser("compare", help="terminal table of chosen runs' summaries: onset, ES/PS/NS at fixed edit counts, perplexity ratio")
    p.add_argument("runs", nargs="*", help="run names (default: every run of the summary)")
    p.add_argument("--results", default="results", help="the results directory (studies/<study>/tables/ and {run}/run.json), or a "
                   "directory holding tables/ (an `editscale merge` output)")
    p.add_argument("--study", default=None, help="the study (config) whose tables to read (default: the only one, else 'default')")
    p.add_argument("--at", nargs="+", default=["end"], help="edit counts of the ES/PS/NS columns: 'end' or any count the runs have reached")
    p.add_argument("--window", type=int, default=None, help="edits averaged ending at each count (default: the summary's, report.window)")
    p.add_argument("--format", choices=["text", "csv", "markdown", "latex"], default="text")
    p.set_defaults(func=run_compare)

    p = sub.add_parser("phases", help="onset of catastrophic forgetting and disabling edits per run")
    p.add_argument("--tables", nargs="+", required=True, help="the report's table files (parquet), or one directory holding them "
                   "(results/studies/<study>/tables)")
    p.add_argument("--out", required=True, help="e.g. results/studies/<study>/tables/phases.parquet")
    p.add_argument("--disabling-out", default=None, help="default: disabling_edits.parquet beside --out")
    p.add_argument("--params-json", default=None, help=PARAMS_HELP + ", ".join(PHASE_PARAMS))
    for flag, kind in PHASE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None, help=f"overrides report.{flag} of --params-json")
    p.set_defaults(func=run_phases)


def _report_section(args, overrides: dict):
    """The config's report section from --params-json, with the command line's overrides."""
    from ..config import section
    from ..io import EditscaleError
    from .tables import load_json_arg

    params = load_json_arg(args.params_json, "params json") if args.params_json else {}
    if not isinstance(params, dict):
        raise EditscaleError(f"--params-json must be a JSON object, not {type(params).__name__}")
    params = {**params, **{k: v for k, v in overrides.items() if v is not None}}
    return section("report", params)


def run_tables(args) -> None:
    from .phases import PhaseConfig
    from .tables import load_json_arg, load_runs_json, read_table_file, report_tables, storage_of_runs

    meta = load_runs_json(args.runs_json)
    cfg = _report_section(args, {"window": args.window, "seed": args.seed})
    edit_log = read_table_file(args.edit_log) if args.edit_log else None
    if args.storage_json:
        storage = {str(k): int(v) for k, v in load_json_arg(args.storage_json, "storage json").items()}
    else:
        storage = storage_of_runs([*args.deltas, *args.factors])
    written = report_tables(
        meta, args.metrics, args.out_dir, factors=args.factors, edit_log=edit_log, storage_bytes=storage,
        window=cfg.window, counts=tuple(cfg.counts), phase_config=PhaseConfig.from_report(cfg),
    )
    log.info("report-tables: %d files written to %s", len(written), args.out_dir)


def run_plots(args) -> None:
    from ..io import EditscaleError
    from .plots import FORMATS, FigureOptions, make_plots
    from .tables import read_tables

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise EditscaleError(f"--formats: unknown {bad}; choose from {list(FORMATS)}")
    cfg = _report_section(args, {"smooth": args.smooth, "norm_z": args.norm_z})
    options = FigureOptions(smooth=cfg.smooth, band=args.band, norm_z=cfg.norm_z)
    written = make_plots(read_tables(args.tables), args.out_dir, options, formats=formats, html=args.html, per_run=not args.no_per_run)
    log.info("report-plots: %d files written to %s", len(written), args.out_dir)


def run_phases(args) -> None:
    from ..io import provenance, write_parquet_atomic
    from . import phases as ph
    from .tables import first_item_fall, read_tables, write_table

    tables = read_tables(args.tables)
    tables.pop("phases", None)
    tables.pop("disabling_edits", None)
    runs = tables["summary"]["run"].to_list() if "summary" in tables else None
    config = ph.PhaseConfig.from_report(_report_section(args, {k: getattr(args, k) for k, _ in PHASE_FLAGS}))
    results = ph.analyze_runs(tables, runs, config)
    out = Path(args.out)
    dis_out = Path(args.disabling_out) if args.disabling_out else out.with_name("disabling_edits.parquet")
    md = provenance()
    md["phases_params"] = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    for df, path in ((ph.phases_frame(results), out), (ph.disabling_frame(results), dis_out)):
        if path.suffix == ".parquet":
            write_table(df, path.parent, path.stem, md)
        else:
            write_parquet_atomic(df, path, md)
            log.info("wrote %s (%d rows)", path, df.height)
    for r in results:
        c = r.combined
        onset = f"{c.onset_k:.0f} (95% CI {c.ci_low:.0f}-{c.ci_high:.0f}; {', '.join(c.curves_agreeing)})" if c.onset_k is not None else f"none within {r.k_max} edits"
        f = r.early_fall
        fall = f"{f.onset_k:.0f} (95% CI {f.ci_low:.0f}-{f.ci_high:.0f}; {', '.join(f.curves_agreeing)})" if f is not None and f.onset_k is not None else "none"
        log.info("run %s: onset %s; early fall %s; first task to fall %s; %d disabling edit(s)", r.run, onset, fall,
                 first_item_fall(r)["first_to_fall"], len(r.disabling))


def run_compare(args) -> None:
    import sys

    from .results import format_latex, format_markdown, format_table, load

    at = [a if a == "end" else _count(a) for a in args.at]
    table = load(args.results, study=args.study).compare(args.runs, at, args.window)
    render = {"csv": lambda t: t.write_csv(), "markdown": format_markdown, "latex": format_latex, "text": format_table}[args.format]
    sys.stdout.write(render(table).rstrip("\n") + "\n")


def _count(text: str) -> int:
    from ..io import EditscaleError

    try:
        return int(text)
    except ValueError:
        raise EditscaleError(f"--at takes edit counts or 'end', got {text!r}") from None
