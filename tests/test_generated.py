"""Metric `answers` (editscale.evaluate.generated, a plugin metric): which edits it answers for,
the questions it asks, its readings against the matching rules, and its place in a finished study
(only its jobs planned, every other metric file kept byte for byte)."""

from __future__ import annotations

import contextlib

import pytest

from benchmarks.snakemake_runs import add_metric_to_finished_study, checkpoint_jobs, copy_workflow, planned_jobs, set_config, snakemake
from editscale.io import EditscaleError
from editscale.models.fetch import build_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _answers_registered_in_this_module_only(plugin_metric):
    """The plugin metric `answers` exists for this module's tests only (conftest's plugin_metric)."""
    with plugin_metric("editscale.evaluate.generated", "answers"):
        yield


def _case(i: int, relation: str = "P17") -> dict:
    return {"case_id": f"c{i}", "edit_index": i, "subject": f"Town{i}", "prompt": "{} is a city in", "relation_id": relation,
            "target_new": "France", "target_true": "Gambia", "paraphrase_prompts": [f"Town{i} is located in the country of"],
            "neighborhood_prompts": ["Paris is a city in", "Lyon is a city in", "Nice is a city in", "Metz is a city in"]}


def test_questions_come_from_the_case_or_its_relation():
    from editscale.evaluate.generated import question

    assert question(_case(1)) == "Which country is Town1 located in?"
    assert question({**_case(1), "question": "Where is {} again?"}) == "Where is Town1 again?"
    with pytest.raises(EditscaleError, match="no question template for relation 'P9999'"):
        question(_case(1, "P9999"))


def test_the_sample_is_historys_plus_the_current_edit_and_the_whole_sequence_at_zero():
    from editscale.evaluate.generated import answer_sample
    from editscale.evaluate.history import history_sample

    cases = [_case(i) for i in range(1, 41)]
    at_20 = answer_sample(cases, 20, 5, 4, 0)
    drawn = [c["edit_index"] for c, _, _ in history_sample(cases, 20, 5, 4, 0)]
    got = [c["edit_index"] for c, _, _ in at_20]
    assert set(drawn) <= set(got) and 20 in got and len(got) in (len(drawn), len(drawn) + 1)
    assert all(lo <= c["edit_index"] <= hi <= 20 for c, lo, hi in at_20)
    at_0 = answer_sample(cases, 0, 5, 4, 0)
    assert len(at_0) == 5 and all((lo, hi) == (1, 40) for _, lo, hi in at_0)
    assert [c["edit_index"] for c, _, _ in at_0] == [c["edit_index"] for c, _, _ in history_sample(cases, 40, 5, 4, 0)]


class _Checkpoint:
    """The parts of editscale.evaluate.job.Checkpoint the metric reads."""

    def __init__(self, k, cases, model, tok, base=None):
        self.k, self._cases, self._model, self._tok, self._base = k, cases, model, tok, base

    def edits(self):
        return self._cases

    def model(self):
        return self._model, self._tok

    def unedited(self, model, tok):
        return contextlib.nullcontext((self._base or model, tok))


def test_readings_follow_the_matching_rules_on_the_generated_answers():
    from editscale.evaluate.answers import exact_match, generate_answers, token_f1
    from editscale.evaluate.generated import compute
    from editscale.evaluate.job import metric_section

    model, tok = build_tiny_model("llama")
    base, _ = build_tiny_model("llama", seed=1)  # another "unedited" model: neighbourhood answers may differ
    cases = [_case(i) for i in range(1, 7)]
    cfg, _ = metric_section("answers", {"contexts": ["cloze", "qa_inst"], "sample": 3, "neighbors": 2, "max_new_tokens": 6})
    df = compute(_Checkpoint(6, cases, model, tok, base), cfg)
    assert set(df["context"]) == {"cloze", "qa_inst", "teacher_forced"}
    cloze = df.filter(df["context"] == "cloze")
    assert set(cloze["metric"]) == {"efficacy_em", "efficacy_f1", "efficacy_old_em", "paraphrase_em", "paraphrase_f1",
                                    "neighborhood_kept", "neighborhood_old_em"}
    assert set(df.filter(df["context"] == "qa_inst")["metric"]) == {"efficacy_em", "efficacy_f1", "efficacy_old_em"}
    assert 6 in set(df["edit_index"]) and df["item"].n_unique() <= 4  # the sample of 3 plus the current edit
    # the teacher-forced readings of the same cases, neighbourhood prompts cut as generated
    from editscale.evaluate.edit_scores import case_metrics

    picked = sorted(set(df["item"]), key=lambda c: int(c[1:]))
    tf_cases = [{**cases[int(c[1:]) - 1], "neighborhood_prompts": cases[int(c[1:]) - 1]["neighborhood_prompts"][:2]} for c in picked]
    expected = case_metrics(model, tok, tf_cases, ("efficacy", "paraphrase", "neighborhood"), 32)
    tf = df.filter(df["context"] == "teacher_forced")
    for c, m in zip(picked, expected):
        got = dict(zip(*tf.filter(tf["item"] == c).select("metric", "value").to_dict(as_series=False).values()))
        assert got == pytest.approx({n: m[n] for n in ("es", "ps", "ns", "efficacy_em", "paraphrase_em", "neighborhood_em")}, abs=1e-6)
    # the efficacy readings are the matching rules applied to the model's own answer
    row = cloze.filter((cloze["item"] == "c6") & (cloze["metric"] == "efficacy_f1"))
    _, (answer,) = generate_answers(model, tok, ["Town6 is a city in"], 6)
    assert row["value"][0] == token_f1(answer, ["France"])
    assert cloze.filter((cloze["item"] == "c6") & (cloze["metric"] == "efficacy_em"))["value"][0] == exact_match(answer, ["France"])
    # at k = 0 the unedited model is the model: every neighbourhood answer is kept
    df0 = compute(_Checkpoint(0, cases, model, tok), cfg)
    kept = df0.filter(df0["metric"] == "neighborhood_kept")["value"]
    assert kept.len() > 0 and kept.min() == 1.0 and set(df0["stratum_hi"]) == {6}


def test_portability_probes_are_answered_in_every_context_that_can_ask_them():
    """A probe with a question is asked in every context (its cloze prompt in `cloze`), one
    without only in `cloze`; its readings use the probe's own targets."""
    from editscale.evaluate.answers import exact_match, generate_answers, token_f1
    from editscale.evaluate.generated import compute
    from editscale.evaluate.job import metric_section

    model, tok = build_tiny_model("gpt2")
    probes = [{"hop": "capital", "prompt": "The capital of the country where Town2 is located is",
               "question": "What is the capital of the country where Town2 is located?", "target_new": "Paris", "target_true": "Banjul"},
              {"hop": "currency", "prompt": "The currency of the country where Town2 is located is the", "target_new": "Euro"}]
    cases = [_case(1), {**_case(2), "portability": probes}]
    cfg, _ = metric_section("answers", {"contexts": ["cloze", "qa_inst"], "parts": ["portability"], "sample": "all", "max_new_tokens": 5})
    df = compute(_Checkpoint(2, cases, model, tok), cfg)
    assert set(df["item"]) == {"c2"}  # the case without probes has nothing to answer
    cloze, qa = (df.filter(df["context"] == c) for c in ("cloze", "qa_inst"))
    assert set(df.filter(df["context"] == "teacher_forced")["metric"]) == {"port_s", "portability_em"}
    _, answers = generate_answers(model, tok, [p["prompt"] for p in probes], 5)
    got = dict(zip(cloze["metric"], cloze["value"]))
    assert got["portability_em"] == (exact_match(answers[0], ["Paris"]) + exact_match(answers[1], ["Euro"])) / 2
    assert got["portability_f1"] == (token_f1(answers[0], ["Paris"]) + token_f1(answers[1], ["Euro"])) / 2
    assert got["portability_old_em"] == exact_match(answers[0], ["Banjul"])  # the probe that knows its old answer
    _, (asked,) = generate_answers(model, tok, ["Please answer the question:\n\nQ: What is the capital of the country where Town2 is located?\nA:"], 5)
    assert dict(zip(qa["metric"], qa["value"]))["portability_em"] == exact_match(asked, ["Paris"])  # only the probe with a question


def test_a_question_context_on_a_relation_without_a_question_is_one_clear_error():
    from editscale.evaluate.generated import compute
    from editscale.evaluate.job import metric_section

    model, tok = build_tiny_model("gpt2")
    cfg, _ = metric_section("answers", {"contexts": ["question"], "sample": 2, "max_new_tokens": 2})
    with pytest.raises(EditscaleError, match="relation 'P0'"):
        compute(_Checkpoint(2, [_case(1, "P0"), _case(2, "P0")], model, tok), cfg)


def test_the_plan_time_check_names_every_relation_without_a_question():
    from editscale.evaluate.generated import check_cases

    run = {"name": "r"}
    cases = [_case(1, "P0"), _case(2), _case(3, "P0"), {**_case(4, "P5"), "question": "Where is {}?"}, _case(5, "P7")]
    check_cases({"contexts": ["cloze"]}, run, cases)  # the cloze context asks no question
    check_cases({"contexts": ["qa_inst"], "parts": ["paraphrase"]}, run, cases)  # nor paraphrase prompts
    with pytest.raises(EditscaleError) as err:
        check_cases({"contexts": ["cloze", "qa_inst"]}, run, cases)
    assert "metrics.answers.contexts ['qa_inst']" in str(err.value) and "run r's" in str(err.value)
    assert "'P0' (edits [1, 3])" in str(err.value) and "'P7' (edits [5])" in str(err.value) and "P5" not in str(err.value)


@pytest.mark.workflow
def test_a_question_context_without_questions_fails_at_the_dry_run(repo_root, tmp_path):
    """The edits of a CounterFact file whose relation has no question template: `snakemake -n`
    refuses the question context, naming the relation, before any job runs."""
    import json

    from editscale.data.readers import load_cases

    shared = repo_root.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
    records = [r for r in json.loads(shared.read_text())[:40] if r["prompt"].count(r["subject"]) == 1 and "{" not in r["prompt"]]
    original = [{"case_id": i, "requested_rewrite": {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                                                     "relation_id": "P0", "target_new": {"str": r["target_new"]},
                                                     "target_true": {"str": r["ground_truth"]}},
                 "paraphrase_prompts": [r["rephrase_prompt"]], "neighborhood_prompts": [r["locality_prompt"]],
                 "attribute_prompts": [], "generation_prompts": []}
                for i, r in enumerate(records)]
    wd = copy_workflow(repo_root, tmp_path / "wf")
    (wd / "data").mkdir(exist_ok=True)
    (wd / "data" / "cf.json").write_text(json.dumps(original))
    assert {c["relation_id"] for c in load_cases({"reader": "counterfact", "path": str(wd / "data" / "cf.json")})} == {"P0"}

    def _answers_on_cf(cfg, contexts=("cloze", "question")):
        _with_answers(cfg)
        cfg["metrics"]["answers"]["contexts"] = list(contexts)
        cfg["datasets"] = {"cf": {"reader": "counterfact", "path": "data/cf.json"}}
        cfg["runs"][0]["dataset"] = "cf"

    set_config(wd, _answers_on_cf)
    res = snakemake(wd, "-n", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "metrics.answers.contexts ['question']" in text and "relation(s) 'P0'" in text, text[-2000:]
    assert not (wd / "results").exists()  # nothing ran
    set_config(wd, lambda cfg: cfg["metrics"]["answers"].update(contexts=["cloze"]))
    assert planned_jobs(snakemake(wd, "-n"))["edit_segment"] == 2


def _with_answers(cfg) -> None:
    cfg["plugins"] = ["editscale.evaluate.generated"]
    cfg["metrics"]["answers"] = {"eval_every": 6, "contexts": ["cloze", "question"], "sample": 4, "neighbors": 2, "max_new_tokens": 8}


@pytest.mark.slow
def test_adding_the_answers_metric_to_a_finished_study_runs_only_it(tiny_study, tmp_path):
    import polars as pl

    workdir = tmp_path / "copy"
    jobs, changed = add_metric_to_finished_study(tiny_study, workdir, _with_answers)
    assert checkpoint_jobs(jobs) == 2  # checkpoints 0 and 6 of its grid
    snakemake(workdir)
    assert changed() == set()  # every other metric's file is kept
    for k in (0, 6):
        table = pl.read_parquet(workdir / f"results/rome-tiny/metrics/answers/{k:06d}.parquet")
        assert set(table["context"]) == {"cloze", "question", "teacher_forced"} and table["value"].is_between(0, 1).all()
    assert 6 in set(pl.read_parquet(workdir / "results/rome-tiny/metrics/answers/000006.parquet")["edit_index"])
    summary = pl.read_parquet(workdir / "results/studies/test-tiny/tables/summary.parquet")
    assert "gen_es_at_end" in summary.columns
    assert (workdir / "results/studies/test-tiny/plots/readings.svg").exists()  # teacher-forced beside generated
    from editscale.report import results

    compared = results.load(workdir / "results").compare(at=["end"])
    assert {"es_at_end", "gen_es_at_end", "gen_ps_at_end"} <= set(compared.columns)  # `editscale compare` carries them
    assert planned_jobs(snakemake(workdir, "-n")) == {}
