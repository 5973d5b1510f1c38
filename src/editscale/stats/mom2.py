"""Second moment C = E[k k^T] of the inputs k of edited modules, its HDF5 files, and AlphaEdit's
null-space projection derived from it.

ROME and MEMIT need C for the edited matrix W (k is the input of W: the MLP hidden activation,
e.g. the input of `model.layers.4.mlp.down_proj`, or of GPT-2's Conv1D `transformer.h.3.mlp.c_proj`).
C is uncentred (as in ROME's `layer_stats` / `SecondMoment`): sum over tokens of k k^T divided by
the token count, over every non-padding token of the corpus. Sums are kept in float64 whatever
the model dtype: 10^5..10^7 rank-one terms in fp16/fp32 would lose the small eigenvalues that
C^-1 and the null space depend on.

Files, one per module: results/stats/{model}/{corpus}/{module}.h5
    dataset mom2   float64 [d, d]  E[k k^T] = sum / count
    dataset count  int64 scalar    number of tokens
    attrs          model_sha256, corpus, corpus_spec (json), token_count, dtype, module,
                   editscale_version and the rest of editscale.io.provenance()

Projection files (AlphaEdit): dataset P float64 [d, d], dataset eigenvalues (ascending), attrs
threshold, rank (number of null directions), stats_sha256, model_sha256, module, provenance.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..io import EditscaleError, array_sha256, atomic_h5, provenance
from ..models.nethook import Trace
from .corpus import texts_to_batches

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Accumulation


def _as_batches(data, tok, seq_len: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Accept token batches (dicts with input_ids / attention_mask, or id tensors) or plain texts."""
    if isinstance(data, (str, dict, torch.Tensor)):
        data = [data]
    it = iter(data)
    try:
        first = next(it)
    except StopIteration:
        return
    it = itertools.chain([first], it)
    if isinstance(first, str):
        yield from texts_to_batches(it, tok, seq_len=seq_len, batch_size=batch_size)
        return
    for item in it:
        if isinstance(item, torch.Tensor):
            ids = item if item.dim() == 2 else item.view(1, -1)
            yield {"input_ids": ids.long(), "attention_mask": torch.ones_like(ids, dtype=torch.long)}
        elif isinstance(item, dict) and "input_ids" in item:
            ids = torch.as_tensor(item["input_ids"]).long()
            ids = ids if ids.dim() == 2 else ids.view(1, -1)
            mask = item.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long().view_as(ids)
            yield {"input_ids": ids, "attention_mask": mask}
        else:
            raise EditscaleError(
                f"compute_mom2: cannot use a corpus item of type {type(item).__name__}; "
                "give strings, id tensors or dicts with input_ids/attention_mask"
            )


def compute_mom2(
    model: torch.nn.Module,
    tok,
    modules: list[str],
    texts_or_token_batches: Iterable,
    *,
    max_tokens: int | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    timings: dict | None = None,
    stop_early: bool = True,
    convergence: dict | None = None,
    convergence_start: int = 4096,
) -> dict[str, tuple[np.ndarray, int]]:
    """E[k k^T] of the input k of each module in `modules`, over all non-padding tokens, one pass.

    `texts_or_token_batches`: strings (cut into seq_len windows, batch_size rows per forward) or
    token batches as yielded by `iter_corpus` (right padded; attention_mask 0 marks padding).
    Stops after `max_tokens` tokens (the last batch is cut token-exactly). The forward pass is
    aborted right after the highest requested module, so neither the layers above it nor the LM
    head are computed. Returns {module: (mom2 float64 [d, d], token count)}.
    `timings` (if given) receives "forward_s" and "tokens": the time spent in the forward pass
    and accumulation only, apart from time spent producing the batches (e.g. sampling).
    `stop_early=False` runs the whole model, LM head included (what a plain forward costs; for
    benchmarks/ only: the result is the same).
    `convergence` (if given) receives, per module, the convergence read-out: [(n, ||C_n - C_n/2||_F /
    ||C_n||_F)] at n = convergence_start, 2x, 4x, ... tokens (the first batch end at or past each
    point) and at the end, i.e. how much the estimate still moved while its token count doubled
    (FastMEMIT reports the same relative change against the token budget). The previous estimate
    is kept on the host, so the read-out costs no device memory.
    """
    modules = list(dict.fromkeys(modules))
    if not modules:
        raise EditscaleError("compute_mom2: no module requested")
    device = next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    forward_s = 0.0
    next_point, previous = int(convergence_start), {}

    def read_out() -> None:  # C at this count against C at the previous point (host memory)
        for name, s in sums.items():
            cur = (s / count).cpu()
            if name in previous:
                rel = float((cur - previous[name][1]).norm() / cur.norm().clamp_min(1e-300))
                convergence.setdefault(name, []).append((count, rel))
            previous[name] = (count, cur)

    t_start = time.perf_counter()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="mom2", disable=not progress, dynamic_ncols=True)
    try:
        for batch in _as_batches(texts_or_token_batches, tok, seq_len, batch_size):
            if max_tokens is not None and count >= max_tokens:
                break
            t0 = time.perf_counter()
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            if max_pos and ids.shape[1] > max_pos:
                raise EditscaleError(f"compute_mom2: sequences of {ids.shape[1]} tokens exceed the model's {max_pos} positions")
            keep = mask.bool()
            if max_tokens is not None:
                # Token-exact budget: keep the first (max_tokens - count) real tokens, row-major.
                keep = keep & (keep.flatten().cumsum(0) <= max_tokens - count).view_as(keep)
            n = int(keep.sum())
            if n == 0:
                continue
            with torch.no_grad(), Trace(model, modules, stop=stop_early, keep_outputs=False) as tr:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for name in modules:
                if name not in tr.inputs:
                    raise EditscaleError(f"compute_mom2: module {name!r} was not called in the forward pass")
                # [B, T, d] -> [n, d] real tokens only; float64 before the product, not after.
                k = tr.inputs[name][keep].to(torch.float64)
                if name not in sums:
                    sums[name] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=device)
                sums[name].addmm_(k.T, k)
            count += n
            forward_s += time.perf_counter() - t0
            if convergence is not None and count >= next_point:
                read_out()
                while next_point <= count:
                    next_point *= 2
            bar.update(n)
            if timings is not None and timings.get("generate_s"):
                bar.set_postfix(gen_tok_s=f"{timings['generated_tokens'] / timings['generate_s']:.0f}", refresh=False)
    finally:
        bar.close()
    if count == 0:
        raise EditscaleError("compute_mom2: the corpus produced no tokens")
    if convergence is not None and any(previous.get(name, (0,))[0] != count for name in sums):
        read_out()  # the final estimate against the last point
    if timings is not None:
        timings["forward_s"] = timings.get("forward_s", 0.0) + forward_s
        timings["tokens"] = timings.get("tokens", 0) + count
        timings["total_s"] = timings.get("total_s", 0.0) + time.perf_counter() - t_start
    # Symmetrize away the last-bit asymmetry of the float64 products.
    return {name: (((s + s.T) / (2 * count)).cpu().numpy(), count) for name, s in sums.items()}


# ---------------------------------------------------------------------------------------------
# HDF5 files


def _attr(value: Any) -> Any:
    return value if isinstance(value, (int, float, np.integer, np.floating)) else str(value)


def write_mom2(
    path: str | Path,
    mom2: np.ndarray,
    count: int,
    *,
    module: str,
    model_sha256: str,
    corpus: str,
    corpus_spec: dict,
    dtype: str,
    device: str = "cpu",
    inputs: dict[str, str] | None = None,
    config_hash: str = "",
    convergence: list[tuple[int, float]] | None = None,
) -> None:
    """Write one module's statistics atomically (temp file, fsync, rename); `convergence`: the
    read-out of compute_mom2, stored as dataset `convergence` [n, 2] = (tokens, relative change)."""
    mom2 = np.asarray(mom2, dtype=np.float64)
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise EditscaleError(f"write_mom2 {path}: mom2 must be a square matrix, got shape {mom2.shape}")
    attrs = {
        **provenance(config_hash=config_hash, inputs={"model": model_sha256, **(inputs or {})}, device=device),
        "model_sha256": model_sha256,
        "corpus": corpus,
        "corpus_spec": json.dumps(corpus_spec, sort_keys=True),
        "token_count": int(count),
        "dtype": str(dtype).replace("torch.", ""),
        "module": module,
        "editscale_version": __version__,
        "content_sha256": array_sha256(mom2, np.int64(count)),  # checked by every read
    }
    with atomic_h5(path) as f:
        f.create_dataset("mom2", data=mom2)
        f.create_dataset("count", data=np.int64(count))
        if convergence:
            f.create_dataset("convergence", data=np.asarray(convergence, dtype=np.float64).reshape(-1, 2))
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)


def _open(path: str | Path, what: str) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"{what} file {path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise EditscaleError(f"{what} file {path} is not a readable HDF5 file: {exc}") from exc


def _attrs_dict(f: h5py.File) -> dict[str, Any]:
    out = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _check_sha(path, attrs: dict, expected_model_sha: str | None, what: str) -> None:
    if expected_model_sha is None:
        return
    found = attrs.get("model_sha256")
    if found != expected_model_sha:
        raise EditscaleError(
            f"{what} file {path} was computed for model sha256 {found} but the model in use has sha256 "
            f"{expected_model_sha}: recompute it for this model"
        )


def _check_content(path, attrs: dict, what: str, *arrays) -> None:
    """The stored matrices must still hash to the content_sha256 recorded when the file was
    written: a flipped byte in a valid HDF5 file would otherwise change every edit silently."""
    recorded = attrs.get("content_sha256")
    if recorded is None:
        log.warning("%s file %s records no content_sha256 (written by an older editscale): its content is not verified", what, path)
        return
    if array_sha256(*arrays) != recorded:
        raise EditscaleError(
            f"{what} file {path} is corrupt: its content no longer matches the content_sha256 recorded when it was "
            f"written. Delete it and re-run the workflow to rebuild it and everything computed from it: "
            f"rm {path} && snakemake --cores all"
        )


def content_sha256(path: str | Path) -> str | None:
    """The content_sha256 a stats or projection file recorded when it was written."""
    with _open(path, "stats") as f:
        return _attrs_dict(f).get("content_sha256")


def verify_content(path: str | Path) -> str:
    """Re-hash a stats or projection file's matrices against its recorded content_sha256 (an
    EditscaleError naming the file and the repair when they differ); returns the hash."""
    with _open(path, "stats") as f:
        attrs = _attrs_dict(f)
        if "P" in f:
            what, arrays = "projection", (np.asarray(f["P"][()], dtype=np.float64),)
        else:
            what = "stats"
            arrays = (np.asarray(_dataset(f, path, "mom2", what), dtype=np.float64), np.int64(int(_dataset(f, path, "count", what))))
    _check_content(path, attrs, what, *arrays)
    return attrs.get("content_sha256") or array_sha256(*arrays)


def _dataset(f: h5py.File, path, name: str, what: str) -> np.ndarray:
    if name not in f:
        raise EditscaleError(f"{what} file {path} has no dataset {name!r} (datasets: {sorted(f.keys())})")
    return f[name][()]


def read_stats_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of a stats file (model_sha256, corpus, token_count, ...)."""
    with _open(path, "stats") as f:
        return _attrs_dict(f)


def read_stats(path: str | Path, expected_model_sha: str | None = None) -> tuple[np.ndarray, int, dict[str, Any]]:
    """(mom2 float64 [d, d], count, attrs); checks the model sha if `expected_model_sha` is given."""
    with _open(path, "stats") as f:
        attrs = _attrs_dict(f)
        _check_sha(path, attrs, expected_model_sha, "stats")
        mom2 = np.asarray(_dataset(f, path, "mom2", "stats"), dtype=np.float64)
        count = int(_dataset(f, path, "count", "stats"))
    _check_content(path, attrs, "stats", mom2, np.int64(count))
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise EditscaleError(f"stats file {path}: dataset 'mom2' is not a square matrix (shape {mom2.shape})")
    return mom2, count, attrs


def read_mom2(path: str | Path, expected_model_sha: str | None = None) -> np.ndarray:
    """E[k k^T] (float64 [d, d]) from a stats file; EditscaleError if it belongs to another model."""
    return read_stats(path, expected_model_sha)[0]


# ---------------------------------------------------------------------------------------------
# AlphaEdit null-space projection


# How the null-space projection is computed: "eigh64" (editscale's default: eigh of the float64 C)
# or "svd32" (AlphaEdit's reference, experiments/evaluate.py `get_project`: torch.linalg.svd of C as
# its statistics store it, float32, and U0 U0^T in float32). Where the threshold falls in a dense
# part of the spectrum the two select different directions (docs/fidelity.md).
PROJECTION_RULES = ("eigh64", "svd32")


def null_space_projection_by_rule(mom2: np.ndarray, threshold: float, rule: str = "eigh64", device: str = "cpu") -> tuple[np.ndarray, np.ndarray, int]:
    """(P float64 [d, d], the spectrum ascending (eigenvalues, or singular values for svd32), rank)."""
    if rule not in PROJECTION_RULES:
        raise EditscaleError(f"projection_rule must be one of {list(PROJECTION_RULES)}, got {rule!r}")
    if rule == "eigh64":
        u0, values = null_space_basis(mom2, threshold, device=device)
        return u0 @ u0.T, values, u0.shape[1]
    c32 = torch.from_numpy(_checked_mom2(mom2, threshold)).to(device=device, dtype=torch.float32)
    U, S, _ = torch.linalg.svd(c32, full_matrices=False)
    small = (S < threshold).nonzero(as_tuple=True)[0]
    P = (U[:, small] @ U[:, small].T).double().cpu().numpy()
    return P, np.sort(S.double().cpu().numpy()), int(small.numel())


def null_space_basis(mom2: np.ndarray, threshold: float, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(U_0 [d, r], all eigenvalues ascending): eigenvectors of mom2 with eigenvalue < threshold.

    The threshold is absolute and applies to mom2 as stored, i.e. normalized by the token count.
    That is what AlphaEdit's code thresholds too: its `get_project` takes the SVD of
    `stat.mom2.moment()` from ROME's layer_stats, which is sum(k k^T) / count, although the paper
    writes K0 K0^T; its released settings use thresholds of order 1e-2 (1e-2 .. 2e-2). For the
    unnormalized K0 K0^T = count * mom2, the equivalent threshold is count * threshold. Being
    absolute, it depends on the scale of the keys of the model and layer: check `rank`.
    """
    m = _checked_mom2(mom2, threshold)
    # eigh (symmetric) rather than SVD: C is symmetric PSD, so its eigenvectors are its singular
    # vectors and eigh is cheaper and returns real, ordered eigenvalues.
    t = torch.from_numpy((m + m.T) / 2).to(device)
    vals, vecs = torch.linalg.eigh(t)
    vals, vecs = vals.cpu().numpy(), vecs.cpu().numpy()
    return vecs[:, vals < threshold], vals


def _checked_mom2(mom2: np.ndarray, threshold: float) -> np.ndarray:
    """mom2 as a float64 array, after the checks every projection rule needs (threshold, shape, finite)."""
    if not np.isfinite(threshold) or threshold <= 0:
        raise EditscaleError(f"null-space threshold must be a positive number, got {threshold}")
    m = np.asarray(mom2, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise EditscaleError(f"null-space projection needs a square matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise EditscaleError("null-space projection: mom2 contains NaN or Inf")
    return m


def null_space_projection(mom2: np.ndarray, threshold: float) -> np.ndarray:
    """P = U_0 U_0^T, the orthogonal projector onto the span of mom2's eigenvectors with
    eigenvalue < threshold (AlphaEdit: updates W P leave the preserved keys' outputs unchanged)."""
    u0, _ = null_space_basis(mom2, threshold)
    return u0 @ u0.T


def write_projection(
    path: str | Path,
    P: np.ndarray,
    *,
    threshold: float,
    rank: int,
    stats_sha256: str,
    model_sha256: str,
    module: str = "",
    eigenvalues: np.ndarray | None = None,
    device: str = "cpu",
    rule: str = "eigh64",
) -> None:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise EditscaleError(f"write_projection {path}: P must be square, got shape {P.shape}")
    attrs = {
        **provenance(inputs={"model": model_sha256, "stats": stats_sha256}, device=device),
        "threshold": float(threshold),
        "rule": rule,
        "rank": int(rank),
        "stats_sha256": stats_sha256,
        "model_sha256": model_sha256,
        "module": module,
        "editscale_version": __version__,
        "content_sha256": array_sha256(P),  # checked by every read
    }
    with atomic_h5(path) as f:
        f.create_dataset("P", data=P)
        if eigenvalues is not None:
            f.create_dataset("eigenvalues", data=np.asarray(eigenvalues, dtype=np.float64))
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)


def read_projection_attrs(path: str | Path) -> dict[str, Any]:
    with _open(path, "projection") as f:
        return _attrs_dict(f)


def read_projection(path: str | Path, expected_model_sha: str | None = None) -> np.ndarray:
    """P (float64 [d, d]); EditscaleError naming the file and both shas if it is for another model."""
    with _open(path, "projection") as f:
        attrs = _attrs_dict(f)
        _check_sha(path, attrs, expected_model_sha, "projection")
        P = np.asarray(_dataset(f, path, "P", "projection"), dtype=np.float64)
    _check_content(path, attrs, "projection", P)
    return P


@dataclass(frozen=True)
class PrecomputedKind:
    """An input the stats stage computes for the edit jobs (EditMethod.precomputed names its kind):
    how an edit job reads one file of it, the keyword the method's constructor takes the
    module -> tensor mapping by, and the prefix of its provenance records."""

    read: Callable  # read(path, expected_model_sha) -> numpy array
    argument: str
    role: str


# kind -> how the edit chain hands it to a method (the chain names no kind itself)
PRECOMPUTED_KINDS = {
    "mom2": PrecomputedKind(read_mom2, argument="stats", role="stats"),
    "nullspace": PrecomputedKind(read_projection, argument="projections", role="projection"),
}
