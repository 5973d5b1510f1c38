"""Fault injection on the tiny workflow: quiet corruption becomes loud, late failures move to plan
time (issue 14). Each test works on a copy of the finished tiny study."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import polars as pl
import pytest

from benchmarks.snakemake_runs import copy_workflow, planned_jobs, set_config, snakemake
from editscale.io import EditscaleError, read_parquet_metadata

pytestmark = pytest.mark.workflow

STATS = "results/stats/tiny-gpt2/self-sample/transformer.h.1.mlp.c_proj.h5"


def _copy(tiny_study, tmp_path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    return workdir


def _audit(workdir: Path) -> tuple[int, dict]:
    """The audit by hand over the tiny config's declared files: (exit code, its report)."""
    res = subprocess.run([str(Path(sys.executable).parent / "editscale"), "audit", "--configfile", "config/test-tiny.yaml"],
                         cwd=workdir, capture_output=True, text=True)
    report = workdir / ("results/studies/test-tiny/audit.json" if res.returncode == 0 else "results/studies/test-tiny/audit.failed.json")
    assert report.exists() and (res.returncode == 0) != (workdir / "results/studies/test-tiny/audit.failed.json").exists(), res.stderr
    return res.returncode, json.loads(report.read_text())


def _failed(audit: dict) -> set[str]:
    return {f["file"] for f in audit["failures"]}


@pytest.mark.slow
def test_flipped_stats_byte_is_refused_naming_the_file(tiny_study, tmp_path):
    """Before: one changed value inside a valid stats file was used silently and the audit passed."""
    workdir = _copy(tiny_study, tmp_path)
    path = workdir / STATS
    assert path.exists(), sorted(p.name for p in path.parent.iterdir())
    stamp = path.stat()
    with h5py.File(path, "r+") as f:
        f["mom2"][0, 0] = f["mom2"][0, 0] * (1 + 1e-12)  # a quiet flip: still a valid HDF5 file
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and the mtime Snakemake sees is unchanged
    rc, audit = _audit(workdir)
    assert rc != 0 and STATS in _failed(audit), audit["failures"]
    assert any("is corrupt" in f["detail"] and f"rm {STATS}" in f["detail"] for f in audit["failures"] if f["file"] == STATS)
    # the chain refuses it, naming the file and the command that repairs it
    res = snakemake(workdir, "--forcerun", "edit_segment", "results/rome-tiny/deltas/000003.h5", check=False)
    assert res.returncode != 0
    log = (workdir / "results/logs/rome-tiny/edit_segment_000003.log").read_text()
    assert f"stats file {STATS} is corrupt" in log and f"rm {STATS} && snakemake" in log


@pytest.mark.slow
def test_deleted_factors_or_stats_plan_the_repair_and_fail_the_audit(tiny_study, tmp_path):
    """Before: after deleting a factors file Snakemake said 'Nothing to be done' and audit.json still passed."""
    workdir = _copy(tiny_study, tmp_path)
    factors = "results/rome-tiny/factors/000003.h5"
    (workdir / factors).unlink()
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs.get("edit_segment", 0) >= 1 and jobs.get("audit") == 1, jobs
    rc, audit = _audit(workdir)
    assert rc != 0 and factors in _failed(audit), audit["failures"]

    workdir = _copy(tiny_study, tmp_path / "stats")
    (workdir / STATS).unlink()
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs.get("stats") == 1 and jobs.get("audit") == 1, jobs
    rc, audit = _audit(workdir)
    assert rc != 0 and STATS in _failed(audit), audit["failures"]
    assert any("is missing" in f["detail"] for f in audit["failures"] if f["file"] == STATS)


def test_changed_metric_value_fails_the_audit_and_reruns_it(tiny_study, tmp_path):
    """Before: a metric parquet with a changed value and its metadata kept passed the audit."""
    workdir = _copy(tiny_study, tmp_path)
    rel = "results/rome-tiny/metrics/history/000003.parquet"
    path = workdir / rel
    meta = read_parquet_metadata(path)
    df = pl.read_parquet(path)
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.col("value") + 0.25).otherwise(pl.col("value")).alias("value"))
    df.write_parquet(path, metadata=meta)
    assert planned_jobs(snakemake(workdir, "-n")).get("audit") == 1  # the audit depends on the file
    rc, audit = _audit(workdir)
    assert rc != 0 and rel in _failed(audit), audit["failures"]
    assert audit["started"] and rel in audit["files"]
    # issue 32 item 1: the failed hand audit left no results/studies/test-tiny/audit.json, so the workflow re-runs its
    # own audit and fails, naming the file (before: rc 0, and the report carried the tampered value)
    res = snakemake(workdir, check=False)
    assert res.returncode != 0
    assert rel in (workdir / "results/studies/test-tiny/logs/audit.log").read_text()
    assert not (workdir / "results/studies/test-tiny/audit.json").exists()


@pytest.mark.slow
def test_the_hand_audit_checks_the_configs_declared_files(tiny_study, tmp_path):
    """Issue 32 item 1: `editscale audit` by hand globbed results/, so it missed a deleted metric
    file and audited runs no longer in the config; it now checks the config's declared files."""
    workdir = _copy(tiny_study, tmp_path)
    assert _audit(workdir)[0] == 0
    dropped = workdir / "results/dropped-run"  # a run the config no longer has, in a broken state
    shutil.copytree(workdir / "results/rome-tiny", dropped)
    (dropped / "factors/000003.h5").unlink()
    rc, audit = _audit(workdir)
    assert rc == 0 and not any("dropped-run" in f for f in audit["files"]), audit["failures"]
    rel = "results/rome-tiny/metrics/perplexity/000006.parquet"
    (workdir / rel).unlink()
    rc, audit = _audit(workdir)
    assert rc != 0 and _failed(audit) == {rel}, audit["failures"]
    assert "missing" in audit["failures"][0]["detail"]


def test_run_longer_than_its_sequence_fails_at_plan_time_with_the_numbers(repo_root, tmp_path):
    """Before: the chain ran every segment it could and failed at the one that ran out."""
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c["runs"][0].update({"n_edits": 30000, "segment": 3}))
    res = snakemake(workdir, "-n", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "runs[rome-tiny]: n_edits = 30000 requested, but the edit sequence has only" in out, out[-2000:]
    assert "dropped as repeated subjects" in out and "usable" in out
    assert not (workdir / "results").exists()


def test_sequence_job_checks_each_runs_length():
    """Where the plan cannot know (a dataset downloaded in the same run), the sequence rule fails."""
    from editscale.data.sequence import check_length

    with pytest.raises(EditscaleError, match=r"run r: n_edits = 10 requested, but the edit sequence has only 4 usable cases \(why\)"):
        check_length(10, 4, "why", "run r")


def test_skipped_records_are_summarized_and_too_many_fail(tmp_path, capsys):
    """Before: skipped records were WARNING lines in a log while the job exited 0; an empty subject
    was reported as 'does not occur in prompt'."""
    from editscale.data.readers import load_cases

    records = [{"subject": "" if i < 3 else f"City{i}", "src": f"Where is City{i}?", "answers": ["Europe"], "alt": "Asia",
                "rephrase": "r", "loc": "nq question: q", "loc_ans": "a", "pred": "", "cond": ""} for i in range(10)]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    cases = load_cases({"reader": "zsre_mend", "path": str(path), "max_skipped_fraction": 0.5})
    assert len(cases) == 7
    assert "10 records, 7 cases kept, 3 skipped (empty subject: 3)" in capsys.readouterr().out
    with pytest.raises(EditscaleError, match=r"3 of 10 records \(30%\) were skipped, more than max_skipped_fraction = 0.25 \(empty subject: 3\)"):
        load_cases({"reader": "zsre_mend", "path": str(path)})


def test_messages_name_the_real_problem(tmp_path, tiny_study):
    """Before: tiny:bert and local:/nonexistent said 'arch is required'; replay past the end named
    a file; an unknown key printed the schema; the wrong reader named only a missing key."""
    from editscale.config import validate
    from editscale.data.readers import load_cases
    from editscale.workflow import model_arch

    with pytest.raises(EditscaleError, match="'bert' is not a tiny architecture"):
        model_arch({"models": {"m": {"source": "tiny:bert"}}}, "m")
    with pytest.raises(EditscaleError, match="directory /nonexistent does not exist"):
        model_arch({"models": {"m": {"source": "local:/nonexistent"}}}, "m")

    res = subprocess.run([str(Path(sys.executable).parent / "editscale"), "replay", "--model-dir", "data/models/tiny-gpt2",
                          "--run-dir", "results/rome-tiny", "--edit", "7"], cwd=tiny_study, capture_output=True, text=True)
    assert res.returncode != 0 and "the run in results/rome-tiny has 6 edits" in res.stderr, res.stderr

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("models: {}\nmodles: {}\n")
    with pytest.raises(EditscaleError) as err:
        validate({"models": {}, "modles": {}}, str(cfg_path))
    msg = str(err.value)
    assert "line 2" in msg and "unknown key 'modles' (did you mean 'models'?)" in msg and "allowed keys: audit" in msg
    lines = msg.splitlines()  # every problem on its line (the missing sections too), the misspelt key first, no schema dump
    assert lines[0].endswith("problems:") and "unknown key 'modles'" in lines[1] and all(len(line) < 400 for line in lines)

    zsre = [{"subject": "Paris", "src": "Where is Paris?", "answers": ["France"], "alt": "Peru", "rephrase": "r",
             "loc": "nq question: q", "loc_ans": "a", "pred": "", "cond": ""}]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(zsre))
    with pytest.raises(EditscaleError, match="in the format of reader 'zsre_mend', not 'counterfact' \\(set reader: zsre_mend\\)"):
        load_cases({"reader": "counterfact", "path": str(path)})


def test_report_before_the_run_or_with_another_config_is_one_error(repo_root, tmp_path):
    """`snakemake --report` of a config whose run has not produced the report's files (not run yet,
    or run with another --configfile) fails at once naming the files and the command, instead of
    one warning per missing file and a mixed report; `--configfile=X` (with `=`) keeps the words
    after it targets."""
    wd = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(wd, "--report", "results/studies/test-tiny/report.html", config="config/test-tiny.yaml", check=False)
    err = res.stdout + res.stderr
    assert res.returncode != 0 and "report error" in err and "results/studies/test-tiny/tables/" in err, err[-2000:]
    assert "--configfile=" in err and "config/test-tiny.yaml" in err
    assert not (wd / "results/studies/test-tiny/report.html").exists()
    bindir = Path(sys.executable).parent
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(Path.home())}
    dry = subprocess.run([str(bindir / "snakemake"), "-n", "--configfile=config/test-tiny.yaml", "results/studies/test-tiny/tables/summary.csv"],
                         cwd=wd, capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "report_tables" in dry.stdout, dry.stderr[-2000:]


def test_every_problem_of_a_config_is_reported_by_one_dry_run(repo_root, tmp_path):
    """Three problems in the config: one `snakemake -n` names all three (a misspelt key, a wrong
    type, a bad grid), not three runs of it; a misspelt key's 'required' twin is not repeated."""
    wd = copy_workflow(repo_root, tmp_path / "wf")

    def three(cfg):
        run = cfg["runs"][0]
        run["n_edit"] = run.pop("n_edits")
        run["segment"] = "three"
        cfg["metrics"]["history"]["eval_every"] = 0

    set_config(wd, three)
    res = snakemake(wd, "-n", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "3 problems:" in text, text[-3000:]
    for part in ("runs.0: unknown key 'n_edit' (did you mean 'n_edits'?)", "runs.0.segment: 'three' is not of type 'integer'",
                 "metrics.history.eval_every: 0 is none of the allowed forms"):
        assert part in text
    assert "'n_edits' is a required property" not in text


def test_the_cross_checks_of_a_config_are_reported_together(repo_root):
    from editscale.workflow import load_config, prepare

    cfg = load_config(repo_root / "config/test-tiny.yaml")
    cfg["runs"][0]["dataset"] = "nope"
    cfg["runs"].append({**cfg["runs"][0], "name": "r2", "method": "romee", "dataset": "geofacts"})
    cfg["report"]["decision_curves"] = ["xx"]
    with pytest.raises(EditscaleError) as err:
        prepare(cfg, "c.yaml")
    msg = str(err.value)
    assert msg.startswith("3 problems:") and "runs[rome-tiny].dataset = 'nope'" in msg
    assert "runs[r2].method: unknown editing method 'romee' (did you mean 'rome'?)" in msg and "report.decision_curves: ['xx']" in msg


@pytest.mark.slow
def test_a_downstream_task_file_changed_in_place_re_runs_only_the_downstream_readings(tiny_study, tmp_path, repo_root):
    """A task file is an input of the checkpoint jobs and part of downstream's evaluation key:
    editing it in place plans the checkpoint jobs again, recomputes downstream alone (every other
    metric file byte for byte), and the new readings are the new file's."""
    import hashlib

    from benchmarks.snakemake_runs import add_metric_to_finished_study, checkpoint_jobs

    records = [json.loads(line) for line in (repo_root.parent / "shared/data/downstream/sst2.jsonl").read_text().splitlines()[:40]]

    def with_task(cfg):
        cfg["metrics"]["downstream"]["tasks"] = {"sst2": {"path": "data/sst2.jsonl", "n_eval": 12, "n_shots": 2}}

    study, workdir = tmp_path / "study", tmp_path / "copy"
    shutil.copytree(tiny_study, study, symlinks=True)
    (study / "data" / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    jobs, _ = add_metric_to_finished_study(study, workdir, with_task)
    assert checkpoint_jobs(jobs) >= 1
    snakemake(workdir)
    downstream = sorted((workdir / "results/rome-tiny/metrics/downstream").glob("*.parquet"))
    others = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in workdir.glob("results/rome-tiny/metrics/*/*.parquet") if p not in downstream}
    def task_sha(p):  # the task file's sha256 the table records it was computed from
        return json.loads(read_parquet_metadata(p)["inputs"])["task:sst2"]

    assert all(task_sha(p) == hashlib.sha256((workdir / "data" / "sst2.jsonl").read_bytes()).hexdigest() for p in downstream)

    flipped = [{**r, "label": 1 - int(r["label"])} for r in records]  # the same sentences, every label flipped
    (workdir / "data" / "sst2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flipped))
    replanned = planned_jobs(snakemake(workdir, "-n"))
    assert checkpoint_jobs(replanned) == checkpoint_jobs(jobs) and "edit_segment" not in replanned, replanned
    snakemake(workdir)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in others} == others  # nothing else recomputed
    new_sha = hashlib.sha256((workdir / "data" / "sst2.jsonl").read_bytes()).hexdigest()
    assert all(task_sha(p) == new_sha for p in downstream)  # recomputed from the new file
    assert planned_jobs(snakemake(workdir, "-n")) == {}


def test_an_integral_float_for_an_integer_key_means_that_integer(repo_root):
    """JSON Schema counts 3.0 as an integer and passed the float on to range() (issue 32 item 6):
    every integer key, in runs, metric sections, grids and lists, now holds an int after validation,
    so a plan, a range() and a hash see one spelling; a non-integral float stays an error."""
    import yaml

    from editscale.config import section, validate

    cfg = yaml.safe_load((repo_root / "config/test-tiny.yaml").read_text())
    cfg["runs"][0].update(segment=3.0, n_edits=6.0)
    cfg["metrics"]["history"] = {"eval_every": {"per_decade": 3.0, "start": 10.0}, "sample": 100.0}
    cfg["metrics"]["perplexity"] = {"eval_every": [0, 2.0]}
    validate(cfg, "c.yaml")
    values = [cfg["runs"][0]["segment"], cfg["runs"][0]["n_edits"], *cfg["metrics"]["history"]["eval_every"].values(),
              cfg["metrics"]["history"]["sample"], *cfg["metrics"]["perplexity"]["eval_every"]]
    assert values == [3, 6, 3, 10, 100, 0, 2] and all(type(v) is int for v in values)
    assert type(section("metrics.history", {"sample": 100.0}).sample) is int
    cfg["runs"][0]["segment"] = 2.5
    with pytest.raises(EditscaleError, match=r"runs\.0\.segment: 2\.5 is not of type 'integer'"):
        validate(cfg, "c.yaml")


@pytest.mark.slow
def test_keys_depend_on_content_not_on_timing_or_the_device_spelling(tiny_study, tmp_path):
    """Issue 32 item 7. `resources.device: cpu` where `auto` meant cpu re-planned the whole study
    (corpus, statistics, every edit): the device is no rule param now, it reaches the jobs in their
    environment. A segment recomputed bit for bit kept new per-edit seconds in its factors file,
    which changed the evaluation key of every later checkpoint: keys hash state files by content
    now, so the checkpoint jobs keep every metric file byte for byte, and the audit passes."""
    import hashlib

    workdir = _copy(tiny_study, tmp_path)

    def device_cpu(cfg):
        cfg.setdefault("resources", {})["device"] = "cpu"

    set_config(workdir, device_cpu)
    assert planned_jobs(snakemake(workdir, "-n")) == {}
    kept = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in workdir.glob("results/rome-tiny/metrics/*/*.parquet")
            if p.parent.name != "edit_scores"}
    first = workdir / "results/rome-tiny/factors/000003.h5"
    first_bytes = first.read_bytes()
    first.unlink()
    (workdir / "results/rome-tiny/deltas/000003.h5").unlink()
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs.get("edit_segment") == 2 and sum(n for r, n in jobs.items() if r.startswith("evaluate__")) >= 1, jobs
    snakemake(workdir)
    assert first.read_bytes() != first_bytes  # rewritten with new per-edit seconds ...
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in kept} == kept  # ... yet every evaluation kept
    logs = "".join(p.read_text() for p in (workdir / "results/logs/rome-tiny").glob("evaluate_*.log"))
    assert "up to date by its evaluation key" in logs
    rc, audit = _audit(workdir)
    assert rc == 0, audit["failures"]


def test_a_write_that_fails_for_space_is_one_message_and_leaves_nothing(tmp_path):
    """Issue 32 item 5: a full disk inside the HDF5 library ended the job with a segmentation fault
    (exit 139). HDF5 and parquet files are built in memory now and written by Python: the kernel's
    refusal (here a file size limit, EFBIG, as a full disk gives ENOSPC) is one message naming the
    file and the free space, the process exits 1, and no file or temporary is left."""
    code = f"""
import resource, signal
import numpy as np, polars as pl
from editscale.io import EditscaleError, atomic_h5, write_parquet_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with atomic_h5({str(tmp_path / "x.h5")!r}) as f:
        f.create_dataset("a", data=np.arange(10000.0))
except EditscaleError as exc:
    print("ERROR", exc)
try:
    write_parquet_atomic(pl.DataFrame({{"a": np.random.default_rng(0).random(10000)}}), {str(tmp_path / "x.parquet")!r})
except EditscaleError as exc:
    print("ERROR", exc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2, res.stdout + res.stderr
    for name, line in zip(["x.h5", "x.parquet"], lines):
        assert f"could not write {tmp_path / name}: File too large (errno 27)" in line and "free on the filesystem of" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_segment_checks_the_free_space_before_its_edits(make_run, tmp_path, tiny_model_dirs, monkeypatch):
    """Issue 32 item 5: the segment estimates what it writes and refuses to start on a disk that
    cannot hold it (not after hours of edits), naming both files, the bytes needed and free."""
    import shutil as shutil_module

    from editscale.edit import chain
    from editscale.layout import SegmentFiles, delta_path, factors_path

    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir)
    real = shutil_module.disk_usage
    monkeypatch.setattr("editscale.io.shutil.disk_usage", lambda p: real(p)._replace(free=1000))
    edited = []
    monkeypatch.setattr(chain.WeightState, "apply", lambda *a, **k: edited.append(1))
    with pytest.raises(EditscaleError, match=r"not enough free space to write the segment's delta and factors .*needs [\d.]+ kB, 1\.0 kB are free") as err:
        chain.run_segment(model_dir, SegmentFiles.in_run(run_dir, 2, 2), resolved, {"mom2": stats}, run_dir / "templates.json")
    assert str(delta_path(run_dir, 2)) in str(err.value) and str(factors_path(run_dir, 2)) in str(err.value)
    assert not edited and not delta_path(run_dir, 2).exists() and not factors_path(run_dir, 2).exists()
