"""Instruct models' chat templates where an evaluation prompt is a question (issue 27 item 4): the
metrics' `chat_template` switch frames the prompt as the user turn and scores the answer as the
start of the reply; it enters the evaluation key only when set, and the plan refuses it for cloze
datasets and base models."""

from __future__ import annotations

import copy

import pytest
import torch

from editscale.evaluate.edit_scores import case_metrics
from editscale.evaluate.scoring import chat_prompt, encode_prompts, encode_targets
from editscale.io import EditscaleError

TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
CASE = {"case_id": "z1", "subject": "Watts Humphrey", "prompt": "What university did {} attend?", "target_true": "Yale",
        "target_new": "Harvard", "paraphrase_prompts": ["Which university did Watts Humphrey go to?"],
        "neighborhood_prompts": ["nq question: who sang the song"], "neighborhood_target": "Queen",
        "attribute_prompts": [], "generation_prompts": [], "relation_id": "P69"}


@pytest.fixture()
def chat_lm(tiny_lm):
    model, tok = tiny_lm("llama")
    tok = copy.deepcopy(tok)
    tok.chat_template = TEMPLATE
    return model, tok


def _target_nll(model, tok, prompt: str, target: str) -> float:
    """-mean log p(target's tokens | prompt), the target with no leading space (a reply's start)."""
    p, t = encode_prompts(tok, [prompt])[0], encode_targets(tok, [target], space=False)[0]
    with torch.no_grad():
        logp = model(torch.tensor([p + t])).logits[0].log_softmax(-1)
    return -float(sum(logp[len(p) - 1 + i, tok_id] for i, tok_id in enumerate(t)) / len(t))


def test_a_question_is_framed_as_the_user_turn_and_scored_as_the_replys_start(chat_lm):
    model, tok = chat_lm
    question = CASE["prompt"].format(CASE["subject"])
    assert chat_prompt(tok, question) == f"<|user|>{question}\n<|assistant|>"
    got = case_metrics(model, tok, [CASE], parts=("efficacy", "paraphrase"), chat=True)[0]
    plain = case_metrics(model, tok, [CASE], parts=("efficacy", "paraphrase"))[0]
    framed = chat_prompt(tok, question)
    assert got["nll_new"] == pytest.approx(_target_nll(model, tok, framed, "Harvard"), abs=1e-4)
    assert got["nll_true"] == pytest.approx(_target_nll(model, tok, framed, "Yale"), abs=1e-4)
    assert got["nll_new"] != pytest.approx(plain["nll_new"], abs=1e-4)  # the framing changes the reading


def test_a_base_models_tokenizer_is_refused_with_the_switch_named(tiny_lm):
    _, tok = tiny_lm("gpt2")
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(EditscaleError, match="has no chat template .*turn the metric's chat_template off"):
        chat_prompt(tok, "Who?")


def test_only_question_format_tasks_are_framed(chat_lm):
    from editscale.evaluate.downstream import build_task
    from editscale.evaluate.tasks import chat_task

    _, tok = chat_lm
    mmlu = build_task("mmlu", [{"question": f"q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(12)],
                      n_eval=4, n_shots=2)
    sst2 = build_task("sst2", [{"sentence": f"s{i}", "label": i % 2} for i in range(12)], n_eval=4, n_shots=2)
    framed = chat_task(mmlu, tok)
    assert framed.space is False and framed.meta["chat_template"] is True
    assert all(it.prompt == chat_prompt(tok, orig.prompt) and it.cf_prompt == chat_prompt(tok, orig.cf_prompt)
               for it, orig in zip(framed.items, mmlu.items))
    assert chat_task(sst2, tok) is sst2  # a cloze ("Review : ...\nSentiment :") stays as it is


def test_the_switch_enters_the_evaluation_key_only_when_set():
    from editscale.evaluate.job import metric_section

    for name in ("edit_scores", "history", "downstream"):
        cfg, key = metric_section(name, {})
        assert cfg.chat_template is None and "chat_template" not in key, name
        cfg, key = metric_section(name, {"chat_template": True})
        assert cfg.chat_template is True and key["chat_template"] is True, name


def test_the_plan_refuses_the_switch_on_cloze_datasets_and_base_models(repo_root, tmp_path):
    import json

    from editscale.workflow import check_chat_template, load_config

    config = load_config(repo_root / "config/test-tiny.yaml")
    config["metrics"]["history"]["chat_template"] = True
    with pytest.raises(EditscaleError, match=r"metrics.history.chat_template is on, but run rome-tiny's dataset 'geofacts' "
                                             r"\(reader 'geofacts'\) has cloze prompts"):
        check_chat_template(config, tmp_path)
    config["datasets"]["geofacts"]["reader"] = "zsre_mend"
    check_chat_template(config, tmp_path)  # a question dataset, model not prepared yet: the job checks
    prepared = tmp_path / "data" / "models" / "tiny-gpt2"
    prepared.mkdir(parents=True)
    (prepared / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    with pytest.raises(EditscaleError, match="model 'tiny-gpt2' .* has no chat template"):
        check_chat_template(config, tmp_path)
    # answers' context `chat` (a section's contexts; no plugin needed to read the config dict) too
    answers_only = {**config, "metrics": {"answers": {"contexts": ["cloze", "chat"]}}}
    with pytest.raises(EditscaleError, match="metrics.answers asks through the chat template .*model 'tiny-gpt2' .* has no chat template"):
        check_chat_template(answers_only, tmp_path)
    (prepared / "chat_template.jinja").write_text(TEMPLATE)
    check_chat_template(config, tmp_path)
    check_chat_template(answers_only, tmp_path)
