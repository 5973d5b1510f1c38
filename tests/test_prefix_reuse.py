"""The blocks below the edited layer computed once per optimization (editscale.edit.value_optimization
`reused_prefix`, a `PrefixCache`) in the lifelong editors' SGD loops (GRACE, WISE, MEMOIR): each
step passes one batch through the model while what they train sits at one layer's MLP output, so
the layers below run once and later passes start at that layer. The edits, losses and memories
must be bit-identical to full passes, on every architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from editscale.edit.grace import Grace
from editscale.edit.memoir import Memoir
from editscale.edit.templating import sample_context_templates
from editscale.edit.weights import WeightState
from editscale.edit.wise import Wise
from editscale.edit import value_optimization
from editscale.edit.value_optimization import reused_prefix
from editscale.models.registry import get_module, layer_name

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
CASES = [
    {"case_id": 1, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 2, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": "Asia"},
]
HPARAMS = Path(__file__).resolve().parents[1] / "config/hparams"


def _method(name, model, tok):
    if name == "grace":
        return Grace(model, tok, {"layer": 2, "n_iter": 15}, {}, [["{}"]])
    hp = yaml.safe_load((HPARAMS / name / "tiny.yaml").read_text())
    groups = sample_context_templates(model, tok, hp["context_template_length_params"], 0, rule="wise")
    return {"wise": Wise, "memoir": Memoir}[name](model, tok, {**hp, "n_iter": 8}, {}, groups)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["grace", "wise", "memoir"])
def test_edits_with_the_frozen_prefix_are_bit_identical_to_full_passes(tiny_lm, arch, name, monkeypatch):
    made = {}
    for enabled in (False, True):
        monkeypatch.setattr(value_optimization, "REUSE_PREFIX", enabled)
        model, tok = tiny_lm(arch)
        method = _method(name, model, tok)
        logs = [method.apply([case], WeightState(model, []))[0] for case in CASES]
        tables = {m: {f: a.copy() for f, a in t.items()} for m, t in method.memory.tables.items()}
        made[enabled] = (logs, tables)
    (logs_full, full), (logs_skip, skip) = made[False], made[True]
    assert [(g["v_loss"], g["loss_before"], g["steps"]) for g in logs_skip] == [(g["v_loss"], g["loss_before"], g["steps"]) for g in logs_full]
    assert logs_full[-1]["steps"] > 1  # several passes of one batch: the prefix was skipped at least once
    assert full.keys() == skip.keys()
    for m in full:
        for field, a in full[m].items():
            assert a.dtype == skip[m][field].dtype and np.array_equal(a, skip[m][field]), (m, field)


def test_the_layers_below_run_once(tiny_lm, monkeypatch):
    model, tok = tiny_lm("llama")
    ids = tok(["Paris is the capital of", "Berlin is in"], return_tensors="pt", padding=True)
    runs = []
    first = get_module(model, layer_name(model, 0))
    real = type(first).forward

    def counted(self, *args, **kwargs):
        if self is first:
            runs.append(1)
        return real(self, *args, **kwargs)

    with torch.no_grad():
        full = model(**ids).logits
        monkeypatch.setattr(type(first), "forward", counted)
        with reused_prefix(model, 2):
            passes = [model(**ids).logits for _ in range(3)]
        after = model(**ids).logits
    assert len(runs) == 2  # layer 0 ran in the first of the three passes, and in the one after the block
    assert all(torch.equal(p, full) for p in passes) and torch.equal(after, full)
    assert "forward" not in first.__dict__  # the layers' own forward again after the block
