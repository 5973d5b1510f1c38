"""envs/editscale.yaml stays in step with the package (conda channels are unreachable here, so
`--use-conda` cannot run in CI; this checks the file instead)."""

from __future__ import annotations

import re
import tomllib

import yaml


def test_conda_env_matches_pyproject(repo_root):
    env = yaml.safe_load((repo_root / "envs/editscale.yaml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    names = {re.split(r"[<>=\[ ]", p)[0].lower() for p in pip if not p.startswith("-")}
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert required <= names, f"missing from envs/editscale.yaml: {sorted(required - names)}"
    assert "torch==2.13.0" in pip  # the CPU wheel the setup installs; no CUDA pull on CPU machines
    assert any(p.startswith("-e ") for p in pip)  # editscale itself, so rules find `editscale`


def test_every_rule_runs_in_the_env(repo_root):
    for smk in sorted((repo_root / "rules").glob("*.smk")):
        text = smk.read_text()
        rules = re.findall(r"^\s*rule(?:\s+\w+)?:", text, flags=re.M)
        assert rules, smk
        assert text.count("conda:") == len(rules), f"{smk.name}: every rule needs conda: ENV"


def test_make_setup_installs_the_torch_build_asked_for(repo_root):
    """PyPI's Linux torch wheel is the CUDA build: `make setup` takes the CPU index unless told
    otherwise, and refuses a variant it does not know (make -n: the commands, nothing run)."""
    import subprocess

    def torch_line(*variables):
        res = subprocess.run(["make", "-n", "setup", *variables], cwd=repo_root, capture_output=True, text=True)
        return res.returncode, next((line for line in res.stdout.splitlines() if "pip install" in line and "torch==" in line), res.stderr)

    assert torch_line() == (0, ".venv/bin/pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    assert torch_line("TORCH=cuda") == (0, ".venv/bin/pip install --quiet torch==2.13.0")
    url = "https://download.pytorch.org/whl/cu126"
    assert torch_line("TORCH=cuda", f"TORCH_INDEX_URL={url}")[1].endswith(f"--index-url {url}")
    rc, err = torch_line("TORCH=rocm")
    assert rc != 0 and "TORCH must be cpu or cuda" in err


def test_the_rules_environment_installs_editscale_from_the_workflow_with_the_configs_extras(repo_root, tmp_path, plugin_metric):
    """Snakemake copies a rule's env file under .snakemake/conda/, where the template's `-e ../`
    names the wrong directory: the Snakefile renders it with the workflow's absolute path and the
    extras of the config's metrics, and pip installs editscale from that line."""
    import subprocess
    import sys

    from benchmarks.snakemake_runs import copy_workflow, snakemake
    from editscale.workflow import conda_env, load_config

    wd = copy_workflow(repo_root, tmp_path / "wf")
    snakemake(wd, "-n")
    rendered = yaml.safe_load((wd / ".snakemake/editscale/conda-env.yaml").read_text())
    pip = next(d["pip"] for d in rendered["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert [p for p in pip if p.startswith("-e ")] == [f"-e {wd.resolve()}"]
    template = yaml.safe_load((repo_root / "envs/editscale.yaml").read_text())
    assert [d for d in rendered["dependencies"] if not isinstance(d, dict)] == [d for d in template["dependencies"] if not isinstance(d, dict)]
    with plugin_metric("editscale.evaluate.harness", "lm_eval"):
        config = load_config(repo_root / "config/test-tiny.yaml")
        config["metrics"]["lm_eval"] = {"tasks": {"editscale_sst2": {"limit": 4}}}
        line = next(line.strip() for line in conda_env(config, repo_root).splitlines() if line.strip().startswith("- -e "))
    assert line == f"- -e {repo_root.resolve()}[lm-eval]"  # the plugin metric's extra
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", *line[2:].split(" ", 1)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Would install editscale" in res.stdout, res.stderr[-2000:]
