"""EMMET: equality-constrained batch edits of one layer, on tiny random models of every
architecture (C = E[k k^T] over random token batches)."""

from __future__ import annotations

import pytest
import torch

from editscale.edit import solvers
from editscale.edit.emmet import Emmet
from editscale.edit.rome import Rome
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError

from editscale.models.fetch import TINY_ARCHS

CASE3 = {"case_id": 9, "subject": "Brazil", "prompt": "The official language of {} is", "target_new": "French", "target_true": "Portuguese"}


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


def emmet_hparams(rome_kit, **kw) -> dict:
    hp = rome_kit.tiny_hparams(v_inject="mlp_out", emmet_lambda=0.1, update_norm_lambda=0.0, mom2_update_weight=1000, v_num_grad_steps=5)
    hp.pop("key_averaging")
    hp.update(kw)
    return hp


def run(rome_kit, method_cls, arch, hp, cases):
    model, tok, templates, module, C = rome_kit.tiny(arch)
    ws = WeightState(model, [module])
    try:
        editor = method_cls(model, tok, hp, {module: C}, templates)
        rows = editor.apply(cases, ws)
        updates = ws.take_applied()
        after = {"templates_out": solvers.module_forward(model, ws, module, editor.last.get("K", editor.last.get("k_star")))}
    finally:
        ws.delta[module].zero_()
        ws._write(module)
    return editor, rows, updates, after


def test_emmet_single_edit_equals_r_rome(rome_kit, arch):
    _, _, upd_r, _ = run(rome_kit, Rome, arch, rome_kit.tiny_hparams(key_averaging="templates", v_num_grad_steps=5), [rome_kit.CASE])
    emmet, rows, upd_e, _ = run(rome_kit, Emmet, arch, emmet_hparams(rome_kit, ), [rome_kit.CASE])
    module = rome_kit.tiny(arch)[3]
    dr, de = rome_kit.dense(upd_r)[module], rome_kit.dense(upd_e)[module]
    assert rome_kit.rel(de, dr) < 1e-5
    assert rows[0]["case_id"] == 7 and rows[0]["batch"] == 1


def test_emmet_batch_satisfies_constraints_exactly_without_lambda(rome_kit, arch):
    emmet, rows, updates, after = run(rome_kit, Emmet, arch, emmet_hparams(rome_kit, emmet_lambda=0.0), [rome_kit.CASE, rome_kit.CASE2, CASE3])
    V = emmet.last["V"]  # target outputs v* of the three cases, [d_out, 3]
    assert len(updates) == 1 and updates[0].u.shape[1] == 3 and updates[0].v.shape[1] == 3
    for j in range(3):
        assert rome_kit.rel(after["templates_out"][:, j], V[:, j]) < 1e-4
    assert [r["case_id"] for r in rows] == [7, 8, 9]
    assert max(r["constraint_rel_residual"] for r in rows) < 1e-4
    module = rome_kit.tiny(arch)[3]
    assert torch.linalg.matrix_rank(rome_kit.dense(updates)[module].double(), rtol=1e-5) == 3
    assert all(r["steps"] == 4 and r["v_loss"] == r["v_loss"] for r in rows)  # v* optimized per case (NLL decrease: test_rome)


@pytest.mark.parametrize("weight", [1, 1000])
def test_emmet_batch_with_lambda_has_small_residual(rome_kit, arch, weight):
    """emmet_lambda 0.1 relaxes the constraints: the part of each requested change that is not
    made is lambda / (eig(D) + lambda) with D = K^T (w C)^-1 K ~ d_in / w; the scale w =
    mom2_update_weight therefore sets how much emmet_lambda matters (the reference behaviour)."""
    emmet, rows, _, after = run(rome_kit, Emmet, arch, emmet_hparams(rome_kit, emmet_lambda=0.1, mom2_update_weight=weight), [rome_kit.CASE, rome_kit.CASE2, CASE3])
    V, R = emmet.last["V"], emmet.last["R"]
    resid = [rome_kit.rel(after["templates_out"][:, j], V[:, j]) for j in range(3)]
    shortfall = [float((after["templates_out"][:, j] - V[:, j]).norm() / R[:, j].norm()) for j in range(3)]
    assert resid == pytest.approx([r["constraint_rel_residual"] for r in rows], rel=1e-3, abs=1e-7)
    assert shortfall == pytest.approx([r["constraint_shortfall"] for r in rows], rel=1e-3, abs=1e-7)
    assert max(resid) > 1e-7  # lambda does relax the constraints
    if weight == 1:  # D ~ d_in >> 0.1: nearly exact
        assert max(shortfall) < 1e-2
    else:  # D ~ d_in / 1000 ~ 0.1-0.3 on the rome_kit.tiny models: a large part of the change is damped
        assert max(shortfall) < 1.0
    print(f"{arch} w={weight}: emmet_lambda=0.1 relative residual {max(resid):.2e}, shortfall {max(shortfall):.2e}")


def test_emmet_reference_layer_injection(rome_kit, arch):
    """v_inject: layer (the reference code): the change asked of the module is z - z_init."""
    emmet, rows, updates, after = run(rome_kit, Emmet, arch, emmet_hparams(rome_kit, v_inject="layer", emmet_lambda=0.0, clamp_norm_factor=0.75), [rome_kit.CASE, rome_kit.CASE2, CASE3][:2])
    R = emmet.last["R"]
    assert torch.isfinite(R).all() and R.norm() > 0
    for j in range(2):
        assert rome_kit.rel(after["templates_out"][:, j], emmet.last["V"][:, j]) < 1e-4
    assert all(r["steps"] == 4 and r["v_loss"] == r["v_loss"] for r in rows)  # v* optimized per case (NLL decrease: test_rome)


def test_emmet_hparams_validation(rome_kit):
    model, tok, templates, module, C = rome_kit.tiny("gpt2")
    with pytest.raises(EditscaleError, match="v_inject"):
        Emmet(model, tok, emmet_hparams(rome_kit, v_inject="residual"), {module: C}, templates)
    with pytest.raises(EditscaleError, match="emmet_lambda"):
        Emmet(model, tok, emmet_hparams(rome_kit, emmet_lambda=-1), {module: C}, templates)
    assert Emmet(model, tok, {k: v for k, v in emmet_hparams(rome_kit, ).items() if k != "emmet_lambda"}, {module: C}, templates).hparams["emmet_lambda"] == 0.1
