"""Metric lm_eval: lm-evaluation-harness on the in-memory model (plugin editscale.evaluate.harness),
offline on the shared SST-2 / MMLU subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.snakemake_runs import add_metric_to_finished_study, checkpoint_jobs, planned_jobs, set_config, snakemake
from editscale.evaluate.downstream import FORMATS, build_task
from editscale.evaluate.tasks import evaluate_task
from editscale.io import EditscaleError, read_jsonl
from editscale.models.fetch import build_tiny_model

DOWNSTREAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "downstream"


@pytest.fixture(autouse=True, scope="module")
def _lm_eval_registered_in_this_module_only(plugin_metric):
    """The plugin metric `lm_eval` exists for this module's tests only (conftest's plugin_metric)."""
    with plugin_metric("editscale.evaluate.harness", "lm_eval"):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_harness_accuracy_equals_accuracy_ll_on_the_same_items(arch, tmp_path):
    """The harness's multiple-choice `acc` (argmax of the summed log-likelihood of " " + choice
    after doc_to_text) and editscale's accuracy_ll (argmax of the mean token log-likelihood) on
    the same items, zero-shot: each choice's harness log-likelihood is editscale's mean times the
    choice's token count, and where a task's choices are equally long (SST-2's two words, MMLU's
    letters) the two accuracies are equal."""
    from editscale.evaluate.harness import evaluate_harness, harness_rows
    from editscale.evaluate.scoring import encode_targets

    model, tok = build_tiny_model(arch)
    for name in ("sst2", "mmlu"):
        # items that fit the tiny model's 512 positions: the two truncate over-long prompts differently
        records = [r for r in read_jsonl(DOWNSTREAM / f"{name}.jsonl") if len(tok(FORMATS[name].render(r))["input_ids"]) < 500][:24]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        task = build_task(name, records, name, n_eval=None, n_shots=0)
        mine, recs = evaluate_task(model, tok, task, generation=False)
        results, samples, files = evaluate_harness(model, tok, {f"editscale_{name}": None}, 0, 8, tmp_path, None, log_samples=True)
        assert files == {f"editscale_{name}": (tmp_path / f"{name}.jsonl").resolve()}
        theirs = results[f"editscale_{name}"]
        assert theirs["acc,none"] == pytest.approx(mine["accuracy_ll"]), name
        by_prompt = {it.prompt: rec for it, rec in zip(task.items, recs)}
        assert len(samples[f"editscale_{name}"]) == len(records)
        for s in samples[f"editscale_{name}"]:
            context = s["arguments"][0][0]
            logliks = [r[0] for r in s["filtered_resps"]]
            n_tokens = [len(t) for t in encode_targets(tok, task.items[0].choices)]
            assert logliks == pytest.approx([m * n for m, n in zip(by_prompt[context]["loglik"], n_tokens)], abs=1e-4)
        rows = harness_rows(3, results)
        assert set(rows["metric"]) >= {"acc,none"} and rows["item"].unique().to_list() == [f"editscale_{name}"]


@pytest.mark.slow
def test_harness_names_unknown_tasks_and_missing_data(tmp_path):
    from editscale.evaluate.harness import evaluate_harness

    model, tok = build_tiny_model("gpt2")
    with pytest.raises(EditscaleError, match=r"unknown task\(s\) \['nope'\]; shipped offline tasks: \['editscale_mmlu', 'editscale_sst2'\]"):
        evaluate_harness(model, tok, {"nope": None}, 0, 8, DOWNSTREAM, None)
    with pytest.raises(EditscaleError, match="data file .*sst2.jsonl not found"):
        evaluate_harness(model, tok, {"editscale_sst2": None}, 0, 8, tmp_path, None)


def _with_lm_eval(cfg, limit: int) -> None:
    cfg["plugins"] = ["editscale.evaluate.harness"]
    cfg["metrics"]["lm_eval"] = {"eval_every": 6, "tasks": {"editscale_sst2": {"limit": limit}}, "data_dir": str(DOWNSTREAM)}


@pytest.mark.slow
def test_the_lm_eval_metric_plans_only_its_jobs_and_reruns_only_itself(tiny_study, tmp_path):
    workdir = tmp_path / "copy"
    jobs, changed = add_metric_to_finished_study(tiny_study, workdir, lambda c: _with_lm_eval(c, 8))
    assert checkpoint_jobs(jobs) == 2  # checkpoints 0 and 6 of its grid
    snakemake(workdir)
    assert changed() == set()  # the other metrics' files are kept
    import polars as pl

    table = pl.read_parquet(workdir / "results/studies/test-tiny/tables/lm_eval.parquet")
    assert set(table["item"]) == {"editscale_sst2"} and "acc,none" in set(table["metric"])
    summary = pl.read_parquet(workdir / "results/studies/test-tiny/tables/summary.parquet")
    assert "lm_eval_acc_at_end" in summary.columns
    set_config(workdir, lambda c: _with_lm_eval(c, 6))
    jobs = planned_jobs(snakemake(workdir, "-n"))
    assert jobs["metric_config"] == 1 and checkpoint_jobs(jobs) == 2 and "edit_segment" not in jobs, jobs


def test_a_config_naming_the_plugin_without_the_package_fails_at_plan_time(tmp_path, monkeypatch):
    import importlib.util

    import editscale.evaluate.harness as harness

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else object())
    with pytest.raises(EditscaleError, match=r"metric lm_eval needs lm-evaluation-harness: pip install 'editscale\[lm-eval\]'"):
        harness._require_lm_eval()
