#!/usr/bin/env bash
# Build the C++ core with AddressSanitizer + UndefinedBehaviorSanitizer (-DPYGEMMA4_SANITIZE=ON,
# into build/sanitize) and run tests against it: the core-heavy tests unless test files are
# named. They run in a shadow of the checkout (build/sanitize/shadow.XXXXXX, one per run, so
# that runs can overlap) whose core module is the sanitized one; subprocesses inherit it and the
# preloaded runtime.
#
#   bench/sanitize.sh                             # the core-heavy tests
#   bench/sanitize.sh tests                       # the whole suite
#   bench/sanitize.sh tests/test_ops.py -k q8     # these
#   bench/sanitize.sh --exec python script.py     # any command (bench/fuzz.sh with ASAN=1)
#
# Python itself is not instrumented: the ASan runtime is preloaded, leak detection is off (the
# interpreter keeps its memory to the end), and any UBSan report ends the run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build/sanitize
command=()
if [ "${1:-}" = --exec ]; then
  shift
  command=("$@")
elif [ $# -eq 0 ]; then
  set -- tests/test_ops.py tests/test_quant.py tests/test_interleaved.py tests/test_kv_pool.py \
    tests/test_gguf_file.py tests/test_runner.py tests/test_parity.py tests/test_engine.py \
    tests/test_prefix_cache.py
fi

if [ ${#command[@]} -eq 0 ]; then
  # What cannot run against the sanitized core (each runs in the ordinary suite):
  # test_template_limits caps the address space (RLIMIT_AS), where ASan cannot reserve its
  # shadow memory; the sanitized core is built without CUDA, which test_cuda's check that a
  # machine with a toolkit compiles it refuses; test_wheel builds and loads a wheel of its own.
  unsanitizable=(--ignore=tests/test_template_limits.py --ignore=tests/test_wheel.py
    --deselect=tests/test_cuda.py::test_the_cuda_backend_is_compiled_where_a_toolkit_exists)
  # --capture=sys: the sanitizers write their reports to fd 2, which pytest must not swallow.
  command=(python -m pytest -q -p no:cacheprovider --capture=sys "${unsanitizable[@]}" "$@")
fi

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYGEMMA4_CUDA=off \
  -DPYGEMMA4_SANITIZE=ON ${CMAKE_CXX_COMPILER_LAUNCHER:+-DCMAKE_CXX_COMPILER_LAUNCHER=$CMAKE_CXX_COMPILER_LAUNCHER} \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
ninja -C "$BUILD" >&2
sanitized=$(ls "$PWD/$BUILD"/_core*.so)

# A shadow of the checkout that differs only in its core module (links to everything else),
# run from, so that the checkout's own module stays as it is for whatever else runs meanwhile.
shadow=$(mktemp -d "$PWD/$BUILD/shadow.XXXXXX")
trap 'rm -rf "$shadow"' EXIT
mkdir "$shadow/pygemma4"
for f in * pygemma4/*; do
  case $f in
    pygemma4 | build | pygemma4/_core*.so | pygemma4/__pycache__) ;;
    *) ln -s "$PWD/$f" "$shadow/$f" ;;
  esac
done
ln -s "$sanitized" "$shadow/pygemma4/"
cd "$shadow"

libasan=$(${CXX:-g++} -print-file-name=libasan.so)
# The C++ runtime too: ASan intercepts C++ throws, and finds nothing to intercept where the
# runtime loads only later, with the module (Python itself is C).
libstdcxx=$(${CXX:-g++} -print-file-name=libstdc++.so.6)
echo "sanitized module: $sanitized (runtime $libasan)" >&2
status=0
LD_PRELOAD="$libasan $libstdcxx" \
  ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1" \
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
  CI="${CI:-true}" PYTHONPATH="$shadow" "${command[@]}" || status=$?
echo "sanitized run: exit status $status" >&2
exit "$status"
