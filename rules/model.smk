# Stage 1 — model: data/models/{model}/ (safetensors, tokenizer, manifest.json with sha256s)


rule model:
    priority: 10
    output:
        "data/models/{model}/manifest.json",
    params:
        source=lambda w: config["models"][w.model]["source"],
        revision=lambda w: (
            f"--revision {config['models'][w.model]['revision']}" if config["models"][w.model]["revision"] else ""
        ),
    log:
        "results/logs/model/{model}.log",
    benchmark:
        "results/benchmarks/model/{model}.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("model", w.model, w.model),
        runtime=60,
    conda:
        ENV
    shell:
        "editscale --threads {threads} model --source {params.source:q} --out data/models/{wildcards.model} {params.revision} 2> {log}"
