"""Downstream few-shot tasks: the study's GLUE-style evaluation, read two ways.

Every task is a list of `Item`s (prompt, answer choices, index of the correct choice) plus a
parser of generated text. `evaluate_task` reads each item twice, in batches:

1. generation (the study's reading): greedy decoding of `max_new_tokens` tokens after the prompt
   (left-padded batches); the answer is read off the generated text by the task's parser. Answers
   that name no choice are INVALID: they count as wrong and as their own predicted class in MCC
   (exactly as sklearn treats the study's -1 predictions). Metrics: accuracy, f1, mcc, invalid
   (count), invalid_frac.
2. likelihood (lower noise): the mean token log-likelihood of each choice (" " + choice) after
   the prompt; prediction = argmax -> accuracy_ll, f1_ll, mcc_ll. Calibrated (Zhao et al. 2021,
   "Calibrate before use"): the choice's log-likelihood under a content-free prompt (same few-shot
   context and template, every input field replaced by "N/A") is subtracted before the argmax,
   which in log space is their diagonal re-weighting W = diag(p_cf)^-1 -> accuracy_cal, f1_cal,
   mcc_cal.

f1 is the support-weighted F1 over the true classes (sklearn `average="weighted"`, the study's
choice); mcc is the multi-class Matthews correlation (Gorodkin's R_K; equals the usual binary
MCC for two classes). Both are computed here, no sklearn.

Task formats (config `format`, default: the task name) and their files (../shared/data/downstream):
  sst2, sentiment_analysis  "Review : <sentence>\\nSentiment :" -> negative | positive
  mrpc                      "Are the sentences paraphrases of each other.\\nSentence 1: ..\\nSentence 2: ..\\nAnswer:" -> No | Yes
  cola                      "Is this sentence linguistically acceptable?\\nSentence: ..\\nAnswer:" -> No | Yes
  rte                       "<s1>\\nquestion: <s2> True or False?\\nanswer:" -> True (label 0, entailment) | False (label 1)
  nli                       "<s1> entails the <s2> True or False? answer:" -> True (entailment) | False
  mmlu                      "Question: ..\\n(A) ..\\n..(D) ..\\nAnswer:" -> A | B | C | D
  dialogue                  "Q: Given the following: <article>\\n Which choice is correct? ..." -> A | B | C | D
Prompts follow the study's glue_eval, with two deliberate fixes: RTE uses GLUE's label convention
(0 = entailment -> "True"; the study's code maps 0 to "False"), and the dialogue prompt shows
option D (the study's prints option A twice).

Few-shot examples are drawn with `random.Random(seed)` from the task file, class-balanced
(round robin over the classes in seeded order), and excluded from the evaluation set; the
evaluation set is the next `n_eval` records of the same seeded permutation, so it is identical at
every checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from ..io import EditscaleError, read_jsonl
from .probes import PROBE_PREFIX, PROBES, build_probe
from .tasks import (  # noqa: F401 (re-exported: the downstream API)
    INVALID, Item, Task, accuracy, choice_loglik, confusion, evaluate_task, f1_weighted, first_line, mcc, metrics_rows,
    parse_letter, parse_prefix, parse_word,
)

@dataclass
class Format:
    fields: tuple[str, ...]  # text fields replaced by "N/A" in the content-free prompt
    classes: list[str]
    label: Callable[[dict], int]
    render: Callable[[dict], str]  # example -> prompt text (ends right before the answer)
    parse: Callable[[str, list[str]], int]
    sep: str = "\n"  # between few-shot blocks
    max_new_tokens: int = 3
    question: bool = True  # the prompt asks a question (chat_template applies); False: a cloze like sst2's


def _int_label(r: dict, key: str = "label") -> int:
    return int(r[key])


def _render_mc(r: dict) -> str:
    opts = "".join(f"({L}) {c}\n" for L, c in zip("ABCD", r["choices"]))
    return f"Question: {r['question']}\n{opts}Answer:"


def _render_dialogue(r: dict) -> str:
    o = r["options"]
    return (
        f"Q: Given the following: {r['article']}\n Which choice is correct? Answer Choices:\n"
        f" (A){o[0]} \n (B){o[1]} \n (C){o[2]} \n (D){o[3]} \n"
        " The answer should be exact A or B or C or D. Among A through D, the answer is"
    )


FORMATS: dict[str, Format] = {
    "sst2": Format(("sentence",), ["negative", "positive"], _int_label, lambda r: f"Review : {r['sentence']}\nSentiment :", parse_word,
                   question=False),
    "sentiment_analysis": Format(
        ("sentence",), ["negative", "positive"], _int_label, lambda r: f"Review : {r['sentence']}\nSentiment :", parse_word,
        question=False,
    ),
    "mrpc": Format(
        ("sentence1", "sentence2"), ["No", "Yes"], _int_label,
        lambda r: f"Are the sentences paraphrases of each other.\nSentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nAnswer:",
        parse_word,
    ),
    "cola": Format(
        ("sentence",), ["No", "Yes"], _int_label,
        lambda r: f"Is this sentence linguistically acceptable?\nSentence: {r['sentence']}\nAnswer:", parse_word,
    ),
    "rte": Format(
        ("sentence1", "sentence2"), ["True", "False"], _int_label,
        lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\nanswer:", parse_word,
    ),
    "nli": Format(
        ("sentence1", "sentence2"), ["True", "False"], lambda r: 0 if r["label"] == "entailment" else 1,
        lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? answer:", parse_word,
    ),
    "mmlu": Format(("question", "choices"), ["A", "B", "C", "D"], lambda r: int(r["answer"]), _render_mc, parse_letter),
    "dialogue": Format(
        ("article", "options"), ["A", "B", "C", "D"], lambda r: "ABCD".index(r["answers"].strip()), _render_dialogue, parse_letter
    ),
}
FORMATS["sentiment"] = FORMATS["sentiment_analysis"]


def _content_free(r: dict, fields: tuple[str, ...]) -> dict:
    out = dict(r)
    for f in fields:
        out[f] = ["N/A"] * len(r[f]) if isinstance(r[f], list) else "N/A"
    return out


def select_shots(records: list[dict], label: Callable[[dict], int], n_shots: int, n_eval: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded, class-balanced few-shot examples and a disjoint evaluation set (see module doc)."""
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(label(records[i]), []).append(i)
    classes = sorted(by_class)
    rng.shuffle(classes)
    shots: list[int] = []
    ptr = {c: 0 for c in classes}
    while len(shots) < n_shots and any(ptr[c] < len(by_class[c]) for c in classes):
        for c in classes:
            if len(shots) < n_shots and ptr[c] < len(by_class[c]):
                shots.append(by_class[c][ptr[c]])
                ptr[c] += 1
    rng.shuffle(shots)
    taken = set(shots)
    rest = [i for i in order if i not in taken]
    if n_eval:
        rest = rest[:n_eval]
    return [records[i] for i in shots], [records[i] for i in rest]


def build_task(name: str, records: list[dict], fmt: str | None = None, n_eval: int | None = 100, n_shots: int = 4, seed: int = 0,
               max_new_tokens: int | None = None) -> Task:
    fmt_name = fmt or name
    if fmt_name not in FORMATS:
        raise EditscaleError(f"downstream task {name!r}: unknown format {fmt_name!r}; known: {sorted(FORMATS)}")
    f = FORMATS[fmt_name]
    for i, r in enumerate(records[:50]):
        missing = [k for k in f.fields if k not in r]
        if missing:
            raise EditscaleError(f"downstream task {name!r}: record {i} lacks field(s) {missing} of format {fmt_name!r}")
    shots, evals = select_shots(records, f.label, n_shots, n_eval, seed)
    context = "".join(f.render(s) + " " + f.classes[f.label(s)] + f.sep for s in shots)
    cf_prompt = context + f.render(_content_free(evals[0] if evals else shots[0], f.fields))
    items = [Item(context + f.render(r), list(f.classes), f.label(r), cf_prompt, str(r.get("idx", r.get("index", r.get("id", ""))))) for r in evals]
    return Task(name, items, f.parse, max_new_tokens or f.max_new_tokens, {"format": fmt_name, "n_shots": len(shots), "seed": seed},
                question=f.question)


def load_task(name: str, spec: dict) -> Task:
    """A task from its config section {path, n_eval, n_shots, seed, [format], [max_new_tokens]}."""
    if "path" not in spec:
        raise EditscaleError(f"downstream task {name!r}: config needs a `path` to its JSONL file")
    path = Path(spec["path"])
    if not path.exists():
        raise EditscaleError(f"downstream task {name!r}: file {path} not found")
    return build_task(
        name, read_jsonl(path), spec.get("format"), spec.get("n_eval", 100), int(spec.get("n_shots", 4)), int(spec.get("seed", 0)),
        spec.get("max_new_tokens"),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation


def build_tasks(tasks_cfg: dict, excluded_subjects: Sequence[str] = ()) -> list[Task]:
    """Tasks from the config's `tasks` mapping; names starting with "editscale-probe-" are the
    built-in offline probes (see `probes`), the others are file tasks."""

    out = []
    for name, spec in tasks_cfg.items():
        spec = dict(spec or {})
        if name.startswith(PROBE_PREFIX) or str(spec.get("format", "")).startswith(PROBE_PREFIX):
            out.append(build_probe(name, spec, excluded_subjects, allow_empty=True))
        else:
            out.append(load_task(name, spec))
    return out


def task_config(params: dict) -> dict:
    """The task mapping of the downstream metric's config section.

    `tasks`: {name: {path, n_eval, n_shots, seed, [format], [max_new_tokens], [keep_solved]}} (a
    name starting with "editscale-probe-" is a built-in probe and needs no path).
    `probes`: settings shared by the built-in probes, {n_eval, n_shots, seed, min_population,
    keep_solved, names}; `names` lists the probes to run (default: all of `probes.PROBES`; [] for
    none); `probes: null` also disables them. A probe also listed under `tasks` keeps that entry.
    `seed` (top level): the default seed of every task and probe that sets none.
    """

    seed = params.get("seed")
    out: dict[str, dict] = {}
    probes = params.get("probes", {})
    if probes is not None and probes is not False:
        probes = dict(probes)
        names = probes.pop("names", list(PROBES))
        for n in names:
            n = n if n.startswith(PROBE_PREFIX) else PROBE_PREFIX + n
            out[n] = dict(probes)
    for name, spec in (params.get("tasks") or {}).items():
        out[name] = dict(spec or {})
    if seed is not None:
        for spec in out.values():
            spec.setdefault("seed", seed)
    return out


def evaluate_tasks(model, tok, tasks: Sequence[Task], k: int, batch_size: int = 16, generation: bool = True) -> pl.DataFrame:
    frames = []
    for task in tasks:
        metrics, _ = evaluate_task(model, tok, task, batch_size=batch_size, generation=generation)
        frames.append(metrics_rows(k, task.name, metrics))
    return pl.concat(frames) if frames else metrics_rows(k, "all", {})
