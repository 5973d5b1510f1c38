"""ENCORE on tiny random models of every supported architecture: each update solves the
norm-penalised normal equations with the earlier edits' keys; the keys stored are those each
update used; a restored chain gives the identical next update; and MPES stops the z optimization
by its rule (value_optimization.optimize_value, for every method that optimizes v* or z)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from editscale.edit import encoding, subject_keys, templating, value_optimization
from editscale.edit.encore import Encore
from editscale.edit.memit import Memit
from editscale.edit.methods import get_method, load_hparams
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError
from editscale.models.registry import layer_name
from editscale.data.schema import fill

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = [["{}"], ["The city is large. {}", "I know. {}"]]
CASES = [
    {"case_id": 11, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 12, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 13, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
]
_STATS: dict = {}


def prepare(second_moment, tiny_lm, arch: str, **over):
    model, tok = tiny_lm(arch)
    hp = load_hparams(ROOT / "config/hparams/encore/tiny.yaml", method="encore")
    hp.update(v_num_grad_steps=4, **over)
    mods = Encore.modules(model, hp)
    for m in mods:
        if (arch, m) not in _STATS:
            _STATS[(arch, m)] = second_moment(model, tok, m)
    return model, tok, hp, mods, {m: _STATS[(arch, m)] for m in mods}


@pytest.mark.parametrize("arch", ARCHS)
def test_update_solves_the_norm_penalised_normal_equations(second_moment, tiny_lm, arch):
    """dW (lambda_p C + lambda_n I + Kp Kp^T + K K^T) = R K^T at every layer, with Kp the keys the
    earlier edit's own update used there; and the objective's gradient vanishes."""
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch)
    editor = Encore(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:1], ws)
    first_keys = {m: editor.last_keys[m].clone() for m in mods}
    ws.take_applied()
    editor.apply(CASES[1:3], ws)
    updates = ws.take_applied()
    lp, ln = float(hp["mom2_update_weight"]), float(hp["update_norm_lambda"])
    for upd in updates:
        m = upd.module
        K, R, C, Kp = editor.last_keys[m], editor.last_resid[m], stats[m], first_keys[m]
        eye = torch.eye(C.shape[0], dtype=torch.float64)
        A = lp * C + ln * eye + Kp @ Kp.T + K @ K.T
        dW = upd.u.double() @ upd.v.double().T
        assert torch.allclose(upd.u.double(), R, rtol=1e-6, atol=1e-6)
        assert (dW @ A - R @ K.T).norm() / (R @ K.T).norm() < 1e-5
        grad = 2 * (dW @ K - R) @ K.T + 2 * lp * dW @ C + 2 * ln * dW + 2 * dW @ Kp @ Kp.T
        assert grad.norm() / (2 * (R @ K.T).norm()) < 1e-5
        # the memory holds both edits' keys, as their updates used them
        stored = editor.memory.keys(m).double()
        assert stored.shape[0] == 3 and torch.allclose(stored, torch.cat([Kp.T, K.T]), rtol=1e-6, atol=1e-6)


def test_without_earlier_keys_encore_is_memit_with_a_ridge(second_moment, tiny_lm):
    """add_prev_edits false: lambda_p C + lambda_n I is MEMIT's lambda C' with C' = C + (lambda_n /
    lambda_p) I, so the two methods give the same update."""
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gpt2", add_prev_edits=False, early_stop="loss")
    enc = Encore(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    enc.apply(CASES[:1], ws)
    enc.apply(CASES[1:2], ws)
    a = ws.take_applied()
    model2, tok2, _, _, _ = prepare(second_moment, tiny_lm, "gpt2")
    ratio = float(hp["update_norm_lambda"]) / float(hp["mom2_update_weight"])
    ridge = {m: C + ratio * torch.eye(C.shape[0], dtype=torch.float64) for m, C in stats.items()}
    mhp = {k: v for k, v in hp.items() if k not in ("update_norm_lambda", "add_prev_edits", "key_fold_size")}
    mem = Memit(model2, tok2, {**mhp, "mom2_adjustment": True}, ridge, TEMPLATES)
    ws2 = WeightState(model2, mods)
    mem.apply(CASES[:1], ws2)
    mem.apply(CASES[1:2], ws2)
    b = ws2.take_applied()
    for x, y in zip(a, b):
        assert torch.allclose(x.u, y.u, rtol=1e-5, atol=1e-7) and torch.allclose(x.v, y.v, rtol=1e-5, atol=1e-6)


def test_earlier_keys_keep_earlier_edits(second_moment, tiny_lm):
    """With Kp in the normal equations, the second update moves the first edit's keys' outputs
    less than without it."""
    moved = {}
    for prev in (True, False):
        model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, "gptj", add_prev_edits=prev, mom2_update_weight=1.0,
                                              update_norm_lambda=0.1)
        editor = Encore(model, tok, hp, stats, TEMPLATES)
        ws = WeightState(model, mods)
        editor.apply(CASES[:1], ws)
        k1 = {m: editor.last_keys[m].clone() for m in mods}
        ws.take_applied()
        editor.apply(CASES[1:2], ws)
        second = ws.take_applied()
        moved[prev] = sum(float((u.u.double() @ (u.v.double().T @ k1[u.module])).norm()) for u in second)
    assert moved[True] < moved[False]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_state_round_trip_gives_identical_next_update(second_moment, tiny_lm, arch):
    model, tok, hp, mods, stats = prepare(second_moment, tiny_lm, arch, key_fold_size=2)
    editor = Encore(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(CASES[:2], ws)
    editor.apply(CASES[2:3], ws)
    state = {k: v.copy() for k, v in editor.state_dict().items()}
    delta = {m: ws.delta[m].clone() for m in mods}
    ws.take_applied()
    editor.apply(CASES[:1], ws)
    cont = ws.take_applied()
    model2, tok2, _, _, _ = prepare(second_moment, tiny_lm, arch, key_fold_size=2)
    ws2 = WeightState(model2, mods, delta=delta)
    editor2 = Encore(model2, tok2, hp, stats, TEMPLATES, state=state)
    editor2.apply(CASES[:1], ws2)
    resumed = ws2.take_applied()
    assert len(cont) == len(resumed) == len(mods)
    for a, b in zip(cont, resumed):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    for m in mods:
        assert np.array_equal(editor.state_dict()[f"{m}/keys"], editor2.state_dict()[f"{m}/keys"])
    with pytest.raises(EditscaleError, match="state has no"):
        Encore(model2, tok2, hp, stats, TEMPLATES, state={"x/keys": state[f"{mods[0]}/keys"]})


def _all_targets_argmax(model, tok, case, templates, module, v_star) -> bool:
    """Whether, with delta = v* - v0 added at the subject-last token of `module`'s output (v0: that
    output for the plain prompt, as optimize_value injects it), every target token
    is the argmax at its position in every rewriting prompt but the first (MPES's condition), the
    loss read at the final layer as in this test's hparams."""
    from editscale.models.nethook import Trace

    target_ids = encoding.target_token_ids(tok, encoding.target_str(case))
    prompts = [fill(t, case["prompt"]) for t in templating.flat_templates(templates)][1:]
    ids, lookup = encoding.encode_with_subject(tok, prompts, [case["subject"]] * len(prompts))
    _, v0 = subject_keys.module_io_at_subject(model, tok, module, [case["prompt"]], [case["subject"]])
    delta = v_star - v0[0].float()
    ok = True
    for seq, pos in zip(ids, lookup):
        x = torch.tensor([seq + target_ids[:-1]])

        def put(name, out, pos=pos):
            out = out.clone()
            out[0, pos] += delta.to(out.dtype)
            return out

        with torch.no_grad(), Trace(model, [module], edit_output=put):
            logits = model(input_ids=x).logits[0]
        pred = logits[len(seq) - 1: len(seq) - 1 + len(target_ids)].argmax(-1).tolist()
        ok &= pred == target_ids
    return ok


@pytest.mark.parametrize("arch", ARCHS)
def test_mpes_stops_by_its_rule(second_moment, tiny_lm, arch):
    """early_stop mpes: the count of all-correct passes reaches mpes_steps, its v* satisfies the
    condition, a larger mpes_steps never stops earlier, and the trajectory is the same as running
    exactly that many steps with no early stop (bit for bit)."""
    model, tok = tiny_lm(arch)
    hp = load_hparams(ROOT / "config/hparams/encore/tiny.yaml", method="encore")
    hp.update(v_num_grad_steps=40, v_loss_layer=3, clamp_norm_factor=50.0, kl_factor=0.0, v_weight_decay=0.0)
    module = layer_name(model, 2)
    # the subject ends the prompt: the target is predicted where v* is written, so a random tiny
    # model reaches the argmax in a few steps (long before the loss rule's 5e-2)
    case = {"case_id": 14, "subject": "Tokyo", "prompt": "We talked about {}", "target_new": "Europe"}
    runs = {}
    for n in (1, 2):
        v, lg = value_optimization.optimize_value(model, tok, case, TEMPLATES, module, {**hp, "early_stop": "mpes", "mpes_steps": n})
        runs[n] = (v, lg)
    v1, lg1 = runs[1]
    assert lg1["stop"] == "mpes" and lg1["v_loss"] > value_optimization.EARLY_STOP_LOSS, lg1
    assert _all_targets_argmax(model, tok, case, TEMPLATES, module, v1)
    assert runs[2][1]["steps"] >= lg1["steps"]
    v_none, lg_none = value_optimization.optimize_value(model, tok, case, TEMPLATES, module,
                                            {**hp, "early_stop": "none", "v_num_grad_steps": lg1["steps"] + 1})
    assert lg_none["stop"] == "steps" and lg_none["steps"] == lg1["steps"] and torch.equal(v_none, v1)
    if lg1["steps"] > 0:  # one step earlier the condition did not hold yet
        v_before, _ = value_optimization.optimize_value(model, tok, case, TEMPLATES, module,
                                            {**hp, "early_stop": "none", "v_num_grad_steps": lg1["steps"]})
        assert not _all_targets_argmax(model, tok, case, TEMPLATES, module, v_before)


def test_early_stop_is_an_option_of_every_value_optimizing_method():
    for name in ("rome", "r-rome", "memit", "emmet", "alphaedit", "encore"):
        cls = get_method(name)
        assert "early_stop" in cls.default_hparams and "mpes_steps" in cls.default_hparams, name
        assert cls.default_hparams["early_stop"] == ("mpes" if name == "encore" else "loss"), name
    memit = load_hparams(ROOT / "config/hparams/memit/tiny.yaml", method="memit")
    with pytest.raises(EditscaleError, match="'early_stop' = 'sometimes' is not allowed"):
        get_method("memit").validate_hparams({**memit, "early_stop": "sometimes"}, "x.yaml")


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "gpt2-xl", "llama3-8b"])
def test_hparam_files_load(name):
    hp = load_hparams(ROOT / "config/hparams/encore" / f"{name}.yaml", method="encore")
    assert hp["early_stop"] == "mpes" and hp["update_norm_lambda"] > 0 and hp["add_prev_edits"] is True
