"""The robust z-score, the one definition the weights metric and the phase detector share.

    z_i = (x_i - median(x)) / s,   s = 1.4826 * MAD(x),  MAD = median |x - median(x)|

1.4826 makes the MAD a consistent estimate of the standard deviation for normal data. When more
than half of the values are equal the MAD is 0; s falls back to 1.2533 * mean |x - median(x)| (the
same consistency for the mean absolute deviation), and when that is 0 too (all values equal) to a
tiny positive number, so equal values score 0 and any other value scores as an extreme outlier.
Non-finite values are ignored in s and score NaN.
"""

from __future__ import annotations

import numpy as np

# |z| above which an edit's update norm is an outlier (the weights metric's `outlier_z` and the
# report's `norm_z` default to it)
OUTLIER_Z = 5.0


def robust_scale(r) -> float:
    """s of the module doc for the deviations r (centred on their own median)."""
    r = np.asarray(r, dtype=np.float64)
    r = r[np.isfinite(r)]
    if len(r) == 0:
        return 1.0
    dev = np.abs(r - np.median(r))
    s = 1.4826 * float(np.median(dev))
    if s <= 0:
        s = 1.2533 * float(np.mean(dev))
    if s <= 0:
        s = 1e-12 * max(1.0, float(np.max(np.abs(r))))
    return s


def robust_z(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    if ok.any():
        med = np.median(x[ok])
        z[ok] = (x[ok] - med) / robust_scale(x[ok] - med)
    return z
