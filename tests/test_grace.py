"""GRACE on tiny random models of every supported architecture: a codebook at one MLP output
module, no weight change.

Defining properties (editscale.edit.grace): an input within a key's deferral radius gets the
key's value as the module's output, one outside every radius passes unchanged (the unedited
model's output, bit for bit); a new prompt adds a key (its query, radius eps), the same prompt and
target again keeps it, the same prompt with another target splits the radii; the memory after
any edit replays exactly from the stored ops, and the audit re-derives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editscale.data.schema import fill
from editscale.edit.chain import read_memory, read_memory_ops, write_delta, write_factors
from editscale.edit.grace import Grace, label_of
from editscale.edit.memory import Codebook, MemoryOp, set_rows
from editscale.edit.weights import WeightState

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 1, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 2, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": "Asia"},
    {"case_id": 3, "edit_index": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
]


def _grace(tiny_lm, arch, **hp):
    model, tok = tiny_lm(arch)
    return Grace(model, tok, {"layer": 2, "n_iter": 15, **hp}, {}, [["{}"]]), model, tok


def _last_logits(model, tok, prompt):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def test_a_codebook_replaces_outputs_within_a_radius_and_passes_the_rest():
    cb = Codebook(["m"], {"m": {"keys": (3,), "values": (2,), "radii": (), "labels": ()}})
    for field, row in (("keys", [1.0, 0.0, 0.0]), ("values", [7.0, 8.0]), ("radii", 0.5), ("labels", 1)):
        cb.apply(MemoryOp("m", field, np.array([0]), np.asarray(row)[None]))
    inputs = torch.tensor([[[1.0, 0.4, 0.0], [1.0, 0.6, 0.0], [9.0, 9.0, 9.0]]])
    output = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2)
    out = cb.rewrite("m", inputs, output)
    assert out[0, 0].tolist() == [7.0, 8.0]  # distance 0.4 <= 0.5
    assert torch.equal(out[0, 1:], output[0, 1:])  # 0.6 and far: untouched
    assert cb.size("m") == 1 and [len(o.rows) for o in cb.take_ops()] == [1, 1, 1, 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_edited_prompts_get_their_value_and_other_inputs_are_untouched(tiny_lm, arch):
    grace, model, tok = _grace(tiny_lm, arch)
    base = {c["case_id"]: _last_logits(model, tok, fill(c["prompt"], c["subject"])) for c in CASES}
    unrelated = "The weather today is"
    base_unrelated = _last_logits(model, tok, unrelated)
    ws = WeightState(model, [])
    rows = [grace.apply([c], ws)[0] for c in CASES]
    assert [r["grace_action"] for r in rows] == ["first", "added", "added"] and not ws.take_applied()  # no weight changes
    assert rows[-1]["v_loss"] < rows[-1]["loss_before"]
    t = grace.memory.tables[grace.module]
    assert len(t["keys"]) == 3 and t["radii"].tolist() == [1.0, 1.0, 1.0]
    assert t["labels"].tolist() == [label_of(c["target_new"]) for c in CASES]
    # without the memory attached the model is the unedited one
    assert torch.equal(_last_logits(model, tok, unrelated), base_unrelated)
    handles = grace.memory.attach(model)
    try:
        for c in CASES:
            logits = _last_logits(model, tok, fill(c["prompt"], c["subject"]))
            first = tok(" " + c["target_new"], add_special_tokens=False)["input_ids"][0]
            assert not torch.equal(logits, base[c["case_id"]])
            assert int(logits.argmax()) == first  # the target's first token, after 15 steps at lr 1
        # an input outside every key's radius: the module's output, and so the logits, unchanged
        assert torch.equal(_last_logits(model, tok, unrelated), base_unrelated)
    finally:
        for h in handles:
            h.remove()


def test_the_same_prompt_keeps_its_key_and_another_target_splits_the_radii(tiny_lm):
    grace, model, tok = _grace(tiny_lm, "llama", eps=1.0)
    ws = WeightState(model, [])
    grace.apply([CASES[0]], ws)
    again = grace.apply([{**CASES[0], "edit_index": 2}], ws)[0]
    assert again["grace_action"] == "kept" and again["grace_chosen"] == 0 and grace.memory.size(grace.module) == 1
    other = grace.apply([{**CASES[0], "edit_index": 3, "target_new": "Spain"}], ws)[0]
    t = grace.memory.tables[grace.module]
    # distance 0 to the old key: the radii split at 0 (the old one at -1e-5), the new key trained
    assert other["grace_action"] == "split" and other["grace_chosen"] == 1
    assert t["radii"].tolist() == pytest.approx([-1e-5, 0.0]) and t["labels"][1] == label_of("Spain")


def test_the_memory_replays_exactly_from_its_ops(tiny_lm, tmp_path):
    grace, model, _ = _grace(tiny_lm, "gpt2")
    ws = WeightState(model, [])
    ops = []
    for step, c in enumerate(CASES, start=1):
        grace.apply([c], ws)
        ops += [(step, op) for op in grace.memory.take_ops()]
    write_factors(tmp_path / "f.h5", [], [], [{"edit_index": 1, "step": 1}], {}, {}, ops)
    write_delta(tmp_path / "d.h5", {}, {}, memory=grace.memory.state_dict())
    stored = read_memory(tmp_path / "d.h5")
    assert stored.keys() == grace.memory.state_dict().keys()
    replayed = {key: np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) for key, arr in stored.items()}
    back = read_memory_ops(tmp_path / "f.h5")
    # by step, each table's ops in the order they were made (tables are independent)
    def per_table(seq):
        return {f: [(s, o.rows.tolist(), o.values.tolist()) for s, o in seq if o.field == f] for f in ("keys", "values", "radii", "labels")}
    assert per_table(back) == per_table(ops) and [s for s, _ in back] == sorted(s for s, _ in ops)
    for _, op in back:
        key = f"{op.module}/{op.field}"
        replayed[key] = set_rows(replayed[key], op.rows, op.values)
    assert all(np.array_equal(replayed[k], stored[k]) for k in stored)
    # up to edit 2: the first two keys only
    upto2 = Codebook([grace.module], grace.memory_widths(model, grace.hparams))
    for s, op in back:
        if s <= 2:
            upto2.apply(op)
    assert upto2.size(grace.module) == 2
    assert np.array_equal(upto2.tables[grace.module]["keys"], stored[f"{grace.module}/keys"][:2])


def test_the_audit_rederives_a_chains_memory_from_its_segments_ops(tiny_lm, tmp_path):
    """Two segments of two edits in the layout's files: the audit's re-derivation from the ops
    alone equals the memory stored at each checkpoint, and an op changed in a factors file shows."""
    import h5py

    from editscale.audit.audit import _rederive_memory
    from editscale.layout import delta_path, factors_path

    grace, model, _ = _grace(tiny_lm, "gpt2")
    ws = WeightState(model, [])
    cases = CASES + [{**CASES[0], "case_id": 4, "edit_index": 4, "subject": "Rome"}]
    for end in (2, 4):
        ops = []
        for step in (end - 1, end):
            grace.apply([cases[step - 1]], ws)
            ops += [(step, op) for op in grace.memory.take_ops()]
        write_factors(factors_path(tmp_path, end), [], [], [{"edit_index": end, "step": end}], {}, {}, ops)
        write_delta(delta_path(tmp_path, end), {}, {}, memory=grace.memory.state_dict())
    for k in (2, 4):
        stored = read_memory(delta_path(tmp_path, k))
        derived = _rederive_memory(tmp_path, k, 2, stored)
        assert len(stored[f"{grace.module}/keys"]) == k and all(np.array_equal(derived[key], stored[key]) for key in stored)
    with h5py.File(factors_path(tmp_path, 4), "r+") as f:  # edit 4's trained value changed
        f[f"memory_ops/{grace.module}/values/values"][-1, 0] += 1.0
    derived = _rederive_memory(tmp_path, 4, 2, read_memory(delta_path(tmp_path, 4)))
    assert not np.array_equal(derived[f"{grace.module}/values"], read_memory(delta_path(tmp_path, 4))[f"{grace.module}/values"])
