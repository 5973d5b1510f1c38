"""Metric `answers`: the model's generated answers at checkpoint k, beside the teacher-forced
scores of edit_scores and history (editscale.evaluate.answers: decoding and matching as the
"Mirage of Model Editing" reference). Opt-in, so that studies without it plan no extra jobs:

    plugins: [editscale.evaluate.generated]
    metrics:
      answers:
        eval_every: 50
        contexts: [cloze, qa_inst]     # cloze | question | qa_inst | chat (instruct models)
        sample: 100                    # earlier edits per checkpoint (age-stratified, as history's)

At checkpoint k > 0 it answers for the edit k itself (right after it) and for history's sample of
the earlier edits (`sample`, `strata`, `seed`: the same edits history re-scores); at k = 0, for
the same-sized sample of the run's whole sequence, before any edit (what the model answered
before it was edited). In each context of `contexts`:

  efficacy       the edit's cloze prompt, or its question: efficacy_em / efficacy_f1 against
                 target_new (and its aliases), efficacy_old_em against target_true (the old answer
                 still given)
  paraphrase     cloze only, each paraphrase prompt: paraphrase_em / paraphrase_f1
  neighborhood   cloze only, up to `neighbors` neighbourhood prompts: neighborhood_kept = 1 when the
                 generated tokens equal the unedited model's (the reference's locality),
                 neighborhood_old_em against target_true
  portability    the case's multi-hop probes (the case schema's `portability`, e.g. geofacts'
                 `portability: true`): their cloze prompt, or their question in the other
                 contexts; portability_em / portability_f1 against the probe's target_new,
                 portability_old_em against its target_true where it has one

Beside them, the same cases and prompts read teacher-forced (context "teacher_forced", the
readings of edit_scores: es / ps / ns / port_s compare P(target_new) with P(target_true),
efficacy_em / paraphrase_em / neighborhood_em / portability_em the argmax match of the target
given its own tokens): the two readings on identical items, the gap the report draws (figure
`readings`). Values are means over a case's prompts of a part. The question of a case is its `question` field
where the dataset has one ("{}" for the subject), else its relation's template in QUESTIONS (by
Wikidata relation id, geofacts' and CounterFact's); a question context on a case that has neither
is an error naming the relation, at `snakemake -n` wherever the edits are known (`check_cases`). Rows: k, item (case_id), edit_index, context, metric, value,
stratum_lo, stratum_hi (the age stratum of the sample; [k, k] for the current edit when the sample
did not draw it; [1, n] at k = 0).

Cost per checkpoint: (min(k, sample) + 1) cases x prompts per context x at most max_new_tokens
greedy steps, flat in k once the sample is full (benchmarks/eval_cost.py).
"""

from __future__ import annotations

import logging

from ..io import EditscaleError
from ..data.schema import fill
from .answers import CONTEXTS, MAX_NEW_TOKENS, context_prompt, exact_match, generate_answers, token_f1
from .registry import CurveSpec, metric

log = logging.getLogger(__name__)

# relation id -> question template ("{}" = the subject): geofacts' relations and CounterFact's commonest
QUESTIONS = {
    "P17": "Which country is {} located in?",
    "P36": "What is the capital of {}?",
    "P30": "Which continent is {} located in?",
    "P38": "What is the official currency of {}?",
    "P131": "Which US state is {} located in?",
    "P27": "What is the country of citizenship of {}?",
    "P103": "What is the native language of {}?",
    "P176": "Which company produces {}?",
    "P37": "What is the official language of {}?",
    "P19": "Where was {} born?",
    "P20": "Where did {} die?",
    "P106": "What is the profession of {}?",
    "P413": "What position does {} play?",
    "P495": "Which country does {} come from?",
    "P641": "Which sport does {} play?",
    "P740": "Where was {} founded?",
    "P937": "Where did {} work?",
    "P159": "Where is the headquarters of {}?",
    "P140": "What is the religion of {}?",
    "P1412": "Which language does {} speak?",
    "P101": "What is the field of work of {}?",
    "P127": "Who owns {}?",
    "P364": "What is the original language of {}?",
    "P449": "Which network originally broadcast {}?",
    "P136": "What is the genre of {}?",
    "P108": "Who is the employer of {}?",
    "P39": "What position did {} hold?",
    "P407": "In which language is {} written?",
    "P264": "Which record label is {} signed to?",
    "P463": "Which organization is {} a member of?",
    "P178": "Who developed {}?",
    "P138": "Who or what is {} named after?",
    "P1303": "Which instrument does {} play?",
    "P190": "Which city is a twin city of {}?",
    "P276": "Where is {} located?",
}

SCHEMA = {
    "properties": {
        "eval_every": {"default": 50},
        "contexts": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(CONTEXTS)}, "default": ["cloze"],
                     "description": "how each prompt is put to the model (editscale.evaluate.answers): cloze, question, qa_inst, chat"},
        "parts": {"type": "array", "minItems": 1, "uniqueItems": True,
                  "items": {"enum": ["efficacy", "paraphrase", "neighborhood", "portability"]},
                  "default": ["efficacy", "paraphrase", "neighborhood", "portability"],
                  "description": "paraphrase and neighborhood: cloze context only; portability: cases that have probes"},
        "sample": {"oneOf": [{"const": "all"}, {"type": "integer", "minimum": 1}], "default": 100,
                   "description": "earlier edits answered per checkpoint (history's age-stratified sample), plus the current edit"},
        "strata": {"type": "integer", "minimum": 1, "maximum": 16, "default": 4},
        "seed": {"type": "integer", "default": 0},
        "neighbors": {"type": "integer", "minimum": 0, "default": 3, "description": "neighbourhood prompts per case (the first N)"},
        "max_new_tokens": {"type": "integer", "minimum": 1, "default": MAX_NEW_TOKENS, "description": "the reference's 50"},
        "batch_size": {"type": "integer", "minimum": 1, "default": 32},
    }
}
# doctor: a prompt's tokens; base + edited model per neighbourhood prompt; portability probes per case (geofacts: <= 3)
PROMPT_TOKENS, NEIGHBOR_PROMPTS, PROBES = 20, 2, 3


def question(case: dict) -> str:
    """The case's question with its subject filled in (module doc)."""
    template = case.get("question") or QUESTIONS.get(str(case.get("relation_id")))
    if template is None:
        raise EditscaleError(f"case {case.get('case_id')!r}: no `question` field and no question template for relation "
                             f"{case.get('relation_id')!r} (editscale.evaluate.generated.QUESTIONS): use the cloze context")
    return fill(template, case["subject"]) if "{}" in template else template


def check_cases(section: dict, run: dict, cases: list[dict]) -> None:
    """Plan time (editscale.workflow.check_sequence_lengths): a context other than cloze asks each
    edit's question, so every case of the run needs one; one error naming every relation without."""
    asking = [c for c in section.get("contexts", ["cloze"]) if c != "cloze"]
    if not asking or "efficacy" not in section.get("parts", ["efficacy"]):
        return
    missing: dict[str, list[int]] = {}
    for case in cases:
        if not case.get("question") and str(case.get("relation_id")) not in QUESTIONS:
            missing.setdefault(str(case.get("relation_id")), []).append(int(case.get("edit_index", 0)))
    if missing:
        shown = ", ".join(f"{rel!r} (edits {idx[:3]}{' ...' if len(idx) > 3 else ''})" for rel, idx in sorted(missing.items()))
        raise EditscaleError(
            f"metrics.answers.contexts {asking} ask each edit's question, but run {run['name']}'s edits of relation(s) {shown} have "
            "no `question` field and no question template (editscale.evaluate.generated.QUESTIONS): use contexts: [cloze], "
            "or a dataset whose cases carry questions")


def references(case: dict, which: str) -> list[str]:
    """target_new or target_true, and its aliases where the dataset has them ([] for the
    target_true of a knowledge insertion: no answer before the edit)."""
    return [case[which], *(case.get(f"{which}_aliases") or [])] if case.get(which) else []


def answer_sample(cases: list[dict], k: int, size: int | None, strata: int, seed: int) -> list[tuple[dict, int, int]]:
    """(case, stratum_lo, stratum_hi): history's sample at k plus the edit k itself; at k = 0 the
    sample of the whole sequence (module doc)."""
    from .history import history_sample

    if k == 0:
        n = max((int(c["edit_index"]) for c in cases), default=0)
        return [(c, 1, n) for c, _, _ in history_sample(cases, n, size, strata, seed)]
    picked = history_sample(cases, k, size, strata, seed)
    if not any(int(c["edit_index"]) == k for c, _, _ in picked):
        picked += [(c, k, k) for c in cases if int(c["edit_index"]) == k]
    return sorted(picked, key=lambda t: int(t[0]["edit_index"]))


def _prompts(case: dict, context: str, parts, neighbors: int, tok) -> list[tuple[str, str, list[str], list[str]]]:
    """(part, prompt text, the edit's answers, the answers before it) of one case in one context."""
    new, old = references(case, "target_new"), references(case, "target_true")
    out = []
    if "efficacy" in parts:
        cloze = fill(case["prompt"], case["subject"])
        out.append(("efficacy", context_prompt(context, tok, cloze=cloze, question=None if context == "cloze" else question(case)), new, old))
    if context == "cloze":
        if "paraphrase" in parts:
            out += [("paraphrase", p, new, old) for p in case.get("paraphrase_prompts") or []]
        near = case.get("neighborhood_target") or case.get("target_true")
        if "neighborhood" in parts and near:  # an insertion without a neighbourhood answer has no neighbourhood reading
            out += [("neighborhood", p, new, [near]) for p in (case.get("neighborhood_prompts") or [])[:neighbors]]
    if "portability" in parts:
        for probe in case.get("portability") or []:
            text = probe["prompt"] if context == "cloze" else probe.get("question")
            if text is not None:  # a probe without a question is asked in the cloze context only
                out.append(("portability", context_prompt(context, tok, cloze=text, question=text),
                            [probe["target_new"], *probe.get("target_new_aliases", [])],
                            [probe["target_true"], *probe.get("target_true_aliases", [])] if probe.get("target_true") else []))
    return out


def cost(run, section, corpus, f, k):
    size = section.get("sample", 100)
    cases = (k if size == "all" else min(k, int(size))) + 1
    parts = section.get("parts", ["efficacy", "paraphrase", "neighborhood"])
    per_case = 0
    for context in section.get("contexts", ["cloze"]):
        per_case += 1 + PROBES * ("portability" in parts) + (
            3 * ("paraphrase" in parts) + NEIGHBOR_PROMPTS * int(section.get("neighbors", 3)) * ("neighborhood" in parts) if context == "cloze" else 0)
    steps = int(section.get("max_new_tokens", MAX_NEW_TOKENS))
    return f * cases * per_case * PROMPT_TOKENS, f * cases * per_case * steps


@metric("answers", "generated answers (greedy, natural stop) scored by exact match and token F1, beside the teacher-forced scores",
        order=25, schema=SCHEMA, cost=cost, check_cases=check_cases, figures={"readings": "editscale.report.plots:readings_chart"},
        curves=(CurveSpec("generated_efficacy", "efficacy_em", label="generated answers: efficacy (exact match)", summary="gen_es", compare=True),
                CurveSpec("generated_paraphrase", "paraphrase_em", phases=False, summary="gen_ps", compare=True),
                CurveSpec("generated_locality", "neighborhood_kept", phases=False, summary="gen_ns"),
                CurveSpec("generated_portability", "portability_em", phases=False, summary="gen_port", compare=True)))
def compute(checkpoint, cfg):
    import polars as pl

    k = checkpoint.k
    cases = checkpoint.edits()
    model, tok = checkpoint.model()
    picked = answer_sample(cases, k, None if cfg.sample == "all" else int(cfg.sample), int(cfg.strata), int(cfg.seed))
    log.info("answers at k=%d: %d edits (%s), contexts %s, at most %d new tokens", k, len(picked),
             "the sequence before editing" if k == 0 else "the current edit and history's sample", list(cfg.contexts), cfg.max_new_tokens)
    rows = {c: [] for c in ("k", "item", "edit_index", "context", "metric", "value", "stratum_lo", "stratum_hi")}
    for context in cfg.contexts:
        jobs = [(i, *p) for i, (case, _, _) in enumerate(picked) for p in _prompts(case, context, cfg.parts, int(cfg.neighbors), tok)]
        ids, texts = generate_answers(model, tok, [job[2] for job in jobs], int(cfg.max_new_tokens), int(cfg.batch_size))
        neighborhood = [j for j, job in enumerate(jobs) if job[1] == "neighborhood"]
        base_ids = {}
        if neighborhood:
            with checkpoint.unedited(model, tok) as (base_model, base_tok):
                got, _ = generate_answers(base_model, base_tok, [jobs[j][2] for j in neighborhood], int(cfg.max_new_tokens), int(cfg.batch_size))
            base_ids = dict(zip(neighborhood, got))
        values: dict[tuple[int, str], list[float]] = {}
        for j, (i, part, _, new, old) in enumerate(jobs):
            if part == "neighborhood":
                readings = {"neighborhood_kept": float(ids[j] == base_ids[j]), "neighborhood_old_em": exact_match(texts[j], old)}
            else:
                readings = {f"{part}_em": exact_match(texts[j], new), f"{part}_f1": token_f1(texts[j], new)}
                if part in ("efficacy", "portability") and old:
                    readings[f"{part}_old_em"] = exact_match(texts[j], old)
            for name, v in readings.items():
                values.setdefault((i, name), []).append(v)
        for (i, name), vs in sorted(values.items()):
            case, lo, hi = picked[i]
            for col, v in zip(rows, (k, case["case_id"], int(case["edit_index"]), context, name, sum(vs) / len(vs), lo, hi)):
                rows[col].append(v)
        shown = [(jobs[j][2][-60:], texts[j]) for j in range(len(jobs)) if jobs[j][1] == "efficacy"][:3]
        log.info("answers at k=%d, %s: %s", k, context, "; ".join(f"{p!r} -> {a!r}" for p, a in shown))
    # the same cases and prompts, teacher-forced (module doc); neighbourhood prompts cut as generated
    from .edit_scores import PARTS, case_metrics

    tf_cases = [{**case, "neighborhood_prompts": (case.get("neighborhood_prompts") or [])[: int(cfg.neighbors)]} for case, _, _ in picked]
    tf = case_metrics(model, tok, tf_cases, [q for q in PARTS if q in cfg.parts], int(cfg.batch_size))
    keep = ("es", "ps", "ns", "port_s", "efficacy_em", "paraphrase_em", "neighborhood_em", "portability_em")
    for (case, lo, hi), readings in zip(picked, tf):
        for name in keep:
            if name in readings and readings[name] == readings[name]:  # NaN: the case has no such prompt
                for col, v in zip(rows, (k, case["case_id"], int(case["edit_index"]), "teacher_forced", name, readings[name], lo, hi)):
                    rows[col].append(v)
    return pl.DataFrame(rows, schema={"k": pl.Int64, "item": pl.Utf8, "edit_index": pl.Int64, "context": pl.Utf8, "metric": pl.Utf8,
                                      "value": pl.Float64, "stratum_lo": pl.Int64, "stratum_hi": pl.Int64})
