"""Forgetting of earlier edits: earlier edits re-scored at checkpoint k.

`score_history` scores, on the model after k edits, either every case with edit_index <= k
(`sample: all`) or a bounded sample of them (`sample: M`), with the same definitions as
`edit_scores` (efficacy and paraphrase prompts by default: es, em, efficacy_em, nll_new,
nll_true, ps, pm, paraphrase_em). Each row also carries the edit-index range of its age stratum
(stratum_lo, stratum_hi) so that the report can weight the sample back to all earlier edits.

The sample (`history_sample`), chosen so that its cost is flat in k and its estimates hold for
every age:

* Age strata: the k earlier edits are split by age a = k - edit_index into `strata` bins whose
  edges double: ages [0, k/2^(S-1)), [k/2^(S-1), k/2^(S-2)), ..., [k/2, k) (S = strata), so the
  most recent edits form a stratum of their own however long the run.
* Quotas: M is split evenly over the non-empty strata; a stratum smaller than its quota gives
  all its edits and passes the rest on (water-filling), so the sample holds min(M, k) edits.
* Within a stratum, the edits with the smallest priority are taken. The priority of an edit is
  sha256(seed, case_id), fixed for the run, so the edits sampled at one checkpoint are sampled
  again at later ones whenever they still rank within their stratum's quota, and the sample at
  checkpoint k is the same whatever n_edits is (extending a run re-uses every history file).

The report (editscale.report.tables.forgetting_table) turns the sample into stratified estimates
of retention and % forgotten, with confidence intervals; with `sample: all` they are the exact
population figures and the intervals have zero width.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import polars as pl

from .edit_scores import score_cases

HISTORY_PARTS = ("efficacy", "paraphrase")


def age_strata(k: int, strata: int) -> list[tuple[int, int]]:
    """Edit-index ranges [lo, hi] of the non-empty age strata at checkpoint k, newest first."""
    if k <= 0:
        return []
    edges = sorted({0, k, *(-(-k // 2 ** (strata - i)) for i in range(1, strata))})
    return [(k - hi + 1, k - lo) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def priority(case_id, seed: int) -> int:
    """The fixed rank of an edit in every sample of the run (smaller is taken first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "big")


def history_sample(cases: Sequence[dict], k: int, size: int | None, strata: int = 4, seed: int = 0) -> list[tuple[dict, int, int]]:
    """(case, stratum_lo, stratum_hi) of the sampled earlier edits at checkpoint k, by edit index
    (module docstring); size None = every earlier edit, in one stratum."""
    earlier = sorted((c for c in cases if 1 <= int(c["edit_index"]) <= k), key=lambda c: int(c["edit_index"]))
    if size is None or len(earlier) <= size:
        return [(c, 1, k) for c in earlier]
    by_index = {int(c["edit_index"]): c for c in earlier}
    bins = [(lo, hi, [by_index[j] for j in range(lo, hi + 1) if j in by_index]) for lo, hi in age_strata(k, strata)]
    quota, left, open_bins = {}, size, sorted(range(len(bins)), key=lambda b: len(bins[b][2]))
    while open_bins:  # water-filling: the smallest strata first
        share = left // len(open_bins)
        b = open_bins.pop(0)
        quota[b] = min(len(bins[b][2]), share + (1 if left - share * (len(open_bins) + 1) > 0 else 0))
        left -= quota[b]
    chosen = []
    for b, (lo, hi, members) in enumerate(bins):
        ranked = sorted(members, key=lambda c: priority(c["case_id"], seed))[: quota[b]]
        chosen += [(c, lo, hi) for c in ranked]
    return sorted(chosen, key=lambda t: int(t[0]["edit_index"]))


def score_history(model, tok, cases: Sequence[dict], k: int, parts: Sequence[str] = HISTORY_PARTS, batch_size: int = 64,
                  sample: int | None = None, strata: int = 4, seed: int = 0, base=None, chat: bool = False) -> pl.DataFrame:
    """Rows (k, item=case_id, edit_index, metric, value, stratum_lo, stratum_hi) for the sampled
    earlier edits (all with edit_index <= k when `sample` is None)."""
    picked = history_sample(cases, k, sample, strata, seed)
    df = score_cases(model, tok, [c for c, _, _ in picked], k=k, parts=parts, batch_size=batch_size, base=base, chat=chat)
    bounds = pl.DataFrame({"item": [c["case_id"] for c, _, _ in picked], "stratum_lo": [lo for _, lo, _ in picked],
                           "stratum_hi": [hi for _, _, hi in picked]},
                          schema={"item": df.schema["item"] if df.height else pl.Utf8, "stratum_lo": pl.Int64, "stratum_hi": pl.Int64})
    return df.join(bounds, on="item", how="left") if df.height else df.with_columns(
        pl.lit(None, pl.Int64).alias("stratum_lo"), pl.lit(None, pl.Int64).alias("stratum_hi"))
