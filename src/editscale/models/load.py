"""Load a prepared model directory (`data/models/{model}/`) and pick the device."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..io import EditscaleError
from .registry import edited_weight

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "manifest.json"
    if not path.exists():
        raise EditscaleError(f"{path} not found: prepare the model first (rule `model`, `editscale model ...`)")
    return json.loads(path.read_text())


def model_sha(model_dir: str | Path) -> str:
    """Identity of a prepared model: the sha256 over its weight files (from the manifest)."""
    return read_manifest(model_dir)["model_sha256"]


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
    """Return (model, tokenizer) in eval mode, gradients off for every parameter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read_manifest(model_dir)
    if dtype not in DTYPES:
        raise EditscaleError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    log.info("loading model %s (%s)", model_dir, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype])
    model.to(pick_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


def read_weights(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Named tensors of a prepared model's safetensors (single file or sharded with an index),
    read one by one: what a job needs of the base weights without loading a second model."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        single = model_dir / "model.safetensors"
        if not single.exists():
            raise EditscaleError(f"{model_dir} holds neither model.safetensors nor model.safetensors.index.json")
        where = {n: single.name for n in names}
    missing = [n for n in names if n not in where]
    if missing:
        raise EditscaleError(f"{model_dir}: no tensor {missing} in its safetensors")
    out = {}
    for file in sorted({where[n] for n in names}):
        with safe_open(str(model_dir / file), framework="pt") as f:
            have = set(f.keys())
            for n in names:
                if where[n] == file:
                    if n not in have:
                        raise EditscaleError(f"{model_dir / file}: no tensor {n!r}")
                    out[n] = f.get_tensor(n)
    return out


class UneditedView:
    """The unedited model inside an edited one, without a second copy of its weights: entering sets
    the edited matrices to their base weights (read from the model directory and cast to the
    model's dtype, exactly as load_model casts them), leaving puts back what they were. Only the
    edited matrices are copied. `with UneditedView(model, tok, model_dir, modules) as (m, tok):`."""

    def __init__(self, model, tok, model_dir: str | Path, modules: list[str]):
        self.model, self.tok = model, tok
        self.params = {m: edited_weight(model, m) for m in modules}
        names = {f"{m}.weight": m for m in modules}
        self.base = {names[n]: w for n, w in read_weights(model_dir, list(names)).items()}
        for m, w in self.base.items():
            if w.shape != self.params[m].shape:
                raise EditscaleError(f"{model_dir}: base weight of {m} has shape {tuple(w.shape)}, the model's {tuple(self.params[m].shape)}")
        self._saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        with torch.no_grad():
            for m, p in self.params.items():
                self._saved[m] = p.detach().clone()
                p.copy_(self.base[m].to(device=p.device, dtype=p.dtype))
        return self.model, self.tok

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, p in self.params.items():
                p.copy_(self._saved.pop(m))
