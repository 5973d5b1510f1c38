"""Weight drift of the edited matrices and per-edit update norms with outlier ("disabling edit") flags.

Per edited module, D_k = W_k - W_0 (the chain's cumulative delta, (out, in) orientation; norms
do not depend on the orientation):
  fro           ||D_k||_F
  fro_per_numel ||D_k||_F / numel(W)  (the study's normalized distance between edited and
                unedited weights)
  spectral      ||D_k||_2, the largest singular value (torch.linalg.matrix_norm(ord=2))
  rel_fro       ||D_k||_F / ||W_0||_F
  weight_fro    ||W_k||_F
and the collapse indicators of W_k = W_0 + D_k itself (`indicators`, also at k = 0):
  sv_1, sv_2, sv_3  its largest singular values (PRUNE: edited matrices' top singular values
                grow until they dominate)
  cond          sigma_max / sigma_min, its condition number
  hyperspherical_energy  the mean Riesz-1 energy of its rows (the output neurons) on the unit
                sphere, 1 / (N (N - 1)) sum_{i != j} 1 / ||w_i/||w_i|| - w_j/||w_j|| || (Liu et al.
                2018's MHE with s = 1; SPHERE, ICLR 2026, links its jumps to editing collapse);
                zero rows are left out
plus item "all": fro and fro_per_numel over all edited matrices together.

Per edit (from the factors' per-edit log: case_id, edit_index, update_norm = ||dW||_F,
update_rel = ||dW||_F / ||W||_F, v_norm = ||v*|| for the methods that optimize a target value):
v_norm per edit, and for item "all" v_norm_recent, the median ||v*|| of the last `recent` edits
(ENCORE and NAS name the growth of ||v*|| and of ||W|| as the cause of the collapse); the
robust z-score of the update norm among all edits 1..k
(editscale.robust: (x - median) / (1.4826 MAD), the same definition the phase detector uses).
An edit with z > threshold (default robust.OUTLIER_Z = 5, one-sided: unusually LARGE updates) is flagged as a
candidate disabling edit: "Rebuilding ROME" (Gupta et al. 2024) shows that sequential ROME
collapses at single edits whose update norm is orders of magnitude above the others.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .. import robust

SCHEMA = {"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64}


def hyperspherical_energy(w: torch.Tensor, chunk: int = 2048) -> float:
    """Mean pairwise Riesz-1 energy of the rows of w on the unit sphere (module doc), computed
    from the Gram matrix of the normalized rows in row blocks (memory O(chunk x N))."""
    w = w.to(torch.float64)
    norms = w.norm(dim=1)
    u = w[norms > 0] / norms[norms > 0, None]
    n = u.shape[0]
    if n < 2:
        return math.nan
    total = 0.0
    for i in range(0, n, chunk):
        g = u[i:i + chunk] @ u.T
        dist = (2.0 - 2.0 * g).clamp_min(1e-24).sqrt()
        idx = torch.arange(i, min(i + chunk, n))
        dist[idx - i, idx] = math.inf  # no self-pairs
        total += float((1.0 / dist).sum())
    return total / (n * (n - 1))


def matrix_indicators(w: torch.Tensor, top: int = 3) -> dict[str, float]:
    """sv_1..sv_top, cond and hyperspherical_energy of one (out, in) matrix (module doc)."""
    s = torch.linalg.svdvals(w.to(torch.float64))
    out = {f"sv_{i + 1}": float(s[i]) for i in range(min(top, s.numel()))}
    out["cond"] = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
    out["hyperspherical_energy"] = hyperspherical_energy(w)
    return out


def weight_drift(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor], k: int = 0, indicators: bool = True) -> pl.DataFrame:
    """Rows (k, item=module, metric, value) for every module of `delta` (see module doc); a zero
    delta gives the unedited matrices' figures (k = 0)."""
    rows = {"k": [], "item": [], "metric": [], "value": []}

    def add(item, metric, value):
        rows["k"].append(k)
        rows["item"].append(item)
        rows["metric"].append(metric)
        rows["value"].append(float(value))

    tot_sq, tot_numel = 0.0, 0
    for module in sorted(delta):
        d = delta[module].detach().to(torch.float64)
        w0 = base[module].detach().to(torch.float64)
        if w0.shape != d.shape:
            if w0.T.shape == d.shape:
                w0 = w0.T
            else:
                raise ValueError(f"{module}: delta shape {tuple(d.shape)} != weight shape {tuple(w0.shape)}")
        fro = float(torch.linalg.matrix_norm(d, ord="fro"))
        add(module, "fro", fro)
        add(module, "fro_per_numel", fro / d.numel())
        add(module, "spectral", float(torch.linalg.matrix_norm(d, ord=2)) if d.abs().max() > 0 else 0.0)
        w0_fro = float(torch.linalg.matrix_norm(w0, ord="fro"))
        add(module, "rel_fro", fro / w0_fro if w0_fro else math.nan)
        w_fro = float(torch.linalg.matrix_norm(w0 + d, ord="fro"))
        add(module, "weight_fro", w_fro)
        if indicators:
            for name, value in matrix_indicators(w0 + d).items():
                add(module, name, value)
        tot_sq += fro * fro
        tot_numel += d.numel()
    if delta:
        add("all", "fro", math.sqrt(tot_sq))
        add("all", "fro_per_numel", math.sqrt(tot_sq) / tot_numel)

    return pl.DataFrame(rows, schema=SCHEMA)


robust_z = robust.robust_z  # re-exported: one definition (editscale.robust)


def flag_outliers(norms: np.ndarray, threshold: float = robust.OUTLIER_Z) -> np.ndarray:
    """Boolean flags: robust z-score of the norm > threshold (NaN norms are never flagged)."""
    z = robust_z(norms)
    return np.nan_to_num(z, nan=-np.inf) > threshold


def update_norm_rows(log: pl.DataFrame, k: int, threshold: float = robust.OUTLIER_Z, recent: int = 20) -> pl.DataFrame:
    """Per-edit rows from the per-edit log table (edits with edit_index <= k): item=case_id,
    edit_index, metrics update_norm, update_rel, v_norm, robust_z, outlier (0/1); plus item "all":
    n_outliers, update_norm_median, update_norm_max, v_norm_recent (median ||v*|| of the last
    `recent` edits)."""
    log = log.filter(pl.col("edit_index") <= k).sort("edit_index")
    norms = log["update_norm"].cast(pl.Float64).to_numpy() if log.height else np.zeros(0)
    z = robust_z(norms)
    flags = flag_outliers(norms, threshold)
    rows = {"k": [], "item": [], "edit_index": [], "metric": [], "value": []}

    def add(item, e, metric, value):
        rows["k"].append(k)
        rows["item"].append(item)
        rows["edit_index"].append(e)
        rows["metric"].append(metric)
        rows["value"].append(float(value))

    has_rel, has_v = "update_rel" in log.columns, "v_norm" in log.columns
    for i, r in enumerate(log.iter_rows(named=True)):
        item, e = str(r["case_id"]), int(r["edit_index"])
        add(item, e, "update_norm", r["update_norm"] if r["update_norm"] is not None else math.nan)
        if has_rel:
            add(item, e, "update_rel", r["update_rel"] if r["update_rel"] is not None else math.nan)
        if has_v:
            add(item, e, "v_norm", r["v_norm"] if r["v_norm"] is not None else math.nan)
        add(item, e, "robust_z", z[i])
        add(item, e, "outlier", float(flags[i]))
    add("all", None, "n_outliers", float(flags.sum()))
    add("all", None, "update_norm_median", float(np.nanmedian(norms)) if norms.size else math.nan)
    add("all", None, "update_norm_max", float(np.nanmax(norms)) if norms.size else math.nan)
    if has_v and log.height:
        v = log["v_norm"].cast(pl.Float64).to_numpy()[-recent:]
        add("all", None, "v_norm_recent", float(np.nanmedian(v)) if np.isfinite(v).any() else math.nan)
    return pl.DataFrame(rows, schema={**SCHEMA, "edit_index": pl.Int64}).select("k", "item", "edit_index", "metric", "value")


def read_edit_logs(factors: list[str | Path], k: int) -> pl.DataFrame:
    """The per-edit log of the given factors files (the rule's inputs: segments up to edit k), only
    the `log` group of each, restricted to edits <= k."""
    from ..edit.chain import read_log_columns

    frames = [pl.DataFrame(cols) for path in sorted(map(Path, factors)) if (cols := read_log_columns(path))]
    if not frames:
        return pl.DataFrame(schema={"case_id": pl.Utf8, "edit_index": pl.Int64, "update_norm": pl.Float64, "update_rel": pl.Float64})
    # v_norm: logged by the methods that optimize a target value; absent (null) for the others
    return pl.concat(frames, how="diagonal_relaxed").filter(pl.col("edit_index") <= k)
