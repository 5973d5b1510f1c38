"""benchmarks/device_check.py's comparison rules (the whole script runs in CI on the CPU, in the
device machine's package set: benchmarks/device_rehearsal.sh)."""

from __future__ import annotations

import torch

from benchmarks.device_check import masked_agreement
from editscale.edit.rect import relative_change_mask
from editscale.edit.weights import Update


def _rect_update(seed: int = 0, out: int = 48, inp: int = 96, keep: float = 40.0):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out, 2, generator=g, dtype=torch.float64), torch.randn(inp, 2, generator=g, dtype=torch.float64)
    W = torch.randn(out, inp, generator=g)
    mask = relative_change_mask(u @ v.T, W, keep)
    return Update("m", u=u, v=v, mask=mask), W


def _ratio(upd: Update, W: torch.Tensor) -> torch.Tensor:
    return ((upd.u @ upd.v.T) / (W.double() + 1e-8)).abs()


def test_masked_agreement_accepts_flips_at_the_cutoff_only():
    """The H200 run (issue 28) found RECT's cumulative update on cuda 6.5e-3 away from the CPU's on
    tiny GPT-J while all 10 other methods agreed to 2.3e-6: a top-40 % selection moves an entry
    that sits at the cutoff when its last bits differ, and the sequence diverges from there. The
    check now compares the first edit's unmasked product and masks, allowing flips at near-ties
    only; this pins that rule."""
    upd, W = _rect_update()
    ratio = _ratio(upd, W)
    flat = ratio.reshape(-1)
    n = int(flat.numel() * 0.6)
    t = torch.kthvalue(flat, n).values
    at_cutoff = int((flat - t).abs().argmin())
    far = int(flat.argmax())

    same = Update("m", u=upd.u.clone(), v=upd.v.clone(), mask=upd.mask.clone())
    res = masked_agreement([upd], [same], {"m": W}, 40.0, 1e-4)
    assert res["ok"] and res["mask_flips"] == 0 and res["product_rel_diff"] == 0.0

    tie = same.mask.clone().reshape(-1)
    tie[at_cutoff] = ~tie[at_cutoff]
    res = masked_agreement([upd], [Update("m", u=upd.u, v=upd.v, mask=tie.view_as(upd.mask))], {"m": W}, 40.0, 1e-4)
    assert res["ok"] and res["mask_flips"] == 1 and res["flips_off_tie"] == 0

    off = same.mask.clone().reshape(-1)
    off[far] = ~off[far]
    res = masked_agreement([upd], [Update("m", u=upd.u, v=upd.v, mask=off.view_as(upd.mask))], {"m": W}, 40.0, 1e-4)
    assert not res["ok"] and res["flips_off_tie"] == 1

    drift = Update("m", u=upd.u * (1 + 1e-3), v=upd.v, mask=upd.mask)
    res = masked_agreement([upd], [drift], {"m": W}, 40.0, 1e-4)
    assert not res["ok"] and abs(res["product_rel_diff"] - 1e-3) < 1e-9


def test_last_bit_noise_moves_rect_masks_only_at_ties():
    """Why a cumulative-delta comparison cannot gate RECT: perturbing the update by 1e-5
    (relative, far below the 1e-4 tolerance) moves mask entries, each one a near-tie, and the
    masked update then differs by far more than the perturbation."""
    moved = 0
    for seed in range(20):
        upd, W = _rect_update(seed, out=64, inp=256)
        noisy_u = upd.u * (1 + 1e-5 * torch.randn(upd.u.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64))
        other = Update("m", u=noisy_u, v=upd.v, mask=relative_change_mask(noisy_u @ upd.v.T, W, 40.0))
        res = masked_agreement([upd], [other], {"m": W}, 40.0, 1e-4)
        assert res["ok"], res
        if res["mask_flips"]:
            moved += 1
            a = torch.where(upd.mask, upd.u @ upd.v.T, 0.0)
            b = torch.where(other.mask, other.u @ other.v.T, 0.0)
            assert float((a - b).norm() / a.norm()) > 1e-5  # the masked update jumps by a whole entry
    assert moved > 0  # the noise did move entries in some of the 20 draws
