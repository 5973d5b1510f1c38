# Stage 7 — audit: provenance and hash chains of every output, re-derivation of sampled checkpoints


rule audit:
    input:
        rules.report_tables.output.tables,
    output:
        "results/audit.json",
    params:
        cfg=wf.canonical_json(config["audit"]),
    log:
        "results/logs/audit.log",
    resources:
        mem_mb=lambda w: max(wf.model_mem_mb(config, m) for m in config["models"]),
        runtime=60,
    conda:
        ENV
    shell:
        "editscale --threads {threads} audit results --params-json {params.cfg:q} --out {output} 2> {log}"
