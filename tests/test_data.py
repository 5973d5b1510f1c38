"""Data stage: readers on the real public files in ../shared/data, geofacts, edit sequences, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from editscale.data import (
    READERS,
    build_dataset,
    build_geofacts,
    build_sequence,
    counterfact_url,
    country_facts,
    fill,
    read_counterfact,
    read_counterfact_easyedit,
    read_zsre_mend,
    validate_case,
)
from editscale.data.schema import REQUIRED_FIELDS
from editscale.io import EditscaleError, read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path}")
    return path


def load(path: Path):
    with open(path) as fh:
        return json.load(fh)


def check_cases(cases: list[dict]) -> None:
    for case in cases:
        validate_case(case)
        assert set(REQUIRED_FIELDS) <= set(case)
        assert case["prompt"].count("{}") == 1
        assert case["target_new"] != case["target_true"]
        assert not case["target_new"].startswith(" ") and not case["target_true"].startswith(" ")
    assert len({c["case_id"] for c in cases}) == len(cases)


# ---------------------------------------------------------------- schema


def good_case(**overrides) -> dict:
    case = {
        "case_id": "c1",
        "subject": "Paris",
        "relation_id": "P17",
        "prompt": "{} is located in the country of",
        "target_true": "France",
        "target_new": "Italy",
        "paraphrase_prompts": ["Paris is a city in"],
        "neighborhood_prompts": ["Lyon is a city in"],
        "attribute_prompts": ["Rome is a city in"],
        "generation_prompts": ["Paris is known for"],
    }
    case.update(overrides)
    return case


def test_validate_case_accepts_good_case():
    assert validate_case(good_case()) == good_case()
    validate_case(good_case(neighborhood_target="Germany", edit_index=3))


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"prompt": None}, ["'prompt'", "string"]),
        ({"prompt": "Paris is in"}, ["'prompt'", "{}"]),
        ({"prompt": "{} and {} are in"}, ["'prompt'"]),
        ({"target_new": " Italy"}, ["'target_new'", "whitespace"]),
        ({"target_new": "France"}, ["target_new equals target_true"]),
        ({"paraphrase_prompts": "Paris is"}, ["'paraphrase_prompts'", "list"]),
        ({"neighborhood_prompts": [1]}, ["'neighborhood_prompts'[0]"]),
        ({"edit_index": "1"}, ["'edit_index'"]),
        ({"portability": {"hop": "capital"}}, ["'portability'", "list"]),
        ({"portability": [{"hop": "capital", "prompt": "The capital of X's country is"}]}, ["'portability'[0]", "'target_new'"]),
        ({"portability": [{"hop": "c", "prompt": "p", "target_new": "Rome", "answer": "x"}]}, ["'portability'[0]", "unknown keys ['answer']"]),
        ({"portability": [{"hop": "c", "prompt": "p", "target_new": ""}]}, ["'portability'[0].target_new", "non-empty"]),
    ],
)
def test_validate_case_names_case_and_field(bad, words):
    with pytest.raises(EditscaleError) as exc:
        validate_case(good_case(**bad), source="x.jsonl")
    for word in ["'c1'", "x.jsonl", *words]:
        assert word in str(exc.value)


def test_a_case_without_target_true_is_a_knowledge_insertion():
    from editscale.data.schema import is_insertion

    insertion = good_case()
    del insertion["target_true"]
    assert validate_case(insertion) == insertion and is_insertion(insertion) and not is_insertion(good_case())
    for bad, words in (({"target_true": ""}, "non-empty string when present"), ({"target_true": 3}, "non-empty string when present"),
                       ({"target_true": " France"}, "whitespace")):
        with pytest.raises(EditscaleError, match=words):
            validate_case(good_case(**bad))


def test_validate_case_missing_field():
    case = good_case()
    del case["target_new"]
    with pytest.raises(EditscaleError, match=r"case 'c1'.*missing required field 'target_new'"):
        validate_case(case)


# ---------------------------------------------------------------- readers on real files


@pytest.mark.parametrize("name, n_records", [("counterfact-train.json", 10_000), ("counterfact-val.json", 1_919)])
def test_counterfact_easyedit_reader(shared_data, name, n_records):
    path = shared_data / "counterfact" / name
    raw = load(path)
    cases = read_counterfact_easyedit(path)
    assert len(raw) == n_records
    assert len(cases) == n_records  # no record of the public splits is skipped
    check_cases(cases)
    for rec, case in zip(raw, cases):
        assert case["case_id"] == str(rec["case_id"])
        assert case["subject"] == rec["subject"]
        assert fill(case["prompt"], case["subject"]) == rec["prompt"]
        assert case["target_true"] == rec["ground_truth"] and case["target_new"] == rec["target_new"]
        assert case["paraphrase_prompts"] == [rec["rephrase_prompt"]]
        assert case["neighborhood_prompts"] == [rec["locality_prompt"]]
        # locality_ground_truth equals ground_truth throughout these files: no override needed
        assert case.get("neighborhood_target", rec["ground_truth"]) == rec["locality_ground_truth"]


def test_counterfact_easyedit_reader_skips_subject_not_in_prompt(tmp_path, caplog):
    rec = {
        "case_id": 1, "prompt": "The capital of France is", "subject": "Germany", "target_new": "Rome",
        "ground_truth": "Paris", "rephrase_prompt": "x", "locality_prompt": "y", "locality_ground_truth": "Berlin",
    }
    ok = dict(rec, case_id=2, subject="France")
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([rec, ok]))
    cases = read_counterfact_easyedit(path)
    assert [c["case_id"] for c in cases] == ["2"]
    assert cases[0]["neighborhood_target"] == "Berlin"  # differs from target_true: kept
    assert "skipped 1 records" in caplog.text and "subject does not occur in prompt" in caplog.text


def test_easyedit_files_without_case_id_and_as_json_lines_read_as_easyedits_loader_does(shared_data, tmp_path):
    """EasyEdit's CounterFactDataset needs no case_id: a record without one gets
    "<file stem>-<index>"; JSON Lines (.jsonl, or JSON values one per line) reads as the JSON list."""
    raw = load(shared_data / "counterfact" / "counterfact-val.json")[:20]
    bare = [{k: v for k, v in rec.items() if k != "case_id"} for rec in raw]
    listed = tmp_path / "counterfact-val.json"
    listed.write_text(json.dumps(bare))
    cases = read_counterfact_easyedit(listed)
    assert [c["case_id"] for c in cases] == [f"counterfact-val-{i:06d}" for i in range(20)]
    assert [c["target_new"] for c in cases] == [r["target_new"] for r in raw]
    for name in ("counterfact-val.jsonl", "counterfact-val.txt"):  # by extension, and by content
        lines = tmp_path / "lines" / name
        lines.parent.mkdir(exist_ok=True)
        lines.write_text("\n".join(json.dumps(r) for r in bare) + "\n")
        assert [{**c, "case_id": None} for c in read_counterfact_easyedit(lines)] == [{**c, "case_id": None} for c in cases]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(bare[0]) + "\n{not json\n")
    with pytest.raises(EditscaleError, match="broken.jsonl: line 2 is not valid JSON"):
        read_counterfact_easyedit(broken)


def test_a_knowedit_file_is_named_as_such_when_read_with_easyedits_counterfact_reader(tmp_path):
    """A KnowEdit ZsRE record has EasyEdit CounterFact's keys too: the more specific format wins."""
    from editscale.data.readers import detect_reader, load_cases

    sample = json.loads((Path(__file__).parent / "data" / "knowedit" / "knowedit-sample.json").read_text())
    zsre = [r for r in sample if "rephrase_prompt" in r]
    path = tmp_path / "ZsRE-test-all.json"
    path.write_text(json.dumps(zsre))
    assert detect_reader(path) == "knowedit"
    with pytest.raises(EditscaleError, match="the file is in the format of reader 'knowedit', not 'counterfact_easyedit'"):
        load_cases({"reader": "counterfact_easyedit", "path": str(path)})
    assert load_cases({"reader": "knowedit", "path": str(path)})[0]["target_new"] == zsre[0]["target_new"]


def test_zsre_mend_reader(shared_data):
    path = shared_data / "zsre" / "zsre_mend_train-1k.json"
    raw = load(path)
    assert len(raw) == 1_000
    # Documented skips: empty alt, or alt identical to the true answer (nothing to edit).
    usable = [
        (i, r) for i, r in enumerate(raw) if r["alt"].strip() and r["alt"].strip() != r["answers"][0].strip()
    ]
    assert len(usable) == 981
    cases = read_zsre_mend(path)
    assert len(cases) == len(usable)
    check_cases(cases)
    for (i, rec), case in zip(usable, cases):
        assert case["case_id"] == f"zsre-{i:06d}"
        assert fill(case["prompt"], case["subject"]) == rec["src"]
        assert case["target_new"] == rec["alt"].strip()
        assert case["target_true"] == rec["answers"][0]
        assert case["paraphrase_prompts"] == [rec["rephrase"]]
        assert case["neighborhood_prompts"] == [rec["loc"]]
        assert case["neighborhood_target"] == rec["loc_ans"]


def test_zsre_subject_not_in_question_gets_prefix(tmp_path):
    rec = {
        "subject": "Acme", "src": "Who makes rockets?", "pred": "x", "rephrase": "Rockets are made by?",
        "alt": "Boeing", "answers": ["SpaceX"], "loc": "nq question: q", "loc_ans": "a", "cond": "",
    }
    path = tmp_path / "z.json"
    path.write_text(json.dumps([rec]))
    [case] = read_zsre_mend(path)
    assert case["prompt"] == "{}: Who makes rockets?"


# Shaped exactly like ROME's counterfact.json / MEMIT's multi_counterfact.json (first record real).
COUNTERFACT_FIXTURE = [
    {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": [
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
        ],
        "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is", "The native language of Montesquieu is"],
        "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of", "Barack Obama, speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
    },
    {
        "case_id": 1,
        "pararel_idx": 1,
        "requested_rewrite": {
            "prompt": "{} is headquartered in",
            "relation_id": "P159",
            "target_new": {"str": "Tokyo", "id": "Q1490"},
            "target_true": {"str": "Paris", "id": "Q90"},
            "subject": "Renault",
        },
        "paraphrase_prompts": ["Renault's headquarters are in"],
        "neighborhood_prompts": ["Airbus is headquartered in"],
        "attribute_prompts": ["Sony is headquartered in"],
        "generation_prompts": ["Renault is known for"],
    },
]


def test_original_counterfact_reader(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(COUNTERFACT_FIXTURE))
    cases = read_counterfact(path)
    check_cases(cases)
    assert [c["case_id"] for c in cases] == ["0", "1"]
    first = cases[0]
    assert first["prompt"] == "The mother tongue of {} is"
    assert (first["subject"], first["relation_id"]) == ("Danielle Darrieux", "P103")
    assert (first["target_true"], first["target_new"]) == ("French", "English")
    assert first["paraphrase_prompts"] == COUNTERFACT_FIXTURE[0]["paraphrase_prompts"]
    assert first["attribute_prompts"] == COUNTERFACT_FIXTURE[0]["attribute_prompts"]
    assert first["generation_prompts"] == COUNTERFACT_FIXTURE[0]["generation_prompts"]


def test_original_counterfact_reader_names_missing_key(tmp_path):
    bad = json.loads(json.dumps(COUNTERFACT_FIXTURE))
    del bad[1]["requested_rewrite"]["subject"]
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(EditscaleError, match=r"counterfact.json: record 1 has no key 'subject'"):
        read_counterfact(path)


def test_counterfact_urls():
    assert counterfact_url() == "https://rome.baulab.info/data/dsets/counterfact.json"
    assert counterfact_url("multi_counterfact") == "https://rome.baulab.info/data/dsets/multi_counterfact.json"
    with pytest.raises(EditscaleError, match="nope"):
        counterfact_url("nope")


# ---------------------------------------------------------------- build_dataset


def test_build_dataset_glob_list_and_subset(shared_data, tmp_path):
    cf = shared_data / "counterfact"
    out = tmp_path / "cf.jsonl"
    cases = build_dataset({"reader": "counterfact_easyedit", "path": str(cf / "counterfact-*.json")}, out)
    assert len(cases) == 11_919
    assert read_jsonl(out) == cases
    first_line = out.read_text().splitlines()[0]
    assert list(json.loads(first_line)) == sorted(json.loads(first_line))  # sorted keys

    listed = build_dataset(
        {"reader": "counterfact_easyedit", "path": [str(cf / "counterfact-val.json")], "n_cases": 100, "seed": 3},
        tmp_path / "sub.jsonl",
    )
    assert len(listed) == 100
    val_ids = [str(r["case_id"]) for r in load(cf / "counterfact-val.json")]
    ids = [c["case_id"] for c in listed]
    assert ids == [i for i in val_ids if i in set(ids)]  # subset kept in file order


def test_build_dataset_errors(shared_data, tmp_path):
    with pytest.raises(EditscaleError) as exc:
        build_dataset({"reader": "nosuchreader"}, tmp_path / "x.jsonl")
    assert "nosuchreader" in str(exc.value) and all(r in str(exc.value) for r in READERS)

    missing = tmp_path / "absent.json"
    with pytest.raises(EditscaleError, match="absent.json"):
        build_dataset({"reader": "zsre_mend", "path": str(missing)}, tmp_path / "x.jsonl")
    with pytest.raises(EditscaleError, match="needs 'path'"):
        build_dataset({"reader": "zsre_mend", "path": None}, tmp_path / "x.jsonl")
    with pytest.raises(EditscaleError, match=r"unknown keys \['n_case'\]"):
        build_dataset({"reader": "geofacts", "n_case": 5}, tmp_path / "x.jsonl")
    with pytest.raises(EditscaleError, match="is a URL"):
        build_dataset({"reader": "counterfact", "path": "https://rome.baulab.info/data/dsets/counterfact.json"}, tmp_path / "x.jsonl")

    val = str(shared_data / "counterfact" / "counterfact-val.json")
    with pytest.raises(EditscaleError, match="duplicate case_id"):
        build_dataset({"reader": "counterfact_easyedit", "path": [val, val]}, tmp_path / "x.jsonl")
    with pytest.raises(EditscaleError, match="n_cases=5000 requested but only 1919"):
        build_dataset({"reader": "counterfact_easyedit", "path": val, "n_cases": 5000}, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------- geofacts


@pytest.fixture(scope="module")
def geo() -> list[dict]:
    return build_geofacts(seed=0)


def test_geofacts_cases(geo):
    assert len(geo) >= 2000
    check_cases(geo)
    relations = {c["relation_id"] for c in geo}
    assert relations == {"P17", "P36", "P30", "P38"}
    for case in geo:
        subject = case["subject"]
        assert subject.isascii() or case["relation_id"] != "P17"
        assert all(subject in p for p in case["paraphrase_prompts"])
        assert all(subject not in p for p in case["neighborhood_prompts"])
        assert all(subject not in p for p in case["attribute_prompts"])
        assert len(case["neighborhood_prompts"]) <= 10 and len(case["attribute_prompts"]) <= 10
    shanghai = next(c for c in geo if c["subject"] == "Shanghai")
    assert shanghai["target_true"] == "China" and shanghai["case_id"] == "geo-city_country-000000"
    # Neighborhood prompts are about other Chinese cities.
    assert any("Beijing" in p for p in shanghai["neighborhood_prompts"])


def test_geofacts_deterministic(geo, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_dataset({"reader": "geofacts", "seed": 0}, a)
    build_dataset({"reader": "geofacts", "seed": 0}, b)
    assert a.read_bytes() == b.read_bytes()
    assert read_jsonl(a) == geo

    other = build_geofacts(seed=1)
    assert [c["case_id"] for c in other] == [c["case_id"] for c in geo]  # ids do not depend on the seed
    changed = sum(x["target_new"] != y["target_new"] for x, y in zip(geo, other))
    assert changed > len(geo) // 2

    subset = build_geofacts(n_cases=50, seed=0)
    assert len(subset) == 50 and all(c in geo for c in subset)


def test_geofacts_long_stream_has_20000_unique_subjects_and_county_facts(geo, tmp_path):
    """Every usable city and the US counties: a stream of 20,000+ unique subjects, built the same
    way every time; the default dataset is a different, smaller setting and stays as it was."""
    from editscale.data.sequence import unique_subjects

    spec = {"reader": "geofacts", "seed": 0, "max_cities": "all", "counties": True}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_dataset(spec, a)
    build_dataset(spec, b)
    assert a.read_bytes() == b.read_bytes()
    cases = read_jsonl(a)
    check_cases(cases)
    assert len(unique_subjects(cases)) >= 20_000
    assert len({c["case_id"] for c in cases}) == len(cases)
    counties = [c for c in cases if c["relation_id"] == "P131"]
    states = {c["target_true"] for c in counties}
    assert len(counties) > 1000 and len(states) >= 45 and all(c["target_new"] in states and c["target_new"] != c["target_true"] for c in counties)
    autauga = next(c for c in counties if c["subject"] == "Autauga County")
    assert autauga["target_true"] == "Alabama" and all("Autauga County" in p for p in autauga["paraphrase_prompts"])
    assert all(c["target_true"].lower() not in c["subject"].lower() for c in counties)
    # the cities keep their population order and ids; the default is the first 4000 of them
    default_cities = [c["subject"] for c in geo if c["relation_id"] == "P17"]
    assert [c["subject"] for c in cases if c["relation_id"] == "P17"][: len(default_cities)] == default_cities
    assert build_dataset({"reader": "geofacts", "seed": 0, "max_cities": 4000, "counties": False}, tmp_path / "d.jsonl") == geo
    with pytest.raises(EditscaleError, match="options of the geofacts reader"):
        build_dataset({"reader": "counterfact", "path": str(a), "max_cities": 100}, tmp_path / "x.jsonl")


def test_country_facts():
    facts = country_facts()
    assert len(facts) > 200
    by_name = {f["country"]: f for f in facts}
    assert by_name["France"] == {"country": "France", "capital": "Paris", "continent": "Europe", "currency": "Euro"}
    assert by_name["Japan"]["capital"] == "Tokyo"


# ---------------------------------------------------------------- sequences


@pytest.fixture(scope="module")
def cf_dataset(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "counterfact.jsonl"
    cf = shared_data / "counterfact"
    build_dataset(
        {"reader": "counterfact_easyedit", "path": [str(cf / "counterfact-train.json"), str(cf / "counterfact-val.json")]},
        out,
    )
    return out


def test_sequence_unique_subjects_and_prefix(cf_dataset, tmp_path):
    short = build_sequence(cf_dataset, tmp_path / "short.jsonl", n_edits=50, sample=2)
    long = build_sequence(cf_dataset, tmp_path / "long.jsonl", n_edits=3000, sample=2)
    assert long[:50] == short
    assert read_jsonl(tmp_path / "short.jsonl") == short
    assert [e["edit_index"] for e in long] == list(range(1, 3001))
    assert len({e["subject"].lower() for e in long}) == 3000
    for edit in long[:20]:
        validate_case(edit)

    # Unique subjects: the first record per lower-cased subject in file order.
    first_per_subject = {}
    for case in read_jsonl(cf_dataset):
        first_per_subject.setdefault(case["subject"].lower(), case["case_id"])
    assert all(first_per_subject[e["subject"].lower()] == e["case_id"] for e in long)

    other = build_sequence(cf_dataset, tmp_path / "other.jsonl", n_edits=50, sample=3)
    assert [e["case_id"] for e in other] != [e["case_id"] for e in short]
    again = build_sequence(cf_dataset, tmp_path / "again.jsonl", n_edits=50, sample=2)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "short.jsonl").read_bytes()
    assert again == short


def test_sequence_follows_order_file(cf_dataset, shared_data, tmp_path):
    order_file = shared_data / "counterfact" / "paper_samples_unique_10_20391.json"
    orders = load(order_file)
    present = {c["case_id"] for c in read_jsonl(cf_dataset)}
    for sample in (0, 7):
        expected = [str(i) for i in orders[str(sample)] if str(i) in present][:200]
        edits = build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=200, sample=sample, order_file=order_file)
        assert [e["case_id"] for e in edits] == expected
    # An explicit key overrides the sample number.
    edits = build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=10, sample=0, order_file=order_file, order_key="4")
    assert [e["case_id"] for e in edits] == [str(i) for i in orders["4"] if str(i) in present][:10]
    with pytest.raises(EditscaleError, match="no key '12'"):
        build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=10, sample=12, order_file=order_file)


def test_sequence_too_few(cf_dataset, tmp_path):
    with pytest.raises(EditscaleError, match=r"n_edits = 20000 requested, but the edit sequence has only 11419 usable cases \(11919 cases in .*, 500 dropped as repeated subjects"):
        build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=20000)
    assert not (tmp_path / "e.jsonl").exists()
    with pytest.raises(EditscaleError, match="non-negative"):
        build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=-1)


def test_sequence_zero_means_all(cf_dataset, tmp_path):
    everything = build_sequence(cf_dataset, tmp_path / "all.jsonl", n_edits=0, sample=2)
    assert len(everything) == 11_419
    assert everything[:100] == build_sequence(cf_dataset, tmp_path / "e.jsonl", n_edits=100, sample=2)


# ---------------------------------------------------------------- CLI


def editscale_cmd() -> list[str]:
    script = Path(sys.executable).parent / "editscale"
    if script.exists():
        return [str(script)]
    found = shutil.which("editscale")
    return [found] if found else [sys.executable, "-m", "editscale.cli"]


def test_cli_dataset_and_sequence(tmp_path):
    out = tmp_path / "datasets" / "geo.jsonl"
    # Shaped like a config entry after schema defaults are filled in (url, order_file: unused here).
    spec = json.dumps({"reader": "geofacts", "path": None, "url": None, "order_file": None, "n_cases": 40, "seed": 0})
    env = dict(os.environ)
    res = subprocess.run(
        [*editscale_cmd(), "dataset", "--spec-json", spec, "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert len(read_jsonl(out)) == 40
    assert str(out) in res.stderr  # logged where it went

    edits = tmp_path / "run" / "edits.jsonl"
    res = subprocess.run(
        [*editscale_cmd(), "sequence", "--dataset", str(out), "--out", str(edits), "--n-edits", "0", "--sample", "1"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert [e["edit_index"] for e in read_jsonl(edits)] == list(range(1, 41))  # 0: every usable case


def test_cli_bad_reader(tmp_path):
    out = tmp_path / "x.jsonl"
    res = subprocess.run(
        [*editscale_cmd(), "dataset", "--spec-json", '{"reader": "bogus_reader"}', "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "bogus_reader" in res.stderr and "geofacts" in res.stderr
    assert not out.exists()


def test_the_case_type_and_the_validated_fields_are_the_same():
    """data.schema.EditCase (the type stages are written against) and the fields validate_case
    checks name the same keys and types."""
    import typing

    from editscale.data.schema import LIST_FIELDS, OPTIONAL_FIELDS, STRING_FIELDS, EditCase

    hints = typing.get_type_hints(EditCase)
    assert set(hints) == set(STRING_FIELDS) | set(LIST_FIELDS) | set(OPTIONAL_FIELDS)
    assert all(hints[k] is str for k in STRING_FIELDS) and all(hints[k] == list[str] for k in LIST_FIELDS)
    assert all((typing.get_origin(hints[k]) or hints[k]) is t for k, t in OPTIONAL_FIELDS.items())


def test_geofacts_portability_probes_follow_the_new_country(geo):
    """`portability: true`: every city_country case gets the two-hop probes whose answer differs
    between its new and its true country (capital, continent, currency of each, from the country
    facts); the cases are otherwise the same, and without the option no case has the field."""
    from editscale.data.geofacts import country_facts

    with_probes = build_geofacts(seed=0, portability=True)
    countries = {c["country"]: c for c in country_facts()}
    assert [{k: v for k, v in c.items() if k != "portability"} for c in with_probes] == geo
    assert not any("portability" in c for c in geo)
    cities = [c for c in with_probes if c["relation_id"] == "P17"]
    assert cities and all("portability" in c for c in cities) and not any("portability" in c for c in with_probes if c["relation_id"] != "P17")
    n_probes = 0
    for case in cities:
        validate_case(case)
        new, old = countries[case["target_new"]], countries[case["target_true"]]
        hops = {p["hop"]: p for p in case["portability"]}
        assert set(hops) == {h for h in ("capital", "continent", "currency") if new[h] != old[h]}
        for hop, probe in hops.items():
            assert (probe["target_new"], probe["target_true"]) == (new[hop], old[hop])
            assert case["subject"] in probe["prompt"] and probe["question"].endswith("?")
        n_probes += len(hops)
    assert n_probes > 2 * len(cities)  # most new countries differ in capital and currency at least


def test_knowedit_reader_on_the_public_examples():
    """KnowEdit's own example records (tests/data/knowedit: WikiData_recent, Wiki counterfact,
    ZsRE from EasyEdit's examples/KnowEdit.md): the recent one has no ground_truth (inserted
    knowledge) and is a case without target_true; portability entries become probes with their
    first answer, a question prompt also as the probe's question; the first locality prompt is the
    neighbourhood."""
    from editscale.data.readers import detect_reader, read_knowedit
    from editscale.data.schema import is_insertion, validate_case

    path = Path(__file__).parent / "data" / "knowedit" / "knowedit-sample.json"
    raw = load(path)
    assert detect_reader(path) == "knowedit"
    cases = read_knowedit(path)
    assert [c["case_id"] for c in cases] == ["knowedit-000000", "knowedit-000001", "knowedit-000002"]
    for c in cases:
        validate_case(c)
    arons, piesch, zsre = cases
    # WikiData_recent: a knowledge insertion, the model knew no place of death before the edit
    assert is_insertion(arons) and "target_true" not in arons and arons["target_new"] == "Berlin"
    assert arons["neighborhood_prompts"] == ["The name of the father of Leo Arons is"] and arons["neighborhood_target"] == "Albert Arons"
    assert [p["hop"] for p in arons["portability"]] == ["Logical_Generalization", "Reasoning", "Reasoning", "Subject_Aliasing"]
    assert not is_insertion(piesch)
    assert fill(piesch["prompt"], piesch["subject"]) == raw[1]["prompt"]
    assert (piesch["target_true"], piesch["target_new"]) == ("mayor of Vienna", "Archbishop of León, Mexico")
    assert piesch["portability"] == [{"hop": "Subject_Aliasing", "prompt": "The name of the position held by Frederic of Pieschen is",
                                      "target_new": "Archbishop of León, Mexico"}]
    assert piesch["neighborhood_prompts"] == ["The gender of Frederic Piesch is"] and piesch["neighborhood_target"] == "male"
    assert piesch["paraphrase_prompts"] == []
    assert zsre["target_true"] == "Aspidoceratidae" and zsre["paraphrase_prompts"] == ["What family are Epaspidoceras?"]
    probe = zsre["portability"][0]
    assert probe["question"] == probe["prompt"] == raw[2]["portability"]["Reasoning"][0]["prompt"] and probe["target_new"] == "Owlet moths"
    assert zsre["neighborhood_prompts"] == ["The taxon rank of Epaspidoceras is"] and zsre["neighborhood_target"] == "genus"


def test_mquake_reader_on_the_public_example():
    """MQuAKE's README instance (tests/data/mquake): the rewrite is a case; the instance's
    multi-hop questions are probes of its last rewrite, with the new and the old answer and their
    aliases."""
    from editscale.data.readers import read_mquake
    from editscale.data.schema import validate_case

    path = Path(__file__).parent / "data" / "mquake" / "MQuAKE-CF-sample.json"
    raw = load(path)[0]
    (case,) = read_mquake(path)
    validate_case(case)
    rw = raw["requested_rewrite"][0]
    assert case["case_id"] == "mquake-2500-0" and case["relation_id"] == "P27"
    assert fill(case["prompt"], case["subject"]) == "Vince McMahon is a citizen of"
    assert (case["target_new"], case["target_true"]) == (rw["target_new"]["str"], rw["target_true"]["str"])
    assert case["paraphrase_prompts"] == [rw["question"]]
    assert [p["question"] for p in case["portability"]] == raw["questions"]
    assert all(p["target_new"] == "Franklin" and p["target_new_aliases"] == ["Franklin, Kentucky"] and p["target_true"] == "Washington, D.C."
               and p["target_true_aliases"] == ["Washington"] for p in case["portability"])


def test_a_probe_alias_that_is_not_a_list_of_strings_is_refused():
    probe = {"hop": "h", "prompt": "p", "target_new": "Rome", "target_new_aliases": "Roma"}
    with pytest.raises(EditscaleError, match=r"'portability'\[0\].target_new_aliases must be a list of strings"):
        validate_case(good_case(portability=[probe]))
