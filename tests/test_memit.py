"""MEMIT on tiny random models of every supported architecture: the update minimizes MEMIT's
objective, keys are recomputed between layers, updates replay bit for bit, batches log per case."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editscale.edit.methods import load_hparams
from editscale.edit import subject_keys, value_optimization
from editscale.edit.memit import Memit
from editscale.edit.methods import get_method
from editscale.edit.weights import Update, WeightState, add_update
from editscale.io import EditscaleError
from editscale.models.registry import layer_name

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = ROOT / "config" / "hparams" / "memit"
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = ["{}", "The city is large. {}"]
CASES = [
    {"case_id": 11, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 12, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 13, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
]


def hparams(**over) -> dict:
    hp = load_hparams(HPARAMS / "tiny.yaml", method="memit")
    hp.update(v_num_grad_steps=4, **over)
    return hp


_STATS: dict = {}


def prepare(second_moment, tiny_lm, arch: str, **over):
    model, tok = tiny_lm(arch)
    hp = hparams(**over)
    mods = Memit.modules(model, hp)
    for m in mods:
        if (arch, m) not in _STATS:
            _STATS[(arch, m)] = second_moment(model, tok, m)
    return model, tok, hp, mods, {m: _STATS[(arch, m)] for m in mods}


def objective(dW, K, R, C, lam) -> float:
    return float(((dW @ K - R) ** 2).sum() + lam * torch.trace(dW @ C @ dW.T))


@pytest.mark.parametrize("arch", ARCHS)
def test_update_minimizes_memit_objective(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = Memit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:2], ws)
    updates = ws.take_applied()
    assert [u.module for u in updates] == mods  # one update per layer, ascending
    lam = float(hp["mom2_update_weight"])
    gen = torch.Generator().manual_seed(0)
    for upd in updates:
        m = upd.module
        K, R, C = editor.last_keys[m], editor.last_resid[m], stats[m]
        assert upd.u.shape == (R.shape[0], 2) and upd.v.shape == (K.shape[0], 2)
        assert torch.allclose(upd.u.double(), R, rtol=1e-6, atol=1e-6)  # u = R
        dW = upd.u.double() @ upd.v.double().T
        # stationarity: gradient of the objective vanishes (relative to its scale)
        grad = 2 * (dW @ K - R) @ K.T + 2 * lam * dW @ C
        assert grad.norm() / (2 * (R @ K.T).norm()) < 1e-5
        f0 = objective(dW, K, R, C, lam)
        for scale in (1e-1, 1e-2):
            for _ in range(10):
                E = torch.randn(dW.shape, generator=gen, dtype=torch.float64)
                E = E * scale * dW.norm() / E.norm()
                assert objective(dW + E, K, R, C, lam) > f0
        # MEMIT is a nontrivial edit: the residual shrinks
        assert ((dW @ K - R).norm() < R.norm())


GROUPED = [["{}"], ["The city is large. {}", "Therefore it rains. {}", "I know that. {}"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_average_within_then_across_template_groups(second_moment, tiny_lm, arch):
    """memit/compute_ks.py: k = 1/2 k("{}") + 1/2 mean(k over the sampled templates), not the flat
    mean over all four templates (which weighs "{}" 1/4)."""
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    m = mods[0]
    flat = [t for g in GROUPED for t in g]
    per_case = []
    for case in CASES[:2]:
        k = subject_keys.module_io_at_subject(model, tok, m, [t.format(case["prompt"]) for t in flat], [case["subject"]] * len(flat))[0].double()
        per_case.append(0.5 * k[0] + 0.5 * k[1:].mean(0))
    expected = torch.stack(per_case)
    got = subject_keys.compute_keys(model, tok, m, CASES[:2], GROUPED).double()
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
    flat_mean = subject_keys.compute_keys(model, tok, m, CASES[:2], flat).double()
    assert (flat_mean - expected).norm() > 1e-3 * expected.norm()  # the two weightings differ here
    # MEMIT (and AlphaEdit, which inherits keys()) uses the grouped average
    editor = Memit(model, tok, hp, stats, GROUPED)
    assert torch.allclose(editor.keys(m, CASES[:2]).double().T, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_z_loss_layer_is_max_of_v_loss_layer_and_z_layer(second_moment, tiny_lm, arch):
    """memit/compute_z.py: loss_layer = max(v_loss_layer, layer); a v_loss_layer below the z layer
    reads the loss at the z layer (not below the injection, where delta has no effect)."""
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    z_layer = hp["layers"][-1]
    inject = layer_name(model, z_layer)
    steps = {"v_num_grad_steps": 3}
    low, log_low = value_optimization.optimize_value(model, tok, CASES[0], GROUPED, inject, {**hp, **steps, "v_loss_layer": 0})
    at, log_at = value_optimization.optimize_value(model, tok, CASES[0], GROUPED, inject, {**hp, **steps, "v_loss_layer": z_layer})
    assert torch.equal(low, at) and log_low["v_loss"] == log_at["v_loss"]
    top, _ = value_optimization.optimize_value(model, tok, CASES[0], GROUPED, inject, {**hp, **steps, "v_loss_layer": 3})
    assert not torch.equal(top, at)  # above the z layer, v_loss_layer is honoured


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_are_recomputed_after_each_layer(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    k2_before = subject_keys.compute_keys(model, tok, mods[1], CASES[:2], TEMPLATES).double().T
    editor = Memit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:2], ws)
    first, second = ws.take_applied()
    k2_used = editor.last_keys[mods[1]]
    assert not torch.allclose(k2_used, k2_before, rtol=1e-4, atol=1e-6)
    # ... and they are the keys of the model with only the first layer's update applied
    model2, tok2 = tiny_lm(arch)
    ws2 = WeightState(model2, mods)
    ws2.apply(first)
    k2_expected = subject_keys.compute_keys(model2, tok2, mods[1], CASES[:2], TEMPLATES).double().T
    assert torch.allclose(k2_used, k2_expected, rtol=1e-5, atol=1e-6)
    # the first layer's keys are those of the unedited model
    k1_base = subject_keys.compute_keys(tiny_lm(arch)[0], tok, mods[0], CASES[:2], TEMPLATES).double().T
    assert torch.allclose(editor.last_keys[mods[0]], k1_base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_rows_replay_and_z_error(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = Memit(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    rows = editor.apply(CASES, ws)
    assert [r["case_id"] for r in rows] == [11, 12, 13]
    for r in rows:
        assert r["factor_kind"] == "lowrank"
        assert r["v_loss"] == r["v_loss"]  # a number, not NaN
        assert r["z_error_after"] < r["z_error_before"]
    # replay: the recorded updates re-applied on a zero delta give the chain's delta bit for bit
    updates = ws.take_applied()
    assert all(u.u.shape[1] == 3 and u.u.dtype == torch.float32 and u.v.dtype == torch.float32 for u in updates)
    replay = {m: torch.zeros_like(ws.delta[m]) for m in mods}
    for u in updates:
        add_update(replay[u.module], Update(u.module, u=u.u.clone(), v=u.v.clone()))
    for m in mods:
        assert torch.equal(replay[m], ws.delta[m])
    # the live parameters hold W0 + D
    for m in mods:
        assert torch.equal(ws.current(m), ws.base[m] + ws.delta[m])
    assert not any(p.requires_grad for p in model.parameters())


def test_sequential_edits_accumulate_and_are_deterministic(second_moment, tiny_lm):
    def run():
        model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt2")
        editor = Memit(model, tok, hp, stats, TEMPLATES)
        ws = WeightState(model, mods)
        for c in CASES:
            assert len(editor.apply([c], ws)) == 1
        return ws

    a, b = run(), run()
    assert len(a.applied) == 3 * 2
    for m in a.modules:
        assert torch.equal(a.delta[m], b.delta[m])


def test_mom2_adjustment_false_is_ridge(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gptj", mom2_adjustment=False)
    editor = Memit(model, tok, hp, {}, TEMPLATES)  # no statistics needed
    ws = WeightState(model, mods)
    editor.apply(CASES[:1], ws)
    upd = ws.take_applied()[0]
    K, R = editor.last_keys[mods[0]], editor.last_resid[mods[0]]
    lam = float(hp["mom2_update_weight"])
    expected = R @ K.T @ torch.linalg.inv(lam * torch.eye(K.shape[0], dtype=torch.float64) + K @ K.T)
    assert torch.allclose(upd.u.double() @ upd.v.double().T, expected, rtol=1e-4, atol=1e-7)


def test_missing_stats_and_bad_hparams_raise(second_moment, tiny_lm):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt2")
    with pytest.raises(EditscaleError, match="statistics"):
        Memit(model, tok, hp, {mods[0]: stats[mods[0]]}, TEMPLATES)
    with pytest.raises(EditscaleError, match="ascending"):
        Memit(model, tok, {**hp, "layers": [2, 1]}, stats, TEMPLATES)
    bad = dict(hp)
    del bad["mom2_update_weight"]
    with pytest.raises(EditscaleError, match="mom2_update_weight"):
        Memit(model, tok, bad, stats, TEMPLATES)


@pytest.mark.parametrize("name", ["gpt2-xl", "gpt-j-6B", "smollm2-135m", "tiny"])
def test_hparam_files_load(name):
    hp = load_hparams(HPARAMS / f"{name}.yaml", method="memit")
    assert hp["layers"] == sorted(hp["layers"]) and hp["fact_token"] == "subject_last"
    assert get_method("memit") is Memit
    if name == "gpt2-xl":
        assert hp["layers"] == [13, 14, 15, 16, 17] and hp["mom2_update_weight"] == 20000 and hp["v_loss_layer"] == 47
        assert (hp["clamp_norm_factor"], hp["v_num_grad_steps"], hp["v_lr"], hp["v_weight_decay"], hp["kl_factor"]) == (0.75, 20, 0.5, 0.5, 0.0625)
    if name == "gpt-j-6B":
        assert hp["layers"] == [3, 4, 5, 6, 7, 8] and hp["mom2_update_weight"] == 15000 and hp["v_loss_layer"] == 27
        assert hp["v_num_grad_steps"] == 25 and hp["clamp_norm_factor"] == 0.75
