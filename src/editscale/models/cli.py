"""`editscale model`: prepare data/models/{model}/; `editscale doctor`: machine check and cost estimate."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model", help="prepare a model directory (safetensors, tokenizer, manifest.json)")
    p.add_argument("--source", required=True, help="embedded:<name> | hf:<repo id> | local:<dir> | tiny:<arch>")
    p.add_argument("--revision", default=None)
    p.add_argument("--out", required=True, help="output directory, e.g. data/models/smollm2-135m")
    p.set_defaults(func=run)

    d = sub.add_parser(
        "doctor",
        help="print the device, memory and disk, and per run of a config an estimate of edit/eval time and checkpoint storage",
        description="Machine check plus, for --configfile, per-run estimates from the model's shapes. Storage: factors "
        "4(d_out+d_in) bytes per edited module per edit; dense delta 4 d_out d_in per module per checkpoint; the study's "
        "full-model save N_params x dtype bytes every 20 edits. Time: v_num_grad_steps x (2 + 2f) N x tokens FLOPs per edit "
        "(f: fraction of layers above the edited one; <= 6 N x tokens) plus float64 solves, divided by the measured "
        "matmul rate x 0.5; an order of magnitude (see editscale.models.doctor and docs/scale.md).",
    )
    d.add_argument("--configfile", default=None,
                   help="a config, e.g. config/paper/rome-gpt2-xl.yaml (default: ./config.yaml if there is one)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--storage-only", action="store_true", help="only the storage estimate (no device probe or benchmark)")
    d.add_argument("--flops", type=float, default=None, help="assumed matmul FLOP/s instead of measuring (fp64: half)")
    d.add_argument("--no-bench", action="store_true", help="do not measure the matmul rate (no time estimates)")
    d.set_defaults(func=run_doctor)


def run(args) -> None:
    from .fetch import prepare_model

    prepare_model(args.source, args.out, revision=args.revision)


def run_doctor(args) -> None:
    import json
    from pathlib import Path

    from .doctor import doctor, render

    configfile = args.configfile or ("config.yaml" if Path("config.yaml").exists() else None)
    report = doctor(configfile, bench=not args.no_bench, flops=args.flops, storage_only=args.storage_only)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
