"""`editscale run-config | context-templates | edit-segment | replay | methods`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import EditscaleError, job_device, sha256_json, write_json_atomic

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("run-config", help="write results/{run}/run.json (the run's resolved config, hparams included)")
    p.add_argument("--run-json", required=True, help="the run's record (editscale.workflow.run_record), as JSON")
    p.add_argument("--model-dir", default=None, help="the fetched model: its layer count checks the hparams' layers")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_run_config)

    p = sub.add_parser("context-templates", help="sample ROME/MEMIT context templates once from the unedited model")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-json", required=True, help="the run's run.json (method, hparams, seed)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_context_templates)

    p = sub.add_parser("edit-segment", help="apply the edits of one segment and write its delta and factors")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-json", required=True, help="the run's run.json (method, resolved hparams, segment)")
    p.add_argument("--edits", required=True, help="the run's edit sequence (edits.jsonl)")
    p.add_argument("--previous", nargs="*", default=[], help="the previous checkpoint's delta and factors (none for the first segment)")
    p.add_argument("--k", type=int, required=True, help="edit count at the end of the segment")
    p.add_argument("--out-delta", required=True, help="the delta to write (deltas/{k}.h5)")
    p.add_argument("--out-factors", required=True, help="the factors to write (factors/{k}.h5)")
    p.add_argument("--templates", required=True)
    p.add_argument("--precomputed", nargs="*", default=[], metavar="KIND:MODULE=PATH",
                   help="what the stats stage computed for the method (EditMethod.precomputed), e.g. mom2:MODULE=PATH, nullspace:MODULE=PATH")
    p.add_argument("--device", default=job_device(), help="auto | cpu | cuda | cuda:N (default: $EDITSCALE_DEVICE, else auto)")
    p.set_defaults(func=cmd_edit_segment)

    p = sub.add_parser("replay", help="rebuild the edited weights after any edit j from base weights + factors")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--edit", type=int, required=True, help="edit count j")
    p.add_argument("--out", default=None, help="optional .h5 to write the delta to")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("methods", help="list the editing methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("hparams", help="hyper-parameter files: import from EasyEdit")
    hsub = p.add_subparsers(dest="hparams_verb", required=True, metavar="ACTION")
    q = hsub.add_parser("import-easyedit", help="convert an EasyEdit hparams YAML into an editscale hparams file, naming every key dropped")
    q.add_argument("file", help="EasyEdit hparams YAML (hparams/<ALG>/<model>.yaml in zjunlp/EasyEdit)")
    q.add_argument("--method", default=None, help="editscale method (default: the one whose EasyEdit name is the file's alg_name)")
    q.add_argument("--out", default=None, help="output YAML (default: config/hparams/<method>/<file name>)")
    q.add_argument("--model-dir", default=None, help="a prepared model directory: also check the layers against its config.json")
    q.add_argument("--stdout", action="store_true", help="print the file instead of writing it")
    q.add_argument("--force", action="store_true", help="replace an existing output file that differs (its diff is printed either way)")
    q.set_defaults(func=cmd_import_easyedit)


def resolve_run(record: dict, layers_in_model: int | None = None) -> dict:
    """run.json: the run record (hparams already resolved by the workflow) checked once more
    against the method (and the model's layer count, known here for hf: models fetched by the
    model rule), with config_hash over everything but the name."""
    from .methods import get_method

    cls = get_method(record["method"], record["hparams"])
    source = f"run {record['name']}: resolved hparams of {record.get('hparams_file')}"
    cls.resolve_hparams(record["hparams"], source, layers_in_model)
    resolved = dict(record)
    resolved["config_hash"] = sha256_json({k: v for k, v in resolved.items() if k != "name"})
    return resolved


def cmd_run_config(args) -> None:
    from ..models.registry import config_json_layers

    record = json.loads(args.run_json)
    layers = config_json_layers(Path(args.model_dir) / "config.json") if args.model_dir else None
    write_json_atomic(args.out, resolve_run(record, layers))
    log.info("wrote %s", args.out)


def cmd_context_templates(args) -> None:
    from ..models.load import load_model
    from .chain import read_run, templates_record

    run = read_run(args.run_json)
    # sampled from the model as the run's jobs load it (its dtype): the templates are its text
    model, tok = load_model(args.model_dir, dtype=run.get("dtype", "float32"))
    record = templates_record(model, tok, run["method"], run["hparams"], int(run.get("seed", 0)))
    write_json_atomic(args.out, record)
    log.info("sampled %d context templates in %d group(s) by the %s rule -> %s", len(record["templates"]), len(record["groups"]), record["rule"], args.out)


def cmd_edit_segment(args) -> None:
    from ..layout import SegmentFiles
    from .chain import read_run, run_segment

    run = read_run(args.run_json)
    files = SegmentFiles.declared(args.k, int(run["segment"]), args.edits, args.previous, args.out_delta, args.out_factors)
    run_segment(args.model_dir, files, run, _precomputed_paths(args.precomputed), args.templates, device=args.device)


def _precomputed_paths(items: list[str]) -> dict[str, dict[str, str]]:
    """--precomputed KIND:MODULE=PATH ... as kind -> module -> path."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        kind, sep, rest = item.partition(":")
        module, sep2, path = rest.partition("=")
        if not (sep and sep2 and kind and module and path):
            raise EditscaleError(f"--precomputed expects KIND:MODULE=PATH, got {item!r}")
        out.setdefault(kind, {})[module] = path
    return out


def cmd_replay(args) -> None:
    from ..models.load import model_sha
    from .chain import read_run, replay_delta, tensor_sha256, write_delta

    run = read_run(Path(args.run_dir) / "run.json")
    done = max((int(f.stem) for f in (Path(args.run_dir) / "factors").glob("*.h5") if f.stem.isdigit()), default=0)
    if not 0 <= args.edit <= done:
        raise EditscaleError(f"--edit {args.edit}: the run in {args.run_dir} has {done} edits (replay any j in 0..{done})")
    delta = replay_delta(args.run_dir, args.edit, int(run["segment"]), model_sha(args.model_dir))
    hashes = {m: tensor_sha256(d) for m, d in sorted(delta.items())}
    print(json.dumps({"edit": args.edit, "sha256": hashes}, indent=2))
    if args.out:
        write_delta(args.out, delta, {"k": args.edit, "model_sha256": model_sha(args.model_dir), "replayed": True})
        log.info("wrote replayed delta after edit %d to %s", args.edit, args.out)


def cmd_methods(args) -> None:
    from .hparams import required
    from .methods import describe_methods, get_method

    for name, desc in describe_methods():
        cls = get_method(name)
        print(f"{name:10s} {desc}")
        more = f", then those of the method named by {cls.wraps}" if cls.wraps else ""
        print(f"{'':10s}   updates: {cls.update_kind}; batches: {'yes' if cls.batch_edits else 'no'}; templates: {cls.template_rule} rule; required hparams: {', '.join(required(cls.hparams_type)) or 'none'}{more}")


def cmd_import_easyedit(args) -> None:
    import sys

    from ..io import write_text_atomic
    from ..models.registry import config_json_layers
    from .easyedit import convert

    layers = config_json_layers(Path(args.model_dir) / "config.json") if args.model_dir else None
    conv = convert(args.file, args.method, layers)
    print(conv.report(), file=sys.stderr)
    if args.stdout:
        sys.stdout.write(conv.yaml())
        return
    out = Path(args.out) if args.out else Path("config/hparams") / conv.method / Path(args.file).with_suffix(".yaml").name
    text = conv.yaml()
    if out.exists():
        import difflib

        old = out.read_text(encoding="utf-8")
        if old == text:
            log.info("%s already holds this import; unchanged", out)
            return
        sys.stderr.write("".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(out), f"{out} (imported)")))
        if not args.force:
            raise EditscaleError(f"{out} exists and differs from the import (diff above); not overwritten: pass --out for another "
                                 "file, or --force to replace it")
    write_text_atomic(out, text)
    log.info("wrote %s (use it as a run's `hparams:` with method %s)", out, conv.method)
