"""The edited weights of a chain: base W0 plus a cumulative fp32 delta D per edited module.

Every update is applied as D += u_1 v_1^T + ... (one outer product at a time, in order; or a
dense matrix for methods whose update is not low rank; or, for a sparsified low-rank update
(RECT), the float64 sum of the outer products kept where a boolean mask is true) and the live
parameter is then set to W0 + D. Outer products and additions are elementwise, so applying the
same factors in the same order from the same D reproduces the weights bit for bit, whatever the
thread count. This is what makes replay from factors exact.

All matrices here are in (out, in) orientation; the registry transposes for GPT-2's Conv1D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.registry import edited_weight, from_math, to_math


@dataclass
class Update:
    """One update of one module: dW = u @ v.T (u: out x r, v: in x r), a dense dW, or the masked
    low-rank dW = (u @ v.T) * mask (u, v float64, mask bool out x in; kind "masked")."""

    module: str
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "masked" if self.mask is not None else "lowrank"

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module's matrix."""
        return tuple(self.dense.shape) if self.dense is not None else (self.u.shape[0], self.v.shape[0])


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

    def preview(self, module: str, extra: torch.Tensor) -> None:
        """Set the live parameter to W0 + D + extra without recording anything (RECT computes its
        later layers on the unmasked update, as its reference does); `restore` undoes it."""
        self._check(module)
        param = edited_weight(self.model, module)
        with torch.no_grad():
            param.copy_(from_math(self.model, self.current(module) + extra.to(torch.float32)).to(param.dtype))

    def restore(self, module: str) -> None:
        """Set the live parameter back to W0 + D."""
        self._check(module)
        self._write(module)

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
    if update.mask is not None:
        full = outer_sum(update.u, update.v, torch.float64)
        delta.add_(torch.where(update.mask.to(full.device), full, 0.0).to(torch.float32))
        return
    u = update.u.to(torch.float32)
    v = update.v.to(torch.float32)
    if u.dim() == 1:
        u, v = u[:, None], v[:, None]
    for i in range(u.shape[1]):
        delta.add_(torch.outer(u[:, i], v[:, i]))


def outer_sum(u: torch.Tensor, v: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """u @ v.T as a sum of outer products in column order (elementwise, so the same on every
    thread count, unlike a BLAS matmul over r > 1)."""
    u, v = u.to(dtype), v.to(dtype)
    if u.dim() == 1:
        u, v = u[:, None], v[:, None]
    out = torch.zeros((u.shape[0], v.shape[0]), dtype=dtype, device=u.device)
    for i in range(u.shape[1]):
        out.add_(torch.outer(u[:, i], v[:, i]))
    return out
