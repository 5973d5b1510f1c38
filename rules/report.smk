# Stage 6 — report: tidy tables (polars), phase detection, altair figures, `snakemake --report`.

import os

from editscale.io import safe_name
from editscale.layout import FIGURES_PAGE, VEGA_BUNDLE

FAMILIES = list(METRIC_REGISTRY)  # one report table per registered metric
FIGURES = wf.report_figures()  # each registered metric's figures, then the overview
TABLES = FAMILIES + ["forgetting", "edit_log", "phases", "disabling_edits", "indicators", "summary"]  # report.tables.build_tables
PER_RUN_FIGURES = [f"overview_{safe_name(run)}" for run in RUNS]  # report.plots.make_plots per_run
# this config's own tables and figures (results/studies/<study>/): two configs never overwrite each
# other's; their runs (results/<run>/) are shared
TABLES_DIR, PLOTS_DIR = wf.study_path(config, "tables"), wf.study_path(config, "plots")


rule report_tables:
    input:
        metrics=wf.all_metric_files(config),
        factors=wf.all_segment_files(config, "factors"),
        deltas=wf.all_segment_files(config, "deltas"),
    output:
        summary=report(
            f"{TABLES_DIR}/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
        tables=expand(f"{TABLES_DIR}/{{table}}.parquet", table=TABLES),
        csv=expand(f"{TABLES_DIR}/{{table}}.csv", table=[t for t in TABLES if t != "summary"]),
    params:
        runs=wf.runs_meta(config),
        out_dir=lambda w, output: os.path.dirname(output.summary),
        # the table and phase settings only: plot smoothing must not re-run the phase bootstrap
        report=wf.canonical_json({k: v for k, v in config["report"].items() if k != "smooth"}),
    log:
        wf.study_path(config, "logs", "report_tables.log"),
    benchmark:
        wf.study_benchmark(config, "report_tables")
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("report_tables"),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} report-tables --runs-json {params.runs:q} --metrics {input.metrics} --factors {input.factors}"
        " --deltas {input.deltas} --out-dir {params.out_dir}"
        " --params-json {params.report:q} 2> {log}"


rule report_plots:
    input:
        rules.report_tables.output.tables,
    output:
        # every figure on one page, vega's scripts once: the report's interactive figures
        page=report(f"{PLOTS_DIR}/{FIGURES_PAGE}", caption="../report/figures.rst", category="Figures (interactive)"),
        png=report(
            expand(f"{PLOTS_DIR}/{{figure}}.png", figure=FIGURES),
            caption="../report/figures.rst",
            category="Figures",
        ),
        phases=report(
            expand(f"{PLOTS_DIR}/{{figure}}.png", figure=PER_RUN_FIGURES),
            caption="../report/phases.rst",
            category="Phases",
        ),
        # each figure's own page loads the folder's one vega bundle
        html=expand(f"{PLOTS_DIR}/{{figure}}.html", figure=FIGURES + PER_RUN_FIGURES),
        bundle=f"{PLOTS_DIR}/{VEGA_BUNDLE}",
        svg=expand(f"{PLOTS_DIR}/{{figure}}.svg", figure=FIGURES + PER_RUN_FIGURES),
    params:
        # the figure settings only (editscale.report.plots.FigureOptions)
        report=wf.canonical_json({k: config["report"][k] for k in ("smooth", "norm_z")}),
        out_dir=lambda w, output: os.path.dirname(output.svg[0]),
    log:
        wf.study_path(config, "logs", "report_plots.log"),
    benchmark:
        wf.study_benchmark(config, "report_plots")
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("report_plots"),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} report-plots --tables {input:q} --out-dir {params.out_dir} --params-json {params.report:q} 2> {log}"


# Not part of `all`: `snakemake results/records/<run>.record.tar.xz` finishes one run and writes its
# small mergeable record (editscale.merge), so that a run that ends while nobody watches (the last
# minutes of a sitting, a cluster node) leaves the file to commit or carry to `editscale merge`.
rule run_record:
    input:
        lambda w: wf.run_targets(config, RUNS[w.run]),
    output:
        wf.record_file("{run}"),
    params:
        configfile=lambda w: wf.single_configfile(CONFIG_PATHS),
        out_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        "results/logs/{run}/run_record.log",
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("run_record"),
        runtime=10,
    conda:
        ENV
    shell:
        "editscale export-run --configfile {params.configfile:q} --run {wildcards.run} --out {params.out_dir} --pack 2> {log}"
