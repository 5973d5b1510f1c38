"""ROME / r-ROME and the shared building blocks (editscale.edit.encoding, templating, subject_keys, value_optimization, solvers) on tiny random models of
every supported architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from editscale.edit.methods import load_hparams
from editscale.edit import encoding, solvers, subject_keys, templating, value_optimization
from editscale.edit.methods import METHODS, EditMethod, describe_methods, get_method
from editscale.edit.rome import Rome, RRome
from editscale.edit.weights import WeightState
from editscale.io import EditscaleError
from editscale.models.registry import edited_weight, get_module, layer_name, mlp_out_name, to_math

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


# ---------------------------------------------------------------------------------------------
# common


def test_subject_last_index_hand_checked(rome_kit):
    model, tok, *_ = rome_kit.tiny("gpt2")
    toks = tok.convert_ids_to_tokens(tok("The capital of France is")["input_ids"])
    assert toks == ["The", "Ġcapital", "Ġof", "ĠFran", "ce", "Ġis"]
    assert encoding.subject_last_index(tok, "The capital of {} is", "France") == 4
    assert tok.convert_ids_to_tokens(tok("France is a")["input_ids"]) == ["F", "ran", "ce", "Ġis", "Ġa"]
    assert encoding.subject_last_index(tok, "{} is a", "France") == 2
    # subject at the very end of the prompt
    assert encoding.subject_last_index(tok, "I visited {}", "France") == len(tok("I visited France")["input_ids"]) - 1
    with pytest.raises(EditscaleError):
        encoding.subject_last_index(tok, "no placeholder", "France")


def test_subject_last_index_with_bos(rome_kit):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    _, tok, *_ = rome_kit.tiny("llama")
    raw = tok.backend_tokenizer
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    raw.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    btok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = btok("The capital of France is")["input_ids"]
    assert ids[0] == bos and len(ids) == 7
    assert encoding.subject_last_index(btok, "The capital of {} is", "France") == 5
    assert encoding.subject_last_index(btok, "{} is a", "France") == 3
    # the slow-tokenizer fallback (ROME's prefix rule) agrees
    btok_slow = type("Slow", (), {"is_fast": False, "__call__": lambda self, t, **k: btok(t, **k)})()
    assert encoding.subject_last_index(btok_slow, "The capital of {} is", "France") == 5


def _record_generation(monkeypatch) -> tuple[list[dict], list[int]]:
    """Spy on the sampler: (prompt ids, n and max_len of every sampling call; the sequence length
    at every generation step)."""
    calls: list = []
    original = templating._sample_continuations

    def spy(model, tok, prompt_ids, n, max_len, gen, top_k=5):
        out = original(model, tok, prompt_ids, n, max_len, gen, top_k)
        calls.append({"prompt": list(prompt_ids), "n": n, "max_len": max_len})
        return out

    steps: list = []
    original_logits = encoding.next_token_logits

    def logits_spy(model, input_ids, *a, **k):
        steps.append(input_ids.shape[1])
        return original_logits(model, input_ids, *a, **k)

    monkeypatch.setattr(templating, "_sample_continuations", spy)
    monkeypatch.setattr(templating, "next_token_logits", logits_spy)
    return calls, steps


def test_rome_rule_templates_follow_rome_reference(rome_kit, monkeypatch):
    """rome/rome_main.py: ["{}"] + samples from "<|endoftext|>" whose whole sequence (start token
    included) holds `length` tokens; one flat group (compute_u averages flat)."""
    model, tok, *_ = rome_kit.tiny("gpt2")
    calls, steps = _record_generation(monkeypatch)
    a = templating.sample_context_templates(model, tok, [[3, 2], [4, 6]], seed=3, rule="rome")
    assert len(a) == 1 and a[0][0] == "{}" and len(a[0]) == 1 + 2 + 6
    assert [c["prompt"] for c in calls] == [[tok.bos_token_id]] * 2 and tok.bos_token == "<|endoftext|>"
    assert [(c["n"], c["max_len"]) for c in calls] == [(2, 3), (6, 4)]
    # generation steps: the sequence grows from 1 token to `length` (length - 1 new tokens)
    assert steps == [1, 2] + [1, 2, 3]
    for t in a[0][1:]:
        assert t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1 and "<|endoftext|>" not in t
    assert a == templating.sample_context_templates(model, tok, [[3, 2], [4, 6]], seed=3, rule="rome")
    assert a != templating.sample_context_templates(model, tok, [[3, 2], [4, 6]], seed=4, rule="rome")


def test_memit_rule_templates_follow_memit_reference(rome_kit, monkeypatch):
    """memit/memit_main.py: [["{}"], [count // 5 samples after each opener, in order]], opener
    tokens counted in `length`; remainders go to the first openers (editscale extension)."""
    model, tok, *_ = rome_kit.tiny("gpt2")
    calls, steps = _record_generation(monkeypatch)
    g = templating.sample_context_templates(model, tok, [[4, 5], [3, 7]], seed=3, rule="memit")
    assert [len(x) for x in g] == [1, 5, 7] and g[0] == ["{}"]
    openers = ["The", "Therefore", "Because", "I", "You"]
    assert [tok.decode(c["prompt"]) for c in calls] == openers + openers
    assert [c["n"] for c in calls] == [1] * 5 + [2, 2, 1, 1, 1]
    assert all(c["max_len"] == 4 for c in calls[:5]) and all(c["max_len"] == 3 for c in calls[5:])
    # every sequence ends at `length` tokens in all: length - len(opener tokens) new ones
    expected = []
    for c in calls:
        expected += list(range(len(c["prompt"]), c["max_len"]))
    assert steps == expected
    for t, o in zip(g[1] + g[2], openers + ["The", "The", "Therefore", "Therefore", "Because", "I", "You"]):
        assert t.startswith(o) and t.endswith(". {}") and t.count("{") == 1 and t.count("}") == 1


def test_generated_braces_and_blank_lines_are_cleaned(rome_kit, monkeypatch):
    """"{" / "}" become spaces (MEMIT's rule; ROME's reference would crash on them), "\n\n" a space."""
    model, tok, *_ = rome_kit.tiny("gpt2")
    monkeypatch.setattr(tok, "batch_decode", lambda ids, **k: ["a{b}\n\nc"] * len(ids))
    for rule in ("rome", "memit"):
        flat = templating.flat_templates(templating.sample_context_templates(model, tok, [[3, 5]], seed=0, rule=rule))
        assert flat[1:] and all(t == "a b  c. {}" for t in flat[1:])
    with pytest.raises(EditscaleError, match="unknown context template rule"):
        templating.sample_context_templates(model, tok, [[3, 5]], seed=0, rule="other")


def test_rome_reads_the_loss_from_the_final_logits(rome_kit):
    """rome/compute_v.py ignores v_loss_layer (loss on the final logits): an optimize_value with
    loss_layer "final" gives the same v* for any v_loss_layer, and Rome rejects a v_loss_layer that
    is not the last layer instead of ignoring it."""
    model, tok, templates, module, C = rome_kit.tiny("gpt2")
    v3, _ = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, module, rome_kit.tiny_hparams(v_num_grad_steps=3, v_loss_layer=3), loss_layer="final")
    v1, _ = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, module, rome_kit.tiny_hparams(v_num_grad_steps=3, v_loss_layer=1), loss_layer="final")
    assert torch.equal(v1, v3)
    with pytest.raises(EditscaleError, match=r"v_loss_layer 2 is not the last layer \(3\).*set v_loss_layer: 3"):
        Rome(model, tok, rome_kit.tiny_hparams(v_loss_layer=2), {module: C}, templates)
    Rome(model, tok, rome_kit.tiny_hparams(v_loss_layer=3), {module: C}, templates)  # the last layer is fine


def test_module_io_batched_equals_single(rome_kit, arch):
    model, tok, templates, module, _ = rome_kit.tiny(arch)
    prompts = ["The capital of {} is", "{} is a", "Some long prefix text that pads the others. {} speaks"]
    subjects = ["France", "Japan", "Germany"]
    ins, outs = subject_keys.module_io_at_subject(model, tok, module, prompts, subjects)
    assert ins.shape[0] == outs.shape[0] == 3 and outs.shape[1] == 64 and ins.shape[1] > 64
    for i, (p, s) in enumerate(zip(prompts, subjects)):
        i1, o1 = subject_keys.module_io_at_subject(model, tok, module, [p], [s])
        assert torch.allclose(ins[i], i1[0], atol=1e-5) and torch.allclose(outs[i], o1[0], atol=1e-5)
    keys = subject_keys.compute_keys(model, tok, module, [rome_kit.CASE, rome_kit.CASE2], templates)
    per = subject_keys.module_io_at_subject(model, tok, module, [t.format(rome_kit.CASE2["prompt"]) for t in templates], [rome_kit.CASE2["subject"]] * len(templates))[0]
    assert torch.allclose(keys[1], per.mean(0), atol=1e-6)


def test_next_token_logits_match_the_model(rome_kit, arch):
    """final norm + LM head applied to the last layer's output = the model's own logits."""
    model, tok, *_ = rome_kit.tiny(arch)
    ids, mask = encoding.pad_right([tok("The capital of France is")["input_ids"], tok("Hello")["input_ids"]], tok.eos_token_id)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        mine = encoding.next_token_logits(model, ids, mask)
    last = mask.sum(1) - 1
    assert torch.allclose(mine, full[torch.arange(2), last], atol=1e-5)


def test_optimize_value_lowers_nll_and_is_deterministic(rome_kit, arch):
    model, tok, templates, module, _ = rome_kit.tiny(arch)
    for p in model.parameters():  # even with trainable params, none may receive a gradient
        p.requires_grad_(True)
    try:
        v1, log1 = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, module, rome_kit.tiny_hparams())
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    v2, log2 = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, module, rome_kit.tiny_hparams())
    assert log1["v_loss"] < log1["v_loss_init"]
    assert 0 < log1["steps"] <= 9
    assert torch.equal(v1, v2) and log1 == log2
    _, out = subject_keys.module_io_at_subject(model, tok, module, [rome_kit.CASE["prompt"]], [rome_kit.CASE["subject"]])
    assert log1["target_init_norm"] == pytest.approx(float(out[0].norm()), rel=1e-5)
    assert float((v1 - out[0]).norm()) <= 4 * log1["target_init_norm"] * (1 + 1e-5)


@pytest.mark.parametrize("inject", ["mlp_out", "block"])
def test_optimize_value_prefix_reuse_is_bit_identical(rome_kit, arch, inject, monkeypatch):
    """Blocks below the injection layer run once per optimize_value (not once per step), and the
    result is bit-identical to recomputing them every step."""
    model, tok, templates, module, _ = rome_kit.tiny(arch)
    target = module if inject == "mlp_out" else layer_name(model, rome_kit.LAYER)
    calls = []
    below = get_module(model, mlp_out_name(model, 0))  # runs only when block 0 really runs
    handle = below.register_forward_hook(lambda *a: calls.append(1))
    try:
        hp = rome_kit.tiny_hparams(v_num_grad_steps=6)
        monkeypatch.setattr(value_optimization, "REUSE_PREFIX", False)
        v_off, log_off = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, target, hp)
        runs_off = len(calls)
        calls.clear()
        monkeypatch.setattr(value_optimization, "REUSE_PREFIX", True)
        v_on, log_on = value_optimization.optimize_value(model, tok, rome_kit.CASE, templates, target, hp)
        runs_on = len(calls)
        # the model is left as it was: block 0 computes again afterwards
        subject_keys.module_io_at_subject(model, tok, module, [rome_kit.CASE["prompt"]], [rome_kit.CASE["subject"]])
        runs_after = len(calls) - runs_on
    finally:
        handle.remove()
    assert torch.equal(v_on, v_off) and log_on == log_off
    assert runs_off == log_off["steps"] + 1 and runs_off > 1
    assert runs_on == 1 and runs_after == 1


@pytest.mark.parametrize("mode", ["prompt", "templates"])
def test_rome_edit_defining_property(rome_kit, arch, mode):
    model, tok, templates, module, C = rome_kit.tiny(arch)
    ws = WeightState(model, [module])
    try:
        rome = Rome(model, tok, rome_kit.tiny_hparams(key_averaging=mode), {module: C}, templates)
        rows = rome.apply([rome_kit.CASE], ws)
        assert rows[0]["case_id"] == 7 and rows[0]["v_loss"] < rows[0]["v_loss_init"]
        updates = ws.take_applied()
        assert len(updates) == 1 and updates[0].module == module
        dW = ws.delta[module].double()  # the fp32 change of the weight
        assert torch.allclose(dW.float(), rome_kit.dense(updates)[module])
        assert torch.linalg.matrix_rank(dW, rtol=1e-5) == 1
        v_star = rome.last["v_star"]
        if mode == "prompt":
            # the live model now maps the plain prompt's key to v*
            k, out = subject_keys.module_io_at_subject(model, tok, module, [rome_kit.CASE["prompt"]], [rome_kit.CASE["subject"]])
            assert torch.allclose(k[0].double(), rome.last["key"])  # the key at the edited layer is unchanged
            assert rome_kit.rel(out[0], v_star) < 1e-4
        else:
            out = solvers.module_forward(model, ws, module, rome.last["k_star"])
            assert rome_kit.rel(out, v_star) < 1e-4
            # and the live parameter agrees with the WeightState
            k_star = rome.last["k_star"]
            W = to_math(model, edited_weight(model, module)).float()
            live = torch.nn.functional.linear(k_star, W, solvers.module_bias(model, module))
            assert rome_kit.rel(live, v_star) < 1e-4
    finally:
        ws.delta[module].zero_()
        ws._write(module)


def test_rome_uses_inverse_second_moment(rome_kit, arch):
    model, tok, templates, module, _ = rome_kit.tiny(arch)
    d = subject_keys.module_io_at_subject(model, tok, module, ["{}"], ["x"])[0].shape[1]
    g = torch.Generator().manual_seed(1)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = A @ A.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    k_star = subject_keys.compute_keys(model, tok, module, [rome_kit.CASE], templates)[0]
    expected = torch.linalg.solve(C, k_star.double())
    expected = expected / expected.norm()
    hp = rome_kit.tiny_hparams(v_num_grad_steps=1)
    ws = WeightState(model, [module])
    try:
        Rome(model, tok, hp, {module: C}, templates).apply([rome_kit.CASE], ws)
        u_c = ws.take_applied()[0].v[:, 0].double()
        ws.delta[module].zero_()
        ws._write(module)
        Rome(model, tok, {**hp, "mom2_adjustment": False}, {}, templates).apply([rome_kit.CASE], ws)
        u_i = ws.take_applied()[0].v[:, 0].double()
    finally:
        ws.delta[module].zero_()
        ws._write(module)
    assert torch.allclose(u_c, expected, atol=1e-5)
    assert torch.allclose(u_i, k_star.double() / k_star.double().norm(), atol=1e-5)
    assert float(torch.dot(u_c, u_i).abs()) < 0.99  # C^-1 really changes the direction


def test_rome_cov_factor_cached_once(rome_kit, monkeypatch):
    model, tok, templates, module, C = rome_kit.tiny("gpt2")
    calls = []
    orig = solvers.CovSolver.__init__

    def counting(self, *a, **k):
        calls.append(1)
        orig(self, *a, **k)

    monkeypatch.setattr(solvers.CovSolver, "__init__", counting)
    ws = WeightState(model, [module])
    try:
        rome = Rome(model, tok, rome_kit.tiny_hparams(v_num_grad_steps=2), {module: C}, templates)
        rome.apply([rome_kit.CASE, rome_kit.CASE2], ws)
        rome.apply([rome_kit.CASE], ws)
    finally:
        ws.delta[module].zero_()
        ws._write(module)
    assert len(calls) == 1


def test_rome_batch_is_sequential(rome_kit):
    model, tok, templates, module, C = rome_kit.tiny("llama")
    hp = rome_kit.tiny_hparams(v_num_grad_steps=3)
    ws = WeightState(model, [module])
    try:
        rows = Rome(model, tok, hp, {module: C}, templates).apply([rome_kit.CASE, rome_kit.CASE2], ws)
        both = ws.take_applied()
        ws.delta[module].zero_()
        ws._write(module)
        rome = Rome(model, tok, hp, {module: C}, templates)
        rome.apply([rome_kit.CASE], ws)
        rome.apply([rome_kit.CASE2], ws)
        one_by_one = ws.take_applied()
        # after both edits the second case's key maps to its v*
        _, out = subject_keys.module_io_at_subject(model, tok, module, [rome_kit.CASE2["prompt"]], [rome_kit.CASE2["subject"]])
        assert rome_kit.rel(out[0], rome.last["v_star"]) < 1e-4
    finally:
        ws.delta[module].zero_()
        ws._write(module)
    assert [r["case_id"] for r in rows] == [7, 8]
    assert len(both) == 2
    for a, b in zip(both, one_by_one):
        assert torch.allclose(a.u, b.u, atol=1e-6) and torch.allclose(a.v, b.v, atol=1e-6)


def test_rrome_forces_templates(rome_kit):
    model, tok, templates, module, C = rome_kit.tiny("gpt2")
    r = RRome(model, tok, rome_kit.tiny_hparams(key_averaging="prompt"), {module: C}, templates)
    assert r.hparams["key_averaging"] == "templates" and r.name == "r-rome"


def test_rome_missing_stats_is_an_error(rome_kit):
    model, tok, templates, module, _ = rome_kit.tiny("gpt2")
    ws = WeightState(model, [module])
    with pytest.raises(EditscaleError, match="second moment"):
        Rome(model, tok, rome_kit.tiny_hparams(), {}, templates).apply([rome_kit.CASE], ws)


# ---------------------------------------------------------------------------------------------
# hparams and registry


def test_hparams_missing_key_names_key_and_file(rome_kit, tmp_path):
    hp = rome_kit.tiny_hparams()
    del hp["v_lr"]
    path = tmp_path / "rome" / "broken.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(hp))
    with pytest.raises(EditscaleError) as exc:
        load_hparams(path)
    assert "v_lr" in str(exc.value) and str(path) in str(exc.value)
    other = tmp_path / "anywhere.yaml"
    other.write_text(yaml.safe_dump(hp))
    with pytest.raises(EditscaleError, match="v_lr"):
        load_hparams(other, method="rome")
    with pytest.raises(EditscaleError, match="layers"):
        other.write_text(yaml.safe_dump({**rome_kit.tiny_hparams(), "layers": "17"}))
        load_hparams(other, method="rome")


@pytest.mark.parametrize("method", ["rome", "emmet"])
@pytest.mark.parametrize("model_name", ["gpt2-xl", "gpt-j-6B", "smollm2-135m", "tiny"])
def test_shipped_hparams_files_load(method, model_name):
    hp = load_hparams(REPO / "config" / "hparams" / method / f"{model_name}.yaml")
    assert len(hp["layers"]) == 1 and isinstance(hp["v_lr"], float)
    published = {"gpt2-xl": ([17], 47), "gpt-j-6B": ([5], 27), "tiny": ([1], 3)}
    if model_name in published:
        assert (hp["layers"], hp["v_loss_layer"]) == published[model_name]
    if method == "rome" and model_name == "gpt2-xl":
        assert hp["context_template_length_params"] == [[5, 10], [10, 10]] and hp["clamp_norm_factor"] == 4


def test_method_registry(rome_kit):
    assert get_method("rome") is Rome and get_method("r-rome") is RRome
    assert issubclass(get_method("emmet"), EditMethod)
    assert {"rome", "r-rome", "memit", "ft-c", "emmet", "alphaedit"} <= set(METHODS)
    assert [n for n, _ in describe_methods()] == list(METHODS)
    with pytest.raises(EditscaleError) as exc:
        get_method("romee")
    assert "rome" in str(exc.value) and "memit" in str(exc.value)
    assert Rome.modules(rome_kit.tiny("gpt2")[0], {"layers": [2]}) == ["transformer.h.2.mlp.c_proj"]


def test_prompts_with_braces_are_filled_not_formatted(rome_kit):
    """One subject fill (editscale.data.schema.fill) everywhere: str.format raised on a prompt
    holding other braces ("{Reds}" is a KeyError for .format), and keys / values / fine-tuning
    prompts were filled differently from the evaluation's."""
    from editscale.edit.ftc import prompt_text

    model, tok, templates, module, _ = rome_kit.tiny("gpt2")
    prompt, subject = "{} plays for FC {Reds} in", "Lionel Messi"
    ids, last = encoding.encode_with_subject(tok, [prompt], [subject])
    assert ids[0] == tok("Lionel Messi plays for FC {Reds} in")["input_ids"]
    assert tok.decode(ids[0][: last[0] + 1]).endswith("Messi")
    case = {**rome_kit.CASE, "prompt": prompt, "subject": subject}
    keys = subject_keys.compute_keys(model, tok, module, [case], templates)
    assert keys.shape[0] == 1 and torch.isfinite(keys).all()
    assert prompt_text(case) == "Lionel Messi plays for FC {Reds} in"
