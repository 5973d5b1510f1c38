"""`editscale corpus` (token sample of a corpus), `editscale stats` (E[k k^T] per edited module),
`editscale nullspace` (AlphaEdit projection) and `editscale convert-stats` (the ROME authors'
precomputed statistics into editscale's HDF5).

    editscale corpus --model-dir data/models/M --corpus-json '{"kind": "self_sample", "n_tokens": 65536}' \
        --out-dir data/corpora/M/CORPUS                       # -> stats.npy, heldout.npy, corpus.json
    editscale stats --model-dir data/models/M --corpus-json '<same spec>' [--tokens data/corpora/M/CORPUS/stats.npy] \
        --modules model.layers.3.mlp.down_proj model.layers.4.mlp.down_proj \
        --out-dir results/stats/M/CORPUS [--corpus-id CORPUS] [--batch-size 8] [--device auto] [--dtype float32]
    editscale nullspace --stats results/stats/M/CORPUS/model.layers.3.mlp.down_proj.h5 --threshold 1e-2 \
        --out results/stats/M/CORPUS/nullspace/model.layers.3.mlp.down_proj.t0.01.h5

Without --tokens, `stats` reads (or samples) the corpus itself in the same pass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..io import job_device

log = logging.getLogger(__name__)


def _model_args(p) -> None:
    p.add_argument("--model-dir", required=True, help="prepared model directory, e.g. data/models/smollm2-135m")
    p.add_argument("--corpus-json", required=True,
                   help='corpus spec as JSON (or a path to a .json file), e.g. \'{"kind": "self_sample"}\'')
    p.add_argument("--device", default=job_device(), help="auto | cpu | cuda | cuda:N (default: $EDITSCALE_DEVICE, else auto)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32 | float16 | bfloat16")
    # CPU threads come from the global `editscale --threads N` (a sub-command flag of the same name
    # would overwrite it with its default and drop the rule's thread budget)


def register(sub) -> None:
    p = sub.add_parser(
        "convert-stats",
        help="convert the ROME authors' layer_stats .npz (rome.baulab.info/data/stats/...) into editscale's stats HDF5",
    )
    p.add_argument("--npz", required=True, help="e.g. transformer.h.17.mlp.c_proj_float32_mom2_100000.npz")
    p.add_argument("--model-dir", required=True, help="prepared model directory (its manifest sha goes into the file)")
    p.add_argument("--module", default=None, help="edited module (default: read from the npz file name)")
    p.add_argument("--out", required=True, help="e.g. results/stats/gpt2-xl/wikipedia/transformer.h.17.mlp.c_proj.h5")
    p.add_argument("--corpus", default="rome-wikipedia", help="corpus label stored in the file")
    p.add_argument("--source-url", default=None, help="where the npz came from (recorded in the file)")
    p.set_defaults(func=run_convert_stats)

    c = sub.add_parser("corpus", help="token sample of a corpus: stats.npy and the disjoint held-out heldout.npy")
    _model_args(c)
    c.add_argument("--out-dir", required=True, help="directory receiving stats.npy, heldout.npy and corpus.json")
    c.set_defaults(func=run_corpus)

    p = sub.add_parser("stats", help="second moment E[k k^T] of the inputs of edited modules over a corpus (HDF5)")
    _model_args(p)
    p.add_argument("--modules", required=True, nargs="+", help="module names, e.g. model.layers.3.mlp.down_proj")
    p.add_argument("--out-dir", required=True, help="directory receiving one {module}.h5 per module")
    p.add_argument("--tokens", default=None, help="stats.npy written by `editscale corpus` (default: read the corpus now)")
    p.add_argument("--corpus-id", default=None, help="corpus name stored in the files (default: corpus_id(spec))")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default: the spec's batch_size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_stats)

    q = sub.add_parser("nullspace", help="AlphaEdit null-space projection P = U0 U0^T from a stats file")
    q.add_argument("--stats", required=True, help="stats file {module}.h5 written by `editscale stats`")
    q.add_argument("--threshold", type=float, default=1e-2,
                   help="eigenvalues of E[kk^T] (count-normalized) below this span the null space (default 1e-2)")
    q.add_argument("--out", required=True, help="output HDF5 file")
    q.add_argument("--device", default="cpu", help="device for the eigendecomposition")
    q.add_argument("--rule", default="eigh64", help="eigh64 (float64 eigh, default) | svd32 (AlphaEdit's reference: float32 SVD)")
    q.set_defaults(func=run_nullspace)

    q = sub.add_parser("convert-projection", help="AlphaEdit's / EasyEdit's null_space_project.pt -> editscale's projection files")
    q.add_argument("--pt", required=True, help="null_space_project.pt: torch tensor [n_layers, d, d]")
    q.add_argument("--model-dir", required=True, help="prepared model directory")
    q.add_argument("--layers", required=True, type=int, nargs="+", help="the edited layers, in the order of the file (hparams `layers`)")
    q.add_argument("--threshold", required=True, type=float, help="the nullspace_threshold the file was made with")
    q.add_argument("--stats-dir", required=True, help="results/stats/MODEL/CORPUS holding each module's stats file")
    q.add_argument("--out-dir", required=True, help="results/stats/MODEL/CORPUS/nullspace-svd32 (the reference's rule)")
    q.add_argument("--rule", default="svd32", help="how the file's P was made (AlphaEdit / EasyEdit: svd32)")
    q.set_defaults(func=run_convert_projection)


def _parse_spec(text: str) -> dict:
    from ..io import EditscaleError

    path = Path(text)
    if not text.lstrip().startswith("{") and path.suffix == ".json" and path.exists():
        text = path.read_text()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--corpus-json is not valid JSON ({exc}): {text!r}") from exc
    return spec


def _setup(args):
    """Common start: spec, model sha, model."""
    from ..models.load import load_model, model_sha
    from .corpus import normalize_spec

    spec = normalize_spec(_parse_spec(args.corpus_json))
    sha = model_sha(args.model_dir)
    model, tok = load_model(args.model_dir, dtype=args.dtype, device=args.device)
    return spec, sha, model, tok


def _save_npy(path: Path, array) -> None:
    import numpy as np

    from ..io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, array)


def run_corpus(args) -> None:
    import contextlib
    import time

    import torch

    from ..io import provenance, write_json_atomic
    from ..models.load import load_model, model_sha, pick_device
    from .corpus import PAD, SamplingPool, opener_prompts, corpus_fingerprint, corpus_id, normalize_spec, sample_tokens

    spec = normalize_spec(_parse_spec(args.corpus_json))
    sha = model_sha(args.model_dir)
    device = pick_device(args.device)
    # Self-sampling on the CPU: one 1-thread worker process per thread of the job (--threads),
    # each holding the model (decoding on one thread per process is what scales; the tokens are
    # the same for any worker count). Elsewhere, the model in this process.
    workers = torch.get_num_threads() if spec["kind"] == "self_sample" and device.type == "cpu" else 1
    out_dir = Path(args.out_dir)
    cid = corpus_id(spec)
    log.info(
        "corpus %s (%s): %d stats + %d held-out tokens of %d-token sequences for %s -> %s%s",
        cid, spec["kind"], spec["n_tokens"], spec["heldout_tokens"], spec["seq_len"], args.model_dir, out_dir,
        f" ({workers} sampling processes of 1 thread)" if workers > 1 else "",
    )
    if workers > 1:
        from transformers import AutoConfig, AutoTokenizer

        model, tok = None, AutoTokenizer.from_pretrained(str(args.model_dir))
        opener_prompts(spec, tok, AutoConfig.from_pretrained(str(args.model_dir)))  # before any worker starts
        pool = SamplingPool(args.model_dir, args.dtype, workers)
    else:
        model, tok = load_model(args.model_dir, dtype=args.dtype, device=args.device)
        pool = None
    meta = {"corpus_id": cid, "corpus_spec": spec, "model_sha256": sha, "pad": PAD, "splits": {}, "sampling_processes": workers}
    arrays = {}
    with pool or contextlib.nullcontext():
        for split in ("stats", "heldout"):
            timings: dict = {}
            t0 = time.perf_counter()
            arrays[split] = sample_tokens(spec, tok, model, split, timings=timings, pool=pool)
            seconds = time.perf_counter() - t0
            n = int((arrays[split] != PAD).sum())
            meta["splits"][split] = {"shape": list(arrays[split].shape), "tokens": n, "seconds": round(seconds, 2)}
            msg = f"{split}: {arrays[split].shape[0]} sequences, {n} tokens in {seconds:.1f} s"
            if timings.get("generate_s"):
                rate = timings["generated_tokens"] / timings["generate_s"]
                meta["splits"][split]["generate_tok_s"] = round(rate, 1)
                msg += f" (self-sample generation {rate:.0f} tok/s)"
            log.info(msg)
    meta["provenance"] = provenance(inputs={"model": sha, "corpus": corpus_fingerprint(spec)}, device=str(device))
    for split, arr in arrays.items():
        _save_npy(out_dir / f"{split}.npy", arr)
    write_json_atomic(out_dir / "corpus.json", meta)
    log.info("wrote %s, %s, %s", out_dir / "stats.npy", out_dir / "heldout.npy", out_dir / "corpus.json")


def run_stats(args) -> None:
    import time

    import numpy as np

    from ..io import EditscaleError, sha256_file
    from .corpus import corpus_fingerprint, corpus_id, iter_corpus, tokens_to_batches
    from .mom2 import compute_mom2, write_mom2

    if args.batch_size is not None and args.batch_size < 1:
        raise EditscaleError(f"--batch-size must be positive, got {args.batch_size}")
    spec, sha, model, tok = _setup(args)
    batch_size = args.batch_size or spec["batch_size"]
    cid = args.corpus_id or corpus_id(spec)
    device = next(model.parameters()).device
    out_dir = Path(args.out_dir)
    targets = {m: out_dir / f"{m}.h5" for m in args.modules}
    log.info(
        "stats: E[kk^T] of %d module(s) of %s (sha256 %s..., %s on %s) over corpus %s, %d tokens of %d-token "
        "sequences, batch %d%s", len(targets), args.model_dir, sha[:12], args.dtype, device, cid, spec["n_tokens"],
        spec["seq_len"], batch_size, f", tokens from {args.tokens}" if args.tokens else "",
    )
    for m, path in targets.items():
        log.info("  %s -> %s", m, path)
    timings: dict = {}
    t0 = time.perf_counter()
    if args.tokens:
        tokens_path = Path(args.tokens)
        if not tokens_path.exists():
            raise EditscaleError(f"token file {tokens_path} not found (rule corpus_tokens / `editscale corpus`)")
        try:
            tokens = np.load(tokens_path)
        except (OSError, ValueError) as exc:
            raise EditscaleError(f"token file {tokens_path} is not a readable .npy array: {exc}") from exc
        vocab = model.get_input_embeddings().weight.shape[0]
        if tokens.size and int(tokens.max()) >= vocab:
            raise EditscaleError(f"token file {tokens_path}: token id {int(tokens.max())} >= vocabulary size {vocab} (another tokenizer?)")
        batches = tokens_to_batches(tokens, batch_size, tok.pad_token_id or 0, source=str(tokens_path))
        inputs = {"corpus": corpus_fingerprint(spec), "tokens": sha256_file(tokens_path)}
    else:
        batches = iter_corpus(spec, tok, model, "stats", batch_size=batch_size, timings=timings)
        inputs = {"corpus": corpus_fingerprint(spec)}
    convergence: dict = {}
    results = compute_mom2(
        model, tok, list(targets), batches, max_tokens=None if args.tokens else spec["n_tokens"],
        seq_len=spec["seq_len"], batch_size=batch_size, progress=not args.no_progress, timings=timings,
        convergence=convergence,
    )
    wall = time.perf_counter() - t0
    for m, path in targets.items():
        mom2, count = results[m]
        write_mom2(
            path, mom2, count, module=m, model_sha256=sha, corpus=cid, corpus_spec=spec, dtype=args.dtype,
            device=str(device), inputs=inputs, convergence=convergence.get(m),
        )
        log.info("wrote %s (d=%d, %d tokens)", path, mom2.shape[0], count)
        if convergence.get(m):  # how much C still moved while the token count doubled: choose the budget by it
            log.info("  convergence of %s: %s", m, ", ".join(f"{n} tok {100 * rel:.2f} %" for n, rel in convergence[m]))
    tokens = timings["tokens"]
    msg = (f"stats: {tokens} tokens in {wall:.1f} s wall ({tokens / wall:.0f} tok/s end to end); "
           f"forward + accumulation {timings['forward_s']:.1f} s = {tokens / timings['forward_s']:.0f} tok/s")
    if timings.get("generate_s"):
        msg += (f"; self-sample generation {timings['generated_tokens']} tokens in {timings['generate_s']:.1f} s = "
                f"{timings['generated_tokens'] / timings['generate_s']:.0f} tok/s")
    log.info(msg)


def run_convert_projection(args) -> None:
    from .convert import convert_projections

    info = convert_projections(args.pt, args.model_dir, args.layers, args.stats_dir, args.out_dir, args.threshold, args.rule)
    print(json.dumps(info, indent=2))


def run_nullspace(args) -> None:
    from ..io import sha256_file
    from .mom2 import null_space_projection_by_rule, read_stats, write_projection

    mom2, count, attrs = read_stats(args.stats)
    P, eigenvalues, rank = null_space_projection_by_rule(mom2, args.threshold, rule=args.rule, device=args.device)
    log.info(
        "nullspace (%s): %s (%s, %d tokens, d=%d): %d of %d eigenvalues < %g (eigenvalues %.3g .. %.3g) -> %s",
        args.rule, args.stats, attrs.get("module", "?"), count, mom2.shape[0], rank, mom2.shape[0], args.threshold,
        eigenvalues[0], eigenvalues[-1], args.out,
    )
    if rank == 0:
        log.warning("nullspace: no eigenvalue below %g: P = 0, AlphaEdit updates would vanish", args.threshold)
    write_projection(
        args.out, P, threshold=args.threshold, rule=args.rule, rank=rank, stats_sha256=sha256_file(args.stats),
        model_sha256=str(attrs.get("model_sha256", "")), module=str(attrs.get("module", "")),
        eigenvalues=eigenvalues, device=args.device,
    )


def run_convert_stats(args) -> None:
    import json

    from .convert import convert_rome_stats

    info = convert_rome_stats(args.npz, args.model_dir, args.out, module=args.module, corpus=args.corpus,
                              source_url=args.source_url)
    print(json.dumps(info, indent=2, sort_keys=True))
