"""MEMOIR on tiny random models of every supported architecture: a residual memory beside one MLP
output matrix, written and read through TopHash masks; no weight change.

Defining properties (editscale.edit.memoir): a mask keeps exactly top_k input features, the
permuted indices of the prompt features' largest magnitudes; an edit writes only the columns of
W_r its mask keeps; an edited prompt reads the memory through its own mask (overlap 1) and an
unrelated text leaves the module's output bit for bit; distinct edits' masks overlap as little as
random top_k subsets do; scoring routes on the prompt alone; a decoding step keeps its sequence's
route; the memory replays exactly from the stored ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from editscale.data.schema import fill
from editscale.edit.chain import read_memory, read_memory_ops, write_delta, write_factors
from editscale.edit.memoir import Memoir, MemoirCost, ResidualMemory, tophash_mask
from editscale.edit.memory import set_rows
from editscale.edit.templating import sample_context_templates
from editscale.edit.weights import WeightState
from editscale.evaluate.scoring import score_pairs
from editscale.io import EditscaleError
from editscale.models.prompts import prompt_lengths
from memory_probe import module_output_and_logits

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 1, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 2, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": "Asia"},
    {"case_id": 3, "edit_index": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
]
TINY = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/hparams/memoir/tiny.yaml").read_text())


def _memoir(tiny_lm, arch, **hp):
    model, tok = tiny_lm(arch)
    groups = sample_context_templates(model, tok, TINY["context_template_length_params"], 0, rule="wise")
    return Memoir(model, tok, {**TINY, **hp}, {}, groups), model, tok, groups


def test_a_tophash_mask_keeps_the_permuted_top_k_features():
    feats = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 1.0])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    mask = tophash_mask(feats, perm, 3)
    assert mask.tolist() == [True, False, True, False, True, False]  # top |.| at 1, 3, 5 -> 4, 2, 0
    batch = tophash_mask(torch.stack([feats, -feats]), perm, 2)
    assert batch.sum(dim=1).tolist() == [2, 2] and torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_an_edit_writes_only_its_masks_columns_and_reads_them_back(tiny_lm, arch):
    memoir, model, tok, groups = _memoir(tiny_lm, arch)
    ws = WeightState(model, [])
    m = memoir.module
    prompt = fill(CASES[0]["prompt"], CASES[0]["subject"])
    before, before_logits = module_output_and_logits(model, tok, m, prompt + " " + CASES[0]["target_new"])
    # the first row's left padding, from the attention mask: the reference counts the positions
    # whose input equals the first one's, the same (position ids start at each row's first token)
    tokens, _ = memoir.rows(CASES[0])
    x0 = memoir.module_inputs(tokens)[0]
    n_pad = int((tokens["attention_mask"][0] == 0).sum())
    assert n_pad > 0 and int((x0 == x0[0]).all(dim=-1).sum()) == n_pad
    row = memoir.apply([CASES[0]], ws)[0]
    assert not ws.take_applied()  # no weight update
    assert row["v_loss"] < row["loss_before"] and row["memoir_masks"] == 1 and row["memoir_new_mask"] == 1
    t = memoir.memory.tables[m]
    mask = t["masks"][0].astype(bool)
    assert mask.sum() == TINY["top_k"]
    w = t["weights"][0]
    assert np.abs(w[:, ~mask]).max() == 0 and np.abs(w[:, mask]).max() > 0  # only the masked input columns
    # the edited prompt reads the memory (its own mask, overlap 1) and the target gets likelier
    with prompt_lengths([len(tok(prompt)["input_ids"])]):
        after, after_logits = module_output_and_logits(model, tok, m, prompt + " " + CASES[0]["target_new"], memoir.memory)
    assert not torch.equal(after, before)
    nll = {}
    for name, mem in (("before", None), ("after", memoir.memory)):
        handles = mem.attach(model) if mem is not None else []
        try:
            nll[name] = float(score_pairs(model, tok, [prompt], [CASES[0]["target_new"]]).nll[0])
        finally:
            for h in handles:
                h.remove()
    assert nll["after"] < nll["before"]
    # an unrelated text does not: the module's output and the logits bit for bit
    text = groups[1][0]
    plain, plain_logits = module_output_and_logits(model, tok, m, text)
    routed, routed_logits = module_output_and_logits(model, tok, m, text, memoir.memory)
    assert torch.equal(routed, plain) and torch.equal(routed_logits, plain_logits)


def test_distinct_edits_masks_overlap_like_random_subsets_and_the_memory_keeps_each(tiny_lm):
    memoir, model, tok, _ = _memoir(tiny_lm, "gpt2", n_iter=3)
    ws = WeightState(model, [])
    for c in CASES:
        memoir.apply([c], ws)
    masks = memoir.memory.tables[memoir.module]["masks"].astype(bool)
    assert masks.shape == (3, memoir.d_in) and (masks.sum(axis=1) == TINY["top_k"]).all()
    overlap = (masks[:, None, :] & masks[None, :, :]).sum(-1) / TINY["top_k"]
    off = overlap[~np.eye(3, dtype=bool)]
    assert (off < 1).all()  # three different masks
    # each edited prompt routes to its own mask
    memory = memoir.memory
    for i, c in enumerate(CASES):
        prompt = fill(c["prompt"], c["subject"])
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        handles = memory.attach(model)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for h in handles:
                h.remove()
        assert np.array_equal(memory._routed[memoir.module][0].numpy().astype(bool), masks[i])
    # the same edit again stores no second mask
    row = memoir.apply([CASES[0]], ws)[0]
    assert row["memoir_new_mask"] == 0 and row["memoir_masks"] == 3


def test_scoring_routes_on_the_prompt_and_decoding_keeps_the_route(tiny_lm):
    memoir, model, tok, _ = _memoir(tiny_lm, "llama", n_iter=5)
    memoir.apply([CASES[0]], WeightState(model, []))
    memory, m = memoir.memory, memoir.module
    prompt = fill(CASES[0]["prompt"], CASES[0]["subject"])
    ids = tok(prompt + " " + CASES[0]["target_new"], return_tensors="pt")["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    x = memoir.module_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    handles = memory.attach(model)
    try:
        with torch.no_grad():
            with prompt_lengths([n_prompt]):
                expected = tophash_mask(memory.features(m, x[0], torch.arange(n_prompt)), memory.tensor(m, "permutation", "cpu")[0], TINY["top_k"])
                routed = memory.route(m, x)
            whole = tophash_mask(memory.features(m, x[0], torch.arange(ids.shape[1])), memory.tensor(m, "permutation", "cpu")[0], TINY["top_k"])
            # with the prompt lengths the route is the prompt's mask's best match, not the whole text's
            stored = memory.tensor(m, "masks", "cpu", torch.float32)
            assert (expected.float() @ stored.T).item() / TINY["top_k"] >= TINY["irr_threshold"]
            assert torch.equal(routed[0].bool(), stored[0].bool())
            assert not torch.equal(expected, whole)
            # a one-position pass (a decoding step) keeps the route of the pass before
            again = memory.route(m, x[:, -1:])
            assert again is routed
    finally:
        for h in handles:
            h.remove()


def test_the_residual_memory_replays_exactly_from_its_ops(tiny_lm, tmp_path):
    memoir, model, tok, _ = _memoir(tiny_lm, "gpt_neox", n_iter=3)
    ws = WeightState(model, [])
    ops = []
    for step, c in enumerate(CASES, start=1):
        memoir.apply([c], ws)
        ops += [(step, op) for op in memoir.memory.take_ops()]
    write_factors(tmp_path / "f.h5", [], [], [{"edit_index": 1, "step": 1}], memoir.state_dict(), {}, ops)
    write_delta(tmp_path / "d.h5", {}, {}, memory=memoir.memory.state_dict())
    stored = read_memory(tmp_path / "d.h5")
    replayed = {key: np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) for key, arr in stored.items()}
    for _, op in read_memory_ops(tmp_path / "f.h5"):
        key = f"{op.module}/{op.field}"
        replayed[key] = set_rows(replayed[key], op.rows, op.values)
    assert set(replayed) == {f"{memoir.module}/{f}" for f in ("weights", "masks", "background", "permutation")}
    assert all(np.array_equal(replayed[k], stored[k]) for k in stored)
    rebuilt = ResidualMemory([memoir.module], memoir.memory_widths(model, memoir.hparams), state=stored)
    rebuilt.configure(model, memoir.hparams)
    text = fill(CASES[2]["prompt"], CASES[2]["subject"]) + " " + CASES[2]["target_new"]
    assert torch.equal(module_output_and_logits(model, tok, memoir.module, text, rebuilt)[1],
                       module_output_and_logits(model, tok, memoir.module, text, memoir.memory)[1])
    cost = MemoirCost(Memoir, TINY)
    assert cost.memory_bytes(3, 64, 128) == 4 * 64 * 128 + 3 * 128 + 12 * 128


def test_memoir_hparams_are_checked(tiny_lm):
    with pytest.raises(EditscaleError, match="prompt_feature_agg"):
        Memoir.validate_hparams({**TINY, "prompt_feature_agg": "max"})
    with pytest.raises(EditscaleError, match="irr_threshold"):
        Memoir.validate_hparams({**TINY, "irr_threshold": 1.5})
    with pytest.raises(EditscaleError, match="top_k 4096 exceeds the 128 input features"):
        _memoir(tiny_lm, "llama", top_k=4096)
