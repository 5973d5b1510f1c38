# Stage 2 — data: downloads, normalized edit cases, then each run's ordered edit sequence

from editscale.data.download import DOWNLOAD_DIR

DOWNLOADS = wf.downloads(config)


rule download:
    # Only the files named in DOWNLOADS: any other missing file under data/downloads/ stays an error.
    output:
        f"{DOWNLOAD_DIR}/{{name}}",
    wildcard_constraints:
        name=wf.alternatives(DOWNLOADS),
    params:
        url=lambda w: DOWNLOADS[w.name][0],
        sha=lambda w: f"--sha256 {DOWNLOADS[w.name][1]}" if DOWNLOADS[w.name][1] else "",
    log:
        "results/logs/download/{name}.log",
    resources:
        mem_mb=1000,
        runtime=60,
    conda:
        ENV
    shell:
        "editscale --threads {threads} download --url {params.url:q} --out {output} {params.sha} 2> {log}"


rule dataset:
    priority: 10
    input:
        lambda w: wf.dataset_inputs(config, w.dataset),
    output:
        "data/datasets/{dataset}.jsonl",
    params:
        spec=lambda w: wf.canonical_json(wf.dataset_spec(config, w.dataset)),
    log:
        "results/logs/dataset/{dataset}.log",
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} dataset --spec-json {params.spec:q} --out {output} 2> {log}"


rule sequence:
    priority: 10
    # The full seeded order of unique-subject cases; a run takes its first n_edits, so raising
    # n_edits does not change this file (and nothing downstream re-runs).
    input:
        dataset=lambda w: f"data/datasets/{RUNS[w.run]['dataset']}.jsonl",
        # the order index (the study's sample file): an input, so a changed or missing file is seen
        order=lambda w: [f for f in [wf.order_file(config, RUNS[w.run])] if f],
    output:
        "results/{run}/edits.jsonl",
    params:
        sample=lambda w: RUNS[w.run]["sample"],
        seed=lambda w: RUNS[w.run]["seed"],
        order=lambda w: f"--order-file {wf.order_file(config, RUNS[w.run])}" if wf.order_file(config, RUNS[w.run]) else "",
    log:
        "results/logs/{run}/sequence.log",
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        ENV
    shell:
        "editscale --threads {threads} sequence --dataset {input.dataset} --out {output} --n-edits 0"
        " --sample {params.sample} --seed {params.seed} {params.order} --run {wildcards.run} 2> {log}"
