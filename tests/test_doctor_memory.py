"""doctor's edit-job memory estimate against what one H200 measured (issue 27 item 2): the peak
GPU memory of ROME, MEMIT, AlphaEdit, ENCORE and UltraEdit at GPT-2 XL's shape in float32 and
Llama-3-8B's in bfloat16 (benchmarks/device_runs/h200-2026-12-04/device_check.json, made by
benchmarks/device_check.py: the published hparams, every optimization step run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from editscale.edit.methods import get_method, load_hparams
from editscale.models.registry import known_config, meta_model, module_shapes
from editscale.edit.cost import method_cost
from editscale.planning import edit_job_memory

ROOT = Path(__file__).resolve().parents[1]
RUN = json.loads((ROOT / "benchmarks/device_runs/h200-2026-12-04/device_check.json").read_text())
SOURCES = {"gpt2-xl": "hf:gpt2-xl", "llama3-8b": "hf:meta-llama/Meta-Llama-3-8B"}
MEASURED = [(s["shape"], s["dtype"], m["method"], m["peak_gib"]) for s in RUN["shapes"] for m in s["methods"]]


@pytest.mark.parametrize("shape,dtype,method,peak_gib", MEASURED, ids=[f"{s}-{m}" for s, _, m, _ in MEASURED])
def test_edit_job_memory_estimate_holds_the_h200_peaks(shape, dtype, method, peak_gib):
    cfg = known_config(SOURCES[shape])
    hp = load_hparams(ROOT / f"config/hparams/{method}/{shape}.yaml", method=method)
    cls = get_method(method, hp)
    shapes = module_shapes(cfg, cls.modules(meta_model(cfg), hp))
    est = edit_job_memory(method_cost(method, hp), cfg, dtype, shapes)
    assert est["total"] / 2**30 == pytest.approx(peak_gib, rel=0.12)
    assert est["weights"] / 2**30 == pytest.approx(next(s["model_gib"] for s in RUN["shapes"] if s["shape"] == shape), rel=1e-3)


@pytest.mark.slow
@pytest.mark.workflow
def test_a_run_that_cannot_fit_the_gpu_is_refused_at_plan_time(repo_root, tmp_path):
    """resources.gpu_mem_gb below the predicted peak of an edit job: `snakemake -n` fails naming the
    run, the rule and the figure (the Llama-3-8B study in bfloat16 on a 24 GiB card: AlphaEdit needs
    ~38.6 GiB); with 80 GiB it plans."""
    from benchmarks.snakemake_runs import copy_workflow, put_downstream_files, set_config, snakemake

    study = "config/paper/llama3-8b/methods-counterfact.yaml"
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    put_downstream_files(workdir)
    set_config(workdir, lambda c: c["resources"].update(gpu_mem_gb=24), name=study)
    res = snakemake(workdir, "-n", config=study, check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "run memit-llama3-8b: its edit jobs (rule edit_segment) need about 29.4 GiB" in text and "gpu_mem_gb = 24" in text
    set_config(workdir, lambda c: c["resources"].update(gpu_mem_gb=80), name=study)
    assert snakemake(workdir, "-n", config=study, check=False).returncode == 0


def _record(path: Path, rss_mib: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\tmax_vms\n" f"1.0\t0:00:01\t{rss_mib}\t{2 * rss_mib}\n")


def test_the_host_memory_fit_recovers_a_known_line_per_kind(repo_root, tmp_path):
    """Records written from known lines (peak RSS = a x model bytes + b + the job's working phase on
    the CPU) at two model sizes give back a and b per job kind; a kind seen at one size takes its
    family's slope; the prediction from the fit is the record."""
    from editscale import calibration as cb
    from editscale.memory import job_memory
    from editscale.planning import Calibration, config_jobs
    from editscale.workflow import load_config

    config = load_config(repo_root / "config/test-tiny.yaml")

    def variant(suffix: str, **model) -> list:
        other = json.loads(json.dumps(config))
        other["models"]["tiny-gpt2"].update(model)
        for r in other["runs"]:
            r["name"] += suffix
        return [j for j in config_jobs(other, tmp_path) if j.run]  # the shared jobs' records are config's

    truth = {"edit:rome": (1.3, 600e6), "metric:evaluate": (1.1, 800e6), "stats": (1.0, 500e6), "model": (2.0, 400e6),
             "edit:rome@half": (1.3, 900e6)}
    jobs = config_jobs(config, tmp_path)
    jobs_big = variant("-llama", source="tiny:llama")  # another architecture: a second model size, float32
    jobs_half = variant("-bf16", dtype="bfloat16")  # half precision on the CPU: its own fit
    assert {j.model_bytes for j in jobs if j.run} != {j.model_bytes for j in jobs_big}
    rss = {}
    for job in jobs + jobs_big + jobs_half:
        key = job.kind + ("@half" if job.dtype != "float32" and job.model_bytes else "")
        a, b = truth.get(key, truth.get(job.kind, (1.0, 700e6)))
        # worker processes hold the model each, their parent only Python and torch
        n = job.cpu_processes
        rss[job.record] = n * (a * job.model_bytes + b + job.device_extra) + (b if n > 1 else 0.0)
    assert any(j.cpu_processes == 2 for j in jobs if j.kind == "corpus")  # the self-sampling corpus job
    fits = cb.fit_memory(jobs + jobs_big + jobs_half, rss)
    for kind in ("edit:rome", "metric:evaluate"):
        assert fits[kind] == pytest.approx(list(truth[kind]), rel=1e-6), kind
    # one size in half precision: the float32 fit's slope, its own intercept
    assert fits["edit:rome@half"] == pytest.approx([1.3, 900e6], rel=1e-6)
    assert fits["stats"][0] == pytest.approx(1.0) and fits["stats"][1] == pytest.approx(500e6)  # one size, no family: a = 1
    cal = Calibration(memory=fits)
    for job in jobs + jobs_big + jobs_half:
        host = job_memory(job, cal, gpu=False).host
        if job.cpu_processes == 1:
            assert host == pytest.approx(rss[job.record], rel=1e-6), job.record
        else:  # the parent's floor (b) counted in each worker's share: a bound, over by (n + 1) / n x b
            assert rss[job.record] <= host <= rss[job.record] + 1.5 * 700e6 + 1, job.record
            assert job_memory(job, cal, gpu=True).host < host / 1.9  # on a GPU one process samples
    # on a GPU the half-precision edit job's host side is the float32 fit (its working set is on the device)
    half_edit = next(j for j in jobs_half if j.kind == "edit:rome")
    assert job_memory(half_edit, cal, gpu=True).host == pytest.approx(1.3 * half_edit.model_bytes + 600e6)
    # the record's column is MiB
    _record(tmp_path / "r.tsv", 512.0)
    assert cb.record_rss(tmp_path / "r.tsv") == 512 * 2**20
    (tmp_path / "bad.tsv").write_text("s\th:m:s\n1\t0:00:01\n")
    with pytest.raises(Exception, match="no `max_rss` column"):
        cb.record_rss(tmp_path / "bad.tsv")


def test_a_job_that_cannot_fit_the_host_memory_is_refused_with_every_figure(repo_root, tmp_path):
    """resources.mem_mb below the predicted peak of some job kinds: one error naming each (kind,
    owner, rule, MB, dtype); a limit above every prediction passes; the rules' mem_mb is the
    prediction x the margin."""
    from editscale.io import EditscaleError
    from editscale.memory import MB, RULE_MARGIN, MemoryPlan, check_memory, config_memory
    from editscale.workflow import load_config

    config = load_config(repo_root / "config/test-tiny.yaml")
    peaks = {(jm.job.kind, jm.job.run or jm.job.model): jm.host for jm in config_memory(config, tmp_path)}
    limit = sorted(peaks.values())[len(peaks) // 2] / MB  # about half the kinds above it
    config["resources"]["mem_mb"] = limit
    with pytest.raises(EditscaleError) as err:
        check_memory(config, tmp_path)
    text = str(err.value)
    over = [(k, o or "study") for (k, o), v in peaks.items() if v > limit * MB]
    assert over and f"{len(over)} job kind(s) cannot fit" in text
    for kind, owner in over:
        assert f"{owner}: its {kind} jobs" in text and f"more than resources.mem_mb = {limit}" in text
    assert "(model tiny-gpt2 in float32)" in text
    config["resources"]["mem_mb"] = max(peaks.values()) / MB + 1
    check_memory(config, tmp_path)
    plan = MemoryPlan(config, tmp_path)
    assert plan.mem_mb("edit", "rome-tiny") >= peaks[("edit:rome", "rome-tiny")] * RULE_MARGIN / MB
    assert plan.mem_mb("edit", "rome-tiny") - peaks[("edit:rome", "rome-tiny")] * RULE_MARGIN / MB < 100
