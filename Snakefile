# editscale: sequential knowledge editing at scale. Stages are cached files; see ../shared/DESIGN.md
# and README.md. Rules are thin: each calls one `editscale` command; the logic is in src/editscale.
import json

from snakemake.utils import min_version, validate

from editscale import workflow as wf
from editscale.io import EditscaleError

min_version("8.0")


# config.yaml is the default study; `--configfile other.yaml` replaces it (not merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



validate(config, "config/schema.yaml", set_default=True)
try:
    wf.check_config(config)
except EditscaleError as exc:
    raise ValueError(f"config error: {exc}") from None

RUNS = {run["name"]: run for run in config["runs"]}
METRICS = config["metrics"]
ENV = "../envs/editscale.yaml"  # relative to rules/*.smk, where it is used


wildcard_constraints:
    run="|".join(RUNS) or "NONE",
    k=r"\d{6}",
    model=r"[^/]+",
    corpus=r"[^/]+",
    dataset=r"[^/]+",
    module=r"[^/]+",


def model_mem_mb(model):
    """Job memory from the model size: the weights in the configured dtype (once, in MB), plus
    half again for activations, optimizer state of v* and the fp32 copies of edited matrices."""
    spec = config["models"][model]
    bytes_per = 4 if spec["dtype"] == "float32" else 2
    return int(2000 + 1.5 * spec["params_m"] * bytes_per)


def gpu_resources():
    return {"slurm_extra": "'--gres=gpu:1'", "gpu": 1} if config["resources"]["gpu"] else {}


include: "rules/model.smk"
include: "rules/data.smk"
include: "rules/stats.smk"
include: "rules/edit.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/audit.smk"


rule all:
    input:
        "results/tables/summary.csv",
        "results/plots/edit_scores.html",
        "results/audit.json",
