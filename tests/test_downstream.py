"""Downstream tasks: readers on the real shared JSONL files, metrics, parsers, probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from editscale.evaluate.downstream import (
    FORMATS,
    INVALID,
    Item,
    Task,
    accuracy,
    build_task,
    build_tasks,
    choice_loglik,
    evaluate_task,
    f1_weighted,
    load_task,
    mcc,
    parse_letter,
    parse_prefix,
    parse_word,
    select_shots,
    task_config,
)
from editscale.evaluate.probes import PROBE_PREFIX, PROBES, build_probe, countries, keep_solved
from editscale.evaluate.scoring import target_nll
from editscale.io import read_jsonl
from editscale.models.fetch import build_tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "downstream"

# records per ../shared/data/README.md and the label set of each file
EXPECTED = {
    "sst2": (856, {0, 1}),
    "mrpc": (258, {0, 1}),
    "rte": (262, {0, 1}),
    "cola": (644, {0, 1}),
    "nli": (2489, {0, 1}),
    "mmlu": (1516, {0, 1, 2, 3}),
    "dialogue": (886, {0, 1, 2, 3}),
    "sentiment_analysis": (872, {0, 1}),
}

needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared downstream data not available")


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama")


# ---------------------------------------------------------------------------------------------
# metrics


def test_f1_mcc_hand_computed():
    labels = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 0, 1, 0, 1, 0, INVALID, 0]
    # class 0: support 4, TP 3, FP 1, FN 1 -> F1 6/8; class 1: support 4, TP 2, FP 1, FN 2 -> F1 4/7
    assert f1_weighted(labels, preds) == pytest.approx((4 * 0.75 + 4 * 4 / 7) / 8)
    assert f1_weighted(labels, preds) == pytest.approx(37 / 56)
    # confusion over classes (-1, 0, 1): t = (0, 4, 4), p = (1, 4, 3), trace 5, n 8
    assert mcc(labels, preds) == pytest.approx((5 * 8 - (0 * 1 + 4 * 4 + 4 * 3)) / math.sqrt((64 - 26) * (64 - 32)))
    assert mcc(labels, preds) == pytest.approx(0.344124, abs=1e-6)
    assert accuracy(labels, preds) == pytest.approx(5 / 8)
    # binary textbook: TP 1, TN 2, FP 0, FN 1 -> 2 / sqrt(1 * 2 * 2 * 3)
    assert mcc([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    assert mcc([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert mcc([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # constant prediction: undefined -> 0
    assert f1_weighted([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert f1_weighted([0, 0], [INVALID, INVALID]) == 0.0


def test_parsers():
    assert parse_word("  positive\nReview : bad", ["negative", "positive"]) == 1
    assert parse_word(" Negative.", ["negative", "positive"]) == 0
    assert parse_word(" No, yes", ["No", "Yes"]) == 0  # first occurrence wins
    assert parse_word(" Nothing here", ["No", "Yes"]) == INVALID  # whole words only
    assert parse_word("\n\nYes", ["No", "Yes"]) == 1
    assert parse_word(" maybe\nYes", ["No", "Yes"]) == INVALID  # only the first answer line
    assert parse_letter(" B\nQuestion", list("ABCD")) == 1
    assert parse_letter(" (C) because", list("ABCD")) == 2
    assert parse_letter(" a", list("ABCD")) == INVALID
    assert parse_letter(" As", list("ABCD")) == INVALID
    assert parse_prefix(" San Juan is", ["San Jose", "San Juan", "San"]) == 1
    assert parse_prefix(" 12.", ["1", "12", "13"]) == 1
    assert parse_prefix(" Parisian", ["Paris", "Rome"]) == INVALID


# ---------------------------------------------------------------------------------------------
# readers on the real files


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_on_shared_file(name):
    n, label_set = EXPECTED[name]
    records = read_jsonl(DATA / f"{name}.jsonl")
    assert len(records) == n
    fmt = FORMATS[name]
    assert {fmt.label(r) for r in records} == label_set
    assert len(fmt.classes) == len(label_set)
    task = load_task(name, {"path": str(DATA / f"{name}.jsonl"), "n_eval": None, "n_shots": 4, "seed": 0})
    assert len(task.items) == n - 4  # every record but the few-shot examples
    assert {it.answer for it in task.items} == label_set
    assert all(it.choices == fmt.classes for it in task.items)
    # prompts end right before the answer; the few-shot context (with answers) is a common prefix
    shots, evals = select_shots(records, fmt.label, 4, None, 0)
    context = "".join(fmt.render(r) + " " + fmt.classes[fmt.label(r)] + "\n" for r in shots)
    assert all(x.prompt == context + fmt.render(r) for x, r in zip(task.items, evals))
    assert task.items[0].cf_prompt.startswith(context) and "N/A" in task.items[0].cf_prompt
    # no few-shot example is evaluated (compare record identity and content)
    assert not any(r is e or r == e for r in shots for e in evals)
    # deterministic and seeded
    again = load_task(name, {"path": str(DATA / f"{name}.jsonl"), "n_eval": 50, "n_shots": 4, "seed": 0})
    assert [x.prompt for x in again.items] == [x.prompt for x in task.items[:50]]
    other = load_task(name, {"path": str(DATA / f"{name}.jsonl"), "n_eval": 50, "n_shots": 4, "seed": 1})
    assert [x.prompt for x in other.items] != [x.prompt for x in again.items]


@needs_data
def test_shots_are_class_balanced():
    records = read_jsonl(DATA / "sst2.jsonl")
    task = build_task("sst2", records, n_eval=10, n_shots=4, seed=3)
    ctx = task.items[0].cf_prompt
    assert ctx.count("Sentiment : positive") == 2 and ctx.count("Sentiment : negative") == 2
    assert task.meta["n_shots"] == 4
    mmlu = build_task("mmlu", read_jsonl(DATA / "mmlu.jsonl"), n_eval=5, n_shots=4, seed=0)
    answers = [line.split("Answer: ")[1] for line in mmlu.items[0].cf_prompt.split("\n") if line.startswith("Answer: ")]
    assert sorted(answers) == ["A", "B", "C", "D"]


def test_rte_label_convention():
    fmt = FORMATS["rte"]
    assert fmt.classes[fmt.label({"label": 0})] == "True"  # GLUE RTE: 0 = entailment
    nli = FORMATS["nli"]
    assert nli.classes[nli.label({"label": "entailment"})] == "True"
    assert nli.classes[nli.label({"label": "not_entailment"})] == "False"


def test_unknown_format_and_missing_fields():
    from editscale.io import EditscaleError

    with pytest.raises(EditscaleError, match="unknown format"):
        build_task("squad", [{"x": 1}])
    with pytest.raises(EditscaleError, match="lacks field"):
        build_task("sst2", [{"text": "a", "label": 0}])
    with pytest.raises(EditscaleError, match="path"):
        build_tasks({"sst2": {"n_eval": 3}})


# ---------------------------------------------------------------------------------------------
# evaluation on a tiny model


def test_choice_loglik_matches_scorer(llama):
    model, tok = llama
    prompts = ["Review : great film\nSentiment :", "The capital of France is"]
    choices = [["negative", "positive"], ["Paris", "Rome", "Saint Petersburg"]]
    got = choice_loglik(model, tok, prompts, choices, batch_size=2)
    for p, cs, row in zip(prompts, choices, got):
        direct = -target_nll(model, tok, [p] * len(cs), cs)
        assert row == pytest.approx(direct.tolist(), abs=1e-5)


def test_evaluate_task_readings(llama):
    model, tok = llama
    items = [
        Item("Review : a fine film\nSentiment :", ["negative", "positive"], 1, "Review : N/A\nSentiment :"),
        Item("Review : dull and bad\nSentiment :", ["negative", "positive"], 0, "Review : N/A\nSentiment :"),
        Item("Review : loved it\nSentiment :", ["negative", "positive"], 1, "Review : N/A\nSentiment :"),
    ]
    task = Task("toy", items, parse_word, 3)
    metrics, recs = evaluate_task(model, tok, task, batch_size=2)
    assert metrics["n"] == 3
    for key in ("accuracy", "f1", "mcc", "invalid", "accuracy_ll", "f1_ll", "mcc_ll", "accuracy_cal", "f1_cal", "mcc_cal"):
        assert key in metrics and not math.isnan(metrics[key])
    # likelihood reading == argmax of the scorer; calibration subtracts the content-free score
    cf = -target_nll(model, tok, ["Review : N/A\nSentiment :"] * 2, ["negative", "positive"])
    for it, r in zip(items, recs):
        ll = -target_nll(model, tok, [it.prompt] * 2, it.choices)
        assert r["pred_ll"] == int(torch.argmax(ll))
        assert r["pred_cal"] == int(torch.argmax(ll - cf))
        assert r["pred"] == parse_word(r["generated"], it.choices)
    assert metrics["invalid"] == sum(r["pred"] == INVALID for r in recs)
    assert metrics["accuracy_ll"] == pytest.approx(sum(r["pred_ll"] == it.answer for r, it in zip(recs, items)) / 3)


# ---------------------------------------------------------------------------------------------
# probes


def test_probes_build_deterministic_and_well_formed():
    for p in PROBES:
        a = build_probe(PROBE_PREFIX + p, {"n_eval": 30, "n_shots": 3, "seed": 0})
        b = build_probe(PROBE_PREFIX + p, {"n_eval": 30, "n_shots": 3, "seed": 0})
        c = build_probe(PROBE_PREFIX + p, {"n_eval": 30, "n_shots": 3, "seed": 1})
        assert [(i.prompt, i.choices, i.answer) for i in a.items] == [(i.prompt, i.choices, i.answer) for i in b.items]
        assert [i.prompt for i in a.items] != [i.prompt for i in c.items]
        assert 0 < len(a.items) <= 30
        for it in a.items:
            assert len(it.choices) == 4 and len(set(it.choices)) == 4
            assert 0 <= it.answer < 4
            assert "N/A" in it.cf_prompt
        # few-shot items are not evaluated
        shots = a.items[0].cf_prompt.rsplit("\n", 1)[0]
        for it in a.items:
            q = it.prompt[len(shots):].strip()
            assert q not in shots.split("\n")


def test_probes_exclude_edited_subjects():
    full = countries()
    names = {c["name"] for c in full}
    assert {"France", "Japan"} <= names
    excluded = ["France", "Tokyo"]  # a country, and the capital of another
    left = countries(excluded_subjects=excluded)
    assert "France" not in {c["name"] for c in left} and "Japan" not in {c["name"] for c in left}
    assert len(left) == len(full) - 2
    for kind in ("capital", "continent"):
        task = build_probe(PROBE_PREFIX + kind, {"n_eval": None, "n_shots": 4}, excluded)
        assert len(task.items) == len(left) - 4
        for it in task.items:
            assert "France" not in it.prompt and "Japan" not in it.prompt and "Tokyo" not in it.prompt
    ant = build_probe(PROBE_PREFIX + "antonym", {"n_eval": None, "n_shots": 0}, ["hot"])
    assert all(not it.prompt.endswith("hot ->") for it in ant.items)
    # capitals are correct answers
    by_name = {c["name"]: c["capital"] for c in left}
    task = build_probe(PROBE_PREFIX + "capital", {"n_eval": 20}, excluded)
    for it in task.items:
        country = it.prompt.rsplit("The capital of ", 1)[1][: -len(" is")]
        assert it.choices[it.answer] == by_name[country]


def test_build_tasks_routes_probes_and_files(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(f'{{"sentence": "s{i}", "label": {i % 2}}}\n' for i in range(12)))
    tasks = build_tasks({"mysst": {"path": str(f), "format": "sst2", "n_eval": 5, "n_shots": 2}, "editscale-probe-arith": {"n_eval": 7}})
    assert [t.name for t in tasks] == ["mysst", "editscale-probe-arith"]
    assert len(tasks[0].items) == 5 and len(tasks[1].items) == 7


def test_keep_solved(llama):
    model, tok = llama
    task = build_probe(PROBE_PREFIX + "arith", {"n_eval": 30, "n_shots": 3})
    kept = keep_solved(model, tok, task, "ll")
    assert kept.meta["n_before"] == 30 and len(kept.items) <= 30
    if kept.items:
        metrics, _ = evaluate_task(model, tok, kept, generation=False)
        assert metrics["accuracy_ll"] == 1.0


def test_task_config_merges_probes_and_tasks():
    cfg = task_config({"eval_every": 40, "seed": 7, "probes": {"n_eval": 100}, "tasks": {"sst2": {"path": "x.jsonl", "n_eval": 5}}})
    assert set(cfg) == {PROBE_PREFIX + p for p in PROBES} | {"sst2"}
    assert cfg[PROBE_PREFIX + "capital"] == {"n_eval": 100, "seed": 7}
    assert cfg["sst2"] == {"path": "x.jsonl", "n_eval": 5, "seed": 7}
    assert set(task_config({"probes": {"names": ["count"]}})) == {PROBE_PREFIX + "count"}
    assert task_config({"probes": {"names": []}}) == {}
    assert task_config({"probes": None, "tasks": {}}) == {}
    assert len(task_config({})) == len(PROBES)  # the default: every offline probe


def test_probe_with_every_country_excluded(llama):
    from editscale.io import EditscaleError

    every = [c["name"] for c in countries()]
    with pytest.raises(EditscaleError, match="n_edits"):
        build_probe(PROBE_PREFIX + "capital", {"n_eval": 5}, every)
    (task,) = build_tasks({PROBE_PREFIX + "capital": {"n_eval": 5}}, every)  # the CLI path: empty, not fatal
    assert task.items == []
    model, tok = llama
    metrics, recs = evaluate_task(model, tok, task)
    assert metrics["n"] == 0 and math.isnan(metrics["accuracy_ll"]) and recs == []
