"""The edited weights of a chain: base W0 plus a cumulative fp32 delta D per edited module.

Every update is applied as D += u_1 v_1^T + ... (one outer product at a time, in order; or a
dense matrix for methods whose update is not low rank) and the live parameter is then set to
W0 + D. Outer products and additions are elementwise, so applying the same factors in the same
order from the same D reproduces the weights bit for bit, whatever the thread count. This is
what makes replay from factors exact.

All matrices here are in (out, in) orientation; the registry transposes for GPT-2's Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.registry import edited_weight, from_math, to_math


@dataclass
class Update:
    """One update of one module: dW = u @ v.T (u: out x r, v: in x r) or a dense dW."""

    module: str
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "lowrank"


class WeightState:
    """Owns the edited modules' weights during a chain; methods change weights only via `apply`."""

    def __init__(self, model: torch.nn.Module, modules: list[str], delta: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.modules = list(modules)
        self.base = {m: to_math(model, edited_weight(model, m)).detach().to(torch.float32).clone() for m in self.modules}
        self.delta = {m: torch.zeros_like(self.base[m]) for m in self.modules}
        self.applied: list[Update] = []  # every update since the last `take_applied`
        if delta:
            for m, d in delta.items():
                self._check(m)
                self.delta[m] = d.to(torch.float32).clone()
                self._write(m)

    def _check(self, module: str) -> None:
        if module not in self.delta:
            raise KeyError(f"module {module!r} is not among the edited modules {self.modules}")

    def current(self, module: str) -> torch.Tensor:
        """Current weight W0 + D of `module`, fp32, (out, in)."""
        self._check(module)
        return self.base[module] + self.delta[module]

    def apply(self, update: Update) -> None:
        self._check(update.module)
        add_update(self.delta[update.module], update)
        self._write(update.module)
        self.applied.append(update)

    def take_applied(self) -> list[Update]:
        out, self.applied = self.applied, []
        return out

    def _write(self, module: str) -> None:
        param = edited_weight(self.model, module)
        with torch.no_grad():
            param.copy_(from_math(self.model, self.current(module)).to(param.dtype))


def add_update(delta: torch.Tensor, update: Update) -> None:
    """delta += update, in place, one outer product at a time (deterministic elementwise ops)."""
    if update.dense is not None:
        delta.add_(update.dense.to(torch.float32))
        return
    u = update.u.to(torch.float32)
    v = update.v.to(torch.float32)
    if u.dim() == 1:
        u, v = u[:, None], v[:, None]
    for i in range(u.shape[1]):
        delta.add_(torch.outer(u[:, i], v[:, i]))
