# Stage 5 — evaluate: one rule per metric per checkpoint; each rule's params are only its own
# config section, so changing one metric re-runs that metric (and the report), nothing else.


def model_dir(run):
    return f"data/models/{run['model']}"


def state_inputs(run_name, k):
    """Files that define the model after k edits: the checkpoint's delta, or the previous
    checkpoint plus the factors of k's segment (replayed)."""
    run = RUNS[run_name]
    files = [f"data/models/{run['model']}/manifest.json", f"results/{run_name}/run.json"]
    if k == 0:
        return files
    seg = run["segment"]
    if k % seg == 0:
        return files + [f"results/{run_name}/deltas/{k:06d}.h5"]
    end = wf.segment_end_for(k, seg)
    start = [f"results/{run_name}/deltas/{end - seg:06d}.h5"] if end > seg else []
    return files + start + [f"results/{run_name}/factors/{end:06d}.h5"]


def metric_params(metric):
    return wf.canonical_json(METRICS[metric])


def metric_files(metric, run_name):
    run = RUNS[run_name]
    if metric == "edit_scores":
        ks = wf.segment_ends(run)
    else:
        ks = wf.eval_grid(run["n_edits"], METRICS[metric]["eval_every"])
    return [f"results/{run_name}/metrics/{metric}/{k:06d}.parquet" for k in ks]


rule edit_scores:
    # Current-edit scores right after each edit of the segment ending at k (replayed states).
    input:
        state=lambda w: state_inputs(w.run, int(w.k)),
        factors="results/{run}/factors/{k}.h5",
        edits="results/{run}/edits.jsonl",
    output:
        "results/{run}/metrics/edit_scores/{k}.parquet",
    params:
        cfg=lambda w: metric_params("edit_scores"),
        model_dir=lambda w: model_dir(RUNS[w.run]),
        k=lambda w: int(w.k),
        segment=lambda w: RUNS[w.run]["segment"],
        device=config["resources"]["device"],
    log:
        "results/logs/{run}/edit_scores_{k}.log",
    benchmark:
        "results/benchmarks/{run}/edit_scores_{k}.tsv"
    resources:
        mem_mb=lambda w: model_mem_mb(RUNS[w.run]["model"]),
        runtime=60,
        **gpu_resources(),
    conda:
        ENV
    shell:
        "editscale --threads {threads} score-edits --model-dir {params.model_dir} --run-dir results/{wildcards.run}"
        " --k {params.k} --segment {params.segment} --params-json {params.cfg:q} --out {output}"
        " --device {params.device} 2> {log}"


for _metric in ("history", "downstream", "generation"):

    rule:
        name:
            f"metric_{_metric}"
        input:
            state=lambda w: state_inputs(w.run, int(w.k)),
            edits="results/{run}/edits.jsonl",
        output:
            f"results/{{run}}/metrics/{_metric}/{{k}}.parquet",
        params:
            cfg=lambda w, metric=_metric: metric_params(metric),
            model_dir=lambda w: model_dir(RUNS[w.run]),
            k=lambda w: int(w.k),
            verb={"history": "history", "downstream": "downstream", "generation": "generation"}[_metric],
            device=config["resources"]["device"],
        log:
            f"results/logs/{{run}}/{_metric}_{{k}}.log",
        benchmark:
            f"results/benchmarks/{{run}}/{_metric}_{{k}}.tsv"
        resources:
            mem_mb=lambda w: model_mem_mb(RUNS[w.run]["model"]),
            runtime=60,
            **gpu_resources(),
        conda:
            ENV
        shell:
            "editscale --threads {threads} {params.verb} --model-dir {params.model_dir} --run-dir results/{wildcards.run}"
            " --k {params.k} --params-json {params.cfg:q} --out {output} --device {params.device} 2> {log}"


rule metric_perplexity:
    input:
        state=lambda w: state_inputs(w.run, int(w.k)),
        tokens=lambda w: f"data/corpora/{RUNS[w.run]['model']}/{RUNS[w.run]['corpus']}/heldout.npy",
    output:
        "results/{run}/metrics/perplexity/{k}.parquet",
    params:
        cfg=lambda w: metric_params("perplexity"),
        model_dir=lambda w: model_dir(RUNS[w.run]),
        k=lambda w: int(w.k),
        device=config["resources"]["device"],
    log:
        "results/logs/{run}/perplexity_{k}.log",
    benchmark:
        "results/benchmarks/{run}/perplexity_{k}.tsv"
    resources:
        mem_mb=lambda w: model_mem_mb(RUNS[w.run]["model"]),
        runtime=60,
        **gpu_resources(),
    conda:
        ENV
    shell:
        "editscale --threads {threads} perplexity --model-dir {params.model_dir} --run-dir results/{wildcards.run}"
        " --k {params.k} --tokens {input.tokens} --params-json {params.cfg:q} --out {output}"
        " --device {params.device} 2> {log}"


rule metric_weights:
    input:
        state=lambda w: state_inputs(w.run, int(w.k)),
        factors=lambda w: [
            f"results/{w.run}/factors/{k:06d}.h5"
            for k in wf.segment_ends(RUNS[w.run])
            if k <= wf.segment_end_for(int(w.k), RUNS[w.run]["segment"])
        ],
    output:
        "results/{run}/metrics/weights/{k}.parquet",
    params:
        cfg=lambda w: metric_params("weights"),
        model_dir=lambda w: model_dir(RUNS[w.run]),
        k=lambda w: int(w.k),
    log:
        "results/logs/{run}/weights_{k}.log",
    benchmark:
        "results/benchmarks/{run}/weights_{k}.tsv"
    resources:
        mem_mb=lambda w: model_mem_mb(RUNS[w.run]["model"]),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} weights --model-dir {params.model_dir} --run-dir results/{wildcards.run}"
        " --k {params.k} --factors {input.factors} --params-json {params.cfg:q} --out {output} 2> {log}"
