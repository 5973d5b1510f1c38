"""A real kill: SIGKILL the whole snakemake process group while the second edit segment runs,
then the study continued on "another machine": a fresh copy of the workflow given the stopped
study's data/ and results/ (issue 29 item 1).

Directory A is the session's tiny study (config/test-tiny.yaml run uninterrupted to the end,
the `tiny_study` fixture, only read here). Directory B runs the whole workflow and is killed, snakemake
and every job it started, while the edit job of the second segment (edits 4-6) is running. Then:
no file that looks finished is left for that segment (atomic writes; `.000006.h5.*` temp files
may exist). Directory C is a fresh copy of the workflow (no .snakemake/: no lock, no records of
B's jobs) into which B's data/ and results/ are copied with their modification times (`cp -a`,
`rsync -a`); a plain `snakemake` there plans only the lost segment and what depends on it, the
first segment's checkpoint (deltas/000003.h5) is re-used, not recomputed, and every file of the
finished study equals A's (benchmarks.compare_studies.compare_dirs: metric tables, deltas,
factors, report tables; only what measures time differs). B itself resumes too, after
`snakemake --unlock` (the stale lock of the killed run), planning the same jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from editscale.edit.chain import read_delta, read_factors, tensor_sha256
from benchmarks.compare_studies import compare_dirs
from benchmarks.snakemake_runs import clean_env, copy_workflow, incomplete_jobs, planned_jobs, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

RUN = "results/rome-tiny"
LOG = "results/logs/rome-tiny/edit_segment_000006.log"
STARTED_EDITING = "rome edits 4-6"  # tqdm's description, printed once the model is loaded


def _delta_hashes(workdir: Path, k: int) -> dict[str, str]:
    tensors, attrs = read_delta(workdir / RUN / "deltas" / f"{k:06d}.h5")
    assert attrs["k"] == k
    return {m: tensor_sha256(t) for m, t in tensors.items()}


def _finished_looking(workdir: Path, k: int) -> list[str]:
    """Files of segment k that a scheduler would take for outputs (temp files excluded)."""
    name = f"{k:06d}.h5"
    found = []
    for sub in ("deltas", "factors"):
        d = workdir / RUN / sub
        if d.exists():
            found += [f"{sub}/{p.name}" for p in d.iterdir() if p.name == name or (p.name.startswith(name) and not p.name.startswith("."))]
    return found


def _job_pids(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_kill_mid_segment_then_resume_gives_identical_hashes(repo_root, tiny_study, tmp_path):
    dir_a = tiny_study
    dir_b = copy_workflow(repo_root, tmp_path / "B")
    bindir = Path(sys.executable).parent
    # (targets go before --configfile, which takes several values)
    cmd = [str(bindir / "snakemake"), "--cores", "2"]
    config = ["--configfile", "config/test-tiny.yaml"]

    # B: the full workflow, in its own session so that killpg reaches snakemake and its jobs only.
    with open(tmp_path / "B.out", "w") as out:
        proc = subprocess.Popen([*cmd, *config], cwd=dir_b, stdout=out, stderr=subprocess.STDOUT, env=clean_env(forkserver=False), start_new_session=True)
    try:
        log = dir_b / LOG
        deadline = time.monotonic() + 900
        caught = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"snakemake ended ({proc.returncode}) before the second segment was caught:\n"
                            + (tmp_path / "B.out").read_text()[-3000:])
            if log.exists():
                text = log.read_text(errors="replace")
                if STARTED_EDITING in text:  # the edit job is past model loading, inside the chain
                    os.killpg(proc.pid, signal.SIGSTOP)  # freeze everything right here, then look
                    caught = log.read_text(errors="replace")
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the edit job of the second segment did not start within 15 minutes")
        jobs = _job_pids(proc)
        assert any("edit-segment" in " ".join(p.cmdline()) and "--k 6" in " ".join(p.cmdline())
                   for p in jobs if p.is_running()), [p.cmdline() for p in jobs]
        os.killpg(proc.pid, signal.SIGKILL)  # (SIGKILL also ends stopped processes)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # every job snakemake had started died with it (same process group)
        gone, alive = psutil.wait_procs(jobs, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # Caught mid-segment: the job had begun editing but had not written its outputs.
    assert "wrote results/rome-tiny/factors/000006.h5" not in caught, caught[-500:]
    assert _finished_looking(dir_b, 6) == [], sorted(p.name for p in (dir_b / RUN).rglob("*.h5*"))
    first = dir_b / RUN / "deltas" / "000003.h5"
    assert first.exists() and (dir_b / RUN / "factors" / "000003.h5").exists()
    mtime_first, sha_first = first.stat().st_mtime_ns, _delta_hashes(dir_b, 3)

    # Continue in C: a fresh copy of the workflow with B's state, modification times kept.
    dir_c = copy_workflow(repo_root, tmp_path / "C")
    for part in ("data", "results"):
        shutil.copytree(dir_b / part, dir_c / part, symlinks=True)  # copy2: file mtimes kept, as cp -a
    plan = planned_jobs(snakemake(dir_c, "-n"))
    assert plan["edit_segment"] == 1, plan
    for rule in ("model", "dataset", "sequence", "corpus_tokens", "stats", "run_config", "context_templates"):
        assert rule not in plan, (rule, plan)
    # B, where it stopped: the stale lock of the killed run is released as a user would, and the
    # plan is the same, except that B also redoes a job that had written its output (atomically)
    # when the kill came but that Snakemake had not yet recorded as finished: B's .snakemake/ holds
    # that output for incomplete, C (no .snakemake/) takes the finished file as it is.
    snakemake(dir_b, "--unlock")
    dry_b = snakemake(dir_b, "-n")
    plan_b, redone = planned_jobs(dry_b), incomplete_jobs(dry_b)
    assert "edit_segment" not in redone, redone  # the killed segment had left no output behind
    extra = {rule: n - plan.get(rule, 0) for rule, n in plan_b.items() if n != plan.get(rule, 0)}
    assert all(0 < n <= redone.get(rule, 0) for rule, n in extra.items()), (plan_b, plan, redone)
    res = snakemake(dir_c)
    assert "Nothing to be done" not in res.stdout + res.stderr
    assert planned_jobs(snakemake(dir_c, "-n")) == {}

    hashes_a, hashes_c = _delta_hashes(dir_a, 6), _delta_hashes(dir_c, 6)
    assert hashes_a and hashes_a == hashes_c
    # the continued run's factors hold the same three edits, in order
    assert [r["edit_index"] for r in read_factors(dir_c / RUN / "factors" / "000006.h5")[1]] == [4, 5, 6]
    # the finished first segment was re-used, not recomputed
    first_c = dir_c / RUN / "deltas" / "000003.h5"
    assert first_c.stat().st_mtime_ns == mtime_first and _delta_hashes(dir_c, 3) == sha_first == _delta_hashes(dir_a, 3)
    # every file of the study equals the uninterrupted one's (timing aside)
    diffs, counts = compare_dirs(dir_a, dir_c)
    assert diffs == [] and counts["metric_tables"] > 5 and counts["state_files"] == 4 and counts["report_tables"] > 5, diffs
    # the continued run is complete and its hash chain checks out
    assert json.loads((dir_c / "results/studies/test-tiny/audit.json").read_text())["passed"]


def test_an_edit_job_dies_with_its_wrapper_shell(repo_root, tmp_path):
    """Issue 32 item 8: kill -9 of the shell Snakemake runs a job in left the edit job orphaned; it
    went on and wrote its outputs after Snakemake had reported the failure, racing the next run.
    Now the job gets SIGTERM when its wrapper dies, exits, and leaves no output of its segment."""
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "snakemake"), "--cores", "1", "--configfile", "config/test-tiny.yaml"]
    with open(tmp_path / "out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=clean_env(forkserver=False), start_new_session=True)
    try:
        log = workdir / LOG
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "out").read_text()[-3000:]
            if log.exists() and STARTED_EDITING in log.read_text(errors="replace"):
                os.killpg(proc.pid, signal.SIGSTOP)  # everything frozen inside the segment
                break
            time.sleep(0.05)
        else:
            pytest.fail("the edit job of the second segment did not start within 15 minutes")
        job = next(p for p in _job_pids(proc) if "edit-segment" in " ".join(p.cmdline()) and "--k 6" in " ".join(p.cmdline())
                   and "bash" not in p.name())  # the editscale process, not the shell whose command line names it
        wrapper = job.parent()
        assert wrapper.pid != proc.pid and "bash" in wrapper.name(), wrapper.cmdline()
        wrapper.kill()  # kill -9 of the job's shell only
        os.killpg(proc.pid, signal.SIGCONT)
        gone, alive = psutil.wait_procs([job], timeout=20)
        assert not alive, "the edit job outlived its wrapper"
        proc.wait(timeout=300)
        assert proc.returncode != 0  # snakemake reports the job failed ...
        time.sleep(2)
        assert _finished_looking(workdir, 6) == []  # ... and nothing wrote its outputs after that
        assert not [p.name for p in (workdir / RUN).rglob(".000006.h5.*")]  # nor left a temporary
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
