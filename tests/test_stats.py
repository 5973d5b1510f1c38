"""Stats stage: E[k k^T] accumulation, HDF5 files, corpora, null-space projection, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from editscale.io import EditscaleError, sha256_file
from editscale.models.fetch import TINY_ARCHS, build_tiny_model
from editscale.models.registry import arch_spec, get_module, layer_name, mlp_out_name
from editscale.cli import main as editscale_main
from editscale.stats.corpus import PAD, corpus_id, iter_corpus, sample_tokens, tokens_to_batches
from editscale.stats.mom2 import (
    compute_mom2,
    null_space_basis,
    null_space_projection,
    read_mom2,
    read_projection,
    read_stats,
    read_stats_attrs,
    write_mom2,
    write_projection,
)

TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "Tokyo is the capital of Japan.",
    "It is a sunny day and people are happy in Madrid, the capital of Spain.",
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models are dominated by per-op overhead; on a shared 2-core machine a second torch
    thread that is not scheduled makes every op wait (measured: 10-40x slower generation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    model, tok = build_tiny_model(request.param)
    return request.param, model, tok


def _padded_batch(tok, texts, pad_id=7):
    """Right-padded batch whose pad id is an ordinary token: only the mask may exclude it."""
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return rows, {"input_ids": ids, "attention_mask": mask}


def _inputs_by_hook(model, module_name, ids, mask=None):
    """Reference capture: a plain forward hook, the full model run (LM head included)."""
    captured = []
    handle = get_module(model, module_name).register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask if mask is not None else torch.ones_like(ids))
    finally:
        handle.remove()
    return captured[0]


def test_mom2_matches_numpy_reference_and_excludes_padding(tiny):
    arch, model, tok = tiny
    modules = [mlp_out_name(model, 1), mlp_out_name(model, 2)]
    rows, batch = _padded_batch(tok, TEXTS)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padding is present
    result = compute_mom2(model, tok, modules, [batch], progress=False)
    n_real = sum(len(r) for r in rows)
    for name in modules:
        # Reference: each sequence alone, unpadded, so no pad token can enter the sum.
        keys = np.concatenate(
            [_inputs_by_hook(model, name, torch.tensor([r]))[0].numpy().astype(np.float64) for r in rows]
        )
        ref = keys.T @ keys / len(keys)
        mom2, count = result[name]
        assert count == n_real == len(keys)
        assert mom2.dtype == np.float64 and mom2.shape == ref.shape
        np.testing.assert_allclose(mom2, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        # The test has teeth: counting the pad positions too would give a different matrix.
        padded = _inputs_by_hook(model, name, batch["input_ids"], batch["attention_mask"]).numpy().astype(np.float64)
        with_pads = padded.reshape(-1, padded.shape[-1])
        assert not np.allclose(mom2, with_pads.T @ with_pads / len(with_pads), rtol=1e-3)


def test_texts_input_and_token_budget(tiny):
    arch, model, tok = tiny
    name = mlp_out_name(model, 0)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"][:6], tok(TEXTS[1])["input_ids"][:6]])
    (mom2, count), = compute_mom2(model, tok, [name], [ids], max_tokens=8, progress=False).values()
    keys = _inputs_by_hook(model, name, ids).numpy().astype(np.float64).reshape(-1, mom2.shape[0])[:8]  # row-major
    assert count == 8
    np.testing.assert_allclose(mom2, keys.T @ keys / 8, rtol=1e-5, atol=1e-9)
    # Strings are tokenized and cut into seq_len windows: 3 texts, every token counted once.
    (_, count), = compute_mom2(model, tok, [name], TEXTS, seq_len=8, batch_size=2, progress=False).values()
    assert count == sum(len(tok(t)["input_ids"]) for t in TEXTS)


def test_forward_stops_after_highest_module(tiny):
    arch, model, tok = tiny
    spec = arch_spec(model)
    # The LM head via get_output_embeddings(): robust to its attribute name.
    watch = {"lm_head": model.get_output_embeddings(), "final_norm": get_module(model, spec.final_norm),
             "layer3": get_module(model, layer_name(model, 3)), "layer2": get_module(model, layer_name(model, 2))}

    def fired_during(fn):
        fired = []
        handles = [m.register_forward_hook(lambda *a, k=key: fired.append(k)) for key, m in watch.items()]
        try:
            fn()
        finally:
            for h in handles:
                h.remove()
        return fired

    # Sanity: a plain forward does fire every watched hook.
    with torch.no_grad():
        assert sorted(fired_during(lambda: model(**_padded_batch(tok, TEXTS)[1]))) == sorted(watch)
    # Layer 2's MLP ran (its input was traced), but the forward was aborted inside layer 2: the
    # block never returned, and layer 3, the final norm and the LM head never ran.
    modules = [mlp_out_name(model, 2), mlp_out_name(model, 0)]
    assert fired_during(lambda: compute_mom2(model, tok, modules, TEXTS, progress=False)) == []


def test_unknown_module_names_nearest(tiny):
    arch, model, tok = tiny
    with pytest.raises(EditscaleError, match="does not exist"):
        compute_mom2(model, tok, [mlp_out_name(model, 0) + "x"], TEXTS, progress=False)


# ---------------------------------------------------------------------------------------------
# HDF5


def _write_example(path, sha="a" * 64):
    rng = np.random.default_rng(0)
    k = rng.normal(size=(50, 6))
    mom2 = k.T @ k / 50
    spec = {"kind": "text_files", "glob": "x/*.txt", "n_tokens": 50, "seq_len": 8, "seed": 0, "shuffle": True}
    write_mom2(path, mom2, 50, module="transformer.h.1.mlp.c_proj", model_sha256=sha, corpus="text_files-abc",
               corpus_spec=spec, dtype="float32")
    return mom2, spec


def test_hdf5_round_trip(tmp_path):
    path = tmp_path / "stats" / "transformer.h.1.mlp.c_proj.h5"
    mom2, spec = _write_example(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    back, count, attrs = read_stats(path, expected_model_sha="a" * 64)
    np.testing.assert_array_equal(back, mom2)
    assert back.dtype == np.float64 and count == 50
    np.testing.assert_array_equal(read_mom2(path), mom2)
    with h5py.File(path) as f:
        assert f["count"].shape == () and f["count"].dtype == np.int64 and f["mom2"].dtype == np.float64
    assert read_stats_attrs(path) == attrs
    assert attrs["model_sha256"] == "a" * 64
    assert attrs["corpus"] == "text_files-abc"
    assert json.loads(attrs["corpus_spec"]) == spec
    assert attrs["token_count"] == 50
    assert attrs["dtype"] == "float32"
    assert attrs["module"] == "transformer.h.1.mlp.c_proj"
    for key in ("editscale_version", "git_commit", "packages", "inputs", "python", "device", "config_hash"):
        assert key in attrs
    assert json.loads(attrs["inputs"])["model"] == "a" * 64


def test_sha_mismatch_names_file_and_both_shas(tmp_path):
    path = tmp_path / "m.h5"
    _write_example(path, sha="a" * 64)
    with pytest.raises(EditscaleError) as err:
        read_mom2(path, expected_model_sha="b" * 64)
    assert str(path) in str(err.value) and "a" * 64 in str(err.value) and "b" * 64 in str(err.value)


def test_bad_stats_files(tmp_path):
    with pytest.raises(EditscaleError, match="not found"):
        read_mom2(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(EditscaleError, match="junk.h5.*not a readable HDF5"):
        read_mom2(junk)
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.attrs["model_sha256"] = "x"
    with pytest.raises(EditscaleError, match="no dataset 'mom2'"):
        read_mom2(empty)


# ---------------------------------------------------------------------------------------------
# Corpora


def _docs_dir(tmp_path, n_files=3, per_file=10):
    d = tmp_path / "corpus"
    d.mkdir()
    for f in range(n_files):
        paras = [f"doc{f * per_file + i} is about the city number {i} in country {f}." for i in range(per_file)]
        (d / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    return d


def _decoded_doc_ids(batches, tok):
    ids = set()
    for b in batches:
        for row, m in zip(b["input_ids"], b["attention_mask"]):
            text = tok.decode(row[m.bool()])
            ids.update(w for w in text.split() if w.startswith("doc"))
    return ids


def test_text_files_corpus(tmp_path):
    model, tok = build_tiny_model("gpt2")
    d = _docs_dir(tmp_path)
    spec = {"kind": "text_files", "glob": str(d / "*.txt"), "n_tokens": 100, "seq_len": 8}
    batches = list(iter_corpus(spec, tok, split="stats", batch_size=4))
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 100
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] <= 8 and b["input_ids"].shape[0] <= 4
        # right padded: the mask is 1...1 0...0 on every row
        m = b["attention_mask"]
        assert torch.equal(m, m.sort(dim=1, descending=True).values)
    again = list(iter_corpus(spec, tok, split="stats", batch_size=4))  # deterministic (seeded shuffle)
    assert len(again) == len(batches) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    # compute_mom2 consumes it directly
    (_, count), = compute_mom2(model, tok, [mlp_out_name(model, 1)], batches, progress=False).values()
    assert count == 100


def test_text_files_no_match_names_glob(tmp_path):
    _, tok = build_tiny_model("gpt2")
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(EditscaleError, match="matches no file") as err:
        list(iter_corpus({"kind": "text_files", "glob": pattern}, tok))
    assert pattern in str(err.value)


def test_text_files_heldout_is_disjoint(tmp_path):
    _, tok = build_tiny_model("gpt2")
    d = _docs_dir(tmp_path)
    spec = {"kind": "text_files", "glob": str(d / "*.txt"), "n_tokens": 120, "seq_len": 64}
    stats = _decoded_doc_ids(iter_corpus(spec, tok, split="stats"), tok)
    heldout = _decoded_doc_ids(iter_corpus(spec, tok, split="heldout", n_tokens=120), tok)
    assert stats and heldout
    assert stats.isdisjoint(heldout)
    # A stats budget that swallows the whole corpus leaves nothing to hold out: an error, not an empty split.
    with pytest.raises(EditscaleError, match="nothing is left"):
        list(iter_corpus({**spec, "n_tokens": 10**6}, tok, split="heldout"))


@pytest.mark.slow
def test_self_sample_is_deterministic_and_full_length():
    model, tok = build_tiny_model("llama")
    spec = {"kind": "self_sample", "n_tokens": 100, "seq_len": 16, "seed": 3, "gen_batch_size": 4}
    rng_before = torch.random.get_rng_state()
    timings = {}
    a = list(iter_corpus(spec, tok, model, batch_size=3, timings=timings))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    b = list(iter_corpus(spec, tok, model, batch_size=3))
    assert len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert sum(int(x["attention_mask"].sum()) for x in a) == 100
    assert all(x["attention_mask"][:, :-1].all() for x in a[:-1])  # rows are full seq_len, unpadded
    assert a[0]["input_ids"].shape[1] == 16
    assert timings["generated_tokens"] > 0 and timings["generate_s"] > 0
    # opener first, then sampled tokens
    assert a[0]["input_ids"][0, 0].item() == tok("The")["input_ids"][0]
    other = list(iter_corpus({**spec, "seed": 4}, tok, model, batch_size=3))
    assert not torch.equal(other[0]["input_ids"], a[0]["input_ids"])
    held = list(iter_corpus(spec, tok, model, "heldout", batch_size=3))
    stats_rows = {tuple(r.tolist()) for x in a for r in x["input_ids"]}
    assert not stats_rows & {tuple(r.tolist()) for x in held for r in x["input_ids"]}


def test_self_sample_openers_of_different_lengths():
    """Openers of different token lengths are left padded for generate; the padding is removed again."""
    model, tok = build_tiny_model("gpt2")
    openers = ["The", "Zyzzyva quarks"]
    long_ids = tok(openers[1])["input_ids"]
    assert len(long_ids) > 1 == len(tok(openers[0])["input_ids"])
    spec = {"kind": "self_sample", "n_tokens": 64, "seq_len": 16, "gen_batch_size": 4, "openers": openers}
    rows = [r for b in iter_corpus(spec, tok, model, batch_size=4) for r, m in zip(b["input_ids"], b["attention_mask"]) if m.all()]
    assert len(rows) == 4 and all(len(r) == 16 for r in rows)
    assert rows[0][0].item() == tok("The")["input_ids"][0]
    assert rows[1][: len(long_ids)].tolist() == long_ids  # opener first, no pad before it


class _FakeDataset:
    """The few `datasets.Dataset` methods the hf_dataset corpus uses."""

    def __init__(self, rows):
        self.rows = rows
        self.column_names = list(rows[0])

    def shuffle(self, seed, **kw):
        order = np.random.default_rng(seed).permutation(len(self.rows))
        return _FakeDataset([self.rows[i] for i in order])

    def select_columns(self, cols):
        return _FakeDataset([{c: r[c] for c in cols} for r in self.rows])

    def __iter__(self):
        return iter(self.rows)


def test_hf_dataset_corpus_with_fake_datasets(monkeypatch):
    _, tok = build_tiny_model("gpt2")
    calls = []

    def load_dataset(name, config, split, revision, streaming):
        calls.append((name, config, split, revision, streaming))
        if name != "wikitext":
            raise FileNotFoundError(f"dataset {name} not found on the hub")
        return _FakeDataset([{"text": f"doc{i} is a paragraph about Paris." if i % 3 else "", "id": i} for i in range(60)])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    sys.modules["datasets"].load_dataset = load_dataset
    spec = {"kind": "hf_dataset", "name": "wikitext", "config": "wikitext-103-raw-v1", "n_tokens": 60, "seq_len": 32}
    stats = _decoded_doc_ids(iter_corpus(spec, tok), tok)
    heldout = _decoded_doc_ids(iter_corpus(spec, tok, split="heldout", n_tokens=60), tok)
    assert calls[0] == ("wikitext", "wikitext-103-raw-v1", "train", None, False)
    assert stats and heldout and stats.isdisjoint(heldout)
    assert sum(int(b["attention_mask"].sum()) for b in iter_corpus(spec, tok)) == 60
    with pytest.raises(EditscaleError, match="no text field 'body'.*columns"):
        list(iter_corpus({**spec, "text_field": "body"}, tok))
    with pytest.raises(EditscaleError, match="cannot load dataset 'nope'"):
        list(iter_corpus({**spec, "name": "nope"}, tok))


def test_token_files_text_corpus(tmp_path):
    """sample_tokens: stats rows padded with PAD (-1), held-out rows packed full, disjoint documents;
    the stats array gives the same E[kk^T] as reading the corpus directly."""
    model, tok = build_tiny_model("gpt2")
    d = _docs_dir(tmp_path)
    spec = {"kind": "text_files", "glob": str(d / "*.txt"), "n_tokens": 150, "heldout_tokens": 100, "seq_len": 16}
    stats = sample_tokens(spec, tok, split="stats")
    assert stats.dtype == np.int64 and stats.shape[1] == 16 and (stats != PAD).sum() == 150
    assert ((stats == PAD).cumsum(axis=1) * (stats != PAD) == 0).all()  # padding only at the end of a row
    held = sample_tokens(spec, tok, split="heldout")
    assert held.shape == (100 // 16, 16) and held.min() >= 0
    def as_batches(arr):
        return [{"input_ids": torch.from_numpy(arr), "attention_mask": torch.from_numpy((arr != PAD).astype(np.int64))}]

    ids_stats = _decoded_doc_ids(as_batches(np.where(stats == PAD, 0, stats) * (stats != PAD)), tok)
    assert ids_stats.isdisjoint(_decoded_doc_ids(as_batches(held), tok))
    name = mlp_out_name(model, 1)
    (from_file, n1), = compute_mom2(model, tok, [name], tokens_to_batches(stats, 4, tok.pad_token_id), progress=False).values()
    (direct, n2), = compute_mom2(model, tok, [name], iter_corpus(spec, tok, batch_size=4), progress=False).values()
    assert n1 == n2 == 150
    np.testing.assert_allclose(from_file, direct, rtol=1e-6, atol=1e-9)
    with pytest.raises(EditscaleError, match="negative token id"):
        list(tokens_to_batches(np.array([[3, -2]]), 4, 0))


def test_token_files_self_sample():
    model, tok = build_tiny_model("gpt_neox")
    spec = {"kind": "self_sample", "n_tokens": 40, "heldout_tokens": 32, "seq_len": 16, "gen_batch_size": 2}
    stats = sample_tokens(spec, tok, model, "stats")
    held = sample_tokens(spec, tok, model, "heldout")
    assert stats.shape == (3, 16) and (stats != PAD).sum() == 40 and (stats[:2] != PAD).all()
    assert held.shape == (2, 16) and held.min() >= 0
    assert not {tuple(r) for r in stats[:2]} & {tuple(r) for r in held}
    with pytest.raises(EditscaleError, match="less than one sequence"):
        sample_tokens({**spec, "heldout_tokens": 8}, tok, model, "heldout")


def test_self_sample_needs_model():
    _, tok = build_tiny_model("gpt2")
    with pytest.raises(EditscaleError, match="pass the model"):
        list(iter_corpus({"kind": "self_sample"}, tok))


def test_corpus_spec_validation_and_id(monkeypatch):
    _, tok = build_tiny_model("gpt2")
    with pytest.raises(EditscaleError, match="unknown key"):
        corpus_id({"kind": "self_sample", "n_token": 5})
    with pytest.raises(EditscaleError, match="'kind' must be one of"):
        corpus_id({"kind": "wiki"})
    with pytest.raises(EditscaleError, match="needs key 'glob'"):
        corpus_id({"kind": "text_files"})
    a = corpus_id({"kind": "self_sample"})
    assert a == corpus_id({"kind": "self_sample", "seed": 0}) and a.startswith("self_sample-") and len(a) < 40
    assert a != corpus_id({"kind": "self_sample", "seed": 1})
    wt = corpus_id({"kind": "hf_dataset", "name": "wikitext", "config": "wikitext-103-raw-v1"})
    assert wt.startswith("wikitext-103-raw-v1-")
    # `datasets` is optional: without it a clear instruction, not an ImportError.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(EditscaleError, match="pip install datasets"):
        list(iter_corpus({"kind": "hf_dataset", "name": "wikitext", "config": "wikitext-103-raw-v1"}, tok))


# ---------------------------------------------------------------------------------------------
# Null-space projection


def test_null_space_projection_properties(tmp_path):
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    eig = np.array([1e-6, 1e-4, 3e-3, 9e-3] + list(np.linspace(0.05, 4.0, d - 4)))
    mom2 = (q * eig) @ q.T
    P = null_space_projection(mom2, 1e-2)
    np.testing.assert_allclose(P, P.T, atol=1e-12)
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    assert round(np.trace(P)) == 4
    for i in range(d):
        v = q[:, i]
        if eig[i] >= 1e-2:
            np.testing.assert_allclose(P @ v, 0, atol=1e-10)
        else:
            np.testing.assert_allclose(P @ v, v, atol=1e-10)
    u0, vals = null_space_basis(mom2, 1e-2)
    assert u0.shape == (d, 4)
    np.testing.assert_allclose(vals, np.sort(eig), rtol=1e-8, atol=1e-12)
    with pytest.raises(EditscaleError, match="positive"):
        null_space_projection(mom2, 0.0)
    # round trip
    path = tmp_path / "p.h5"
    write_projection(path, P, threshold=1e-2, rank=4, stats_sha256="s" * 64, model_sha256="a" * 64, eigenvalues=vals)
    np.testing.assert_array_equal(read_projection(path, expected_model_sha="a" * 64), P)
    with h5py.File(path) as f:
        assert f.attrs["rank"] == 4 and f.attrs["threshold"] == 1e-2 and f.attrs["stats_sha256"] == "s" * 64
    with pytest.raises(EditscaleError) as err:
        read_projection(path, expected_model_sha="b" * 64)
    assert "a" * 64 in str(err.value) and "b" * 64 in str(err.value) and str(path) in str(err.value)


def test_null_space_of_real_stats_annihilates_keys():
    """On keys from a tiny model: P kills every direction the keys occupy beyond the threshold,
    so K P has almost no energy (the AlphaEdit guarantee W P K0 ~ 0)."""
    model, tok = build_tiny_model("gpt2")
    name = mlp_out_name(model, 1)
    ids = torch.tensor([tok(t)["input_ids"][:10] for t in TEXTS])
    (mom2, _), = compute_mom2(model, tok, [name], [ids], progress=False).values()
    keys = _inputs_by_hook(model, name, ids).numpy().astype(np.float64).reshape(-1, mom2.shape[0])
    P = null_space_projection(mom2, 1e-2)
    rank = round(np.trace(P))
    assert 0 < rank < mom2.shape[0]  # 30 keys in 256 dims: a large null space, but not all of it
    # mean squared norm of the projected keys = trace(P C P) < rank * threshold
    assert np.mean(np.sum((keys @ P) ** 2, axis=1)) < rank * 1e-2


# ---------------------------------------------------------------------------------------------
# CLI


def _editscale(*args, cwd):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "editscale.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_cli_corpus_stats_nullspace(tmp_path):
    """The workflow's path: model dir -> `editscale corpus` -> `editscale stats --tokens` -> `editscale nullspace`."""
    model_dir = tmp_path / "models" / "tiny"
    res = _editscale("model", "--source", "tiny:gpt2", "--out", str(model_dir), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((model_dir / "manifest.json").read_text())
    # The spec as config.yaml gives it (schema keys heldout_tokens and batch_size included).
    spec = {"kind": "self_sample", "n_tokens": 150, "heldout_tokens": 64, "seq_len": 32, "batch_size": 4, "seed": 0}
    corpus_dir = tmp_path / "corpora" / "tiny" / "ss"
    res = _editscale("--threads", "1", "corpus", "--model-dir", str(model_dir), "--corpus-json", json.dumps(spec), "--out-dir", str(corpus_dir),
                     "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in corpus_dir.iterdir()) == ["corpus.json", "heldout.npy", "stats.npy"]  # no temp files
    stats_tokens, held = np.load(corpus_dir / "stats.npy"), np.load(corpus_dir / "heldout.npy")
    assert (stats_tokens != PAD).sum() == 150 and held.shape == (2, 32) and held.min() >= 0
    meta = json.loads((corpus_dir / "corpus.json").read_text())
    assert meta["model_sha256"] == manifest["model_sha256"] and meta["splits"]["stats"]["tokens"] == 150
    assert meta["sampling_processes"] == 1

    # Two threads: two 1-thread sampling processes, the same tokens (a corpus does not depend on
    # the job's core count)
    pooled_dir = tmp_path / "corpora" / "tiny" / "pooled"
    res = _editscale("--threads", "2", "corpus", "--model-dir", str(model_dir), "--corpus-json", json.dumps(spec), "--out-dir", str(pooled_dir),
                     "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2 sampling processes" in res.stderr
    assert json.loads((pooled_dir / "corpus.json").read_text())["sampling_processes"] == 2
    for split in ("stats", "heldout"):
        assert np.array_equal(np.load(pooled_dir / f"{split}.npy"), np.load(corpus_dir / f"{split}.npy")), split
    # a bad opener fails before any worker starts, with one error naming the key's problem
    res = _editscale("--threads", "2", "corpus", "--model-dir", str(model_dir), "--corpus-json",
                     json.dumps({**spec, "openers": ["word " * 40]}), "--out-dir", str(tmp_path / "bad"), "--device", "cpu", cwd=tmp_path)
    assert res.returncode == 2 and "an opener is as long as seq_len=32" in res.stderr and not (tmp_path / "bad").exists()

    out_dir = tmp_path / "stats" / "tiny" / "ss"
    modules = ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]
    res = _editscale(
        "--threads", "1", "stats", "--model-dir", str(model_dir), "--corpus-json", json.dumps(spec), "--tokens", str(corpus_dir / "stats.npy"),
        "--corpus-id", "ss", "--modules", *modules, "--out-dir", str(out_dir), "--device", "cpu",
        "--no-progress", cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "tok/s" in res.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{m}.h5" for m in modules)  # no temp files
    for m in modules:
        mom2, count, attrs = read_stats(out_dir / f"{m}.h5", expected_model_sha=manifest["model_sha256"])
        assert count == 150 and mom2.shape == (256, 256)
        assert attrs["module"] == m and attrs["corpus"] == "ss" and attrs["dtype"] == "float32"
        assert json.loads(attrs["inputs"])["tokens"] == sha256_file(corpus_dir / "stats.npy")

    # Without --tokens the same spec is sampled in the same pass: identical statistics (in-process run).
    direct_dir = tmp_path / "direct"
    assert editscale_main(["stats", "--model-dir", str(model_dir), "--corpus-json", json.dumps(spec), "--modules", modules[0],
                           "--out-dir", str(direct_dir), "--device", "cpu", "--no-progress"]) == 0
    np.testing.assert_allclose(read_mom2(direct_dir / f"{modules[0]}.h5"), read_mom2(out_dir / f"{modules[0]}.h5"), rtol=1e-6, atol=1e-9)
    assert read_stats_attrs(direct_dir / f"{modules[0]}.h5")["corpus"] == corpus_id(spec)

    stats_file = out_dir / f"{modules[0]}.h5"
    proj = tmp_path / "proj" / "p.h5"
    res = _editscale("nullspace", "--stats", str(stats_file), "--threshold", "1e-2", "--out", str(proj), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in proj.parent.iterdir()) == ["p.h5"]
    P = read_projection(proj, expected_model_sha=manifest["model_sha256"])
    with h5py.File(proj) as f:
        assert f.attrs["stats_sha256"] == sha256_file(stats_file)
        assert f.attrs["rank"] == round(np.trace(P)) and f.attrs["threshold"] == 1e-2

    # A bad module name: exit 2, a message naming it, and no output file.
    assert editscale_main(["stats", "--model-dir", str(model_dir), "--corpus-json", json.dumps(spec), "--tokens",
                           str(corpus_dir / "stats.npy"), "--modules", "transformer.h.1.mlp.c_prj",
                           "--out-dir", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()
