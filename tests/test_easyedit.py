"""`editscale hparams import-easyedit`: EasyEdit hparams files -> editscale hparams files.

The fixtures: tests/data/easyedit/*.yaml are editscale's own files with the keys of EasyEdit's
hparams/{ROME,MEMIT,AlphaEdit}/*.yaml (zjunlp/EasyEdit), layers scaled to the tiny GPT-2;
tests/data/easyedit/real/ holds EasyEdit's own files, byte for byte (its README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.snakemake_runs import copy_workflow, planned_jobs, set_config, snakemake
from editscale.edit.easyedit import convert, method_for
from editscale.edit.methods import load_hparams
from editscale.io import EditscaleError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "easyedit"
EDITSCALE = str(Path(sys.executable).parent / "editscale")


@pytest.mark.slow
def test_imported_rome_memit_alphaedit_files_round_trip_into_runs_that_plan(tmp_path):
    work = copy_workflow(REPO, tmp_path / "wf")
    runs = []
    for alg, method in (("ROME", "rome"), ("MEMIT", "memit"), ("AlphaEdit", "alphaedit")):
        src = FIXTURES / f"{alg}-tiny-gpt2.yaml"
        res = subprocess.run([EDITSCALE, "hparams", "import-easyedit", str(src), "--out", f"config/hparams/{method}/ee-tiny.yaml"],
                             cwd=work, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert f"EasyEdit {alg} -> editscale {method}, architecture gpt2" in res.stderr
        for key in ("model_name", "stats_dir", "device", "mom2_dataset", "mom2_n_samples", "attn_module_tmp"):
            assert f"dropped {key} (" in res.stderr  # with the file's value
        original = yaml.safe_load(src.read_text())
        hp = load_hparams(work / f"config/hparams/{method}/ee-tiny.yaml")  # validated as any hparams file
        assert hp["v_lr"] == 0.5 and isinstance(hp["v_lr"], float)  # EasyEdit's 5e-1 (YAML 1.1 text)
        assert hp["layers"] == original["layers"] and hp["kl_factor"] == original["kl_factor"]
        assert not {"alg_name", "rewrite_module_tmp", "model_name"} & set(hp)
        runs.append({"name": f"{method}-ee", "model": "tiny-gpt2", "method": method, "hparams": f"config/hparams/{method}/ee-tiny.yaml",
                     "dataset": "geofacts", "corpus": "self-sample", "n_edits": 6, "segment": 3})
    set_config(work, lambda cfg: cfg.update(runs=runs))
    jobs = planned_jobs(snakemake(work, "-n"))
    assert jobs["run_config"] == 3 and jobs["edit_segment"] == 6, jobs
    assert "nullspace" in " ".join(jobs)  # AlphaEdit's projection planned as a stats-stage output


def _write(tmp_path, name, data) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_import_names_every_key_it_drops_or_cannot_map(tmp_path):
    base = yaml.safe_load((FIXTURES / "MEMIT-tiny-gpt2.yaml").read_text())
    conv = convert(_write(tmp_path, "m.yaml", {**base, "fancy_key": 3, "fp16": True}))
    assert conv.method == "memit" and conv.hparams["mom2_update_weight"] == 100
    assert conv.dropped["fancy_key"] == "cannot map: editscale's memit has no hyper-parameter 'fancy_key'"
    assert "dtype" in conv.dropped["fp16"]
    assert "context_template_length_params" in conv.defaults  # EasyEdit's MEMIT files leave it out
    # Llama-family templates name the same modules for every family sharing them
    llama = {**base, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
             "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm",
             "lm_head_module": "lm_head"}
    assert convert(_write(tmp_path, "l.yaml", llama)).architecture.split("/")[0] == "llama"
    with pytest.raises(EditscaleError, match=r"rewrite_module_tmp 'model.layers.\{\}.mlp.fc2' names no edited module"):
        convert(_write(tmp_path, "bad.yaml", {**llama, "rewrite_module_tmp": "model.layers.{}.mlp.fc2"}))
    with pytest.raises(EditscaleError, match=r"ln_f_module 'model.final_norm' is not llama's model.norm"):
        convert(_write(tmp_path, "bad2.yaml", {**llama, "ln_f_module": "model.final_norm"}))
    with pytest.raises(EditscaleError, match=r"alg_name 'GRACE' has no editscale counterpart; importable: .*'MEMIT'.*'ROME'"):
        method_for("GRACE")
    with pytest.raises(EditscaleError, match="'v_lr' must be a number"):
        convert(_write(tmp_path, "v.yaml", {**base, "v_lr": "fast"}))


def test_ultraedit_inner_params_become_layers_and_the_model_check_names_the_layer(tmp_path):
    ultra = {"alg_name": "ULTRAEDIT", "device": 0, "model_name": "your/path/gpt-j-6B", "inner_params":
             [f"transformer.h.{i}.mlp.fc_out" for i in (18, 19, 20)], "lr": "1e-6", "token": "mask", "batch_size": 10,
             "editor_batch_size": 1024, "half": True, "model_parallel": False, "results_dir": "./results"}
    conv = convert(_write(tmp_path, "u.yaml", ultra))
    assert conv.method == "ultraedit" and conv.architecture == "gptj"
    assert conv.hparams == {"layers": [18, 19, 20], "lr": 1e-6, "tuple_size": 10}
    assert conv.renamed["batch_size"] == "tuple_size" and "read nowhere by EasyEdit's UltraEdit" in conv.dropped["token"]
    assert "dropped editor_batch_size (1024): the run's `edits_per_step`" in conv.report()
    with pytest.raises(EditscaleError, match="layers"):
        convert(_write(tmp_path, "u2.yaml", ultra), n_layers=12)


REAL = FIXTURES / "real"
REFUSED = {"ROME/chatglm2-6b.yaml": "ChatGLM / GLM-4 in their remote-code form", "UltraEdit/gemma-3-27b.yaml": "a multimodal model's text tower"}


@pytest.mark.parametrize("rel", sorted(str(p.relative_to(REAL)) for p in REAL.rglob("*.yaml")))
def test_easyedits_own_files_import_or_are_refused_with_the_reason(rel, tmp_path):
    path = REAL / rel
    if rel in REFUSED:
        with pytest.raises(EditscaleError, match=REFUSED[rel]):
            convert(path)
        return
    conv = convert(path)
    assert conv.method == method_for(yaml.safe_load(path.read_text())["alg_name"])
    assert not [k for k, why in conv.dropped.items() if why.startswith("cannot map")], conv.report()  # every key accounted for
    written = tmp_path / "imported.yaml"
    written.write_text(conv.yaml())
    assert load_hparams(written) == conv.hparams  # a valid hparams file, as written
    if rel.startswith("EMMET/"):  # EasyEdit hard-codes EMMET's templates; editscale's default is the reference's
        assert conv.defaults["context_template_length_params"] == [[10, 5]]


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    rrome = yaml.safe_load((REAL / "R-ROME" / "qwen3.5-9b.yaml").read_text())
    bad = {**rrome, "ln_f_module": "model.final_norm", "v_lr": "fast", "enable_prompt_keys": True}
    with pytest.raises(EditscaleError) as err:
        convert(_write(tmp_path, "bad.yaml", bad))
    text = str(err.value)
    assert "cannot import it as editscale's r-rome (3 problems)" in text
    assert "ln_f_module 'model.final_norm' is not" in text and "'v_lr' must be a number" in text
    assert "enable_prompt_keys = True: true reads both keys at the plain prompt" in text
    with pytest.raises(EditscaleError, match="enable_random_prefix_keys = False: .*--method rome"):  # the original ROME
        convert(_write(tmp_path, "orig.yaml", {**rrome, "enable_random_prefix_keys": False, "original_implementation": True}))


def test_the_import_never_overwrites_a_file_without_force(tmp_path):
    work = tmp_path / "wf"
    (work / "config" / "hparams" / "rome").mkdir(parents=True)
    shipped = work / "config" / "hparams" / "rome" / "gpt2-xl.yaml"
    shipped.write_text("# a study's own file\nlayers: [17]\n")

    def run(*extra):
        return subprocess.run([EDITSCALE, "hparams", "import-easyedit", str(REAL / "ROME" / "gpt2-xl.yaml"), *extra],
                              cwd=work, capture_output=True, text=True, timeout=300)

    res = run()  # the README's example, into the shipped file's place
    assert res.returncode != 0 and "exists and differs from the import" in res.stderr and "--force" in res.stderr
    assert "-# a study's own file" in res.stderr and "+# Imported from EasyEdit ROME" in res.stderr  # the diff
    assert shipped.read_text() == "# a study's own file\nlayers: [17]\n"
    assert run("--force").returncode == 0 and shipped.read_text().startswith("# Imported from EasyEdit ROME")
    again = run()
    assert again.returncode == 0 and "already holds this import; unchanged" in again.stderr
