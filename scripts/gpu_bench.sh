#!/usr/bin/env bash
# Every pending GPU measurement of docs/benchmarks.md in one script, for the first time a GPU is
# lent (GPU time is scarce: run it once, read the results later). Each step writes its run
# directory under $OUT (default runs/gpu) and goes on if one fails; the log says which.
#
#   bash scripts/gpu_bench.sh            # about 35 minutes on one H100
#   OUT=/some/dir QUICK=1 bash scripts/gpu_bench.sh   # a 2-minute smoke run of the same steps
#
# Then: guided-descent report $OUT/<step> for each, and copy the numbers (with the device, the
# command and the date that env.json records) into docs/benchmarks.md.
set -u
OUT=${OUT:-runs/gpu}
GD=${GD:-.venv/bin/guided-descent}
mkdir -p "$OUT"
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
step() {  # step NAME ARGS... : one measurement, its own directory, its own time limit
  local name=$1; shift
  echo "== $name: $GD $* --out $OUT/$name" | tee -a "$OUT/log.txt"
  timeout 900 "$GD" "$@" "${quick[@]}" --quiet --out "$OUT/$name" >>"$OUT/log.txt" 2>&1 \
    && echo "   ok" | tee -a "$OUT/log.txt" || echo "   FAILED ($?)" | tee -a "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
# 1. Optimizer step on GPT-2-small shapes: muon-step-ms, muon-vs-torch, lion-vs-floor,
#    Shampoo/SOAP amortized vs fused AdamW (mean and max step).
step step-gpt2s bench step --device cuda --size gpt2-small --seeds 5 \
  --optimizers adamw,lion,muon,normuon,shampoo,soap,kl_shampoo,kl_soap,psgd_kron
# 1b. The opt-in compiled kernels and bf16 state on CUDA, against 1's eager float32-state numbers
#    (docs/benchmarks.md, "Compiled updates"; eager stays the default unless this says otherwise).
step step-gpt2s-compiled bench step --device cuda --size gpt2-small --seeds 5 \
  --optimizers adamw,lion,muon,shampoo,soap \
  --hyper lion.compile_update=true,muon.compile_update=true,shampoo.compile_update=true,soap.compile_update=true
step step-gpt2s-bf16-state bench step --device cuda --size gpt2-small --seeds 5 \
  --optimizers adamw,lion,muon --hyper lion.state_dtype=bfloat16,muon.state_dtype=bfloat16
# 2. Time to AdamW's final loss on charlm-gpu, compiled, 5 seeds, then with the peers.
step charlm-gpu bench train charlm-gpu --device cuda --compile --budget-minutes 5 --seeds 5
step charlm-gpu-peers bench train charlm-gpu --device cuda --compile --budget-minutes 5 \
  --seeds 5 --peers
# 3. The CPU workload on a GPU (no compile), for the CPU/GPU comparison.
step charlm-on-gpu bench train charlm --device cuda --seeds 5
echo "done: $OUT" | tee -a "$OUT/log.txt"
