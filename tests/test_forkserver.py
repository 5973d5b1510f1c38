"""`editscale forkserver`: a served command is the command it would have been in its own process
(directory, environment, streams, exit status, signals, outputs bit for bit), and what a fork
cannot give is refused with the reason, the command then running in its own process.

The session's server (tests/conftest.py `forkserver`) serves these commands; its log, beside its
socket, names each command it ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.compare_studies import compare_dirs
from benchmarks.snakemake_runs import clean_env, planned_jobs, snakemake
from editscale.forkserver import FORKSERVER_ENV, ServerState
from editscale.io import SERVED_MARKER, EditscaleError

EDITSCALE = str(Path(sys.executable).parent / "editscale")


def _served_log(socket_path: Path) -> str:
    return (socket_path.parent / "server.log").read_text()


def _editscale(args: list[str], cwd: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([EDITSCALE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def _wait_for(predicate, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_served_command_keeps_its_directory_environment_streams_and_status(forkserver, tmp_path):
    """An error names a config file relative to the command's directory; the served run prints the
    same on the same streams and exits with the same status as a run in its own process, and the
    server's log shows it served it. The environment reaches it: EDITSCALE_PLUGINS naming a
    module that does not exist is the command's error, read in the served process."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "study.yaml").write_text("runs: [\n")  # not YAML
    args = ["audit", "--configfile", "config/study.yaml"]
    own = _editscale(args, tmp_path, clean_env(forkserver=False))
    served = _editscale(args, tmp_path, clean_env())
    assert own.returncode == served.returncode == 2, (own, served)
    marker, *rest = served.stderr.splitlines(keepends=True)
    assert marker.startswith(SERVED_MARKER) and SERVED_MARKER not in own.stderr
    assert (own.stdout, own.stderr) == (served.stdout, "".join(rest))
    assert "config/study.yaml" in served.stderr
    assert f"editscale {' '.join(args)}" in _served_log(forkserver)

    env = {**clean_env(), "EDITSCALE_PLUGINS": "no_such_plugin_module"}
    served = _editscale(["methods"], tmp_path, env)
    own = _editscale(["methods"], tmp_path, {**env, FORKSERVER_ENV: ""})
    assert served.returncode == own.returncode == 2 and "no_such_plugin_module" in served.stderr
    assert served.stderr.split("\n", 1)[1] == own.stderr


def test_what_a_fork_cannot_give_is_refused_and_runs_in_its_own_process(forkserver, tmp_path):
    """A variable read when a library is imported (HF_HOME), another interpreter, a changed source:
    refused, with the reason on stderr, and the command still runs (in its own process); an
    unreachable socket the same. Thread counts Snakemake sets per job are applied instead."""
    env = {**clean_env(), "HF_HOME": str(tmp_path / "hf")}
    res = _editscale(["methods"], tmp_path, env)
    assert res.returncode == 0 and "rome" in res.stdout
    assert "refused: the environment differs from the server's in HF_HOME" in res.stderr

    res = _editscale(["methods"], tmp_path, {**clean_env(), FORKSERVER_ENV: str(tmp_path / "no-socket")})
    assert res.returncode == 0 and "rome" in res.stdout and "unreachable" in res.stderr

    res = _editscale(["methods"], tmp_path, {**clean_env(), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert res.returncode == 0 and res.stderr.startswith(SERVED_MARKER) and "refused" not in res.stderr

    second = _editscale(["forkserver", "--socket", str(forkserver)], tmp_path, clean_env(forkserver=False))
    assert second.returncode == 2 and f"--socket {forkserver}: a fork server is listening there already" in second.stderr

    state = ServerState(str(forkserver), dict(os.environ))
    request = {"python": sys.executable, "env": dict(os.environ)}
    assert state.refusal(request) == ""
    assert "another Python" in state.refusal({**request, "python": "/usr/bin/python3.9"})
    state.stamp = (state.stamp[0] + 1, state.stamp[1])
    assert state.refusal(request) == "editscale's source changed since the server started"


def test_signals_reach_the_served_command_and_it_dies_with_its_caller(forkserver, tmp_path):
    """A long served command (a nested server): SIGINT to the `editscale` process is forwarded
    (the command handles it and exits 0); SIGHUP, which it does not handle, kills it, and the
    caller dies of the same signal; kill -9 of the caller ends the command with SIGTERM (it
    cleans up: its socket file is removed)."""
    env = clean_env()

    def start(name: str):
        inner = tmp_path / name
        proc = subprocess.Popen([EDITSCALE, "forkserver", "--socket", str(inner)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert _wait_for(inner.exists), proc.stderr.read() if proc.poll() is not None else "no socket"
        return proc, inner

    proc, inner = start("a")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert not inner.exists()

    proc, inner = start("b")
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(60) == -signal.SIGHUP
    assert inner.exists()  # died without cleaning up, as SIGHUP kills

    proc, inner = start("c")
    proc.kill()
    proc.wait(60)
    assert _wait_for(lambda: not inner.exists()), "the served command outlived its caller"
    log = _served_log(forkserver)
    assert f"forkserver --socket {tmp_path / 'a'} -> exit 0" in log and f"forkserver --socket {tmp_path / 'b'} -> signal {int(signal.SIGHUP)}" in log


def test_doctor_will_not_calibrate_from_served_jobs(repo_root, tmp_path):
    """A served job's benchmark record measures the process that forwarded it: doctor's fit
    refuses records whose job log says the job was served, naming the record and the way out."""
    from editscale import calibration as cb
    from editscale.doctor import load_config
    from editscale.planning import config_jobs

    jobs = config_jobs(load_config(repo_root / "config/test-tiny.yaml"), tmp_path)
    bench = tmp_path / "results" / "benchmarks"
    for job in jobs:
        record = bench / Path(job.record).relative_to("results/benchmarks")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text("s\th:m:s\tmax_rss\n1.0\t0:00:01\t600.0\n")
    assert len(cb.measured(jobs, bench)) == len(jobs)
    served = next(j for j in jobs if j.kind == "metric:evaluate")
    log = tmp_path / "results" / "logs" / Path(served.record).relative_to("results/benchmarks").with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"{SERVED_MARKER} at /tmp/s (pid 1): ...\nINFO evaluating\n")
    with pytest.raises(EditscaleError, match=r"1 job\(s\) were served by `editscale forkserver` .*evaluate.*without EDITSCALE_FORKSERVER"):
        cb.measured(jobs, bench, read=cb.record_rss)


@pytest.mark.workflow
@pytest.mark.slow
def test_a_served_study_equals_one_whose_jobs_ran_in_their_own_interpreters(forkserver, tiny_study, tmp_path):
    """The tiny study's last segment (edits 4-6), its scores, checkpoint evaluation and report made
    again in two copies, once served and once with every job in its own interpreter: every file
    equal (benchmarks.compare_studies: metric tables, deltas, factors, report tables)."""
    copies = {}
    for name in ("served", "own"):
        work = tmp_path / name
        shutil.copytree(tiny_study, work, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
        for sub in ("deltas/000006.h5", "factors/000006.h5"):
            (work / "results/rome-tiny" / sub).unlink()
        copies[name] = work
    snakemake(copies["served"])
    snakemake(copies["own"], forkserver=False)
    assert planned_jobs(snakemake(copies["served"], "-n")) == {} == planned_jobs(snakemake(copies["own"], "-n"))
    refused = [str(f) for f in (copies["served"] / "results" / "logs").rglob("*.log") if "editscale: fork server" in f.read_text()]
    assert refused == [], refused  # every job served
    log = _served_log(forkserver)
    assert f"cd {copies['served']}" in log and f"cd {copies['own']}" not in log
    diffs, counts = compare_dirs(copies["served"], copies["own"])
    assert diffs == [] and counts["state_files"] >= 2 and counts["metric_tables"] > 0, (diffs, counts)


def test_each_served_command_draws_its_own_random_numbers():
    """A fork inherits the server's generators; each served command's process seeds them anew
    from the OS, as a new process does (editscale seeds what must be reproducible itself)."""
    import random

    import numpy as np
    import torch

    from editscale.forkserver import _fresh_random_state

    def draws():
        return random.random(), float(np.random.random()), float(torch.rand(()))

    def seeded():
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)

    seeded()
    inherited = draws()
    seeded()
    assert draws() == inherited  # what every fork would draw without it
    seeded()
    _fresh_random_state()
    fresh = draws()
    assert all(a != b for a, b in zip(fresh, inherited))
