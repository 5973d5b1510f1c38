"""Generated answers (editscale.evaluate.answers): the matching rules against cases transcribed from
the reference (WanliYoung/Revisit-Editing-Evaluation, easyeditor/evaluate/evaluate_utils.py:
normalize_answer / exact_match_score and the answer clean-up of test_prediction_acc_real, each
expected value printed by the reference's own functions), stop strings in the shared decoder, and
equality with the reference's call (transformers' generate with stop_strings, one prompt at a time)
on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from editscale.evaluate.answers import (
    QA_INSTRUCTION,
    context_prompt,
    exact_match,
    generate_answers,
    normalize_answer,
    strip_answer,
    token_f1,
)
from editscale.evaluate.scoring import Decoding, run_prompts
from editscale.io import EditscaleError
from editscale.models.fetch import build_tiny_model

# (input, the reference's normalize_answer output)
NORMALIZED = [
    ("The  Eiffel-Tower!", "eiffeltower"),
    ("An apple a day", "apple day"),
    ("Theatre", "theatre"),
    ("the United States.", "united states"),
    ("U.S.A.", "usa"),
    ("  Paris ,France\n", "paris france"),
    ("Côte d’Ivoire", "côte d’ivoire"),  # typographic apostrophe: not in string.punctuation, kept
    ("A", ""),
]
# (generated text, the reference's answer after its suffix clean-up), EOS text "<|endoftext|>"
STRIPPED = [
    ("Paris.\n", "Paris."),
    ("Paris.", "Paris"),
    ("Paris<|endoftext|>", "Paris"),
    ("Paris\n.", "Paris"),
    (" Paris.\n<|endoftext|>", " Paris.\n"),
]


@pytest.mark.parametrize("text,expected", NORMALIZED)
def test_normalize_answer_is_the_references(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text,expected", STRIPPED)
def test_answer_clean_up_is_the_references(text, expected):
    assert strip_answer(text, "<|endoftext|>") == expected


def test_exact_match_and_token_f1():
    # the reference: exact_match_score("the United States.", "United States") is True,
    # exact_match_score("Paris, France", "Paris") False
    assert exact_match("the United States.", ["United States"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Paris, France", ["Paris", "Paris France"]) == 1.0  # an alias matches
    # SQuAD token F1: precision 1/2, recall 1 -> 2/3; the best over the references
    assert token_f1("Paris, France", ["Paris"]) == pytest.approx(2 / 3)
    assert token_f1("Paris, France", ["Lyon", "France"]) == pytest.approx(2 / 3)
    assert token_f1("the the", ["a"]) == 1.0  # both normalize to nothing: equal
    assert token_f1("", ["Paris"]) == 0.0 and exact_match("", ["Paris"]) == 0.0
    assert token_f1("New York New York", ["New York"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # counts clipped


def test_context_prompts():
    _, tok = build_tiny_model("gpt2")
    q = "Which country is Serekunda in?"
    assert context_prompt("question", tok, question=q) == q
    assert context_prompt("qa_inst", tok, question=q) == QA_INSTRUCTION.format(question=q) == f"Please answer the question:\n\nQ: {q}\nA:"
    assert context_prompt("cloze", tok, cloze="Serekunda is in") == "Serekunda is in"
    with pytest.raises(EditscaleError, match="no chat template"):
        context_prompt("chat", tok, question=q)  # the tiny GPT-2 tokenizer has none
    with pytest.raises(EditscaleError, match="needs a question"):
        context_prompt("qa_inst", tok, cloze="x")
    with pytest.raises(EditscaleError, match="expected one of"):
        context_prompt("judge", tok, question=q)


def test_a_row_ends_at_the_first_token_whose_text_ends_with_a_stop_string():
    """Decoding.stop_strings: forced tokens " Paris", ".", " It" -> the row keeps " Paris." and
    stops; a row that never meets a stop string runs to max_new_tokens; rows end independently."""
    model, tok = build_tiny_model("gpt2")
    paris, dot, it = (tok(t, add_special_tokens=False)["input_ids"][0] for t in (" Paris", ".", " It"))
    script = {0: [paris, dot, it, it], 1: [it, it, it, it]}  # prompt index -> its forced tokens

    def pick(step, logits, idx):
        return torch.tensor([script[i][step] for i in idx])

    res = run_prompts(model, tok, ["The capital of France is", "Hello"], decoding=Decoding(4, pick=pick, stop_strings=(".", "\n")))
    assert res.new_ids == [[paris, dot], [it, it, it, it]]
    plain = run_prompts(model, tok, ["The capital of France is"], decoding=Decoding(4, pick=pick))
    assert plain.new_ids == [[paris, dot, it, it]]  # without stop strings nothing changes


@pytest.mark.slow
def test_generate_answers_equal_the_references_generate_call_on_smollm2(smollm2_dir):
    """The reference's call, one prompt at a time: generate(max_new_tokens=50, stop_strings=[".",
    "\\n", eos], do_sample=False); editscale's batched, left-padded decoder gives the same tokens
    and, after the clean-up, the same answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smollm2_dir
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Which country is Serekunda in?", "Which continent is Kenya on?",
                 "What currency does Japan use?", "Who wrote Hamlet?", "What is the largest planet?"]
    prompts = [context_prompt(c, tok, question=q) for q in questions for c in ("question", "qa_inst", "chat")]
    prompts += ["Serekunda can be found in the country of", "The capital of Benin is"]
    ids, answers = generate_answers(model, tok, prompts, batch_size=8)
    for prompt, got_ids, got in zip(prompts, ids, answers):
        x = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=50,
                                 stop_strings=[".", "\n", tok.eos_token], tokenizer=tok, pad_token_id=tok.eos_token_id,
                                 do_sample=False, use_cache=False)
        ref_ids = gen[0][x["input_ids"].shape[1]:].tolist()
        if ref_ids and ref_ids[-1] == tok.eos_token_id:
            ref_ids = ref_ids[:-1]  # editscale leaves EOS out of the ids (its text is what the clean-up removes)
        assert got_ids == ref_ids, (prompt, tok.decode(got_ids), tok.decode(ref_ids))
        assert got == strip_answer(tok.decode(gen[0][x["input_ids"].shape[1]:]), tok.eos_token), prompt
    # the instruct model answers in a sentence in its chat template ("The capital of France is
    # Paris"): no exact match, a token F1 above 0; the bare question gets an empty answer (its first
    # token is a newline), as the reference reads it too
    assert token_f1(answers[2], ["Paris"]) > 0 and exact_match(answers[2], ["Paris"]) == 0.0
