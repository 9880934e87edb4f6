#!/usr/bin/env bash
# Every GPU figure of the README in one call: the loader (which makes the sample), correctness checks
# (jobs/bench/gpu_check.py) before any step is timed, training-step variants (each profiled: OUT/profile/),
# shard-fed vs resident (and with a host sync per step), dense evaluation; OUT/results.json gathers
# them all for benchmarks/results/.
# Usage (DALI carried as ../shared/gpu/README.md says):
#   source /tmp/dl/unpack.sh && bash jobs/bench/gpu.sh "$OUT"
# SMALL=1 runs the same script on a CPU with tiny sizes, to check it before spending GPU time.
set -uo pipefail
out=${1:?usage: gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)   # the repository, wherever this is run from
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
work=${WORK:-/tmp/bench-work}
log="$out/log.txt"

step() {  # name, time limit (s), command...: a failure is logged and the next step still runs
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v -e "nvjpeg2k\|nvtiff\|failed to load" | tee -a "$log"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$log"
}

if [ "${SMALL:-0}" = 1 ]; then
  dev=cpu; loader_dev=cpu; threads=2
  net=(--model A --width 0.0625); step_sizes=(--batch 8 --image-size 64 --classes 10 --warmup 1 --iters 2)
  sample=(--classes 4 --per-class 8 --size 96,140); crop=(--crop 64 --scale-min 64 --scale-max 96)
  variants=fp32,bf16-cl,bf16-cl+convrelu; e2e_variant=fp32; loader_batch=8; e2e_batch=8; steps=3; loader_steps=3
  eval_args=(--model A --width 0.0625 --image-size 64 --scale 96 --batch 2 --classes 10)
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
  dev=cuda; loader_dev=0; threads=16
  net=(--model D); step_sizes=(--batch 256 --warmup 5 --iters 20)
  sample=(--classes 10 --per-class 300 --size 300,500); crop=(--crop 224 --scale-min 256 --scale-max 512)
  variants=compile,compile+cudnn+fused,graphs+cudnn+fused,compile+cudnn+fused+convrelu,graphs+cudnn+fused+convrelu,bf16-cl
  e2e_variant=compile+cudnn+fused; loader_batch=256; e2e_batch=256; steps=40; loader_steps=150
  eval_args=(--model D --scale 384 --batch 64 --variants same,mixed)
fi

step loader 90 "$PY" -m jobs.bench loader --work "$work" --device "$loader_dev" --threads "$threads" \
  --batch-size "$loader_batch" --steps "$loader_steps" "${sample[@]}" "${crop[@]}" --out "$out/loader.json"
[ "$dev" = cuda ] && step check 60 "$PY" -m jobs.bench.gpu_check "$work/shards" 0
step train 300 "$PY" -m jobs.bench train "${net[@]}" "${step_sizes[@]}" --variants "$variants" \
  --reference "${REFERENCE:-$([ "$dev" = cuda ] && echo compile || echo fp32)}" --device "$dev" --out "$out/train.json" \
  --profile "$out/profile"
step e2e 100 "$PY" -m jobs.bench e2e --work "$work" "${net[@]}" --batch "$e2e_batch" "${crop[@]}" \
  --variant "$e2e_variant" --device "$dev" --threads "$threads" --steps "$steps" "${sample[@]}" --out "$out/e2e.json"
step eval 40 "$PY" -m jobs.bench eval "${eval_args[@]}" --device "$dev" --out "$out/eval.json"
# One file to commit as benchmarks/results/<gpu>-<date>.json: every figure, the device, the check.
"$PY" - "$out" <<'EOF_PY' | tee -a "$log"
import json, re, sys, time
from pathlib import Path
out = Path(sys.argv[1])
figures = [row for name in ("loader", "train", "e2e", "eval") if (out / f"{name}.json").is_file()
           for row in json.loads((out / f"{name}.json").read_text())]
log = (out / "log.txt").read_text()
check = [json.loads(line) for line in log.splitlines() if line.startswith('{"check"')]
gpu = (out / "gpu.txt").read_text().splitlines()[1:] if (out / "gpu.txt").is_file() else []
status = re.findall(r"=== check exit (\d+)", log)
result = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu[0] if gpu else "none (SMALL=1 run on a CPU)",
          "script": "jobs/bench/gpu.sh", "check": {k: v for c in check for k, v in c.items()} or None,
          "check_passed": status[-1] == "0" if status else None, "figures": figures}
(out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"results.json: {len(figures)} figures; check: "
      f"{'not run' if not status else 'passed' if status[-1] == '0' else 'FAILED, see log.txt'}")
EOF_PY
echo "done $(date +%T)" | tee -a "$log"
