"""The normalized edit-case schema that every reader produces and every later stage consumes.

One case is one JSON object (one line of data/datasets/{dataset}.jsonl):

    case_id               str   unique within the dataset
    subject               str   the entity being edited
    relation_id           str   e.g. "P36" (Wikidata id) or "unknown" when the source has none
    prompt                str   template with exactly one "{}" where the subject goes
    target_true           str   the true object, without leading space (the scorer adds " ");
                                absent for a knowledge insertion (KnowEdit WikiData_recent: the
                                model knew no answer before the edit)
    target_new            str   the counterfactual object, same convention, != target_true
    paraphrase_prompts    list[str]  full strings (subject filled in) asking for the same fact
    neighborhood_prompts  list[str]  full strings about OTHER subjects; their true answer is
                                     neighborhood_target when that is present, else target_true
    attribute_prompts     list[str]  full strings about subjects whose true answer is target_new
    generation_prompts    list[str]  open-ended prompts mentioning the subject

Optional fields:

    neighborhood_target   str   true answer of the neighborhood prompts when it is not target_true
                                (EasyEdit CounterFact locality, zsRE nq questions)
    edit_index            int   1-based position in an edit sequence (results/{run}/edits.jsonl)
    portability           list[dict]  multi-hop probes whose answer follows from the edit, each
                                {hop: str, prompt: str (full string), target_new: str (the answer
                                the edited fact implies), and optionally question: str (the same
                                probe as a question), target_true: str (the answer before the edit),
                                target_new_aliases / target_true_aliases: list[str]}
"""

from __future__ import annotations

import random
from typing import Any, NotRequired, TypedDict

from ..io import EditscaleError


class EditCase(TypedDict):
    """One normalized case (module doc): what every reader produces and every stage reads."""

    case_id: str
    subject: str
    relation_id: str
    prompt: str
    target_true: NotRequired[str]  # absent: a knowledge insertion
    target_new: str
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    attribute_prompts: list[str]
    generation_prompts: list[str]
    neighborhood_target: NotRequired[str]
    edit_index: NotRequired[int]
    portability: NotRequired[list[dict]]


# what validate_case checks: EditCase's fields (tests/test_data.py holds the two equal)
STRING_FIELDS = ("case_id", "subject", "relation_id", "prompt", "target_new")
LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")
REQUIRED_FIELDS = STRING_FIELDS + LIST_FIELDS
OPTIONAL_FIELDS = {"target_true": str, "neighborhood_target": str, "edit_index": int, "portability": list}
PORTABILITY_FIELDS = {"hop": True, "prompt": True, "target_new": True, "question": False, "target_true": False}  # field -> required
PORTABILITY_ALIASES = ("target_new_aliases", "target_true_aliases")  # optional lists of strings

UNKNOWN_RELATION = "unknown"


def is_insertion(case: dict) -> bool:
    """A knowledge insertion: no answer before the edit (no target_true), so nothing to compare
    the new answer against (es / ps undefined; rewrite_acc / rephrase_acc read it)."""
    return not case.get("target_true")


def is_template(prompt: str) -> bool:
    """A prompt template: exactly one "{}" (the subject) and no other braces, so that `fill` is exact."""
    return prompt.count("{}") == 1 and prompt.count("{") == 1 and prompt.count("}") == 1


def fill(template: str, subject: str) -> str:
    """The full prompt: the template with its single "{}" replaced by the subject.

    str.replace rather than str.format so that a subject containing braces cannot break it.
    """
    return template.replace("{}", subject, 1)


def make_template(prompt: str, subject: str) -> str | None:
    """Turn a full prompt into a template by replacing the first occurrence of `subject` by "{}".

    Returns None when the subject does not occur in the prompt, or when the prompt already holds
    braces (a literal "{" would be ambiguous with the placeholder). Only the first occurrence is
    replaced, so fill(template, subject) always reproduces `prompt`.
    """
    if not subject or subject not in prompt or "{" in prompt or "}" in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


def validate_case(d: Any, source: str | None = None) -> EditCase:
    """Check one case against the schema; return it unchanged or raise EditscaleError.

    The message names the case_id (or the position when there is none), the field and the
    problem, and `source` (a file name) when given.
    """
    where = f" in {source}" if source else ""
    if not isinstance(d, dict):
        raise EditscaleError(f"edit case{where} must be a JSON object, got {type(d).__name__}")
    case = f"case {d.get('case_id')!r}{where}"

    for field in REQUIRED_FIELDS:
        if field not in d:
            raise EditscaleError(f"{case}: missing required field '{field}'")
    for field in STRING_FIELDS:
        value = d[field]
        if not isinstance(value, str):
            raise EditscaleError(f"{case}: field '{field}' must be a string, got {type(value).__name__}")
        if field != "relation_id" and not value.strip():
            raise EditscaleError(f"{case}: field '{field}' is empty")
    if "target_true" in d and (not isinstance(d["target_true"], str) or not d["target_true"].strip()):
        raise EditscaleError(f"{case}: field 'target_true' must be a non-empty string when present (leave it out for a knowledge insertion)")
    for field in ("target_true", "target_new"):
        # The scorer prepends " " itself; a stored leading space would double it.
        if field in d and d[field] != d[field].strip():
            raise EditscaleError(f"{case}: field '{field}' has leading/trailing whitespace: {d[field]!r}")
    if d.get("target_true") == d["target_new"]:
        raise EditscaleError(f"{case}: target_new equals target_true ({d['target_new']!r}); nothing to edit")

    prompt = d["prompt"]
    if not is_template(prompt):
        raise EditscaleError(f"{case}: field 'prompt' must contain exactly one '{{}}' and no other braces: {prompt!r}")

    for field in LIST_FIELDS:
        value = d[field]
        if not isinstance(value, list):
            raise EditscaleError(f"{case}: field '{field}' must be a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise EditscaleError(f"{case}: field '{field}'[{i}] must be a string, got {type(item).__name__}")

    for field, kind in OPTIONAL_FIELDS.items():
        if field in d and field != "target_true" and (not isinstance(d[field], kind) or isinstance(d[field], bool)):
            raise EditscaleError(f"{case}: field '{field}' must be {kind.__name__}, got {type(d[field]).__name__}")
    for i, probe in enumerate(d.get("portability") or []):
        if not isinstance(probe, dict):
            raise EditscaleError(f"{case}: field 'portability'[{i}] must be an object, got {type(probe).__name__}")
        for key, required in PORTABILITY_FIELDS.items():
            if required and key not in probe:
                raise EditscaleError(f"{case}: field 'portability'[{i}] has no '{key}' (fields: {list(PORTABILITY_FIELDS)})")
            if key in probe and (not isinstance(probe[key], str) or not probe[key].strip()):
                raise EditscaleError(f"{case}: field 'portability'[{i}].{key} must be a non-empty string")
        for key in PORTABILITY_ALIASES:
            if key in probe and not (isinstance(probe[key], list) and all(isinstance(a, str) for a in probe[key])):
                raise EditscaleError(f"{case}: field 'portability'[{i}].{key} must be a list of strings")
        unknown = sorted(set(probe) - set(PORTABILITY_FIELDS) - set(PORTABILITY_ALIASES))
        if unknown:
            raise EditscaleError(f"{case}: field 'portability'[{i}] has unknown keys {unknown} "
                                 f"(fields: {[*PORTABILITY_FIELDS, *PORTABILITY_ALIASES]})")
    return d


def subsample(cases: list[dict], n_cases: int | None, seed: int, what: str) -> list[dict]:
    """A seeded random subset of n_cases, kept in source order (None: all cases)."""
    if n_cases is None:
        return cases
    if n_cases > len(cases):
        raise EditscaleError(f"{what}: n_cases={n_cases} requested but only {len(cases)} cases are available")
    keep = set(random.Random(f"editscale-subsample:{seed}").sample(range(len(cases)), n_cases))
    return [c for i, c in enumerate(cases) if i in keep]
