#!/usr/bin/env bash
# pygemma4 beside llama.cpp on the synthetic E4B (the real shapes, Q4_K_M, random weights), on
# the CPU with every core: prefill of 64 and 512 tokens, 128 decoded tokens for 1 and for 8
# sequences, 5 runs each after a warm-up, the engines interleaved. bench/RESULTS.md holds what
# it printed on the development machine.
#
#     bench/cpu_e4b.sh [OUT.json]
set -euo pipefail
out="${1:-bench/results/cpu-e4b.json}"
pygemma4 bench --synthetic e4b --compare llamacpp -p 64,512 -n 128 --batch 1,8 -r 5 \
    --json "$out"
