"""Change-point statistics: the onset of catastrophic forgetting on one curve, and across curves.

The study (Gupta, Rao, Anumanchipalli 2024) describes two phases of sequential editing: a gradual
phase in which earlier edits and downstream ability erode slowly, then an abrupt catastrophic
collapse. This module finds the break between them from a run's curves; the thresholds below are
the fields of `OnsetConfig`. (Disabling edits: editscale.report.disabling; the report tables as
curves: editscale.report.phases.)

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

(b) Early fall -- `detect_early_fall`
-------------------------------------
The reverse shape, which the two-phase reading has no name for: the damage comes first and fast,
then slows (a model's knowledge of the edited domain going within tens of edits, then a plateau).
Same preparation, the plain hinge family (no floor models), the same significance tests (ii) and
the same interval; the steepness criterion mirrored: the first slope points down and is much
steeper than the second, -b1 >= slope_ratio * max(-b2, slope_floor). The break (Phase.onset_k) is
where the fast fall ends; `drop_share` = (fitted level at the start - fitted level at the break)
/ (fitted level at the start - fitted level at the end): the share of the whole drop that came
before the break (above 1 when the curve recovers afterwards). A curve can show both shapes in
turn (an early fall, a plateau, then a collapse); each detector reports its own break.

Combined decision (`combine_phases`, for onsets and early falls alike): among the curves that found an onset (by default
downstream F1, downstream log-likelihood accuracy and history efficacy), the combined onset is the
earliest onset supported by at least `min_agree` curves, where a curve agrees with it when the two
bootstrap intervals overlap or the onsets are within `tol` of the span. The result lists the curves
that detected an onset and those that agree.

Residuals of sequential-edit curves are autocorrelated; the i.i.d. resampling in the BIC, the null
test and the bootstrap treats them as independent, so p-values and intervals are optimistic. The
slope-ratio criterion and the high BIC margin are what keep gradual curves from being flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..config import section_defaults

METHOD = "hinge-bic+supLR"
ONSET, EARLY_FALL = "onset", "early_fall"  # Phase.shape: a faster fall after the break, or before it
_REPORT = section_defaults("report")  # the config's defaults (schema.yaml) of the settings it exposes


@dataclass(frozen=True)
class OnsetConfig:
    """The thresholds and search sizes of `detect_onset` (module docstring, steps 1-4)."""

    slope_ratio: float = _REPORT["slope_ratio"]  # (i) -b2 >= slope_ratio * max(-b1, slope_floor)
    slope_floor: float = 0.25
    min_delta_bic: float = _REPORT["min_delta_bic"]  # (ii) BIC margin over one straight line
    alpha: float = _REPORT["alpha"]  # (ii) level of the sup-LR test
    n_boot: int = 200  # bootstrap replicates of the breakpoint interval
    n_null: int = 199  # curves simulated under the straight-line null
    conf: float = 0.95  # confidence of the breakpoint interval
    grid: int = 160  # candidate breakpoints t
    floor_grid: int = 60  # candidate floor breaks t2
    min_segment: int | None = None  # points on each side of a break (None: max(3, 5% of the points))
    min_points: int = 8  # shorter curves have no onset
    max_points: int = 300  # longer curves are averaged into this many bins
    seed: int = _REPORT["seed"]

    def __post_init__(self):
        if self.n_null > 0 and 1.0 / (self.n_null + 1) > self.alpha:
            raise ValueError(f"n_null = {self.n_null} cannot reach p <= alpha = {self.alpha}; use n_null >= {math.ceil(1 / self.alpha) - 1}")
        if not 0 < self.conf < 1:
            raise ValueError(f"conf must lie in (0, 1), not {self.conf}")


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
    onset_k: float | None = None  # the accepted break (shape "early_fall": where the fast fall ends)
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
    shape: str = ONSET  # ONSET or EARLY_FALL: which detector
    drop_share: float | None = None  # EARLY_FALL: share of the curve's fitted drop before the break

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
    drop_share: float | None = None  # early falls: the anchor curve's Phase.drop_share



# ----------------------------------------------------------------------------------------------
# hinge fit


def clean_curve(k, y) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class _BreakFit:
    """The best break model of one prepared curve (detect_onset / detect_early_fall)."""

    k: np.ndarray  # the cleaned checkpoints, and yo the curve oriented higher-is-better
    yo: np.ndarray
    kb: np.ndarray  # checkpoints after binning; x = (kb - kb[0]) / span
    span: float
    scale: float  # y's standardization: (yo - center) / scale
    center: float
    sign: float
    t_hat: float
    t2_hat: float
    coef: np.ndarray  # a, b1, c of the standardized curve
    fitted: np.ndarray
    delta_bic: float
    p_value: float | None
    ci: tuple[float, float]  # the break's interval, in x units

    @property
    def b1(self) -> float:
        return float(self.coef[1])

    @property
    def b2(self) -> float:
        return float(self.coef[1] + self.coef[2])

    def to_k(self, v: float) -> float:
        return round(float(self.kb[0] + v * self.span), 6)


def _fit_break(k, y, config: OnsetConfig, higher_is_better: bool, floor: bool) -> tuple[dict, _BreakFit | str]:
    """Steps 1, 2, the tests of step 3 (ii) and step 4 of the module docstring, for the hinge family
    with (`floor`) or without the flat-floor models: (the Phase fields every outcome has, the fit or
    why there is none)."""
    k, y = clean_curve(k, y)
    base = dict(n_points=int(len(k)))
    if len(k) == 0:
        return base, "no data"
    base.update(k_min=float(k[0]), k_max=float(k[-1]))
    if len(k) < config.min_points:
        return base, f"too few points ({len(k)} < {config.min_points})"
    sign = 1.0 if higher_is_better else -1.0
    yo = sign * y
    kb, yb = _bin(k, yo, config.max_points)
    n = len(kb)
    span = kb[-1] - kb[0]
    scale = float(np.std(yb))
    if span <= 0:
        return base, "all points at one k"
    if not scale > 1e-12 * max(1.0, float(np.max(np.abs(yb)))):
        return base, "flat curve (zero variance)"
    x = (kb - kb[0]) / span
    center = float(np.median(yb))
    ys = (yb - center) / scale
    m = config.min_segment if config.min_segment is not None else max(3, math.ceil(0.05 * n))
    tt, t2, npar = _models(x, m, config.grid, config.floor_grid if floor else 0)
    if len(tt) == 0:
        return base, f"too few points for two segments of {m}"

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
    sse1 = max(float(((ys - fitted) ** 2).sum()), 1e-300)
    line_fitted, bic0 = _line_fit(x, ys[:, None])
    delta_bic = float(bic0[0]) - (n * math.log(sse1 / n) + npar[i_best] * math.log(n))

    rng = np.random.default_rng(config.seed)
    p_value = None
    if config.n_null > 0:
        res0 = ys - line_fitted[:, 0]
        res0 = res0 - res0.mean()
        ynull = line_fitted[:, :1] + res0[rng.integers(0, n, size=(n, config.n_null))]
        _, bic0_null = _line_fit(x, ynull)
        stat_null = bic0_null - prof.best(ynull)[1]
        p_value = float((1 + np.sum(stat_null >= delta_bic - 1e-9)) / (config.n_null + 1))

    ts = np.unique(tt)
    j = int(np.searchsorted(ts, t_hat))
    local = ts[max(j - 1, 0) : j + 2]
    h = float(np.max(np.diff(local))) if len(local) > 1 else 0.0
    lo, hi = t_hat - h, t_hat + h
    # nor finer than the checkpoints: a break between two observations can lie anywhere between them
    lo = min(lo, float(x[x <= t_hat].max()))
    hi = max(hi, float(x[x > t_hat].min()))
    if config.n_boot > 0:
        res1 = ys - fitted
        res1 = res1 - res1.mean()
        yboot = fitted[:, None] + res1[rng.integers(0, n, size=(n, config.n_boot))]
        t_boot = tt[prof.best(yboot)[0]]
        qlo, qhi = np.quantile(t_boot, [(1 - config.conf) / 2, (1 + config.conf) / 2])
        lo, hi = min(lo, float(qlo)), max(hi, float(qhi))
    return base, _BreakFit(k, yo, kb, float(span), scale, center, sign, t_hat, t2_hat, coef, fitted, float(delta_bic), p_value, (lo, hi))


def _fit_info(fit: _BreakFit, ratio: float) -> dict:
    per_edit = fit.scale / fit.span
    return dict(
        candidate_k=fit.to_k(fit.t_hat),
        slope_before=fit.sign * fit.b1 * per_edit,
        slope_after=fit.sign * fit.b2 * per_edit,
        slope_ratio=float(ratio),
        delta_bic=fit.delta_bic,
        p_value=fit.p_value,
    )


def _rejections(fit: _BreakFit, fall: float, other: float, config: OnsetConfig, why: str) -> tuple[float, list[str]]:
    """Step 3: the slope ratio -fall / max(-other, slope_floor), and why the break is rejected
    (empty when it is accepted): (i) the segment `fall` (b2 for an onset, b1 for an early fall)
    must point down and be slope_ratio times steeper than `other` (`why` says it is not); (ii) it
    must be significant."""
    ratio = -fall / max(-other, config.slope_floor)
    reasons = []
    if not (fall < 0 and fall < other):
        reasons.append(why)
    elif ratio < config.slope_ratio:
        reasons.append(f"slope ratio {ratio:.2f} < {config.slope_ratio}")
    if fit.delta_bic < config.min_delta_bic:
        reasons.append(f"delta BIC {fit.delta_bic:.1f} < {config.min_delta_bic}")
    if fit.p_value is not None and fit.p_value > config.alpha:
        reasons.append(f"sup-LR p = {fit.p_value:.3f} > {config.alpha}")
    return float(ratio), reasons


def _interval(fit: _BreakFit) -> dict:
    return dict(ci_low=max(fit.to_k(fit.ci[0]), float(fit.kb[0])), ci_high=min(fit.to_k(fit.ci[1]), float(fit.kb[-1])))


def detect_onset(k, y, config: OnsetConfig = OnsetConfig(), *, curve: str = "curve", higher_is_better: bool = True) -> Phase:
    """Onset of catastrophic forgetting on one curve by a two-segment hinge fit (module docstring)."""
    base, fit = _fit_break(k, y, config, higher_is_better, floor=True)
    if isinstance(fit, str):
        return Phase(curve=curve, reason=fit, **base)
    b1, b2 = fit.b1, fit.b2
    ratio, reasons = _rejections(fit, b2, b1, config, "second segment does not fall faster than the first")
    info = _fit_info(fit, ratio)
    if reasons:
        return Phase(curve=curve, reason="; ".join(reasons), **base, **info)

    onset_k = fit.to_k(fit.t_hat)
    if np.isfinite(fit.t2_hat):
        collapse_k = fit.to_k(fit.t2_hat)
    else:  # 90% of the drop from the fitted level at the onset to the minimum after it
        k, yo = fit.k, fit.yo
        after = k >= onset_k
        collapse_k = float(k[-1])
        if after.any():
            level0 = (fit.coef[0] + b1 * fit.t_hat) * fit.scale + fit.center
            smooth = _running_median3(yo[after])
            hit = np.nonzero(smooth <= level0 - 0.9 * (level0 - smooth.min()))[0]
            if len(hit):
                collapse_k = float(k[after][hit[0]])
    return Phase(curve=curve, onset_k=onset_k, collapse_k=max(collapse_k, onset_k), reason="accepted", **_interval(fit), **base, **info)


def detect_early_fall(k, y, config: OnsetConfig = OnsetConfig(), *, curve: str = "curve", higher_is_better: bool = True) -> Phase:
    """An early fall on one curve: a fast fall first, then a slower phase (module docstring, (b)).

    The plain hinge family (no floor); accepted when the first segment falls and is at least
    `slope_ratio` times steeper than the second, -b1 >= slope_ratio * max(-b2, slope_floor), and
    the break passes the onset's significance tests. `onset_k` is where the fast fall ends and
    `drop_share` the share of the fitted drop over the whole curve that lies before it."""
    base, fit = _fit_break(k, y, config, higher_is_better, floor=False)
    if isinstance(fit, str):
        return Phase(curve=curve, shape=EARLY_FALL, reason=fit, **base)
    b1, b2 = fit.b1, fit.b2
    ratio, reasons = _rejections(fit, b1, b2, config, "first segment does not fall faster than the second")
    info = _fit_info(fit, ratio)
    total = float(fit.fitted[0] - fit.fitted[-1])
    share = float(-b1 * fit.t_hat) / total if total > 0 else None
    if reasons:
        return Phase(curve=curve, shape=EARLY_FALL, reason="; ".join(reasons), drop_share=share, **base, **info)
    return Phase(curve=curve, shape=EARLY_FALL, onset_k=fit.to_k(fit.t_hat), reason="accepted", drop_share=share, **_interval(fit), **base, **info)


def detect_curve(curve: Curve, config: OnsetConfig = OnsetConfig(), shape: str = ONSET) -> Phase:
    """`detect_onset` or `detect_early_fall` (by `shape`) on one curve."""
    detect = {ONSET: detect_onset, EARLY_FALL: detect_early_fall}[shape]
    return detect(curve.k, curve.y, config, curve=curve.name, higher_is_better=curve.higher_is_better)


def combine_phases(
    phases: Iterable[Phase],
    *,
    curves: Sequence[str] | None = None,
    min_agree: int = 1,
    tol: float = 0.1,
) -> CombinedPhase:
    """Earliest break that at least `min_agree` of the accepted curves support (module docstring);
    the phases are of one shape (onsets, or early falls)."""
    phases = [p for p in phases if curves is None or p.curve in curves]
    what = "early fall" if any(p.shape == EARLY_FALL for p in phases) else "onset"
    detected = sorted((p for p in phases if p.accepted), key=lambda p: p.onset_k)
    names = tuple(p.curve for p in detected)
    if not detected:
        why = "; ".join(f"{p.curve}: {p.reason}" for p in phases)
        return CombinedPhase(None, None, None, None, (), (), f"no curve shows an {what}" + (f" ({why})" if why else ""))
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
                f"earliest {what} ({anchor.curve}) supported by {len(agreeing)} curve(s)",
                anchor.drop_share,
            )
    return CombinedPhase(None, None, None, None, names, (), f"no {what} supported by {min_agree} curves")
