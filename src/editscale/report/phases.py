"""Forgetting-phase detection: onset of catastrophic forgetting and disabling edits.

The study (Gupta, Rao, Anumanchipalli 2024) describes two phases of sequential editing: a gradual
phase in which earlier edits and downstream ability erode slowly, then an abrupt catastrophic
collapse, often set off by one "disabling edit". This module finds both from a run's curves.

(a) Onset of catastrophic forgetting -- `detect_onset`
------------------------------------------------------
Input: one curve y(k) over checkpoints k (downstream score, history efficacy, ...), oriented so that
higher is better (curves where higher is worse, e.g. perplexity, are negated first).

1. Preparation. NaNs are dropped and points sorted by k. Curves longer than `max_points` are
   averaged into `max_points` equal-count bins (the per-edit proficiency curve has thousands of
   points). k is scaled to [0, 1] over the observed span and y is standardized (median, standard
   deviation), so every threshold below is unit free. A curve with zero variance has no onset.
2. Model. A continuous two-segment piecewise-linear ("hinge") fit

       y = a + b1 * x + c * max(0, x - t),   slope after the break b2 = b1 + c,

   for every candidate breakpoint t (every observed x and every midpoint between neighbours,
   evenly thinned to `grid` values) that leaves at least `min_segment` points on each side
   (default max(3, 5% of the points)). A collapse usually ends on a floor (F1 or efficacy near 0),
   which one straight second segment cannot follow and which drags the fitted breakpoint early;
   so the family also holds the same hinge ending in a flat floor after a second break t2 > t
   (slope b1 up to t, b2 from t to t2, 0 after t2; t2 on a grid of `floor_grid` values with at
   least `min_segment` points after it; one more parameter). With t2 right after t this is a step,
   the shape of a single disabling edit. The model is chosen by BIC over all (t[, t2]) (profile
   least squares: each design is orthonormalized by batched QR and
   SSE = ||y||^2 - ||Q' y||^2, so all candidates and all resampled curves are solved at once).
   The grids are thinned for long curves, so the search is repeated with every observed x and
   midpoint within two coarse grid steps of the coarse optimum added. The onset is t.
3. Acceptance. A change point is reported only if BOTH hold:
   (i) steepening: the second slope points down and is much steeper than the first,
       -b2 >= slope_ratio * max(-b1, slope_floor)  (b1, b2 in standardized units per span; the
       floor keeps a flat or rising first segment from making any small decline look "steep");
   (ii) significance, by two tests that must both pass:
       - BIC: the chosen model (4 parameters a, b1, c, t; 5 with the floor t2) against one
         straight line (2 parameters) with Gaussian errors, BIC = n log(SSE / n) + p log(n);
         delta_BIC = BIC_line - BIC_hinge >= min_delta_bic (default 10, "very strong" on the
         Kass-Raftery scale);
       - a test that accounts for the search over breakpoints (sup-likelihood-ratio type): the
         statistic delta_BIC (maximized over all candidates) is recomputed on `n_null` curves
         simulated under the straight-line null (line fit + resampled, centred line residuals;
         seeded), and p = (1 + #{delta_BIC* >= delta_BIC}) / (n_null + 1) must be <= alpha
         (so n_null must be at least 1/alpha - 1).
   A flat curve, pure noise, or a purely gradual (linear) decline fails (i) or (ii): no onset.
4. Confidence. The breakpoint interval comes from a residual bootstrap of the hinge fit (fitted
   values + resampled centred hinge residuals, seeded, `n_boot` replicates, breakpoint refitted on
   each); ci = the (1-conf)/2 and (1+conf)/2 percentiles, widened to at least one grid step either
   side of the estimate (the resolution of the search) and to the checkpoints on either side of it
   (a break between two checkpoints can lie anywhere between them). Reported in edits (k units).
5. Collapse end. `collapse_k` is the floor break t2 when the floor model was chosen; otherwise the
   first checkpoint after the onset at which the curve (running median of 3) has lost 90% of its
   drop from the fitted level at the onset to its minimum. The overview plot shades
   [onset_k, collapse_k].

Combined decision (`combine_phases`): among the curves that found an onset (by default
downstream F1, downstream log-likelihood accuracy and history efficacy), the combined onset is the
earliest onset supported by at least `min_agree` curves, where a curve agrees with it when the two
bootstrap intervals overlap or the onsets are within `tol` of the span. The result lists the curves
that detected an onset and those that agree.

Residuals of sequential-edit curves are autocorrelated; the i.i.d. resampling in the BIC, the null
test and the bootstrap treats them as independent, so p-values and intervals are optimistic. The
slope-ratio criterion and the high BIC margin are what keep gradual curves from being flagged.

(b) Disabling edits -- `detect_disabling_edits`
-----------------------------------------------
An edit j is flagged when either (or both) of:

- joint drop: fluency (generation n-gram entropy), downstream score and history efficacy ALL
  drop, around edit j, by more than `drop_z` robust standard deviations of their
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

Each flagged edit carries the reasons as text and the z-scores.

All functions take plain numpy arrays or polars frames; `analyze_run` ties them to the report
tables (see editscale.report.tables).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from .. import robust

METHOD = "hinge-bic+supLR"
DECISION_CURVES = ("downstream_f1", "downstream_ll", "efficacy")


# ----------------------------------------------------------------------------------------------
# data classes


@dataclass(frozen=True)
class Curve:
    """One curve of a run: value y at model state k (after k edits)."""

    name: str
    k: np.ndarray
    y: np.ndarray
    higher_is_better: bool = True


@dataclass(frozen=True)
class Phase:
    """Result of onset detection on one curve. `onset_k` is None when no onset was accepted.

    `candidate_k` is the best breakpoint even when it was rejected; slopes are per edit in the
    curve's own units; `reason` says why a candidate was rejected ("accepted" otherwise).
    """

    curve: str
    onset_k: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    delta_bic: float | None = None
    method: str = METHOD
    candidate_k: float | None = None
    slope_before: float | None = None
    slope_after: float | None = None
    slope_ratio: float | None = None
    collapse_k: float | None = None
    n_points: int = 0
    k_min: float | None = None
    k_max: float | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.onset_k is not None


@dataclass(frozen=True)
class CombinedPhase:
    """Decision across curves: earliest onset supported by at least `min_agree` curves."""

    onset_k: float | None
    ci_low: float | None
    ci_high: float | None
    collapse_k: float | None
    curves_detected: tuple[str, ...]
    curves_agreeing: tuple[str, ...]
    decision: str


@dataclass(frozen=True)
class DisablingEdit:
    edit_index: int
    reasons: tuple[str, ...]
    k_before: int | None = None
    k_after: int | None = None
    norm_z: float | None = None
    drop_z: Mapping[str, float] = field(default_factory=dict)
    case_id: str | None = None


@dataclass(frozen=True)
class RunPhases:
    run: str
    phases: Mapping[str, Phase]
    combined: CombinedPhase
    disabling: tuple[DisablingEdit, ...]
    k_max: int | None


# ----------------------------------------------------------------------------------------------
# hinge fit


def _clean(k, y) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if k.shape != y.shape:
        raise ValueError(f"k and y differ in length: {k.shape} vs {y.shape}")
    ok = np.isfinite(k) & np.isfinite(y)
    k, y = k[ok], y[ok]
    order = np.argsort(k, kind="stable")
    return k[order], y[order]


def _bin(k: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if len(k) <= max_points:
        return k, y
    chunks = np.array_split(np.arange(len(k)), max_points)
    return np.array([k[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks])


def _stacked_q(x: np.ndarray, tt: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Orthonormal bases (P, n, 3) of the designs [1, min(x, t2), clip(x - t, 0, t2 - t)].

    With t2 = inf this is the plain hinge [1, x, max(0, x - t)]; a finite t2 adds a flat floor
    after t2 (slope b1 until t, b1 + c from t to t2, 0 after t2).
    """
    n = len(x)
    design = np.empty((len(tt), n, 3))
    design[:, :, 0] = 1.0
    design[:, :, 1] = np.minimum(x[None, :], t2[:, None])
    design[:, :, 2] = np.clip(x[None, :] - tt[:, None], 0.0, (t2 - tt)[:, None])
    q, _ = np.linalg.qr(design)
    return q


class _Profile:
    """All candidate models of one curve; the best model of any set of curves sharing x.

    The orthonormal bases are kept when they fit in `cache_doubles` values, else rebuilt chunk by
    chunk at every call (bounded memory for long curves).
    """

    def __init__(self, x: np.ndarray, tt: np.ndarray, t2: np.ndarray, npar: np.ndarray, *, chunk: int = 2048, cache_doubles: int = 8_000_000):
        self.x, self.n, self.tt, self.t2 = x, len(x), tt, t2
        self.penalty = npar * math.log(len(x))
        self.chunks = [slice(i, min(i + chunk, len(tt))) for i in range(0, len(tt), chunk)]
        self.cache = None
        if len(tt) * len(x) * 3 <= cache_doubles:
            self.cache = [self._qflat(c) for c in self.chunks]

    def _qflat(self, c: slice) -> np.ndarray:
        q = _stacked_q(self.x, self.tt[c], self.t2[c])
        return q.transpose(0, 2, 1).reshape(-1, self.n)

    def best(self, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of the min-BIC model and its BIC, for each column of ys (n, B)."""
        b = ys.shape[1]
        total = (ys**2).sum(axis=0)[None, :]
        best_i = np.zeros(b, dtype=int)
        best_bic = np.full(b, np.inf)
        for ci, c in enumerate(self.chunks):
            qflat = self.cache[ci] if self.cache is not None else self._qflat(c)
            proj = (qflat @ ys).reshape(-1, 3, b)
            sse = np.maximum(total - (proj**2).sum(axis=1), 1e-300)
            bic = self.n * np.log(sse / self.n) + self.penalty[c, None]
            i = np.argmin(bic, axis=0)
            v = bic[i, np.arange(b)]
            better = v < best_bic
            best_i[better] = i[better] + c.start
            best_bic[better] = v[better]
        return best_i, best_bic


def _line_fit(x: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line for each column of ys: (fitted (n, B), BIC (B,))."""
    design = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    fitted = design @ coef
    sse = np.maximum(((ys - fitted) ** 2).sum(axis=0), 1e-300)
    n = len(x)
    return fitted, n * np.log(sse / n) + 2 * math.log(n)


def _grid(x: np.ndarray, lo_i: int, hi_i: int, size: int) -> np.ndarray:
    """Candidate breakpoints between x[lo_i] and x[hi_i]: every observed x there and every midpoint
    between neighbours, evenly subsampled (by rank) to at most `size` values."""
    if size <= 0 or hi_i < lo_i:
        return np.empty(0)
    observed = x[lo_i : hi_i + 1]
    vals = np.unique(np.concatenate([observed, (observed[1:] + observed[:-1]) / 2]))
    if len(vals) > size:
        vals = vals[np.unique(np.linspace(0, len(vals) - 1, size).round().astype(int))]
    return vals


def _models(x: np.ndarray, min_segment: int, grid: int, floor_grid: int):
    """Candidate (t, t2, n_params): >= min_segment points up to t, after t, and after a floor t2."""
    n, m = len(x), min_segment
    ts = _grid(x, m - 1, n - m - 1, grid)
    ts = ts[ts < x[n - m]]
    t2s = _grid(x, m, n - m - 1, floor_grid)
    tt, t2, npar = [ts], [np.full(len(ts), np.inf)], [np.full(len(ts), 4.0)]
    for v in t2s:
        ok = ts[ts < v]
        tt.append(ok)
        t2.append(np.full(len(ok), v))
        npar.append(np.full(len(ok), 5.0))
    return np.concatenate(tt), np.concatenate(t2), np.concatenate(npar)


def _local_models(x, min_segment, tt, t2, t_hat, t2_hat):
    """Every candidate (observed x and midpoints, no thinning) within two coarse grid steps of the
    coarse optimum (t_hat[, t2_hat]), so a thinned grid does not bias the estimate."""
    n, m = len(x), min_segment
    full = _grid(x, m - 1, n - m - 1, 10 * n)
    full = full[full < x[n - m]]
    ut = np.unique(tt)
    gt = 2 * float(np.max(np.diff(ut))) if len(ut) > 1 else 0.0
    lt = full[np.abs(full - t_hat) <= gt]
    out_t, out_2 = [lt], [np.full(len(lt), np.inf)]
    if np.isfinite(t2_hat):
        u2 = np.unique(t2[np.isfinite(t2)])
        g2 = 2 * float(np.max(np.diff(u2))) if len(u2) > 1 else 0.0
        full2 = _grid(x, m, n - m - 1, 10 * n)
        for v in full2[np.abs(full2 - t2_hat) <= g2]:
            ok = lt[lt < v]
            out_t.append(ok)
            out_2.append(np.full(len(ok), v))
    lt, l2 = np.concatenate(out_t), np.concatenate(out_2)
    return lt, l2, np.where(np.isfinite(l2), 5.0, 4.0)


def _running_median3(y: np.ndarray) -> np.ndarray:
    if len(y) < 3:
        return y.copy()
    padded = np.concatenate([y[:1], y, y[-1:]])
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 3), axis=1)


def detect_onset(
    k,
    y,
    *,
    curve: str = "curve",
    higher_is_better: bool = True,
    slope_ratio: float = 3.0,
    slope_floor: float = 0.25,
    min_delta_bic: float = 10.0,
    alpha: float = 0.01,
    n_boot: int = 200,
    n_null: int = 199,
    conf: float = 0.95,
    grid: int = 160,
    floor_grid: int = 60,
    min_segment: int | None = None,
    min_points: int = 8,
    max_points: int = 300,
    seed: int = 0,
) -> Phase:
    """Onset of catastrophic forgetting on one curve by a two-segment hinge fit (module docstring)."""
    if n_null > 0 and 1.0 / (n_null + 1) > alpha:
        raise ValueError(f"n_null = {n_null} cannot reach p <= alpha = {alpha}; use n_null >= {math.ceil(1 / alpha) - 1}")
    k, y = _clean(k, y)
    base = dict(curve=curve, n_points=int(len(k)))
    if len(k) == 0:
        return Phase(reason="no data", **base)
    base.update(k_min=float(k[0]), k_max=float(k[-1]))
    if len(k) < min_points:
        return Phase(reason=f"too few points ({len(k)} < {min_points})", **base)
    sign = 1.0 if higher_is_better else -1.0
    yo = sign * y
    kb, yb = _bin(k, yo, max_points)
    n = len(kb)
    span = kb[-1] - kb[0]
    scale = float(np.std(yb))
    if span <= 0:
        return Phase(reason="all points at one k", **base)
    if not scale > 1e-12 * max(1.0, float(np.max(np.abs(yb)))):
        return Phase(reason="flat curve (zero variance)", **base)
    x = (kb - kb[0]) / span
    center = float(np.median(yb))
    ys = (yb - center) / scale
    m = min_segment if min_segment is not None else max(3, math.ceil(0.05 * n))
    tt, t2, npar = _models(x, m, grid, floor_grid)
    if len(tt) == 0:
        return Phase(reason=f"too few points for two segments of {m}", **base)

    prof = _Profile(x, tt, t2, npar)
    i_best = int(prof.best(ys[:, None])[0][0])
    lt, l2, lp = _local_models(x, m, tt, t2, float(tt[i_best]), float(t2[i_best]))
    if len(lt):  # refine around the coarse optimum
        tt, t2, npar = np.concatenate([tt, lt]), np.concatenate([t2, l2]), np.concatenate([npar, lp])
        prof = _Profile(x, tt, t2, npar)
        i_best = int(prof.best(ys[:, None])[0][0])
    t_hat, t2_hat = float(tt[i_best]), float(t2[i_best])
    design = np.column_stack([np.ones(n), np.minimum(x, t2_hat), np.clip(x - t_hat, 0.0, t2_hat - t_hat)])
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    fitted = design @ coef
    b1, b2 = float(coef[1]), float(coef[1] + coef[2])
    sse1 = max(float(((ys - fitted) ** 2).sum()), 1e-300)
    line_fitted, bic0 = _line_fit(x, ys[:, None])
    delta_bic = float(bic0[0]) - (n * math.log(sse1 / n) + npar[i_best] * math.log(n))
    ratio = -b2 / max(-b1, slope_floor)

    rng = np.random.default_rng(seed)
    p_value = None
    if n_null > 0:
        res0 = ys - line_fitted[:, 0]
        res0 = res0 - res0.mean()
        ynull = line_fitted[:, :1] + res0[rng.integers(0, n, size=(n, n_null))]
        _, bic0_null = _line_fit(x, ynull)
        stat_null = bic0_null - prof.best(ynull)[1]
        p_value = float((1 + np.sum(stat_null >= delta_bic - 1e-9)) / (n_null + 1))

    ts = np.unique(tt)
    j = int(np.searchsorted(ts, t_hat))
    local = ts[max(j - 1, 0) : j + 2]
    h = float(np.max(np.diff(local))) if len(local) > 1 else 0.0
    lo, hi = t_hat - h, t_hat + h
    # nor finer than the checkpoints: a break between two observations can lie anywhere between them
    lo = min(lo, float(x[x <= t_hat].max()))
    hi = max(hi, float(x[x > t_hat].min()))
    if n_boot > 0:
        res1 = ys - fitted
        res1 = res1 - res1.mean()
        yboot = fitted[:, None] + res1[rng.integers(0, n, size=(n, n_boot))]
        t_boot = tt[prof.best(yboot)[0]]
        qlo, qhi = np.quantile(t_boot, [(1 - conf) / 2, (1 + conf) / 2])
        lo, hi = min(lo, float(qlo)), max(hi, float(qhi))

    def to_k(v: float) -> float:
        return round(float(kb[0] + v * span), 6)

    per_edit = scale / span
    info = dict(
        candidate_k=to_k(t_hat),
        slope_before=sign * b1 * per_edit,
        slope_after=sign * b2 * per_edit,
        slope_ratio=float(ratio),
        delta_bic=float(delta_bic),
        p_value=p_value,
    )
    reasons = []
    if not (b2 < 0 and b2 < b1):
        reasons.append("second segment does not fall faster than the first")
    elif ratio < slope_ratio:
        reasons.append(f"slope ratio {ratio:.2f} < {slope_ratio}")
    if delta_bic < min_delta_bic:
        reasons.append(f"delta BIC {delta_bic:.1f} < {min_delta_bic}")
    if p_value is not None and p_value > alpha:
        reasons.append(f"sup-LR p = {p_value:.3f} > {alpha}")
    if reasons:
        return Phase(reason="; ".join(reasons), **base, **info)

    onset_k = to_k(t_hat)
    if np.isfinite(t2_hat):
        collapse_k = to_k(t2_hat)
    else:  # 90% of the drop from the fitted level at the onset to the minimum after it
        after = k >= onset_k
        collapse_k = float(k[-1])
        if after.any():
            level0 = (coef[0] + b1 * t_hat) * scale + center
            smooth = _running_median3(yo[after])
            hit = np.nonzero(smooth <= level0 - 0.9 * (level0 - smooth.min()))[0]
            if len(hit):
                collapse_k = float(k[after][hit[0]])
    return Phase(
        onset_k=onset_k,
        ci_low=max(to_k(lo), float(kb[0])),
        ci_high=min(to_k(hi), float(kb[-1])),
        collapse_k=max(collapse_k, onset_k),
        reason="accepted",
        **base,
        **info,
    )


def detect_curve(curve: Curve, **kwargs) -> Phase:
    return detect_onset(curve.k, curve.y, curve=curve.name, higher_is_better=curve.higher_is_better, **kwargs)


def combine_phases(
    phases: Iterable[Phase],
    *,
    curves: Sequence[str] | None = None,
    min_agree: int = 1,
    tol: float = 0.1,
) -> CombinedPhase:
    """Earliest onset that at least `min_agree` of the accepted curves support (module docstring)."""
    phases = [p for p in phases if curves is None or p.curve in curves]
    detected = sorted((p for p in phases if p.accepted), key=lambda p: p.onset_k)
    names = tuple(p.curve for p in detected)
    if not detected:
        why = "; ".join(f"{p.curve}: {p.reason}" for p in phases)
        return CombinedPhase(None, None, None, None, (), (), "no curve shows an onset" + (f" ({why})" if why else ""))
    k_span = max((p.k_max or 0) - (p.k_min or 0) for p in phases) or 1.0

    def agrees(a: Phase, b: Phase) -> bool:
        overlap = a.ci_low <= b.ci_high and b.ci_low <= a.ci_high
        return overlap or abs(a.onset_k - b.onset_k) <= tol * k_span

    for anchor in detected:
        agreeing = tuple(p.curve for p in detected if agrees(anchor, p))
        if len(agreeing) >= min_agree:
            return CombinedPhase(
                anchor.onset_k,
                anchor.ci_low,
                anchor.ci_high,
                anchor.collapse_k,
                names,
                agreeing,
                f"earliest onset ({anchor.curve}) supported by {len(agreeing)} curve(s)",
            )
    return CombinedPhase(None, None, None, None, names, (), f"no onset supported by {min_agree} curves")


# ----------------------------------------------------------------------------------------------
# disabling edits


robust_z = robust.robust_z  # one definition (editscale.robust), shared with the weights metric
_robust_scale = robust.robust_scale


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
    z_sorted = resid / _robust_scale(resid)
    z = np.empty_like(z_sorted)
    z[order] = z_sorted
    return np.nan_to_num(z, nan=0.0)


def _drop_z(c: Curve, onset_k: float | None, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Checkpoints k and the robust z of the drop from the previous checkpoint to each (module doc)."""
    kk, yy = _clean(c.k, c.y)
    kk, first = np.unique(kk, return_index=True)
    y = yy[first] * (1.0 if c.higher_is_better else -1.0)
    if len(y) < 4:
        return kk, np.empty(0)
    d = np.array([y[i - 1] - np.min(y[i : i + lookahead]) for i in range(1, len(y))])
    gradual = kk[1:] <= onset_k if onset_k is not None else np.ones(len(d), bool)
    if gradual.sum() < 3:
        gradual = np.ones(len(d), bool)
    ref = d[gradual]
    return kk, (d - np.median(ref)) / _robust_scale(ref - np.median(ref))


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
    *,
    onset_k: float | None = None,
    drop_z: float = 4.0,
    norm_z: float = robust.OUTLIER_Z,
    lookahead: int = 1,
    window: int = 51,
    attribute_z: float = 3.0,
    use_metric_flag: bool = False,
) -> list[DisablingEdit]:
    """Disabling edits: joint drop of the given curves and/or update-norm outliers.

    `curves` are the curves that must drop together (fluency, downstream, efficacy).
    `norms` has columns edit_index (Int) and update_norm (Float), optionally case_id and outlier
    (0/1, the weights metric's own flag; a criterion only with `use_metric_flag`).
    """
    if isinstance(curves, Mapping):
        curves = list(curves.values())
    flagged: dict[int, dict] = {}

    def entry(j: int) -> dict:
        return flagged.setdefault(j, {"reasons": [], "drop_z": {}, "k_before": None, "k_after": None})

    z_by_edit: dict[int, float] = {}
    case_by_edit: dict[int, str] = {}
    if norms is not None and norms.height:
        nn = norms.filter(pl.col("edit_index").is_not_null() & pl.col("update_norm").is_not_null())
        idx = nn["edit_index"].to_numpy().astype(int)
        z = norm_outlier_z(idx, nn["update_norm"].to_numpy(), window=window)
        z_by_edit = dict(zip(idx.tolist(), z.tolist()))
        if "case_id" in nn.columns:
            case_by_edit = {int(j): c for j, c in zip(idx, nn["case_id"].to_list()) if c is not None}
        for j, zj in z_by_edit.items():
            if zj > norm_z:
                entry(j)["reasons"].append(f"update-norm outlier (robust z = {zj:.1f} > {norm_z})")
        if use_metric_flag and "outlier" in nn.columns:
            for j, o in zip(idx.tolist(), nn["outlier"].to_list()):
                if o is not None and o >= 0.5 and (j not in flagged or not flagged[j]["reasons"]):
                    entry(j)["reasons"].append("flagged outlier by the weights metric")

    for k0, k1, zs in joint_drops(curves, onset_k=onset_k, drop_z=drop_z, lookahead=lookahead):
        window_edits = [j for j in z_by_edit if k0 < j <= k1]
        j = max(window_edits, key=lambda e: z_by_edit[e]) if window_edits else None
        where = f"largest update norm in ({k0}, {k1}]"
        if j is None or z_by_edit[j] < attribute_z:
            j, where = k1, f"one of edits {k0 + 1}..{k1}" if k1 - k0 > 1 else f"edit {k1}"
        e = entry(j)
        detail = ", ".join(f"{n} z = {v:.1f}" for n, v in zs.items())
        e["reasons"].append(f"joint drop between checkpoints {k0} and {k1} ({detail}; {where})")
        e["drop_z"].update(zs)
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
        )
        for j, e in sorted(flagged.items())
    ]


# ----------------------------------------------------------------------------------------------
# report tables -> curves -> phases


def _mean_curve(df: pl.DataFrame | None, run: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if df is None or df.height == 0 or "metric" not in df.columns:
        return np.empty(0), np.empty(0)
    sub = (
        df.filter((pl.col("run") == run) & (pl.col("metric") == metric) & pl.col("value").is_not_nan())
        .group_by("edit")
        .agg(pl.col("value").mean())
        .sort("edit")
    )
    return sub["edit"].to_numpy().astype(float), sub["value"].to_numpy().astype(float)


def run_curves(tables: Mapping[str, pl.DataFrame], run: str) -> dict[str, Curve]:
    """The curves of one run from the report tables (only those with data).

    downstream_f1 / downstream_ll: mean F1 / accuracy_ll over tasks per checkpoint;
    efficacy: history retention (mean es of all earlier edits) per checkpoint;
    fluency: generation n-gram entropy; perplexity: log perplexity (higher is worse);
    proficiency: es of each edit right after it was made (k = edit index).
    """
    out: dict[str, Curve] = {}

    def add(name, k, y, hib=True):
        if len(k):
            out[name] = Curve(name, np.asarray(k, float), np.asarray(y, float), hib)

    ds = tables.get("downstream")
    add("downstream_f1", *_mean_curve(ds, run, "f1"))
    add("downstream_ll", *_mean_curve(ds, run, "accuracy_ll"))
    fg = tables.get("forgetting")
    if fg is not None and fg.height and "retention" in fg.columns:
        sub = fg.filter((pl.col("run") == run) & pl.col("retention").is_not_null()).sort("edit")
        add("efficacy", sub["edit"].to_numpy(), sub["retention"].to_numpy())
    else:
        add("efficacy", *_mean_curve(tables.get("history"), run, "es"))
    add("fluency", *_mean_curve(tables.get("generation"), run, "ngram_entropy"))
    k, ppl = _mean_curve(tables.get("perplexity"), run, "perplexity")
    with np.errstate(divide="ignore", invalid="ignore"):
        add("perplexity", k, np.log(ppl), False)
    es = tables.get("edit_scores")
    if es is not None and es.height and "es" in es.columns:
        sub = es.filter((pl.col("run") == run) & pl.col("es").is_not_null()).group_by("edit").agg(pl.col("es").mean()).sort("edit")
        add("proficiency", sub["edit"].to_numpy(), sub["es"].to_numpy())
    return out


def run_norms(tables: Mapping[str, pl.DataFrame], run: str) -> pl.DataFrame | None:
    """Per-edit update norms of a run: edit_index, case_id, update_norm[, outlier].

    From the per-edit edit log (edit_index, update_norm) when it has the run; else from the
    weights table (item = case_id rows, metric update_norm / outlier, the last checkpoint's value);
    there the edit index is the row's edit_index, else the case's edit in the edit_scores table,
    else k.
    """
    log = tables.get("edit_log")
    if log is not None and log.height and "update_norm" in log.columns:
        sub = log.filter((pl.col("run") == run) & pl.col("update_norm").is_not_null())
        if sub.height:
            cols = ["edit_index", "update_norm"] + (["case_id"] if "case_id" in sub.columns else [])
            return sub.select(cols).unique("edit_index", keep="last").sort("edit_index")
    w = tables.get("weights")
    if w is not None and w.height:
        rows = w.filter((pl.col("run") == run) & pl.col("metric").is_in(["update_norm", "outlier"]))
        if rows.filter(pl.col("metric") == "update_norm").height:
            if "edit_index" not in rows.columns:
                rows = rows.with_columns(pl.lit(None, pl.Int64).alias("edit_index"))
            es = tables.get("edit_scores")
            if es is not None and es.height and "case_id" in es.columns:
                m = es.filter(pl.col("run") == run).group_by("case_id").agg(pl.col("edit").min().alias("_edit"))
                rows = rows.join(m, left_on="item", right_on="case_id", how="left")
            else:
                rows = rows.with_columns(pl.lit(None, pl.Int64).alias("_edit"))
            rows = rows.with_columns(pl.coalesce("edit_index", "_edit", "edit").alias("edit_index"))
            wide = (
                rows.group_by(["edit_index", "item", "metric"])
                .agg(pl.col("value").last())
                .pivot(on="metric", index=["edit_index", "item"], values="value")
                .rename({"item": "case_id"})
                .sort("edit_index")
            )
            return wide
    return None


def analyze_run(
    tables: Mapping[str, pl.DataFrame],
    run: str,
    *,
    decision_curves: Sequence[str] = DECISION_CURVES,
    min_agree: int = 1,
    drop_z: float = 4.0,
    norm_z: float = robust.OUTLIER_Z,
    seed: int = 0,
    **onset_kwargs,
) -> RunPhases:
    """Onset per curve, combined onset, and disabling edits of one run."""
    curves = run_curves(tables, run)
    phases = {name: detect_curve(c, seed=seed, **onset_kwargs) for name, c in curves.items()}
    combined = combine_phases(phases.values(), curves=decision_curves, min_agree=min_agree)
    downstream = curves.get("downstream_f1") or curves.get("downstream_ll")
    joint = [c for c in (curves.get("fluency"), downstream, curves.get("efficacy")) if c is not None]
    disabling = detect_disabling_edits(
        joint, run_norms(tables, run), onset_k=combined.onset_k, drop_z=drop_z, norm_z=norm_z
    )
    ks = [float(np.max(c.k)) for c in curves.values() if len(c.k)]
    return RunPhases(run, phases, combined, tuple(disabling), int(max(ks)) if ks else None)


PHASES_SCHEMA = {
    "run": pl.Utf8,
    "curve": pl.Utf8,
    "onset_k": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "collapse_k": pl.Float64,
    "p_value": pl.Float64,
    "delta_bic": pl.Float64,
    "candidate_k": pl.Float64,
    "slope_before": pl.Float64,
    "slope_after": pl.Float64,
    "slope_ratio": pl.Float64,
    "n_points": pl.Int64,
    "k_max": pl.Float64,
    "method": pl.Utf8,
    "accepted": pl.Boolean,
    "reason": pl.Utf8,
    "curves_agreeing": pl.Utf8,
}

DISABLING_SCHEMA = {
    "run": pl.Utf8,
    "edit_index": pl.Int64,
    "case_id": pl.Utf8,
    "k_before": pl.Int64,
    "k_after": pl.Int64,
    "norm_z": pl.Float64,
    "joint_drop": pl.Boolean,
    "norm_outlier": pl.Boolean,
    "reasons": pl.Utf8,
}


def phases_frame(results: Iterable[RunPhases]) -> pl.DataFrame:
    """One row per run and curve, plus a row curve = "combined" with the decision."""
    rows = []
    for r in results:
        for p in r.phases.values():
            rows.append(
                dict(
                    run=r.run,
                    curve=p.curve,
                    onset_k=p.onset_k,
                    ci_low=p.ci_low,
                    ci_high=p.ci_high,
                    collapse_k=p.collapse_k,
                    p_value=p.p_value,
                    delta_bic=p.delta_bic,
                    candidate_k=p.candidate_k,
                    slope_before=p.slope_before,
                    slope_after=p.slope_after,
                    slope_ratio=p.slope_ratio,
                    n_points=p.n_points,
                    k_max=p.k_max,
                    method=p.method,
                    accepted=p.accepted,
                    reason=p.reason,
                    curves_agreeing=None,
                )
            )
        c = r.combined
        rows.append(
            dict(
                run=r.run,
                curve="combined",
                onset_k=c.onset_k,
                ci_low=c.ci_low,
                ci_high=c.ci_high,
                collapse_k=c.collapse_k,
                k_max=float(r.k_max) if r.k_max is not None else None,
                method=METHOD,
                accepted=c.onset_k is not None,
                reason=c.decision + (f"; detected by: {', '.join(c.curves_detected)}" if c.curves_detected else ""),
                curves_agreeing=",".join(c.curves_agreeing),
            )
        )
    return pl.DataFrame(rows, schema=PHASES_SCHEMA)


def disabling_frame(results: Iterable[RunPhases]) -> pl.DataFrame:
    rows = [
        dict(
            run=r.run,
            edit_index=d.edit_index,
            case_id=d.case_id,
            k_before=d.k_before,
            k_after=d.k_after,
            norm_z=d.norm_z,
            joint_drop=any(s.startswith("joint drop") for s in d.reasons),
            norm_outlier=any("outlier" in s for s in d.reasons),
            reasons=" | ".join(d.reasons),
        )
        for r in results
        for d in r.disabling
    ]
    return pl.DataFrame(rows, schema=DISABLING_SCHEMA)


def analyze_runs(tables: Mapping[str, pl.DataFrame], runs: Sequence[str] | None = None, **kwargs) -> list[RunPhases]:
    if runs is None:
        names: set[str] = set()
        for key, df in tables.items():
            if df is not None and "run" in df.columns:
                names.update(df["run"].drop_nulls().unique().to_list())
        runs = sorted(names)
    return [analyze_run(tables, r, **kwargs) for r in runs]
