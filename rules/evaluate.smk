# Stage 5 — evaluate.
#
# edit_scores (grid "segments") has its own rule: one job per segment, scoring every state in it.
# Every other metric is evaluated by checkpoint jobs: one job per run and checkpoint k runs all the
# metrics due at k in one process (`editscale evaluate`), so the model is loaded and replayed to k
# once. One rule per run and set of metrics due together (workflow.eval_groups), its k limited to
# the checkpoints of that set. Each metric still writes its own file, an update() output that
# Snakemake keeps: the job recomputes only the files whose evaluation key (the metric's params and
# its input files' content) changed, so changing one metric re-computes only that metric, and a
# new grid or a longer run plans only the checkpoints it adds.

CHECKPOINT_METRICS = wf.checkpoint_metrics()

for _metric in METRIC_REGISTRY.values():
    if _metric.name in CHECKPOINT_METRICS:
        continue

    rule:
        name:
            _metric.rule_name
        input:
            unpack(lambda w, m=_metric.name: wf.metric_inputs(config, RUNS[w.run], m, int(w.k))),
        output:
            f"results/{{run}}/metrics/{_metric.name}/{{k}}.parquet",
        params:
            cfg=wf.metric_params_json(config, _metric.name),
            model_dir=lambda w: f"data/models/{RUNS[w.run]['model']}",
            k=lambda w: int(w.k),
            verb=_metric.command,
            # every declared input, handed to the command by name (--state, --edits, --tokens, ...)
            flags=lambda w, input, m=_metric.name: wf.metric_flags(RUNS[w.run], m, input),
        log:
            f"results/logs/{{run}}/{_metric.name}_{{k}}.log",
        benchmark:
            # Snakemake's own record of the job: wall seconds, max RSS, I/O (benchmarks/ reads it)
            f"results/benchmarks/{{run}}/{_metric.name}_{{k}}.tsv"
        resources:
            mem_mb=lambda w, m=_metric.name: MEMORY.mem_mb(f"metric:{m}", w.run, RUNS[w.run]["model"]),
            runtime=60,
            **(wf.gpu_resources(config) if _metric.device else {}),
        conda:
            ENV
        shell:
            "editscale --threads {threads} {params.verb} --model-dir {params.model_dir}"
            " --k {params.k} {params.flags} --params-json {params.cfg:q} --out {output} 2> {log}"


localrules:
    metric_config,


rule metric_config:
    # one metric's section as a file: the input of the checkpoint jobs that evaluate it, so that a
    # changed section re-plans exactly those (a rule's params would re-plan every job of its rule).
    # The file is named by its content (layout.metric_config_path): another config in the same
    # results directory with another section has its own file; the command refuses a name that
    # is not its section's digest.
    output:
        "results/config/metrics/{metric}/{digest}.json",
    wildcard_constraints:
        metric="|".join(CHECKPOINT_METRICS),
        digest="[0-9a-f]{16}",
    params:
        cfg=lambda w: wf.metric_params_json(config, w.metric),
    log:
        "results/logs/metric_config_{metric}_{digest}.log",
    conda:
        ENV
    shell:
        "editscale --threads {threads} metric-config --metric {wildcards.metric} --params-json {params.cfg:q} --out {output} 2> {log}"


for _run in config["runs"]:
    for _metrics, _ks in wf.eval_groups(config, _run):

        rule:
            name:
                wf.eval_group_rule(_run, _metrics)
            input:
                unpack(lambda w, r=_run, ms=_metrics: wf.eval_group_inputs(config, r, ms, int(w.k))),
                configs=[wf.metric_config_file(config, m) for m in _metrics],
            output:
                [update(f"results/{_run['name']}/metrics/{m}/{{k}}.parquet") for m in _metrics],
            wildcard_constraints:
                k="|".join(f"{k:06d}" for k in _ks),
            params:
                model_dir=f"data/models/{_run['model']}",
                k=lambda w: int(w.k),
                outs=lambda w, output, ms=_metrics: " ".join(f"{m}={f}" for m, f in zip(ms, output)),
                flags=lambda w, input: wf.eval_group_flags(input),
            log:
                f"results/logs/{_run['name']}/evaluate_{{k}}.log",
            benchmark:
                f"results/benchmarks/{_run['name']}/evaluate_{{k}}.tsv"
            resources:
                mem_mb=lambda w, r=_run: MEMORY.mem_mb("metric:evaluate", r["name"], r["model"]),
                runtime=60,
                **wf.gpu_resources(config),
            conda:
                ENV
            shell:
                "editscale --threads {threads} evaluate --model-dir {params.model_dir} --k {params.k}"
                " --metric {params.outs} --configs {input.configs} {params.flags} 2> {log}"
