"""AlphaEdit on tiny random models of every supported architecture: updates vanish on the
preserved keys, earlier keys accumulate, state round trip continues identically, exact replay."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from editscale.edit.methods import load_hparams
from editscale.edit import subject_keys
from editscale.edit.alphaedit import AlphaEdit, null_space_projection
from editscale.edit.memit import Memit
from editscale.edit.methods import get_method
from editscale.edit.weights import Update, WeightState, add_update
from editscale.io import EditscaleError

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = ROOT / "config" / "hparams" / "alphaedit"
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = ["{}", "The city is large. {}"]
CASES = [
    {"case_id": 31, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 32, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 33, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
    {"case_id": 34, "subject": "Madrid", "prompt": "{} is a city in", "target_new": "Japan"},
]

_STATS: dict = {}


def prepare(second_moment, tiny_lm, arch: str, **over):
    model, tok = tiny_lm(arch)
    hp = load_hparams(HPARAMS / "tiny.yaml", method="alphaedit")
    hp.update(v_num_grad_steps=4, **over)
    mods = AlphaEdit.modules(model, hp)
    for m in mods:
        if (arch, m) not in _STATS:
            _STATS[(arch, m)] = second_moment(model, tok, m)
    return model, tok, hp, mods, {m: _STATS[(arch, m)] for m in mods}


@pytest.mark.parametrize("arch", ARCHS)
def test_update_vanishes_on_preserved_keys(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    for m in mods:
        assert 0 < editor.null_dim[m] < stats[m].shape[0]
    ws = WeightState(model, mods)
    rows = editor.apply(CASES[:2], ws)
    rows += editor.apply(CASES[2:3], ws)  # second step: earlier keys enter the solve
    assert [r["case_id"] for r in rows] == [31, 32, 33]
    gen = torch.Generator().manual_seed(0)
    updates = ws.take_applied()
    assert len(updates) == 2 * len(mods)
    for upd in updates:
        P = editor.P[upd.module].double()
        dW = upd.u.double() @ upd.v.double().T
        assert dW.norm() > 0
        # preserved space: k0 = (I - P) x, i.e. P k0 = 0 (eigenvectors of C above the threshold)
        X = torch.randn(P.shape[0], 8, generator=gen, dtype=torch.float64)
        K0 = X - P @ X
        assert (P @ K0).norm() < 1e-10 * K0.norm()
        rel = (dW @ K0).norm(dim=0) / (dW.norm() * K0.norm(dim=0))
        assert rel.max() < 1e-4
        # the preserved keys of the statistics themselves: eigenvectors of C above the threshold
        vals, vecs = torch.linalg.eigh(stats[upd.module])
        big = vecs[:, vals >= hp["nullspace_threshold"]]
        assert ((dW @ big).norm(dim=0) / dW.norm()).max() < 1e-4
        # a generic direction is changed
        rel_generic = (dW @ X).norm(dim=0) / (dW.norm() * X.norm(dim=0))
        assert rel_generic.max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_update_matches_alphaedit_formula(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:1], ws)
    prior = {m: editor.prior_keys(m).double() for m in mods}
    assert all(prior[m].shape[0] == 1 for m in mods)
    editor.apply(CASES[1:3], ws)
    L2 = float(hp["L2"])
    for upd in ws.take_applied()[len(mods):]:
        m = upd.module
        P = editor.P[m].double()
        K, R = editor.last_keys[m], editor.last_resid[m]
        Kp = prior[m].T
        d = P.shape[0]
        # AlphaEdit_main.py: solve(P (K K^T + cache_c) + L2 I, P K R^T), transposed to (out, in)
        expected = torch.linalg.solve(P @ (K @ K.T + Kp @ Kp.T) + L2 * torch.eye(d, dtype=torch.float64), P @ K @ R.T).T
        # the brief's form: R K^T P (Kp Kp^T P + K K^T P + L2 I)^-1
        alt = R @ K.T @ P @ torch.linalg.inv(Kp @ Kp.T @ P + K @ K.T @ P + L2 * torch.eye(d, dtype=torch.float64))
        dW = upd.u.double() @ upd.v.double().T
        scale = expected.norm()
        assert (dW - expected).norm() / scale < 1e-5
        assert (alt - expected).norm() / scale < 1e-8


def test_prior_keys_grow_with_post_edit_keys(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt2")
    editor = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    assert all(editor.n_prior_keys(m) == 0 for m in mods)
    editor.apply(CASES[:2], ws)
    assert all(editor.n_prior_keys(m) == 2 for m in mods)
    # the stored keys are those of the edited model (as AlphaEdit's cache_c update)
    for m in mods:
        post = subject_keys.compute_keys(model, tok, m, CASES[:2], TEMPLATES).float()
        assert torch.allclose(editor.prior_keys(m), post, rtol=1e-6, atol=1e-7)
    editor.apply(CASES[2:3], ws)
    sd = editor.state_dict()
    assert sorted(sd) == sorted(f"{m}/keys" for m in mods)
    for m in mods:
        assert isinstance(sd[f"{m}/keys"], np.ndarray) and sd[f"{m}/keys"].dtype == np.float32
        assert sd[f"{m}/keys"].shape == (3, stats[m].shape[0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_state_round_trip_gives_identical_next_update(second_moment, tiny_lm, arch):
    over = dict(key_fold_size=2)  # 3 earlier keys: one folded chunk of 2 plus a pending key
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch, **over)
    editor = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:2], ws)
    editor.apply(CASES[2:3], ws)
    state = {k: v.copy() for k, v in editor.state_dict().items()}
    delta = {m: ws.delta[m].clone() for m in mods}
    kkt = {m: editor.prior_kkt(m) for m in mods}
    ws.take_applied()

    # uninterrupted chain: the next step
    editor.apply(CASES[3:4], ws)
    cont = ws.take_applied()

    # resumed chain: fresh model + saved delta + saved state (projections recomputed from stats)
    model2, tok2, _, _, _ = prepare(second_moment, tiny_lm, arch, **over)
    ws2 = WeightState(model2, mods, delta=delta)
    editor2 = AlphaEdit(model2, tok2, hp, stats, TEMPLATES, state=state)
    for m in mods:
        assert torch.equal(editor2.prior_kkt(m), kkt[m])
    editor2.apply(CASES[3:4], ws2)
    resumed = ws2.take_applied()
    assert len(cont) == len(resumed) == len(mods)
    for a, b in zip(cont, resumed):
        assert a.module == b.module
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    for m in mods:
        assert torch.equal(ws.delta[m], ws2.delta[m])
        assert np.array_equal(editor.state_dict()[f"{m}/keys"], editor2.state_dict()[f"{m}/keys"])


def test_folding_is_independent_of_batching(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt_neox", key_fold_size=3)
    a = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    b = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    m = mods[0]
    keys = torch.randn(8, stats[m].shape[0], generator=torch.Generator().manual_seed(3))
    a._append_keys(m, keys)
    for lo, hi in ((0, 2), (2, 3), (3, 7), (7, 8)):
        b._append_keys(m, keys[lo:hi])
    assert torch.equal(a.prior_kkt(m), b.prior_kkt(m))
    assert torch.equal(a.prior_keys(m), b.prior_keys(m))
    K = keys.double()
    assert torch.allclose(a.prior_kkt(m), K.T @ K, rtol=1e-10, atol=1e-10)


def test_projections_kwarg_and_identity_projection_is_ridge_memit(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gptj")
    P = {m: torch.from_numpy(np.asarray(null_space_projection(stats[m], hp["nullspace_threshold"]))) for m in mods}
    # precomputed projections give the same update as projections computed from the stats
    e1 = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    ws1 = WeightState(model, mods)
    e1.apply(CASES[:1], ws1)
    model2, *_ = prepare(second_moment, tiny_lm, "gptj")
    e2 = AlphaEdit(model2, tok, hp, {}, TEMPLATES, projections=P)
    ws2 = WeightState(model2, mods)
    e2.apply(CASES[:1], ws2)
    for a, b in zip(ws1.take_applied(), ws2.take_applied()):
        assert torch.allclose(a.u @ a.v.T, b.u @ b.v.T, rtol=1e-5, atol=1e-7)
    # P = I and no earlier keys: AlphaEdit's solve is MEMIT's with C = I and lambda = L2
    model3, *_ = prepare(second_moment, tiny_lm, "gptj")
    eye = {m: torch.eye(stats[m].shape[0], dtype=torch.float64) for m in mods}
    e3 = AlphaEdit(model3, tok, hp, {}, TEMPLATES, projections=eye)
    ws3 = WeightState(model3, mods)
    e3.apply(CASES[:1], ws3)
    model4, *_ = prepare(second_moment, tiny_lm, "gptj")
    memit_keys = {f.name for f in dataclasses.fields(Memit.hparams_type)}  # AlphaEdit's own keys (L2, projection_*, ...) left out
    mh = {**{k: v for k, v in hp.items() if k in memit_keys}, "mom2_adjustment": False, "mom2_update_weight": hp["L2"]}
    e4 = Memit(model4, tok, mh, {}, TEMPLATES)
    ws4 = WeightState(model4, mods)
    e4.apply(CASES[:1], ws4)
    for a, b in zip(ws3.take_applied(), ws4.take_applied()):
        assert torch.allclose(a.u @ a.v.T, b.u @ b.v.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_rows_and_bit_identical_replay(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = AlphaEdit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    rows = editor.apply(CASES[:3], ws)
    rows += editor.apply(CASES[3:4], ws)
    assert [r["case_id"] for r in rows] == [31, 32, 33, 34]
    assert all(r["factor_kind"] == "lowrank" and r["v_loss"] == r["v_loss"] for r in rows)
    updates = ws.take_applied()
    assert [u.u.shape[1] for u in updates] == [3] * len(mods) + [1] * len(mods)
    replay = {m: torch.zeros_like(ws.delta[m]) for m in mods}
    for u in updates:
        add_update(replay[u.module], Update(u.module, u=u.u.clone(), v=u.v.clone()))
    for m in mods:
        assert torch.equal(replay[m], ws.delta[m])
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_state_and_missing_inputs_raise(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt2")
    with pytest.raises(EditscaleError, match="projection"):
        AlphaEdit(model, tok, hp, {}, TEMPLATES)
    with pytest.raises(EditscaleError, match="keys"):
        AlphaEdit(model, tok, hp, stats, TEMPLATES, state={"nothing": np.zeros(1)})
    bad = {f"{m}/keys": np.zeros((2, 5), dtype=np.float32) for m in mods}
    with pytest.raises(EditscaleError, match="shape"):
        AlphaEdit(model, tok, hp, stats, TEMPLATES, state=bad)
    with pytest.raises(EditscaleError, match="key_fold_size"):
        AlphaEdit(model, tok, {**hp, "key_fold_size": 0}, stats, TEMPLATES)


@pytest.mark.parametrize("name", ["gpt2-xl", "gpt-j-6B", "smollm2-135m", "tiny"])
def test_hparam_files_load(name):
    hp = load_hparams(HPARAMS / f"{name}.yaml", method="alphaedit")
    assert get_method("alphaedit") is AlphaEdit
    if name == "gpt2-xl":
        assert hp["layers"] == [13, 14, 15, 16, 17] and hp["v_loss_layer"] == 47
        assert (hp["nullspace_threshold"], hp["L2"], hp["clamp_norm_factor"], hp["v_num_grad_steps"]) == (2e-2, 10, 0.75, 20)
    if name == "gpt-j-6B":
        assert hp["layers"] == [3, 4, 5, 6, 7, 8] and hp["v_loss_layer"] == 27
        assert (hp["nullspace_threshold"], hp["L2"], hp["v_num_grad_steps"]) == (2e-2, 10, 25)
