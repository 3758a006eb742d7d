#!/usr/bin/env bash
# Every GPU check of csrc/ in one device call (about 7 minutes on an H200; nothing here needs a network):
# build the torch extension in place and the CMake targets for sm_90, run the C++ harness (the kernel
# against a naive CUDA reference, then µs per call) at the 1.3B, demo and tiny shapes, then
# scripts/gpu_check_csrc.py (parity through ring wraps, timing against SDPA and FlexAttention, bench
# FPS with and without). Figures and logs go to $OUT (default out/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
LIVETALK_CUDA_ARCHS=90 python3 setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1 \
  || { tail -30 "$OUT/build_ext.log"; exit 1; }
cmake -S . -B build/gpu -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/cmake.log" 2>&1
cmake --build build/gpu -j 16 >> "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
#                                  B Nb   H  D   Np    sink_cap sinks ring dtype iters variant
for args in "1 3072 12 128 12288 9216 9216 3072 bf16 50 pipelined" "1 3072 12 128 12288 9216 9216 3072 bf16 50 simple" \
            "1 3072 12 128 12288 9216 9216 3072 fp16 50 pipelined" "1 3072 12 128 12288 9216 6144 0 bf16 50 pipelined" \
            "1 108 4 32 216 108 108 108 bf16 200 pipelined" "1 108 4 32 216 108 108 108 bf16 200 simple" \
            "1 48 2 32 144 48 48 96 fp16 200 pipelined"; do
  build/gpu/sink_ring_check $args | tee -a "$OUT/harness.txt"
done
python3 scripts/gpu_check_csrc.py --out "$OUT" 2>&1 | tee "$OUT/check.log"
