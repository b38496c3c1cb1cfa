#!/usr/bin/env bash
# The CPU record in docs/benchmarks.md: single thread, batch 16, interleaved rounds.
# OFFICIAL: a clone of github.com/facebookresearch/LeViT (optional, for its fused+traced rows).
set -euo pipefail
OFFICIAL=${OFFICIAL:-}
extra=()
[ -n "$OFFICIAL" ] && extra=(--official "$OFFICIAL")
mkdir -p docs
hybridvit benchmark levit_128s levit_256 --compare "${extra[@]}" --precision fp32 --precision bf16 --precision int8 \
    --warmup 5 --time 40 --rounds 40 --json --plot docs/speed_accuracy_cpu.png > docs/bench_levit_cpu.json
hybridvit benchmark cvt_13 --compare --precision fp32 --precision bf16 --warmup 5 --time 40 --rounds 10 --json \
    > docs/bench_cvt_cpu.json
