"""RECT and PRUNE on tiny random models of every supported architecture.

RECT: each update keeps exactly the reference's count of entries, those of largest |dW / W|, with
MEMIT's values; the masked update round-trips through the factors file bit for bit.
PRUNE: the accumulated delta's singular values above sigma_max(W0) become g(s) = log s - log
sigma_max + sigma_max of the unrestrained sum (never of an already restrained one), the others
stay; a chain restored from its saved state makes the identical next update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from editscale.edit.chain import accumulate, read_factors, write_factors
from editscale.edit.memit import Memit
from editscale.edit.methods import get_method, load_hparams
from editscale.edit.prune import PruneMixin, restrained_singular_values
from editscale.edit.rect import EPSILON
from editscale.edit.weights import Update, WeightState
from editscale.io import EditscaleError
from editscale.planning import storage_estimate

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = [["{}"], ["The city is large. {}", "I know. {}"]]


@pytest.fixture
def prepare(method_kit):
    """prepare(arch, method, base=None, **hparams) -> (class, model, tok, hparams, modules, stats)."""
    return lambda arch, method, **kw: method_kit(method, arch, **kw)


@pytest.fixture
def cases(city_cases):
    return city_cases()[0]


# -- RECT -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_rect_keeps_the_top_percent_of_relative_changes(prepare, cases, tiny_lm, arch):
    """Every update is masked: exactly numel - int(0.6 numel) + 1 entries (the reference's
    kthvalue rule) survive, with MEMIT's values, and every kept |dW / W| is >= every dropped one."""
    cls, model, tok, hp, mods, stats = prepare(arch, "rect")
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    before = {m: ws.current(m).clone() for m in mods}
    rows = editor.apply(cases[:1], ws)
    updates = ws.take_applied()
    assert [u.module for u in updates] == mods and all(u.kind == "masked" for u in updates)
    for upd in updates:
        dW = upd.u.double() @ upd.v.double().T
        ratio = (dW / (before[upd.module] + EPSILON)).abs()
        n = ratio.numel()
        assert int(upd.mask.sum()) == n - int(n * 60 / 100) + 1
        assert float(ratio[upd.mask].min()) >= float(ratio[~upd.mask].max())
        applied = ws.delta[upd.module]
        assert torch.equal(applied[~upd.mask], torch.zeros_like(applied[~upd.mask]))
        assert torch.allclose(applied[upd.mask].double(), dW[upd.mask], rtol=1e-6, atol=1e-9)
    assert rows[0]["rect_kept_fraction"] == pytest.approx(1 - int(ratio.numel() * 0.6) / ratio.numel(), abs=2 / ratio.numel())


def test_rect_factors_are_memits_computed_on_the_unmasked_update(prepare, cases, tiny_lm):
    """The factors RECT masks are MEMIT's: the later layer's keys see the unmasked earlier update,
    as execute_memit computes them before the masks are applied."""
    cls, model, tok, hp, mods, stats = prepare("llama", "rect")
    rect = cls(model, tok, hp, stats, TEMPLATES)
    ws_r = WeightState(model, mods)
    rect.apply(cases[:1], ws_r)
    masked = ws_r.take_applied()
    model2, _ = tiny_lm("llama")
    hp_m = {k: v for k, v in hp.items() if k != "rect_keep_percent"}
    memit = Memit(model2, tok, hp_m, stats, TEMPLATES)
    ws_m = WeightState(model2, mods)
    memit.apply(cases[:1], ws_m)
    plain = ws_m.take_applied()
    for a, b in zip(masked, plain):
        assert (a.u.float() - b.u).norm() / b.u.norm() < 1e-4
        assert (a.v.float() - b.v).norm() / b.v.norm() < 1e-4


def test_rect_updates_replay_bit_for_bit_from_the_factors_file(prepare, cases, tiny_lm, tmp_path):
    cls, model, tok, hp, mods, stats = prepare("gpt2", "rect")
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(cases[:1], ws)
    editor.apply(cases[1:3], ws)
    updates = ws.take_applied()
    path = tmp_path / "factors.h5"
    write_factors(path, updates, [1] * len(updates), [{"edit_index": 1, "step": 1}], {}, {})
    replayed = {}
    accumulate(replayed, [u for _, u in read_factors(path)[0]])
    assert all(torch.equal(replayed[m], ws.delta[m]) for m in mods)
    # float64 factors and one mask bit per entry, as doctor's storage estimate counts them
    d_out, d_in = ws.delta[mods[0]].shape
    est = storage_estimate({"n_edits": 1, "segment": 1}, {m: (d_out, d_in) for m in mods}, None, update_kind="masked")
    assert est["factor_bytes_per_edit"] == len(mods) * (8 * (d_out + d_in) + -(-d_out * d_in // 8))
    tensors = sum(8 * (d_out + d_in) * u.u.shape[1] + -(-d_out * d_in // 8) for u in updates)
    assert 0 <= path.stat().st_size - tensors < 60_000  # HDF5 headers, attributes, log
    assert tensors < 0.1 * len(updates) * 4 * d_out * d_in  # vs the dense matrices


def test_rect_keep_percent_100_is_memit(prepare, cases, tiny_lm):
    cls, model, tok, hp, mods, stats = prepare("gpt2", "rect", rect_keep_percent=100)
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(cases[:1], ws)
    assert all(bool(u.mask.all()) for u in ws.take_applied())


# -- PRUNE ------------------------------------------------------------------------------------


def _singular_values(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(t.double())


def _add_large_delta(ws: WeightState, mods: list[str]) -> None:
    """An accumulated delta of singular values 4, 2 and 0.5 sigma_max(W0) per module, as after many edits."""
    for m in mods:
        sigma0 = float(torch.linalg.matrix_norm(ws.base[m].double(), ord=2))
        ws.apply(Update(module=m, dense=_big_lowrank(ws.base[m].shape, sigma0)))


def _big_lowrank(shape, scale: float, rank: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], rank, generator=g, dtype=torch.float64))[0]
    s = scale * torch.tensor([4.0, 2.0, 0.5][:rank], dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("base", ["rome", "memit", "alphaedit"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_maps_the_accumulated_singular_values_above_sigma_max(prepare, cases, tiny_lm, arch, base):
    """After a restraint the live delta's singular values are g(s) of the unrestrained sum's
    (those above sigma_max(W0)) and s (the others): none exceeds the bound g(s_1)."""
    cls, model, tok, hp, mods, stats = prepare(arch, "prune", base=base)
    assert issubclass(cls, PruneMixin) and issubclass(cls, get_method(base))
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    # a large accumulated delta (as after many edits), then one real edit and its restraint
    _add_large_delta(ws, mods)
    ws.take_applied()
    raw_before_edit = {m: ws.delta[m].clone() for m in mods}
    rows = editor.apply(cases[:1], ws)
    updates = ws.take_applied()
    restraints = [u for u in updates if u.meta.get("restraint")]
    assert len(restraints) == len(mods)
    for m in mods:
        sigma0 = editor.sigma_max[m]
        base_sum = raw_before_edit[m].double() + sum(
            (u.u.double() @ u.v.double().T) for u in updates if u.module == m and not u.meta.get("restraint"))
        s_raw = _singular_values(base_sum)
        expected = torch.sort(restrained_singular_values(s_raw, sigma0), descending=True).values
        s_live = _singular_values(ws.delta[m])
        assert torch.allclose(s_live[:6], expected[:6], rtol=1e-4, atol=1e-5 * sigma0)
        assert float(s_live[0]) <= math.log(float(s_raw[0])) - math.log(sigma0) + sigma0 + 1e-4 * sigma0
        assert int((s_raw > sigma0).sum()) >= 2  # the test restrains something
    assert rows[0]["prune_restrained"] >= 2 * len(mods)


def test_prune_restrains_the_unrestrained_sum_not_the_restrained_one(prepare, cases, tiny_lm):
    """Two restraints in a row leave the delta as it was after the first (g is applied to D_raw,
    so it does not compound), and the correction's factors are the state a new segment restores."""
    cls, model, tok, hp, mods, stats = prepare("gpt2", "prune", base="memit")
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    _add_large_delta(ws, mods)
    editor.restrain(ws)
    once = {m: ws.delta[m].clone() for m in mods}
    editor.restrain(ws)
    for m in mods:
        assert (ws.delta[m] - once[m]).norm() / once[m].norm() < 1e-5
    state = editor.state_dict()
    assert all(f"{m}/prune_u" in state and f"{m}/prune_v" in state for m in mods)


def test_prune_chain_restored_from_its_state_makes_the_identical_next_update(prepare, cases, tiny_lm):
    cls, model, tok, hp, mods, stats = prepare("gpt2", "prune", base="alphaedit")
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    _add_large_delta(ws, mods)
    editor.apply(cases[:1], ws)
    state, delta = editor.state_dict(), {m: ws.delta[m].clone() for m in mods}
    assert any(k.endswith("/keys") for k in state) and any(k.endswith("/prune_u") for k in state)
    ws.take_applied()
    editor.apply(cases[1:2], ws)
    uninterrupted = ws.take_applied()

    model2, _ = tiny_lm("gpt2")
    ws2 = WeightState(model2, mods, delta=delta)
    resumed = cls(model2, tok, hp, stats, TEMPLATES, state={k: v.copy() for k, v in state.items()})
    resumed.apply(cases[1:2], ws2)
    again = ws2.take_applied()
    assert len(again) == len(uninterrupted)
    for a, b in zip(uninterrupted, again):
        assert a.module == b.module and torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    assert all(torch.equal(ws.delta[m], ws2.delta[m]) for m in mods)


def test_prune_restrain_every_waits_for_its_edit_index(prepare, cases, tiny_lm):
    cls, model, tok, hp, mods, stats = prepare("gpt2", "prune", base="memit", restrain_every=2)
    editor = cls(model, tok, hp, stats, TEMPLATES)
    ws = WeightState(model, mods)
    editor.apply(cases[:1], ws)  # edit 1: no restraint
    assert not any(u.meta.get("restraint") for u in ws.take_applied()) and editor.last_restraint == {}
    editor.apply(cases[1:2], ws)  # edit 2: restraint (possibly of nothing)
    assert set(editor.last_restraint) == set(mods)


def test_prune_needs_a_base_it_can_restrain(tmp_path):
    with pytest.raises(EditscaleError, match="'base' is missing"):
        get_method("prune", {"layers": [1]})
    with pytest.raises(EditscaleError, match=r"base 'ft-c' is not one of"):
        get_method("prune", {"base": "ft-c"})
    bad = tmp_path / "prune.yaml"
    text = (ROOT / "config/hparams/prune/tiny.yaml").read_text()
    bad.write_text(text.replace("restrain_every: 1", "restrain_every: 0"))
    with pytest.raises(EditscaleError, match="restrain_every"):
        load_hparams(bad, method="prune")
    bad.write_text(text.replace("mom2_update_weight: 100\n", ""))
    with pytest.raises(EditscaleError, match="mom2_update_weight"):
        load_hparams(bad, method="prune")


def test_every_shipped_hparams_file_loads_for_its_method():
    """config/hparams/<method>/<model>.yaml: each file is valid for the method its directory names
    (PRUNE's files with their base's keys)."""
    files = sorted((ROOT / "config" / "hparams").glob("*/*.yaml"))
    assert {p.parent.name for p in files} >= {"rect", "prune"}
    for path in files:
        hp = load_hparams(path)
        cls = get_method(path.parent.name, hp)
        assert cls.name == path.parent.name, path
