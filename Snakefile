# editscale: sequential knowledge editing at scale. Stages are cached files; see ../shared/DESIGN.md
# and README.md. Rules are thin: each calls one `editscale` command; the logic is in src/editscale.
from snakemake.utils import min_version

from editscale import workflow as wf
from editscale.config import prepare as prepare_config
from editscale.io import EditscaleError

min_version("8.0")


# config.yaml is the default study; `--configfile other.yaml` replaces it (not merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



try:
    # config/schema.yaml (editscale/schema.yaml) + the sections of the config's plugins; fills in
    # the defaults and cross-checks (the same as every verb's editscale.config.load_config)
    prepare_config(config, "config")
except EditscaleError as exc:
    raise ValueError(f"config error: {exc}") from None
wf.export_plugins(config)  # every job imports the same plugins
METRIC_REGISTRY = wf.metrics_registry()

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
