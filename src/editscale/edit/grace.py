"""GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023): a codebook at one module; no weight changes.

For an edit (prompt, target): the query is the module's input at the last prompt token. With the
codebook's nearest key at distance d (Euclidean):

- no key, or d > eps + r_nearest: a new entry (key = query, radius eps, label = the target),
  whose value is trained;
- d <= eps + r_nearest and a different label: a new entry, and both radii split at d / 2 (the
  nearest one's to d / 2 - 1e-5), so the two do not overlap; the new value is trained;
- the same label: the nearest entry's radius grows to d when d exceeds it (eps_expand
  "coverage"; "moving_average" also moves its key halfway to the query), and its value is
  trained.

Training (n_iter Adam steps, lr edit_lr): the module's output at the last prompt token is
replaced by the trained value, the loss the mean NLL of the target tokens (teacher forcing); the
value starts at U[0, 1) ("cold", a generator seeded with the edit's index) or at the module's
output there ("warm"). At inference every position whose input lies within the radius of its
nearest key gets that key's value as the module's output (editscale.edit.memory.Codebook).

State: the codebook (editscale.edit.memory: in the delta files, each edit's changes in the factors
files), so the model after any edit replays exactly.

Reference: zjunlp/EasyEdit @14cea82, easyeditor/models/grace/GRACE.py (`GRACE.edit`,
`GRACEAdapter.forward`: `replacement: replace_last`, `val_init`, `eps_expand`), grace_main.py,
hparams/GRACE/*.yaml. Deviations (docs/fidelity.md): labels are the target strings (the reference
compares the mean of the label tensors); at inference every position is queried (the reference
queries the last token when generating and, when scoring, a position left over from the last
edit).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ..data.schema import fill
from ..models.nethook import Trace
from ..models.registry import edited_weight, to_math
from . import encoding, timing
from .hparams import spec
from .cost import CostSpec
from .memory import Codebook, MemoryOp
from .methods import LayerMemoryMethod
from .weights import WeightState
from .value_optimization import reused_prefix

SPLIT_MARGIN = 1e-5  # the reference's `smallest_distance / 2 - 1e-5` for the nearest key's radius


@dataclasses.dataclass(kw_only=True)
class GraceHparams:
    layer: int = spec(minimum=0, doc="the layer whose MLP output module holds the codebook")
    edit_lr: float = spec(1.0, minimum=0, doc="Adam learning rate of the value (GRACE: 1.0)")
    n_iter: int = spec(50, minimum=1, doc="Adam steps per edit (GRACE Llama: 50, GPT-2 XL: 200)")
    eps: float = spec(1.0, minimum=0, doc="initial deferral radius of a new key (GRACE: 1.0)")
    val_init: str = spec("cold", choices=("cold", "warm"), doc="the value starts at U[0, 1) (cold) or the module's output (warm)")
    eps_expand: str = spec("coverage", choices=("coverage", "moving_average"), doc="how a same-label query widens its key")


def label_of(target: str) -> int:
    """A 63-bit label of a target string (the codebook stores integers)."""
    return int.from_bytes(hashlib.blake2b(target.encode(), digest_size=8).digest(), "big") >> 1


class Grace(LayerMemoryMethod):
    """A discrete key-value adaptor at one MLP output module; the weights stay as they are."""

    name = "grace"
    hparams_type = GraceHparams
    memory_type = Codebook

    @classmethod
    def memory_widths(cls, model, hparams) -> dict[str, dict[str, tuple[int, ...]]]:
        out = {}
        for m in cls.memory_modules(model, hparams):
            d_out, d_in = to_math(model, edited_weight(model, m)).shape  # (out, in) in every architecture
            out[m] = {"keys": (d_in,), "values": (d_out,), "radii": (), "labels": ()}
        return out

    def state_dict(self) -> dict:
        return {}  # the codebook is the memory, stored by the chain

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        return [self._edit(case) for case in cases]

    # -- one edit ---------------------------------------------------------------------------------

    def _edit(self, case: dict) -> dict:
        device = encoding.model_device(self.model)
        prompt = fill(case["prompt"], case["subject"])
        p_ids = self.tok(prompt)["input_ids"]
        t_ids = encoding.target_token_ids(self.tok, encoding.target_str(case))
        ids = torch.tensor([p_ids + t_ids], device=device)
        pos = len(p_ids) - 1  # the last prompt token: the query, and the output that is replaced
        labels = torch.full_like(ids, -100)
        labels[0, len(p_ids):] = ids[0, len(p_ids):]
        with timing.phase("keys"), encoding.frozen_eval(self.model), torch.no_grad(), Trace(self.model, [self.module]) as tr:
            self.model(input_ids=ids)
        query = tr.inputs[self.module][0, pos].float().cpu().numpy()
        here = tr.outputs[self.module][0, pos].float().cpu().numpy()
        label = label_of(encoding.target_str(case))
        chosen, action = self._place(query, label, here, int(case.get("edit_index", 0)))

        table = self.memory.tables[self.module]
        value = torch.nn.Parameter(torch.from_numpy(table["values"][chosen].copy()).to(device))
        opt = torch.optim.Adam([value], lr=float(self.hp.edit_lr))

        def replace(name, out):
            out = out.clone()
            out[0, pos] = value.to(out.dtype)
            return out

        losses = []
        with timing.phase("optimize"), encoding.frozen_eval(self.model), reused_prefix(self.model, int(self.hp.layer)):
            for _ in range(int(self.hp.n_iter)):
                with Trace(self.model, [self.module], edit_output=replace, keep_inputs=False, keep_outputs=False):
                    logits = self.model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.memory.apply(MemoryOp(self.module, "values", np.array([chosen]), value.detach().float().cpu().numpy()[None]))
        return {"case_id": case.get("case_id"), "v_loss": losses[-1], "loss_before": losses[0], "steps": len(losses), "grace_action": action,
                "grace_keys": self.memory.size(self.module), "grace_chosen": chosen}

    def _place(self, query: np.ndarray, label: int, here: np.ndarray, seed: int) -> tuple[int, str]:
        """The codebook rules (module doc): which entry's value is trained, and what changed."""
        m, eps, table = self.module, np.float32(self.hp.eps), self.memory.tables[self.module]
        n = len(table["keys"])
        if self.hp.val_init == "cold":
            init = torch.rand(here.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
        else:
            init = here
        if n:
            # float32 Euclidean distances by torch.cdist, as the reference's cdist_float32 (and the inference hook)
            dist = torch.cdist(torch.from_numpy(table["keys"]), torch.from_numpy(query)[None])[:, 0].numpy()
            j = int(dist.argmin())
            d = dist[j]
            if d > eps + table["radii"][j]:
                pass  # no key within reach: a new one (below)
            elif label != table["labels"][j]:
                self._append(query, init, d / 2, label)
                self.memory.apply(MemoryOp(m, "radii", np.array([j]), np.array([d / 2 - np.float32(SPLIT_MARGIN)])))
                return n, "split"
            else:
                if d > table["radii"][j]:
                    if self.hp.eps_expand == "moving_average":
                        self.memory.apply(MemoryOp(m, "keys", np.array([j]), (0.5 * table["keys"][j] + 0.5 * query)[None]))
                    self.memory.apply(MemoryOp(m, "radii", np.array([j]), np.array([d])))
                    return j, "expanded"
                return j, "kept"
        self._append(query, init, eps, label)
        return n, "added" if n else "first"

    def _append(self, key, value, radius, label) -> None:
        n, m = self.memory.size(self.module), self.module
        for field, row in (("keys", key), ("values", value), ("radii", radius), ("labels", label)):
            self.memory.apply(MemoryOp(m, field, np.array([n]), np.asarray(row)[None]))


class GraceCost(CostSpec):
    """n_iter forward / backward passes over the edit prompt and target per edit, no closed-form
    solve, nothing held but the codebook (editscale doctor)."""

    solve = "memory"

    def device_matrices(self) -> tuple[float, float]:
        return 0.0, 0.0

    def value_prompts(self) -> tuple[int, float]:
        return 1, 12.0

    def memory_op_bytes(self, d_out: int, d_in: int) -> float:
        return 4.0 * (d_in + d_out) + 4 + 8  # a codebook row: key, value (fp32), radius, label

    def memory_bytes(self, k: int, d_out: int, d_in: int) -> float:
        return k * self.memory_op_bytes(d_out, d_in)  # at most one row per edit
