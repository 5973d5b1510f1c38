"""`editscale model`: prepare data/models/{model}/."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("model", help="prepare a model directory (safetensors, tokenizer, manifest.json)")
    p.add_argument("--source", required=True, help="embedded:<name> | hf:<repo id> | local:<dir> | tiny:<arch>")
    p.add_argument("--revision", default=None)
    p.add_argument("--out", required=True, help="output directory, e.g. data/models/smollm2-135m")
    p.set_defaults(func=run)


def run(args) -> None:
    from .fetch import prepare_model

    prepare_model(args.source, args.out, revision=args.revision)
