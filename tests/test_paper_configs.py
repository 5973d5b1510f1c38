"""The study's configurations (config/paper/*.yaml), the download rule, the converter of the ROME
authors' precomputed statistics, and the storage numbers `editscale doctor` prints.

The paper configs are only planned here (`snakemake -n`, no network: the DAG is built from the
`arch` key and the published configs before anything is downloaded).
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from editscale.data.download import KNOWN_FILES, download
from editscale.io import EditscaleError, sha256_file
from editscale.models.registry import known_config, module_shapes
from editscale.models.load import model_sha
from editscale.stats.convert import convert_rome_stats, module_from_filename, read_rome_npz, rome_stats_url
from editscale.stats.mom2 import read_stats
from editscale.workflow import edited_modules, stats_modules
from benchmarks.snakemake_runs import copy_workflow, planned_jobs, planned_metric_files, put_downstream_files, snakemake

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "config" / "paper").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data"
EXPECTED = {  # the study's settings per file
    "rome-gpt2-xl.yaml": ("hf:gpt2-xl", "gpt2", 1200, (1600, 6400), 1),
    "memit-gpt2-xl.yaml": ("hf:gpt2-xl", "gpt2", 2000, (1600, 6400), 5),
    "rome-gpt-j-6B.yaml": ("hf:EleutherAI/gpt-j-6B", "gptj", 1200, (4096, 16384), 1),
    "memit-gpt-j-6B.yaml": ("hf:EleutherAI/gpt-j-6B", "gptj", 2000, (4096, 16384), 6),
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_paper_config_is_covered():
    assert sorted(p.name for p in PAPER) == sorted(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_holds_the_study_settings(path):
    cfg = load(path)
    source, arch, n_edits, shape, n_modules = EXPECTED[path.name]
    (model,) = cfg["models"].values()
    assert model["source"] == source and model["arch"] == arch and model["dtype"] == "float32"
    (ds,) = cfg["datasets"].values()
    assert ds["reader"] == "counterfact" and ds["url"] == "https://rome.baulab.info/data/dsets/counterfact.json"
    assert ds["path"] == "data/downloads/counterfact.json"
    assert ds["order_file"] == "data/downloads/paper_samples_unique_10_20391.json"
    (corpus,) = cfg["corpora"].values()
    assert corpus["kind"] == "hf_dataset" and "wikipedia" in corpus["name"]
    for run in cfg["runs"]:
        assert run["n_edits"] == n_edits and run["segment"] == 20 and run["sample"] in range(10)
        assert (REPO / run["hparams"]).exists()
        assert run["hparams"] == f"config/hparams/{run['method']}/{path.stem.split('-', 1)[1]}.yaml"
    m = cfg["metrics"]
    assert m["downstream"]["eval_every"] == 5 and m["history"]["eval_every"] == 20
    assert sorted(m["downstream"]["tasks"]) == ["cola", "mrpc", "rte", "sst2"]
    for name, task in m["downstream"]["tasks"].items():
        assert task["path"] == f"data/downstream/{name}.jsonl"
        assert (SHARED / "downstream" / f"{name}.jsonl").exists()  # the same files, for users: docs/scale.md
    assert cfg["resources"]["gpu"] is True


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_hparams_layers_name_existing_modules(path):
    """The edited module names from the registry templates exist in the real architecture, with the
    study's shapes (meta-device model from the published config: no weights)."""
    cfg = load(path)
    source, arch, _, shape, n_modules = EXPECTED[path.name]
    run = {**cfg["runs"][0], "hparams": str(REPO / cfg["runs"][0]["hparams"])}
    mods = edited_modules(cfg, run)
    assert len(mods) == n_modules and stats_modules(cfg, run) == mods
    shapes = module_shapes(known_config(source), mods)
    assert set(shapes.values()) == {shape}


@pytest.mark.parametrize("path", PAPER[:1], ids=lambda p: p.name)
def test_downstream_tasks_load_the_study_subsets(path):
    """The GLUE tasks of the paper configs build from the study's files (here the shared copies):
    every record but the few-shot examples is evaluated, 3 new tokens, no extra probes."""
    from editscale.evaluate.downstream import build_tasks, task_config

    cfg = load(path)["metrics"]["downstream"]
    for task in cfg["tasks"].values():
        task["path"] = task["path"].replace("data/downstream", str(SHARED / "downstream"))
    tasks = {t.name: t for t in build_tasks(task_config(cfg))}
    sizes = {"sst2": (856, 4), "mrpc": (258, 6), "cola": (644, 6), "rte": (262, 3)}
    assert set(tasks) == set(sizes)
    for name, (n, shots) in sizes.items():
        assert len(tasks[name].items) == n - shots and tasks[name].meta["n_shots"] == shots
        assert tasks[name].max_new_tokens == 3


def test_order_file_is_the_studys_index():
    name = "paper_samples_unique_10_20391.json"
    url, sha = KNOWN_FILES[name]
    assert "counterfact_sampled_unique_10_20391.json" in url
    assert sha256_file(SHARED / "counterfact" / name) == sha


@pytest.fixture(scope="module")
def workflow_copy(repo_root, tmp_path_factory):
    """A user's checkout with the downstream files put in place as docs/scale.md says."""
    work = copy_workflow(repo_root, tmp_path_factory.mktemp("paper"))
    put_downstream_files(work)
    return work


@pytest.mark.workflow
def test_a_paper_config_without_its_downstream_files_fails_at_the_dry_run(repo_root, tmp_path):
    """No rule makes the GLUE task files: `snakemake -n` names each missing one, its config key and
    where the docs say how to get it, instead of a job failing hours into the run."""
    wd = copy_workflow(repo_root, tmp_path / "wf")
    res = snakemake(wd, "-n", config="config/paper/rome-gpt2-xl.yaml", check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "4 problems:" in text, text[-3000:]
    for name in ("sst2", "mrpc", "cola", "rte"):
        assert f"metrics.downstream.tasks.{name}.path = data/downstream/{name}.jsonl: no such file, and no rule makes it" in text
    assert 'docs/scale.md, "Downstream files"' in text


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_config_plans_offline(workflow_copy, path):
    cfg = load(path)
    res = snakemake(workflow_copy, "-n", config=f"config/paper/{path.name}")
    jobs = planned_jobs(res)
    runs = cfg["runs"]
    assert jobs["edit_segment"] == sum(r["n_edits"] // r["segment"] for r in runs)
    assert jobs["edit_scores"] == jobs["edit_segment"]
    assert len(planned_metric_files(res, "downstream")) == sum(r["n_edits"] // 5 + 1 for r in runs)
    assert len(planned_metric_files(res, "history")) == sum(r["n_edits"] // 20 + 1 for r in runs)
    assert jobs["download"] == 2  # counterfact.json and the sample index
    assert jobs["stats"] == EXPECTED[path.name][4]
    for rule in ("model", "dataset", "sequence", "corpus_tokens", "report_tables", "audit"):
        assert jobs[rule] == 1, rule
    text = res.stdout + res.stderr
    assert "download --url https://rome.baulab.info/data/dsets/counterfact.json --out data/downloads/counterfact.json" in text
    assert f"--sha256 {KNOWN_FILES['paper_samples_unique_10_20391.json'][1]}" in text
    assert "--order-file data/downloads/paper_samples_unique_10_20391.json" in text


@pytest.mark.workflow
def test_dataset_url_path_outside_downloads_is_a_config_error(workflow_copy, tmp_path):
    wd = copy_workflow(REPO, tmp_path / "wf")
    cfg = load(wd / "config" / "paper" / "rome-gpt2-xl.yaml")
    cfg["datasets"]["counterfact"]["path"] = "elsewhere/counterfact.json"
    (wd / "config" / "bad.yaml").write_text(yaml.safe_dump(cfg))
    res = snakemake(wd, "-n", config="config/bad.yaml", check=False)
    assert res.returncode != 0
    assert "datasets.counterfact has a url, so its path must be a file directly under data/downloads/" in res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.workflow
def test_download_dataset_and_paper_order_through_snakemake(repo_root, tmp_path):
    """A dataset with a `url` goes download -> dataset -> sequence, and the sequence follows the
    study's order file (here: original-format CounterFact records rebuilt from the EasyEdit split,
    served from a file:// URL)."""
    records = json.loads((SHARED / "counterfact" / "counterfact-train.json").read_text())[:400]
    original = [
        {
            "case_id": r["case_id"],
            "requested_rewrite": {"prompt": r["prompt"].replace(r["subject"], "{}", 1), "subject": r["subject"],
                                  "relation_id": "P0", "target_new": {"str": r["target_new"]},
                                  "target_true": {"str": r["ground_truth"]}},
            "paraphrase_prompts": [r["rephrase_prompt"]], "neighborhood_prompts": [r["locality_prompt"]],
            "attribute_prompts": [], "generation_prompts": [],
        }
        for r in records if r["prompt"].count(r["subject"]) == 1 and "{" not in r["prompt"] and "}" not in r["prompt"]
    ]
    src = tmp_path / "served" / "counterfact.json"
    src.parent.mkdir()
    src.write_text(json.dumps(original))
    wd = copy_workflow(repo_root, tmp_path / "wf")
    order = SHARED / "counterfact" / "paper_samples_unique_10_20391.json"
    cfg = load(wd / "config" / "test-tiny.yaml")
    cfg["datasets"] = {"cf": {"reader": "counterfact", "url": src.as_uri(), "order_file": str(order)}}
    cfg["runs"][0]["dataset"] = "cf"
    (wd / "config" / "test-tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(wd, "-n", "results/rome-tiny/edits.jsonl"))
    assert jobs == {"download": 1, "dataset": 1, "sequence": 1}
    snakemake(wd, "-p", "results/rome-tiny/edits.jsonl")
    assert (wd / "data" / "downloads" / "counterfact.json").read_bytes() == src.read_bytes()
    edits = [json.loads(line) for line in (wd / "results" / "rome-tiny" / "edits.jsonl").read_text().splitlines()]
    present = {str(r["case_id"]) for r in original}
    expected = [i for i in map(str, json.loads(order.read_text())["0"]) if i in present]
    assert [e["case_id"] for e in edits[:20]] == expected[:20]


# ---------------------------------------------------------------------------------------------
# editscale download


def test_download_file_url_checks_sha(tmp_path):
    src = tmp_path / "src.json"
    src.write_text('{"0": [1, 2, 3]}')
    sha = sha256_file(src)
    out = tmp_path / "data" / "downloads" / "x.json"
    assert download(src.as_uri(), out, sha256=sha) == sha
    assert out.read_text() == src.read_text()
    bad = tmp_path / "data" / "downloads" / "y.json"
    with pytest.raises(EditscaleError, match="expected 0{64}"):
        download(src.as_uri(), bad, sha256="0" * 64)
    assert not bad.exists() and not list(bad.parent.glob(".y.json*"))


def test_download_over_http(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "f.txt").write_text("hello\n" * 1000)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "srv"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f.txt"
        out = tmp_path / "out" / "f.txt"
        download(url, out)
        assert out.read_text() == "hello\n" * 1000
        with pytest.raises(EditscaleError, match=r"cannot download .*/missing.txt: HTTP 404"):
            download(url.replace("f.txt", "missing.txt"), tmp_path / "out" / "m.txt")
    finally:
        server.shutdown()
        server.server_close()


def test_download_offline_error_names_url_and_target(tmp_path):
    url = "http://127.0.0.1:9/counterfact.json"  # discard port: connection refused, as offline
    out = tmp_path / "data" / "downloads" / "counterfact.json"
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "download", "--url", url, "--out", str(out), "--timeout", "5"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert f"cannot download {url}" in res.stderr and f"place it at {out}" in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# ROME's precomputed statistics -> editscale HDF5


def write_rome_npz(path: Path, feats: np.ndarray, sample_size=100_000) -> np.ndarray:
    """A file in exactly the layout of kmeng01/rome util/runningstats.py: `tally` saves
    CombinedStat(mom2=SecondMoment()).state_dict() plus {"sample_size": N} with numpy.savez; the
    running sum is accumulated in the collection precision (float32)."""
    total = np.zeros((feats.shape[1], feats.shape[1]), dtype=np.float32)
    for i in range(0, len(feats), 100):  # batches, as SecondMoment.add does
        a = feats[i:i + 100]
        total += a.T @ a
    dat = {
        "mom2.constructor": "util.runningstats.SecondMoment()",
        "mom2.count": len(feats),
        "mom2.mom2": total,
        "sample_size": sample_size,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **dat)
    return total


@pytest.fixture()
def rome_npz(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1000, 256)).astype(np.float32) * rng.uniform(0.1, 2.0, 256).astype(np.float32)
    path = tmp_path / "gpt2-xl" / "wikipedia_stats" / "transformer.h.1.mlp.c_proj_float32_mom2_100000.npz"
    write_rome_npz(path, feats)
    return path, feats


def test_rome_stats_url_and_file_name():
    assert rome_stats_url("gpt2-xl", "transformer.h.17.mlp.c_proj") == (
        "https://rome.baulab.info/data/stats/gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz")
    assert rome_stats_url("EleutherAI/gpt-j-6B", "transformer.h.5.mlp.fc_out").startswith(
        "https://rome.baulab.info/data/stats/EleutherAI_gpt-j-6B/wikipedia_stats/transformer.h.5.mlp.fc_out_float32")
    assert module_from_filename("transformer.h.17.mlp.c_proj_float32_mom2_100000.npz") == "transformer.h.17.mlp.c_proj"
    assert module_from_filename("transformer.h.5.mlp.fc_out_float64_mom2.npz") == "transformer.h.5.mlp.fc_out"
    assert module_from_filename("stats.npz") is None


def test_read_rome_npz_layout(rome_npz):
    path, feats = rome_npz
    stat = read_rome_npz(path)
    assert stat["prefix"] == "mom2." and stat["count"] == 1000 and stat["sample_size"] == 100_000
    assert stat["sum"].dtype == np.float32 and stat["constructor"].endswith("SecondMoment()")


def test_convert_rome_stats(rome_npz, tiny_model_dirs, tmp_path):
    path, feats = rome_npz
    model_dir = tiny_model_dirs("gpt2")
    out = tmp_path / "results" / "stats" / "tiny-gpt2" / "rome" / "transformer.h.1.mlp.c_proj.h5"
    info = convert_rome_stats(path, model_dir, out)  # module from the file name
    assert info["module"] == "transformer.h.1.mlp.c_proj" and info["count"] == 1000 and info["dim"] == 256
    mom2, count, attrs = read_stats(out, expected_model_sha=model_sha(model_dir))
    expected = feats.astype(np.float64).T @ feats.astype(np.float64) / len(feats)
    assert mom2.dtype == np.float64 and count == 1000
    np.testing.assert_allclose(mom2, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.array_equal(mom2, mom2.T)
    assert attrs["module"] == "transformer.h.1.mlp.c_proj" and attrs["token_count"] == 1000
    assert attrs["dtype"] == "float32" and '"kind": "rome_npz"' in attrs["corpus_spec"]
    # The edit code reads it like any stats file.
    from editscale.edit.chain import load_precomputed

    module = "transformer.h.1.mlp.c_proj"
    C = load_precomputed({"mom2": {module: str(out)}}, [module], model_sha(model_dir), "cpu")["stats"][module]
    assert tuple(C.shape) == (256, 256)


def test_convert_rejects_other_model_and_bad_files(rome_npz, tiny_model_dirs, tmp_path):
    path, _ = rome_npz
    with pytest.raises(EditscaleError, match=r"256 x 256 but the input of model.layers.1.mlp.down_proj .* has dimension 128"):
        convert_rome_stats(path, tiny_model_dirs("llama"), tmp_path / "x.h5", module="model.layers.1.mlp.down_proj")
    with pytest.raises(EditscaleError, match="does not exist in GPT2LMHeadModel"):
        convert_rome_stats(path, tiny_model_dirs("gpt2"), tmp_path / "x.h5", module="transformer.h.1.mlp.fc_out")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(EditscaleError, match=r"expected keys 'mom2.mom2' and 'mom2.count'.*keys: \['mean'\]"):
        read_rome_npz(bad)
    assert not (tmp_path / "x.h5").exists()


def test_convert_stats_cli(rome_npz, tiny_model_dirs, tmp_path):
    path, _ = rome_npz
    out = tmp_path / "c.h5"
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "convert-stats", "--npz", str(path), "--model-dir",
                          str(tiny_model_dirs("gpt2")), "--out", str(out), "--source-url", "https://example.org/x.npz"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert '"count": 1000' in res.stdout and out.exists()
    assert "https://example.org/x.npz" in read_stats(out)[2]["corpus_spec"]


@pytest.mark.slow
@pytest.mark.workflow
def test_converted_stats_replace_the_stats_job(repo_root, tmp_path):
    """docs/scale.md: build the model and corpus, convert the published file into the stats path,
    and the workflow uses it (no `stats` job is planned)."""
    wd = copy_workflow(repo_root, tmp_path / "wf")
    # ("-p" ends --configfile's list of files, so that the targets are targets)
    snakemake(wd, "-p", "data/corpora/tiny-gpt2/self-sample/stats.npy", "data/corpora/tiny-gpt2/self-sample/heldout.npy")
    module = "transformer.h.1.mlp.c_proj"
    assert planned_jobs(snakemake(wd, "-n"))["stats"] == 1
    npz = tmp_path / f"{module}_float32_mom2_100000.npz"
    write_rome_npz(npz, np.random.default_rng(1).standard_normal((500, 256)).astype(np.float32))
    bindir = Path(sys.executable).parent
    res = subprocess.run([str(bindir / "editscale"), "convert-stats", "--npz", str(npz), "--model-dir", "data/models/tiny-gpt2",
                          "--out", f"results/stats/tiny-gpt2/self-sample/{module}.h5"], cwd=wd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    jobs = planned_jobs(snakemake(wd, "-n"))
    assert "stats" not in jobs and "corpus_tokens" not in jobs and "model" not in jobs
    assert jobs["edit_segment"] == 2


# ---------------------------------------------------------------------------------------------
# editscale doctor: storage numbers from the shapes


@pytest.mark.slow
def test_doctor_cli_prints_storage_numbers(repo_root, tmp_path):
    bindir = Path(sys.executable).parent
    out = {}
    for name in ("rome-gpt2-xl", "memit-gpt-j-6B"):
        res = subprocess.run([str(bindir / "editscale"), "doctor", "--configfile", str(repo_root / f"config/paper/{name}.yaml"),
                              "--storage-only"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        out[name] = res.stdout
    # gpt2-xl c_proj 1600 x 6400: 4 (1600 + 6400) B = 32 kB per edit, 20 edits per checkpoint;
    # dense 4 x 1600 x 6400 = 40.96 MB; the study saves 1,557,611,200 fp32 parameters every 20 edits.
    row = "| rome-gpt2-xl-cf-s0 | gpt2-xl | rome | 1 x 1600x6400 | 1200 | 60 | 640.00 kB | 40.96 MB | 6.23 GB | 38.40 MB | 2.46 GB | 373.83 GB |"
    assert row in out["rome-gpt2-xl"]
    # gpt-j fc_out 4096 x 16384 at 6 layers: 6 x 4 (4096 + 16384) x 20 = 9.83 MB; 6 x 268.4 MB dense;
    # 6,050,882,784 fp32 parameters = 24.20 GB per save, 100 saves.
    row = "| memit-gpt-j-6B-cf-s0 | gpt-j-6B | memit | 6 x 4096x16384 | 2000 | 100 | 9.83 MB | 1.61 GB | 24.20 GB | 983.04 MB | 161.06 GB | 2.42 TB |"
    assert row in out["memit-gpt-j-6B"]
    assert "shapes from published config" in out["rome-gpt2-xl"]


def test_doctor_storage_json_is_exact(repo_root, tmp_path):
    from editscale.doctor import doctor

    rep = doctor(repo_root / "config/paper/rome-gpt-j-6B.yaml", storage_only=True, root=tmp_path)
    (est,) = rep["runs"]
    st = est["storage"]
    assert est["params"] == 6_050_882_784
    assert st["factor_bytes_per_edit"] == 4 * (4096 + 16384)
    assert st["delta_per_checkpoint"] == 4 * 4096 * 16384
    assert st["study_per_save"] == 4 * 6_050_882_784 and st["study_saves"] == 60
    assert st["stats_bytes"] == 8 * 16384**2
