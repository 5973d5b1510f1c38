# editscale: sequential knowledge editing at scale. Stages are cached files; see ../shared/DESIGN.md
# and README.md. Rules are thin: each calls one `editscale` command; the logic is in src/editscale.
import sys

from snakemake.utils import min_version

from editscale import workflow as wf
from editscale.io import EditscaleError
from editscale.memory import MemoryPlan, check_memory

min_version("8.0")

# `snakemake --report` opens on this overview of the study (runs, grids, where the onsets are)
report: "report/workflow.rst"


# config.yaml is the default study; `--configfile other.yaml` replaces it (not merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



try:
    # config/schema.yaml (editscale/schema.yaml) + the sections of the config's plugins; fills in
    # the defaults and cross-checks (the same as every verb's editscale.workflow.load_config)
    CONFIG_PATHS = list(workflow.overwrite_configfiles or ["config.yaml"])
    CONFIGFILES = ", ".join(map(str, CONFIG_PATHS))
    wf.prepare(config, CONFIGFILES)
except EditscaleError as exc:
    raise ValueError(f"config error: {exc}") from None
wf.export_job_environment(config)  # every job: the same plugins, n_edits, device
# each rule's mem_mb: the predicted peak RSS of its jobs (editscale.memory), computed on first use
MEMORY = MemoryPlan(config)
if workflow.is_main_process:  # the plan, not every job that re-reads the Snakefile (cluster jobs)
    from editscale.io import Problems

    plan_problems = Problems()  # every plan-time problem in one error
    with plan_problems.check():
        # a run longer than its usable edit sequence fails here, not at the segment that runs out
        wf.check_sequence_lengths(config)
    with plan_problems.check():
        # every data file a metric names (downstream task files) exists: no rule makes them
        wf.check_data_files(config)
    with plan_problems.check():
        # every job's predicted peak memory against resources.mem_mb / gpu_mem_gb (when set)
        check_memory(config, memories=MEMORY.jobs)
    try:
        plan_problems.raise_all()
    except EditscaleError as exc:
        raise ValueError(f"config error: {exc}") from None
METRIC_REGISTRY = wf.metrics_registry()

RUNS = {run["name"]: run for run in config["runs"]}
# every rule's conda environment: envs/editscale.yaml with editscale installed from this workflow's
# directory and the extras of the config's metrics (editscale.workflow.conda_env)
ENV = str(wf.write_conda_env(config, workflow.basedir))


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
        rules.report_tables.output.summary,
        rules.report_plots.output,
        rules.audit.output,
        # every audited file is a target too: Snakemake does not rebuild a deleted intermediate file
        # whose consumers are up to date, and a deleted delta, factors or stats file must be repaired
        wf.audit_files(config),


if workflow.is_main_process and wf.report_requested(sys.argv):
    try:
        # `snakemake --report` renders the files of this config's DAG: with another config than the
        # run's, or before the run finished, it would warn once per missing file and mix runs
        wf.check_report_ready([*rules.report_tables.output, *rules.report_plots.output], CONFIGFILES)
    except EditscaleError as exc:
        raise ValueError(f"report error: {exc}") from None
