# Stage 7 — audit: provenance and hash chains of every output, re-derivation of sampled checkpoints


rule audit:
    input:
        # every file it checks: a deleted or changed one re-runs the audit (or its repair first)
        wf.audit_files(config),
    output:
        wf.study_path(config, "audit.json"),
    params:
        cfg=wf.canonical_json(config["audit"]),
    log:
        wf.study_path(config, "logs", "audit.log"),
    benchmark:
        wf.study_benchmark(config, "audit")
    resources:
        mem_mb=lambda w: MEMORY.mem_mb("audit"),
        runtime=60,
    conda:
        ENV
    shell:
        "editscale --threads {threads} audit --files {input} --params-json {params.cfg:q} --out {output} 2> {log}"
