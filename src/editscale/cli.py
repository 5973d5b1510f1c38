"""`editscale <verb>`: one sub-command per stage; every Snakemake rule calls one of them."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Busy-waiting OpenMP threads slow each other down badly when jobs share cores (a SmolLM2
# forward pass measured 25x slower); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import forkserver
from .io import JOB_ENV, EditscaleError, signal_on_parent_death

# Each stage module exposes register(subparsers) adding its verbs; a verb sets func=callable(args).
STAGES = ["models", "data", "stats", "edit", "evaluate", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editscale", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (rules pass their `threads`); more threads than free cores make the model several times slower")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"editscale.{stage}.cli")
        except ModuleNotFoundError as exc:
            if exc.name == f"editscale.{stage}.cli":
                continue  # stage not built yet
            raise
        module.register(sub)
    from . import doctor  # machine check + the planning module's estimates (beside workflow, not a stage)

    doctor.register(sub)
    from . import merge  # run records, the study built from them, its audit (above the stages and the plan)

    merge.register(sub)
    forkserver.register(sub, build_parser)
    return parser



def die_with_wrapper() -> None:
    """A workflow job ends with the shell Snakemake started it in. Killed with kill -9 (an OOM
    killer, a lost node's cleanup), that shell would leave editscale orphaned, still writing its
    outputs after Snakemake had reported the job failed, racing the run started next (issue 32
    item 8). Linux's PR_SET_PDEATHSIG sends SIGTERM when the parent dies; SIGTERM raises SystemExit
    so that atomic writes remove their temporaries. Only for workflow jobs: a command run by hand
    with nohup must outlive its terminal."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    if not signal_on_parent_death(signal.SIGTERM):  # the wrapper died before the request took effect
        raise SystemExit(128 + signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    from .plugins import load_plugins

    if argv is None and os.environ.get(forkserver.FORKSERVER_ENV):
        code = forkserver.run_served(os.environ[forkserver.FORKSERVER_ENV], sys.argv[1:])
        if code is not None:  # else the server could not take it (it said why): run it here
            return code

    if os.environ.get(JOB_ENV):
        die_with_wrapper()

    try:
        load_plugins()  # EDITSCALE_PLUGINS (set by the Snakefile from the config)
    except EditscaleError as exc:
        print(f"editscale: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(build_parser().parse_args(argv))
    except forkserver.ServedCommand as served:  # `editscale forkserver`, in a served command's process
        command = served.argv
    forkserver.run_to_exit(lambda: main(command))  # outside the except: its errors are not "during handling"


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments: logging, the torch thread budget, then the verb."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.threads is not None and args.threads < 1:
        print(f"editscale: error: --threads must be positive, got {args.threads}", file=sys.stderr)
        return 2
    if args.threads:
        # Most verbs never import torch (their parsers do not either: `metric-config`, `audit`, the
        # report's), so it is not imported here; torch reads OMP_NUM_THREADS when it is imported.
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(args.threads)
        else:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
    try:
        args.func(args)
    except EditscaleError as exc:
        print(f"editscale {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
