# Stage 5 — evaluate: one rule per registered metric (editscale.evaluate.registry: built-ins and
# plugins), one job per checkpoint; each rule's params are only its own config section, so
# changing one metric re-runs that metric (and the report), nothing else.


for _metric in METRIC_REGISTRY.values():

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
            verb=_metric.verb,
            # every declared input, handed to the command by name (--state, --edits, --tokens, ...)
            flags=lambda w, input, m=_metric.name: wf.metric_flags(RUNS[w.run], m, input),
            device=f"--device {config['resources']['device']}" if _metric.device else "",
        log:
            f"results/logs/{{run}}/{_metric.name}_{{k}}.log",
        benchmark:
            # Snakemake's own record of the job: wall seconds, max RSS, I/O (benchmarks/ reads it)
            f"results/benchmarks/{{run}}/{_metric.name}_{{k}}.tsv"
        resources:
            mem_mb=lambda w: wf.model_mem_mb(config, RUNS[w.run]["model"]),
            runtime=60,
            **(wf.gpu_resources(config) if _metric.device else {}),
        conda:
            ENV
        shell:
            "editscale --threads {threads} {params.verb} --model-dir {params.model_dir}"
            " --k {params.k} {params.flags} --params-json {params.cfg:q} --out {output} {params.device} 2> {log}"
