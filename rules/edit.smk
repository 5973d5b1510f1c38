# Stage 4 — edit: the sequential chain in segments; each segment reads the state at k - segment
# and writes deltas/{k}.h5 (cumulative) and factors/{k}.h5 (every update, for exact replay).


rule run_config:
    priority: 10
    input:
        # the fetched model's config.json gives the layer count (hf: models) to check the hparams
        model=lambda w: f"data/models/{RUNS[w.run]['model']}/manifest.json",
    output:
        "results/{run}/run.json",
    params:
        # canonical record with the resolved hparams (file + overrides): a changed value re-runs the
        # run, a reordered or re-commented file does not; n_edits is left out (raising it re-runs nothing)
        run=lambda w: wf.canonical_json(wf.run_record(config, RUNS[w.run])),
        model_dir=lambda w: f"data/models/{RUNS[w.run]['model']}",
    log:
        "results/logs/{run}/run_config.log",
    conda:
        ENV
    shell:
        "editscale --threads {threads} run-config --run-json {params.run:q} --model-dir {params.model_dir} --out {output} 2> {log}"


rule context_templates:
    priority: 10
    input:
        model=lambda w: f"data/models/{RUNS[w.run]['model']}/manifest.json",
        run="results/{run}/run.json",
    output:
        "results/{run}/context_templates.json",
    params:
        model_dir=lambda w: f"data/models/{RUNS[w.run]['model']}",
        # the method's reference sampling rule + format version: a change re-samples the templates
        sampling=lambda w: wf.template_sampling(RUNS[w.run]),
    log:
        "results/logs/{run}/context_templates.log",
    benchmark:
        "results/benchmarks/{run}/context_templates.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("context_templates", w.run, RUNS[w.run]["model"]),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} context-templates --model-dir {params.model_dir}"
        " --run-json {input.run} --out {output} 2> {log}"


rule edit_segment:
    # the edit chain is the critical path: schedule it before evaluation jobs
    priority: 10
    input:
        model=lambda w: f"data/models/{RUNS[w.run]['model']}/manifest.json",
        run="results/{run}/run.json",
        edits="results/{run}/edits.jsonl",
        templates="results/{run}/context_templates.json",
        # what the method declares it needs (EditMethod.precomputed): second moments, projections
        precomputed=lambda w: [p for paths in wf.precomputed_files(config, RUNS[w.run]).values() for p in paths.values()],
        previous=lambda w: wf.previous_segment(RUNS[w.run], int(w.k)),
    output:
        delta="results/{run}/deltas/{k}.h5",
        factors="results/{run}/factors/{k}.h5",
    params:
        model_dir=lambda w: f"data/models/{RUNS[w.run]['model']}",
        precomputed=lambda w: wf.precomputed_flags(config, RUNS[w.run]),
        k=lambda w: int(w.k),
    log:
        "results/logs/{run}/edit_segment_{k}.log",
    benchmark:
        # Snakemake's own record of the job: wall seconds, max RSS, I/O (benchmarks/ reads it)
        "results/benchmarks/{run}/edit_segment_{k}.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("edit", w.run, RUNS[w.run]["model"]),
        runtime=lambda w: 10 + 2 * RUNS[w.run]["segment"],
        **wf.gpu_resources(config),
    conda:
        ENV
    shell:
        "editscale --threads {threads} edit-segment --model-dir {params.model_dir} --run-json {input.run}"
        " --edits {input.edits} --previous {input.previous} --k {params.k} --templates {input.templates}"
        " --precomputed {params.precomputed}"
        " --out-delta {output.delta} --out-factors {output.factors} 2> {log}"
