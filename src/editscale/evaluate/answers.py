"""Generated answers: the model answers in its own words and the answer is matched against the
target, the reading of "The Mirage of Model Editing: Revisiting Evaluation in the Wild" (Yang et
al., ACL 2025; reference code WanliYoung/Revisit-Editing-Evaluation, its WILD evaluation in
easyeditor/evaluate/evaluate_utils.py `test_prediction_acc_real`), beside the teacher-forced
scores, which read the target's probability with the target given.

Context: how the prompt is put to the model (the reference's `context_type`):
  cloze     the dataset's cloze prompt as it is ("Serekunda can be found in the country of")
  question  the question alone (the reference's default)
  qa_inst   "Please answer the question:\\n\\nQ: {question}\\nA:" (the reference's `qa_inst`)
  chat      the question as the user turn of the model's own chat template (the reference's
            `chat_temp` hard-codes Llama-2's template, "<s>[INST] <<SYS>> ..."; here each instruct
            model gets its own: a deliberate difference, docs/fidelity.md)
Decoding (reference): greedy, at most `max_new_tokens` (50), a row ends at EOS or at the first
token after which its text ends with "." or "\\n" (transformers' `stop_strings`).
The answer (reference): the generated text with a trailing ".", then "\\n", then the EOS text
removed once each, in that order.
Matching: `exact_match` is the reference's (SQuAD's normalization: lower case, punctuation
removed, articles a / an / the removed, whitespace collapsed; then equality), taken over the
target and its aliases; `token_f1` is SQuAD's token F1 on the same normalized words (the
reference reports EM, or an LLM judge with an API key, which editscale does not call: offline).
Locality (reference): a neighbourhood prompt keeps its answer when the generated tokens equal the
unedited model's, token for token.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from ..io import EditscaleError
from .scoring import Batching, Decoding, chat_prompt, decode, run_prompts

CONTEXTS = ("cloze", "question", "qa_inst", "chat")
QA_INSTRUCTION = "Please answer the question:\n\nQ: {question}\nA:"
STOP_STRINGS = (".", "\n")
MAX_NEW_TOKENS = 50
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization, in the reference's order: lower case, punctuation removed, the
    articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized reference (the target or an alias)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 between the normalized words of the prediction and of a reference, the best
    over the references (0 when either side has no words and they differ)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for ref in references:
        gold = normalize_answer(ref).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def strip_answer(text: str, eos_text: str | None) -> str:
    """The reference's answer: one trailing ".", then "\\n", then the EOS text removed, in order."""
    for suffix in (*STOP_STRINGS, eos_text):
        if suffix and text.endswith(suffix):
            text = text[: -len(suffix)]
    return text


def context_prompt(context: str, tok, *, cloze: str | None = None, question: str | None = None) -> str:
    """The text the model continues for one context type (module doc)."""
    if context not in CONTEXTS:
        raise EditscaleError(f"answer context {context!r}: expected one of {list(CONTEXTS)}")
    if context == "cloze":
        if cloze is None:
            raise EditscaleError("answer context 'cloze' needs the cloze prompt")
        return cloze
    if question is None:
        raise EditscaleError(f"answer context {context!r} needs a question (the dataset's case has none)")
    if context == "question":
        return question
    if context == "qa_inst":
        return QA_INSTRUCTION.format(question=question)
    return chat_prompt(tok, question)


def generate_answers(model, tok, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS,
                     batch_size: int = 16) -> tuple[list[list[int]], list[str]]:
    """Greedy answers to `prompts` (module doc): (the generated token ids up to and with the stop
    token, EOS left out; the answer texts)."""
    res = run_prompts(model, tok, list(prompts), decoding=Decoding(max_new_tokens, stop_strings=STOP_STRINGS),
                      batching=Batching(batch_size))
    return res.new_ids, [strip_answer(text, tok.eos_token) for text in decode(tok, res.new_ids)]
