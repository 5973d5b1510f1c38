"""Editing proficiency of one edit, scored on the model right after that edit (CounterFact metrics).

For a case with new object o* and true object o (nll = mean token NLL of " " + object, see
`scoring`):

  es   efficacy score: fraction of edit prompts (the one filled template) with P(o*) > P(o),
       i.e. nll_new < nll_true (ROME/MEMIT "rewrite accuracy")
  em   efficacy magnitude: mean over the edit prompts of exp(-nll_new) - exp(-nll_true), the
       difference of the geometric-mean token probabilities (ROME's `*_diff` in summarize.py)
  ps   paraphrase score: same comparison averaged over paraphrase_prompts
  pm   paraphrase magnitude: same difference averaged over paraphrase_prompts
  ns   neighborhood score: fraction of neighborhood prompts where the correct answer stays more
       likely than o*: P(o_n) > P(o*), o_n = neighborhood_target if the case has one else o
  nm   neighborhood magnitude: mean of exp(-nll(o_n)) - exp(-nll(o*))
  score  harmonic mean of es, ps, ns (ROME/MEMIT "S"); components that are undefined because
       the case has no such prompts (NaN) are left out; 0 if any component is 0; undefined (NaN)
       when es is

A knowledge insertion (no target_true, editscale.data.schema.is_insertion) has no old answer to
compare against: es, em, ps, pm and nll_true are NaN, while efficacy_em, paraphrase_em,
rewrite_acc and rephrase_acc (the new answer alone) are defined; its neighbourhood prompts are
scored against neighborhood_target, and left out (NaN) when it has none.
  efficacy_em     1.0 if every token of o* is the argmax on the edit prompt (teacher forcing)
  paraphrase_em   fraction of paraphrase prompts on which o* is the argmax continuation
  neighborhood_em fraction of neighborhood prompts on which o_n is the argmax continuation
  nll_new, nll_true  NLL of o* and o on the edit prompt
  port_s          portability score (cases with `portability` probes only): fraction of the
                  probes whose answer before the edit is known (target_true) on which the answer
                  the edit implies is more likely, P(probe's target_new) > P(its target_true)
  portability_em  fraction of the probes on which their target_new is the argmax continuation

EasyEdit's names, computed as EasyEdit's `test_prediction_acc` does (teacher forcing on
prompt + " " + target, easyeditor/evaluate/evaluate_utils.py), side by side with the above:

  rewrite_acc   mean over the edit prompts of the fraction of o*'s tokens that are the argmax
                given the prompt and o*'s tokens before them (token accuracy, not all-or-nothing)
  rephrase_acc  the same over paraphrase_prompts
  locality      mean over neighborhood prompts of the fraction of o_n's positions where the
                edited model's argmax equals the unedited model's (EasyEdit compares pre- and
                post-edit argmax tokens, not the answer); needs `base` (the unedited model),
                1.0 by definition when the model is the unedited one
  portability_acc  EasyEdit's portability reading: the token accuracy of each probe's target_new
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import polars as pl

from ..data.schema import fill, is_insertion
from .scoring import Batching, chat_prompt, run_prompts

PARTS = ("efficacy", "paraphrase", "neighborhood", "portability")  # portability: cases that have probes
SCORE_PARTS = ("efficacy", "paraphrase", "neighborhood")  # the harmonic mean `score`
EDIT_METRICS = (
    "es", "em", "ps", "pm", "ns", "nm", "score", "efficacy_em", "paraphrase_em", "neighborhood_em", "nll_new", "nll_true",
    "rewrite_acc", "rephrase_acc", "locality", "port_s", "portability_em", "portability_acc",
)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of the non-NaN values; 0 if any is 0 (or negative); NaN if none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return math.nan
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def case_metrics(
    model, tok, cases: Sequence[dict], parts: Sequence[str] = PARTS, batch_size: int = 64, base=None, chat: bool = False,
    base_memo: dict | None = None,
) -> list[dict[str, float]]:
    """Per-case metric dicts (keys as in the module docstring, restricted to `parts`).

    All prompts of all cases go through one batched `scoring.run_prompts` call: each distinct
    prompt is run once and its new and correct targets are scored as continuations of its KV
    cache (same numbers as `score_pairs`, tested). `base`: the unedited model for EasyEdit's
    locality, as (model, tok) or a context manager yielding it (models.load.UneditedView: the
    edited model with its base matrices swapped in); "self" when `model` is the unedited model;
    None leaves locality out. `chat`: every prompt is a question put to an instruct model in its
    chat template (scoring.chat_prompt), the targets scored as the start of its answer.

    `base_memo`: a dict kept across calls that score with the same `base` (one edit-score job):
    the unedited model's argmax for one exact list of neighbourhood (prompt, answer) pairs, run
    once. Cases that share a relation and a true object share their neighbourhood prompts (in
    geofacts ~135 distinct lists per 500 edits), and the unedited model does not change, so the
    readings are the same call's, bit for bit.
    """
    prompts: list[str] = []
    targets: list[str] = []
    slots: list[tuple[int, str, int]] = []  # (case, part, prompt number) for each pair of rows
    for ci, case in enumerate(cases):
        # an insertion (no old answer) scores its new answer twice; the comparisons are left out below
        old = case.get("target_true") or case["target_new"]
        near = case.get("neighborhood_target") or case.get("target_true")
        groups = {  # part -> [(prompt, the edit's answer, the correct answer)]
            "efficacy": [(fill(case["prompt"], case["subject"]), case["target_new"], old)],
            "paraphrase": [(p, case["target_new"], old) for p in case.get("paraphrase_prompts") or []],
            "neighborhood": [(p, case["target_new"], near) for p in case.get("neighborhood_prompts") or []] if near else [],
            # a probe without a known answer before the edit is scored against its own target twice (port_s leaves it out)
            "portability": [(q["prompt"], q["target_new"], q.get("target_true") or q["target_new"]) for q in case.get("portability") or []],
        }
        for part in parts:
            for pi, (p, new, correct) in enumerate(groups[part]):
                prompts += [p, p]
                targets += [new, correct]
                slots.append((ci, part, pi))
    if chat:
        wrapped = {p: chat_prompt(tok, p) for p in dict.fromkeys(prompts)}
        prompts = [wrapped[p] for p in prompts]
    space = not chat
    # each prompt once (KV cache), with its two targets as continuations
    uniq: dict[tuple[str, str, str], int] = {}
    for s_ in range(len(slots)):
        uniq.setdefault((prompts[2 * s_], targets[2 * s_], targets[2 * s_ + 1]), len(uniq))
    keys = list(uniq)
    res = run_prompts(model, tok, [p for p, _, _ in keys], [[a, b] for _, a, b in keys], batching=Batching(batch_size), space=space)
    base_argmax = {}
    if base is not None and base != "self" and "neighborhood" in parts:  # the unedited model's argmax on o_n
        near = sorted({(prompts[2 * i], targets[2 * i + 1]) for i, (_, part, _) in enumerate(slots) if part == "neighborhood"})
        memo_key = (batch_size, space, tuple(near))
        argmax = base_memo.get(memo_key) if base_memo is not None else None
        if argmax is None:
            with base if hasattr(base, "__enter__") else contextlib.nullcontext(base) as (base_model, base_tok):
                got = run_prompts(base_model, base_tok, [p for p, _ in near], [[b] for _, b in near], batching=Batching(batch_size), space=space)
            argmax = [got.choice_argmax[i][0] for i in range(len(near))]
            if base_memo is not None:
                base_memo[memo_key] = argmax
        base_argmax = dict(zip(near, argmax))
    nll, hit, acc, agree = [], [], [], []
    for s_ in range(len(slots)):
        key = (prompts[2 * s_], targets[2 * s_], targets[2 * s_ + 1])
        u = uniq[key]
        nll += [-res.choice_ll[u][0], -res.choice_ll[u][1]]
        hit += [res.choice_match[u][0], res.choice_match[u][1]]
        acc.append(res.choice_token_acc[u][0])
        if base == "self":
            agree.append(1.0)
        elif (key[0], key[2]) in base_argmax:
            now, before = res.choice_argmax[u][1], base_argmax[(key[0], key[2])]
            agree.append(sum(a == b for a, b in zip(now, before)) / len(before))
        else:
            agree.append(math.nan)
    per: list[dict[str, dict[str, list]]] = [
        {p: {"new": [], "old": [], "hit_new": [], "hit_old": [], "acc_new": [], "agree": []} for p in parts} for _ in cases]
    for s, (ci, part, _) in enumerate(slots):
        d = per[ci][part]
        d["new"].append(nll[2 * s])
        d["old"].append(nll[2 * s + 1])
        d["hit_new"].append(float(hit[2 * s]))
        d["hit_old"].append(float(hit[2 * s + 1]))
        d["acc_new"].append(acc[s])
        d["agree"].append(agree[s])
    out = []
    for ci in range(len(cases)):
        m: dict[str, float] = {}
        compare = not is_insertion(cases[ci])  # P(new) against P(old) needs an old answer
        if "efficacy" in parts:
            d = per[ci]["efficacy"]
            m["es"] = _mean([float(a < b) for a, b in zip(d["new"], d["old"])]) if compare else math.nan
            m["em"] = _mean([math.exp(-a) - math.exp(-b) for a, b in zip(d["new"], d["old"])]) if compare else math.nan
            m["efficacy_em"] = _mean(d["hit_new"])
            m["nll_new"] = _mean(d["new"])
            m["nll_true"] = _mean(d["old"]) if compare else math.nan
            m["rewrite_acc"] = _mean(d["acc_new"])
        if "paraphrase" in parts:
            d = per[ci]["paraphrase"]
            m["ps"] = _mean([float(a < b) for a, b in zip(d["new"], d["old"])]) if compare else math.nan
            m["pm"] = _mean([math.exp(-a) - math.exp(-b) for a, b in zip(d["new"], d["old"])]) if compare else math.nan
            m["paraphrase_em"] = _mean(d["hit_new"])
            m["rephrase_acc"] = _mean(d["acc_new"])
        if "neighborhood" in parts:
            d = per[ci]["neighborhood"]
            m["ns"] = _mean([float(b < a) for a, b in zip(d["new"], d["old"])])
            m["nm"] = _mean([math.exp(-b) - math.exp(-a) for a, b in zip(d["new"], d["old"])])
            m["neighborhood_em"] = _mean(d["hit_old"])
            if base is not None:
                m["locality"] = _mean(d["agree"])
        if "portability" in parts and cases[ci].get("portability"):
            d, probes = per[ci]["portability"], cases[ci]["portability"]
            m["port_s"] = _mean([float(a < b) for a, b, q in zip(d["new"], d["old"], probes) if q.get("target_true")])
            m["portability_em"] = _mean(d["hit_new"])
            m["portability_acc"] = _mean(d["acc_new"])
        if all(p in parts for p in SCORE_PARTS):
            m["score"] = harmonic_mean([m["es"], m["ps"], m["ns"]]) if not math.isnan(m["es"]) else math.nan
        out.append(m)
    return out


def metrics_to_rows(cases: Sequence[dict], metrics: Sequence[dict[str, float]], k: int | Sequence[int]) -> pl.DataFrame:
    """Long table: k, item (case_id), edit_index, metric, value. `k` is one int or one per case."""
    ks = [k] * len(cases) if isinstance(k, int) else list(k)
    rows = {"k": [], "item": [], "edit_index": [], "metric": [], "value": []}
    for case, m, kk in zip(cases, metrics, ks):
        for name, v in m.items():
            rows["k"].append(int(kk))
            rows["item"].append(str(case["case_id"]))
            rows["edit_index"].append(case.get("edit_index"))
            rows["metric"].append(name)
            rows["value"].append(float(v))
    return pl.DataFrame(
        rows, schema={"k": pl.Int64, "item": pl.Utf8, "edit_index": pl.Int64, "metric": pl.Utf8, "value": pl.Float64}
    )


def score_cases(model, tok, cases: Sequence[dict], k: int | Sequence[int] = 0, parts: Sequence[str] = PARTS, batch_size: int = 64,
                base=None, chat: bool = False, base_memo: dict | None = None) -> pl.DataFrame:
    """Score `cases` on the current model -> long rows (k, item=case_id, edit_index, metric, value);
    `base`, `chat` and `base_memo` as in `case_metrics`."""
    return metrics_to_rows(cases, case_metrics(model, tok, cases, parts, batch_size, base, chat, base_memo), k)
