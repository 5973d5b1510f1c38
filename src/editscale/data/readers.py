"""Readers from the public edit datasets into the normalized schema, and the dataset entry point.

Every reader returns a list of cases in the schema of editscale.data.schema. Records that cannot
become an edit (empty subject, subject not in the prompt, empty target, target_new == target_true)
are skipped and counted per reason: one log line per reason, one summary line on the console, and
the dataset fails when more than the spec's max_skipped_fraction of its records were skipped (a
wrong reader or a broken file); a reader that is left with no case at all raises.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..io import EditscaleError, write_jsonl_atomic
from ..registry import Registry
from .geofacts import build_geofacts
from .schema import UNKNOWN_RELATION, fill, is_template, make_template, subsample, validate_case

log = logging.getLogger(__name__)

# Canonical downloads of the original ROME/MEMIT files, for the workflow's download rule.
COUNTERFACT_URLS = {
    "counterfact": "https://rome.baulab.info/data/dsets/counterfact.json",
    "multi_counterfact": "https://rome.baulab.info/data/dsets/multi_counterfact.json",
}


def counterfact_url(name: str = "counterfact") -> str:
    """Download URL of the original CounterFact ("counterfact") or MultiCounterFact ("multi_counterfact")."""
    if name not in COUNTERFACT_URLS:
        raise EditscaleError(f"unknown CounterFact variant {name!r}; known: {', '.join(sorted(COUNTERFACT_URLS))}")
    return COUNTERFACT_URLS[name]


# (records read, cases kept, skipped per reason) of every file the current load_cases call reads
_SKIP_REPORTS: ContextVar[list | None] = ContextVar("skip_reports", default=None)


class _Skips:
    """Counts skipped records per reason and remembers the first example of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, ident: Any) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, str(ident))

    def report(self, reader: str, path: Path, n_records: int, n_kept: int) -> None:
        reports = _SKIP_REPORTS.get()
        if reports is not None:
            reports.append((n_records, n_kept, Counter(self.counts)))
        log.info("%s: %d records in %s, %d cases kept, %d skipped", reader, n_records, path, n_kept, n_records - n_kept)
        for reason, count in sorted(self.counts.items()):
            log.warning("%s: skipped %d records in %s: %s (first: %s)", reader, count, path, reason, self.first[reason])


def _load_json_list(path: str | os.PathLike) -> list:
    """The records of a dataset file: a JSON list, or JSON Lines (one record per line; a .jsonl
    file, or any file that is not one JSON value but whose every line is)."""
    path = Path(path)
    if not path.is_file():
        raise EditscaleError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # not several JSON values, one per line
                raise EditscaleError(f"{path}: not valid JSON ({exc})") from exc
        else:
            if not isinstance(data, list):
                raise EditscaleError(f"{path}: expected a JSON list of records (or JSON Lines), got {type(data).__name__}")
            return data
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EditscaleError(f"{path}: line {number} is not valid JSON ({exc}); JSON Lines holds one record per line") from exc
    return records


def _get(record: Any, key: str, kind: type | tuple, path: Path, ident: Any) -> Any:
    """record[key], checked to be of `kind`; errors name the file, the record and the key."""
    if not isinstance(record, dict):
        raise EditscaleError(f"{path}: record {ident} is not a JSON object")
    if key not in record:
        raise EditscaleError(f"{path}: record {ident} has no key '{key}'")
    value = record[key]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise EditscaleError(f"{path}: record {ident} key '{key}' must be {expected}, got {type(value).__name__}")
    return value


def _str_list(record: dict, key: str, path: Path, ident: Any) -> list[str]:
    value = _get(record, key, list, path, ident)
    if not all(isinstance(v, str) for v in value):
        raise EditscaleError(f"{path}: record {ident} key '{key}' must be a list of strings")
    return list(value)


def _targets_ok(target_true: str, target_new: str, skips: _Skips, ident: Any) -> bool:
    if not target_new or not target_true:
        skips.add("empty target_new or target_true", ident)
        return False
    if target_new == target_true:
        skips.add("target_new equals target_true (nothing to edit)", ident)
        return False
    return True


def read_counterfact(path: str | os.PathLike) -> list[dict]:
    """Original CounterFact / MultiCounterFact json (ROME's counterfact.json, MEMIT's multi_counterfact.json).

    Each record: case_id, requested_rewrite {prompt, subject, relation_id, target_new {str},
    target_true {str}}, paraphrase_prompts, neighborhood_prompts, attribute_prompts,
    generation_prompts. The prompt is already a "{}" template.
    """
    path = Path(path)
    records = _load_json_list(path)
    skips = _Skips()
    cases = []
    for i, rec in enumerate(records):
        ident = rec.get("case_id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
        case_id = _get(rec, "case_id", (int, str), path, ident)
        rw = _get(rec, "requested_rewrite", dict, path, ident)
        target_new = _get(_get(rw, "target_new", dict, path, ident), "str", str, path, ident).strip()
        target_true = _get(_get(rw, "target_true", dict, path, ident), "str", str, path, ident).strip()
        if not _targets_ok(target_true, target_new, skips, ident):
            continue
        prompt = _get(rw, "prompt", str, path, ident)
        subject = _get(rw, "subject", str, path, ident)
        if not subject.strip():
            skips.add("empty subject", ident)
            continue
        if not is_template(prompt):
            skips.add("prompt does not hold exactly one '{}' and no other braces", ident)
            continue
        cases.append(
            {
                "case_id": str(case_id),
                "subject": subject,
                "relation_id": _get(rw, "relation_id", str, path, ident),
                "prompt": prompt,
                "target_true": target_true,
                "target_new": target_new,
                "paraphrase_prompts": _str_list(rec, "paraphrase_prompts", path, ident),
                "neighborhood_prompts": _str_list(rec, "neighborhood_prompts", path, ident),
                "attribute_prompts": _str_list(rec, "attribute_prompts", path, ident),
                "generation_prompts": _str_list(rec, "generation_prompts", path, ident),
            }
        )
    skips.report("counterfact", path, len(records), len(cases))
    return cases


def read_counterfact_easyedit(paths: str | os.PathLike | list) -> list[dict]:
    """EasyEdit's CounterFact json (counterfact-train.json, counterfact-val.json; JSON or JSON
    Lines), one or more files, read as EasyEdit's CounterFactDataset does.

    Each record: prompt (subject filled in), subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth, and case_id where the file has one (EasyEdit's loader
    needs none); a record without case_id gets "<file name without extension>-<index in the file,
    6 digits>" (e.g. counterfact-train-000042): stable for the same file. The prompt becomes a template by
    replacing the subject's first occurrence by "{}"; records whose prompt does not contain the
    subject are skipped and counted (none in the public train/val files). The format carries no
    relation id, attribute prompts or generation prompts: relation_id is "unknown",
    attribute_prompts is empty, and generation_prompts are the filled prompt and its paraphrase
    so that fluency can still be measured on the edited subject.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    cases: list[dict] = []
    for path in map(Path, paths):
        records = _load_json_list(path)
        skips = _Skips()
        n_before = len(cases)
        for i, rec in enumerate(records):
            ident = rec.get("case_id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
            case_id = _get(rec, "case_id", (int, str), path, ident) if isinstance(rec, dict) and "case_id" in rec else f"{path.stem}-{i:06d}"
            subject = _get(rec, "subject", str, path, ident)
            prompt = _get(rec, "prompt", str, path, ident).strip()
            target_new = _get(rec, "target_new", str, path, ident).strip()
            target_true = _get(rec, "ground_truth", str, path, ident).strip()
            rephrase = _get(rec, "rephrase_prompt", str, path, ident).strip()
            locality = _get(rec, "locality_prompt", str, path, ident).strip()
            locality_answer = _get(rec, "locality_ground_truth", str, path, ident).strip()
            if not _targets_ok(target_true, target_new, skips, ident):
                continue
            if not subject.strip():
                skips.add("empty subject", ident)
                continue
            template = make_template(prompt, subject)
            if template is None:
                skips.add("subject does not occur in prompt (or prompt holds braces)", ident)
                continue
            case = {
                "case_id": str(case_id),
                "subject": subject,
                "relation_id": UNKNOWN_RELATION,
                "prompt": template,
                "target_true": target_true,
                "target_new": target_new,
                "paraphrase_prompts": [rephrase],
                "neighborhood_prompts": [locality],
                "attribute_prompts": [],
                "generation_prompts": [prompt, rephrase],
            }
            if locality_answer and locality_answer != target_true:
                case["neighborhood_target"] = locality_answer
            cases.append(case)
        skips.report("counterfact_easyedit", path, len(records), len(cases) - n_before)
    return cases


def read_zsre_mend(path: str | os.PathLike) -> list[dict]:
    """zsRE in MEND format (zsre_mend_train*.json / zsre_mend_eval.json).

    Each record: subject, src (question), pred, rephrase, alt (new answer), answers (true answers),
    loc ("nq question: ..."), loc_ans, cond. Mapping: prompt = src with the subject replaced by
    "{}"; target_new = alt; target_true = answers[0]; paraphrase = [rephrase]; neighborhood =
    [loc] with neighborhood_target = loc_ans. When the subject does not occur in src, the prompt
    is "{}: " + src (the subject as a prefix, so the edit still has a subject position to act on;
    fill(prompt, subject) then differs from src). Records with an empty alt or alt == answers[0]
    are skipped (2 + 17 in zsre_mend_train-1k.json, leaving 981). case_id = "zsre-<index in file>".
    """
    path = Path(path)
    records = _load_json_list(path)
    skips = _Skips()
    n_prefixed = 0
    cases = []
    for i, rec in enumerate(records):
        ident = f"#{i}"
        subject = _get(rec, "subject", str, path, ident)
        src = _get(rec, "src", str, path, ident).strip()
        answers = _str_list(rec, "answers", path, ident)
        if not answers:
            raise EditscaleError(f"{path}: record {ident} key 'answers' is an empty list")
        target_true = answers[0].strip()
        target_new = _get(rec, "alt", str, path, ident).strip()
        rephrase = _get(rec, "rephrase", str, path, ident).strip()
        loc = _get(rec, "loc", str, path, ident).strip()
        loc_ans = _get(rec, "loc_ans", str, path, ident).strip()
        if not _targets_ok(target_true, target_new, skips, ident):
            continue
        if not subject.strip():
            skips.add("empty subject", ident)
            continue
        if "{" in src or "}" in src:
            skips.add("question holds braces", ident)
            continue
        template = make_template(src, subject)
        if template is None:
            template = "{}: " + src
            n_prefixed += 1
        case = {
            "case_id": f"zsre-{i:06d}",
            "subject": subject,
            "relation_id": UNKNOWN_RELATION,
            "prompt": template,
            "target_true": target_true,
            "target_new": target_new,
            "paraphrase_prompts": [rephrase],
            "neighborhood_prompts": [loc],
            "attribute_prompts": [],
            "generation_prompts": [fill(template, subject), rephrase],
        }
        if loc_ans and loc_ans != target_true:
            case["neighborhood_target"] = loc_ans
        cases.append(case)
    skips.report("zsre_mend", path, len(records), len(cases))
    if n_prefixed:
        log.warning("zsre_mend: %d questions in %s do not contain their subject; prompt is '{}: ' + question", n_prefixed, path)
    return cases


def _first_answer(value: Any) -> str | None:
    """The first answer of a KnowEdit ground_truth: a string, a list of strings, or a list of
    alias lists (the first alias of the first answer)."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_knowedit(path: str | os.PathLike) -> list[dict]:
    """KnowEdit json (zjunlp/KnowEdit: ZsRE, WikiData_counterfact, WikiData_recent test files), a
    list of records: subject, prompt, target_new, ground_truth (a string, a list, or a list of
    alias lists), rephrase_prompt / rephrase, portability and locality, each {category: [{prompt,
    ground_truth}]}.

    Mapping: target_true = the first answer of ground_truth; paraphrase_prompts = [rephrase_prompt]
    where there is one; neighborhood_prompts = [the first locality prompt] (Relation_Specificity,
    else Forgetfulness: EasyEdit's loader takes the first too) with its answer as
    neighborhood_target; every portability entry becomes a probe {hop: its category, prompt,
    target_new: its first answer (aliases are not kept), question: the prompt when it is a
    question}; the answer before the edit of a probe is not in the format (no target_true).
    Records without ground_truth (WikiData_recent inserts new knowledge) are knowledge insertions:
    cases without target_true (editscale.data.schema.is_insertion), scored by rewrite_acc /
    rephrase_acc where es / ps need the old answer. Skipped: WikiBio's text records (no subject /
    target_new), subjects not in the prompt.
    case_id = "knowedit-<index in file>"."""
    path = Path(path)
    records = _load_json_list(path)
    skips = _Skips()
    cases = []
    for i, rec in enumerate(records):
        ident = f"#{i}"
        if not isinstance(rec, dict) or "subject" not in rec or "target_new" not in rec:
            skips.add("no subject / target_new (not a fact edit, e.g. WikiBio)", ident)
            continue
        subject = _get(rec, "subject", str, path, ident)
        prompt = _get(rec, "prompt", str, path, ident).strip()
        target_new = _get(rec, "target_new", str, path, ident).strip()
        target_true = _first_answer(rec.get("ground_truth"))  # None: a knowledge insertion
        if target_true is not None and not _targets_ok(target_true, target_new, skips, ident):
            continue
        template = make_template(prompt, subject) if subject.strip() else None
        if template is None:
            skips.add("subject does not occur in prompt (or prompt holds braces)", ident)
            continue
        rephrase = str(rec.get("rephrase_prompt") or rec.get("rephrase") or "").strip()
        locality = rec.get("locality") or {}
        near = [q for cat in ("Relation_Specificity", "Forgetfulness") for q in locality.get(cat) or []][:1]
        near_prompt = _first_answer(near[0].get("prompt")) if near else None
        near_answer = _first_answer(near[0].get("ground_truth")) if near else None
        probes = []
        for hop, entries in (rec.get("portability") or {}).items():
            for q in entries or []:
                text, answer = _first_answer(q.get("prompt")), _first_answer(q.get("ground_truth"))
                if text and answer:
                    probes.append({"hop": hop, "prompt": text, "target_new": answer, **({"question": text} if text.endswith("?") else {})})
        case = {
            "case_id": f"knowedit-{i:06d}",
            "subject": subject,
            "relation_id": UNKNOWN_RELATION,
            "prompt": template,
            **({"target_true": target_true} if target_true is not None else {}),
            "target_new": target_new,
            "paraphrase_prompts": [rephrase] if rephrase else [],
            "neighborhood_prompts": [near_prompt] if near_prompt and near_answer else [],
            "attribute_prompts": [],
            "generation_prompts": [prompt] + ([rephrase] if rephrase else []),
        }
        if near_prompt and near_answer and near_answer != target_true:
            case["neighborhood_target"] = near_answer
        if probes:
            case["portability"] = probes
        cases.append(case)
    skips.report("knowedit", path, len(records), len(cases))
    return cases


def read_mquake(path: str | os.PathLike) -> list[dict]:
    """MQuAKE json (princeton-nlp/MQuAKE: MQuAKE-CF-3k.json, MQuAKE-CF.json, MQuAKE-T.json), a list
    of instances: requested_rewrite (the edits: prompt with "{}", subject, target_new / target_true
    as {str, id}, question), questions (multi-hop questions whose answer follows from all of them),
    answer / answer_alias (before the edits), new_answer / new_answer_alias (after).

    Each rewrite becomes a case (case_id "mquake-<case_id>-<rewrite number>", paraphrase_prompts =
    [its question], no neighbourhood prompts: the format has none); the instance's multi-hop
    questions become probes of its last rewrite (hop "multi_hop", prompt = question = each question,
    target_new = new_answer, target_true = answer, with their aliases), so that in a sequence they
    are asked once every edit they depend on has been made (the instance's rewrites are adjacent
    in file order). Skipped: rewrites whose target_new equals target_true, or whose subject is
    empty or whose prompt lacks "{}"."""
    path = Path(path)
    records = _load_json_list(path)
    skips = _Skips()
    cases = []
    n_rewrites = 0
    for i, rec in enumerate(records):
        ident = f"#{i} (case_id {rec.get('case_id') if isinstance(rec, dict) else '?'})"
        rewrites = _get(rec, "requested_rewrite", list, path, ident)
        questions = [q.strip() for q in _str_list(rec, "questions", path, ident) if q.strip()]
        new_answer, old_answer = str(rec.get("new_answer") or "").strip(), str(rec.get("answer") or "").strip()
        mine = []
        for j, rw in enumerate(rewrites):
            n_rewrites += 1
            where = f"{ident} rewrite {j}"
            subject = _get(rw, "subject", str, path, where)
            prompt = _get(rw, "prompt", str, path, where)
            target_new = str(_get(rw, "target_new", dict, path, where).get("str") or "").strip()
            target_true = str(_get(rw, "target_true", dict, path, where).get("str") or "").strip()
            if not _targets_ok(target_true, target_new, skips, where):
                continue
            if not subject.strip() or not is_template(prompt):
                skips.add("empty subject or a prompt without one '{}'", where)
                continue
            question = str(rw.get("question") or "").strip()
            mine.append({
                "case_id": f"mquake-{rec.get('case_id', i)}-{j}",
                "subject": subject,
                "relation_id": str(rw.get("relation_id") or UNKNOWN_RELATION),
                "prompt": prompt,
                "target_true": target_true,
                "target_new": target_new,
                "paraphrase_prompts": [question] if question else [],
                "neighborhood_prompts": [],
                "attribute_prompts": [],
                "generation_prompts": [fill(prompt, subject)],
            })
        if mine and questions and new_answer:
            mine[-1]["portability"] = [
                {"hop": "multi_hop", "prompt": q, "question": q, "target_new": new_answer,
                 "target_new_aliases": [a for a in rec.get("new_answer_alias") or [] if isinstance(a, str)],
                 **({"target_true": old_answer, "target_true_aliases": [a for a in rec.get("answer_alias") or [] if isinstance(a, str)]}
                    if old_answer and old_answer != new_answer else {})}
                for q in questions]
        cases += mine
    skips.report("mquake", path, n_rewrites, len(cases))
    return cases


def read_geofacts(spec: dict) -> tuple[list[dict], str]:
    # n_cases is applied by build_geofacts itself (seeded subset, same rule as build_dataset).
    from .geofacts import MAX_CITIES

    max_cities = spec.get("max_cities", MAX_CITIES)
    return build_geofacts(n_cases=spec.get("n_cases"), seed=spec.get("seed", 0), max_cities=None if max_cities == "all" else max_cities,
                          counties=bool(spec.get("counties", False)), portability=bool(spec.get("portability", False))), "geofacts"


def file_reader(read: Callable[..., list[dict]], many: bool = False) -> Callable[[dict], tuple[list[dict], str]]:
    """A reader of the spec's `path` (a file, a glob, or a list of them when `many`), subsampled
    to the spec's n_cases: spec -> (cases, source description)."""

    def reader(spec: dict) -> tuple[list[dict], str]:
        name = spec["reader"]
        if spec.get("path") is None:
            raise EditscaleError(f"dataset spec: reader {name!r} needs 'path'")
        paths = expand_paths(spec["path"])
        if len(paths) > 1 and not many:
            raise EditscaleError(f"dataset spec 'path': reader {name!r} reads one file, got {len(paths)}: {[str(p) for p in paths]}")
        source = ", ".join(map(str, paths))
        try:
            cases = read(paths if many else paths[0])
        except EditscaleError as exc:
            guess = detect_reader(paths[0])
            if guess is not None and guess != name:
                raise EditscaleError(f"{exc}: the file is in the format of reader {guess!r}, not {name!r} (set reader: {guess})") from None
            raise
        return subsample(cases, spec.get("n_cases"), spec.get("seed", 0), source), source

    return reader


@dataclass(frozen=True)
class Reader:
    """A dataset reader: `read(spec) -> (cases, source)`, and the keys only its format has (a
    record with all of them names its reader: `detect_reader`)."""

    read: Callable[[dict], tuple[list[dict], str]]
    format_keys: frozenset = frozenset()
    # "question" (zsRE: "What university did {} attend?") or "cloze" (CounterFact: "{} is located
    # in"): whether an instruct model's chat template may frame its prompts (metrics' chat_template)
    prompts: str = "cloze"


# reader name -> Reader: the one table of dataset readers (editscale.registry.Registry); a plugin
# adds one with READERS.add(name, Reader(...)) or an `editscale.readers` entry point (a Reader or a function)
READERS: Registry[Reader] = Registry("dataset reader", entry_points="editscale.readers",
                                     from_entry_point=lambda name, obj: obj if isinstance(obj, Reader) else Reader(obj))
READERS.add("geofacts", Reader(read_geofacts))
READERS.add("counterfact", Reader(file_reader(read_counterfact), frozenset({"requested_rewrite"})))
READERS.add("counterfact_easyedit", Reader(file_reader(read_counterfact_easyedit, many=True), frozenset({"prompt", "ground_truth", "rephrase_prompt"})))
READERS.add("zsre_mend", Reader(file_reader(read_zsre_mend), frozenset({"src", "alt", "answers"}), prompts="question"))
READERS.add("knowedit", Reader(file_reader(read_knowedit), frozenset({"subject", "target_new", "portability", "locality"})))
READERS.add("mquake", Reader(file_reader(read_mquake), frozenset({"requested_rewrite", "questions", "new_answer"})))


def detect_reader(path: str | os.PathLike) -> str | None:
    """The reader whose format the file's first record has (None when none or unreadable)."""
    try:
        records = _load_json_list(path)
    except EditscaleError:
        return None
    first = records[0] if records and isinstance(records[0], dict) else {}
    hits = [name for name, reader in READERS.items() if reader.format_keys and reader.format_keys <= set(first)]
    # the most specific format wins: a KnowEdit record also has EasyEdit CounterFact's keys
    most = max((len(READERS[h].format_keys) for h in hits), default=0)
    best = [h for h in hits if len(READERS[h].format_keys) == most]
    return best[0] if len(best) == 1 else None


# The config's dataset entry is passed whole: `url` belongs to the download rule and `order_file`
# to the sequence rule; they are accepted here and not used.
SPEC_KEYS = {"reader", "path", "n_cases", "seed", "url", "order_file", "max_skipped_fraction", "max_cities", "counties", "portability"}
GEOFACTS_KEYS = ("max_cities", "counties", "portability")  # the geofacts reader's own options


def check_reader_options(spec: dict, where: str) -> None:
    """One error naming `where` when a dataset sets an option its reader does not have."""
    misplaced = [k for k in GEOFACTS_KEYS if spec.get(k) is not None and spec.get("reader") != "geofacts"]
    if misplaced:
        raise EditscaleError(f"{where}: {misplaced} are options of the geofacts reader, not of {spec.get('reader')!r}")


def expand_paths(spec_path: Any) -> list[Path]:
    """A path, a glob, or a list of them -> existing files, globs sorted; errors name what is missing."""
    items = spec_path if isinstance(spec_path, list) else [spec_path]
    if not items or not all(isinstance(p, (str, os.PathLike)) for p in items):
        raise EditscaleError(f"dataset spec 'path' must be a path, a glob or a list of them, got {spec_path!r}")
    out: list[Path] = []
    for item in items:
        item = str(item)
        if item.startswith(("http://", "https://")):
            raise EditscaleError(f"dataset spec 'path' is a URL ({item}); download it first and give the local file")
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise EditscaleError(f"dataset spec 'path': no file matches {item!r}")
            out.extend(Path(m) for m in matches)
        elif not Path(item).is_file():
            raise EditscaleError(f"dataset spec 'path': file not found: {item}")
        else:
            out.append(Path(item))
    return out


def _default_max_skipped() -> float:
    from ..config import schema

    return schema()["properties"]["datasets"]["additionalProperties"]["properties"]["max_skipped_fraction"]["default"]


def check_skipped(source: str, reports: list, max_fraction: float) -> None:
    """One summary line on the console (stdout: the job's stderr goes to its log) of the records
    read, kept and skipped per reason; an error when more than max_fraction were skipped."""
    n_records = sum(r[0] for r in reports)
    n_kept = sum(r[1] for r in reports)
    reasons: Counter[str] = sum((r[2] for r in reports), Counter())
    if not n_records:
        return
    skipped = sum(reasons.values())
    detail = "; ".join(f"{reason}: {count}" for reason, count in sorted(reasons.items()))
    print(f"dataset {source}: {n_records} records, {n_kept} cases kept, {skipped} skipped" + (f" ({detail})" if detail else ""), flush=True)
    if skipped > max_fraction * n_records:
        raise EditscaleError(
            f"dataset {source}: {skipped} of {n_records} records ({skipped / n_records:.0%}) were skipped, more than "
            f"max_skipped_fraction = {max_fraction} ({detail}): is `reader` right for this file? (datasets.<name>."
            "max_skipped_fraction raises the limit)"
        )


def load_cases(spec: dict) -> list[dict]:
    """Read and validate the cases a dataset spec describes (see build_dataset)."""
    if not isinstance(spec, dict):
        raise EditscaleError(f"dataset spec must be a mapping, got {type(spec).__name__}")
    reader = spec.get("reader")
    if reader not in READERS:
        raise EditscaleError(f"dataset spec 'reader': unknown reader {reader!r}; known readers: {', '.join(READERS)}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise EditscaleError(f"dataset spec: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    n_cases = spec.get("n_cases")
    if n_cases is not None and (not isinstance(n_cases, int) or isinstance(n_cases, bool) or n_cases < 1):
        raise EditscaleError(f"dataset spec 'n_cases' must be a positive integer or null, got {n_cases!r}")
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise EditscaleError(f"dataset spec 'seed' must be an integer, got {seed!r}")

    check_reader_options(spec, "dataset spec")
    token = _SKIP_REPORTS.set([])
    try:
        cases, source = READERS[reader].read(spec)
        reports = _SKIP_REPORTS.get()
    finally:
        _SKIP_REPORTS.reset(token)
    check_skipped(source, reports, spec.get("max_skipped_fraction", _default_max_skipped()))

    if not cases:
        raise EditscaleError(f"dataset {source}: reader {reader!r} produced no cases")
    seen: set[str] = set()
    for case in cases:
        validate_case(case, source)
        if case["case_id"] in seen:
            raise EditscaleError(f"dataset {source}: duplicate case_id {case['case_id']!r}")
        seen.add(case["case_id"])
    return cases


def build_dataset(spec: dict, out_path: str | os.PathLike) -> list[dict]:
    """Write data/datasets/{dataset}.jsonl: the validated cases of `spec`, one per line, sorted keys.

    spec = {"reader": "geofacts" | "counterfact" | "counterfact_easyedit" | "zsre_mend",
            "path": file, glob, or list of them (not for geofacts; a list only for counterfact_easyedit),
            "n_cases": optional int, a seeded random subset kept in source order,
            "seed": int (default 0),
            "url", "order_file": accepted and ignored (used by the download and sequence rules)}
    """
    cases = load_cases(spec)
    write_jsonl_atomic(out_path, cases)
    log.info("dataset: wrote %d cases (reader %s) to %s", len(cases), spec["reader"], out_path)
    return cases
