"""`editscale audit RESULTS_DIR`."""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("audit", help="check provenance and hash chains, re-derive sampled checkpoints")
    p.add_argument("results", help="results directory, e.g. results")
    p.add_argument("--models-dir", default="data/models")
    p.add_argument("--params-json", default="{}", help='{"sample_checkpoints": 2, "seed": 0}')
    p.add_argument("--out", default=None, help="default RESULTS/audit.json")
    p.set_defaults(func=run)


def run(args) -> None:
    from pathlib import Path

    from ..config import section
    from ..io import EditscaleError, write_json_atomic
    from .audit import audit

    try:
        params = json.loads(args.params_json)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--params-json is not valid JSON: {exc}") from exc
    cfg = section("audit", params)
    result = audit(args.results, args.models_dir, cfg.sample_checkpoints, cfg.seed)
    out = args.out or str(Path(args.results) / "audit.json")
    write_json_atomic(out, result)
    for f in result["failures"]:
        print(f"FAIL {f['check']}: {f['file']}: {f['detail']}", file=sys.stderr)
    print(f"audit {'PASSED' if result['passed'] else 'FAILED'}: {result['n_checks']} checks, "
          f"{len(result['failures'])} failed -> {out}", file=sys.stderr)
    if not result["passed"]:
        sys.exit(1)
