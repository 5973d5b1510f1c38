"""UltraEdit on tiny random models of every supported architecture: the keys and output gradients
are those of one cross-entropy backward pass (checked against an independent autograd probe), the
running statistics and the closed-form update match a direct numpy computation of their
definitions, and a chain restored from its saved statistics makes the identical next update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from editscale.edit.methods import get_method, load_hparams
from editscale.edit.ultraedit import EPS32, UltraEdit, case_tokens
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError
from editscale.models.registry import arch_spec

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
TEMPLATES = [["{}"]]
CASES = [
    {"case_id": 11, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 12, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 13, "edit_index": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
    {"case_id": 14, "edit_index": 4, "subject": "Rome", "prompt": "{} lies in", "target_new": "Africa"},
]


def prepare(tiny_lm, arch: str, **over):
    model, tok = tiny_lm(arch)
    hp = load_hparams(ROOT / "config/hparams/ultraedit/tiny.yaml", method="ultraedit")
    if arch_spec(model).mlp_up:
        hp["mlp_up_layers"] = [2, 3]
    hp.update(over)
    editor = UltraEdit(model, tok, hp, {}, TEMPLATES)
    return model, tok, hp, editor, WeightState(model, editor._modules)


def _recurrence(batches: list[np.ndarray]):
    """The reference's RunningMeanStd.update, written out in float64 numpy."""
    n, mean, var = 0.0, 0.0, 0.0
    for x in batches:
        m = x.shape[0]
        total = n + m
        delta = x.mean(0) - mean
        mean = mean + m * delta / total
        var = var + m * (x.var(0, ddof=1) if m > 1 else 0.0) + n * m * delta**2 / total
        n = total
    return n, mean, var, np.sqrt(var / (n - 1 + EPS32))


def test_gradients_are_those_of_the_target_cross_entropy(tiny_lm):
    model, tok, hp, editor, _ = prepare(tiny_lm, "llama")
    keys, grads, loss = editor.keys_and_gradients(CASES[:2])
    # independent probe: a zero tensor added to each module's output, its gradient read back
    seqs = [case_tokens(tok, c) for c in CASES[:2]]
    width = max(len(i) for i, _ in seqs)
    ids = torch.zeros((2, width), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (x, y) in enumerate(seqs):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
    where = torch.where(labels != -100)
    probes, handles = {}, []
    for m in editor._modules:
        mod = dict(model.named_modules())[m]

        def hook(module, args, out, name=m):
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            ref_loss = torch.nn.functional.cross_entropy(logits[where].float(), labels[where])
            ref_loss.backward()
    finally:
        for h in handles:
            h.remove()
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    n_targets = sum(len(common_t) - common_t.count(-100) for _, common_t in seqs)
    for m in editor._modules:
        assert grads[m].shape[0] == keys[m].shape[0] == n_targets
        assert torch.allclose(grads[m], probes[m].grad[where], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_running_statistics_and_closed_form_match_numpy(tiny_lm, arch):
    model, tok, hp, editor, ws = prepare(tiny_lm, arch, tuple_size=2, lr=1e-3)
    captured = []
    real = editor.keys_and_gradients

    def spy(cases):
        out = real(cases)
        captured.append((cases, out))
        return out

    editor.keys_and_gradients = spy
    editor.apply(CASES[:3], ws)  # sorted longest first, tuples of 2 and 1
    assert [len(c) for c, _ in captured] == [2, 1]
    lengths = [len(case_tokens(tok, c)[0]) for c, _ in captured for c in c]
    assert lengths == sorted(lengths, reverse=True)
    updates = {u.module: u for u in ws.take_applied()}
    assert list(updates) == editor._modules
    for shape in dict.fromkeys(editor.shape_of.values()):
        mods = [m for m in editor._modules if editor.shape_of[m] == shape]
        # one update per tuple per module of this shape, in module order (shared statistics)
        batches = [np.concatenate([k[m].numpy(), g[m].numpy()], axis=1).astype(np.float64) for _, (k, g, _) in captured for m in mods]
        n, mean, var, std = _recurrence(batches)
        norm = editor.normalizer[shape]
        assert float(norm.n) == n
        assert np.allclose(norm.mean.numpy(), mean, rtol=1e-5, atol=1e-7)
        assert np.allclose(norm.var.numpy(), var, rtol=1e-4, atol=1e-9)
        assert np.allclose(norm.std.numpy(), std, rtol=1e-4, atol=1e-9)
        for m in mods:
            H = np.concatenate([k[m].numpy() for _, (k, _, _) in captured]).astype(np.float64)
            G = np.concatenate([g[m].numpy() for _, (_, g, _) in captured]).astype(np.float64)
            d_in = H.shape[1]
            Z = (np.concatenate([H, G], axis=1) - norm.mean.numpy()) / (norm.std.numpy() + EPS32)
            h_hat, g_hat = Z[:, :d_in], Z[:, d_in:]
            v_hat = -hp["lr"] * (h_hat**2).sum(1, keepdims=True) * g_hat
            shift = np.linalg.solve(H.T @ H + np.eye(d_in), H.T @ v_hat)  # [d_in, d_out], the reference's orientation
            dW = updates[m].u.double().numpy() @ updates[m].v.double().numpy().T
            assert np.abs(dW - shift.T).max() <= 1e-4 * np.abs(shift).max(), m
            assert np.abs(shift).max() > 0


def test_a_restored_chain_makes_the_identical_next_update(tiny_lm):
    model, tok, hp, editor, ws = prepare(tiny_lm, "llama")
    editor.apply(CASES[:2], ws)
    state, delta = editor.state_dict(), {m: ws.delta[m].clone() for m in editor._modules}
    assert all(k.startswith("normalizer/") for k in state) and any(k.endswith("/var") for k in state)
    ws.take_applied()
    editor.apply(CASES[2:4], ws)
    uninterrupted = ws.take_applied()
    model2, _ = tiny_lm("llama")
    resumed = get_method("ultraedit", hp)(model2, tok, hp, {}, TEMPLATES, state={k: v.copy() for k, v in state.items()})
    ws2 = WeightState(model2, resumed._modules, delta=delta)
    resumed.apply(CASES[2:4], ws2)
    for a, b in zip(uninterrupted, ws2.take_applied(), strict=True):
        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_modules_per_architecture_and_errors(tiny_lm):
    assert UltraEdit.modules("llama", {"mlp_in_layers": [1], "mlp_up_layers": [2], "layers": [3]}) == [
        "model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]
    assert UltraEdit.modules("gpt2", {"mlp_in_layers": [1]}) == ["transformer.h.1.mlp.c_fc"]
    with pytest.raises(EditscaleError, match="mlp_up_layers is set but this architecture's MLP has one input matrix"):
        UltraEdit.modules("gpt2", {"mlp_up_layers": [1]})
    with pytest.raises(EditscaleError, match="edits no module"):
        UltraEdit.validate_hparams({"lr": 1e-6, "tuple_size": 10, "mlp_in_layers": [], "mlp_up_layers": [], "layers": []})
    with pytest.raises(EditscaleError, match="out of range"):
        UltraEdit.check_for_model({"mlp_up_layers": [9]}, 4)
