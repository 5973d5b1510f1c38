# Stage 2 — data: normalized edit cases, then each run's ordered edit sequence


rule dataset:
    output:
        "data/datasets/{dataset}.jsonl",
    params:
        spec=lambda w: json.dumps(config["datasets"][w.dataset]),
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
    # The full seeded order of unique-subject cases; a run takes its first n_edits, so raising
    # n_edits does not change this file (and nothing downstream re-runs).
    input:
        lambda w: f"data/datasets/{RUNS[w.run]['dataset']}.jsonl",
    output:
        "results/{run}/edits.jsonl",
    params:
        sample=lambda w: RUNS[w.run]["sample"],
        seed=lambda w: RUNS[w.run]["seed"],
        order=lambda w: (
            f"--order-file {config['datasets'][RUNS[w.run]['dataset']]['order_file']}"
            if config["datasets"][RUNS[w.run]["dataset"]]["order_file"]
            else ""
        ),
    log:
        "results/logs/{run}/sequence.log",
    resources:
        mem_mb=4000,
        runtime=10,
    conda:
        ENV
    shell:
        "editscale --threads {threads} sequence --dataset {input} --out {output} --n-edits 0"
        " --sample {params.sample} --seed {params.seed} {params.order} 2> {log}"
