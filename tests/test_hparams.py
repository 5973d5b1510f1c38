"""Typed hyper-parameters: built once, as the method's dataclass, with every problem of a file in
one error; the method reads attributes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from editscale.edit.methods import get_method
from editscale.io import EditscaleError


def test_every_problem_of_a_file_is_one_error(tmp_path, repo_root):
    """Three mistakes, one `snakemake -n`: the error lists them all, each naming the file."""
    from editscale.workflow import run_hparams

    hp = yaml.safe_load((repo_root / "config/hparams/rome/tiny.yaml").read_text())
    hp.update(v_lrr=0.5, kl_factor="big", clamp_norm_factor=-1)
    hp.pop("v_num_grad_steps")
    path = tmp_path / "rome.yaml"
    path.write_text(yaml.safe_dump(hp))
    with pytest.raises(EditscaleError) as exc:
        run_hparams({"name": "r", "method": "rome", "hparams": str(path)})
    msg = str(exc.value)
    assert "(4 problems)" in msg and msg.count(str(path)) == 4
    for part in ("unknown key 'v_lrr'", "did you mean 'v_lr'", "missing required key(s) ['v_num_grad_steps']",
                 "'kl_factor' must be a number, got 'big'", "'clamp_norm_factor' = -1 must be >= 0"):
        assert part in msg, part


def test_the_plan_builds_the_methods_dataclass_and_run_json_records_it(repo_root):
    """run_hparams (what run.json records) is the method's dataclass, built at plan time, as a
    mapping plus what the method forces; the method is handed it and reads attributes."""
    from editscale.workflow import run_hparams

    for method in ("rome", "r-rome", "memit", "ft-c"):
        resolved = run_hparams({"name": "r", "method": method, "hparams": str(repo_root / f"config/hparams/{method}/tiny.yaml")})
        cls = get_method(method, resolved)
        typed = cls.resolve_hparams(resolved, "test")
        assert isinstance(typed, cls.hparams_type)
        assert {**dataclasses.asdict(typed), **cls.forced_hparams} == resolved


def test_a_method_reads_typed_attributes(tiny_model_dirs, repo_root):
    from editscale.models.load import load_model

    model, tok = load_model(tiny_model_dirs("gpt2"))
    hp = yaml.safe_load((repo_root / "config/hparams/r-rome/tiny.yaml").read_text())
    method = get_method("r-rome")(model, tok, hp, {}, [["{}"]])
    assert isinstance(method.hp, get_method("r-rome").hparams_type) and method.hp.v_lr == hp["v_lr"]
    assert method.key_averaging == "templates" and method.hparams["key_averaging"] == "templates"  # forced by r-ROME
    with pytest.raises(AttributeError):
        method.hp.key_averaging  # noqa: B018 - r-ROME's files have no such key; the method decides it
