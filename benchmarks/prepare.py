"""What every benchmark needs: a prepared model, edit cases, a text corpus, second moments,
hyper-parameters and context templates, built once per harness run (cached under the work dir).

Nothing here is timed; the sections (edit_speed, eval_speed, ...) time their own calls.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from editscale.edit.methods import load_hparams
from editscale.data.geofacts import build_geofacts
from editscale.data.sequence import unique_subjects
from editscale.edit.methods import METHODS, get_method
from editscale.models.fetch import prepare_model
from editscale.models.load import load_model, model_sha
from editscale.stats.mom2 import compute_mom2

log = logging.getLogger("benchmarks")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
METHOD_NAMES = list(METHODS)  # the registry's order

# name -> (source, hparams file stem, statistics tokens)
MODELS = {
    "smollm2": ("embedded:smollm2-135m-instruct", "smollm2-135m", 8192),
    "tiny": ("tiny:gpt2", "tiny", 2048),
}


@dataclass
class Bench:
    """The shared state of one harness run."""

    name: str
    model_dir: Path
    work: Path
    threads: int
    model: object = None
    tok: object = None
    sha: str = ""
    cases: list[dict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    stats_tokens: int = 0

    def hparams(self, method: str) -> dict:
        stem = MODELS[self.name][1]
        return load_hparams(REPO / "config" / "hparams" / method / f"{stem}.yaml", method=method)

    def templates(self, hp: dict, method: str = "rome") -> list[list[str]]:
        """Template groups as the workflow samples them for `method` (flatten with templating.flat_templates)."""
        from editscale.edit.chain import templates_record

        return templates_record(self.model, self.tok, method, hp, seed=0)["groups"]

    def fresh_model(self):
        """A model with the base weights (the harness edits it; reloaded per method)."""
        self.model, self.tok = load_model(self.model_dir)
        return self.model

    def editor(self, method: str, hp: dict | None = None):
        """(method object, WeightState) on a freshly loaded model."""
        from editscale.edit.weights import WeightState

        hp = hp or self.hparams(method)
        self.fresh_model()
        cls = get_method(method, hp)
        modules = cls.modules(self.model, hp)
        # every method gets the second moments; one that declares projections (AlphaEdit) derives
        # them from these, as it does when the workflow's cached projection is absent
        stats = {m: self.stats[m] for m in modules if m in self.stats}
        weights = WeightState(self.model, modules)
        return cls(self.model, self.tok, hp, stats, self.templates(hp, method), state=None), weights


def corpus_texts(limit: int = 4000) -> list[str]:
    """Real English sentences for statistics and perplexity-like passes: the SST-2 / CoLA / MRPC
    sentences of ../shared/data/downstream when present, else the geofacts prompts."""
    texts: list[str] = []
    for name in ("sst2.jsonl", "cola.jsonl", "mrpc.jsonl", "rte.jsonl"):
        path = SHARED_DATA / "downstream" / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for key in ("sentence", "sentence1", "sentence2", "premise", "hypothesis"):
                if isinstance(rec.get(key), str):
                    texts.append(rec[key])
    if not texts:
        texts = [c["prompt"].format(c["subject"]) + " " + c["target_true"] + "." for c in build_geofacts(seed=0)]
    return texts[:limit]


def all_modules(bench: Bench) -> list[str]:
    mods: list[str] = []
    for method in METHOD_NAMES:
        hp = bench.hparams(method)
        mods += get_method(method, hp).modules(bench.model, hp)
    return list(dict.fromkeys(mods))


def prepare(name: str, work: Path, threads: int, model_dir: Path | None = None) -> Bench:
    """Model (re-using data/models/<stem> of a workflow run in this checkout when present),
    cases, corpus texts and second moments of every module any method edits."""
    if name not in MODELS:
        raise SystemExit(f"unknown benchmark model {name!r}: use one of {sorted(MODELS)}")
    source, stem, n_tokens = MODELS[name]
    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        local = REPO / "data" / "models" / stem
        model_dir = local if (local / "manifest.json").exists() else work / "models" / stem
    if not (model_dir / "manifest.json").exists():
        log.info("preparing model %s -> %s", source, model_dir)
        prepare_model(source, model_dir)
    bench = Bench(name=name, model_dir=model_dir, work=work, threads=threads)
    bench.fresh_model()
    bench.sha = model_sha(model_dir)
    bench.cases = unique_subjects(build_geofacts(seed=0))
    random.Random(0).shuffle(bench.cases)  # mix the relations, as a run's edit sequence does
    bench.texts = corpus_texts()

    stats_file = work / f"stats-{stem}-{bench.sha[:12]}-{n_tokens}.pt"
    modules = [m for m in all_modules(bench)]
    if stats_file.exists():
        saved = torch.load(stats_file)
        bench.stats, bench.stats_tokens = saved["stats"], saved["tokens"]
    if set(modules) - set(bench.stats):
        t0 = time.perf_counter()
        res = compute_mom2(bench.model, bench.tok, modules, bench.texts, max_tokens=n_tokens, seq_len=64, batch_size=16, progress=False)
        bench.stats = {m: torch.from_numpy(mom2) for m, (mom2, _) in res.items()}
        bench.stats_tokens = next(iter(res.values()))[1]
        torch.save({"stats": bench.stats, "tokens": bench.stats_tokens}, stats_file)
        log.info("second moments of %d modules over %d tokens in %.1f s", len(modules), bench.stats_tokens, time.perf_counter() - t0)
    return bench
