"""Closed-form pieces of the updates: C^-1 through a Cholesky factor computed once (float64), and
an edited module's output for given keys under the current weights."""

from __future__ import annotations


import torch

from ..io import EditscaleError
from ..models.registry import get_module




# ---------------------------------------------------------------------------------------------
# Second-moment solves


class CovSolver:
    """x -> (scale * C + ridge * I)^-1 x for a fixed second moment C (float64, factored once).

    Cholesky when C is positive definite; otherwise an LU factorization (C singular up to float64
    precision raises EditscaleError naming the module).
    """

    def __init__(self, C: torch.Tensor, module: str = "", scale: float = 1.0, ridge: float = 0.0, device=None):
        C = torch.as_tensor(C).to(device=device, dtype=torch.float64)
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise EditscaleError(f"second moment of {module!r} must be square, got shape {tuple(C.shape)}")
        A = C * float(scale)
        if ridge:
            A = A + float(ridge) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        self.module = module
        self.dim = A.shape[0]
        self._chol, info = torch.linalg.cholesky_ex(A)
        self._lu = None
        if int(info) != 0:
            self._chol = None
            lu, piv, info = torch.linalg.lu_factor_ex(A)
            if int(info) != 0:
                raise EditscaleError(f"second moment of {module!r} is singular; collect more tokens or add a ridge")
            self._lu = (lu, piv)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """A^-1 x, float64; x of shape [d] or [d, r]."""
        x64 = x.to(dtype=torch.float64, device=(self._chol if self._chol is not None else self._lu[0]).device)
        vec = x64.dim() == 1
        b = x64[:, None] if vec else x64
        if self._chol is not None:
            out = torch.cholesky_solve(b, self._chol)
        else:
            out = torch.linalg.lu_solve(*self._lu, b)
        return out[:, 0] if vec else out


def module_bias(model, module: str) -> torch.Tensor | None:
    b = getattr(get_module(model, module), "bias", None)
    return None if b is None else b.detach().float()


def module_forward(model, weights, module: str, keys: torch.Tensor) -> torch.Tensor:
    """Output of the (linear) edited module at keys [d_in] or [d_in, n], computed from the current
    fp32 weight in float64: W k + b."""
    W = weights.current(module).to(torch.float64)
    k = keys.to(device=W.device, dtype=torch.float64)
    out = W @ k
    b = module_bias(model, module)
    if b is not None:
        b = b.to(device=W.device, dtype=torch.float64)
        out = out + (b if k.dim() == 1 else b[:, None])
    return out
