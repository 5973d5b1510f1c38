"""NAS on tiny random models of every supported architecture: each edit's value v* = z - (the
residual before the MLP) has exactly the anchor's norm, or the edit is skipped (zero update) when
its ||v*|| exceeds twice the anchor; the anchor is the trimmed mean of the bare-prompt v* norms
(batched optimization equal to the single-case one for a batch of one); the anchor and the keys
carry a restored chain to the identical next update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from editscale.edit import subject_keys, value_optimization
from editscale.edit.methods import get_method
from editscale.edit.nas import ANCHOR_STATE, Nas, bare_value_norms, trimmed_mean
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError
from editscale.models.registry import layer_name, mlp_out_name

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]


@pytest.fixture
def prepare(method_kit, city_cases):
    def make(arch: str, **over):
        _, model, tok, hp, mods, stats = method_kit("nas", arch, **over)
        return model, tok, hp, mods, stats

    return make


@pytest.fixture
def cases(city_cases):
    return city_cases()[0]


TEMPLATES = [["{}"], ["The city is large. {}", "I know. {}"]]


def _residual_before_mlp(editor, cases):
    prompts = [c["prompt"] for c in cases]
    subjects = [c["subject"] for c in cases]
    _, out = subject_keys.module_io_at_subject(editor.model, editor.tok, editor.z_module, prompts, subjects)
    _, v0 = subject_keys.module_io_at_subject(editor.model, editor.tok, editor.value_module, prompts, subjects)
    return out - v0, v0, out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_value_has_the_anchor_norm(prepare, cases, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(arch, nas_skip_factor=1e9)
    editor = Nas(model, tok, hp, stats, TEMPLATES)
    assert editor.value_module == mlp_out_name(model, hp["layers"][-1]) and editor.z_module == layer_name(model, hp["layers"][-1])
    editor.begin(cases)
    assert editor.anchor == pytest.approx(float(np.mean(editor.anchor_norms)))  # 4 norms: none trimmed
    r, _, _ = _residual_before_mlp(editor, cases[:2])
    Z, logs = editor.compute_targets(cases[:2])
    for j in range(2):
        v = Z[:, j].double() - r[j].double()
        assert float(v.norm()) == pytest.approx(editor.anchor, rel=1e-5)
        assert logs[j]["nas_vstar_norm"] == pytest.approx(editor.anchor, rel=1e-5) and logs[j]["nas_skipped"] == 0
    # the update that follows is AlphaEdit's on these targets and moves the weights
    ws = WeightState(model, mods)
    rows = editor.apply(cases[:1], ws)
    assert rows[0]["nas_anchor"] == editor.anchor and all(u.u.abs().sum() > 0 for u in ws.take_applied())


def test_an_edit_above_twice_the_anchor_is_skipped(prepare, cases, tiny_lm):
    model, tok, hp, mods, stats = prepare("llama")
    editor = Nas(model, tok, hp, stats, TEMPLATES)
    editor.begin(cases)
    editor.anchor = 1e-6  # every v* is far above twice this
    _, _, target_init = _residual_before_mlp(editor, cases[:1])
    Z, logs = editor.compute_targets(cases[:1])
    assert logs[0]["nas_skipped"] == 1
    assert torch.allclose(Z[:, 0], target_init[0], atol=1e-6)
    ws = WeightState(model, mods)
    editor.apply(cases[:1], ws)
    for upd in ws.take_applied():  # the residual z - z_cur is zero: so is the update
        assert float((upd.u.double() @ upd.v.double().T).abs().max()) < 1e-5


def test_the_batched_anchor_optimization_of_one_case_is_the_single_case_one(prepare, cases, tiny_lm):
    model, tok, hp, mods, stats = prepare("gpt2")
    z_module, value_module = layer_name(model, hp["layers"][-1]), mlp_out_name(model, hp["layers"][-1])
    case = cases[1]
    (norm,) = bare_value_norms(model, tok, [case], z_module, value_module, hp)
    z, _ = value_optimization.optimize_value(model, tok, case, [["{}"]], z_module, {**hp, "early_stop": "loss"}, loss_layer="max")
    _, out = subject_keys.module_io_at_subject(model, tok, z_module, [case["prompt"]], [case["subject"]])
    _, v0 = subject_keys.module_io_at_subject(model, tok, value_module, [case["prompt"]], [case["subject"]])
    assert norm == pytest.approx(float((z - out[0] + v0[0]).norm()), rel=1e-4)
    # a batch optimizes every case: its norms differ from the unedited values'
    norms = bare_value_norms(model, tok, cases, z_module, value_module, hp)
    assert len(norms) == 4 and all(np.isfinite(norms))


def test_trimmed_mean_drops_the_top_five_percent():
    values = list(range(1, 41))  # floor(0.05 * 40) = 2 dropped: 39 and 40
    assert trimmed_mean(values, 0.95) == pytest.approx(np.mean(values[:38]))
    assert trimmed_mean([3.0, 1.0, 2.0], 0.95) == pytest.approx(2.0)
    with pytest.raises(EditscaleError, match="cannot take the anchor"):
        trimmed_mean([], 0.95)


def test_a_restored_chain_makes_the_identical_next_update(prepare, cases, tiny_lm):
    model, tok, hp, mods, stats = prepare("gpt2")
    editor = Nas(model, tok, hp, stats, TEMPLATES)
    editor.begin(cases)
    ws = WeightState(model, mods)
    editor.apply(cases[:1], ws)
    state, delta = editor.state_dict(), {m: ws.delta[m].clone() for m in mods}
    assert float(state[ANCHOR_STATE][0]) == editor.anchor
    ws.take_applied()
    editor.apply(cases[1:2], ws)
    uninterrupted = ws.take_applied()

    model2, _ = tiny_lm("gpt2")
    ws2 = WeightState(model2, mods, delta=delta)
    resumed = get_method("nas", hp)(model2, tok, hp, stats, TEMPLATES, state={k: v.copy() for k, v in state.items()})
    resumed.apply(cases[1:2], ws2)
    again = ws2.take_applied()
    for a, b in zip(uninterrupted, again, strict=True):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_no_anchor_is_an_error(prepare, cases, tiny_lm):
    model, tok, hp, mods, stats = prepare("gpt2")
    editor = Nas(model, tok, hp, stats, TEMPLATES)
    with pytest.raises(EditscaleError, match="no anchor norm"):
        editor.apply(cases[:1], WeightState(model, mods))
    keys_only = {k: v for k, v in Nas(model, tok, hp, stats, TEMPLATES).state_dict().items()}
    keys_only[f"{mods[0]}/keys"] = np.zeros((0, stats[mods[0]].shape[0]), dtype=np.float32)
    with pytest.raises(EditscaleError, match="nas/anchor_norm"):
        Nas(model, tok, hp, stats, TEMPLATES, state=keys_only)
