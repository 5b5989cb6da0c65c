#!/usr/bin/env bash
# One server under issue 21's load through the OpenAI SDK (bench/openai_load.py): start it on
# the synthetic E4B with 2 threads, wait until it answers, run the load (16 streamed
# requests, 8 at a time, 400-token prompts, 32 output tokens), stop it. Run it once per server
# and alternate; bench/RESULTS.md holds what it printed on the development machine.
#
#     bench/openai_compare.sh pygemma4|llama-server OUT.json [openai_load.py options]
#
# llama-server is taken from $LLAMA_SERVER (default: llama-server on the PATH).
set -euo pipefail
server="$1"
out="$2"
shift 2
model=$(python -c 'from pygemma4.models.synthetic import synthetic_model_path as p; print(p("e4b"))')
[ -f "$model" ] || python -m pygemma4.models.synthetic e4b "$model"
port=${PORT:-18080}
case "$server" in
pygemma4)
    python -m pygemma4 serve "$model" --threads 2 --http "127.0.0.1:$port" \
        --endpoint "ipc://$(mktemp -u)" &
    extra='{}'
    ;;
llama-server)
    # -np 8: a slot per concurrent request (continuous batching); -c 8192: 1,024 positions per
    # slot, room for 400 + 32. Its prompt cache is off per request, and timings_per_token
    # gives each streamed chunk's running token count.
    "${LLAMA_SERVER:-llama-server}" -m "$model" -t 2 -np 8 -c 8192 --host 127.0.0.1 \
        --port "$port" >/dev/null 2>&1 &
    extra='{"cache_prompt": false, "timings_per_token": true}'
    ;;
*)
    echo "unknown server '$server' (pygemma4 or llama-server)" >&2
    exit 2
    ;;
esac
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "$server exited before it served" >&2; exit 1; }
    sleep 1
done
python bench/openai_load.py "$model" --base-url "http://127.0.0.1:$port/v1" --label "$server" \
    --requests 16 --concurrency 8 --prompt-tokens 400 --output-tokens 32 \
    --extra-body "$extra" --json "$out" "$@"
