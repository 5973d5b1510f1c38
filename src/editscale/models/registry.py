"""Architecture registry: where each model family keeps the modules that editing touches.

Templates take the layer index with `str.format`. `weight_in_out` is True where the edited
matrix is stored as (in_features, out_features) (GPT-2's Conv1D); editscale always does its
math on the (out, in) orientation and transposes at the boundary.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import EditscaleError
from ..registry import Registry

if TYPE_CHECKING:  # annotations only: the planner and every command's parser import this module
    import torch


@dataclass(frozen=True)
class ArchSpec:
    mlp_out: str  # MLP output projection (the edited matrix), e.g. transformer.h.{}.mlp.c_proj
    layer: str  # transformer block whose output is the residual stream after layer i
    final_norm: str
    lm_head: str
    embed: str
    weight_in_out: bool = False
    n_layers_attr: str = "num_hidden_layers"
    mlp_in: str = ""  # the (first) MLP input projection (UltraEdit edits these): c_fc, fc_in, gate_proj
    mlp_up: str = ""  # a gated MLP's second input projection (Llama family's up_proj); "" when none
    # a norm applied to the MLP output before it joins the residual stream (Gemma-2/3's
    # post_feedforward_layernorm); "" when the MLP output is added as it is. The MEMIT family
    # spreads a residual change over the edited layers' MLP outputs as if added as it is: with
    # such a norm that spread is a linearization (ROME's value, read at the MLP output, is exact).
    mlp_out_norm: str = ""


_LLAMA_LIKE = ArchSpec(
    mlp_out="model.layers.{}.mlp.down_proj",
    layer="model.layers.{}",
    final_norm="model.norm",
    lm_head="lm_head",
    embed="model.embed_tokens",
    mlp_in="model.layers.{}.mlp.gate_proj",
    mlp_up="model.layers.{}.mlp.up_proj",
)

# Gemma-2 / Gemma-3 (text): the Llama names, the MLP output normalized before the residual add
_GEMMA_LIKE = dataclasses.replace(_LLAMA_LIKE, mlp_out_norm="model.layers.{}.post_feedforward_layernorm")

# model_type -> ArchSpec (editscale.registry.Registry); a plugin adds one with
# register_architecture(model_type, ArchSpec(...)) or an `editscale.architectures` entry point
ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", entry_points="editscale.architectures",
                                             from_entry_point=lambda name, obj: obj if isinstance(obj, ArchSpec) else None)


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach editscale a model family: the module names of its MLP, layers, norms and embeddings."""
    ARCHITECTURES.add(model_type, spec)


for _model_type, _spec in {
    "gpt2": ArchSpec(
        mlp_out="transformer.h.{}.mlp.c_proj",
        layer="transformer.h.{}",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        weight_in_out=True,
        n_layers_attr="n_layer",
        mlp_in="transformer.h.{}.mlp.c_fc",
    ),
    "gptj": ArchSpec(
        mlp_out="transformer.h.{}.mlp.fc_out",
        layer="transformer.h.{}",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        n_layers_attr="n_layer",
        mlp_in="transformer.h.{}.mlp.fc_in",
    ),
    "gpt_neox": ArchSpec(
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        layer="gpt_neox.layers.{}",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # transformers >= 5 (older releases: embed_out)
        embed="gpt_neox.embed_in",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h",
    ),
    "llama": _LLAMA_LIKE,  # Llama 2 / 3 / 3.1 / 3.2, SmolLM2
    "qwen2": _LLAMA_LIKE,  # Qwen2, Qwen2.5
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_LIKE,
    "gemma3_text": _GEMMA_LIKE,  # Gemma-3 1B and the text model of the larger ones (Gemma3ForCausalLM)
    # Phi-3 and Phi-4: one fused gate_up_proj (the first MLP input matrix, 2 x intermediate rows)
    "phi3": dataclasses.replace(_LLAMA_LIKE, mlp_in="model.layers.{}.mlp.gate_up_proj", mlp_up=""),
}.items():
    register_architecture(_model_type, _spec)


def arch_spec(model_or_type) -> ArchSpec:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ARCHITECTURES:
        near = difflib.get_close_matches(model_type, ARCHITECTURES, n=3, cutoff=0.3)
        raise EditscaleError(
            f"unknown architecture (model_type) {model_type!r}: editscale knows {sorted(ARCHITECTURES)}"
            + (f"; nearest: {near}" if near else "")
            + ". Add one with editscale.models.registry.register_architecture(model_type, ArchSpec(...)) in a plugin module."
        )
    return ARCHITECTURES[model_type]


def n_layers(model) -> int:
    return getattr(model.config, arch_spec(model).n_layers_attr)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Module by dotted name; a missing name raises one error listing the nearest existing names."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    near = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    raise EditscaleError(
        f"module {name!r} does not exist in {type(model).__name__}; nearest existing module names: {near}"
    )


def mlp_out_name(model, layer: int) -> str:
    return arch_spec(model).mlp_out.format(layer)


def layer_name(model, layer: int) -> str:
    return arch_spec(model).layer.format(layer)


def edited_weight(model: torch.nn.Module, module_name: str) -> torch.nn.Parameter:
    """The parameter of an edited module (stored orientation; see `to_math` / `from_math`)."""
    module = get_module(model, module_name)
    if not hasattr(module, "weight") or module.weight.dim() != 2:
        raise EditscaleError(f"module {module_name!r} has no 2-D weight to edit")
    return module.weight


def to_math(model, weight: torch.Tensor) -> torch.Tensor:
    """Stored weight -> (out, in) orientation."""
    return weight.T if arch_spec(model).weight_in_out else weight


def from_math(model, matrix: torch.Tensor) -> torch.Tensor:
    """(out, in) matrix -> stored orientation."""
    return matrix.T if arch_spec(model).weight_in_out else matrix


# ---------------------------------------------------------------------------------------------
# Shapes from configs, before any weight is read or downloaded (doctor's estimates, plan-time
# layer checks, stats conversion)

# Published configs (config.json of each repo) so that shapes are known before any download.
KNOWN_CONFIGS: dict[str, tuple[str, dict]] = {
    "hf:gpt2-xl": ("gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "hf:openai-community/gpt2-xl": ("gpt2", {"vocab_size": 50257, "n_positions": 1024, "n_embd": 1600, "n_layer": 48, "n_head": 25}),
    "hf:EleutherAI/gpt-j-6B": ("gptj", {"vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
                                        "rotary_dim": 64}),
    # the 2024-26 editing papers' models (config.json of each repository; shapes only: doctor, plan-time checks)
    **{f"hf:meta-llama/{name}": ("llama", {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": max_pos,
                                            "rope_theta": 500000.0, "tie_word_embeddings": False})
       for name, max_pos in (("Meta-Llama-3-8B", 8192), ("Meta-Llama-3-8B-Instruct", 8192), ("Llama-3.1-8B", 131072),
                             ("Llama-3.1-8B-Instruct", 131072))},
    "hf:Qwen/Qwen2.5-7B-Instruct": ("qwen2", {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                              "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                                              "tie_word_embeddings": False}),
    "hf:Qwen/Qwen3-8B": ("qwen3", {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
                                   "tie_word_embeddings": False}),
    "hf:mistralai/Mistral-7B-Instruct-v0.3": ("mistral", {"vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                                                          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                                          "max_position_embeddings": 32768, "tie_word_embeddings": False}),
    "hf:google/gemma-2-9b-it": ("gemma2", {"vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                                           "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "max_position_embeddings": 8192}),
    "hf:microsoft/phi-4": ("phi3", {"vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
                                    "num_attention_heads": 40, "num_key_value_heads": 10, "max_position_embeddings": 16384,
                                    "tie_word_embeddings": False}),
    "embedded:smollm2-135m-instruct": ("llama", {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                                                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                                                 "max_position_embeddings": 8192, "tie_word_embeddings": True}),
}


def known_config(source: str):
    """The transformers config of a model in KNOWN_CONFIGS."""
    from transformers import AutoConfig

    model_type, kwargs = KNOWN_CONFIGS[source]
    return AutoConfig.for_model(model_type, **kwargs)


def model_config(config: dict, name: str, root: str | Path = ".") -> tuple[Any | None, str]:
    """(transformers config or None, where it came from) for a configured model; reads no weights."""
    from transformers import AutoConfig

    spec = config["models"][name]
    source = spec["source"]
    prepared = Path(root) / "data" / "models" / name / "config.json"
    if prepared.exists():
        return AutoConfig.from_pretrained(str(prepared.parent)), str(prepared)
    kind, _, ref = source.partition(":")
    if kind == "local" and (Path(ref).expanduser() / "config.json").exists():
        return AutoConfig.from_pretrained(str(Path(ref).expanduser())), ref
    if kind == "tiny":
        from .fetch import tiny_config

        return tiny_config(ref), "tiny model"
    if kind == "hf":
        try:
            return AutoConfig.from_pretrained(ref, revision=spec.get("revision"), local_files_only=True), "Hugging Face cache"
        except Exception:  # not cached: fall through to the published table
            pass
    if source in KNOWN_CONFIGS:
        return known_config(source), "published config (editscale.models.registry.KNOWN_CONFIGS)"
    return None, "unknown until the model is prepared (rule `model`)"


_META: dict[str, torch.nn.Module] = {}


def meta_model(cfg):
    """The model of `cfg` on the meta device (shapes only, no memory); cached per config."""
    import torch  # here: the planner and every command's parser import this module, most never a model
    from transformers import AutoModelForCausalLM

    key = cfg.to_json_string(use_diff=False)
    if key not in _META:
        with torch.device("meta"):
            _META[key] = AutoModelForCausalLM.from_config(cfg)
    return _META[key]


def n_params(cfg) -> int:
    return sum(p.numel() for p in meta_model(cfg).parameters())


def module_shapes(cfg, modules: list[str]) -> dict[str, tuple[int, int]]:
    """{module: (d_out, d_in)} of edited matrices, in editscale's (out, in) orientation; a missing
    module name is an EditscaleError listing the nearest names."""
    model = meta_model(cfg)
    return {m: tuple(to_math(model, edited_weight(model, m)).shape) for m in modules}


def config_json_layers(path: str | Path) -> int:
    """The layer count a model's config.json states (its family's layer-count attribute)."""
    import json

    cfg = json.loads(Path(path).read_text())
    return int(cfg[arch_spec(cfg["model_type"]).n_layers_attr])
