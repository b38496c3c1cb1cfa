#!/usr/bin/env bash
# The CPU record in docs/benchmarks.md: single thread, batch 16, interleaved rounds, run twice:
# with the C library's allocator defaults (as a user's process has them) and with
# --tuned-allocator (no page faults for anyone).
# OFFICIAL: a clone of github.com/facebookresearch/LeViT (optional, for its fused+traced rows).
set -euo pipefail
OFFICIAL=${OFFICIAL:-}
extra=()
[ -n "$OFFICIAL" ] && extra=(--official "$OFFICIAL")
mkdir -p docs
for mode in default tuned; do
    flag=()
    suffix=""
    if [ "$mode" = tuned ]; then flag=(--tuned-allocator); suffix="_tuned"; fi
    plot=()
    [ "$mode" = default ] && plot=(--plot docs/speed_accuracy_cpu.png)
    hybridvit benchmark levit_128s levit_256 --compare "${extra[@]}" --precision fp32 --precision bf16 \
        --precision int8 --warmup 5 --time 24 --rounds 24 "${flag[@]}" --json "${plot[@]}" \
        > "docs/bench_levit_cpu${suffix}.json"
    hybridvit benchmark cvt_13 --compare --precision fp32 --precision bf16 --warmup 5 --time 30 --rounds 10 \
        "${flag[@]}" --json > "docs/bench_cvt_cpu${suffix}.json"
done
