"""The ordered edit sequence of a run: results/{run}/edits.jsonl.

Like the forgetting study, a chain edits each subject at most once: the first case per lower-cased
subject is kept. The order is either a seeded shuffle (depending on seed and sample) of those
cases, or an order read from an index file (the study's paper_samples_unique_10_20391.json).

Caching relies on the prefix property: the whole candidate list is ordered first and only then
truncated, so the first N edits are the same for every n_edits >= N and a longer run can extend a
shorter run's cached chain.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from ..io import EditscaleError, read_jsonl, write_jsonl_atomic
from .schema import validate_case

log = logging.getLogger(__name__)


def unique_subjects(cases: list[dict]) -> list[dict]:
    """The first case per lower-cased subject, in the given order."""
    seen: set[str] = set()
    out = []
    for case in cases:
        key = case["subject"].lower()
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def read_order(order_file: str | os.PathLike, key: str) -> list[str]:
    path = Path(order_file)
    if not path.is_file():
        raise EditscaleError(f"order file not found: {path}")
    try:
        with open(path) as fh:
            orders = json.load(fh)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"order file {path}: not valid JSON ({exc})") from exc
    if not isinstance(orders, dict):
        raise EditscaleError(f"order file {path}: expected a JSON object of lists, got {type(orders).__name__}")
    if key not in orders:
        raise EditscaleError(f"order file {path}: no key {key!r}; keys: {', '.join(sorted(orders))}")
    ids = orders[key]
    if not isinstance(ids, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
        raise EditscaleError(f"order file {path}: key {key!r} must hold a list of case ids")
    return [str(i) for i in ids]


def order_cases(
    cases: list[dict],
    sample: int = 0,
    seed: int = 0,
    order_ids: list[str] | None = None,
    source: str = "dataset",
) -> list[dict]:
    """Every usable case of the chain, in chain order (before truncation to n_edits)."""
    return usable_cases(cases, sample, seed, order_ids, source)[0]


def usable_cases(cases: list[dict], sample: int = 0, seed: int = 0, order_ids: list[str] | None = None,
                 source: str = "dataset") -> tuple[list[dict], str]:
    """(every usable case in chain order, how many were left out and why)."""
    if order_ids is None:
        candidates = unique_subjects(cases)
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
        random.Random(f"editscale-sequence:{seed}:{sample}").shuffle(candidates)
        why = f"{len(cases)} cases in {source}, {len(cases) - len(candidates)} dropped as repeated subjects, {len(candidates)} usable"
        log.info("sequence: %s (shuffled with seed=%d sample=%d)", why, seed, sample)
        return candidates, why
    by_id = {c["case_id"]: c for c in cases}
    present = [by_id[i] for i in order_ids if i in by_id]
    candidates = unique_subjects(present)
    why = (f"order of {len(order_ids)} ids; {len(order_ids) - len(present)} not in {source}, "
           f"{len(present) - len(candidates)} more dropped as repeated subjects, {len(candidates)} usable")
    log.info("sequence: %s", why)
    return candidates, why


def check_length(n_edits: int, usable: int, why: str, what: str) -> None:
    """A run's n_edits must fit the usable sequence: one error with the numbers."""
    if n_edits > usable:
        raise EditscaleError(f"{what}: n_edits = {n_edits} requested, but the edit sequence has only {usable} usable cases ({why})")


def build_sequence(
    dataset_jsonl: str | os.PathLike,
    out_path: str | os.PathLike,
    n_edits: int | None,
    sample: int = 0,
    seed: int = 0,
    order_file: str | os.PathLike | None = None,
    order_key: str | None = None,
    required: dict[str, int] | None = None,
) -> list[dict]:
    """Write the first n_edits of the chain to out_path; each line is the case plus edit_index (1-based).

    n_edits = 0 or None writes the whole chain (every usable case); a run then takes its first
    n_edits lines, so raising a run's n_edits does not change this file.

    order_file/order_key: take the order from a JSON object of case-id lists, key str(sample) by
    default; ids missing from the dataset are skipped. Without it: seeded shuffle of the
    unique-subject cases.

    required: run name -> the n_edits it needs of this sequence; one that does not fit is an error
    here, before any edit runs.
    """
    if n_edits is None:
        n_edits = 0
    if not isinstance(n_edits, int) or isinstance(n_edits, bool) or n_edits < 0:
        raise EditscaleError(f"n_edits must be a non-negative integer (0: all), got {n_edits!r}")
    cases = read_jsonl(dataset_jsonl)
    for case in cases:
        validate_case(case, str(dataset_jsonl))

    order_ids = None
    if order_file is not None:
        order_key = str(sample) if order_key is None else str(order_key)
        order_ids = read_order(order_file, order_key)
    candidates, why = usable_cases(cases, sample=sample, seed=seed, order_ids=order_ids, source=str(dataset_jsonl))
    for run, need in sorted((required or {}).items()):
        check_length(need, len(candidates), why, f"run {run}")
    if n_edits == 0:
        n_edits = len(candidates)
    check_length(n_edits, len(candidates), why, "sequence")
    edits = [{**case, "edit_index": i} for i, case in enumerate(candidates[:n_edits], start=1)]
    write_jsonl_atomic(out_path, edits)
    log.info("sequence: wrote %d edits to %s", len(edits), out_path)
    return edits
