"""SPHERE on tiny random models of every supported architecture: AlphaEdit's update with the
weight's principal hyperspherical directions suppressed.

Defining equations (editscale.edit.sphere): C = W_hat^T W_hat / d_out of the row-normalized weight;
U = its top-r eigenvectors, r the smallest count covering more than eta of the trace; the update
u v^T becomes u (P_soft v)^T with P_soft = I - alpha U U^T (so dW U shrinks by 1 - alpha and
dW (I - U U^T) is kept); the factors are AlphaEdit's, computed with the unprojected updates of
the earlier layers in place, and so are the keys stored for later edits (the reference's order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from editscale.edit.alphaedit import AlphaEdit
from editscale.edit.chain import accumulate, read_factors, write_factors
from editscale.edit.sphere import principal_directions, soft_projection
from editscale.edit.weights import WeightState

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = [["{}"], ["The city is large. {}", "I know. {}"]]


@pytest.fixture
def cases(city_cases):
    return city_cases()[0]


def test_principal_directions_cover_eta_of_the_row_normalized_second_moment():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 20, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 20, dtype=torch.float64)
    rows = W.numpy() / (np.linalg.norm(W.numpy(), axis=1, keepdims=True) + 1e-8)
    C = rows.T @ rows / rows.shape[0]
    evals, evecs = np.linalg.eigh(C)
    desc = evals[::-1]
    for eta in (0.1, 0.5, 0.9):
        U = principal_directions(W, eta).numpy()
        r = U.shape[1]
        # the smallest r with more than eta of the trace (the reference: #{cumsum / trace <= eta} + 1)
        assert desc[: r - 1].sum() <= eta * desc.sum() < desc[:r].sum()
        # U spans the top-r eigenvectors of C: the same projector
        top = evecs[:, ::-1][:, :r]
        assert np.allclose(U @ U.T, top @ top.T, atol=1e-10)
    P, r = soft_projection(W, 0.5, 0.3)
    U = principal_directions(W, 0.5)
    assert r == U.shape[1]
    # P_soft = I - alpha U U^T: the principal directions keep 1 - alpha, their complement all
    assert torch.allclose(P @ U, 0.7 * U, atol=1e-12)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    x_perp = x - U @ (U.T @ x)
    assert torch.allclose(P @ x_perp, x_perp, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_update_is_alphaedits_with_the_principal_directions_suppressed(method_kit, cases, tiny_lm, arch):
    """Same edit on two copies of the model: SPHERE's factors are AlphaEdit's u and P_soft(W) v,
    W the weight before the edit, and the keys it stores for later edits are AlphaEdit's (computed
    on the unprojected update, as the reference's cache_c). (Up to float32 rounding: the later
    layers see the earlier unprojected update as W + u v^T, AlphaEdit's as W + D with D += u v^T.)"""
    cls, model, tok, hp, mods, stats = method_kit("sphere", arch)
    sphere = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    before = {m: ws.current(m).clone() for m in mods}
    rows = sphere.apply(cases[:1], ws)
    projected = ws.take_applied()

    model2, _ = tiny_lm(arch)
    hp_a = {k: v for k, v in hp.items() if k not in ("cumulative_ratio", "suppression_strength", "sphere_dtype")}
    alpha = AlphaEdit(model2, tok, hp_a, stats, TEMPLATES)
    ws2 = WeightState(model2, mods)
    alpha.apply(cases[:1], ws2)
    plain = ws2.take_applied()

    assert [u.module for u in projected] == [u.module for u in plain] == mods
    for p, a in zip(projected, plain):
        assert p.kind == "lowrank" and torch.allclose(p.u, a.u, rtol=1e-4, atol=1e-6)
        P, r = soft_projection(before[p.module], hp["cumulative_ratio"], hp["suppression_strength"])
        assert p.meta["sphere_rank"] == r and 0 < r < P.shape[0]
        assert torch.allclose(p.v.double(), P @ a.v.double(), rtol=1e-4, atol=1e-6 * float(a.v.abs().max()))
        # the update's energy along the principal directions is (1 - alpha)^2 of AlphaEdit's
        U = principal_directions(before[p.module], hp["cumulative_ratio"])
        dW_p, dW_a = p.u.double() @ p.v.double().T, a.u.double() @ a.v.double().T
        assert float((dW_p @ U).norm()) == pytest.approx(0.5 * float((dW_a @ U).norm()), rel=1e-4)
        assert torch.allclose(dW_p - dW_p @ U @ U.T, dW_a - dW_a @ U @ U.T, atol=1e-6 * float(dW_a.abs().max()))
    for m in mods:
        assert torch.allclose(sphere.memory.keys(m), alpha.memory.keys(m), rtol=1e-4, atol=1e-5)
    assert rows[0]["sphere_rank_min"] == min(u.meta["sphere_rank"] for u in projected)


@pytest.mark.parametrize("hp_off", [{"suppression_strength": 0.0}, {"cumulative_ratio": 0.0}])
def test_no_suppression_is_alphaedit_bit_for_bit(method_kit, cases, tiny_lm, hp_off):
    """The reference adds the unprojected update unless cumulative_ratio > 0 and
    suppression_strength > 0: then SPHERE is AlphaEdit, over several edits and their stored keys."""
    cls, model, tok, hp, mods, stats = method_kit("sphere", "llama", **hp_off)
    sphere = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    model2, _ = tiny_lm("llama")
    alpha = AlphaEdit(model2, tok, {k: v for k, v in hp.items() if k not in ("cumulative_ratio", "suppression_strength", "sphere_dtype")},
                      stats, TEMPLATES)
    ws2 = WeightState(model2, mods)
    for c in cases[:3]:
        sphere.apply([c], ws)
        alpha.apply([c], ws2)
    assert all(torch.equal(ws.delta[m], ws2.delta[m]) for m in mods)
    assert all(torch.equal(sphere.memory.keys(m), alpha.memory.keys(m)) for m in mods)


def test_replay_and_a_restored_chain_are_bit_identical(method_kit, cases, tiny_lm, tmp_path):
    """The factors file replays the chain's delta bit for bit, and a chain restored from its saved
    state makes the identical next update."""
    cls, model, tok, hp, mods, stats = method_kit("sphere", "gpt2")
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    for c in cases[:2]:
        editor.apply([c], ws)
    updates = ws.take_applied()
    path = tmp_path / "factors.h5"
    write_factors(path, updates, [1] * len(updates), [{"edit_index": 1, "step": 1}], editor.state_dict(), {})
    replayed = {}
    accumulate(replayed, [u for _, u in read_factors(path)[0]])
    assert all(torch.equal(replayed[m], ws.delta[m]) for m in mods)

    state = read_factors(path)[2]
    model2, _ = tiny_lm("gpt2")
    ws2 = WeightState(model2, mods, delta=replayed)
    restored = cls(model2, tok, hp, stats, TEMPLATES, state=state)
    editor.apply(cases[2:3], ws)
    restored.apply(cases[2:3], ws2)
    nxt, nxt2 = ws.take_applied(), ws2.take_applied()
    assert all(torch.equal(a.u, b.u) and torch.equal(a.v, b.v) for a, b in zip(nxt, nxt2))


def test_hparams_outside_their_range_are_refused(tmp_path):
    from editscale.edit.methods import load_hparams
    from editscale.io import EditscaleError

    root = Path(__file__).resolve().parents[1]
    text = (root / "config/hparams/sphere/tiny.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("cumulative_ratio: 0.5", "cumulative_ratio: 1.5").replace("suppression_strength: 0.5", "suppression_strength: -1"))
    with pytest.raises(EditscaleError) as exc:
        load_hparams(bad, method="sphere")
    assert "'cumulative_ratio' = 1.5 must be <= 1" in str(exc.value) and "'suppression_strength' = -1 must be >= 0" in str(exc.value)
