"""Forgetting-phase detection on synthetic curves with known structure."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from editscale.report.changepoint import EARLY_FALL, Curve, OnsetConfig, Phase, combine_phases, detect_curve, detect_early_fall, detect_onset
from editscale.report.disabling import DisablingConfig, detect_disabling_edits, joint_drops, norm_outlier_z

K = np.arange(0, 1001, 10, dtype=float)


def flat_then_drop(seed: int, onset: float = 600.0, noise: float = 0.02) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = np.where(K < onset, 0.8, 0.8 - (K - onset) / (K[-1] - onset) * 0.7)
    return y + rng.normal(0, noise, len(K))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_onset_flat_then_steep_drop(seed):
    p = detect_onset(K, flat_then_drop(seed), OnsetConfig(seed=seed), curve="downstream_f1")
    assert p.accepted, p.reason
    assert abs(p.onset_k - 600) <= 0.05 * 600
    assert p.ci_low <= 600 <= p.ci_high
    assert p.ci_low <= p.onset_k <= p.ci_high
    assert p.delta_bic > 10 and p.p_value <= 0.01
    assert p.slope_after < 0 and abs(p.slope_after) > 3 * abs(p.slope_before)
    assert p.curve == "downstream_f1" and p.method
    assert p.collapse_k >= p.onset_k


def test_onset_gradual_phase_then_collapse_to_floor():
    rng = np.random.default_rng(5)
    # gradual decline, abrupt fall at 450 over 30 edits, then a floor near zero
    y = 0.8 - 0.0002 * K
    y = np.where(K >= 450, np.maximum(0.05, y - (K - 450) / 30 * 0.7), y) + rng.normal(0, 0.01, len(K))
    p = detect_onset(K, y, OnsetConfig(seed=1))
    assert p.accepted, p.reason
    assert abs(p.onset_k - 450) <= 0.05 * 450
    assert p.ci_low <= 450 <= p.ci_high
    assert 450 <= p.collapse_k <= 520


def test_onset_on_curve_where_higher_is_worse():
    rng = np.random.default_rng(3)
    logppl = np.where(K < 300, 3.0, 3.0 + (K - 300) / 100) + rng.normal(0, 0.03, len(K))
    p = detect_onset(K, logppl, higher_is_better=False, curve="perplexity")
    assert p.accepted, p.reason
    assert abs(p.onset_k - 300) <= 15
    assert p.slope_after > 0  # reported in the curve's own orientation


def test_onset_on_long_binary_curve_is_binned():
    rng = np.random.default_rng(4)
    k = np.arange(1, 4001, dtype=float)
    y = (rng.random(len(k)) < np.where(k < 2500, 0.95, 0.15)).astype(float)
    p = detect_onset(k, y, OnsetConfig(max_points=200))
    assert p.accepted, p.reason
    assert abs(p.onset_k - 2500) <= 0.05 * 2500
    assert p.n_points == 4000


@pytest.mark.parametrize("seed", range(6))
def test_no_onset_on_gentle_linear_decline(seed):
    rng = np.random.default_rng(100 + seed)
    y = 0.8 - 0.0003 * K + rng.normal(0, 0.02, len(K))
    p = detect_onset(K, y, OnsetConfig(seed=seed))
    assert p.onset_k is None and not p.accepted
    assert p.candidate_k is not None and p.reason != "accepted"


@pytest.mark.parametrize("seed", range(6))
def test_no_onset_on_pure_noise(seed):
    rng = np.random.default_rng(200 + seed)
    p = detect_onset(K, 0.5 + rng.normal(0, 0.05, len(K)), OnsetConfig(seed=seed))
    assert p.onset_k is None


def test_no_onset_on_flat_or_short_curves():
    assert detect_onset(K, np.full(len(K), 0.3)).onset_k is None
    short = detect_onset([0, 1, 2], [1.0, 0.5, 0.0])
    assert short.onset_k is None and "too few" in short.reason
    assert detect_onset([], []).reason == "no data"
    nan = flat_then_drop(0)
    nan[::7] = np.nan  # missing checkpoints are dropped, not fatal
    assert detect_onset(K, nan).accepted


def test_onset_is_deterministic_and_checks_alpha():
    y = flat_then_drop(7)
    a, b = detect_onset(K, y, OnsetConfig(seed=3)), detect_onset(K, y, OnsetConfig(seed=3))
    assert a == b
    with pytest.raises(ValueError):
        OnsetConfig(n_null=20, alpha=0.01)


# ---------------------------------------------------------------------------------------------
# early falls: the damage first and fast, then a slower phase


def fast_then_flat(seed: int, end: float = 100.0, noise: float = 0.02) -> np.ndarray:
    """0.9 falling to 0.4 by `end`, then declining by only 0.05 over the rest."""
    rng = np.random.default_rng(seed)
    y = np.where(K < end, 0.9 - 0.5 * K / end, 0.4 - 0.05 * (K - end) / (K[-1] - end))
    return y + rng.normal(0, noise, len(K))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_early_fall_found_where_the_fast_fall_ends_and_no_onset_there(seed):
    y = fast_then_flat(seed)
    p = detect_early_fall(K, y, OnsetConfig(seed=seed), curve="downstream_f1")
    assert p.accepted, p.reason
    assert p.shape == EARLY_FALL and p.curve == "downstream_f1"
    assert abs(p.onset_k - 100) <= 10 and p.ci_low <= 100 <= p.ci_high
    assert p.delta_bic > 10 and p.p_value <= 0.01
    assert p.slope_before < 0 and abs(p.slope_before) > 3 * abs(p.slope_after)
    assert p.drop_share == pytest.approx(0.5 / 0.55, abs=0.05)  # the fall before 100 of the whole drop
    # the paper's onset detector does not read this shape as a collapse
    assert not detect_onset(K, y, OnsetConfig(seed=seed)).accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_early_fall_on_the_papers_shape_gradual_then_collapse(seed):
    y = flat_then_drop(seed)
    assert detect_onset(K, y, OnsetConfig(seed=seed)).accepted
    p = detect_early_fall(K, y, OnsetConfig(seed=seed))
    assert not p.accepted and "first segment does not fall faster" in p.reason


@pytest.mark.parametrize("seed", range(4))
def test_no_early_fall_on_linear_decline_or_noise(seed):
    rng = np.random.default_rng(300 + seed)
    assert not detect_early_fall(K, 0.8 - 0.0003 * K + rng.normal(0, 0.02, len(K)), OnsetConfig(seed=seed)).accepted
    assert not detect_early_fall(K, 0.5 + rng.normal(0, 0.05, len(K)), OnsetConfig(seed=seed)).accepted


def test_early_fall_drop_share_is_exact_on_a_noiseless_hinge_and_oriented():
    # 1.0 -> 0.4 by 200, then 0.4 -> 0.2 by 1,000: three quarters of the drop before the break
    y = np.where(K <= 200, 1.0 - 0.6 * K / 200, 0.4 - 0.2 * (K - 200) / 800)
    p = detect_early_fall(K, y, OnsetConfig(n_null=0, n_boot=0, min_delta_bic=0))
    assert p.accepted and p.onset_k == pytest.approx(200, abs=1e-6)
    assert p.drop_share == pytest.approx(0.75, abs=1e-9)
    # perplexity-like: a fast early rise, read with higher-is-worse, is the same early fall
    q = detect_curve(Curve("perplexity", K, 30 + 10 * (1.0 - y), higher_is_better=False), OnsetConfig(n_null=0, n_boot=0, min_delta_bic=0), EARLY_FALL)
    assert q.accepted and q.onset_k == pytest.approx(200, abs=1e-6) and q.slope_before > 0


def test_early_fall_on_a_log_spaced_grid():
    # the long study's checkpoints: the geography probes' shape, gone within 50 edits, then a plateau
    k = np.array([0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000], dtype=float)
    y = np.array([0.65, 0.50, 0.30, 0.04, 0.00, 0.01, 0.02, 0.00, 0.01, 0.00, 0.01])
    p = detect_early_fall(k, y, OnsetConfig(seed=0))
    assert p.accepted, p.reason
    assert 20 <= p.onset_k <= 100 and p.ci_low <= 50 <= p.ci_high
    assert p.drop_share > 0.9


def test_combined_early_fall_names_its_shape():
    falls = [
        Phase(curve="downstream_f1", onset_k=150, ci_low=35, ci_high=350, k_min=0, k_max=10000, reason="accepted", shape=EARLY_FALL, drop_share=0.46),
        Phase(curve="efficacy", k_min=0, k_max=10000, reason="delta BIC 8.2 < 10.0", shape=EARLY_FALL),
    ]
    c = combine_phases(falls)
    assert c.onset_k == 150 and c.drop_share == 0.46 and c.curves_agreeing == ("downstream_f1",)
    assert c.decision.startswith("earliest early fall (downstream_f1)")
    none = combine_phases(falls[1:])
    assert none.onset_k is None and none.decision.startswith("no curve shows an early fall")


def _phase(curve, onset, lo, hi):
    return Phase(curve=curve, onset_k=onset, ci_low=lo, ci_high=hi, collapse_k=hi, k_min=0, k_max=1000, reason="accepted")


def test_combine_phases_earliest_and_agreement():
    ps = [
        _phase("efficacy", 610, 590, 630),
        _phase("downstream_f1", 600, 580, 620),
        _phase("downstream_ll", 900, 880, 920),
        Phase(curve="fluency", k_min=0, k_max=1000, reason="rejected"),
    ]
    c = combine_phases(ps)
    assert c.onset_k == 600
    assert set(c.curves_agreeing) == {"downstream_f1", "efficacy"}
    assert set(c.curves_detected) == {"downstream_f1", "efficacy", "downstream_ll"}
    # a lone early curve is skipped when two curves must agree
    ps2 = [_phase("downstream_f1", 200, 190, 210), _phase("efficacy", 610, 590, 630), _phase("downstream_ll", 620, 600, 640)]
    assert combine_phases(ps2, min_agree=1).onset_k == 200
    assert combine_phases(ps2, min_agree=2).onset_k == 610
    assert combine_phases(ps2, min_agree=4).onset_k is None
    none = combine_phases([Phase(curve="efficacy", k_min=0, k_max=10)])
    assert none.onset_k is None and none.curves_detected == ()
    # restricting to decision curves ignores the others
    assert combine_phases(ps2, curves=["efficacy"]).onset_k == 610


# ---------------------------------------------------------------------------------------------
# disabling edits

CK = np.arange(0, 1001, 10)
EDITS = np.arange(1, 1001)


def _curves(seed: int, drop_at: int | None = None, which=("fluency", "downstream_f1", "efficacy")):
    rng = np.random.default_rng(seed)
    out = []
    for name, level, slope in (("fluency", 6.0, -2e-4), ("downstream_f1", 0.7, -1e-4), ("efficacy", 0.9, -3e-4)):
        y = level + slope * CK + rng.normal(0, 0.002 * level, len(CK))
        if drop_at is not None and name in which:
            y = np.where(CK >= drop_at, y - 0.3 * level, y)
        out.append(Curve(name, CK.astype(float), y))
    return out


def _norms(seed: int, outlier_at: int | None = None, factor: float = 50.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    v = (1 + EDITS / 300) * np.exp(rng.normal(0, 0.1, len(EDITS)))  # norms grow along the chain
    if outlier_at is not None:
        v[outlier_at - 1] *= factor
    return pl.DataFrame({"edit_index": EDITS, "update_norm": v, "case_id": [f"case{j}" for j in EDITS]})


def test_disabling_edits_clean_data_has_none():
    for seed in range(3):
        assert detect_disabling_edits(_curves(seed), _norms(seed)) == []
    z = norm_outlier_z(EDITS, _norms(0)["update_norm"].to_numpy())
    assert z.max() < 6  # the growth trend alone is not an outlier


def test_disabling_edits_planted_joint_drop():
    found = detect_disabling_edits(_curves(1, drop_at=510))
    assert [d.edit_index for d in found] == [510]
    d = found[0]
    assert (d.k_before, d.k_after) == (500, 510)
    assert set(d.drop_z) == {"fluency", "downstream_f1", "efficacy"}
    assert min(d.drop_z.values()) > 4
    assert d.joint_drop and not d.norm_outlier and not d.metric_flag
    assert "joint drop" in d.reasons[0]


def test_joint_drop_needs_all_curves():
    assert detect_disabling_edits(_curves(2, drop_at=510, which=("downstream_f1", "efficacy"))) == []
    assert joint_drops(_curves(2, drop_at=510, which=("efficacy",))) == []


def test_disabling_edits_planted_norm_outlier():
    found = detect_disabling_edits(_curves(3), _norms(3, outlier_at=300))
    assert [d.edit_index for d in found] == [300]
    assert found[0].norm_z > 6 and found[0].case_id == "case300"
    assert found[0].norm_outlier and not found[0].joint_drop
    assert "update-norm outlier" in found[0].reasons[0]


def test_disabling_edit_joint_drop_attributed_to_norm_outlier_in_window():
    found = detect_disabling_edits(_curves(4, drop_at=510), _norms(4, outlier_at=505), onset_k=500)
    assert [d.edit_index for d in found] == [505]
    reasons = " ".join(found[0].reasons)
    assert "update-norm outlier" in reasons and "joint drop" in reasons
    assert (found[0].k_before, found[0].k_after) == (500, 510)


def test_weights_outlier_flag_is_reported():
    norms = _norms(5).with_columns(pl.Series("outlier", [1.0 if j == 42 else 0.0 for j in EDITS]))
    assert detect_disabling_edits(_curves(5), norms) == []  # not a criterion by default
    found = detect_disabling_edits(_curves(5), norms, DisablingConfig(use_metric_flag=True))
    assert [d.edit_index for d in found] == [42]
    assert found[0].metric_flag and not found[0].norm_outlier
    assert "weights metric" in found[0].reasons[0]


def test_joint_drop_on_different_checkpoint_grids():
    rng = np.random.default_rng(8)
    curves = []
    for name, every in (("fluency", 10), ("downstream_f1", 20), ("efficacy", 25)):
        k = np.arange(0, 1001, every, dtype=float)
        y = 0.8 - 1e-4 * k + rng.normal(0, 0.002, len(k))
        curves.append(Curve(name, k, np.where(k >= 510, y - 0.3, y)))
    # fluency sees it in (500, 510], downstream in (500, 520], efficacy in (500, 525]
    assert [(a, b) for a, b, _ in joint_drops(curves)] == [(500, 510)]
    found = detect_disabling_edits(curves, _norms(8, outlier_at=507))
    assert [d.edit_index for d in found] == [507]
    assert "joint drop" in " ".join(found[0].reasons) and "update-norm outlier" in " ".join(found[0].reasons)
    # a curve with fewer than 4 checkpoints: no joint criterion
    short = Curve("efficacy", np.array([0.0, 500, 1000]), np.array([0.9, 0.8, 0.1]))
    assert joint_drops([curves[0], short]) == []


# ---------------------------------------------------------------------------------------------
# each task's own curve


def test_a_task_that_falls_alone_is_read_on_its_own_curve_and_not_combined():
    from editscale.report.phases import analyze_run, item_curves, phases_frame

    rng = np.random.default_rng(9)
    ks = np.arange(0, 301, 10)
    rows = []
    for task in ("capital", "copy", "count"):
        for k in ks:
            level = (0.9 - 0.8 * min(k, 40) / 40) if task == "capital" else 0.8
            for metric in ("f1", "accuracy_ll"):
                rows.append(dict(run="r", edit=int(k), item=task, metric=metric, value=float(level + rng.normal(0, 0.01))))
    tables = {"downstream": pl.DataFrame(rows)}
    curves = item_curves(tables, "r")
    assert set(curves) == {f"{c}[{t}]" for c in ("downstream_f1", "downstream_ll") for t in ("capital", "copy", "count")}
    assert curves["downstream_f1[capital]"].k.tolist() == ks.tolist()
    rp = analyze_run(tables, "r")
    fall = rp.early_falls["downstream_f1[capital]"]
    assert fall.accepted and abs(fall.onset_k - 40) <= 10 and fall.drop_share == pytest.approx(1.0, abs=0.05)
    assert not rp.early_falls["downstream_f1[copy]"].accepted and not rp.phases["downstream_f1[capital]"].accepted
    # the tasks' curves are read, not decision curves: the combined decisions come from the means
    assert all("[" not in c for c in rp.early_fall.curves_detected + rp.combined.curves_detected)
    df = phases_frame([rp])
    assert df.filter((pl.col("curve") == "downstream_ll[capital]") & (pl.col("shape") == "early_fall"))["accepted"].to_list() == [True]
    # the summary names it as the first task to fall
    from editscale.report.tables import first_item_fall

    first = first_item_fall(rp)
    assert first["first_to_fall_curve"] in ("downstream_f1[capital]", "downstream_ll[capital]")
    assert first["first_to_fall_shape"] == "early_fall" and abs(first["first_to_fall_k"] - 40) <= 10
    assert first["first_to_fall"] == f"{first['first_to_fall_curve']}: early fall until {int(round(first['first_to_fall_k']))}"


def test_the_first_task_to_fall_ranks_early_falls_before_onsets_then_by_edit():
    """An early fall's task was falling from the first edit, so it fell before a task whose faster
    fall only starts later (an onset), even at a later break; among one shape, the earlier break.
    Mean curves (no [task]) are not tasks."""
    from editscale.report.changepoint import EARLY_FALL, ONSET, CombinedPhase, Phase
    from editscale.report.phases import RunPhases
    from editscale.report.tables import first_item_fall

    none = CombinedPhase(None, None, None, None, (), (), "none")

    def run(onsets, falls):
        return RunPhases("r", {c: Phase(c, onset_k=k, shape=ONSET) for c, k in onsets.items()}, none, (), 1000,
                         {c: Phase(c, onset_k=k, shape=EARLY_FALL) for c, k in falls.items()}, none)

    both = run({"downstream_f1[copy]": 100, "downstream_f1": 20}, {"downstream_f1[antonym]": 750, "downstream_f1[capital]": 150})
    assert first_item_fall(both) == {"first_to_fall": "downstream_f1[capital]: early fall until 150", "first_to_fall_k": 150,
                                     "first_to_fall_curve": "downstream_f1[capital]", "first_to_fall_shape": "early_fall"}
    onsets = run({"downstream_ll[copy]": 1000, "downstream_ll[count]": 500, "perplexity": 10}, {"downstream_f1": 5})
    assert first_item_fall(onsets)["first_to_fall"] == "downstream_ll[count]: onset at 500"
    assert first_item_fall(run({"perplexity": 10}, {"downstream_f1": 5}))["first_to_fall"] == "none"
    assert first_item_fall(None)["first_to_fall"] == "phases not computed"
