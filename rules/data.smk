# Stage 2 — data: downloads, normalized edit cases, then each run's ordered edit sequence

import os
import re

from editscale.data.download import DOWNLOAD_DIR, KNOWN_FILES


def download_path(name):
    """data/downloads/{file} a dataset with a `url` reads: its `path` (which must lie there) or the
    URL's file name."""
    spec = config["datasets"][name]
    path = spec.get("path") or f"{DOWNLOAD_DIR}/{spec['url'].rstrip('/').rsplit('/', 1)[-1]}"
    if not isinstance(path, str) or os.path.dirname(os.path.normpath(path)) != DOWNLOAD_DIR:
        raise ValueError(
            f"config error: datasets.{name} has a url, so its path must be a file directly under {DOWNLOAD_DIR}/ "
            f"(where the download rule writes it) or empty, got {path!r}"
        )
    return os.path.normpath(path)


def _downloads():
    """file name under data/downloads -> (url, sha256 or None): every dataset url, and the
    well-known files (editscale.data.download.KNOWN_FILES) a config refers to by path."""
    out = {name: tuple(v) for name, v in KNOWN_FILES.items()}
    claimed = {}
    for name, spec in config["datasets"].items():
        if spec.get("url"):
            file = os.path.basename(download_path(name))
            if file in claimed and claimed[file][1] != spec["url"]:
                raise ValueError(
                    f"config error: datasets.{claimed[file][0]} and datasets.{name} download different URLs "
                    f"to the same file {DOWNLOAD_DIR}/{file}; give one of them another `path`"
                )
            claimed[file] = (name, spec["url"])
            known = KNOWN_FILES.get(file)
            out[file] = (spec["url"], known[1] if known and known[0] == spec["url"] else None)
    return out


DOWNLOADS = _downloads()


def dataset_spec(name):
    spec = dict(config["datasets"][name])
    if spec.get("url"):
        spec["path"] = download_path(name)
    return spec


rule download:
    # Only the files named in DOWNLOADS: any other missing file under data/downloads/ stays an error.
    output:
        DOWNLOAD_DIR + "/{name}",
    wildcard_constraints:
        name="|".join(re.escape(n) for n in DOWNLOADS) or "(?!)",
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
        lambda w: [download_path(w.dataset)] if config["datasets"][w.dataset].get("url") else [],
    output:
        "data/datasets/{dataset}.jsonl",
    params:
        spec=lambda w: wf.canonical_json(dataset_spec(w.dataset)),
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
        order=lambda w: [f for f in [config["datasets"][RUNS[w.run]["dataset"]]["order_file"]] if f],
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
        "editscale --threads {threads} sequence --dataset {input.dataset} --out {output} --n-edits 0"
        " --sample {params.sample} --seed {params.seed} {params.order} 2> {log}"
