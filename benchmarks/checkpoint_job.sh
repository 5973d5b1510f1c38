#!/usr/bin/env bash
# One checkpoint (k = 0) of the default study's ROME run on SmolLM2-135M: history, downstream, generation
# and weights as four separate processes (the per-metric jobs before) against one `editscale
# evaluate` job (the checkpoint job), twice each, alternating. Prepare STUDY_DIR with
#   snakemake --cores 1 --configfile=config.yaml -- data/models/smollm2-135m/manifest.json \
#     results/rome-smollm2-geofacts-s0/{run.json,edits.jsonl}
#   snakemake --cores 1 --configfile=config.yaml --until metric_config   # results/config/metrics/*/DIGEST.json
set -euo pipefail
STUDY=${1:?usage: benchmarks/checkpoint_job.sh STUDY_DIR  (a copy of the workflow with the model, run.json, edits.jsonl and results/config/metrics/ sections of config.yaml made)}
OUT=$(mktemp -d)
cd "$STUDY"
R=results/rome-smollm2-geofacts-s0
STATE="data/models/smollm2-135m/manifest.json $R/run.json"
M="history downstream generation weights"
# a metric's section file (named by its content's digest): the one there when only config.yaml ran in STUDY_DIR
section() { set -- results/config/metrics/$1/*.json; [ $# = 1 ] && [ -f "$1" ] || { echo "expected one section file: $*" >&2; return 2; }; echo $1; }
declare -A SECTION
for m in $M; do SECTION[$m]=$(section $m); done
for round in 1 2; do
  rm -rf $OUT && mkdir -p $OUT
  t0=$(date +%s.%N)
  for m in $M; do
    verb=$m; extra="--edits $R/edits.jsonl"; [ $m = weights ] && extra="--factors"
    editscale --threads 1 $verb --model-dir data/models/smollm2-135m --k 0 --state $STATE $extra --params-json "$(cat ${SECTION[$m]})" --out $OUT/$m.parquet --device cpu 2>/dev/null
  done
  t1=$(date +%s.%N)
  rm -rf $OUT && mkdir -p $OUT
  editscale --threads 1 evaluate --model-dir data/models/smollm2-135m --k 0 --metric $(for m in $M; do echo -n "$m=$OUT/$m.parquet "; done) \
    --configs $(for m in $M; do echo -n "${SECTION[$m]} "; done) --state $STATE --edits $R/edits.jsonl --device cpu 2>/dev/null
  t2=$(date +%s.%N)
  echo "round $round: separate processes $(echo "$t1 - $t0" | bc) s, one checkpoint job $(echo "$t2 - $t1" | bc) s"
done
