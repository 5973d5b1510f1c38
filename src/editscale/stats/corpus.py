"""Corpora for the key statistics C = E[k k^T]: where the text (or tokens) comes from.

A corpus is a JSON-able spec dict; `corpus_id(spec)` names it (a short readable label plus a hash
of the normalized spec), and `iter_corpus(spec, tok, model, split)` yields right-padded token
batches {"input_ids", "attention_mask"} of at most `seq_len` tokens per row.

Kinds (common keys: n_tokens, seq_len, seed):

  {"kind": "hf_dataset", "name": "wikitext", "config": "wikitext-103-raw-v1", "split": "train"}
      A Hugging Face dataset via the optional `datasets` package (what ROME and MEMIT use:
      WikiText-103 or Wikipedia "20220301.en"; recent `datasets` releases no longer run the old
      "wikipedia" loading script, use {"name": "wikimedia/wikipedia", "config": "20231101.en"}).
      Extra keys: text_field ("text"), revision, streaming (False), shuffle (True).
  {"kind": "text_files", "glob": "path/*.txt"}
      Local UTF-8 text files; each blank-line separated paragraph is one document. Key: shuffle.
  {"kind": "self_sample"}  (the offline default)
      Text sampled from the unedited model itself; keys: openers, gen_batch_size.

Why self-sampling works as an offline default: the statistic C = E[k k^T] is meant to describe
the keys the model sees on its typical inputs, so that an edit disturbs them as little as
possible. With no corpus reachable offline, the model's own samples (temperature 1, full
distribution, no top-k / top-p truncation) are a sample of the distribution it was trained to
reproduce; this is the data-free approach used e.g. by LLM-QAT (Liu et al. 2023) to calibrate
quantization without the training data. It is an approximation: the samples carry the model's
own errors and biases, an instruct model's samples drift towards its fine-tuning style, and the
small fixed set of openers (plus any BOS the tokenizer adds) slightly over-represents
document-initial contexts. Sampling does not stop at EOS: like packed pre-training data, what
follows an end-of-text token is the start of another document, so every row is exactly seq_len
tokens and no padding is wasted.

Held-out split (for the perplexity metric, `heldout_tokens` tokens), disjoint from the stats
split by construction:
  text corpora  documents are taken in a fixed (seeded) order; "stats" reads documents from the
                start until n_tokens is reached, "heldout" starts at the first document "stats"
                did not touch.
  self_sample   "heldout" samples with a different seed stream (seed, "heldout", batch index).

Token files (`editscale corpus`, rule corpus_tokens): `sample_tokens` materializes a split as an
int64 array [n_seq, seq_len]. The stats split keeps one row per window (a document chunk) and
marks padding with PAD = -1, never a real token id; the held-out split is packed into full rows
(documents concatenated, separated by EOS where the tokenizer adds no BOS), the form the
perplexity metric reads.

Determinism: the same spec gives the same tokens on the same machine, whatever its core count
(sampling is seeded per generate call, and on the CPU every call runs on one thread, in this
process or in a worker of `SamplingPool`); a different BLAS or device can change logits in the
last bits and so, rarely, a sampled token.
"""

from __future__ import annotations

import copy
import glob as globlib
import hashlib
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..config import schema
from ..io import EditscaleError, sha256_file, sha256_json

log = logging.getLogger(__name__)

PAD = -1  # padding in stats token files: not a token id, so no real token can be mistaken for it
# batch_size: sequences per forward pass of the stats pass; it does not change the data, so it is
# left out of the corpus id.
# the keys every kind shares, with the schema's defaults and lower bounds (editscale/schema.yaml
# corpora: the one source of both)
_CORPUS_SCHEMA = schema()["properties"]["corpora"]["additionalProperties"]["properties"]
COMMON_DEFAULTS: dict[str, Any] = {k: _CORPUS_SCHEMA[k]["default"] for k in ("n_tokens", "heldout_tokens", "seq_len", "seed", "batch_size")}
COMMON_MINIMUM: dict[str, int] = {k: _CORPUS_SCHEMA[k]["minimum"] for k in ("n_tokens", "heldout_tokens", "seq_len", "batch_size")}
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "hf_dataset": {"name": None, "config": None, "split": "train", "text_field": "text", "revision": None,
                   "streaming": False, "shuffle": True},
    "text_files": {"glob": None, "shuffle": True},
    "self_sample": {"openers": ["The", "In", "A", "It"], "gen_batch_size": 32},
}
REQUIRED = {"hf_dataset": ["name"], "text_files": ["glob"], "self_sample": []}
SPLITS = ("stats", "heldout")
DEFAULT_SPEC = {"kind": "self_sample"}


def normalize_spec(spec: dict) -> dict:
    """Validate a corpus spec and fill in defaults (the normalized spec is what gets hashed)."""
    if not isinstance(spec, dict):
        raise EditscaleError(f"corpus spec must be a JSON object, got {type(spec).__name__}: {spec!r}")
    kind = spec.get("kind")
    if kind not in KIND_DEFAULTS:
        raise EditscaleError(f"corpus spec {spec!r}: 'kind' must be one of {sorted(KIND_DEFAULTS)}, got {kind!r}")
    allowed = {"kind", *COMMON_DEFAULTS, *KIND_DEFAULTS[kind]}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise EditscaleError(f"corpus spec of kind {kind!r} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    out = {"kind": kind, **COMMON_DEFAULTS, **copy.deepcopy(KIND_DEFAULTS[kind])}
    out.update(copy.deepcopy(spec))
    for key in REQUIRED[kind]:
        if not out.get(key):
            raise EditscaleError(f"corpus spec of kind {kind!r} needs key {key!r}: {spec!r}")
    for key, low in COMMON_MINIMUM.items():
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < low:
            raise EditscaleError(f"corpus spec key {key!r} must be an integer >= {low}, got {out[key]!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise EditscaleError(f"corpus spec key 'seed' must be an integer, got {out['seed']!r}")
    if kind == "self_sample":
        openers = out["openers"]
        if not isinstance(openers, list) or not openers or not all(isinstance(o, str) and o for o in openers):
            raise EditscaleError(f"corpus spec key 'openers' must be a non-empty list of non-empty strings, got {openers!r}")
        if not isinstance(out["gen_batch_size"], int) or out["gen_batch_size"] < 1:
            raise EditscaleError(f"corpus spec key 'gen_batch_size' must be a positive integer, got {out['gen_batch_size']!r}")
    return out


def corpus_id(spec: dict) -> str:
    """Short, filesystem-safe name: a readable label plus 10 hex digits of the normalized spec's hash."""
    spec = normalize_spec(spec)
    if spec["kind"] == "hf_dataset":
        label = spec["config"] or spec["name"]
    else:
        label = spec["kind"]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", str(label)).strip("_") or spec["kind"]
    spec.pop("batch_size")
    return f"{label}-{sha256_json(spec)[:10]}"


def corpus_fingerprint(spec: dict) -> str:
    """Hash of what the corpus reads: for text files the files' contents (so that editing a file is
    visible in provenance even though the spec, and so the corpus id, did not change); otherwise
    the normalized spec (the dataset version is pinned by its revision key)."""
    spec = normalize_spec(spec)
    if spec["kind"] == "text_files":
        return sha256_json({p: sha256_file(p) for p in _text_file_paths(spec)})
    return sha256_json(spec)


# ---------------------------------------------------------------------------------------------
# Entry point


def iter_corpus(
    spec: dict,
    tok,
    model=None,
    split: str = "stats",
    *,
    batch_size: int | None = None,
    n_tokens: int | None = None,
    timings: dict | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield right-padded batches {"input_ids": [B, T] long, "attention_mask": [B, T] long}, T <= seq_len.

    At most `n_tokens` non-padding tokens in total (default: the spec's n_tokens for "stats",
    heldout_tokens for "heldout"); `batch_size` defaults to the spec's. `model` is needed for
    self_sample only. For self_sample, `timings` (if given) receives "generate_s" and
    "generated_tokens" so that generation speed can be reported apart from the statistics pass.
    """
    spec = normalize_spec(spec)
    batch_size = spec["batch_size"] if batch_size is None else batch_size
    if batch_size < 1:
        raise EditscaleError(f"batch_size must be positive, got {batch_size}")
    # Self-sampled rows are all seq_len long (but the budget-cut last one): no length sorting needed.
    sort_buffer = 1 if spec["kind"] == "self_sample" else 16
    yield from batch_windows(_windows(spec, tok, model, split, n_tokens, timings), batch_size, _pad_id(tok), sort_buffer)


def sample_tokens(spec: dict, tok, model=None, split: str = "stats", *, timings: dict | None = None,
                  pool: "SamplingPool | None" = None) -> np.ndarray:
    """A split as an int64 array [n_seq, seq_len] (see "Token files" above); `pool`: sample a
    self_sample corpus with worker processes (then `model` may be None).

    "stats": one row per window, padding = PAD (-1), n_tokens real tokens in all.
    "heldout": heldout_tokens // seq_len full rows of real tokens (no padding).
    """
    spec = normalize_spec(spec)
    seq_len = spec["seq_len"]
    if split == "stats":
        rows = [np.asarray(w, dtype=np.int64) for w in _windows(spec, tok, model, "stats", None, timings, pool)]
        out = np.full((len(rows), seq_len), PAD, dtype=np.int64)
        for i, w in enumerate(rows):
            out[i, : len(w)] = w
        return out
    n_rows = spec["heldout_tokens"] // seq_len
    if n_rows == 0:
        raise EditscaleError(
            f"corpus spec: heldout_tokens={spec['heldout_tokens']} is less than one sequence of seq_len={seq_len} tokens"
        )
    if spec["kind"] == "self_sample":
        rows = list(_windows(spec, tok, model, "heldout", n_rows * seq_len, timings, pool))  # full rows
    else:
        rows = list(_pack(_split_documents(spec, tok, "heldout"), seq_len, n_rows, _separator_id(tok)))
    if len(rows) < n_rows:
        log.warning("held-out split: %d full rows of %d tokens, fewer than the %d requested", len(rows), seq_len, n_rows)
    if not rows:
        raise EditscaleError("the held-out split has less than one full sequence of text")
    return np.stack([np.asarray(r, dtype=np.int64) for r in rows])


def tokens_to_batches(tokens: np.ndarray, batch_size: int, pad_id: int, source: str = "token array") -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a token array written by `sample_tokens` (PAD marks padding)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise EditscaleError(f"{source}: expected an integer array [n_seq, seq_len], got {tokens.dtype} {tokens.shape}")
    if tokens.size and tokens.min() < PAD:
        raise EditscaleError(f"{source}: negative token id {int(tokens.min())} (only {PAD} marks padding)")
    rows = (torch.from_numpy(row[row != PAD].astype(np.int64)) for row in tokens)
    yield from batch_windows(rows, batch_size, pad_id)


def _windows(spec: dict, tok, model, split: str, n_tokens: int | None, timings: dict | None,
             pool: "SamplingPool | None" = None) -> Iterator:
    """Token windows (<= seq_len real tokens each) of a split, in corpus order, within the budget."""
    if split not in SPLITS:
        raise EditscaleError(f"corpus split must be one of {SPLITS}, got {split!r}")
    budget = spec["n_tokens" if split == "stats" else "heldout_tokens"] if n_tokens is None else int(n_tokens)
    if budget < 1:
        raise EditscaleError(f"corpus split {split!r}: token budget must be positive, got {budget}")
    if spec["kind"] == "self_sample":
        if model is None and pool is None:
            raise EditscaleError("corpus kind 'self_sample' samples from the model: pass the model")
        return _self_sample_rows(spec, tok, model, split, budget, timings, pool)
    return _budget_windows(_split_documents(spec, tok, split), spec["seq_len"], budget, split)


def texts_to_batches(texts: Iterable[str], tok, seq_len: int = 128, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from plain strings: each text tokenized and cut into seq_len windows (no budget)."""
    yield from batch_windows(_budget_windows(_token_stream(texts, tok), seq_len, math.inf, "texts"), batch_size, _pad_id(tok))


def batch_windows(
    windows: Iterable[list[int] | torch.Tensor], batch_size: int, pad_id: int, sort_buffer: int = 16
) -> Iterator[dict[str, torch.Tensor]]:
    """Group token windows into right-padded batches.

    Windows are sorted by length inside a buffer of `sort_buffer` batches so that short documents
    (headings, one-line paragraphs) are not padded to the length of long ones; the order of
    tokens inside a window never changes, so the statistics do not depend on this.
    """

    def emit(buf):
        buf = sorted(buf, key=len, reverse=True) if sort_buffer > 1 else buf
        for i in range(0, len(buf), batch_size):
            chunk = buf[i : i + batch_size]
            width = max(len(w) for w in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.as_tensor(w, dtype=torch.long)
                mask[r, : len(w)] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    buf: list = []
    for w in windows:
        if len(w) == 0:
            continue
        buf.append(w)
        if len(buf) >= batch_size * sort_buffer:
            yield from emit(buf)
            buf = []
    if buf:
        yield from emit(buf)


# ---------------------------------------------------------------------------------------------
# Text corpora


def _pad_id(tok) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


def _token_stream(docs: Iterable[str], tok, chunk: int = 64) -> Iterator[list[int]]:
    """Token ids of each non-empty document; tokenized `chunk` documents at a time (fast tokenizers
    parallelize a list). Special tokens are added as the tokenizer does for any input (e.g. a
    Llama BOS per document), so the keys match what the model sees in use."""
    buf: list[str] = []
    for doc in docs:
        if doc and doc.strip():
            buf.append(doc)
        if len(buf) == chunk:
            yield from tok(buf, add_special_tokens=True, verbose=False)["input_ids"]
            buf = []
    if buf:
        yield from tok(buf, add_special_tokens=True, verbose=False)["input_ids"]


def _separator_id(tok) -> int | None:
    """Token put between packed documents where the tokenizer does not start each one with BOS."""
    starts_with_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
    return None if starts_with_bos else tok.eos_token_id


def _split_documents(spec: dict, tok, split: str) -> Iterator[list[int]]:
    """Token ids of the documents of a split of a text corpus.

    "heldout" first skips the documents the "stats" split reads (those before the one in which
    the stats budget ran out, that one included), so the two splits share no document.
    """
    docs = _token_stream(_hf_documents(spec) if spec["kind"] == "hf_dataset" else _text_file_documents(spec), tok)
    if split == "heldout":
        seen = 0
        for ids in docs:
            seen += len(ids)
            if seen >= spec["n_tokens"]:
                break
        else:
            raise EditscaleError(
                f"the corpus has only {seen} tokens, all used by the stats split (n_tokens={spec['n_tokens']}); "
                "nothing is left for the held-out split: lower n_tokens or add text"
            )
    return docs


def _budget_windows(docs: Iterable[list[int]], seq_len: int, budget, split: str) -> Iterator[list[int]]:
    """Cut documents into windows of <= seq_len tokens until `budget` tokens are out."""
    used = 0
    for ids in docs:
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if used + len(window) > budget:
                window = window[: int(budget - used)]
            if window:
                yield window
                used += len(window)
            if used >= budget:
                return
    if used == 0:
        raise EditscaleError(f"the corpus split {split!r} produced no tokens")
    if budget != math.inf:
        log.warning("corpus exhausted: split %r has %d tokens, fewer than the %d requested", split, used, budget)


def _pack(docs: Iterable[list[int]], seq_len: int, n_rows: int, sep: int | None) -> Iterator[list[int]]:
    """Concatenate documents (with `sep` between them) and cut full rows of seq_len tokens."""
    buf: list[int] = []
    made = 0
    for i, ids in enumerate(docs):
        buf.extend(([sep] if sep is not None and i > 0 else []) + list(ids))
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
            made += 1
            if made == n_rows:
                return


def _text_file_paths(spec: dict) -> list[str]:
    pattern = spec["glob"]
    paths = sorted(p for p in globlib.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
    if not paths:
        raise EditscaleError(f"text_files corpus: glob {pattern!r} matches no file")
    return paths


def _text_file_documents(spec: dict) -> Iterator[str]:
    docs: list[str] = []
    for path in _text_file_paths(spec):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EditscaleError(f"text_files corpus: cannot read {path} as UTF-8 text: {exc}") from exc
        docs.extend(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())
    if spec["shuffle"]:
        # Seeded shuffle so that the first n_tokens are not all from the first file.
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
        docs = [docs[i] for i in order]
    return iter(docs)


def _hf_documents(spec: dict) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise EditscaleError(
            "corpus kind 'hf_dataset' needs the optional `datasets` package: pip install datasets "
            "(or use a 'text_files' or the offline 'self_sample' corpus)"
        ) from exc
    what = f"{spec['name']!r} config {spec['config']!r} split {spec['split']!r}"
    try:
        ds = datasets.load_dataset(
            spec["name"], spec["config"], split=spec["split"], revision=spec["revision"], streaming=spec["streaming"]
        )
    except Exception as exc:  # network, unknown name/config/split: one readable message
        raise EditscaleError(f"hf_dataset corpus: cannot load dataset {what}: {exc}") from exc
    field = spec["text_field"]
    columns = ds.column_names or []
    if columns and field not in columns:
        raise EditscaleError(f"hf_dataset corpus {what}: no text field {field!r}; columns are {columns}")
    if spec["shuffle"]:
        ds = ds.shuffle(seed=spec["seed"], buffer_size=10_000) if spec["streaming"] else ds.shuffle(seed=spec["seed"])
    if not spec["streaming"]:
        ds = ds.select_columns([field])
    return (row[field] for row in ds)


# ---------------------------------------------------------------------------------------------
# Self-sampled corpus


def _stream_seed(seed: int, split: str, index: int) -> int:
    """Independent seed per (split, batch): stats and heldout never share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def _self_sample_plan(spec: dict, budget: int) -> list[int]:
    """Rows per generate call: gen_batch_size rows each, the last call only the rows still needed
    (a small held-out split costs little)."""
    seq_len, per_call = spec["seq_len"], spec["gen_batch_size"]
    plan, rows = [], math.ceil(budget / seq_len)
    while rows > 0:
        plan.append(min(per_call, rows))
        rows -= plan[-1]
    return plan


def opener_prompts(spec: dict, tok, model_config) -> list[list[int]]:
    """The openers as the tokenizer encodes any input (adds BOS where the model family expects one),
    checked against seq_len and the model's positions."""
    seq_len = spec["seq_len"]
    prompts = [tok(o, add_special_tokens=True)["input_ids"] for o in spec["openers"]]
    if max(len(p) for p in prompts) >= seq_len:
        raise EditscaleError(f"self_sample corpus: an opener is as long as seq_len={seq_len} tokens: {spec['openers']}")
    max_pos = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if max_pos and seq_len > max_pos:
        raise EditscaleError(f"self_sample corpus: seq_len={seq_len} exceeds the model's {max_pos} positions")
    return prompts


def generate_call(spec: dict, tok, model, split: str, index: int, n_rows: int) -> list[torch.Tensor]:
    """Call `index` of a split: n_rows rows of seq_len tokens sampled from the model.

    Row r gets opener r mod len(openers), left-padded as decoder-only generation requires (the
    padding is removed again). The sampler is seeded per (seed, split, index), so a call's rows do
    not depend on which calls ran before it or in which process. On the CPU a call runs on one
    torch thread: a matrix product's summation order, and so rarely a sampled token, can depend
    on the thread count, and one thread per call makes the tokens the same for any number of
    cores or workers (`SamplingPool`)."""
    from transformers import GenerationConfig

    prompts = opener_prompts(spec, tok, model.config)
    seq_len = spec["seq_len"]
    gen_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,  # 0 = no top-k truncation: sample the full distribution
        top_p=1.0,
        max_new_tokens=seq_len - min(len(p) for p in prompts),
        pad_token_id=_pad_id(tok),
        # An empty list (not None, which falls back to the model's EOS) disables stopping at EOS.
        eos_token_id=[],
        use_cache=True,
    )
    device = next(model.parameters()).device
    batch_prompts = [prompts[r % len(prompts)] for r in range(n_rows)]
    width = max(len(p) for p in batch_prompts)
    ids = torch.full((n_rows, width), _pad_id(tok), dtype=torch.long)
    mask = torch.zeros((n_rows, width), dtype=torch.long)
    for r, p in enumerate(batch_prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        # fork_rng: seed the sampler for this call without disturbing the caller's global RNG.
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_stream_seed(spec["seed"], split, index))
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config
            ).cpu()
    finally:
        torch.set_num_threads(threads)
    return [out[r, width - len(batch_prompts[r]) :][:seq_len] for r in range(n_rows)]  # drop left padding


class SamplingPool:
    """Self-sampling calls spread over `workers` CPU processes, each loading the model from
    `model_dir` once and computing whole calls on one thread (`generate_call`): the tokens are
    those of the in-process sampler, whatever the worker count. Decoding one thread per process
    is what scales on a CPU: measured on a 2-core VM with SmolLM2-135M, one process on 2 threads
    samples 162 tok/s (64-row calls: 236), two 1-thread workers 266 (328)."""

    def __init__(self, model_dir: str | Path, dtype: str, workers: int):
        self.model_dir, self.dtype, self.workers = str(model_dir), dtype, int(workers)
        self._pool = None

    def __enter__(self) -> "SamplingPool":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: a forked child inherits the parent's OpenMP state, which can deadlock
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(self.model_dir, self.dtype))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(cancel_futures=True)

    def calls(self, spec: dict, split: str, plan: list[int]) -> Iterator[list[torch.Tensor]]:
        """Each call's rows, in call order."""
        return self._pool.map(_worker_call, [(spec, split, i, n) for i, n in enumerate(plan)])


_WORKER: dict = {}


def _init_worker(model_dir: str, dtype: str) -> None:
    from ..models.load import load_model

    torch.set_num_threads(1)
    _WORKER["model"], _WORKER["tok"] = load_model(model_dir, dtype=dtype, device="cpu")


def _worker_call(args) -> list[torch.Tensor]:
    spec, split, index, n_rows = args
    return generate_call(spec, _WORKER["tok"], _WORKER["model"], split, index, n_rows)


def _self_sample_rows(spec: dict, tok, model, split: str, budget: int, timings: dict | None,
                      pool: SamplingPool | None = None) -> Iterator[torch.Tensor]:
    """Rows of exactly seq_len tokens sampled from the model (the budget-cut last one shorter),
    call by call in this process, or by `pool`'s workers."""
    plan = _self_sample_plan(spec, budget)
    if pool is None:
        opener_prompts(spec, tok, model.config)  # a bad opener or seq_len fails before any sampling
        calls = (generate_call(spec, tok, model, split, i, n) for i, n in enumerate(plan))
    else:
        calls = pool.calls(spec, split, plan)
    used = 0
    t0 = time.perf_counter()
    for rows in calls:
        if timings is not None:
            # wall time of the sampling (with a pool: of all workers together)
            timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t0
            timings["generated_tokens"] = timings.get("generated_tokens", 0) + sum(len(r) for r in rows)
        for row in rows:
            row = row[: budget - used]
            used += len(row)
            yield row
            if used >= budget:
                return
        t0 = time.perf_counter()
