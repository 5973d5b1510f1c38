"""FT-C (constrained fine-tuning) on tiny random models of every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from editscale.edit.methods import load_hparams
from editscale.edit import encoding
from editscale.edit.ftc import FineTuneConstrained, _Batch
from editscale.edit.methods import get_method
from editscale.edit.weights import WeightState, add_update
from editscale.io import EditscaleError

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = ROOT / "config" / "hparams" / "ft-c"
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 21, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 22, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 23, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
]

def hparams(**over) -> dict:
    hp = load_hparams(HPARAMS / "tiny.yaml", method="ft-c")
    hp.update(over)
    return hp


@torch.no_grad()
def nll(model, tok, cases, objective: str) -> torch.Tensor:
    batch = _Batch(tok, cases, objective, next(model.parameters()).device)
    return batch.nll(model(**batch.inputs).logits)


@torch.no_grad()
def teacher_forced_nll(model, tok, case) -> float:
    """NLL of target_new's tokens given the prompt, computed independently of ftc.py."""
    p = tok(case["prompt"].format(case["subject"]))["input_ids"]
    t = encoding.target_token_ids(tok, encoding.target_str(case))
    ids = torch.tensor([p + t])
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
    return float(-sum(logp[len(p) - 1 + j, t[j]] for j in range(len(t))) / len(t))


@pytest.mark.parametrize("arch", ARCHS)
def test_linf_bound_and_nll_decreases(tiny_lm, arch):
    model, tok = tiny_lm(arch)
    hp = hparams()
    eps = float(hp["norm_constraint"])
    case = CASES[0]
    editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
    mods = editor.modules(model, hp)
    assert len(mods) == 1 and ".0." in mods[0]
    ws = WeightState(model, mods)
    before = nll(model, tok, [case], hp["objective"])[0].item()
    rows = editor.apply([case], ws)
    after = nll(model, tok, [case], hp["objective"])[0].item()
    assert after < before - 0.05
    assert rows[0]["loss_before"] == pytest.approx(before, rel=1e-4)
    assert rows[0]["v_loss"] == pytest.approx(after, rel=1e-3, abs=1e-4)
    assert rows[0]["factor_kind"] == "dense"
    (upd,) = ws.take_applied()
    assert upd.kind == "dense" and upd.meta["dense"] is True
    assert upd.dense.abs().max().item() <= eps + 1e-7
    assert ws.delta[mods[0]].abs().max().item() <= eps + 1e-7
    assert upd.dense.abs().max().item() > eps / 2  # the bound is active, not a no-op
    # gradients never reach the model: all parameters requires_grad False, no .grad
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bound_holds_over_a_sequence_relative_to_each_start(tiny_lm):
    model, tok = tiny_lm("gpt2")
    hp = hparams()
    eps = float(hp["norm_constraint"])
    editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
    ws = WeightState(model, editor.modules(model, hp))
    for c in CASES:
        editor.apply([c], ws)
    ups = ws.take_applied()
    assert len(ups) == 3
    for u in ups:
        assert u.dense.abs().max().item() <= eps + 1e-7
    m = ws.modules[0]
    assert ws.delta[m].abs().max().item() <= 3 * eps + 1e-6


def test_teacher_forced_objective_reduces_sequence_nll(tiny_lm):
    model, tok = tiny_lm("gptj")
    hp = hparams(objective="teacher_forced")
    case = CASES[0]
    before = teacher_forced_nll(model, tok, case)
    assert nll(model, tok, [case], "teacher_forced")[0].item() == pytest.approx(before, rel=1e-4)
    editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
    ws = WeightState(model, editor.modules(model, hp))
    editor.apply([case], ws)
    assert teacher_forced_nll(model, tok, case) < before - 0.05


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batch_rows_and_bit_identical_replay(tiny_lm, arch):
    model, tok = tiny_lm(arch)
    hp = hparams()
    editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
    mods = editor.modules(model, hp)
    ws = WeightState(model, mods)
    before = nll(model, tok, CASES, hp["objective"])
    rows = editor.apply(CASES, ws)
    rows += editor.apply(CASES[:1], ws)
    assert [r["case_id"] for r in rows] == [21, 22, 23, 21]
    assert nll(model, tok, CASES, hp["objective"]).mean() < before.mean()
    replay = {m: torch.zeros_like(ws.delta[m]) for m in mods}
    for u in ws.take_applied():
        add_update(replay[u.module], u)
    for m in mods:
        assert torch.equal(replay[m], ws.delta[m])
        assert torch.equal(ws.current(m), ws.base[m] + ws.delta[m])


def test_deterministic(tiny_lm):
    deltas = []
    for _ in range(2):
        model, tok = tiny_lm("gpt_neox")
        hp = hparams()
        editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
        ws = WeightState(model, editor.modules(model, hp))
        editor.apply(CASES[:2], ws)
        deltas.append(ws.delta[ws.modules[0]].clone())
    assert torch.equal(*deltas)


def test_unconstrained_and_bad_hparams(tiny_lm):
    model, tok = tiny_lm("gpt2")
    hp = hparams(norm_constraint=None, lr=5e-2)
    editor = FineTuneConstrained(model, tok, hp, {}, ["{}"])
    ws = WeightState(model, editor.modules(model, hp))
    editor.apply(CASES[:1], ws)
    assert ws.delta[ws.modules[0]].abs().max().item() > 5e-3
    with pytest.raises(EditscaleError, match="norm_constraint"):
        FineTuneConstrained(model, tok, hparams(norm_constraint=-1.0), {}, ["{}"])
    with pytest.raises(EditscaleError, match="objective"):
        FineTuneConstrained(model, tok, hparams(objective="nope"), {}, ["{}"])
    bad = hparams()
    del bad["num_steps"]
    with pytest.raises(EditscaleError, match="num_steps"):
        FineTuneConstrained(model, tok, bad, {}, ["{}"])


@pytest.mark.parametrize("name", ["gpt2-xl", "gpt-j-6B", "smollm2-135m", "tiny"])
def test_hparam_files_load(name):
    hp = load_hparams(HPARAMS / f"{name}.yaml", method="ft-c")
    assert get_method("ft-c") is FineTuneConstrained
    if name == "gpt2-xl":
        assert (hp["layers"], hp["num_steps"], hp["lr"], hp["norm_constraint"]) == ([0], 25, 5e-4, 5e-4)
    if name == "gpt-j-6B":
        assert (hp["layers"], hp["num_steps"], hp["lr"], hp["norm_constraint"]) == ([0], 25, 5e-4, 5e-5)
