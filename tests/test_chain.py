"""The segmented edit chain: exact replay, resume after a kill, atomic outputs."""

from __future__ import annotations

import json

import pytest

from editscale.layout import SegmentFiles, StateFiles, delta_path, factors_path
from editscale.edit.chain import (
    model_at,
    read_delta,
    read_factors,
    replay_delta,
    run_segment,
    states_in_segment,
    tensor_sha256,
)
from editscale.io import EditscaleError, write_json_atomic
from editscale.models.load import model_sha
from editscale.models.registry import edited_weight, to_math
from editscale.stats.mom2 import write_mom2

SEGMENT = 2


def _run_all(model_dir, run_dir, resolved, stats, n):
    for k in range(SEGMENT, n + 1, SEGMENT):
        run_segment(model_dir, SegmentFiles.in_run(run_dir, k, SEGMENT), resolved, {"mom2": stats}, run_dir / "templates.json")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_replay_is_bit_identical(make_run, tmp_path, tiny_model_dirs, repo_root, arch):
    model_dir = tiny_model_dirs(arch)
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    _run_all(model_dir, run_dir, resolved, stats, 4)
    module = next(iter(stats))
    # Segment boundary: replay of the factors from the previous delta equals the stored delta.
    stored, attrs = read_delta(delta_path(run_dir, 4))
    assert attrs["k"] == 4 and attrs["model_sha256"] == model_sha(model_dir)
    from editscale.audit.audit import _rederive

    assert tensor_sha256(_rederive(run_dir, 4, SEGMENT)[module]) == tensor_sha256(stored[module])
    # Mid-segment: the chain's state right after edit 3 (stepped in place) equals model_at(3).
    states = {j: to_math(m, edited_weight(m, module)).clone() for j, m, _ in states_in_segment(model_dir, delta_path(run_dir, 2), factors_path(run_dir, 4))}
    assert sorted(states) == [3, 4]
    replayed, _ = model_at(model_dir, StateFiles.in_run(run_dir, 3, SEGMENT))
    assert tensor_sha256(states[3]) == tensor_sha256(to_math(replayed, edited_weight(replayed, module)))
    # ... and differs from the state after 4 and after 2 (the replay really stops at edit 3).
    assert tensor_sha256(states[3]) != tensor_sha256(states[4])
    assert tensor_sha256(replay_delta(run_dir, 3, SEGMENT)[module]) != tensor_sha256(replay_delta(run_dir, 2, SEGMENT)[module])


def test_resume_after_lost_segment_gives_same_hashes(make_run, tmp_path, tiny_model_dirs, repo_root):
    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    _run_all(model_dir, run_dir, resolved, stats, 4)
    first = {m: tensor_sha256(t) for m, t in read_delta(delta_path(run_dir, 4))[0].items()}
    # A killed job leaves no finished-looking file; resuming recomputes only the lost segment.
    delta_path(run_dir, 4).unlink()
    factors_path(run_dir, 4).unlink()
    run_segment(model_dir, SegmentFiles.in_run(run_dir, 4, SEGMENT), resolved, {"mom2": stats}, run_dir / "templates.json")
    again = {m: tensor_sha256(t) for m, t in read_delta(delta_path(run_dir, 4))[0].items()}
    assert first == again


def test_failed_segment_leaves_no_output(make_run, tmp_path, tiny_model_dirs, repo_root, monkeypatch):
    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    from editscale.edit import rome

    def boom(self, cases, weights):
        raise RuntimeError("killed")

    monkeypatch.setattr(rome.Rome, "apply", boom)
    with pytest.raises(RuntimeError):
        run_segment(model_dir, SegmentFiles.in_run(run_dir, 2, SEGMENT), resolved, {"mom2": stats}, run_dir / "templates.json")
    assert not list((run_dir).glob("deltas/*")) and not list(run_dir.glob("factors/*"))


def test_factors_log_and_model_check(make_run, tmp_path, tiny_model_dirs, repo_root):
    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    _run_all(model_dir, run_dir, resolved, stats, 2)
    updates, rows, _, attrs = read_factors(factors_path(run_dir, 2))
    assert [r["edit_index"] for r in rows] == [1, 2]
    assert all(r["update_norm"] > 0 and r["seconds"] > 0 and r["factor_kind"] == "lowrank" for r in rows)
    # the per-edit time is split into keys, value optimization and the closed-form update
    for r in rows:
        assert r["seconds_keys"] > 0 and r["seconds_optimize"] > 0 and r["seconds_update"] >= 0
        parts = r["seconds_keys"] + r["seconds_optimize"] + r["seconds_update"]
        assert parts == pytest.approx(r["seconds"], rel=1e-6)
        assert r["seconds_optimize"] > r["seconds_update"]
    assert len(updates) == 2 and all(u.u.shape[1] == 1 for _, u in updates)  # ROME: rank one each
    # every scalar ROME measured is in the log: ||right u^T|| = |residual| / |k . u| (u unit norm)
    for r in rows:
        assert r["method_update_norm"] == pytest.approx(r["residual_norm"] / abs(r["key_dot_u"]), rel=1e-9)
        assert r["module"] == "transformer.h.1.mlp.c_proj" and r["v_loss"] == r["v_loss"]
    with pytest.raises(EditscaleError, match="computed on model"):
        read_delta(delta_path(run_dir, 2), expected_model_sha="0" * 64)
    # A stats file computed on another model is refused, naming the file.
    module, path = next(iter(stats.items()))
    from editscale.stats.mom2 import read_stats

    mom2, count, _ = read_stats(path)
    foreign = tmp_path / "foreign" / f"{module}.h5"
    write_mom2(foreign, mom2, count, module=module, model_sha256="f" * 64, corpus="test", corpus_spec={}, dtype="float32")
    with pytest.raises(EditscaleError, match=str(foreign.name)):
        run_segment(model_dir, SegmentFiles.in_run(run_dir, 4, SEGMENT), resolved, {"mom2": {module: str(foreign)}},
                    run_dir / "templates.json")
    assert not delta_path(run_dir, 4).exists()


def test_stale_or_foreign_context_templates_are_refused(make_run, tmp_path, tiny_model_dirs, repo_root):
    """A context_templates.json of the old flat format, or one sampled by another method family's
    rule, is one error naming the file, not a silently different key average."""
    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir, n=2)
    path = run_dir / "templates.json"
    record = json.loads(path.read_text())
    assert record["rule"] == "rome" and len(record["groups"]) == 1 and record["groups"][0][0] == "{}"
    write_json_atomic(path, {"templates": record["templates"]})  # what editscale wrote before format 2
    with pytest.raises(EditscaleError, match=r"templates.json holds context templates in an older format.*delete it"):
        run_segment(model_dir, SegmentFiles.in_run(run_dir, SEGMENT, SEGMENT), resolved, {"mom2": stats}, path)
    write_json_atomic(path, {**record, "rule": "memit"})
    with pytest.raises(EditscaleError, match=r"sampled with the 'memit' rule but this method follows the 'rome' rule"):
        run_segment(model_dir, SegmentFiles.in_run(run_dir, SEGMENT, SEGMENT), resolved, {"mom2": stats}, path)
    assert not (run_dir / "deltas").exists() or not any((run_dir / "deltas").iterdir())


def test_a_recomputed_segment_has_the_content_hash_of_the_first(make_run, tmp_path, tiny_model_dirs):
    """Issue 32 item 7: factors files hold per-edit wall time, so their bytes differ run to run; the
    content hash (what later segments, evaluation keys and the audit compare) leaves timing and
    provenance out and is the same for a bit-identical recomputation, and changes with a value."""
    import h5py

    from editscale.edit.chain import state_content_sha256
    from editscale.io import sha256_file

    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    _run_all(model_dir, run_dir, resolved, stats, 2)
    paths = [delta_path(run_dir, 2), factors_path(run_dir, 2)]
    before = [(sha256_file(p), read_delta(p)[1]["content_sha256"] if "deltas" in str(p) else read_factors(p)[3]["content_sha256"]) for p in paths]
    for p in paths:
        p.unlink()
    run_segment(model_dir, SegmentFiles.in_run(run_dir, 2, SEGMENT), resolved, {"mom2": stats}, run_dir / "templates.json")
    after = [(sha256_file(p), read_delta(p)[1]["content_sha256"] if "deltas" in str(p) else read_factors(p)[3]["content_sha256"]) for p in paths]
    assert [b[0] for b in before] != [a[0] for a in after]  # the bytes differ (seconds, created_at)
    assert [b[1] for b in before] == [a[1] for a in after]  # the content does not
    assert read_delta(paths[0])[1]["factors_content_sha256"] == after[1][1]
    with h5py.File(paths[1], "r+") as f:  # a timing column is not content ...
        f["log/seconds"][0] = 1e6
        assert state_content_sha256(f) == after[1][1]
        f["log/v_loss"][0] = f["log/v_loss"][0] + 1.0  # ... a logged value is
        assert state_content_sha256(f) != after[1][1]


def test_a_segment_refuses_a_foreign_or_corrupt_state_naming_the_file_and_the_repair(make_run, tmp_path, tiny_model_dirs):
    """Issue 32 item 4: a delta copied from another run (or another checkpoint), factors that are not
    the delta's, or a changed value in either: the next segment fails before editing, naming the
    file and the command that rebuilds it (before: built upon, found only by the final audit)."""
    import shutil

    import h5py

    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    _run_all(model_dir, run_dir, resolved, stats, 4)
    other_dir, other_resolved, other_stats = make_run(tmp_path / "other", model_dir, seed=1)
    _run_all(model_dir, other_dir, other_resolved, other_stats, 2)
    next_segment = SegmentFiles.in_run(run_dir, 4, SEGMENT)
    repair = f"rm {delta_path(run_dir, 2)} {factors_path(run_dir, 2)} && snakemake --cores all"
    saved = tmp_path / "saved"
    saved.mkdir()
    for p in (delta_path(run_dir, 2), factors_path(run_dir, 2)):
        shutil.copy2(p, saved / p.parent.name)

    def restore():
        shutil.copy2(saved / "deltas", delta_path(run_dir, 2))
        shutil.copy2(saved / "factors", factors_path(run_dir, 2))

    def refused(match):
        with pytest.raises(EditscaleError, match=match) as err:
            run_segment(model_dir, next_segment, resolved, {"mom2": stats}, run_dir / "templates.json")
        assert repair in str(err.value)
        restore()

    shutil.copy2(delta_path(other_dir, 2), delta_path(run_dir, 2))  # another run's delta
    refused(rf"{delta_path(run_dir, 2)} was written by another run")
    shutil.copy2(delta_path(other_dir, 2), delta_path(run_dir, 2))  # another run's state, both files
    shutil.copy2(factors_path(other_dir, 2), factors_path(run_dir, 2))
    refused(r"continues from is not this run's")
    shutil.copy2(delta_path(run_dir, 4), delta_path(run_dir, 2))  # this run's later checkpoint
    refused(rf"{delta_path(run_dir, 2)} holds the state after edit 4, not after edit 2")
    with h5py.File(delta_path(run_dir, 2), "r+") as f:  # one value changed in place
        name = next(iter(f.keys()))
        f[name][0, 0] = f[name][0, 0] + 1.0
    refused(rf"delta file {delta_path(run_dir, 2)} is corrupt")
    # the untouched state is continued from, to the same delta as before
    first = {m: tensor_sha256(t) for m, t in read_delta(delta_path(run_dir, 4))[0].items()}
    run_segment(model_dir, next_segment, resolved, {"mom2": stats}, run_dir / "templates.json")
    assert {m: tensor_sha256(t) for m, t in read_delta(delta_path(run_dir, 4))[0].items()} == first
