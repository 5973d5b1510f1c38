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
    from benchmarks.snakemake_runs import copy_workflow, set_config, snakemake

    study = "config/paper/llama3-8b/methods-counterfact.yaml"
    workdir = copy_workflow(repo_root, tmp_path / "wf")
    set_config(workdir, lambda c: c["resources"].update(gpu_mem_gb=24), name=study)
    res = snakemake(workdir, "-n", config=study, check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "run memit-llama3-8b: its edit jobs (rule edit_segment) need about 29.4 GiB" in text and "gpu_mem_gb = 24" in text
    set_config(workdir, lambda c: c["resources"].update(gpu_mem_gb=80), name=study)
    assert snakemake(workdir, "-n", config=study, check=False).returncode == 0
