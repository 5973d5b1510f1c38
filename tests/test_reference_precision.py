"""The references' own precision as an option (issue 27 item 6): AlphaEdit's null-space projector
by the reference's float32 SVD (`projection_rule: svd32`) and its float32 solve, UltraEdit's float32
solve (`solve_dtype: float32`); editscale's float64 rules stay the default (docs/fidelity.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from editscale import layout
from editscale.edit.alphaedit import AlphaEdit
from editscale.edit.methods import get_method, load_hparams
from editscale.edit.weights import WeightState
from editscale.stats.mom2 import null_space_projection_by_rule

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    {"case_id": 31, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 32, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
]
TEMPLATES = [["{}"], ["The city is large. {}"]]


def _spd(d: int = 96, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    k = g.standard_normal((4 * d, d)) * np.linspace(0.05, 1.0, d)
    return k.T @ k / k.shape[0]


def test_svd32_is_the_reference_rule_and_eigh64_the_float64_one():
    """svd32 = AlphaEdit's get_project on its float32-stored C: torch.linalg.svd, singular values
    below the threshold, U0 U0^T in float32 (here transcribed); eigh64 = the float64 eigenvectors."""
    C = _spd()
    vals = np.linalg.eigvalsh(C)
    t = float(vals[57] + vals[58]) / 2  # between two eigenvalues: no rounding decides the rank
    P32, spectrum, rank = null_space_projection_by_rule(C, t, "svd32")
    U, S, _ = torch.linalg.svd(torch.from_numpy(C).float(), full_matrices=False)
    idx = (S < t).nonzero(as_tuple=True)[0]
    assert np.array_equal(P32, (U[:, idx] @ U[:, idx].T).double().numpy()) and rank == idx.numel()
    assert np.all(np.diff(spectrum) >= 0)
    P64, _, rank64 = null_space_projection_by_rule(C, t, "eigh64")
    vals, vecs = np.linalg.eigh(C)
    U0 = vecs[:, vals < t]
    assert rank64 == U0.shape[1] and np.allclose(P64, U0 @ U0.T, atol=1e-10)
    # in a spectral gap the two rules select the same subspace, up to float32 rounding
    assert np.linalg.norm(P64 - P32) / np.linalg.norm(P64) < 1e-5


def test_unknown_rule_is_named():
    from editscale.io import EditscaleError

    with pytest.raises(EditscaleError, match="projection_rule must be one of"):
        null_space_projection_by_rule(_spd(), 0.1, "svd64")


def test_alphaedit_reference_precision_is_close_and_routed_to_its_own_files(second_moment, tiny_lm):
    model, tok = tiny_lm("gpt2")
    hp = load_hparams(ROOT / "config/hparams/alphaedit/tiny.yaml", method="alphaedit")
    hp["v_num_grad_steps"] = 4
    mods = AlphaEdit.modules(model, hp)
    stats = {m: second_moment(model, tok, m) for m in mods}
    deltas = {}
    for rule, solve in (("eigh64", "float64"), ("svd32", "float32")):
        m_copy, _ = tiny_lm("gpt2")
        weights = WeightState(m_copy, mods)
        AlphaEdit(m_copy, tok, {**hp, "projection_rule": rule, "solve_dtype": solve}, stats, TEMPLATES).apply(CASES, weights)
        deltas[rule] = weights.delta
    rel = max(float((deltas["svd32"][m] - deltas["eigh64"][m]).norm() / deltas["eigh64"][m].norm()) for m in mods)
    assert 0 < rel < 1e-2  # the same method; the float32 rounding of C, P and the solve
    assert AlphaEdit.precomputed({**hp, "projection_rule": "svd32"}) == {"nullspace": {"threshold": hp["nullspace_threshold"], "rule": "svd32"}}
    assert layout.projection_path("m", "c", "x", 0.02).parent.name == "nullspace"
    assert layout.projection_path("m", "c", "x", 0.02, "svd32").parent.name == "nullspace-svd32"


def test_ultraedit_float32_solve_is_close(tiny_lm):
    from benchmarks.device_check import edit_cases

    hp = load_hparams(ROOT / "config/hparams/ultraedit/tiny.yaml", method="ultraedit")
    cls = get_method("ultraedit", hp)
    cases = edit_cases(4)
    deltas = {}
    for dt in ("float64", "float32"):
        model, tok = tiny_lm("gpt2")
        mods = cls.modules(model, hp)
        weights = WeightState(model, mods)
        cls(model, tok, {**hp, "solve_dtype": dt}, {}, [["{}"]]).apply(cases, weights)
        deltas[dt] = weights.delta
    rel = max(float((deltas["float32"][m] - deltas["float64"][m]).norm() / deltas["float64"][m].norm()) for m in deltas["float64"])
    assert 0 < rel < 1e-3


@pytest.mark.workflow
def test_svd32_projection_is_planned_apart(repo_root, tmp_path):
    """A run with the reference's rule reads nullspace-svd32/ files, made by the nullspace rule with
    --rule svd32; the default rule's files are untouched."""
    from benchmarks.snakemake_runs import copy_workflow, planned_outputs, set_config, snakemake

    workdir = copy_workflow(repo_root, tmp_path / "wf")

    def edit(cfg):
        cfg["runs"][0].update(name="alphaedit-tiny", method="alphaedit", hparams="config/hparams/alphaedit/tiny.yaml",
                              hparams_overrides={"projection_rule": "svd32"})

    set_config(workdir, edit)
    res = snakemake(workdir, "-n", "-p")
    outs = planned_outputs(res)
    assert any("/nullspace-svd32/" in o for o in outs) and not any("/nullspace/" in o for o in outs)
    assert "--rule svd32" in res.stdout + res.stderr
