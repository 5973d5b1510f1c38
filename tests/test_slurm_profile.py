"""Fast checks of profiles/slurm (no cluster needed; the end-to-end check is
tests/slurm/run_workflow_on_slurm.sh)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
SLURM_SCRIPTS = sorted((REPO / "tests" / "slurm").glob("*.sh"))
ENV_VARS = (
    "EDITSCALE_SLURM_PARTITION",
    "EDITSCALE_SLURM_ACCOUNT",
    "EDITSCALE_SLURM_MEM_MB",
    "EDITSCALE_SLURM_RUNTIME",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def parse_profile():
    """The profile as Snakemake reads it (YTE template -> CLI-style values)."""
    from snakemake.profiles import ProfileConfigFileParser

    with open(PROFILE) as f:
        return ProfileConfigFileParser().parse(f)


def default_resources(parsed):
    """default-resources evaluated the way Snakemake evaluates CLI resource expressions."""
    from snakemake.resources import Resource, Resources

    resources = Resources.parse(parsed["default-resources"], allow_expressions=True)
    out = {}
    for name, res in resources.items():
        if res.is_evaluable():
            out[name] = Resource.cli_evaluator(
                name, res.raw, wildcards=None, input=None, attempt=1, async_run=None
            )
        else:
            out[name] = res.value
    return out


def test_profile_is_valid_yaml():
    doc = yaml.safe_load(PROFILE.read_text())
    assert isinstance(doc, dict)
    assert doc["executor"] == "slurm"
    assert doc.get("__use_yte__") is True


def test_profile_core_settings(clean_env):
    parsed = parse_profile()
    assert parsed["executor"] == "slurm"
    assert int(parsed["jobs"]) >= 1
    assert int(parsed["retries"]) == 0
    assert parsed["rerun-incomplete"] == "True"
    assert parsed["printshellcmds"] == "True"
    assert int(parsed["latency-wait"]) > 0


def test_default_resources_without_env(clean_env):
    res = default_resources(parse_profile())
    assert res["mem_mb"] == 4000
    assert res["runtime"] == 120
    # unset: no key, so the plugin uses the cluster's default partition and no -A
    assert "slurm_partition" not in res
    assert "slurm_account" not in res


def test_partition_and_account_from_env(clean_env):
    # "all" would evaluate to the Python builtin if the profile did not quote it
    clean_env.setenv("EDITSCALE_SLURM_PARTITION", "all")
    clean_env.setenv("EDITSCALE_SLURM_ACCOUNT", "lab-42")
    clean_env.setenv("EDITSCALE_SLURM_MEM_MB", "1234")
    clean_env.setenv("EDITSCALE_SLURM_RUNTIME", "7")
    res = default_resources(parse_profile())
    assert res["slurm_partition"] == "all"
    assert res["slurm_account"] == "lab-42"
    assert res["mem_mb"] == 1234
    assert res["runtime"] == 7


def test_empty_env_counts_as_unset(clean_env):
    clean_env.setenv("EDITSCALE_SLURM_PARTITION", "  ")
    res = default_resources(parse_profile())
    assert "slurm_partition" not in res


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_cluster_scripts_are_valid_bash(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
