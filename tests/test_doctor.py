"""Half-precision models with fp32 edit math, and `editscale doctor` (machine report and estimates).

No GPU here: the bf16 path is exercised on the CPU with tiny random models; the CUDA branches of
`pick_device` / `doctor` run only where torch sees a GPU.
"""

from __future__ import annotations

import json

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from editscale.edit.cost import method_cost
from editscale.layout import SegmentFiles, StateFiles
from editscale.edit.chain import model_at, read_delta, read_factors, replay_delta, run_segment, tensor_sha256
from editscale.layout import delta_path, factors_path
from editscale.edit.weights import WeightState
from editscale.doctor import doctor, load_config, machine_info, measure_flops, render
from editscale.models.registry import KNOWN_CONFIGS, known_config, module_shapes, n_params
from editscale.planning import edit_flops, storage_estimate
from editscale.models.load import load_model, pick_device
from editscale.models.registry import edited_weight, from_math, to_math
SEGMENT = 2  # the segment make_run writes (conftest)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_model_in_half_precision(tiny_model_dirs, dtype):
    model, _ = load_model(tiny_model_dirs("gpt2"), dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def test_weight_state_keeps_fp32_and_casts_on_write(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs("gptj"), dtype="bfloat16", device="cpu")
    module = "transformer.h.1.mlp.fc_out"
    ws = WeightState(model, [module])
    assert ws.base[module].dtype == torch.float32 and ws.delta[module].dtype == torch.float32
    from editscale.edit.weights import Update

    g = torch.Generator().manual_seed(0)
    d_out, d_in = ws.base[module].shape
    u, v = torch.randn(d_out, 1, generator=g) * 1e-3, torch.randn(d_in, 1, generator=g)
    ws.apply(Update(module, u=u, v=v))
    assert ws.delta[module].dtype == torch.float32
    # the delta keeps increments far below bf16's resolution of the weights ...
    assert torch.equal(ws.delta[module], torch.outer(u[:, 0], v[:, 0]))
    # ... and the live bf16 parameter is W0 + D rounded once
    expected = from_math(model, ws.base[module] + ws.delta[module]).to(torch.bfloat16)
    assert torch.equal(edited_weight(model, module), expected)


@pytest.mark.parametrize("arch", ["gpt2", "gptj"])
def test_rome_segment_in_bfloat16(make_run, tmp_path, tiny_model_dirs, repo_root, arch):
    """A ROME chain on a bf16 model: deltas and factors are fp32, replay is exact, the edited bf16
    weight is W0 + D rounded once, and the updates match the fp32 chain's up to bf16 forward noise."""
    model_dir = tiny_model_dirs(arch)
    deltas = {}
    for dtype in ("float32", "bfloat16"):
        run_dir, resolved, stats = make_run(tmp_path / dtype, model_dir, n=2)
        run_segment(model_dir, SegmentFiles.in_run(run_dir, SEGMENT, SEGMENT), {**resolved, "dtype": dtype}, {"mom2": stats},
                    run_dir / "templates.json", device="cpu")
        deltas[dtype], _ = read_delta(delta_path(run_dir, SEGMENT))
    (module,) = deltas["bfloat16"]
    with h5py.File(delta_path(run_dir, SEGMENT)) as f:
        assert f[module].dtype == np.float32
    updates, rows, _, _ = read_factors(factors_path(run_dir, SEGMENT))
    assert len(updates) == 2 and all(u.u.dtype == torch.float32 and u.v.dtype == torch.float32 for _, u in updates)
    assert all(np.isfinite(r["v_loss"]) for r in rows)
    d16, d32 = deltas["bfloat16"][module], deltas["float32"][module]
    assert float(d16.norm()) > 0
    assert float((d16 - d32).norm() / d32.norm()) < 0.05
    assert tensor_sha256(replay_delta(run_dir, SEGMENT, SEGMENT)[module]) == tensor_sha256(d16)
    # the edited model in bf16 = base bf16 weights + fp32 delta, rounded once
    edited, tok = model_at(model_dir, StateFiles.in_run(run_dir, SEGMENT, SEGMENT), dtype="bfloat16", device="cpu")
    base, _ = load_model(model_dir, dtype="bfloat16", device="cpu")
    w0 = to_math(base, edited_weight(base, module)).float()
    assert torch.equal(to_math(edited, edited_weight(edited, module)), (w0 + d16).to(torch.bfloat16))
    # and the edits move the model towards the new targets (the tiny hparams make small edits)
    from editscale.evaluate.edit_scores import case_metrics
    from editscale.io import read_jsonl

    cases = read_jsonl(run_dir / "edits.jsonl")
    before = sum(m["nll_new"] for m in case_metrics(base, tok, cases))
    after = sum(m["nll_new"] for m in case_metrics(edited, tok, cases))
    assert after < before


def test_storage_formula_matches_written_files(make_run, tmp_path, tiny_model_dirs, repo_root):
    model_dir = tiny_model_dirs("gpt2")
    run_dir, resolved, stats = make_run(tmp_path, model_dir, n=2)
    run_segment(model_dir, SegmentFiles.in_run(run_dir, SEGMENT, SEGMENT), resolved, {"mom2": stats}, run_dir / "templates.json")
    model, _ = load_model(model_dir)
    module = next(iter(stats))
    shape = tuple(to_math(model, edited_weight(model, module)).shape)
    from transformers import AutoConfig

    assert module_shapes(AutoConfig.from_pretrained(str(model_dir)), [module]) == {module: shape}
    est = storage_estimate({"n_edits": SEGMENT, "segment": SEGMENT}, {module: shape}, n_params(model.config))
    extra_delta = delta_path(run_dir, SEGMENT).stat().st_size - est["delta_per_checkpoint"]
    extra_factors = factors_path(run_dir, SEGMENT).stat().st_size - est["factors_per_checkpoint"]
    assert 0 <= extra_delta < 40_000 and 0 <= extra_factors < 60_000  # HDF5 headers, attributes, log
    assert est["study_per_save"] == 4 * sum(p.numel() for p in model.parameters())


def test_published_configs_give_the_known_sizes():
    assert n_params(known_config("hf:gpt2-xl")) == 1_557_611_200
    assert n_params(known_config("hf:EleutherAI/gpt-j-6B")) == 6_050_882_784
    assert 134_000_000 < n_params(known_config("embedded:smollm2-135m-instruct")) < 136_000_000
    assert set(KNOWN_CONFIGS) >= {"hf:gpt2-xl", "hf:EleutherAI/gpt-j-6B"}


def test_edit_flops_formula():
    hp = {"layers": [17], "v_num_grad_steps": 20, "context_template_length_params": [[5, 10], [10, 10]]}
    n = 1_557_611_200
    fl = edit_flops("rome", hp, n, {"m": (1600, 6400)}, segment=20, n_layers=48)
    n_tpl, mean_len = 21, (5 * 10 + 10 * 10) / 21
    tokens = (n_tpl + 1) * (mean_len + 12)
    assert fl["tokens"] == pytest.approx(tokens)
    assert fl["model"] == pytest.approx(20 * (2 + 2 * 31 / 48) * n * tokens + 2 * n * n_tpl * (mean_len + 12))
    assert fl["solve"] == pytest.approx(6400**3 / 3 / 20 + 2 * 6400**2)
    memit = edit_flops("memit", {**hp, "layers": [13, 14, 15, 16, 17]}, n, {f"m{i}": (1600, 6400) for i in range(5)}, 20, 48)
    assert memit["solve"] == pytest.approx(5 * (2 / 3 * 6400**3 + 2 * 6400**2))


def test_machine_info_and_device():
    info = machine_info(".")
    assert info["torch"] == torch.__version__ and info["cpu_count"] >= 1 and info["disk_free"] > 0
    assert info["device"] == str(pick_device("auto"))
    if not torch.cuda.is_available():
        assert info["device"] == "cpu" and "gpu_name" not in info
    assert measure_flops("cpu", torch.float32, seconds=0.05) > 1e8


@pytest.mark.parametrize("load", [0.0, 64.0])
def test_doctor_says_when_a_busy_machine_measured_its_matmul_rate(repo_root, tmp_path, monkeypatch, load):
    """A rate measured while no core was free is several times too low: the report says so (with
    the load it saw), and stays quiet on an idle machine; --flops measures nothing and says nothing."""
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    # a calibration fitted elsewhere: on the machine the shipped one was fitted on, doctor would
    # take its rates instead of measuring
    shipped = json.loads((REPO / "src/editscale/doctor_calibration.json").read_text())
    (tmp_path / "cal.json").write_text(json.dumps({**shipped, "machine": "another machine"}))
    rep = doctor(repo_root / "config/test-tiny.yaml", root=tmp_path, calibration=tmp_path / "cal.json")
    assert rep["machine"]["matmul_rate_from"] == "measured"
    busy = rep["machine"].get("matmul_rate_busy_load")
    text = render(rep)
    said = "busy while the rate was measured"
    if load and rep["machine"]["device"] == "cpu":
        assert busy == load and f"{said} (load average {load:.2f} on" in text
        assert "--flops" in text and "--benchmarks" in text
    else:
        assert busy is None and said not in text
    given = doctor(repo_root / "config/test-tiny.yaml", flops=1e10, root=tmp_path)
    assert "matmul_rate_busy_load" not in given["machine"] and said not in render(given)


def test_doctor_estimates_the_tiny_config(repo_root, tmp_path):
    rep = doctor(repo_root / "config/test-tiny.yaml", bench=False, flops=1e10, root=tmp_path)
    (est,) = rep["runs"]
    assert est["shapes_from"] == "tiny model" and est["storage"]["checkpoints"] == 2
    t = rep["time"]["runs"]["rome-tiny"]
    assert t["seconds_per_edit"] > 0 and est["eval_jobs"] == t["eval_jobs"] > 0
    assert rep["time"]["wall_s"] >= rep["time"]["critical_path_s"] > t["edit_chain_s"]
    text = render(rep)
    assert "run rome-tiny" in text and "storage per checkpoint" in text and "per edit" in text


def test_doctor_cli_machine_report(tmp_path):
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "doctor", "--no-bench"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"torch {torch.__version__}" in res.stdout and "CPUs" in res.stdout and "disk free" in res.stdout
    if not torch.cuda.is_available():
        assert "no CUDA GPU visible" in res.stdout


def _write_record(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("s\th:m:s\tmax_rss\n" f"{seconds!r}\t0:00:00\t100.0\n")


def test_calibration_fit_recovers_the_time_model(repo_root, tmp_path):
    """Records made by a known time model (startup, per-kind factors, fixed kinds) give back exactly
    that model; the comparison's totals are the sums of the per-job estimates."""
    from editscale import calibration as cb
    from editscale.planning import Calibration, config_jobs

    config = load_config(repo_root / "config/test-tiny.yaml")
    jobs = config_jobs(config, tmp_path)
    kinds = {j.kind for j in jobs}
    assert {"edit:rome", "metric:evaluate", "metric:edit_scores", "stats", "corpus", "report_plots"} <= kinds
    rate = 2e10
    # no job of this config starts without loading the model or computing (every metric but the edit
    # scores runs in the checkpoint jobs), so the start-up is the default the fit falls back to
    truth = Calibration(startup_s=cb.DEFAULT_STARTUP_S, factors={k: 1.5 + 0.25 * i for i, k in enumerate(sorted(kinds))},
                        fixed={"model": 12.0, "report_tables": 7.0, "report_plots": 9.0, "audit": 5.0})
    bench = tmp_path / "results" / "benchmarks"
    for job in jobs:
        _write_record(bench / Path(job.record).relative_to("results/benchmarks"), truth.seconds(job, rate, rate / 2))
    seconds = cb.measured(jobs, bench)
    assert len(seconds) == len(jobs)
    fitted = cb.fit(jobs, seconds, rate, rate / 2, source="test")
    assert fitted.startup_s == pytest.approx(truth.startup_s) and fitted.fixed == pytest.approx(truth.fixed)
    for kind in kinds - set(truth.fixed):
        assert fitted.factors[kind] == pytest.approx(truth.factors[kind]), kind
    rows = cb.comparison(jobs, seconds, {"fitted": fitted}, rate, rate / 2)
    assert rows[-1]["kind"] == "all" and rows[-1]["jobs"] == len(jobs)
    assert rows[-1]["fitted"] == pytest.approx(rows[-1]["measured_s"])
    # a kind the records never saw falls back to its family's mean factor
    mean_edit = fitted.factors["edit:*"]
    assert fitted.factor("edit:memit") == mean_edit and mean_edit == pytest.approx(truth.factors["edit:rome"])


def test_remaining_time_of_a_study_in_progress_counts_only_the_jobs_left_at_their_cpu_seconds(repo_root, tmp_path):
    """--remaining: the finished jobs (a record each) count 0; the rest are timed by the model
    refitted per kind to the finished jobs' CPU seconds per thread, not their wall seconds (a study
    over sittings waits beside other work), and a kind not yet recorded keeps the calibration's."""
    from editscale import calibration as cb
    from editscale.cli import main
    from editscale.doctor import calibrate
    from editscale.planning import Calibration, config_jobs

    config = load_config(repo_root / "config/test-tiny.yaml")
    jobs = config_jobs(config, tmp_path)
    rate = 2e10
    kinds = sorted({j.kind for j in jobs})
    truth = Calibration(startup_s=cb.DEFAULT_STARTUP_S, factors={k: 1.5 + 0.25 * i for i, k in enumerate(kinds)},
                        fixed={"model": 12.0, "report_tables": 7.0, "report_plots": 9.0, "audit": 5.0})
    run = config["runs"][0]["name"]
    # in progress: the shared set-up, the first run's templates, first edit segment and first checkpoint
    finished = [j for j in jobs if j.kind in ("model", "corpus", "stats", "nullspace") or (
        j.run == run and (j.kind == "context_templates" or j.record.endswith(("edit_segment_000003.tsv", "evaluate_000000.tsv"))))]
    assert any(j.kind.startswith("edit:") for j in finished) and len(finished) < len(jobs)
    bench = tmp_path / "results" / "benchmarks"
    for job in finished:
        own = truth.seconds(job, rate, rate / 2)
        path = bench / Path(job.record).relative_to("results/benchmarks")
        path.parent.mkdir(parents=True, exist_ok=True)  # 3x the job's own time in wall seconds: it waited beside other work
        path.write_text("s\th:m:s\tmax_rss\tcpu_time\n" f"{3 * own!r}\t0:00:00\t100.0\t{own * job.threads!r}\n")
    # the calibration in use: off by 2x for the kinds the records hold, right for the others
    recorded = {j.kind for j in finished}
    used = Calibration(startup_s=truth.startup_s, factors={k: v * (2 if k in recorded else 1) for k, v in truth.factors.items()},
                       fixed={k: v * (2 if k in recorded else 1) for k, v in truth.fixed.items()})
    out = calibrate(config, bench, rate, rate / 2, used, 2, tmp_path, remaining=True)
    left = out["time_remaining"]
    done = {j.record for j in finished}
    assert left["jobs_done"] == len(finished) and left["jobs_left"] == len(jobs) - len(finished) and left["jobs_total"] == len(jobs)
    assert left["total_job_s"] == pytest.approx(sum(truth.seconds(j, rate, rate / 2) for j in jobs if j.record not in done))
    assert left["measured_s"] == pytest.approx(3 * left["measured_cpu_s"])
    edits = [j for j in jobs if j.run == run and j.kind.startswith("edit:")]
    r = left["runs"][run]
    assert r["edit_jobs_left"] == len(edits) - 1
    assert r["edit_chain_s"] == pytest.approx(sum(truth.seconds(j, rate, rate / 2) for j in edits[1:]))
    assert left["wall_s"] >= left["critical_path_s"] > 0 and "CPU seconds of the" in left["calibration"]
    # the CLI asks for the records it needs
    assert main(["doctor", "--configfile", str(repo_root / "config/test-tiny.yaml"), "--remaining", "--no-bench"]) == 2


@pytest.mark.slow
def test_doctor_calibrates_from_a_runs_benchmark_records(tiny_study, tmp_path):
    """`doctor --benchmarks` on the tiny workflow's own records: every recorded job kind is compared,
    the fitted model reproduces the measured job time, and a saved calibration read back with
    --calibration gives the same estimate."""
    import json

    exe = str(Path(sys.executable).parent / "editscale")
    cal = tmp_path / "cal.json"
    args = [exe, "doctor", "--configfile", "config/test-tiny.yaml", "--flops", "2e10", "--cores", "2"]
    res = subprocess.run([*args, "--benchmarks", "results/benchmarks", "--save-calibration", str(cal), "--json"],
                         cwd=tiny_study, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    recorded = {p.relative_to(tiny_study / "results" / "benchmarks") for p in (tiny_study / "results" / "benchmarks").rglob("*.tsv")}
    check = {row["kind"]: row for row in rep["calibration_check"]}
    assert check["all"]["jobs"] == len(recorded) and {"edit:rome", "metric:evaluate", "stats", "report_plots"} <= set(check)
    assert check["all"]["estimate_fitted"] == pytest.approx(check["all"]["measured_s"], rel=0.01)
    saved = json.loads(cal.read_text())
    assert saved == {**rep["fitted_calibration"], **rep["fitted_memory"]} and saved["startup_s"] > 0
    # the memory model, fitted to the same records' max RSS: every recorded kind is compared
    mem = {row["kind"] for row in rep["memory_check"]}
    assert {"edit:rome", "metric:evaluate", "stats", "corpus", "model", "audit"} <= mem <= set(saved["memory"])
    assert all(row["measured"] > 50 * 2**20 for row in rep["memory_check"])  # a Python + torch process at least
    res2 = subprocess.run([*args, "--calibration", str(cal), "--json"], cwd=tiny_study, capture_output=True, text=True)
    assert res2.returncode == 0, res2.stderr
    again = json.loads(res2.stdout)
    assert again["time"]["total_job_s"] == pytest.approx(rep["time_fitted"]["total_job_s"])
    assert again["memory_source"] == saved["memory_source"]
    text = subprocess.run([*args, "--benchmarks", "results/benchmarks"], cwd=tiny_study, capture_output=True, text=True).stdout
    assert "| job kind | jobs | measured |" in text and "`snakemake --cores 2`" in text
    assert "measured max RSS (Snakemake records) against predicted" in text and "| edit:rome |" in text
    # the finished study has nothing left
    done = json.loads(subprocess.run([*args, "--benchmarks", "results/benchmarks", "--remaining", "--json"], cwd=tiny_study,
                                     capture_output=True, text=True, check=True).stdout)["time_remaining"]
    assert done["jobs_left"] == 0 and done["total_job_s"] == 0 and done["jobs_done"] == len(recorded)
    bad = subprocess.run([*args, "--benchmarks", str(tmp_path / "nowhere")], cwd=tiny_study, capture_output=True, text=True)
    assert bad.returncode != 0 and "nowhere: no such directory" in bad.stderr


def test_a_calibration_fitted_on_this_machine_keeps_its_matmul_rates(tmp_path):
    """The rates a calibration was fitted at are reused on the same machine (a short matmul loop
    varies by 1.5x on a shared VM), and measured again on another."""
    from editscale.doctor import doctor, machine_fingerprint, machine_info

    here = machine_fingerprint(machine_info("."))
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    same.write_text(json.dumps({"rate32": 1.25e9, "rate64": 0.5e9, "machine": here}))
    other.write_text(json.dumps({"rate32": 1.25e9, "rate64": 0.5e9, "machine": "another CPU | 64 | cpu |  | 2.0"}))
    rep = doctor(None, calibration=same)
    assert rep["machine"]["matmul_flops_fp32"] == 1.25e9 and rep["machine"]["matmul_flops_fp64"] == 0.5e9
    assert rep["machine"]["matmul_rate_from"].startswith("the calibration's")
    rep = doctor(None, calibration=other)
    assert rep["machine"]["matmul_rate_from"] == "measured" and rep["machine"]["matmul_flops_fp32"] != 1.25e9


def test_nas_anchor_counts_once_in_the_first_segment_and_ultraedit_factors_count_target_tokens():
    from editscale.planning import PROMPT_TOKENS, TARGET_TOKENS, UPDATE_BYTES

    n = 134_515_008
    hp = {"layers": [3, 4, 5], "v_num_grad_steps": 25, "nas_restart": 256, "context_template_length_params": [[10, 10]]}
    nas = edit_flops("nas", hp, n, {f"m{i}": (576, 1536) for i in range(3)}, 20, 30)
    alpha = edit_flops("alphaedit", hp, n, {f"m{i}": (576, 1536) for i in range(3)}, 20, 30)
    assert alpha["begin"] == 0 and nas["model"] == alpha["model"]
    assert nas["begin"] == pytest.approx(256 * 25 * 2 * PROMPT_TOKENS * nas["flops_per_token_step"])
    shapes = {"gate": (1536, 576)}
    rank = method_cost("ultraedit", {}).factor_rank(TARGET_TOKENS)
    assert rank == TARGET_TOKENS > 1
    est = storage_estimate({"n_edits": 20, "segment": 20}, shapes, n, rank=rank)
    assert est["factor_bytes_per_edit"] == round(TARGET_TOKENS * UPDATE_BYTES["lowrank"](1536, 576))


def test_the_nas_anchor_is_in_the_first_edit_job_only(repo_root, tmp_path, plugin_metric):
    from editscale import workflow as wf
    from editscale.planning import run_jobs

    with plugin_metric("editscale.evaluate.generated", "answers"):  # the config's plugin, for this test only
        config = wf.load_config(repo_root / "config/methods.yaml")
        run = wf.run_by_name(config, "nas-smollm2-geofacts-s0")
        edits = [j for j in run_jobs(config, run, tmp_path) if j.kind == "edit:nas"]
    assert len(edits) == 10 and len({j.flops for j in edits[1:]}) == 1
    assert edits[0].flops > edits[1].flops  # the anchor's optimizations, on top of the segment's edits


def test_a_bounded_history_sample_makes_the_history_estimate_flat_in_k():
    from editscale.evaluate.metrics.history import cost as history_cost

    full, sampled = {"sample": "all"}, {"sample": 500}
    assert history_cost(None, full, None, 1.0, 10_000)[0] == 20 * history_cost(None, full, None, 1.0, 500)[0]
    assert history_cost(None, sampled, None, 1.0, 10_000)[0] == history_cost(None, sampled, None, 1.0, 500)[0]
    assert history_cost(None, sampled, None, 1.0, 100)[0] == history_cost(None, full, None, 1.0, 100)[0]
