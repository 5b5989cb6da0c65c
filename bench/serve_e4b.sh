#!/usr/bin/env bash
# `pygemma4 serve` on the synthetic E4B (the real shapes, Q4_K_M, random weights) under a load
# of 16 streamed requests, 8 at a time, each a 64-token prompt asking for 64 tokens, after a
# warm-up of 8, the server on every core. bench/RESULTS.md holds what it printed on the
# development machine.
#
#     bench/serve_e4b.sh [OUT.json]
set -euo pipefail
out="${1:-bench/results/serve-e4b.json}"
pygemma4 bench serve --synthetic e4b --requests 16 --concurrency 8 --prompt-tokens 64 \
    --output-tokens 64 --json "$out"
