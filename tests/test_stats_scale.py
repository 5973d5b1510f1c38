"""Statistics at paper scale (issue 27 item 3): the streamed second moment equals a one-shot
computation on a gpt2-small-shaped model, the convergence read-out, and the projection files that
AlphaEdit and EasyEdit share, imported."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from editscale.io import EditscaleError
from editscale.models.nethook import Trace
from editscale.stats.mom2 import compute_mom2, read_projection, write_mom2


def _batches(ids: torch.Tensor, rows: int):
    for i in range(0, ids.shape[0], rows):
        yield {"input_ids": ids[i : i + rows], "attention_mask": torch.ones_like(ids[i : i + rows])}


@pytest.fixture(scope="module")
def gpt2_small():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
    ids = torch.randint(0, 50257, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_streamed_second_moment_equals_one_shot(gpt2_small):
    """Batches of 2 sequences, float64 sums on the fly, the pass stopped after layer 4 = the same
    batches run through the whole model, their inputs stacked, and K^T K / n in one float64 product
    (d = 3072, the c_proj input). The one-shot side runs the same batches, not one batch of 8:
    float32 activations depend on the batch shape (~1e-7 of the largest entry, more or less with
    the BLAS's threads), which is not what this test is about."""
    model, ids = gpt2_small
    module = "transformer.h.4.mlp.c_proj"
    streamed, count = compute_mom2(model, None, [module], _batches(ids, 2), progress=False)[module]
    keys = []
    for batch in _batches(ids, 2):
        with torch.no_grad(), Trace(model, [module], stop=False) as tr:
            model(**batch)
        keys.append(tr.inputs[module].reshape(-1, 3072).double())
    k = torch.cat(keys)
    one_shot = (k.T @ k / k.shape[0]).numpy()
    assert count == ids.numel() == k.shape[0]
    assert streamed.shape == (3072, 3072)
    assert np.allclose(streamed, one_shot, rtol=1e-12, atol=1e-14 * np.abs(one_shot).max())


def test_convergence_read_out_is_the_change_over_each_doubling(gpt2_small):
    model, ids = gpt2_small
    module = "transformer.h.2.mlp.c_proj"
    conv: dict = {}
    full, n = compute_mom2(model, None, [module], _batches(ids, 1), progress=False, convergence=conv, convergence_start=64)[module]
    points = [p for p, _ in conv[module]]
    assert points == [128, 256, 512] and n == 512  # 64 is the first estimate: nothing to compare it with
    half, _ = compute_mom2(model, None, [module], _batches(ids, 1), max_tokens=256, progress=False)[module]
    expected = np.linalg.norm(full - half) / np.linalg.norm(full)
    assert conv[module][-1][1] == pytest.approx(expected, rel=1e-9)
    assert all(rel > 0 for _, rel in conv[module])


def test_stats_file_keeps_the_convergence_read_out(tmp_path):
    path = tmp_path / "m.h5"
    write_mom2(path, np.eye(4), 10, module="m", model_sha256="x", corpus="c", corpus_spec={}, dtype="float32",
               convergence=[(4096, 0.1), (8192, 0.05)])
    with h5py.File(path) as f:
        assert f["convergence"][()].tolist() == [[4096.0, 0.1], [8192.0, 0.05]]


def test_alphaedit_and_easyedit_projection_files_convert(tiny_model_dirs, tmp_path):
    """A file in the exact format AlphaEdit's evaluate.py writes and EasyEdit ships
    (torch.save of a float32 tensor [n_layers, d, d]) becomes one projection file per layer, tied to
    that layer's stats file, under the reference rule's folder."""
    from editscale.models.load import model_sha
    from editscale.stats.convert import convert_projections

    model_dir = tiny_model_dirs("gpt2")
    d = 256  # the tiny GPT-2's c_proj input
    g = torch.Generator().manual_seed(0)
    P = torch.stack([(lambda q: q @ q.T)(torch.linalg.qr(torch.randn(d, r, generator=g))[0]) for r in (40, 70)]).float()
    pt = tmp_path / "null_space_project.pt"
    torch.save(P, pt)
    stats_dir, out_dir = tmp_path / "stats", tmp_path / "stats" / "nullspace-svd32"
    with pytest.raises(EditscaleError, match="convert or compute the statistics"):
        convert_projections(pt, model_dir, [1, 2], stats_dir, out_dir, 0.02)
    for layer in (1, 2):
        write_mom2(stats_dir / f"transformer.h.{layer}.mlp.c_proj.h5", np.eye(d), 10, module=f"transformer.h.{layer}.mlp.c_proj",
                   model_sha256=model_sha(model_dir), corpus="c", corpus_spec={}, dtype="float32")
    with pytest.raises(EditscaleError, match="holds 2 projections but 1 layers"):
        convert_projections(pt, model_dir, [1], stats_dir, out_dir, 0.02)
    info = convert_projections(pt, model_dir, [1, 2], stats_dir, out_dir, 0.02)
    assert [i["rank"] for i in info] == [40, 70]
    for i, layer in enumerate((1, 2)):
        out = out_dir / f"transformer.h.{layer}.mlp.c_proj.t0.02.h5"
        assert np.array_equal(read_projection(out, expected_model_sha=model_sha(model_dir)), P[i].double().numpy())
        with h5py.File(out) as f:
            assert f.attrs["rule"] == "svd32"
    torch.save(P[:, :100, :100].contiguous(), pt)
    with pytest.raises(EditscaleError, match="has dimension 256"):
        convert_projections(pt, model_dir, [1, 2], stats_dir, out_dir, 0.02)
