"""A helper of the lifelong editors' tests (test_wise, test_memoir): what one module outputs, and
the logits, for one text with a method's memory attached (the chain's hook) or without."""

from __future__ import annotations

import torch

from editscale.models.nethook import Trace


def module_output_and_logits(model, tok, module: str, text: str, memory=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the module's output, the logits) of one unpadded text, with `memory` attached."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    handles = memory.attach(model) if memory is not None else []
    try:
        with torch.no_grad(), Trace(model, [module]) as tr:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for h in handles:
            h.remove()
    return tr.outputs[module], logits
