"""`editscale dataset` and `editscale sequence`: build data/datasets/{dataset}.jsonl and results/{run}/edits.jsonl;
and `editscale download` (rule `download`)."""

from __future__ import annotations

import json

from ..io import EditscaleError


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build a normalized edit-case dataset (JSONL)")
    p.add_argument(
        "--spec-json",
        required=True,
        help='dataset spec as JSON, e.g. \'{"reader": "geofacts", "seed": 0}\' or '
        '\'{"reader": "counterfact_easyedit", "path": ["a.json", "b.json"], "n_cases": 500, "seed": 0}\'',
    )
    p.add_argument("--out", required=True, help="output JSONL, e.g. data/datasets/geofacts.jsonl")
    p.set_defaults(func=run_dataset)

    p = sub.add_parser("sequence", help="build the ordered edit sequence of a run (JSONL)")
    p.add_argument("--dataset", required=True, help="dataset JSONL written by `editscale dataset`")
    p.add_argument("--out", required=True, help="output JSONL, e.g. results/RUN/edits.jsonl")
    p.add_argument("--n-edits", type=int, required=True, help="length of the chain; 0: every usable case")
    p.add_argument("--sample", type=int, default=0, help="which random order (seeded shuffle / order-file key)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order-file", default=None, help="JSON object of case-id lists, e.g. paper_samples_unique_10_20391.json")
    p.add_argument("--order-key", default=None, help="key in --order-file (default: str(--sample))")
    p.add_argument("--run", default=None, help="the run it is built for: its n_edits (EDITSCALE_REQUIRED_EDITS, set by the "
                   "Snakefile) must fit the usable sequence")
    p.set_defaults(func=run_sequence)

    p = sub.add_parser("download", help="fetch a file (https://, http://, file://) atomically, optionally checking its sha256")
    p.add_argument("--url", required=True)
    p.add_argument("--out", required=True, help="target path, e.g. data/downloads/counterfact.json")
    p.add_argument("--sha256", default=None, help="expected sha256 (hex); a mismatch leaves nothing at --out")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before giving up")
    p.set_defaults(func=run_download)


def run_dataset(args) -> None:
    from .readers import build_dataset

    try:
        spec = json.loads(args.spec_json)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--spec-json is not valid JSON ({exc}): {args.spec_json!r}") from exc
    build_dataset(spec, args.out)


def run_sequence(args) -> None:
    import json
    import os

    from .sequence import build_sequence

    # passed beside the params on purpose: n_edits must not be a param of this rule (raising it
    # would re-run the sequence and so the whole chain), yet a too-long run must fail here
    needs = json.loads(os.environ.get("EDITSCALE_REQUIRED_EDITS") or "{}")
    build_sequence(
        args.dataset,
        args.out,
        n_edits=args.n_edits,
        sample=args.sample,
        seed=args.seed,
        order_file=args.order_file,
        order_key=args.order_key,
        required={args.run: int(needs[args.run])} if args.run in needs else None,
    )


def run_download(args) -> None:
    from .download import download, known_sha256

    digest = download(args.url, args.out, sha256=args.sha256 or known_sha256(args.url), timeout=args.timeout)
    print(f"{digest}  {args.out}")
