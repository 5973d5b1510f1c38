"""Load a prepared model directory (`data/models/{model}/`) and pick the device."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..io import EditscaleError

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
