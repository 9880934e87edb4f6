#!/usr/bin/env bash
# Follow-up to gpu.sh: does sending more JPEGs to the H100's hardware decoder (NVJPG engines) lift
# the loader and the shard-fed step? Same sample, same settings, hw_decoder_load swept.
#   source /tmp/dl/unpack.sh && bash jobs/bench/gpu_decoder.sh "$OUT"
set -uo pipefail
out=${1:?usage: gpu_decoder.sh OUTDIR}
mkdir -p "$out"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)   # the repository, wherever this is run from
export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
work=${WORK:-/tmp/bench-work}
dev=${DEV:-0}; edev=${EDEV:-cuda}
sample=(--classes 10 --per-class 300 --size 300,500)
for load in 0.65 1.0; do
  timeout 60 "$PY" -m jobs.bench loader --work "$work" --device "$dev" --threads 16 --batch-size 256 --steps 150 \
    --skip-baseline --hw-decoder-load "$load" "${sample[@]}" ${LOADER_EXTRA:-} --out "$out/loader-$load.json" 2>&1 | grep -E "^\{|^\|"
done
timeout 150 "$PY" -m jobs.bench e2e --work "$work" --model D --batch 256 --variant compile+cudnn+fused \
  --hw-decoder-load 1.0 --device "$edev" --threads 16 --steps 40 "${sample[@]}" ${E2E_EXTRA:-} --out "$out/e2e-hw1.json" 2>&1 | grep -E "^\{|^\|"
echo done
