"""A toy editing method defined outside editscale's sources: the plugin test runs the tiny
workflow through it (`plugins: [toy_method]` in the config, this directory on PYTHONPATH) with no
other file of editscale changed. Its update is W += scale * e_0 k^T / ||k||^2, with k the key at
the subject: after the edit, W k gains exactly scale * e_0 (its defining property)."""

from __future__ import annotations

import dataclasses

import torch

from editscale.edit.subject_keys import module_io_at_subject
from editscale.edit.hparams import spec
from editscale.edit.methods import EditMethod, register_method
from editscale.edit.weights import Update


@dataclasses.dataclass(kw_only=True)
class ToyHparams:
    layers: list[int] = spec(doc="edited layer")
    scale: float = spec(1.0, minimum=0, doc="size of the rank-one update")


class ToyScale(EditMethod):
    """Toy rank-one edit (plugin test)."""

    name = "toy-scale"
    hparams_type = ToyHparams

    @classmethod
    def precomputed(cls, hparams):
        return {}

    def apply(self, cases, weights):
        module = self.modules(self.model, self.hparams)[0]
        rows = []
        for case in cases:
            k, _ = module_io_at_subject(self.model, self.tok, module, [case["prompt"]], [case["subject"]])
            k = k[0].float()
            u = torch.zeros(weights.current(module).shape[0], 1)
            u[0, 0] = float(self.hparams["scale"])
            weights.apply(Update(module, u=u, v=(k / k.dot(k))[:, None], meta={"method": self.name}))
            rows.append({"case_id": case["case_id"], "v_loss": 0.0, "key_norm": float(k.norm())})
        return rows


register_method("toy-scale", ToyScale)
