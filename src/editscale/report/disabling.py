"""Disabling edits: the single edits after which a run's abilities drop together.

(b) Disabling edits -- `detect_disabling_edits`
-----------------------------------------------
An edit j is flagged when either (or both) of:

- joint drop: one curve of every joint-drop role the metric registry declares (by default
  fluency: generation n-gram entropy; downstream: F1, else log-likelihood accuracy; efficacy:
  retention of earlier edits; editscale.evaluate.registry.CurveSpec.joint) ALL drop, around edit j, by more than `drop_z` robust standard deviations of their
  checkpoint-to-checkpoint changes in the gradual phase (checkpoints up to the onset when known,
  else all): for each curve on its own checkpoints,
  z_i = (d_i - median(d_gradual)) / (1.4826 * MAD(d_gradual)), d_i = y(k_{i-1}) -
  min(y(k_i .. k_{i+lookahead-1})); the curves' flagged intervals (k_{i-1}, k_i] must intersect
  (metrics may be evaluated every 40, 50, ... edits), and the intersection (a, b] is the edit
  window. The drop is attributed to the edit in (a, b] with the largest update-norm z when that z
  is at least `attribute_z`, else to edit b (the reason then names the range of edits the
  checkpoints cannot tell apart).
- update-norm outlier: the per-edit update norm is an outlier, robust z > `norm_z` where
  z = (log norm - rolling median of log norm over `window` edits) / (1.4826 * MAD of those
  residuals); norms grow during sequential editing, hence the rolling baseline and the log.
  The weights metric's own `outlier` flag (raw robust z among edits 1..k, without detrending)
  flags late edits as the norms grow, so it is not a criterion by default; with
  `use_metric_flag=True` it is one.

Each flagged edit carries one boolean per criterion (joint_drop, norm_outlier, metric_flag), the
z-scores, and the reasons as text for people.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from .. import robust
from ..config import section_defaults
from .changepoint import Curve, clean_curve

_REPORT = section_defaults("report")  # the config's defaults (schema.yaml) of the settings it exposes


@dataclass(frozen=True)
class DisablingConfig:
    """The thresholds of `detect_disabling_edits` (module docstring)."""

    drop_z: float = _REPORT["drop_z"]  # joint drop: robust z of each curve's drop
    norm_z: float = _REPORT["norm_z"]  # update-norm outlier: detrended robust z
    lookahead: int = 1  # checkpoints after a drop over which its minimum is taken
    window: int = 51  # edits in the rolling median of the log norms
    attribute_z: float = 3.0  # norm z that attributes a joint drop to one edit of its window
    use_metric_flag: bool = False  # the weights metric's own outlier flag is a criterion


@dataclass(frozen=True)
class DisablingEdit:
    """One flagged edit: which criteria flagged it (booleans), the z-scores, and the reasons."""

    edit_index: int
    reasons: tuple[str, ...]
    k_before: int | None = None
    k_after: int | None = None
    norm_z: float | None = None
    drop_z: Mapping[str, float] = field(default_factory=dict)
    case_id: str | None = None
    joint_drop: bool = False
    norm_outlier: bool = False
    metric_flag: bool = False




def norm_outlier_z(edit_index, norms, *, window: int = 51, log: bool = True) -> np.ndarray:
    """Robust z of each per-edit update norm against a rolling median (order of edit_index)."""
    edit_index = np.asarray(edit_index, dtype=float)
    v = np.asarray(norms, dtype=float)
    if len(v) == 0:
        return np.empty(0)
    order = np.argsort(edit_index, kind="stable")
    vs = v[order]
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            vs = np.where(vs > 0, np.log(vs), np.nan)
    w = max(1, min(window, len(vs)))
    if w % 2 == 0:
        w -= 1
    half = w // 2
    padded = np.concatenate([np.full(half, np.nan), vs, np.full(half, np.nan)])
    with warnings.catch_warnings():  # all-NaN windows (non-positive norms) give NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        baseline = np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, w), axis=1)
    resid = vs - baseline
    z_sorted = resid / robust.robust_scale(resid)
    z = np.empty_like(z_sorted)
    z[order] = z_sorted
    return np.nan_to_num(z, nan=0.0)


def _drop_z(c: Curve, onset_k: float | None, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Checkpoints k and the robust z of the drop from the previous checkpoint to each (module doc)."""
    kk, yy = clean_curve(c.k, c.y)
    kk, first = np.unique(kk, return_index=True)
    y = yy[first] * (1.0 if c.higher_is_better else -1.0)
    if len(y) < 4:
        return kk, np.empty(0)
    d = np.array([y[i - 1] - np.min(y[i : i + lookahead]) for i in range(1, len(y))])
    gradual = kk[1:] <= onset_k if onset_k is not None else np.ones(len(d), bool)
    if gradual.sum() < 3:
        gradual = np.ones(len(d), bool)
    ref = d[gradual]
    return kk, (d - np.median(ref)) / robust.robust_scale(ref - np.median(ref))


def joint_drops(
    curves: Sequence[Curve],
    *,
    onset_k: float | None = None,
    drop_z: float = 4.0,
    lookahead: int = 1,
) -> list[tuple[int, int, dict[str, float]]]:
    """Edit windows (k_before, k_after, {curve: z}) in which every curve drops together.

    Each curve is judged on its own checkpoints (metrics may be evaluated on different grids); a
    curve's drop between consecutive checkpoints (a, b] is flagged when its z exceeds `drop_z`, and
    a joint drop is a non-empty intersection (max a, min b] of one flagged interval per curve.
    Every curve needs at least 4 checkpoints, else there is no joint criterion ([]).
    """
    curves = [c for c in curves if len(c.k)]
    if not curves:
        return []
    flagged: list[list[tuple[float, float, float]]] = []
    for c in curves:
        kk, z = _drop_z(c, onset_k, lookahead)
        if len(z) == 0:
            return []
        flagged.append([(kk[i], kk[i + 1], float(z[i])) for i in np.nonzero(z > drop_z)[0]])
        if not flagged[-1]:
            return []
    windows: dict[tuple[int, int], dict[str, float]] = {}
    for combo in itertools.product(*flagged):
        lo, hi = max(a for a, _, _ in combo), min(b for _, b, _ in combo)
        if lo < hi:
            windows.setdefault((int(lo), int(hi)), {c.name: z for c, (_, _, z) in zip(curves, combo)})
    return [(lo, hi, zs) for (lo, hi), zs in sorted(windows.items())]


def detect_disabling_edits(
    curves: Sequence[Curve] | Mapping[str, Curve],
    norms: pl.DataFrame | None = None,
    config: DisablingConfig = DisablingConfig(),
    *,
    onset_k: float | None = None,
) -> list[DisablingEdit]:
    """Disabling edits: joint drop of the given curves and/or update-norm outliers.

    `curves` are the curves that must drop together (fluency, downstream, efficacy).
    `norms` has columns edit_index (Int) and update_norm (Float), optionally case_id and outlier
    (0/1, the weights metric's own flag; a criterion only with `config.use_metric_flag`).
    """
    if isinstance(curves, Mapping):
        curves = list(curves.values())
    flagged: dict[int, dict] = {}

    def entry(j: int) -> dict:
        return flagged.setdefault(j, {"reasons": [], "drop_z": {}, "k_before": None, "k_after": None, "joint_drop": False, "norm_outlier": False, "metric_flag": False})

    z_by_edit: dict[int, float] = {}
    case_by_edit: dict[int, str] = {}
    if norms is not None and norms.height:
        nn = norms.filter(pl.col("edit_index").is_not_null() & pl.col("update_norm").is_not_null())
        idx = nn["edit_index"].to_numpy().astype(int)
        z = norm_outlier_z(idx, nn["update_norm"].to_numpy(), window=config.window)
        z_by_edit = dict(zip(idx.tolist(), z.tolist()))
        if "case_id" in nn.columns:
            case_by_edit = {int(j): c for j, c in zip(idx, nn["case_id"].to_list()) if c is not None}
        for j, zj in z_by_edit.items():
            if zj > config.norm_z:
                e = entry(j)
                e["norm_outlier"] = True
                e["reasons"].append(f"update-norm outlier (robust z = {zj:.1f} > {config.norm_z})")
        if config.use_metric_flag and "outlier" in nn.columns:
            for j, o in zip(idx.tolist(), nn["outlier"].to_list()):
                if o is not None and o >= 0.5:
                    e = entry(j)
                    e["metric_flag"] = True
                    e["reasons"].append("flagged outlier by the weights metric")

    for k0, k1, zs in joint_drops(curves, onset_k=onset_k, drop_z=config.drop_z, lookahead=config.lookahead):
        window_edits = [j for j in z_by_edit if k0 < j <= k1]
        j = max(window_edits, key=lambda e: z_by_edit[e]) if window_edits else None
        where = f"largest update norm in ({k0}, {k1}]"
        if j is None or z_by_edit[j] < config.attribute_z:
            j, where = k1, f"one of edits {k0 + 1}..{k1}" if k1 - k0 > 1 else f"edit {k1}"
        e = entry(j)
        detail = ", ".join(f"{n} z = {v:.1f}" for n, v in zs.items())
        e["reasons"].append(f"joint drop between checkpoints {k0} and {k1} ({detail}; {where})")
        e["drop_z"].update(zs)
        e["joint_drop"] = True
        e["k_before"], e["k_after"] = k0, k1

    return [
        DisablingEdit(
            edit_index=int(j),
            reasons=tuple(e["reasons"]),
            k_before=e["k_before"],
            k_after=e["k_after"],
            norm_z=z_by_edit.get(j),
            drop_z=dict(e["drop_z"]),
            case_id=case_by_edit.get(j),
            joint_drop=e["joint_drop"],
            norm_outlier=e["norm_outlier"],
            metric_flag=e["metric_flag"],
        )
        for j, e in sorted(flagged.items())
    ]

