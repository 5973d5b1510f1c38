"""LyapLock on tiny random models of every supported architecture.

Defining equations (editscale.edit.lyaplock): the first step is MEMIT's update; every later step's
dense dW zeroes the gradient of

    V ||dW K - R||^2 + a Z lambda tr((W + dW - W0) C (W + dW - W0)^T) + V ||(W + dW) Ke - Ve||^2

(Ke, Ve the earlier edits' keys and their values right after their own step); the preservation
loss D(W) = E ||(W - W0) k||^2 computed from the statistics; the virtual queue never falls below
sqrt(alpha D_base) and rises by a (D - alpha D_base); a chain split across segments (the method
state saved and restored) is bit-identical to the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from editscale.edit.lyaplock import LyapLock, preservation_loss
from editscale.edit.memit import Memit
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": "Asia"},
    {"case_id": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
    {"case_id": 4, "subject": "Rome", "prompt": "{} is a city in", "target_new": "Japan"},
]
TINY = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/hparams/lyaplock/tiny.yaml").read_text())
TEMPLATES = [["{}"], ["The cat. {}", "I think. {}"]]


def _setup(tiny_lm, second_moment, arch, **hp):
    model, tok = tiny_lm(arch)
    hp = {**TINY, **hp}
    modules = LyapLock.modules(model, hp)
    stats = {m: second_moment(model, tok, m) for m in modules}
    editor = LyapLock(model, tok, hp, stats, TEMPLATES)
    return editor, WeightState(model, modules), modules, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_the_first_step_is_memits_update_and_later_steps_solve_lyaplocks_normal_equations(tiny_lm, second_moment, arch):
    editor, ws, modules, stats = _setup(tiny_lm, second_moment, arch)
    # step 1 against MEMIT with the same lambda, on a copy of the same model
    memit_model, tok = tiny_lm(arch)
    memit = Memit(memit_model, tok, {k: v for k, v in TINY.items() if k not in ("lyapunov_alpha", "value_weight", "queue_drift")},
                  stats, TEMPLATES)
    memit_ws = WeightState(memit_model, modules)
    editor.apply([CASES[0]], ws)
    memit.apply([CASES[0]], memit_ws)
    for m in modules:
        mine, theirs = ws.current(m) - ws.base[m], memit_ws.current(m) - memit_ws.base[m]
        assert float((mine - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max()), m
    assert all(u.kind == "dense" for u in ws.take_applied())
    lam, V = TINY["mom2_update_weight"], TINY["value_weight"]
    for case in CASES[1:3]:
        before = {m: ws.current(m).double() for m in modules}
        q_before = {m: {k: v.clone() for k, v in editor.queue[m].items()} for m in modules}
        editor.apply([case], ws)
        for m in modules:
            K, R = editor.last_keys[m], editor.last_resid[m]
            W0, W, C = ws.base[m].double(), before[m], stats[m]
            dW = ws.current(m).double() - W
            q = q_before[m]
            aZl = float(q["a"] * q["Z"]) * lam
            grad = V * (dW @ K - R) @ K.T + aZl * (W + dW - W0) @ C + V * ((W + dW) @ q["S_kk"] - q["S_vk"])
            scale = V * R.abs().max() * K.abs().max() ** 2 + aZl * float(((W - W0) @ C).abs().max()) + float(q["S_vk"].abs().max())
            assert float(grad.abs().max()) <= 1e-5 * float(scale), (arch, m)


def test_the_preservation_loss_is_the_expected_output_change_and_the_queue_follows_it(tiny_lm, second_moment):
    editor, ws, modules, stats = _setup(tiny_lm, second_moment, "llama")
    m = modules[0]
    W0, C = ws.base[m].double(), stats[m]
    W = W0 + 0.01 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = ((W - W0) @ C @ (W - W0).T).trace()
    assert float(preservation_loss(C, W, W0 @ C, (W0 @ C @ W0.T).trace())) == pytest.approx(float(expected), rel=1e-6)
    alpha = TINY["lyapunov_alpha"]
    zs = []
    for case in CASES:
        q_before = {k: v.clone() for k, v in editor.queue[m].items()}
        editor.apply([case], ws)
        q = editor.queue[m]
        floor = (alpha * q["D_base"]).sqrt()
        D = preservation_loss(C, ws.current(m).double(), W0 @ C, (W0 @ C @ W0.T).trace())
        start = q_before.get("Z", floor)
        assert float(q["a"]) == pytest.approx(float(1 / floor))
        assert float(q["Z"]) == pytest.approx(max(float(start + q["a"] * (D - alpha * q["D_base"])), float(floor)), rel=1e-9)
        zs.append(float(q["Z"] / floor))
    assert min(zs) >= 1.0 and max(zs) > 1.0  # alpha 1.5: the queue rises above its floor within four edits


def test_a_chain_split_across_segments_continues_bit_identically(tiny_lm, second_moment):
    whole, ws_whole, modules, stats = _setup(tiny_lm, second_moment, "gpt2")
    for case in CASES:
        whole.apply([case], ws_whole)
    first, ws_first, _, _ = _setup(tiny_lm, second_moment, "gpt2")
    for case in CASES[:2]:
        first.apply([case], ws_first)
    state = {k: np.array(v) for k, v in first.state_dict().items()}  # as the factors file stores it
    model, tok = tiny_lm("gpt2")  # a fresh model, as the next segment's job loads it
    second = LyapLock(model, tok, {**TINY}, stats, TEMPLATES, state=state)
    ws_second = WeightState(model, modules, delta={m: ws_first.delta[m].clone() for m in modules})
    for case in CASES[2:]:
        second.apply([case], ws_second)
    for m in modules:
        assert torch.equal(ws_second.delta[m], ws_whole.delta[m]), m
        assert torch.equal(second.queue[m]["Z"], whole.queue[m]["Z"])


def test_lyaplock_needs_statistics(tiny_lm):
    model, tok = tiny_lm("llama")
    with pytest.raises(EditscaleError, match="second-moment statistics"):
        LyapLock(model, tok, TINY, {}, TEMPLATES)
