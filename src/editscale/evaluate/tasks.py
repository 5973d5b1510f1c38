"""Few-shot items and their two readings (generation and choice likelihood): what downstream
tasks and the built-in probes share (`editscale.evaluate.downstream` documents the readings and
the metrics)."""

from __future__ import annotations

import dataclasses

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .scoring import Batching, Decoding, chat_prompt, decode, run_prompts

INVALID = -1


# ---------------------------------------------------------------------------------------------
# Metrics


def confusion(labels: Sequence[int], preds: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    classes = sorted(set(labels) | set(preds))
    pos = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for y, p in zip(labels, preds):
        cm[pos[y], pos[p]] += 1
    return cm, classes


def mcc(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Multi-class Matthews correlation; 0.0 when undefined (a constant row or column)."""
    if not labels:
        return math.nan
    cm, _ = confusion(labels, preds)
    t = cm.sum(1).astype(float)
    p = cm.sum(0).astype(float)
    c = float(np.trace(cm))
    s = float(cm.sum())
    num = c * s - float(p @ t)
    den = math.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
    return num / den if den > 0 else 0.0


def f1_weighted(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Per-class F1 = 2TP / (2TP + FP + FN), averaged with the true-class supports as weights."""
    if not labels:
        return math.nan
    cm, classes = confusion(labels, preds)
    support = cm.sum(1)
    total = 0.0
    for i in range(len(classes)):
        if support[i] == 0:
            continue
        tp = cm[i, i]
        fp = cm[:, i].sum() - tp
        fn = cm[i, :].sum() - tp
        den = 2 * tp + fp + fn
        total += support[i] * (2 * tp / den if den else 0.0)
    return float(total / support.sum())


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    return sum(int(y == p) for y, p in zip(labels, preds)) / len(labels) if labels else math.nan


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Item:
    prompt: str
    choices: list[str]  # scored as " " + choice
    answer: int
    cf_prompt: str | None = None  # content-free version of the prompt (calibration)
    id: str = ""


@dataclass
class Task:
    name: str
    items: list[Item]
    parse: Callable[[str, list[str]], int]  # generated continuation -> choice index | INVALID
    max_new_tokens: int = 3
    meta: dict = field(default_factory=dict)
    question: bool = False  # its prompts ask a question (chat_task puts them in an instruct model's chat template)
    space: bool = True  # choices are scored as " " + choice (False: the start of a chat reply)


def chat_task(task: Task, tok) -> Task:
    """A question-format task put to an instruct model: each prompt (few-shot context and item)
    as the user turn of its chat template, the choices scored as the start of the reply (no
    leading space); other tasks unchanged."""
    if not task.question:
        return task
    wrap = {p: chat_prompt(tok, p) for it in task.items for p in (it.prompt, it.cf_prompt) if p is not None}
    items = [dataclasses.replace(it, prompt=wrap[it.prompt], cf_prompt=None if it.cf_prompt is None else wrap[it.cf_prompt])
             for it in task.items]
    return dataclasses.replace(task, items=items, space=False, meta={**task.meta, "chat_template": True})


def first_line(text: str) -> str:
    return text.lstrip().split("\n", 1)[0]


def parse_word(text: str, choices: list[str]) -> int:
    """The choice word (case-insensitive, whole word) that occurs first in the first line."""
    line = first_line(text)
    best, best_pos = INVALID, None
    for i, c in enumerate(choices):
        m = re.search(r"(?<![A-Za-z0-9])" + re.escape(c) + r"(?![A-Za-z0-9])", line, flags=re.IGNORECASE)
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = i, m.start()
    return best


def parse_letter(text: str, choices: list[str]) -> int:
    """Multiple-choice letter at the start of the answer: "B", "(B)", "B)" or "B." (case-sensitive)."""
    m = re.match(r"\(?([A-Z])(?![A-Za-z0-9])", first_line(text))
    if m and m.group(1) in choices:
        return choices.index(m.group(1))
    return INVALID


def parse_prefix(text: str, choices: list[str]) -> int:
    """The (longest) choice that the answer starts with, case-insensitive, ending at a word boundary."""
    line = first_line(text).lower()
    best, best_len = INVALID, -1
    for i, c in enumerate(choices):
        c_low = c.lower()
        if line.startswith(c_low) and (len(line) == len(c_low) or not line[len(c_low)].isalnum()) and len(c_low) > best_len:
            best, best_len = i, len(c_low)
    return best


def choice_loglik(model, tok, prompts: list[str], choices: list[list[str]], batch_size: int = 16, space: bool = True) -> list[list[float]]:
    """Mean token log-likelihood of " " + choice (`space`; else the choice) after each prompt (one
    prompt pass per prompt)."""
    return run_prompts(model, tok, prompts, choices, batching=Batching(batch_size), space=space).choice_ll


def evaluate_task(model, tok, task: Task, batch_size: int = 16, generation: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Metrics of one task on the current model, and per-item records (for debugging/reports).

    One prompt pass per item serves both readings (greedy decoding and choice likelihoods
    continue its KV cache); each distinct content-free prompt is scored once.
    """
    items = task.items
    prompts = [it.prompt for it in items]
    labels = [it.answer for it in items]
    res = run_prompts(model, tok, prompts, [it.choices for it in items], decoding=Decoding(task.max_new_tokens if generation else 0),
                      batching=Batching(batch_size), space=task.space)
    ll = res.choice_ll
    texts = decode(tok, res.new_ids) if generation else [""] * len(items)
    # content-free log-likelihoods: each distinct cf prompt once, with all the choices it needs
    cf_choices: dict[str, list[str]] = {}
    for it in items:
        if it.cf_prompt is not None:
            lst = cf_choices.setdefault(it.cf_prompt, [])
            lst.extend(c for c in it.choices if c not in lst)
    cf_val: dict[tuple[str, str], float] = {}
    if cf_choices:
        cf_prompts = sorted(cf_choices)
        cf_ll = choice_loglik(model, tok, cf_prompts, [cf_choices[p] for p in cf_prompts], batch_size, task.space)
        for p, row in zip(cf_prompts, cf_ll):
            cf_val.update({(p, c): v for c, v in zip(cf_choices[p], row)})
    pred_ll = [int(np.argmax(row)) for row in ll]
    pred_cal = [
        int(np.argmax([v - cf_val[(it.cf_prompt, c)] for v, c in zip(row, it.choices)])) if it.cf_prompt is not None else p
        for it, row, p in zip(items, ll, pred_ll)
    ]
    metrics: dict[str, float] = {"n": float(len(items))}
    if generation:
        pred_gen = [task.parse(t, it.choices) for t, it in zip(texts, items)]
        n_invalid = sum(p == INVALID for p in pred_gen)
        metrics.update(
            accuracy=accuracy(labels, pred_gen), f1=f1_weighted(labels, pred_gen), mcc=mcc(labels, pred_gen),
            invalid=float(n_invalid), invalid_frac=n_invalid / len(items) if items else math.nan,
        )
    else:
        pred_gen = [INVALID] * len(items)
    metrics.update(
        accuracy_ll=accuracy(labels, pred_ll), f1_ll=f1_weighted(labels, pred_ll), mcc_ll=mcc(labels, pred_ll),
        accuracy_cal=accuracy(labels, pred_cal), f1_cal=f1_weighted(labels, pred_cal), mcc_cal=mcc(labels, pred_cal),
    )
    records = [
        {"id": it.id, "label": y, "generated": t, "pred": pg, "pred_ll": pl_, "pred_cal": pc, "loglik": row}
        for it, y, t, pg, pl_, pc, row in zip(items, labels, texts, pred_gen, pred_ll, pred_cal, ll)
    ]
    return metrics, records


def metrics_rows(k: int, task: str, metrics: dict[str, float]) -> pl.DataFrame:
    return pl.DataFrame(
        {"k": [k] * len(metrics), "item": [task] * len(metrics), "metric": list(metrics), "value": [float(v) for v in metrics.values()]},
        schema={"k": pl.Int64, "item": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64},
    )
