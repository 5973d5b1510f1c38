"""The model families people edit in 2026 (issue 27 item 4): each registry family as a tiny random
model of its own transformers class edits with ROME (exact value at the MLP output), MEMIT (layers
spread) and UltraEdit (the MLP input matrices), and is evaluated by the edit scores."""

from __future__ import annotations

import pytest
import torch

from benchmarks.device_check import edit_cases, method_hparams
from editscale.edit.chain import templates_record
from editscale.edit.solvers import module_forward
from editscale.edit.value_optimization import logit_lens
from editscale.edit.methods import get_method
from editscale.edit.weights import WeightState
from editscale.evaluate.edit_scores import case_metrics
from editscale.models.fetch import TINY_ARCHS, TINY_FAMILIES
from editscale.models.nethook import Trace
from editscale.models.registry import arch_spec, edited_weight, layer_name, n_layers, to_math

FAMILIES = [a for a in TINY_FAMILIES if a not in TINY_ARCHS]


@pytest.mark.parametrize("arch", FAMILIES)
def test_logit_lens_is_the_models_own_output_function(tiny_lm, arch):
    """The value optimizations read logits from a layer's output through the final norm, the LM
    head and (Gemma-2) the final logit soft-capping: at the last layer that is the model's output."""
    model, tok = tiny_lm(arch)
    ids = torch.tensor([tok.encode("Paris is the capital of France.")])
    last = layer_name(model, n_layers(model) - 1)
    with torch.no_grad(), Trace(model, [last]) as tr:
        out = model(input_ids=ids).logits
    h = tr.outputs[last]
    assert torch.allclose(logit_lens(model)(h), out, atol=1e-5, rtol=1e-5)
    if getattr(model.config, "final_logit_softcapping", None):  # Gemma-2: the cap is part of it
        assert float(out.abs().max()) <= model.config.final_logit_softcapping


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("method", ["rome", "memit", "ultraedit"])
def test_family_edits_and_evaluates(method_kit, tiny_lm, arch, method):
    if method == "ultraedit":  # no statistics, no value optimization
        model, tok = tiny_lm(arch)
        hp = method_hparams(method, "tiny")
        if arch_spec(model).mlp_up:
            hp["mlp_up_layers"] = [2]  # both input matrices of a gated MLP (Phi-3's fused gate_up_proj is one)
        cls, stats = get_method(method, hp), {}
        mods = cls.modules(model, hp)
    else:
        cls, model, tok, hp, mods, stats = method_kit(method, arch)
        hp["v_num_grad_steps"] = 10  # the tiny hparams' count (the kit's 4 barely moves v*)
    case = edit_cases(1)[0]
    templates = templates_record(model, tok, method, hp, seed=0)["groups"]
    before = case_metrics(model, tok, [case], parts=("efficacy",))[0]
    weights = WeightState(model, mods)
    w0 = {m: to_math(model, edited_weight(model, m)).float().clone() for m in mods}
    editor = cls(model, tok, hp, stats, templates)
    (row,) = editor.apply([case], weights)
    for m in mods:
        dw = to_math(model, edited_weight(model, m)).float() - w0[m]
        assert torch.isfinite(dw).all() and float(dw.norm()) > 0, m
    if method == "rome":  # rank one, and the edited matrix maps the key to v* (ROME's defining equation)
        (m,) = mods
        assert torch.linalg.matrix_rank((to_math(model, edited_weight(model, m)).double() - w0[m].double()), rtol=1e-6) == 1
        out = module_forward(model, weights, m, editor.last["key"])
        assert torch.allclose(out, editor.last["v_star"].double(), rtol=1e-4, atol=1e-4)
    if method != "ultraedit":  # the value optimization descends through the family's own forward
        assert row["v_loss"] < row["v_loss_init"], row
    if method == "memit":  # the update moves the last edited layer's output towards z
        bound = 0.75 if arch_spec(model).mlp_out_norm else 0.5  # Gemma: a linearization through the post-MLP norm
        assert row["z_error_after"] < bound * row["z_error_before"], row
    after = case_metrics(model, tok, [case], parts=("efficacy",))[0]
    assert all(torch.isfinite(torch.tensor(float(v))) for v in after.values())
    assert after["nll_new"] != before["nll_new"]


LLAMA3 = "hf:meta-llama/Meta-Llama-3-8B"
LLAMA3_STUDY = "config/paper/llama3-8b/methods-counterfact.yaml"


def test_llama3_hparams_name_llama3_modules(repo_root):
    """Every method's published Llama-3-8B file edits modules of the real shapes (meta-device model
    from the published config: no weights)."""
    from editscale.edit.methods import load_hparams
    from editscale.models.registry import known_config, meta_model, module_shapes

    cfg = known_config(LLAMA3)
    files = sorted(repo_root.glob("config/hparams/*/llama3-8b.yaml"))
    assert {f.parent.name for f in files} == {"rome", "memit", "alphaedit", "encore", "nas", "rect", "prune", "ultraedit", "sphere", "grace", "wise", "lyaplock", "memoir"}
    for f in files:
        hp = load_hparams(f)
        cls = get_method(f.parent.name, hp)
        mods = cls.modules(meta_model(cfg), hp) or cls.memory_modules(meta_model(cfg), hp)  # GRACE, WISE, MEMOIR: their memory's module
        shapes = set(module_shapes(cfg, mods).values())
        expected = {(4096, 14336)} if f.parent.name != "ultraedit" else {(14336, 4096)}  # UltraEdit: gate_proj / up_proj
        assert shapes == expected, (f, shapes)


@pytest.mark.workflow
def test_llama3_study_plans_offline(repo_root, tmp_path):
    import yaml

    from benchmarks.snakemake_runs import copy_workflow, planned_jobs, put_downstream_files, snakemake

    cfg = yaml.safe_load((repo_root / LLAMA3_STUDY).read_text())
    (model,) = cfg["models"].values()
    assert model["source"] == LLAMA3 and model["dtype"] == "bfloat16"
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    put_downstream_files(workdir)
    res = snakemake(workdir, "-n", config=LLAMA3_STUDY)
    jobs = planned_jobs(res)
    assert jobs["edit_segment"] == sum(r["n_edits"] // r["segment"] for r in cfg["runs"]) == 180
    assert jobs["stats"] == 5 and jobs["nullspace"] == 5  # down_proj of layers 4-8; AlphaEdit, NAS and SPHERE share P
    assert jobs["model"] == 1 and jobs["audit"] == 1
