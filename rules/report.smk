# Stage 6 — report: tidy tables (polars), phase detection, altair figures, `snakemake --report`.

from editscale.io import safe_name

FAMILIES = list(METRIC_REGISTRY)  # one report table per registered metric
FIGURES = wf.report_figures()  # each registered metric's figures, then the overview
TABLES = FAMILIES + ["forgetting", "edit_log", "phases", "disabling_edits", "indicators", "summary"]  # report.tables.build_tables
PER_RUN_FIGURES = [f"overview_{safe_name(run)}" for run in RUNS]  # report.plots.make_plots per_run


rule report_tables:
    input:
        metrics=wf.all_metric_files(config),
        factors=wf.all_segment_files(config, "factors"),
        deltas=wf.all_segment_files(config, "deltas"),
    output:
        summary=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
        tables=expand("results/tables/{table}.parquet", table=TABLES),
        csv=expand("results/tables/{table}.csv", table=[t for t in TABLES if t != "summary"]),
    params:
        runs=wf.runs_meta(config),
        # the table and phase settings only: plot smoothing must not re-run the phase bootstrap
        report=wf.canonical_json({k: v for k, v in config["report"].items() if k != "smooth"}),
    log:
        "results/logs/report_tables.log",
    benchmark:
        "results/benchmarks/report_tables.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("report_tables"),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} report-tables --runs-json {params.runs:q} --metrics {input.metrics} --factors {input.factors}"
        " --deltas {input.deltas} --out-dir results/tables"
        " --params-json {params.report:q} 2> {log}"


rule report_plots:
    input:
        rules.report_tables.output.tables,
    output:
        html=report(
            expand("results/plots/{figure}.html", figure=FIGURES),
            caption="../report/figures.rst",
            category="Figures (interactive)",
        ),
        png=report(
            expand("results/plots/{figure}.png", figure=FIGURES),
            caption="../report/figures.rst",
            category="Figures",
        ),
        svg=expand("results/plots/{figure}.svg", figure=FIGURES),
        per_run=expand("results/plots/{figure}.{ext}", figure=PER_RUN_FIGURES, ext=["html", "png", "svg"]),
    params:
        # the figure settings only (editscale.report.plots.FigureOptions)
        report=wf.canonical_json({k: config["report"][k] for k in ("smooth", "norm_z")}),
    log:
        "results/logs/report_plots.log",
    benchmark:
        "results/benchmarks/report_plots.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("report_plots"),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} report-plots --tables {input:q} --out-dir results/plots --params-json {params.report:q} 2> {log}"
