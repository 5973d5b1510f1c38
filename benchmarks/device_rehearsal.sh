#!/usr/bin/env bash
# Rehearse benchmarks/device_check.py on this CPU exactly as the device machine will run it: in a
# fresh venv holding only the device machine's package set (torch, transformers, numpy, h5py,
# safetensors, accelerate, pandas, pyarrow, tqdm, pyyaml) plus the wheels of
# benchmarks/device_wheels.txt, editscale from the source tree (PYTHONPATH=src, not installed).
#
#   bash benchmarks/device_rehearsal.sh [WORK]          # rehearsal (CI): --device cpu --shapes tiny --archs gpt2 llama
#   bash benchmarks/device_rehearsal.sh --wheels DIR    # only fetch the carried wheels into DIR (.whl)
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_WHEEL_MIB=40

fetch_wheels() {  # $1: directory; Python 3.12 x86-64 wheels, as the device machine needs them
    mkdir -p "$1"
    grep -o '^[^# ]*' benchmarks/device_wheels.txt | xargs python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d "$1" 2>&1 | grep -v "is ignored" || true
    local mib
    mib=$(du -sm "$1" | cut -f1)
    if [ "$mib" -gt "$MAX_WHEEL_MIB" ]; then
        echo "device_rehearsal: the carried wheels take $mib MiB, more than $MAX_WHEEL_MIB" >&2
        exit 1
    fi
    echo "carried wheels ($mib MiB): $(ls "$1" | tr '\n' ' ')"
}

if [ "${1:-}" = "--wheels" ]; then
    fetch_wheels "${2:?--wheels DIR}"
    exit 0
fi

WORK=${1:-${TMPDIR:-/tmp}/editscale-device-rehearsal}
rm -rf "$WORK" && mkdir -p "$WORK"
echo "== venv with the device machine's package set ($WORK/venv) =="
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q torch==2.13.0 transformers numpy h5py safetensors accelerate pandas pyarrow tqdm pyyaml 2>&1 | grep -v "is ignored" || true
fetch_wheels "$WORK/wheels"
"$WORK/venv/bin/pip" install -q --no-index --no-deps "$WORK"/wheels/*.whl
echo "== benchmarks/device_check.py --device cpu --shapes tiny --archs gpt2 llama =="
# (a) on two of the four tiny architectures: what is rehearsed is the package set (each method's code
# path in it); the quick tier edits every architecture with every method (tests/test_half_precision.py)
PYTHONPATH=src "$WORK/venv/bin/python" benchmarks/device_check.py --device cpu --shapes tiny --archs gpt2 llama --out "$WORK/out"
