"""Real snakemake runs of the tiny workflow (config/test-tiny.yaml) in a temporary directory.

The workflow files are copied into the temp dir, as a user's checkout would be, and snakemake
runs as a subprocess. One full run is shared by the tests of this module (module-scoped fixture);
each test then asks snakemake what it *would* do (dry runs) or checks the outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from editscale.edit.chain import tensor_sha256, read_delta
from editscale.layout import delta_path
from editscale.io import EditscaleError
from benchmarks.snakemake_runs import checkpoint_jobs, copy_workflow, planned_jobs, planned_metric_files, set_config, snakemake

pytestmark = pytest.mark.workflow


def test_default_config_plans_the_whole_study(repo_root, tmp_path):
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(workdir, "-n", config="config.yaml")
    jobs = planned_jobs(res)
    cfg = yaml.safe_load((repo_root / "config.yaml").read_text())
    n_segments = sum(r["n_edits"] // r.get("segment", 20) for r in cfg["runs"])
    assert jobs["edit_segment"] == n_segments
    assert jobs["edit_scores"] == n_segments
    for rule in ("model", "dataset", "corpus_tokens", "stats", "metric_config", "report_tables", "report_plots", "audit"):
        assert jobs.get(rule, 0) >= 1, rule
    # one checkpoint job per run and checkpoint of any metric's grid, each metric's file planned once
    from editscale.workflow import eval_grid

    checkpoint = [m for m in cfg["metrics"] if m != "edit_scores"]
    grids = {r["name"]: {m: eval_grid(r["n_edits"], cfg["metrics"][m]["eval_every"]) for m in checkpoint} for r in cfg["runs"]}
    assert checkpoint_jobs(jobs) == sum(len(set().union(*g.values())) for g in grids.values())
    for m in checkpoint:
        assert len(planned_metric_files(res, m)) == sum(len(g[m]) for g in grids.values()), m


def test_long_config_plans_log_spaced_checkpoint_jobs(repo_root, tmp_path):
    """config/long.yaml: 10,000 UltraEdit edits and 1,000 ENCORE edits on the 20,000+ case
    geofacts stream, one checkpoint job per log-spaced checkpoint (0, 10, 20, 50, ...)."""
    from editscale.workflow import eval_grid

    workdir = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(workdir, "-n", config="config/long.yaml")
    jobs = planned_jobs(res)
    cfg = yaml.safe_load((repo_root / "config/long.yaml").read_text())
    grid = cfg["metrics"]["history"]["eval_every"]
    assert all(cfg["metrics"][m]["eval_every"] == grid for m in ("downstream", "generation", "perplexity", "weights"))
    points = {r["name"]: eval_grid(r["n_edits"], grid) for r in cfg["runs"]}
    assert points["ultraedit-smollm2-long-s0"] == [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
    assert checkpoint_jobs(jobs) == sum(len(p) for p in points.values())
    assert jobs["edit_segment"] == sum(r["n_edits"] // r["segment"] for r in cfg["runs"])
    assert cfg["metrics"]["history"]["sample"] == 500 and cfg["datasets"]["geofacts-all"] == {
        "reader": "geofacts", "seed": 0, "max_cities": "all", "counties": True}


def test_schema_rejects_unknown_key(repo_root, tmp_path):
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c["runs"][0].update({"n_edit": 5}))
    res = snakemake(workdir, "-n", check=False)
    assert res.returncode != 0
    assert "n_edit" in res.stdout + res.stderr


def test_bad_cross_reference_is_one_clear_error(repo_root, tmp_path):
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c["runs"][0].update({"dataset": "nosuch"}))
    res = snakemake(workdir, "-n", check=False)
    assert res.returncode != 0
    assert "runs[rome-tiny].dataset = 'nosuch' is not defined under `datasets:`" in res.stdout + res.stderr


def test_batches_for_a_method_without_a_batch_update_fail_at_plan_time(repo_root, tmp_path):
    """ROME has no batch form: edits_per_step > 1 would silently edit one case after another."""
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c["runs"][0].update({"edits_per_step": 2, "segment": 2}))
    res = snakemake(workdir, "-n", check=False)
    assert res.returncode != 0
    assert "runs[rome-tiny].edits_per_step = 2: method 'rome' edits one case at a time" in res.stdout + res.stderr


def test_decision_curves_must_be_curves_of_the_registered_metrics(repo_root, tmp_path):
    """report.decision_curves names curves the metric registry declares; a typo fails at -n."""
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c.setdefault("report", {}).update({"decision_curves": ["downstream_f2", "efficacy"]}))
    res = snakemake(workdir, "-n", check=False)
    assert res.returncode != 0
    assert "report.decision_curves: ['downstream_f2'] are not curves of the registered metrics" in res.stdout + res.stderr


def test_full_run_outputs_and_nothing_left_to_do(tiny_study):
    assert (tiny_study / "results/studies/test-tiny/tables/summary.csv").exists()
    assert (tiny_study / "results/studies/test-tiny/plots/edit_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every edit and evaluation job leaves Snakemake's time / memory record (benchmarks/ reads it)
    from benchmarks.workflow_cache import job_seconds, peak_rss

    rss = peak_rss(tiny_study)
    assert {"edit_segment", "edit_scores", "evaluate"} <= set(rss)
    assert all(v > 0 for v in rss.values())
    assert job_seconds(tiny_study) > 0
    audit = json.loads((tiny_study / "results/studies/test-tiny/audit.json").read_text())
    assert audit["passed"] and audit["n_checks"] > 5
    assert planned_jobs(snakemake(tiny_study, "-n")) == {}


def test_raising_n_edits_plans_only_new_segments(tiny_study, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    set_config(workdir, lambda c: c["runs"][0].update({"n_edits": 9}))
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs["edit_segment"] == 1 and jobs["edit_scores"] == 1
    for rule in ("model", "dataset", "sequence", "corpus_tokens", "stats", "context_templates", "run_config"):
        assert rule not in jobs, rule
    # only the new checkpoint is evaluated: 9 (history/weights every 3; downstream etc. at n_edits),
    # by one job (n_edits is on every grid)
    res = snakemake(workdir, "-n")
    assert checkpoint_jobs(jobs) == 1
    for m in ("history", "weights", "perplexity", "downstream", "generation"):
        assert planned_metric_files(res, m) == {f"results/rome-tiny/metrics/{m}/000009.parquet"}, m


def test_changing_one_metric_reruns_only_that_metric(tiny_study, tmp_path):
    """The checkpoint jobs of generation's grid are planned, and each recomputes generation only:
    every other metric's file keeps its content (update() output, evaluation key unchanged)."""
    import hashlib

    workdir = tmp_path / "copy"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    metric_files = sorted((workdir / "results/rome-tiny/metrics").rglob("*.parquet"))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in metric_files}
    set_config(workdir, lambda c: c["metrics"]["generation"].update({"max_new_tokens": 12}))
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert set(jobs) <= {"metric_config", "report_tables", "report_plots", "audit", "all"} | {r for r in jobs if r.startswith("evaluate__")}, jobs
    assert jobs["metric_config"] == 1 and checkpoint_jobs(jobs) == 2  # checkpoints 0 and 6
    snakemake(workdir, *(f"results/rome-tiny/metrics/generation/{k:06d}.parquet" for k in (0, 6)))
    changed = {str(p.relative_to(workdir)) for p in metric_files if hashlib.sha256(p.read_bytes()).hexdigest() != before[p]}
    assert changed == {f"results/rome-tiny/metrics/generation/{k:06d}.parquet" for k in (0, 6)}
    log = (workdir / "results/logs/rome-tiny/evaluate_000006.log").read_text()
    assert "evaluating ['generation'] in one process (up to date, kept: ['history', 'downstream', 'perplexity', 'weights'])" in log
    assert planned_jobs(snakemake(workdir, "-n", "results/rome-tiny/metrics/generation/000006.parquet")) == {}


def test_a_second_config_with_another_metric_section_leaves_the_first_configs_plan_alone(tiny_study, tmp_path):
    """Defect: the section files were results/config/metrics/{metric}.json, one per metric for every
    config of a results directory. A second config with another history section (long.yaml samples
    500 edits, methods.yaml all) rewrote it, and the first config then re-planned every checkpoint
    job of its runs. Each section now has its own file, named by its content."""
    workdir = _copy_study(tiny_study, tmp_path)
    cfg = yaml.safe_load((workdir / "config/test-tiny.yaml").read_text())
    cfg["runs"][0]["name"] = "rome-tiny-other"
    cfg["metrics"]["history"]["sample"] = 2
    (workdir / "config/other.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = snakemake(workdir, "-n", config="config/other.yaml")
    assert "rome-tiny/" not in res.stdout.replace("rome-tiny-other/", "")  # the first config's run is not touched
    ours = sorted((workdir / "results/config/metrics/history").glob("*.json"))
    [other] = {m.group(0) for m in re.finditer(r"results/config/metrics/history/[0-9a-f]{16}\.json", res.stdout)}
    assert [p.name for p in ours] != [Path(other).name] and len(ours) == 1
    snakemake(workdir, other, config="config/other.yaml")
    assert json.loads((workdir / other).read_text())["sample"] == 2
    assert json.loads(ours[0].read_text()).get("sample") != 2
    assert planned_jobs(snakemake(workdir, "-n")) == {}


def test_a_section_file_whose_content_is_not_its_name_is_refused(tmp_path):
    """metric-config writes a section only under its own digest, and a checkpoint job refuses a
    section file edited by hand rather than evaluate with values its name does not say."""
    from editscale.evaluate.cli import _read_config
    from editscale.layout import metric_config_path

    params = {"batch_size": 8, "ignore_id": None}
    good = tmp_path / metric_config_path("perplexity", params)
    bindir = Path(sys.executable).parent
    run = lambda out: subprocess.run([str(bindir / "editscale"), "metric-config", "--metric", "perplexity", "--params-json",  # noqa: E731
                                      json.dumps(params), "--out", str(out)], capture_output=True, text=True, timeout=120)
    res = run(good.with_name("0123456789abcdef.json"))
    assert res.returncode != 0 and f"is named {good.name}" in res.stderr
    assert run(good).returncode == 0 and _read_config("perplexity", good) == params
    good.write_text(json.dumps({**params, "batch_size": 4}))
    with pytest.raises(EditscaleError, match="edited by hand"):
        _read_config("perplexity", good)


def test_a_forced_checkpoint_job_recomputes_only_changed_files_unless_told(tiny_study, tmp_path):
    """-R runs the job; it recomputes a file whose values were changed after it was written (its
    table_sha256 no longer matches), keeps the intact one, and EDITSCALE_RECOMPUTE=1 redoes all."""
    import polars as pl

    from editscale.io import read_parquet_metadata

    workdir = _copy_study(tiny_study, tmp_path)
    history, weights = (workdir / f"results/rome-tiny/metrics/{m}/000003.parquet" for m in ("history", "weights"))
    meta = read_parquet_metadata(history)
    tampered = pl.read_parquet(history).with_columns(pl.col("value") + 1.0)
    tampered.write_parquet(history, metadata=meta)
    intact = weights.read_bytes()
    rule = "evaluate__rome_tiny__history_weights"
    snakemake(workdir, str(history.relative_to(workdir)), "-R", rule)
    assert pl.read_parquet(history)["value"].to_list() == pl.read_parquet(tiny_study / "results/rome-tiny/metrics/history/000003.parquet")["value"].to_list()
    assert weights.read_bytes() == intact
    assert "evaluating ['history'] in one process (up to date, kept: ['weights'])" in (workdir / "results/logs/rome-tiny/evaluate_000003.log").read_text()
    snakemake(workdir, str(history.relative_to(workdir)), "-R", rule, env={"EDITSCALE_RECOMPUTE": "1"})
    assert "evaluating ['history', 'weights'] in one process" in (workdir / "results/logs/rome-tiny/evaluate_000003.log").read_text()


def test_a_checkpoint_job_loads_and_replays_the_model_once(tiny_study):
    log = (tiny_study / "results/logs/rome-tiny/evaluate_000006.log").read_text()
    assert "evaluating ['history', 'downstream', 'perplexity', 'generation', 'weights'] in one process" in log
    # history loads the model after 6 edits; downstream, perplexity and generation re-use it
    assert log.count("loaded and replayed once for this checkpoint job, re-used") == 3


@pytest.mark.slow
def test_a_new_grid_form_plans_only_its_new_checkpoints_and_extends_by_points(tiny_study, tmp_path):
    """A log-spaced grid on the finished run plans only the points it adds (the grid is no job
    param: the checkpoints 0 and 6 it shares with the linear grid are kept), and extending n_edits
    then plans only the grid's points beyond the old n_edits."""
    workdir = _copy_study(tiny_study, tmp_path)
    history = "results/rome-tiny/metrics/history/{:06d}.parquet".format
    set_config(workdir, lambda c: c["metrics"]["history"].update({"eval_every": {"per_decade": 3}}))  # 0 1 2 5 6
    res = snakemake(workdir, "-n")
    assert planned_metric_files(res, "history") == {history(k) for k in (1, 2, 5)}
    # checkpoint 3 left history's grid: its job (now weights alone, another input set) is planned
    # again, and keeps the weights file, whose evaluation key is unchanged
    assert all(not planned_metric_files(res, m) for m in ("downstream", "generation", "perplexity")), planned_jobs(res)
    assert planned_metric_files(res, "weights") <= {"results/rome-tiny/metrics/weights/000003.parquet"}
    weights3 = (workdir / "results/rome-tiny/metrics/weights/000003.parquet").read_bytes()
    snakemake(workdir)
    assert (workdir / "results/rome-tiny/metrics/weights/000003.parquet").read_bytes() == weights3
    if planned_metric_files(res, "weights"):
        assert "up to date by its evaluation key" in (workdir / "results/logs/rome-tiny/evaluate_000003.log").read_text()
    set_config(workdir, lambda c: c["runs"][0].update({"n_edits": 12}))  # grid 0 1 2 5 10 12
    res = snakemake(workdir, "-n")
    assert planned_metric_files(res, "history") == {history(10), history(12)}
    assert planned_jobs(res)["edit_segment"] == 2
    # a listed grid: only its points not computed yet (20 waits for a longer run)
    set_config(workdir, lambda c: c["metrics"]["history"].update({"eval_every": [0, 2, 4, 20]}))
    assert planned_metric_files(snakemake(workdir, "-n"), "history") == {history(4), history(12)}


@pytest.mark.slow
def test_a_bounded_history_sample_reruns_only_history_and_is_stratified(tiny_study, tmp_path):
    workdir = _copy_study(tiny_study, tmp_path)
    set_config(workdir, lambda c: c["metrics"]["history"].update({"sample": 2, "strata": 2}))
    res = snakemake(workdir, "-n")
    assert planned_metric_files(res, "history") == {f"results/rome-tiny/metrics/history/{k:06d}.parquet" for k in (0, 3, 6)}
    assert planned_jobs(res)["metric_config"] == 1 and checkpoint_jobs(planned_jobs(res)) == 3
    snakemake(workdir, "results/studies/test-tiny/tables/forgetting.parquet")
    import polars as pl

    at6 = pl.read_parquet(workdir / "results/rome-tiny/metrics/history/000006.parquet")
    # strata at k = 6 with 2 of them: ages [0, 3) = edits 4..6 and [3, 6) = edits 1..3, one edit from each
    picked = at6.select("item", "edit_index", "stratum_lo", "stratum_hi").unique().sort("edit_index")
    assert picked["stratum_lo"].to_list() == [1, 4] and picked["stratum_hi"].to_list() == [3, 6]
    assert picked["edit_index"][0] <= 3 < picked["edit_index"][1]
    forgetting = pl.read_parquet(workdir / "results/studies/test-tiny/tables/forgetting.parquet").filter(pl.col("edit") == 6).row(0, named=True)
    assert forgetting["n_scored"] == 2 and forgetting["retention_lo"] <= forgetting["retention"] <= forgetting["retention_hi"]


def test_replay_cli_matches_chain(tiny_study):
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "replay", "--model-dir", "data/models/tiny-gpt2",
                          "--run-dir", "results/rome-tiny", "--edit", "6"], cwd=tiny_study, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hashes = json.loads(res.stdout)["sha256"]
    stored, _ = read_delta(tiny_study / "results/rome-tiny/deltas/000006.h5")
    assert hashes == {m: tensor_sha256(t) for m, t in stored.items()}


def test_audit_fails_on_tampered_delta_naming_it(tiny_study, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    target = delta_path(workdir / "results/rome-tiny", 3)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "audit", "--configfile", "config/test-tiny.yaml"], cwd=workdir, capture_output=True, text=True)
    assert res.returncode != 0
    audit = json.loads((workdir / "results/studies/test-tiny/audit.failed.json").read_text())
    failed_files = {f["file"] for f in audit["failures"]}
    assert failed_files == {"results/rome-tiny/deltas/000003.h5"}, audit["failures"]


def _planned_shell_commands(text: str) -> list[tuple[str, int, str]]:
    """(rule, threads, shell command) of every job of a `snakemake -n -p` listing."""
    jobs, rule, threads = [], None, 1
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            rule, threads = line.split()[1].rstrip(":"), 1
        elif line.startswith("threads:"):
            threads = int(line.split()[1])
        elif line.startswith("Shell command:") and rule and line.split(":", 1)[1].strip() != "None":
            jobs.append((rule, threads, line.removeprefix("Shell command:").strip()))
    return jobs


def test_every_rule_command_parses_and_its_thread_budget_reaches_torch(repo_root, tmp_path):
    """Each planned job's exact shell command goes through the real CLI parser, and the rule's
    `threads` is what torch runs with (a sub-command flag must not overwrite the global one)."""
    import shlex

    import torch

    from editscale import cli

    workdir = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(workdir, "-n", "-p", "--forceall")
    jobs = _planned_shell_commands(res.stdout + res.stderr)
    assert {"corpus_tokens", "stats", "edit_segment", "report_tables", "audit"} <= {r for r, _, _ in jobs}
    assert any(t > 1 for r, t, _ in jobs if r in ("corpus_tokens", "stats"))
    parser = cli.build_parser()
    before = torch.get_num_threads()
    try:
        for rule, threads, command in jobs:
            argv = shlex.split(command.split(" 2> ")[0])
            assert argv[0] == "editscale", command
            args = parser.parse_args(argv[1:])
            assert args.threads == threads, (rule, command)
            seen = []
            args.func = lambda a, seen=seen: seen.append(torch.get_num_threads())
            assert cli.run(args) == 0
            assert seen == [threads], (rule, seen)
    finally:
        torch.set_num_threads(before)


def _planned_job_files(text: str) -> list[tuple[str, set[str], str]]:
    """(rule, declared input + output + log files, shell command) of every job of a `snakemake -n -p` listing."""
    jobs, rule, files = [], None, set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            rule, files = line.split()[1].rstrip(":"), set()
        elif line.startswith(("input:", "output:", "log:")):
            files |= {f.strip() for f in line.split(":", 1)[1].split(",") if f.strip()}
        elif line.startswith("Shell command:") and rule and line.split(":", 1)[1].strip() != "None":
            jobs.append((rule, files, line.removeprefix("Shell command:").strip()))
    return jobs


def test_metric_and_report_commands_are_handed_only_declared_files(repo_root, tmp_path):
    """Defect: metric and edit jobs got --run-dir + k and found the delta and factors by naming
    convention, and the report globbed results/; every results/ path a metric, edit or report
    command names must be one of its job's declared inputs or outputs."""
    import shlex

    from editscale.evaluate.registry import METRICS

    workdir = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(workdir, "-n", "-p", "--forceall")
    rules = {m.rule_name for m in METRICS.values() if m.grid == "segments"} | {"report_tables", "report_plots", "edit_segment", "context_templates"}
    checked, checkpoint = 0, 0
    for rule, files, command in _planned_job_files(res.stdout + res.stderr):
        if rule not in rules and not rule.startswith("evaluate__"):
            continue
        argv = shlex.split(command.split(" 2> ")[0])
        assert "--run-dir" not in argv, command
        named = [a for a in argv if a.startswith("results/") and not a.rstrip("/").endswith(("/tables", "/plots"))]
        assert named, command
        undeclared = [a for a in named if a not in files]
        assert not undeclared, (rule, undeclared)
        checked += 1
        checkpoint += rule.startswith("evaluate__")
    assert checked > len(rules) and checkpoint >= 3
    # a metric command refuses a state that lacks the file its checkpoint needs
    from editscale.evaluate.job import Checkpoint

    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"segment": 3}))
    st = Checkpoint("data/models/m", 5, {"state": [str(run_json), "results/r/deltas/000003.h5", "results/r/factors/000006.h5"]}).state
    assert (str(st.delta), str(st.factors)) == ("results/r/deltas/000003.h5", "results/r/factors/000006.h5")
    with pytest.raises(EditscaleError, match="deltas/000006.h5 among the given files"):
        _ = Checkpoint("data/models/m", 6, {"state": [str(run_json), "results/r/factors/000006.h5"]}).state


def _copy_study(tiny_study, tmp_path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    return workdir


def test_editing_the_hparams_file_reruns_the_run_and_is_recorded(tiny_study, tmp_path):
    """Defect: the hparams YAML was neither an input nor a param, so `v_lr: 0.5 -> 0.6` re-ran nothing."""
    workdir = _copy_study(tiny_study, tmp_path)
    path = workdir / "config/hparams/rome/tiny.yaml"
    text = path.read_text()
    assert "v_lr: 0.5\n" in text
    # a comment, a reordering or another spelling of the same number changes no value: nothing to do
    lines = text.replace("v_lr: 0.5\n", "v_lr: 5.0e-1  # same value\n").splitlines()
    path.write_text("# re-commented\n" + "\n".join(sorted(line for line in lines if not line.startswith("#"))) + "\n")
    assert planned_jobs(snakemake(workdir, "-n")) == {}
    path.write_text(text.replace("v_lr: 0.5\n", "v_lr: 0.6\n"))
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs["run_config"] == 1 and jobs["edit_segment"] == 2 and jobs["context_templates"] == 1, jobs
    snakemake(workdir, "results/rome-tiny/deltas/000003.h5")
    assert json.loads((workdir / "results/rome-tiny/run.json").read_text())["hparams"]["v_lr"] == 0.6
    _, attrs = read_delta(workdir / "results/rome-tiny/deltas/000003.h5")
    assert json.loads(attrs["hparams"])["v_lr"] == 0.6


def test_reordered_config_keys_rerun_nothing(tiny_study, tmp_path):
    """Defect: params were JSON in config order, so a YAML formatter that sorts keys re-planned the study."""
    workdir = _copy_study(tiny_study, tmp_path)
    path = workdir / "config/test-tiny.yaml"

    def reverse(obj):
        if isinstance(obj, dict):
            return {k: reverse(obj[k]) for k in reversed(list(obj))}
        return [reverse(v) for v in obj] if isinstance(obj, list) else obj

    cfg = yaml.safe_load(path.read_text())
    cfg["corpora"]["self-sample"]["seq_len"] = 32.0  # the same number, spelled as a float
    path.write_text(yaml.safe_dump(reverse(cfg), sort_keys=False))
    assert planned_jobs(snakemake(workdir, "-n")) == {}
    path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    assert planned_jobs(snakemake(workdir, "-n")) == {}


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda hp, run: hp.update(v_lrr=0.5), r"config/hparams/rome/tiny.yaml.*unknown key 'v_lrr' for method 'rome' \(did you mean 'v_lr'\?\)"),
        (lambda hp, run: run.update(hparams_overrides={"kl_factr": 0.1}), r"runs\[rome-tiny\].hparams_overrides: unknown key 'kl_factr'.*did you mean 'kl_factor'"),
        (lambda hp, run: run.update(method="memit"), r"config/hparams/rome/tiny.yaml.*unknown key 'key_averaging' for method 'memit'"),
        (lambda hp, run: hp.pop("v_lr"), r"config/hparams/rome/tiny.yaml.*missing required key\(s\) \['v_lr'\]"),
        (lambda hp, run: hp.update(v_lr="fast"), r"'v_lr' must be a number, got 'fast'"),
        (lambda hp, run: hp.update(key_averaging="mean"), r"'key_averaging' = 'mean' is not allowed.*allowed: \['prompt', 'templates'\]"),
        (lambda hp, run: hp.update(layers=[10]), r"'layers' = \[10\] is out of range for this 4-layer model \(allowed: 0..3\)"),
        (lambda hp, run: hp.update(v_loss_layer=4), r"'v_loss_layer' = 4 is out of range for this 4-layer model"),
        (lambda hp, run: hp.update(v_loss_layer=2), r"v_loss_layer 2 is not the last layer \(3\).*set v_loss_layer: 3"),
    ],
    ids=["unknown-key", "unknown-override", "wrong-method-file", "missing-key", "wrong-type", "not-allowed", "layer-range",
         "loss-layer-range", "rome-loss-layer"],
)
def test_bad_hparams_fail_at_plan_time_naming_file_and_key(repo_root, tmp_path, edit, expected):
    """Defect: typos in hparams (file or overrides) and a file for another method ran to the end."""
    import re

    workdir = copy_workflow(repo_root, tmp_path / "wf")
    path = workdir / "config/hparams/rome/tiny.yaml"
    hp = yaml.safe_load(path.read_text())
    cfg_path = workdir / "config/test-tiny.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    edit(hp, cfg["runs"][0])
    path.write_text(yaml.safe_dump(hp))
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = snakemake(workdir, "-n", check=False)
    assert res.returncode != 0
    assert re.search(expected, res.stdout + res.stderr), (res.stdout + res.stderr)[-3000:]
    assert not (workdir / "results").exists()  # nothing ran


@pytest.mark.slow
def test_lowered_n_edits_leaves_stale_checkpoints_out_of_the_report(tiny_study, tmp_path):
    """Defect: report_tables globbed results/*/metrics and factors, so checkpoints beyond a lowered
    n_edits (still on disk) entered every table, the summary and the phase detector."""
    import polars as pl

    workdir = _copy_study(tiny_study, tmp_path)
    set_config(workdir, lambda c: c["runs"][0].update({"n_edits": 3}))
    snakemake(workdir)
    assert (workdir / "results/rome-tiny/metrics/history/000006.parquet").exists()  # stale, still on disk
    assert (workdir / "results/rome-tiny/factors/000006.h5").exists()
    for family in ("history", "weights", "downstream", "perplexity"):
        edits = pl.read_parquet(workdir / f"results/studies/test-tiny/tables/{family}.parquet")["edit"].unique().to_list()
        assert max(edits) == 3, (family, edits)
    assert pl.read_parquet(workdir / "results/studies/test-tiny/tables/edit_log.parquet")["edit_index"].max() == 3
    assert pl.read_parquet(workdir / "results/studies/test-tiny/tables/edit_scores.parquet")["edit"].max() == 3
    weights = pl.read_parquet(workdir / "results/rome-tiny/metrics/weights/000003.parquet")
    assert weights.filter(pl.col("edit_index").is_not_null())["edit_index"].max() == 3


def test_schema_is_the_one_source_of_defaults_and_bounds(repo_root, tmp_path):
    """Defect: defaults and bounds were restated (and differed) in the schema, the commands and
    doctor; keys the commands read were forbidden by the schema."""
    from editscale.config import section, section_defaults
    from editscale.doctor import load_config as doctor_load
    from editscale.stats.corpus import COMMON_MINIMUM, normalize_spec

    # a command given no params gets the schema's default (generation read n_prompts 50, schema 20)
    assert section("metrics.generation").n_prompts == section_defaults("metrics.generation")["n_prompts"] == 20
    with pytest.raises(EditscaleError, match=r"metrics.generation: unknown key 'n_prompt' \(did you mean 'n_prompts'\?\)"):
        section("metrics.generation", {"n_prompt": 3})
    # corpus bounds: the schema's (corpus.py no longer has its own)
    import editscale.config as cfgmod

    corpus_props = cfgmod.schema()["properties"]["corpora"]["additionalProperties"]["properties"]
    assert {k: corpus_props[k]["minimum"] for k in COMMON_MINIMUM} == COMMON_MINIMUM
    with pytest.raises(EditscaleError, match="'seq_len' must be an integer >= 2"):
        normalize_spec({"kind": "self_sample", "seq_len": 1})
    # keys the commands read are accepted by the workflow
    workdir = copy_workflow(repo_root, tmp_path / "wf")

    def read_keys(c):
        c["metrics"]["downstream"]["batch_size"] = 8
        c["metrics"]["history"]["parts"] = ["efficacy"]
        c["metrics"]["generation"]["prompts"] = ["The capital of France is"]
        c["metrics"]["perplexity"]["ignore_id"] = 0
        c["report"] = {"window": 5, "slope_ratio": 2.5, "counts": [3, 6]}

    set_config(workdir, read_keys)
    assert checkpoint_jobs(planned_jobs(snakemake(workdir, "-n"))) >= 1
    # doctor loads configs the way the workflow does: a config the workflow rejects is rejected
    set_config(workdir, lambda c: c["runs"][0].update({"dataset": "nosuch"}))
    with pytest.raises(EditscaleError, match=r"runs\[rome-tiny\].dataset = 'nosuch' is not defined"):
        doctor_load(workdir / "config/test-tiny.yaml")
    set_config(workdir, lambda c: c["runs"][0].update({"dataset": "geofacts", "n_edit": 3}))
    with pytest.raises(EditscaleError, match="n_edit"):
        doctor_load(workdir / "config/test-tiny.yaml")


@pytest.mark.slow
def test_plugin_method_and_metric_run_through_the_workflow(repo_root, tmp_path):
    """A toy method and a toy metric, one file each outside src/ (tests/plugins), run the tiny
    workflow end to end via `plugins:` with no other file of editscale changed."""
    import polars as pl

    workdir = copy_workflow(repo_root, tmp_path / "wf")
    plugins = repo_root / "tests" / "plugins"
    hp = workdir / "config/hparams/toy-scale/tiny.yaml"
    hp.parent.mkdir(parents=True)
    hp.write_text("layers: [1]\nscale: 0.5\n")

    def use_plugins(c):
        c["plugins"] = ["toy_method", "toy_metric"]
        c["runs"][0].update(name="toy-tiny", method="toy-scale", hparams="config/hparams/toy-scale/tiny.yaml")
        c["metrics"]["toy_norm"] = {"eval_every": 3, "scale": 2.0}

    set_config(workdir, use_plugins)
    res = snakemake(workdir, env={"PYTHONPATH": str(plugins)})
    assert "toy_norm" in res.stdout + res.stderr and "evaluate__toy_tiny__" in res.stdout + res.stderr  # run by the checkpoint jobs
    # the method ran (its scalar key_norm reaches the edit log) and the metric saw its updates
    log = pl.read_parquet(workdir / "results/studies/test-tiny/tables/edit_log.parquet")
    assert log["run"].unique().to_list() == ["toy-tiny"] and (log["key_norm"] > 0).all()
    toy = pl.read_parquet(workdir / "results/studies/test-tiny/tables/toy_norm.parquet")
    assert sorted(toy["edit"].unique().to_list()) == [0, 3, 6]
    fro = {k: toy.filter((pl.col("edit") == k) & (pl.col("item") == "layer1"))["value"].item() for k in (0, 6)}
    assert fro[6] != fro[0]  # the toy edits changed layer 1
    unchanged = toy.filter(pl.col("item") == "layer0")["value"].unique()
    assert unchanged.len() == 1  # and nothing else
    # the report reads the metric's declared curve and figure: phases row, summary columns, figure file
    phases = pl.read_parquet(workdir / "results/studies/test-tiny/tables/phases.parquet")
    assert "toy_fro" in phases["curve"].to_list()
    summary = pl.read_parquet(workdir / "results/studies/test-tiny/tables/summary.parquet").row(0, named=True)
    mean6 = toy.filter(pl.col("edit") == 6)["value"].mean()
    assert summary["toy_fro_at_end"] == pytest.approx(mean6)
    assert (workdir / "results/studies/test-tiny/plots/toy_norm.html").is_file() and (workdir / "results/studies/test-tiny/plots/toy_norm.png").is_file()
    # a typo in the plugin metric's section is caught by its own schema fragment
    set_config(workdir, lambda c: c["metrics"]["toy_norm"].update({"scal": 1.0}))
    bad = snakemake(workdir, "-n", check=False, env={"PYTHONPATH": str(plugins)})
    assert bad.returncode != 0 and "scal" in bad.stdout + bad.stderr


def test_every_file_a_job_writes_is_a_declared_output(tiny_study):
    """Snakemake knows every file under results/ and data/ (nothing it would not clean, re-run or
    audit), except its own job records (benchmark tsv) and the files of the model directory, whose
    marker output is manifest.json (the weights' sha256s are in it)."""
    res = snakemake(tiny_study, "--list-untracked")
    untracked = [line.strip() for line in (res.stdout + res.stderr).splitlines() if line.startswith(("results/", "data/"))]
    allowed = ("results/benchmarks/", "data/models/tiny-gpt2/")
    unexpected = [f for f in untracked if not f.startswith(allowed)]
    assert not unexpected, unexpected


def test_a_plugin_module_that_registers_nothing_is_an_error_and_plugins_load_once(tmp_path, monkeypatch):
    """A plugin whose registration call is missing must not be ignored (even when its import
    loads a registry's built-ins); a registry scans its entry points once per process, not at
    every read."""
    import importlib.metadata

    from editscale import plugins
    from editscale.registry import Registry

    (tmp_path / "empty_plugin.py").write_text("from editscale.evaluate.registry import METRICS\nVALUE = len(METRICS)  # registers nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EditscaleError, match="plugin module 'empty_plugin' registered nothing"):
        plugins.load_plugins(["empty_plugin"])
    scans = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    registry = Registry("test-only thing", entry_points="editscale.test_only")
    try:
        assert "x" not in registry and list(registry) == [] and len(registry) == 0
        assert scans == [{"group": "editscale.test_only"}]  # once
    finally:
        from editscale.registry import REGISTRIES

        REGISTRIES.pop("test-only thing")


def test_a_configs_study_name_defaults_to_its_file_name(repo_root):
    """Issue 31 item 5: the study (where a config's tables, figures, audit and report go) is the
    config file's name unless `study:` names it; config.yaml's is `default`; a name that is no
    directory name is refused naming the key."""
    from editscale.workflow import prepare, study_path

    def cfg():
        return yaml.safe_load((repo_root / "config/test-tiny.yaml").read_text())

    assert prepare(cfg(), "config/test-tiny.yaml")["study"] == "test-tiny"
    assert prepare(cfg(), "config.yaml")["study"] == "default"
    named = prepare({**cfg(), "study": "ablation-2"}, "config/test-tiny.yaml")
    assert study_path(named, "tables", "summary.csv") == "results/studies/ablation-2/tables/summary.csv"
    with pytest.raises(EditscaleError, match=r"study: '\.\./x' does not match"):
        prepare({**cfg(), "study": "../x"}, "config/test-tiny.yaml")


@pytest.mark.slow
def test_two_configs_in_one_folder_keep_their_own_tables_and_share_runs(tiny_study, tmp_path):
    """Issue 31 item 5: a second config in the same folder re-planned report_tables for itself and
    replaced the first study's results/tables and results/plots. Each study has its own now; the
    runs they share are not recomputed."""
    import hashlib

    workdir = _copy_study(tiny_study, tmp_path)
    other = yaml.safe_load((workdir / "config/test-tiny.yaml").read_text())
    other.setdefault("report", {})["counts"] = [3]  # a different table of the same runs
    (workdir / "config/other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    first = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (workdir / "results/studies/test-tiny").rglob("*")
             if p.is_file() and "logs" not in p.parts and "benchmarks" not in p.parts}
    jobs = planned_jobs(snakemake(workdir, "-n", config="config/other.yaml"))
    assert set(jobs) <= {"report_tables", "report_plots", "audit", "all"}, jobs  # the runs are shared
    snakemake(workdir, config="config/other.yaml")
    assert (workdir / "results/studies/other/tables/summary.csv").is_file()
    assert (workdir / "results/studies/other/audit.json").is_file()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in first} == first  # the first study's, untouched
    assert planned_jobs(snakemake(workdir, "-n")) == {}
