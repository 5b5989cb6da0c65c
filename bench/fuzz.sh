#!/usr/bin/env bash
# Run every fuzz target of tests/fuzz (or those named) for SECONDS each under atheris, and print
# per target the executions, the coverage (libFuzzer's edges `cov` and features `ft`), the
# corpus it grew and its findings. A finding is an input that raised anything but a Gemma4Error
# (crash-*), ran out of memory (oom-*), or took a second or more ($SLOW seconds where set:
# slow-unit-*, the slowest so far; fuzzing goes on) or over 30 s (a hang: timeout-*, which stops
# it). It is left under build/fuzz/TARGET/ to be fixed and then copied into
# tests/fuzz/corpus/TARGET/ as regression-NAME. Needs atheris (`pip install atheris`).
#
# With ASAN=1 the core is the one built with AddressSanitizer + UndefinedBehaviorSanitizer
# (bench/sanitize.sh). Atheris takes no coverage through GCC's sanitizer runtime (it warns so),
# and mutating blind reaches little, so this mode runs every input the plain runs collected
# (build/fuzz/TARGET/corpus) and the seeds once each instead, SECONDS unused; its findings go
# to build/fuzz-asan/TARGET/.
#
#   bench/fuzz.sh 300                 # every target, 5 minutes each
#   bench/fuzz.sh 60 gguf protocol    # these two, a minute each
#   ASAN=1 bench/fuzz.sh 0 gguf       # what fuzzing gguf collected, under ASan + UBSan
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
mode=(-max_total_time="$seconds")
if [ "${ASAN:-0}" = 1 ]; then
  runner=(bench/sanitize.sh --exec)
  mode=(-runs=0)
fi

printf '%-20s %12s %8s %8s %8s %8s  %s\n' target executions exec/s cov ft corpus findings
for target in "$@"; do
  work=$PWD/build/fuzz/$target
  corpora=("$work/corpus" "$PWD/tests/fuzz/corpus/$target")
  if [ "${ASAN:-0}" = 1 ]; then
    work=$PWD/build/fuzz-asan/$target
    corpora=("$work/corpus" "${corpora[@]}")
  fi
  mkdir -p "$work/corpus" "$work/earlier"
  # Findings of earlier runs move aside, so that those listed below are this run's.
  find "$work" -maxdepth 1 \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \
    -o -name 'slow-unit-*' \) -exec mv -t "$work/earlier" {} +
  log=$work/fuzz.log
  "${runner[@]}" python "$PWD/tests/fuzz/fuzz_$target.py" \
    "${corpora[@]}" "${mode[@]}" -timeout=30 -report_slow_units=$((${SLOW:-1} - 1)) \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$work/" >"$log" 2>&1
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
