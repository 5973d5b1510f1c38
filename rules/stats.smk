# Stage 3 — stats: token sample of a corpus (stats + disjoint held-out part), then the uncentred
# second moment E[k k^T] of each edited module's input, one HDF5 file per module.


rule corpus_tokens:
    # the edit chain is the critical path: schedule it before evaluation jobs
    priority: 10
    threads: 2
    input:
        "data/models/{model}/manifest.json",
    output:
        stats="data/corpora/{model}/{corpus}/stats.npy",
        heldout="data/corpora/{model}/{corpus}/heldout.npy",
        meta="data/corpora/{model}/{corpus}/corpus.json",
    params:
        spec=lambda w: wf.canonical_json(config["corpora"][w.corpus]),
        dtype=lambda w: config["models"][w.model]["dtype"],
    log:
        "results/logs/corpus/{model}/{corpus}.log",
    benchmark:
        "results/benchmarks/corpus/{model}/{corpus}.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("corpus", w.model, w.model),
        runtime=120,
        **wf.gpu_resources(config),
    conda:
        ENV
    shell:
        "editscale --threads {threads} corpus --model-dir data/models/{wildcards.model} --corpus-json {params.spec:q}"
        " --out-dir data/corpora/{wildcards.model}/{wildcards.corpus}"
        " --dtype {params.dtype} 2> {log}"


rule stats:
    priority: 10
    threads: 2
    input:
        manifest="data/models/{model}/manifest.json",
        tokens="data/corpora/{model}/{corpus}/stats.npy",
    output:
        "results/stats/{model}/{corpus}/{module}.h5",
    params:
        spec=lambda w: wf.canonical_json(config["corpora"][w.corpus]),
        dtype=lambda w: config["models"][w.model]["dtype"],
    log:
        "results/logs/stats/{model}/{corpus}/{module}.log",
    benchmark:
        "results/benchmarks/stats/{model}/{corpus}/{module}.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("stats", w.model, w.model),
        runtime=240,
        **wf.gpu_resources(config),
    conda:
        ENV
    shell:
        "editscale --threads {threads} stats --model-dir data/models/{wildcards.model} --tokens {input.tokens}"
        " --corpus-json {params.spec:q} --corpus-id {wildcards.corpus} --modules {wildcards.module}"
        " --out-dir results/stats/{wildcards.model}/{wildcards.corpus}"
        " --dtype {params.dtype} 2> {log}"


rule nullspace:
    priority: 10
    # AlphaEdit's projection onto the null space of the preserved keys; once per (model, layer,
    # threshold, rule): nullspace/ by editscale's rule, nullspace-svd32/ by the reference's
    input:
        "results/stats/{model}/{corpus}/{module}.h5",
    output:
        "results/stats/{model}/{corpus}/nullspace{rule}/{module}.t{threshold}.h5",
    wildcard_constraints:
        rule="|-svd32",
    params:
        rule=lambda w: w.rule.lstrip("-") or "eigh64",
    log:
        "results/logs/stats/{model}/{corpus}/nullspace{rule}-{module}-{threshold}.log",
    benchmark:
        "results/benchmarks/stats/{model}/{corpus}/nullspace{rule}-{module}-{threshold}.tsv"
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("nullspace", w.model),
        runtime=30,
    conda:
        ENV
    shell:
        "editscale --threads {threads} nullspace --stats {input} --threshold {wildcards.threshold} --rule {params.rule}"
        " --out {output} 2> {log}"
