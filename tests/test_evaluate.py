"""Evaluate stage: scorer, edit scores, history curves, entropy, perplexity, weights, grid, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from editscale.io import EditscaleError
from editscale.workflow import eval_grid, segment_ends
from editscale.evaluate.edit_scores import EDIT_METRICS, case_metrics, harmonic_mean, score_cases
from editscale.evaluate.generation import (
    entropy_bits,
    ngram_counts,
    ngram_entropy,
    sample_continuations,
    text_ngram_entropy,
    unigram_entropy_norm,
    word_tokenize,
)
from editscale.evaluate.history import age_strata, history_sample, score_history
from editscale.evaluate.metrics.perplexity import perplexity
from editscale.evaluate import scoring
from editscale.evaluate.scoring import Batching, Decoding, argmax_match, generate, run_prompts, score_pairs, score_token_pairs, target_nll
from editscale.evaluate.weights import flag_outliers, robust_z, update_norm_rows, weight_drift
from editscale.models.fetch import build_tiny_model

DOWNSTREAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "downstream"

PROMPTS = ["The capital of France is", "Paris is a city in", "Hi", "The quick brown fox jumps over the lazy dog and the"]
TARGETS = ["Paris", "the country of France", "there", "cat"]


@pytest.fixture(scope="module")
def gpt2():
    return build_tiny_model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama")


def case(i: int, **kw) -> dict:
    c = {
        "case_id": f"c{i}", "subject": "France", "relation_id": "P36", "prompt": "The capital of {} is",
        "target_true": "Paris", "target_new": "Rome", "paraphrase_prompts": ["France's capital is", "The capital city of France is"],
        "neighborhood_prompts": ["The capital of Germany is", "The capital of Spain is", "Italy's capital is"],
        "attribute_prompts": [], "generation_prompts": ["France is"], "edit_index": i,
    }
    c.update(kw)
    return c


# ---------------------------------------------------------------------------------------------
# scoring


def test_target_nll_matches_hand_computation(gpt2):
    model, tok = gpt2
    prompt, target = "The capital of France is", "Paris"
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    assert len(t_ids) == 2, "fixture expects a two-token target"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p_ids + t_ids])).logits[0].double(), -1)
    n = len(p_ids)
    hand = -(logp[n - 1, t_ids[0]] + logp[n, t_ids[1]]).item() / 2
    got = target_nll(model, tok, [prompt], [target])
    assert got.shape == (1,)
    assert got[0].item() == pytest.approx(hand, abs=1e-5)
    hand_match = bool(logp[n - 1].argmax() == t_ids[0]) and bool(logp[n].argmax() == t_ids[1])
    assert argmax_match(model, tok, [prompt], [target])[0].item() == hand_match


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_padding_invariance(arch):
    model, tok = build_tiny_model(arch)
    batch = score_pairs(model, tok, PROMPTS, TARGETS, batch_size=64)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        single = score_pairs(model, tok, [p], [t])
        assert abs(batch.nll[i].item() - single.nll[0].item()) < 1e-5
        assert batch.match[i].item() == single.match[0].item()
    # a different batch size / grouping gives the same numbers
    small = score_pairs(model, tok, PROMPTS, TARGETS, batch_size=1)
    assert torch.allclose(batch.nll, small.nll, atol=1e-5)


def test_argmax_match_true_on_greedy_continuation(llama):
    model, tok = llama
    p_ids = tok("The capital of France is")["input_ids"]
    with torch.no_grad():
        t1 = int(model(torch.tensor([p_ids])).logits[0, -1].argmax())
        t2 = int(model(torch.tensor([p_ids + [t1]])).logits[0, -1].argmax())
    sc = score_token_pairs(model, tok, [p_ids, p_ids], [[t1, t2], [t1, (t2 + 1) % len(tok)]])
    assert sc.match.tolist() == [True, False]
    assert sc.n_tokens.tolist() == [2, 2]
    assert sc.nll[0] < sc.nll[1]


def test_generate_batched_equals_single(llama):
    model, tok = llama
    ids, lp = generate(model, tok, PROMPTS, 4, batch_size=8)
    for i, p in enumerate(PROMPTS):
        one, lp1 = generate(model, tok, [p], 4)
        assert one[0] == ids[i]
        assert torch.allclose(lp[i], lp1[0], atol=1e-4)
    # the first generated token is the argmax of the returned first-step log-probs
    assert all(len(x) == 0 or x[0] == int(lp[i].argmax()) for i, x in enumerate(ids))


FEW_SHOT = "Opposites:\nhot -> cold\nbig -> small\nup -> down\nfast -> slow\n"


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_shared_few_shot_prefix_runs_once_and_reads_the_same(arch):
    """Few-shot prompts share their context: with share_prefix it runs once and every row runs
    only its own tokens (gaps masked); the readings equal the unshared pass and full scoring."""
    model, tok = build_tiny_model(arch)
    prompts = [FEW_SHOT + w + " ->" for w in ("happy", "light", "old", "rich", "strong and brave", "a")]
    enc = [tok(p)["input_ids"] for p in prompts]
    assert scoring.shared_prefix_len(enc) >= 10
    choices = [["sad", "dark matter", "x"], ["dark"], ["new", "young at heart"], ["poor"], ["weak", "w"], ["b c d e f", "b"]]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        shared = run_prompts(model, tok, prompts, choices, decoding=Decoding(4), batching=Batching(4), keep_first_lp=True)
    finally:
        hook.remove()
    plain = run_prompts(model, tok, prompts, choices, decoding=Decoding(4), batching=Batching(4, share_prefix=False), keep_first_lp=True)
    n_prefix = scoring.shared_prefix_len(enc)
    assert calls[0] == (1, n_prefix)  # the context once, then only each row's own tokens
    assert max(c[1] for c in calls[1:]) <= max(len(e) for e in enc) - n_prefix
    flat = [v for row in shared.choice_ll for v in row]
    assert flat == pytest.approx([v for row in plain.choice_ll for v in row], abs=1e-5)
    assert shared.choice_match == plain.choice_match
    assert shared.new_ids == plain.new_ids
    assert torch.allclose(shared.first_lp, plain.first_lp, atol=1e-4)
    pairs = [(p, c) for p, cs in zip(prompts, choices) for c in cs]
    sc = score_pairs(model, tok, [a for a, _ in pairs], [b for _, b in pairs])
    assert flat == pytest.approx((-sc.nll).tolist(), abs=1e-5)


def test_choice_chunks_are_the_cheapest_partition():
    """length_chunks: every row with a continuation exactly once, at most max_rows per pass, and
    the least total cost (forward cost + rows x widest) over all partitions of the sorted rows."""
    import itertools
    import random as _random

    rng = _random.Random(3)
    for _ in range(30):
        widths = [rng.choice([0, 1, 1, 1, 2, 2, 3, 6]) for _ in range(rng.randint(1, 9))]
        max_rows, cost = rng.randint(1, 5), rng.choice([0, 2, 16])
        chunks = scoring.length_chunks(widths, max_rows, cost)
        assert sorted(i for c in chunks for i in c) == [i for i, w in enumerate(widths) if w > 0]
        assert all(0 < len(c) <= max_rows for c in chunks)
        got = sum(cost + len(c) * max(widths[i] for i in c) for c in chunks)
        ws = sorted(w for w in widths if w > 0)
        best = math.inf
        for cuts in itertools.product([0, 1], repeat=max(0, len(ws) - 1)):
            parts, start = [], 0
            for j, c in enumerate(cuts, 1):
                if c:
                    parts.append(ws[start:j])
                    start = j
            parts.append(ws[start:])
            if all(len(q) <= max_rows for q in parts if q):
                best = min(best, sum(cost + len(q) * max(q) for q in parts if q))
        assert got == (best if ws else 0)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_run_prompts_matches_scorer_and_hf_generate(arch):
    """The cached prompt pass gives the same choice likelihoods as full scoring and the same
    greedy tokens as transformers' generate."""
    model, tok = build_tiny_model(arch)
    choices = [["Paris", "the country of France"], ["there", "cat", "a b c d"], ["x"], ["Saint Petersburg", "dog"]]
    r = run_prompts(model, tok, PROMPTS, choices, decoding=Decoding(6), batching=Batching(3), keep_first_lp=True)
    flat = [(p, c) for p, cs in zip(PROMPTS, choices) for c in cs]
    sc = score_pairs(model, tok, [a for a, _ in flat], [b for _, b in flat])
    assert [v for row in r.choice_ll for v in row] == pytest.approx((-sc.nll).tolist(), abs=1e-5)
    assert [h for row in r.choice_match for h in row] == sc.match.tolist()
    # a choice that is the model's own greedy continuation is an exact match (where the two
    # greedy tokens decode to " word" and tokenize back to themselves)
    checked = 0
    for p, ids in zip(PROMPTS, r.new_ids):
        greedy = tok.decode(ids[:2])
        if len(ids) >= 2 and greedy.startswith(" ") and tok(greedy, add_special_tokens=False)["input_ids"] == ids[:2]:
            assert run_prompts(model, tok, [p], [[greedy[1:]]]).choice_match == [[True]]
            checked += 1
    assert checked or arch in ("gpt2", "gptj")
    for i, p in enumerate(PROMPTS):
        x = tok(p, return_tensors="pt")
        hf = model.generate(**x, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = hf[0, x["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in expected:
            expected = expected[: expected.index(tok.eos_token_id)]
        assert r.new_ids[i] == expected


# ---------------------------------------------------------------------------------------------
# edit scores


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([0.5, float("nan"), 0.5]) == pytest.approx(0.5)
    assert math.isnan(harmonic_mean([float("nan")]))


def test_case_metrics_definitions(gpt2):
    model, tok = gpt2
    c = case(1)
    c2 = case(2, case_id="c2", neighborhood_target="Berlin", neighborhood_prompts=["The capital of Germany is"])
    m1, m2 = case_metrics(model, tok, [c, c2])
    edit_p = "The capital of France is"
    new, old = target_nll(model, tok, [edit_p, edit_p], ["Rome", "Paris"]).tolist()
    assert m1["nll_new"] == pytest.approx(new, abs=1e-6) and m1["nll_true"] == pytest.approx(old, abs=1e-6)
    assert m1["es"] == float(new < old)
    assert m1["em"] == pytest.approx(math.exp(-new) - math.exp(-old), abs=1e-6)
    para = c["paraphrase_prompts"]
    pn = target_nll(model, tok, para, ["Rome"] * 2).tolist()
    po = target_nll(model, tok, para, ["Paris"] * 2).tolist()
    assert m1["ps"] == pytest.approx(np.mean([a < b for a, b in zip(pn, po)]))
    assert m1["pm"] == pytest.approx(np.mean([math.exp(-a) - math.exp(-b) for a, b in zip(pn, po)]), abs=1e-6)
    neigh = c["neighborhood_prompts"]
    nn = target_nll(model, tok, neigh, ["Rome"] * 3).tolist()
    no = target_nll(model, tok, neigh, ["Paris"] * 3).tolist()
    assert m1["ns"] == pytest.approx(np.mean([b < a for a, b in zip(nn, no)]))
    assert m1["nm"] == pytest.approx(np.mean([math.exp(-b) - math.exp(-a) for a, b in zip(nn, no)]), abs=1e-6)
    assert m1["score"] == pytest.approx(harmonic_mean([m1["es"], m1["ps"], m1["ns"]]))
    # neighborhood_target replaces target_true on neighborhood prompts
    gb = target_nll(model, tok, ["The capital of Germany is"] * 2, ["Rome", "Berlin"]).tolist()
    assert m2["ns"] == float(gb[1] < gb[0])
    assert m2["nm"] == pytest.approx(math.exp(-gb[1]) - math.exp(-gb[0]), abs=1e-6)


def test_a_knowledge_insertion_is_scored_on_its_new_answer_alone(gpt2):
    """No old answer: es / em / ps / pm / nll_true / score undefined (NaN); rewrite_acc,
    rephrase_acc, efficacy_em, paraphrase_em read the new answer as for any case; the
    neighbourhood is scored against neighborhood_target, and left out without one."""
    model, tok = gpt2
    edit = case(1)
    insertion = {k: v for k, v in case(1, case_id="i1", neighborhood_target="Berlin").items() if k != "target_true"}
    bare = {k: v for k, v in case(1, case_id="i2").items() if k != "target_true"}
    m_edit, m_ins, m_bare = case_metrics(model, tok, [edit, insertion, bare])
    for name in ("es", "em", "ps", "pm", "nll_true", "score"):
        assert math.isnan(m_ins[name]) and not math.isnan(m_edit[name]), name
    for name in ("rewrite_acc", "rephrase_acc", "efficacy_em", "paraphrase_em", "nll_new"):
        assert m_ins[name] == pytest.approx(m_edit[name], abs=1e-5), name
    neigh = insertion["neighborhood_prompts"]
    nn = target_nll(model, tok, neigh, ["Rome"] * 3).tolist()
    nb = target_nll(model, tok, neigh, ["Berlin"] * 3).tolist()
    assert m_ins["ns"] == pytest.approx(np.mean([b < a for a, b in zip(nn, nb)]))
    assert math.isnan(m_bare["ns"]) and math.isnan(m_bare["nm"])


def test_score_cases_rows(gpt2):
    model, tok = gpt2
    df = score_cases(model, tok, [case(1), case(2, case_id="c2")], k=[1, 2], base="self")
    assert df.schema == {"k": pl.Int64, "item": pl.Utf8, "edit_index": pl.Int64, "metric": pl.Utf8, "value": pl.Float64}
    portability = {"port_s", "portability_em", "portability_acc"}  # cases with probes only
    assert set(df["metric"]) == set(EDIT_METRICS) - portability
    no_base = score_cases(model, tok, [case(1)], k=[1])  # EasyEdit's locality needs the unedited model
    assert set(no_base["metric"]) == set(EDIT_METRICS) - {"locality"} - portability
    assert df.filter(pl.col("item") == "c2")["k"].unique().to_list() == [2]
    es = df.filter(pl.col("metric").is_in(["es", "ps", "ns", "efficacy_em", "paraphrase_em", "score"]))["value"]
    assert ((es >= 0) & (es <= 1)).all()


def test_portability_probes_are_scored_like_efficacy_on_their_own_targets(gpt2):
    """port_s: P(probe's target_new) > P(its target_true), over the probes that know the answer
    before the edit; portability_em / _acc: the new target's argmax match / token accuracy (all
    probes); the other readings of the case do not change."""
    model, tok = gpt2
    probes = [{"hop": "capital", "prompt": "The capital of the country where Lyon is located is", "target_new": "Rome", "target_true": "Paris"},
              {"hop": "currency", "prompt": "The currency of the country where Lyon is located is the", "target_new": "Euro"}]
    with_probes = case(1, portability=probes)
    df = score_cases(model, tok, [with_probes], k=[1])
    got = dict(zip(df["metric"], df["value"]))
    sc = score_pairs(model, tok, [probes[0]["prompt"]] * 2 + [probes[1]["prompt"]], ["Rome", "Paris", "Euro"])
    assert got["port_s"] == float(sc.nll[0] < sc.nll[1])
    assert got["portability_em"] == pytest.approx((float(sc.match[0]) + float(sc.match[2])) / 2)
    assert got["portability_acc"] == pytest.approx(float((sc.token_hits[0] / sc.n_tokens[0] + sc.token_hits[2] / sc.n_tokens[2]) / 2))
    plain = score_cases(model, tok, [case(1)], k=[1])
    # (batched with other rows: equal up to float rounding)
    assert dict(zip(plain["metric"], plain["value"])) == pytest.approx({m: v for m, v in got.items() if not m.startswith("port")}, abs=1e-5)


def test_score_history_only_earlier_edits(gpt2):
    model, tok = gpt2
    cases = [case(i, case_id=f"c{i}") for i in range(1, 6)]
    df = score_history(model, tok, cases, k=3)
    assert sorted(df["item"].unique().to_list()) == ["c1", "c2", "c3"]
    assert df["k"].unique().to_list() == [3]
    assert {"es", "ps", "efficacy_em", "paraphrase_em"} <= set(df["metric"])
    assert "ns" not in set(df["metric"])


# ---------------------------------------------------------------------------------------------
# forgetting / retention


def test_history_sample_is_age_stratified_bounded_seeded_and_stable():
    cases = [{"case_id": f"c{j}", "edit_index": j} for j in range(1, 20_001)]
    # strata edges double with age: the newest k/8 edits are a stratum of their own
    assert age_strata(200, 4) == [(176, 200), (151, 175), (101, 150), (1, 100)]
    assert age_strata(3, 4) == [(3, 3), (2, 2), (1, 1)] and age_strata(0, 4) == []

    def ids(k, size=100, **kw):
        return {c["case_id"] for c, _, _ in history_sample(cases, k, size, **kw)}

    for k in (150, 1000, 10_000):
        picked = history_sample(cases, k, 100)
        assert len(picked) == 100 and all(1 <= c["edit_index"] <= k for c, _, _ in picked)
        per_stratum = {}
        for c, lo, hi in picked:
            assert lo <= c["edit_index"] <= hi
            per_stratum[(lo, hi)] = per_stratum.get((lo, hi), 0) + 1
        assert sorted(per_stratum) == sorted(age_strata(k, 4))
        # 25 per stratum; at k = 150 the two newest strata hold 19 edits each: all of them, 31 for the rest
        assert sorted(per_stratum.values()) == ([19, 19, 31, 31] if k == 150 else [25] * 4)
    # a stratum smaller than its quota gives all its edits and passes the rest on
    small = history_sample(cases, 10, 7)
    assert len(small) == 7 and sum(1 for _, lo, hi in small if (lo, hi) == (8, 8)) == 1
    # all, or fewer earlier edits than the sample: every one, one stratum
    assert [(c["edit_index"], lo, hi) for c, lo, hi in history_sample(cases, 3, None)] == [(1, 1, 3), (2, 1, 3), (3, 1, 3)]
    assert len(history_sample(cases, 50, 100)) == 50
    # seeded: the same sample again, another with another seed; the run's length plays no part
    assert ids(1000) == ids(1000) != ids(1000, seed=1)
    assert ids(1000) == {c["case_id"] for c, _, _ in history_sample(cases[:1000], 1000, 100)}
    # stable: most edits sampled at k are sampled again a little later (fixed per-edit priorities)
    assert len(ids(1000) & ids(1050)) >= 75
    # and the edits of an age band that no edit left keep their sample: 1..500 at k = 1000 and 1001
    old = {c["case_id"] for c, lo, _ in history_sample(cases, 1000, 100) if lo == 1}
    assert old <= ids(1001)


# ---------------------------------------------------------------------------------------------
# generation entropy


def test_ngram_entropy_hand_computed():
    text = "a b a b"
    assert word_tokenize(text) == ["a", "b", "a", "b"]
    # bigrams (a,b) x2, (b,a) x1; trigrams (a,b,a), (b,a,b)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    expected = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert text_ngram_entropy(text) == pytest.approx(expected)
    assert expected == pytest.approx(0.972765, abs=1e-6)
    assert ngram_entropy([text, "x x x x"]) == pytest.approx((expected + 0.0) / 2)
    assert entropy_bits(ngram_counts(["a", "b", "c", "d"], 1)) == pytest.approx(2.0)
    assert unigram_entropy_norm("a b a b") == pytest.approx(1.0)
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert unigram_entropy_norm("a a a b") == pytest.approx(h1)
    assert unigram_entropy_norm("a a a") == 0.0
    assert word_tokenize("I don't know, it's Paris.") == ["I", "do", "n't", "know", ",", "it", "'s", "Paris", "."]


def test_paired_sampling(llama):
    model, tok = llama
    prompts = ["France is", "The city of Paris", "Hello there"]
    a = sample_continuations(model, tok, prompts, max_new_tokens=8, top_k=5, seed=0, batch_size=3)
    b = [sample_continuations(model, tok, [p], max_new_tokens=8, top_k=5, seed=0)[0] for p in prompts]
    assert a == b  # per-prompt streams: the batch does not matter
    c = sample_continuations(model, tok, prompts, max_new_tokens=8, top_k=5, seed=1, batch_size=3)
    assert c != a
    greedy = generate(model, tok, prompts, 8)[0]
    top1 = sample_continuations(model, tok, prompts, max_new_tokens=8, top_k=1, seed=3)
    assert top1 == [tok.decode(g, skip_special_tokens=True) for g in greedy]


# ---------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_of_uniform_model_is_vocab_size():
    model, tok = build_tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    vocab = model.lm_head.weight.shape[0]
    toks = np.random.default_rng(0).integers(0, vocab, size=(3, 17), dtype=np.int64)
    res = perplexity(model, toks, batch_size=2)
    assert res["n_tokens"] == 3 * 16
    assert res["perplexity"] == pytest.approx(vocab, rel=1e-6)
    assert res["nll"] == pytest.approx(math.log(vocab), rel=1e-6)


def test_perplexity_matches_mean_token_nll(gpt2):
    model, tok = gpt2
    ids = tok("The capital of France is Paris and the capital of Spain is Madrid.")["input_ids"]
    res = perplexity(model, np.array([ids]))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    hand = -np.mean([logp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    assert res["nll"] == pytest.approx(hand, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# weights


def test_weight_drift_rank_one():
    u = torch.tensor([3.0, 4.0])
    v = torch.tensor([1.0, 0.0, 0.0])
    delta = {"m": torch.outer(u, v)}
    base = {"m": torch.ones(2, 3)}
    df = weight_drift(delta, base, k=7)
    get = {(r["item"], r["metric"]): r["value"] for r in df.iter_rows(named=True)}
    assert df["k"].unique().to_list() == [7]
    assert get[("m", "fro")] == pytest.approx(5.0)
    assert get[("m", "spectral")] == pytest.approx(5.0)  # rank one: spectral == Frobenius
    assert get[("m", "fro_per_numel")] == pytest.approx(5.0 / 6)
    assert get[("m", "rel_fro")] == pytest.approx(5.0 / math.sqrt(6))
    assert get[("all", "fro")] == pytest.approx(5.0)
    # transposed base (GPT-2 Conv1D orientation) is accepted
    assert weight_drift(delta, {"m": torch.ones(3, 2)})["value"].to_list() == df["value"].to_list()


def test_collapse_indicators_match_a_direct_numpy_computation():
    from editscale.evaluate.weights import hyperspherical_energy, matrix_indicators

    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((7, 5))
    d = np.outer(rng.standard_normal(7), rng.standard_normal(5))
    w = w0 + d
    s = np.linalg.svd(w, compute_uv=False)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    he = np.mean([1 / np.linalg.norm(u[i] - u[j]) for i in range(7) for j in range(7) if i != j])
    got = matrix_indicators(torch.tensor(w))
    assert got["sv_1"] == pytest.approx(s[0]) and got["sv_2"] == pytest.approx(s[1]) and got["sv_3"] == pytest.approx(s[2])
    assert got["cond"] == pytest.approx(s[0] / s[-1]) and got["hyperspherical_energy"] == pytest.approx(he)
    # the row blocks of the Gram matrix give the same energy; zero rows are left out
    assert hyperspherical_energy(torch.tensor(w), chunk=2) == pytest.approx(he)
    assert hyperspherical_energy(torch.tensor(np.vstack([w, np.zeros((1, 5))]))) == pytest.approx(he)
    # an orthonormal frame: every pair at distance sqrt(2)
    assert hyperspherical_energy(torch.eye(4, dtype=torch.float64)) == pytest.approx(1 / math.sqrt(2))
    # weight_drift reports them for W_k = W_0 + D_k, at k = 0 too (zero delta), per module
    df = weight_drift({"m": torch.tensor(d, dtype=torch.float32)}, {"m": torch.tensor(w0, dtype=torch.float32)}, k=4)
    get = {(r["item"], r["metric"]): r["value"] for r in df.iter_rows(named=True)}
    assert get[("m", "cond")] == pytest.approx(s[0] / s[-1], rel=1e-5) and get[("m", "weight_fro")] == pytest.approx(np.linalg.norm(w), rel=1e-6)
    at0 = weight_drift({"m": torch.zeros(7, 5)}, {"m": torch.tensor(w0, dtype=torch.float32)}, k=0)
    s0 = np.linalg.svd(w0, compute_uv=False)
    assert {(r["item"], r["metric"]): r["value"] for r in at0.iter_rows(named=True)}[("m", "sv_1")] == pytest.approx(s0[0], rel=1e-5)
    assert "cond" not in set(weight_drift({"m": torch.zeros(7, 5)}, {"m": torch.ones(7, 5)}, indicators=False)["metric"])


def test_v_norm_rows_and_the_leading_indicator():
    from editscale.report.changepoint import Phase
    from editscale.report.tables import leading_indicator

    log = pl.DataFrame({"case_id": ["a", "b", "c"], "edit_index": [1, 2, 3], "update_norm": [1.0, 1.0, 1.0], "v_norm": [2.0, 4.0, 9.0]})
    df = update_norm_rows(log, k=3, recent=2)
    get = {(r["item"], r["metric"]): r["value"] for r in df.iter_rows(named=True)}
    assert get[("c", "v_norm")] == 9.0 and get[("all", "v_norm_recent")] == pytest.approx(6.5)  # median of the last 2

    class Combined:
        onset_k = 120.0

    class Run:
        phases = {"weight_norm": Phase("weight_norm", onset_k=80.0), "perplexity": Phase("perplexity", onset_k=100.0),
                  "downstream_f1": Phase("downstream_f1", onset_k=50.0), "v_norm": Phase("v_norm", onset_k=None)}
        combined = Combined()

    # downstream_f1 is a decision curve, not an indicator: ||W||_F moved first, 40 edits ahead
    assert leading_indicator(Run()) == {"leading_indicator": "weight_norm", "leading_indicator_onset": 80.0, "indicator_lead": 40.0}
    Run.phases = {"v_norm": Phase("v_norm")}
    assert leading_indicator(Run())["leading_indicator"] is None


def test_flag_outliers():
    norms = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 50.0])
    flags = flag_outliers(norms, threshold=5)
    assert flags.tolist() == [False] * 6 + [True]
    z = robust_z(norms)
    med = np.median(norms)
    mad = np.median(np.abs(norms - med))
    assert z[-1] == pytest.approx((50.0 - med) / (1.4826 * mad))
    assert not flag_outliers(np.ones(5)).any()
    # MAD 0 -> 1.2533 * mean absolute deviation: z = 29 / (1.2533 * 2.9) = 7.98
    assert flag_outliers(np.array([1.0] * 9 + [30.0]), 5).tolist() == [False] * 9 + [True]
    assert robust_z(np.array([1.0] * 9 + [30.0]))[-1] == pytest.approx(29 / (1.2533 * 2.9))
    assert flag_outliers(np.array([1.0, np.nan, 1.2, 0.8, 100.0])).tolist() == [False, False, False, False, True]
    assert not flag_outliers(np.array([1.0, 2.0, 3.0]), threshold=5).any()


def test_update_norm_rows():
    log = pl.DataFrame({
        "case_id": [f"c{i}" for i in range(1, 9)], "edit_index": list(range(1, 9)),
        "update_norm": [1.0, 1.1, 0.9, 1.0, 40.0, 1.05, 0.95, 80.0], "update_rel": [0.01] * 8,
    })
    df = update_norm_rows(log, k=6)
    assert df.columns == ["k", "item", "edit_index", "metric", "value"]
    out = df.filter(pl.col("metric") == "outlier")
    assert out["edit_index"].to_list() == list(range(1, 7))  # edits after k are left out
    assert out.filter(pl.col("value") == 1.0)["item"].to_list() == ["c5"]
    assert df.filter(pl.col("metric") == "n_outliers")["value"].to_list() == [1.0]


# ---------------------------------------------------------------------------------------------
# grid


def test_eval_grid():
    assert eval_grid(10, every=3) == [0, 3, 6, 9, 10]
    assert eval_grid(9, every=3) == [0, 3, 6, 9]
    assert eval_grid(7, every=1000) == [0, 7]
    assert eval_grid(0, every=5) == [0]
    g = eval_grid(1000, every=100)
    assert g[0] == 0 and g[-1] == 1000 and len(g) == 11
    with pytest.raises(EditscaleError, match="eval_every must be >= 1"):
        eval_grid(10, every=0)


def test_log_spaced_and_listed_eval_grids():
    # the example: 1-2-5 per decade from 10, always with 0 and n_edits
    assert eval_grid(10_000, {"per_decade": 3, "start": 10}) == [0, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000]
    assert eval_grid(300, {"per_decade": 3, "start": 10}) == [0, 10, 20, 50, 100, 200, 300]
    # finer grids round the mantissas 10^(i/D) to 2 significant digits (R10 for D = 10)
    assert eval_grid(100, {"per_decade": 10, "start": 10}) == [0, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100]
    assert eval_grid(100, {"per_decade": 1}) == [0, 1, 10, 100]
    # a list: points above n_edits wait for a longer run
    assert eval_grid(300, [500, 10, 0]) == [0, 10, 300]
    assert eval_grid(600, [500, 10, 0]) == [0, 10, 500, 600]
    # every form is a fixed set cut at n_edits: a longer run keeps every interior point
    for grid in (7, {"per_decade": 3}, {"per_decade": 7, "start": 4}, [3, 40, 900]):
        for short, long in ((50, 120), (99, 1000), (1000, 20_000)):
            assert set(eval_grid(short, grid)) - {short} <= set(eval_grid(long, grid)), (grid, short, long)
    with pytest.raises(EditscaleError, match="integers >= 0"):
        eval_grid(10, [3, -1])
    with pytest.raises(EditscaleError, match="eval_every must be an integer"):
        eval_grid(10, "log")


def test_the_config_schema_accepts_every_grid_form_and_names_a_bad_one():
    from editscale.config import section

    def grid(value):
        return section("metrics.history", {"eval_every": value}).eval_every

    assert grid({"per_decade": 3, "start": 10}) == {"per_decade": 3, "start": 10}
    assert grid([0, 5, 50]) == [0, 5, 50] and grid(25) == 25
    for bad in (0, {"per_decade": 3, "every": 2}, {"start": 10}, [], [1, 1], "log"):
        with pytest.raises(EditscaleError, match=r"metrics.history.eval_every: .* none of the allowed forms: .*per_decade"):
            grid(bad)
    run = {"name": "r", "n_edits": 8, "segment": 4, "edits_per_step": 1}
    assert segment_ends(run) == [4, 8]
    # the chain has no partial segment: the plan refuses n_edits that is not a multiple
    with pytest.raises(EditscaleError, match="n_edits 10 must be a multiple of segment 4"):
        segment_ends({**run, "n_edits": 10})


# ---------------------------------------------------------------------------------------------
# CLI at k = 0 (no chain needed: the unedited model)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from editscale.models.fetch import prepare_model

    root = tmp_path_factory.mktemp("evalcli")
    model_dir = root / "model"
    prepare_model("tiny:gpt2", model_dir)
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"segment": 2, "dtype": "float32"}))
    cases = [case(i, case_id=f"c{i}", subject=s, generation_prompts=[f"{s} is known for"]) for i, s in enumerate(["France", "Spain", "Japan", "Peru"], start=1)]
    (run_dir / "edits.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    return model_dir, run_dir


def _cli(args):
    from editscale.cli import main

    assert main(args) == 0


def test_cli_verbs_registered():
    from editscale.cli import build_parser

    parser = build_parser()
    verbs = set(parser._subparsers._group_actions[0].choices)
    assert {"score-edits", "history", "downstream", "generation", "perplexity", "weights"} <= verbs


def test_cli_k0(tiny_run, tmp_path):
    from editscale.io import read_parquet_metadata

    model_dir, run_dir = tiny_run
    state = ["--model-dir", str(model_dir), "--state", str(run_dir / "run.json"), "--k", "0", "--device", "cpu"]
    base = [*state, "--edits", str(run_dir / "edits.jsonl")]
    params = {
        "eval_every": 6,
        "probes": {"n_eval": 3, "names": ["arith"]},
        "tasks": {"editscale-probe-capital": {"n_eval": 5, "n_shots": 2}, "sst2": {"path": str(DOWNSTREAM / "sst2.jsonl"), "n_eval": 4, "n_shots": 2}},
    }
    if not (DOWNSTREAM / "sst2.jsonl").exists():
        pytest.skip("shared downstream data not available")
    out = tmp_path / "downstream" / "000000.parquet"
    _cli(["downstream", *base, "--out", str(out), "--params-json", json.dumps(params)])
    df = pl.read_parquet(out)
    assert set(df["item"]) == {"editscale-probe-capital", "editscale-probe-arith", "sst2"}
    assert df.filter((pl.col("item") == "editscale-probe-arith") & (pl.col("metric") == "n"))["value"].item() == 3
    assert {"f1", "mcc", "invalid", "accuracy_ll", "f1_ll", "mcc_ll"} <= set(df["metric"])
    assert df["k"].unique().to_list() == [0]
    meta = read_parquet_metadata(out)
    from editscale.io import sha256_json

    # the provenance hashes the resolved section: the given params plus the schema's defaults
    from editscale.config import section_defaults

    # the grid (eval_every) is no part of what a checkpoint's table is computed from
    assert meta["config_hash"] == sha256_json({k: v for k, v in {**section_defaults("metrics.downstream"), **params}.items() if k != "eval_every"})
    assert "model" in json.loads(meta["inputs"])

    out = tmp_path / "generation.parquet"
    _cli(["generation", *base, "--out", str(out), "--params-json", json.dumps({"max_new_tokens": 6, "n_prompts": 3, "seed": 0})])
    g = pl.read_parquet(out)
    assert "ngram_entropy" in set(g["metric"]) and g.filter(pl.col("metric") == "n_prompts")["value"].item() == 3

    toks = tmp_path / "tokens.npy"
    np.save(toks, np.random.default_rng(0).integers(0, 1000, size=(2, 9), dtype=np.int64))
    out = tmp_path / "ppl.parquet"
    _cli(["perplexity", *state, "--out", str(out), "--tokens", str(toks)])
    p = pl.read_parquet(out)
    assert p.filter(pl.col("metric") == "n_tokens")["value"].item() == 16

    out = tmp_path / "history.parquet"
    _cli(["history", *base, "--out", str(out)])
    assert pl.read_parquet(out).height == 0


def test_the_state_of_any_checkpoint_is_one_delta_and_one_segment_of_factors():
    """Replaying to k reads the delta at the start of k's segment and at most `segment` updates of
    that segment's factors, whatever k is (O(segment), not O(k))."""
    from editscale.workflow import state_files

    run = {"name": "r", "model": "m", "segment": 100}
    for k in (150, 10_050):
        files = state_files(run, k)
        start, end = (k // 100) * 100, (k // 100 + 1) * 100
        assert files[2:] == [f"results/r/deltas/{start:06d}.h5", f"results/r/factors/{end:06d}.h5"], files
    assert state_files(run, 10_000)[2:] == ["results/r/deltas/010000.h5"]


def _easyedit_argmax(model, tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """EasyEdit's test_prediction_acc for one pair, written out: prompt + " " + target tokenized
    as one string, one forward pass, the argmax at the positions that predict the target tokens
    (labels = the tokens after the prompt's)."""
    joined = tok(prompt + " " + target)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([joined])).logits[0]
    answers = logits.argmax(-1).tolist()[n_prompt - 1 : -1]
    return answers, joined[n_prompt:]


def test_easyedit_metrics_are_easyedits_token_accuracy_and_argmax_agreement():
    """rewrite_acc / rephrase_acc: the fraction of target tokens that are the argmax under
    teacher forcing; locality: the fraction of neighborhood-target positions whose argmax is the
    unedited model's. Both against a direct transcription of EasyEdit's computation."""
    import copy

    from editscale.evaluate.edit_scores import case_metrics

    model, tok = build_tiny_model("gpt2")
    prompt = "The capital of France is"
    greedy = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    own = tok.decode(greedy[0, -3:])  # the model's own continuation: token accuracy 1 where it re-tokenizes alike
    targets = [own.strip() or "Paris", "Rome", "Saint Petersburg"]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for p in edited.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    for target in targets:
        c = {"case_id": "c", "subject": "France", "prompt": "The capital of {} is", "target_true": "Paris", "target_new": target,
             "paraphrase_prompts": ["France's capital is", "In France, the capital is"],
             "neighborhood_prompts": ["The capital of Germany is", "Spain's capital city is"], "edit_index": 1}
        m = case_metrics(edited, tok, [c], base=(model, tok))[0]
        def acc(p, t):
            a, lab = _easyedit_argmax(edited, tok, p, t)
            return sum(x == y for x, y in zip(a, lab)) / len(lab)
        assert m["rewrite_acc"] == pytest.approx(acc(prompt, target))
        assert m["rephrase_acc"] == pytest.approx(np.mean([acc(p, target) for p in c["paraphrase_prompts"]]))
        agree = []
        for p in c["neighborhood_prompts"]:
            post, _ = _easyedit_argmax(edited, tok, p, "Paris")
            pre, _ = _easyedit_argmax(model, tok, p, "Paris")
            agree.append(np.mean(np.equal(pre, post)))
        assert m["locality"] == pytest.approx(np.mean(agree))
    unedited = case_metrics(model, tok, [c], base="self")[0]
    assert unedited["locality"] == 1.0 and "locality" not in case_metrics(model, tok, [c])[0]
    assert case_metrics(model, tok, [c], base=(model, tok))[0]["locality"] == 1.0
    mine = case_metrics(model, tok, [{**c, "target_new": targets[0]}], base="self")[0]
    assert mine["rewrite_acc"] > 0  # not vacuous: the model's own continuation scores


def test_base_memo_runs_the_unedited_model_once_per_neighbourhood_list_with_the_same_readings():
    """An edit-score job scores its edits one at a time against one unedited view: with
    `base_memo`, the unedited model runs once per distinct neighbourhood list (cases that share a
    relation and a true object share it), and every reading is the un-memoized one, bit for bit."""
    import copy

    model, tok = build_tiny_model("llama")
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for p in edited.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    entered = []

    class CountingView:  # the unedited view, counting how often the job enters it
        def __enter__(self):
            entered.append(1)
            return model, tok

        def __exit__(self, *exc):
            return False

    other = ["The capital of Japan is", "Egypt's capital is"]
    cases = [case(i, target_new=t, neighborhood_prompts=other if i % 3 == 0 else case(0)["neighborhood_prompts"])
             for i, t in zip(range(1, 8), ["Rome", "Oslo", "Lima", "Rome", "Kyiv", "Bern", "Rome"])]
    plain = [score_cases(edited, tok, [c], k=c["edit_index"], base=CountingView()) for c in cases]
    assert len(entered) == len(cases)
    entered.clear()
    memo: dict = {}
    memoized = [score_cases(edited, tok, [c], k=c["edit_index"], base=CountingView(), base_memo=memo) for c in cases]
    assert len(entered) == 2 == len(memo)  # two distinct neighbourhood lists
    for a, b in zip(plain, memoized):
        assert a.equals(b)
    assert set(pl.concat(memoized).filter(pl.col("metric") == "locality")["value"].to_list()) - {1.0}  # not vacuous: the edit moves argmaxes
    # another answer to the same prompts is another list
    score_cases(edited, tok, [case(9, neighborhood_target="Madrid")], k=9, base=CountingView(), base_memo=memo)
    assert len(entered) == 3
