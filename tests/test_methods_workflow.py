"""Every editing method through the real workflow: config/test-methods-tiny.yaml with snakemake.

One sequential run per method (rome, r-rome, memit, emmet, alphaedit, encore, nas, rect, prune, ultraedit, ft-c, sphere, grace,
wise, lyaplock, memoir: 4 edits, in segments
of 2 for the methods whose state carries over) and one batched MEMIT run (2 edits per step) on a tiny random GPT-2, run to completion once
(module-scoped); the tests then read what each run wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from editscale.edit.chain import read_delta, read_factors, read_memory, tensor_sha256
from benchmarks.snakemake_runs import copy_workflow, planned_jobs, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

CONFIG = "config/test-methods-tiny.yaml"
METHODS = ["rome", "r-rome", "memit", "emmet", "alphaedit", "encore", "nas", "rect", "prune", "ultraedit", "ft-c", "sphere", "grace", "wise", "lyaplock", "memoir"]
N_EDITS, SEGMENT = 4, 2
# the methods with state carried from segment to segment run in two segments; the others in one
SEGMENTED = {"alphaedit", "encore", "nas", "sphere", "lyaplock", "ultraedit", "prune", "grace", "wise", "memoir"}


@pytest.fixture(scope="module")
def study(repo_root, tmp_path_factory):
    workdir = copy_workflow(repo_root, tmp_path_factory.mktemp("methods") / "wf")
    snakemake(workdir, config=CONFIG, timeout=3600)
    return workdir


@pytest.fixture(scope="module")
def runs(repo_root):
    return {r["name"]: r for r in yaml.safe_load((repo_root / CONFIG).read_text())["runs"]}


def _factors(workdir: Path, run: str):
    """(updates, rows, method_state) of every segment of the run, in order."""
    updates, rows, state = [], [], {}
    segment = json.loads((workdir / "results" / run / "run.json").read_text())["segment"]
    for k in range(segment, N_EDITS + 1, segment):
        u, r, s, attrs = read_factors(workdir / "results" / run / "factors" / f"{k:06d}.h5")
        assert attrs["k"] == k and attrs["segment"] == segment
        updates += u
        rows += r
        state = s
    return updates, rows, state


def test_config_has_one_run_per_method_and_a_batched_run(runs):
    assert sorted({r["method"] for r in runs.values()}) == sorted(METHODS)
    for r in runs.values():
        assert r["n_edits"] == N_EDITS and r["segment"] == (SEGMENT if r["method"] in SEGMENTED else N_EDITS), r["name"]
        assert r["hparams"] == f"config/hparams/{r['method']}/tiny.yaml"
    batched = [r for r in runs.values() if r.get("edits_per_step", 1) > 1]
    assert [(r["method"], r["edits_per_step"]) for r in batched] == [("memit", 2)]


def test_every_run_completes_its_chain(study, runs):
    for name, run in runs.items():
        resolved = json.loads((study / "results" / name / "run.json").read_text())
        assert resolved["method"] == run["method"]
        delta, attrs = read_delta(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
        assert attrs["k"] == N_EDITS and attrs["method"] == run["method"], name
        updates, rows, _ = _factors(study, name)
        assert len(rows) == N_EDITS, (name, rows)
        assert [r["edit_index"] for r in rows] == [1, 2, 3, 4], name
        assert {u.module for _, u in updates} == set(delta), name
        if run["method"] == "grace":  # no weight moves: the codebook holds one row per new prompt
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert not delta and len(memory["transformer.h.2.mlp.c_proj/keys"]) == N_EDITS, name
            assert all(r["seconds"] > 0 and r["grace_keys"] >= 1 for r in rows), name
            continue
        if run["method"] == "wise":  # no weight moves: the side weight and, every 2 edits, a shard (merged every 4)
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert not delta and memory["transformer.h.2.mlp.c_proj/active"].tolist() == [1, 1, 0], name
            assert [r["wise_shards"] for r in rows] == [0, 1, 1, 1] and all(r["seconds"] > 0 for r in rows), name
            continue
        if run["method"] == "memoir":  # no weight moves: W_r, one mask per edit (distinct prompts), the constants
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert not delta and len(memory["transformer.h.2.mlp.c_proj/masks"]) == [r["memoir_masks"] for r in rows][-1] >= 2, name
            assert all(r["seconds"] > 0 for r in rows), name
            continue
        assert delta and all(t.abs().sum() > 0 for t in delta.values()), name  # the weights really moved
        assert all(r["update_norm"] > 0 and r["seconds"] > 0 for r in rows), name
    assert (study / "results/studies/test-methods-tiny/audit.json").exists()
    assert json.loads((study / "results/studies/test-methods-tiny/audit.json").read_text())["passed"]
    assert planned_jobs(snakemake(study, "-n", config=CONFIG)) == {}


def test_update_kinds_per_method(study, runs):
    for name, run in runs.items():
        updates, rows, state = _factors(study, name)
        kinds = {r["factor_kind"] for r in rows}
        if run["method"] in ("ft-c", "lyaplock"):
            assert kinds == {"dense"} and all(u.kind == "dense" and u.dense is not None for _, u in updates), name
        elif run["method"] == "grace":  # no weight update: the codebook grows, in the delta files, its ops in the factors
            assert kinds == {"memory"} and not updates, name
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert sorted(memory) == [f"transformer.h.2.mlp.c_proj/{f}" for f in ("keys", "labels", "radii", "values")]
            assert memory["transformer.h.2.mlp.c_proj/keys"].shape == (N_EDITS, 256), {k: v.shape for k, v in memory.items()}
            continue
        elif run["method"] == "wise":  # the side weight (Conv1D's (in, out)) after each edit, in the factors
            assert kinds == {"memory"} and not updates, name
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert memory["transformer.h.2.mlp.c_proj/weights"].shape == (3, 256, 64), {k: v.shape for k, v in memory.items()}
            continue
        elif run["method"] == "memoir":  # W_r in the math orientation (out, in), a mask per input feature
            assert kinds == {"memory"} and not updates, name
            memory = read_memory(study / "results" / name / "deltas" / f"{N_EDITS:06d}.h5")
            assert memory["transformer.h.2.mlp.c_proj/weights"].shape == (1, 64, 256), {k: v.shape for k, v in memory.items()}
            assert memory["transformer.h.2.mlp.c_proj/masks"].sum(axis=1).tolist() == [32] * len(memory["transformer.h.2.mlp.c_proj/masks"])
            continue
        elif run["method"] == "rect":
            assert kinds == {"masked"} and all(u.kind == "masked" and u.mask is not None for _, u in updates), name
        else:
            assert kinds == {"lowrank"} and all(u.kind == "lowrank" for _, u in updates), name
        modules = sorted({u.module for _, u in updates})
        if run["method"] in ("rome", "r-rome", "emmet"):
            # one rank-one update of layer 1 per edit
            assert modules == ["transformer.h.1.mlp.c_proj"] and len(updates) == N_EDITS, name
            assert all(u.u.shape[1] == 1 and u.v.shape[1] == 1 for _, u in updates), name
        elif run["method"] in ("memit", "alphaedit", "encore", "nas", "rect", "prune", "sphere", "lyaplock"):
            assert modules == ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"], name
        elif run["method"] == "ft-c":
            assert modules == ["transformer.h.0.mlp.c_proj"], name
        elif run["method"] == "ultraedit":  # the MLP input matrices, one update per edit each
            assert modules == ["transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"] and len(updates) == 2 * N_EDITS, name
            assert {k.split("/")[0] for k in state} == {"normalizer"}, sorted(state)
        if run["method"] == "lyaplock":  # the earlier edits' sums and the virtual queue, per layer
            assert {k.rsplit("/", 1)[1] for k in state if "/" in k} == {"S_kk", "S_vk", "Z", "a", "D_base"}, sorted(state)
        if run["method"] in ("alphaedit", "encore", "nas", "sphere"):
            # the keys of earlier edits are carried from segment to segment (and NAS's anchor)
            keys = {k: v for k, v in state.items() if k.endswith("/keys")}
            assert set(k.rsplit("/", 1)[0] for k in keys) == set(modules)
            assert all(v.shape == (N_EDITS, 256) for v in keys.values()), {k: v.shape for k, v in keys.items()}
            assert set(state) - set(keys) == ({"nas/anchor_norm"} if run["method"] == "nas" else set()), sorted(state)
    # r-ROME differs from ROME only by the template-averaged key, and that changes the update.
    rr = json.loads((study / "results/r-rome-tiny/run.json").read_text())["hparams"]
    assert rr["key_averaging"] == "templates"
    assert json.loads((study / "results/rome-tiny/run.json").read_text())["hparams"]["key_averaging"] == "prompt"
    h = {n: {m: tensor_sha256(t) for m, t in read_delta(study / f"results/{n}/deltas/000004.h5")[0].items()}
         for n in ("rome-tiny", "r-rome-tiny")}
    assert h["rome-tiny"] != h["r-rome-tiny"]


def test_doctor_counts_every_methods_state_byte_for_byte(study):
    """The method state each factors file carries (AlphaEdit's keys, LyapLock's sums and queue,
    UltraEdit's normalizer, ...) is what `editscale doctor`'s storage estimate counts for it."""
    from editscale.doctor import doctor

    report = doctor(study / CONFIG, bench=False, storage_only=True, root=study)
    counted = {est["run"]: est["storage"]["state_per_checkpoint"] for est in report["runs"]}
    stored = {name: sum(v.nbytes for v in _factors(study, name)[2].values()) for name in counted}
    # PRUNE's correction has as many directions as singular values above sigma_max(W0): a bound, min(k, d)
    assert 0 < stored.pop("prune-tiny") <= counted.pop("prune-tiny") == 4 * N_EDITS * (64 + 256) * 2
    assert counted == stored
    assert stored["lyaplock-tiny"] > stored["alphaedit-tiny"] > stored["rome-tiny"] == 0, stored


def test_batched_run_has_two_edits_per_step(study):
    updates, rows, _ = _factors(study, "memit-batch2-tiny")
    by_step: dict[int, list[int]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["edit_index"])
    assert by_step == {1: [1, 2], 2: [3, 4]}
    # one update per layer per step (not per edit), each with two factor columns (two keys)
    assert sorted((step, u.module) for step, u in updates) == [
        (s, f"transformer.h.{layer}.mlp.c_proj") for s in (1, 2) for layer in (1, 2)]
    assert all(u.u.shape[1] == 2 and u.v.shape[1] == 2 for _, u in updates)
    # the two edits of a step share that step's update: same norm and time in the log
    for step in by_step:
        step_rows = [r for r in rows if r["step"] == step]
        assert len({r["update_norm"] for r in step_rows}) == 1
    seq_updates, seq_rows, _ = _factors(study, "memit-tiny")
    assert sorted({r["step"] for r in seq_rows}) == [1, 2, 3, 4]
    assert len(seq_updates) == 2 * N_EDITS  # sequential: one update per layer per edit


def test_tables_have_every_run(study, runs):
    scores = pl.read_parquet(study / "results/studies/test-methods-tiny/tables/edit_scores.parquet")
    assert sorted(scores["run"].unique().to_list()) == sorted(runs)
    for name, run in runs.items():
        sub = scores.filter(pl.col("run") == name)
        assert sorted(sub["edit"].to_list()) == [1, 2, 3, 4], name
        assert sub["method"].unique().to_list() == [run["method"]]
        assert sub["es"].is_between(0, 1).all(), name
    summary = pl.read_csv(study / "results/studies/test-methods-tiny/tables/summary.csv")
    assert sorted(summary["run"].to_list()) == sorted(runs)
    for metric in ("history", "downstream", "generation", "perplexity", "weights"):
        table = pl.read_parquet(study / f"results/studies/test-methods-tiny/tables/{metric}.parquet")
        assert sorted(table["run"].unique().to_list()) == sorted(runs), metric
        # eval_every 1000: the metrics are evaluated at edit 0 and at n_edits only (history has
        # no rows at 0: no earlier edit to re-score)
        edits = set(table["edit"].unique().to_list())
        assert N_EDITS in edits and edits <= {0, N_EDITS}, (metric, edits)
    log = pl.read_parquet(study / "results/studies/test-methods-tiny/tables/edit_log.parquet")
    kinds = {r["run"]: r["factor_kind"] for r in log.select("run", "factor_kind").unique().to_dicts()}
    assert len(log) == N_EDITS * len(runs)
    assert kinds == {name: {"ft-c": "dense", "lyaplock": "dense", "rect": "masked", "grace": "memory", "wise": "memory", "memoir": "memory"}.get(run["method"], "lowrank") for name, run in runs.items()}
    # what each method measures per edit reaches the edit_log table (not only the chain's columns)
    measured = {"rome": "key_dot_u", "r-rome": "residual_norm", "memit": "z_error_after", "emmet": "constraint_rel_residual",
                "ft-c": "loss_before", "alphaedit": "n_keys_stored", "encore": "n_keys_stored",
                "rect": "rect_kept_fraction", "prune": "prune_restrained", "nas": "nas_vstar_norm", "sphere": "sphere_rank_min", "grace": "grace_keys", "wise": "wise_activation", "lyaplock": "lyaplock_queue", "memoir": "memoir_masks",
                "ultraedit": "normalizer_n"}
    for name, run in runs.items():
        col = measured[run["method"]]
        values = log.filter(pl.col("run") == name)[col]
        assert values.null_count() == 0 and values.is_nan().sum() == 0, (name, col)


def test_cli_lists_every_method():
    res = subprocess.run([str(Path(sys.executable).parent / "editscale"), "methods"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # one line per method (name, description), then an indented line of its registry metadata
    lines = [line.split(None, 1) for line in res.stdout.splitlines() if line.strip() and not line.startswith(" ")]
    assert sorted(name for name, _ in lines) == sorted(METHODS)
    assert all(len(desc) > 20 for _, desc in lines)
    meta = [line.strip() for line in res.stdout.splitlines() if line.startswith(" ")]
    assert len(meta) == len(METHODS) and all(m.startswith("updates: ") and "required hparams: " in m for m in meta)
    assert sum("required hparams: layers" in m for m in meta) == len(METHODS) - 5  # prune, ultraedit; grace, wise, memoir: one `layer`
    assert sum("required hparams: base, then those of the method named by base" in m for m in meta) == 1  # prune
    assert sum("updates: dense" in m for m in meta) == 2  # ft-c, lyaplock
    assert sum("updates: masked" in m for m in meta) == 1  # rect
