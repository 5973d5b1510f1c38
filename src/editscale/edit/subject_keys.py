"""Keys: the inputs (and outputs) of an edited module at the subject's last token, one padded batch,
forward stopped right after the module (ROME's compute_u / repr_tools, MEMIT's compute_ks)."""

from __future__ import annotations


import torch

from ..data.schema import fill
from ..io import EditscaleError
from ..models.nethook import Trace
from ..models.registry import get_module, layer_name, n_layers
from .timing import phase
from .templating import template_groups
from .encoding import encode_with_subject, frozen_eval, model_device, pad_id, pad_right


KEY_BATCH = 256  # rows per forward pass when computing keys of many cases x templates


# ---------------------------------------------------------------------------------------------
# Keys and module outputs at the subject


@phase("keys")
@torch.no_grad()
def module_io_at_subject(model, tok, module: str, prompts: list[str], subjects: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [n, d_in] and output [n, d_out] of `module` at the subject-last token of each
    fill(prompt, subject); batches of KEY_BATCH right-padded rows, forward stopped after the module."""
    get_module(model, module)  # clear error on a bad name
    ids, idxs = encode_with_subject(tok, prompts, subjects)
    device = model_device(model)
    ins, outs = [], []
    with frozen_eval(model):
        for s in range(0, len(ids), KEY_BATCH):
            input_ids, mask = pad_right(ids[s : s + KEY_BATCH], pad_id(tok), device)
            rows = torch.arange(input_ids.shape[0], device=device)
            cols = torch.tensor(idxs[s : s + KEY_BATCH], device=device)
            with Trace(model, [module], stop=True) as tr:
                model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            ins.append(tr.inputs[module][rows, cols].float())
            outs.append(tr.outputs[module][rows, cols].float())
    return torch.cat(ins), torch.cat(outs)


@phase("keys")
@torch.no_grad()
def compute_keys(model, tok, module: str, cases: list[dict], templates) -> torch.Tensor:
    """[n_cases, d_in]: input of `module` at the subject-last token of
    fill(fill(template, case["prompt"]), subject), averaged within each template group and then
    over the groups (memit/compute_ks.py; a flat list is one group, ROME's rome/compute_u.py mean).
    With MEMIT's groups [["{}"], five samples] that is k = 1/2 k("{}") + 1/2 mean(k over samples)."""
    if not cases:
        raise EditscaleError("compute_keys: no cases")
    groups = template_groups(templates)
    flat = [t for g in groups for t in g]
    prompts = [fill(t, c["prompt"]) for c in cases for t in flat]
    subjects = [c["subject"] for c in cases for _ in flat]
    keys, _ = module_io_at_subject(model, tok, module, prompts, subjects)
    per_group = keys.reshape(len(cases), len(flat), -1).split([len(g) for g in groups], dim=1)
    return torch.stack([k.mean(dim=1) for k in per_group], dim=1).mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Value optimization (ROME compute_v / MEMIT compute_z)


def layer_of(model, module: str) -> int:
    """Index of the transformer block that holds `module` (or is it)."""
    for i in reversed(range(n_layers(model))):
        name = layer_name(model, i)
        if module == name or module.startswith(name + "."):
            return i
    raise EditscaleError(f"{module!r} is not inside any transformer block of {type(model).__name__}")
