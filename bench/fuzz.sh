#!/usr/bin/env bash
# Run every fuzz target of tests/fuzz (or those named) for SECONDS each under atheris, and print
# per target the executions, the coverage (libFuzzer's edges `cov` and features `ft`), the
# corpus it grew and its findings. A finding is an input that raised anything but a Gemma4Error
# (crash-*), ran out of memory (oom-*), or took a second or more ($SLOW seconds where set:
# slow-unit-*, the slowest so far; fuzzing goes on) or over 30 s (a hang: timeout-*, which stops
# it). It is left under build/fuzz/TARGET/ to be fixed and then copied into
# tests/fuzz/corpus/TARGET/ as regression-NAME. Needs atheris (`pip install atheris`).
#
#   bench/fuzz.sh 300                 # every target, 5 minutes each
#   bench/fuzz.sh 60 gguf protocol    # these two, a minute each
#   ASAN=1 bench/fuzz.sh 300 gguf     # with the core built under ASan + UBSan (bench/sanitize.sh)
#   SLOW=3 bench/fuzz.sh 300          # an input is slow at 3 s, not 1 (a loaded machine)
#
# New inputs that reach new coverage go to build/fuzz/TARGET/corpus, not to the committed seeds.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:?usage: bench/fuzz.sh SECONDS [TARGET...]}
shift
if [ $# -eq 0 ]; then
  set -- $(cd tests/fuzz && ls fuzz_*.py | sed 's/^fuzz_//; s/\.py$//')
fi
runner=(env PYTHONPATH="$PWD")
if [ "${ASAN:-0}" = 1 ]; then runner=(bench/sanitize.sh --exec); fi

printf '%-20s %12s %8s %8s %8s %8s  %s\n' target executions exec/s cov ft corpus findings
for target in "$@"; do
  work=$PWD/build/fuzz/$target
  mkdir -p "$work/corpus"
  log=$work/fuzz.log
  "${runner[@]}" python "$PWD/tests/fuzz/fuzz_$target.py" \
    "$work/corpus" "$PWD/tests/fuzz/corpus/$target" \
    -max_total_time="$seconds" -timeout=30 -report_slow_units=$((${SLOW:-1} - 1)) -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$work/" >"$log" 2>&1
  status=$?
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
  ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | grep -oE '[0-9]+')
  corpus=$(ls "$work/corpus" | wc -l)
  findings=$(cd "$work" && ls crash-* timeout-* oom-* slow-unit-* 2>/dev/null | tr '\n' ' ')
  if [ $status -ne 0 ] && [ -z "$findings" ]; then findings="exit status $status, see $log"; fi
  printf '%-20s %12s %8s %8s %8s %8s  %s\n' "$target" "${runs:-?}" "${rate:-?}" "${cov:-?}" \
    "${ft:-?}" "$corpus" "${findings:-none}"
done
