#!/usr/bin/env bash
# Build the fuzz harnesses (tests/fuzz) and run each one for a fixed time.
#
#   tools/fuzz.sh                      # 60 s per harness (what .ci/run does)
#   tools/fuzz.sh --minutes 30 model   # a longer run of one harness; the corpus is kept between runs
#
# Harnesses: gguf (the GGUF reader), model (the loader + one forward, on the kernels this CPU
# picks), model-scalar (the same on the scalar reference kernels, matrices in the file's layout:
# TINYSERVE_ISA=scalar TINYSERVE_PACK=0; it shares model's corpus), tokenizer (the tokenizer build
# from GGUF metadata; atheris: needs `tinyserve._core` importable and `pip install '.[fuzz]'`).
# Everything lives in build/fuzz: the instrumented build, seeds/ (written by
# tests/fuzz/make_seeds.py every run), corpus/<harness>/ (what the fuzzer found interesting),
# artifacts/ (inputs that made a report) and logs/.
# TINYSERVE_ISA and TINYSERVE_PACK reach the model harness as they reach the server.
# Reproduce a report: build/fuzz/fuzz_model INPUT (or python tests/fuzz/fuzz_tokenizer.py INPUT).
#
# Exit status: 0 no harness reported anything; 1 a harness reported (crash, sanitizer report,
# broken contract, leak, timeout, out of memory): its log tail and the input that reproduces it are
# printed; 2 a prerequisite is missing (clang with libFuzzer, atheris, tinyserve) or bad usage.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/build/fuzz"
seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --minutes) seconds=$(( $2 * 60 )); shift 2 ;;
    gguf|model|model-scalar|tokenizer) targets+=("$1"); shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "fuzz: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(gguf model model-scalar tokenizer)
py="${PYTHON:-python3}"

not_run=()
missing() { echo "fuzz: NOT RUN: $*" >&2; not_run+=("$1"); }

# --- build the C++ harnesses (clang + libFuzzer + ASan/UBSan) -----------------------------------
cxx_ok=0
build_cxx() {
  local cxx="${FUZZ_CXX:-}" c
  if [ -z "$cxx" ]; then
    for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
      if command -v "$c" >/dev/null; then cxx="$c"; break; fi
    done
  fi
  [ -n "$cxx" ] || { missing "C++ harnesses: no clang++ (libFuzzer needs clang; Debian: apt-get install clang)"; return; }
  command -v cmake >/dev/null && command -v ninja >/dev/null || { missing "C++ harnesses: cmake and ninja are needed"; return; }
  mkdir -p "$out"
  if ! cmake -S "$root" -B "$out" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
         -DTINYSERVE_FUZZ=ON >"$out/configure.log" 2>&1; then
    grep -A3 "CMake Error" "$out/configure.log" | head -8 >&2
    missing "C++ harnesses: cmake could not configure the fuzz build with $cxx (log: $out/configure.log)"
    return
  fi
  if ! cmake --build "$out" -j"${FUZZ_BUILD_JOBS:-2}" >"$out/build.log" 2>&1; then
    tail -30 "$out/build.log" >&2
    echo "fuzz: the C++ harnesses do not build" >&2
    exit 1
  fi
  cxx_ok=1
}
for t in "${targets[@]}"; do
  if [ "$t" != tokenizer ]; then build_cxx; break; fi
done

# --- seeds: small valid files written from the test helpers ----------------------------------------
rm -rf "$out/seeds"
mkdir -p "$out/logs" "$out/artifacts"
if ! "$py" "$root/tests/fuzz/make_seeds.py" "$out/seeds" >"$out/logs/seeds.log" 2>&1; then
  tail -5 "$out/logs/seeds.log" >&2
  missing "could not write the seed corpus (it needs numpy and gguf: pip install '.[test]')"
  exit 2
fi

# --- run ---------------------------------------------------------------------------------------
# -timeout: one input may take this long (seconds) before it counts as a hang; -rss_limit_mb also
# caps any single allocation (-malloc_limit_mb defaults to it), so an unbounded allocation driven by
# a file is a report too.
flags=(-max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -dict="$root/tests/fuzz/gguf.dict"
       -print_final_stats=1)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:allocator_may_return_null=0}"
# tests/fuzz/ubsan.supp names the known findings not fixed yet (each with its reason)
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:suppressions=$root/tests/fuzz/ubsan.supp}"
status=0
for t in "${targets[@]}"; do
  harness="${t%-scalar}"
  corpus="$out/corpus/$harness"
  mkdir -p "$corpus"
  log="$out/logs/$t.log"
  case "$t" in
    tokenizer)
      if ! "$py" -c "import atheris, tinyserve._core" 2>"$out/logs/tokenizer-import.log"; then
        tail -1 "$out/logs/tokenizer-import.log" >&2
        missing "tokenizer harness: needs atheris (pip install '.[fuzz]') and an importable tinyserve._core"
        continue
      fi
      cmd=("$py" "$root/tests/fuzz/fuzz_tokenizer.py" -max_len=16384) ;;
    model-scalar)
      [ $cxx_ok = 1 ] || continue
      cmd=(env TINYSERVE_ISA=scalar TINYSERVE_PACK=0 "$out/fuzz_model") ;;
    *)
      [ $cxx_ok = 1 ] || continue
      cmd=("$out/fuzz_$t") ;;
  esac
  start=$(date +%s)
  nice "${cmd[@]}" "${flags[@]}" -artifact_prefix="$out/artifacts/$t-" "$corpus" "$out/seeds/$harness" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  added=$(sed -n 's/^stat::new_units_added: *//p' "$log")
  if [ $rc -eq 0 ] && grep -q '^Done [0-9]* runs' "$log"; then
    echo "fuzz $t: $(( $(date +%s) - start )) s, ${runs:-?} runs (${rate:-?}/s), ${added:-?} new corpus units, no report"
  else
    status=1
    echo "fuzz $t: REPORT (exit $rc) after ${runs:-?} runs; log: $log"
    grep -v '^"' "$log" | tail -40 | sed "s/^/  $t: /"
    artifact=$(sed -n "s/.*Test unit written to \(.*\)/\1/p" "$log" | tail -1)
    if [ -n "$artifact" ]; then
      echo "  $t: reproduce with: ${cmd[*]} $artifact"
    fi
  fi
done
[ $status -ne 0 ] || [ ${#not_run[@]} -eq 0 ] || status=2
exit $status
