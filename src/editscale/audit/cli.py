"""`editscale audit --files FILES | RESULTS_DIR`."""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("audit", help="check provenance and hash chains, re-derive sampled checkpoints")
    p.add_argument("results", nargs="?", default=None, help="by hand: a results directory to gather the files from (e.g. results)")
    p.add_argument("--files", nargs="+", default=None, help="the files to audit (the rule's declared inputs)")
    p.add_argument("--models-dir", default="data/models", help="with RESULTS: where the model manifests are")
    p.add_argument("--params-json", default="{}", help='{"sample_checkpoints": 2, "seed": 0}')
    p.add_argument("--out", default=None, help="default RESULTS/audit.json")
    p.set_defaults(func=run)


def run(args) -> None:
    from pathlib import Path

    from ..config import section
    from ..io import EditscaleError, write_json_atomic
    from .audit import audit, gather

    try:
        params = json.loads(args.params_json)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--params-json is not valid JSON: {exc}") from exc
    cfg = section("audit", params)
    if (args.files is None) == (args.results is None):
        raise EditscaleError("audit: give either --files (the rule's inputs) or a results directory")
    files = args.files if args.files is not None else gather(args.results, args.models_dir)
    result = audit(files, cfg.sample_checkpoints, cfg.seed)
    out = args.out or str(Path(args.results or "results") / "audit.json")
    write_json_atomic(out, result)
    for f in result["failures"]:
        print(f"FAIL {f['check']}: {f['file']}: {f['detail']}", file=sys.stderr)
    print(f"audit {'PASSED' if result['passed'] else 'FAILED'}: {result['n_checks']} checks, "
          f"{len(result['failures'])} failed -> {out}", file=sys.stderr)
    if not result["passed"]:
        sys.exit(1)
