#!/usr/bin/env bash
# The CPU record in docs/benchmarks.md: batch 16, interleaved rounds, at 1 thread (the paper's
# protocol) and at all cores, each row also against this machine's matrix-multiply bound.
# OFFICIAL: a clone of github.com/facebookresearch/LeViT (optional, for its fused rows: traced
# and in OpenVINO). TIME/ROUNDS: timed seconds per row and rounds (default 8 s in 4 rounds, as recorded).
set -euo pipefail
OFFICIAL=${OFFICIAL:-}
TIME=${TIME:-8}
ROUNDS=${ROUNDS:-4}
extra=()
[ -n "$OFFICIAL" ] && extra=(--official "$OFFICIAL")
mkdir -p docs
for threads in 1 "$(nproc)"; do
    hybridvit benchmark levit_128s levit_256 cvt_13 --threads "$threads" --compare "${extra[@]}" \
        --precision fp32 --precision bf16 --precision int8 --precision int8-static \
        --warmup 2 --time "$TIME" --rounds "$ROUNDS" --json > "docs/bench_cpu_${threads}t.json"
done
hybridvit plot speed-accuracy docs/bench_cpu_1t.json --output docs/speed_accuracy_cpu.png
