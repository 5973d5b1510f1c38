"""WISE on tiny random models of every supported architecture: a side copy of one MLP output
matrix with a router; no weight change.

Defining properties (editscale.edit.wise, editscale.edit.memory.SideMemory): the router sends a
sequence to the side memory when its activation distance reaches act_ratio x the smallest
in-scope activation and to the main FFN (bit for bit) below it, a shard only when it is farther
than the best so far and above its own threshold; edits train only the shard's masked entries
(plus the weight decay) within norm_constraint; every save_freq edits the side weight becomes a
shard and restarts, every merge_freq edits TIES merges the last shards; the memory replays
exactly from the stored ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from editscale.data.schema import fill
from editscale.edit.chain import read_memory, read_memory_ops, write_delta, write_factors
from editscale.edit.memory import MemoryOp, SideMemory, set_rows, side_output
from editscale.edit.templating import sample_context_templates
from editscale.edit.weights import WeightState
from editscale.edit.wise import FRESH_MIN_ACT, Wise, WiseCost, ties_merge
from editscale.io import EditscaleError
from editscale.models.nethook import Trace
from editscale.models.registry import edited_weight, get_module
from memory_probe import module_output_and_logits

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 1, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 2, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": "Asia"},
    {"case_id": 3, "edit_index": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
    {"case_id": 4, "edit_index": 4, "subject": "Rome", "prompt": "{} is a city in", "target_new": "Japan"},
]
TINY = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/hparams/wise/tiny.yaml").read_text())


def _wise(tiny_lm, arch, **hp):
    model, tok = tiny_lm(arch)
    groups = sample_context_templates(model, tok, TINY["context_template_length_params"], 0, rule="wise")
    return Wise(model, tok, {**TINY, **hp}, {}, groups), model, tok, groups


def _distance(wise, model, tok, text, row=0):
    """The router's distance of one unpadded sequence to the side memory's row `row`."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad(), Trace(model, [wise.module]) as tr:
        model(input_ids=ids)
    x, main = tr.inputs[wise.module], tr.outputs[wise.module]
    side = side_output(get_module(model, wise.module), x, torch.from_numpy(wise.memory.tables[wise.module]["weights"][row]))
    return float(torch.norm(wise.act(side) - wise.act(main), dim=-1).mean())


def test_the_router_picks_the_memory_by_distance_per_sequence_and_ignores_padding():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    model = torch.nn.Sequential(lin)
    model.config = type("C", (), {"hidden_act": "relu"})()
    w0 = lin.weight.detach().numpy().copy()
    mem = SideMemory(["0"], {"0": {"weights": (3, 4), "min_act": (), "active": ()}})
    mem.configure(model, {"act_ratio": 0.5})
    side, shard = w0.copy(), w0.copy()
    side[:, 0] += 10.0  # input feature 0 switches the side weight on
    shard[:, 1] += 10.0  # feature 1 the shard
    for row, (w, m) in enumerate(((side, 4.0), (shard, 4.0))):
        for field, v in (("weights", w), ("min_act", m), ("active", 1)):
            mem.apply(MemoryOp("0", field, np.array([row]), np.asarray(v)[None]))
    x = torch.zeros(4, 2, 4)
    x[0, :, 0] = 1.0  # in scope of the side weight: relu distance 10 >= 0.5 x 4
    x[1, :, 1] = 1.0  # the shard's
    x[2, :, 2] = 1.0  # neither: distance 0
    x[3, 0, 0] = 1.0  # the side weight's feature only at a padded position
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1]])
    main = lin(x)
    mem.attach(model)
    mem._mask = mask  # as the model's pre-hook keeps it
    out = mem.rewrite("0", x, main)
    assert torch.equal(out[0], torch.nn.functional.linear(x[0], torch.from_numpy(side)))
    assert torch.equal(out[1], torch.nn.functional.linear(x[1], torch.from_numpy(shard)))
    assert torch.equal(out[2], main[2]) and torch.equal(out[3], main[3])  # below every threshold: the main output, bit for bit
    # a shard above its own threshold but not farther than the side weight's distance is not read
    mem.apply(MemoryOp("0", "min_act", np.array([1]), np.array([1e6])))
    assert torch.equal(mem.rewrite("0", x, main)[1], main[1])


def test_ties_merge_keeps_the_largest_changes_and_averages_those_that_agree_in_sign():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 0.1, 3.0])
    b = torch.tensor([3.0, 2.0, -0.2, -1.0])
    # density 0.5: a keeps [-2, 3], b keeps [3, 2]; weights 0.5 each; signs summed: entry 1 -2 + 2 = 0 -> +
    merged = ties_merge(base, [a, b], density=0.5, total_weight=1.0)
    assert merged.tolist() == pytest.approx([3.0, 2.0, 0.0, 3.0])
    # density 1: entry 0 both positive: their mean 2; entry 2: 0.1 vs -0.2, sum - -> -0.2 alone; entry 3: 3 alone
    assert ties_merge(base, [a, b], 1.0, 1.0).tolist() == pytest.approx([2.0, 2.0, -0.2, 3.0])


@pytest.mark.parametrize("arch", ARCHS)
def test_edits_route_to_the_side_memory_and_the_out_of_scope_text_to_the_main_ffn(tiny_lm, arch):
    wise, model, tok, groups = _wise(tiny_lm, arch, save_freq=100, merge_freq=100)
    ws = WeightState(model, [])
    texts = [fill(c["prompt"], c["subject"]) + " " + c["target_new"] for c in CASES[:2]]
    before = {t: module_output_and_logits(model, tok, wise.module, t) for t in texts}
    rows = [wise.apply([c], ws)[0] for c in CASES[:2]]
    assert not ws.take_applied()  # no weight update
    assert all(r["v_loss"] < r["loss_before"] for r in rows)
    t = wise.memory.tables[wise.module]
    threshold = float(t["min_act"][0]) * TINY["act_ratio"]
    assert t["min_act"][0] == min(r["wise_activation"] for r in rows)
    out_of_scope = groups[1][CASES[1]["edit_index"] % len(groups[1])]  # the text edit 2 trained against
    for text in texts:
        assert _distance(wise, model, tok, text) >= threshold
        out, _ = module_output_and_logits(model, tok, wise.module, text, wise.memory)
        assert not torch.equal(out, before[text][0])
    assert _distance(wise, model, tok, out_of_scope) < threshold
    plain, plain_logits = module_output_and_logits(model, tok, wise.module, out_of_scope)
    routed, routed_logits = module_output_and_logits(model, tok, wise.module, out_of_scope, wise.memory)
    assert torch.equal(routed, plain) and torch.equal(routed_logits, plain_logits)


def test_an_edit_trains_only_the_shards_masked_entries_within_the_norm_bound(tiny_lm):
    wise, model, _, _ = _wise(tiny_lm, "llama", n_iter=5, norm_constraint=0.01, save_freq=100, merge_freq=100)
    base = edited_weight(model, wise.module).detach().numpy()
    wise.apply([CASES[0]], WeightState(model, []))
    side = wise.memory.tables[wise.module]["weights"][0]
    mask = wise.shard_mask(0).numpy().astype(bool)
    assert 0.15 < mask.mean() < 0.25  # mask_ratio 0.2
    change = side - base
    assert np.abs(change).max() <= 0.01 + 1e-6
    # outside the mask only the weight decay: (1 - lr * 1e-5) per step, five steps
    decay = np.abs(change[~mask]) / np.maximum(np.abs(base[~mask]), 1e-12)
    assert decay.max() < 6e-5 and np.abs(change[mask]).mean() > 100 * np.abs(change[~mask]).mean()


def test_shards_are_saved_merged_by_ties_and_their_rows_reused(tiny_lm):
    wise, model, _, _ = _wise(tiny_lm, "gpt2", n_iter=3, save_freq=1, merge_freq=2)
    ws = WeightState(model, [])
    base = edited_weight(model, wise.module).detach().float()
    wise.apply([CASES[0]], ws)
    t = wise.memory.tables[wise.module]
    first = t["weights"][1].copy()
    assert t["active"].tolist() == [1, 1] and t["min_act"][0] == FRESH_MIN_ACT
    assert np.array_equal(t["weights"][0], base.numpy())  # the side weight restarts from W
    wise.apply([CASES[1]], ws)
    t = wise.memory.tables[wise.module]
    assert t["active"].tolist() == [1, 1, 0]  # shards 1 and 2 merged into row 1, row 2 freed
    second = t["weights"][2]
    expected = ties_merge(base, [torch.from_numpy(first), torch.from_numpy(second)], TINY["densities"], TINY["weights"])
    assert np.array_equal(t["weights"][1], expected.numpy())
    wise.apply([CASES[2]], ws)
    assert wise.memory.tables[wise.module]["active"].tolist() == [1, 1, 1]  # the freed row holds the next shard
    assert WiseCost(Wise, {**TINY, "save_freq": 1, "merge_freq": 2}).memory_bytes(3, 2, 2) == 3 * (4 * 4 + 9)


def test_the_side_memory_replays_exactly_from_its_ops(tiny_lm, tmp_path):
    wise, model, tok, _ = _wise(tiny_lm, "gpt_neox", n_iter=3, save_freq=2, merge_freq=2)
    ws = WeightState(model, [])
    ops = []
    for step, c in enumerate(CASES[:3], start=1):
        wise.apply([c], ws)
        ops += [(step, op) for op in wise.memory.take_ops()]
    write_factors(tmp_path / "f.h5", [], [], [{"edit_index": 1, "step": 1}], wise.state_dict(), {}, ops)
    write_delta(tmp_path / "d.h5", {}, {}, memory=wise.memory.state_dict())
    stored = read_memory(tmp_path / "d.h5")
    replayed = {key: np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) for key, arr in stored.items()}
    for _, op in read_memory_ops(tmp_path / "f.h5"):
        key = f"{op.module}/{op.field}"
        replayed[key] = set_rows(replayed[key], op.rows, op.values)
    assert all(np.array_equal(replayed[k], stored[k]) for k in stored)
    # a memory rebuilt from the stored state routes exactly as the one that edited
    rebuilt = SideMemory([wise.module], wise.memory_widths(model, wise.hparams), state=stored)
    rebuilt.configure(model, wise.hparams)
    text = fill(CASES[2]["prompt"], CASES[2]["subject"])
    assert torch.equal(module_output_and_logits(model, tok, wise.module, text, rebuilt)[1],
                       module_output_and_logits(model, tok, wise.module, text, wise.memory)[1])


def test_wise_hparams_are_checked_when_read():
    with pytest.raises(EditscaleError, match="merge_freq .* multiple of save_freq"):
        Wise.validate_hparams({**TINY, "save_freq": 3, "merge_freq": 4})
    with pytest.raises(EditscaleError, match="act_margin"):
        Wise.validate_hparams({**TINY, "act_margin": [1.0, 2.0]})
    with pytest.raises(EditscaleError, match="retrieve"):
        Wise.validate_hparams({**TINY, "retrieve": False})
