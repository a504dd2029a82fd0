#!/usr/bin/env bash
# The one device check of the CUDA backend (issue 15), for a machine with an NVIDIA GPU, e.g. the
# device tool's H200:   run(command="tools/cuda_device_check.sh", timeout_s=580)
# It builds the extension with CUDA for this GPU, runs the block self-test, the GPU tests
# (tests/cuda, against the scalar CPU reference) and the benchmarks, and writes under $OUT
# (default build/cuda-check) as it goes, so a run stopped at its limit still returns what it did:
#   cuda_check.json  one object: each step's status and seconds, the test counts, the figures
#   build.log, tests.log (+ tests.xml), bench.log  the outputs behind it
# Steps never stop the script: a failed step is recorded and the next one runs; exit status 1 if
# any step failed. Budget: about 6-8 minutes on 16 cores (build ~2, tests ~2, benchmarks ~3).
#
# What it needs there (the device image has python3 3.12 with numpy, pybind11, cmake, ninja, pytest,
# grpcio, jinja2, tokenizers, protobuf, tqdm, prometheus-client): the wheels the image lacks,
# carried in .device/wheels (.gitignore has it; name .device in `carry`), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .device/wheels gguf grpcio-health-checking grpcio-reflection grpcio-status grpcio-tools
# (gguf: the tests' model writer; the grpc ones: the server and `bench serve`'s client stubs; match
# grpcio-tools to the image's grpcio version: `python3 -m pip show grpcio` there).
# Models: the catalog's files are larger than the 64 MiB the device tool carries, so the benchmark
# models are written there, with the default model's shapes and types (SmolLM2-135M: 30 layers,
# dim 576, Q4_1, tied head) and a K-quant one (Q4_K layers, Q8_0 embedding, Q6_K head, Qwen3-0.6B's
# widths: K-quant rows need multiples of 256; 8 of its 28 layers), random
# weights: the same bytes per token as the real files, so GB/s and tokens/s carry over; their text
# is noise. A real file named in TINYSERVE_CUDA_TEST_MODELS (colon-separated) is tested as well.
# Knobs: TINYSERVE_CUDA_ARCH (default native), TINYSERVE_PEAK_GBPS (default 4800, the H200's HBM3e).
# TINYSERVE_CUDA_BUILD_DIR (default build/device-cuda).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${OUT:-$root/build/cuda-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
bdir="${TINYSERVE_CUDA_BUILD_DIR:-$root/build/device-cuda}"
arch="${TINYSERVE_CUDA_ARCH:-native}"
peak="${TINYSERVE_PEAK_GBPS:-4800}"
steps="$out/.steps"
: >"$steps"
failed=0
export PYTHONUNBUFFERED=1

# step NAME LOG CMD...: run CMD (appending to $out/LOG), record status and seconds
step() {
  local name="$1" log="$out/$2"
  shift 2
  local t0=$SECONDS rc=0
  echo "== $name: $*" >>"$log"
  "$@" >>"$log" 2>&1 || rc=$?
  echo "$name $rc $((SECONDS - t0))" >>"$steps"
  [ "$rc" -eq 0 ] || failed=1
  echo "$name: rc=$rc ($((SECONDS - t0)) s)"
  return "$rc"
}

summary() {
  "$py" - "$out" "$steps" <<'EOF'
import glob, json, os, re, sys
out, steps = sys.argv[1], sys.argv[2]
res = {"steps": {}}
for line in open(steps):
    name, rc, secs = line.split()
    res["steps"][name] = {"rc": int(rc), "seconds": int(secs)}
try:
    res["gpu"] = os.popen("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader").read().strip()
except Exception:
    pass
log = os.path.join(out, "tests.log")
if os.path.exists(log):
    tail = open(log).read().splitlines()[-200:]
    res["tests_summary"] = next((l for l in reversed(tail) if re.search(r"\d+ (passed|failed)", l)), "")
    res["tests_failed"] = [l for l in tail if l.startswith("FAILED")]
for f in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    text = open(f).read().strip()
    try:
        res[os.path.basename(f)[:-5]] = json.loads(text.splitlines()[-1]) if text else "no output (see bench.log)"
    except ValueError as e:
        res[os.path.basename(f)[:-5]] = f"unreadable: {e}"
json.dump(res, open(os.path.join(out, "cuda_check.json"), "w"), indent=1)
print(json.dumps(res)[:4000])
EOF
}
trap summary EXIT

step env env.log bash -c "nvidia-smi -L; nvcc --version | tail -2; $py --version; uname -m"
if [ -d .device/wheels ]; then
  step wheels env.log "$py" -m pip install --no-index --no-deps --find-links .device/wheels .device/wheels/*.whl
fi
step python_deps env.log "$py" -c "import numpy, pybind11, gguf, tokenizers, jinja2, grpc, pytest; print('python deps ok')"

# 1. build: the extension with CUDA for this GPU, and the block self-test
step configure build.log cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTINYSERVE_CUDA=ON \
  -DTINYSERVE_CUDA_SELFTEST=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())' 2>/dev/null)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bdir/py/tinyserve"
step build build.log cmake --build "$bdir" -j"$(nproc)"
step selftest build.log "$bdir/cuda_blocks_selftest"
export PYTHONPATH="$root/server:$bdir/py:$root/clients/python/src"
step cuda_status build.log "$py" -c "from tinyserve import _core; s = _core.cuda_status(); print(s or _core.cuda_device()); raise SystemExit(1 if s else 0)"

# 2. the GPU tests, against the scalar CPU reference
step tests tests.log env TINYSERVE_ISA=scalar timeout 300 "$py" -m pytest -p no:cacheprovider -q -rs \
  --junitxml="$out/tests.xml" tests/cuda

# 3. benchmarks on models with the real files' shapes and types (random weights)
models="$out/models"
mkdir -p "$models"
step synth_models bench.log "$py" - "$models" <<'EOF'
import sys
sys.path.insert(0, "tests/model")
from tiny_models import TinySpec, write_tiny_model
d = sys.argv[1]
write_tiny_model(f"{d}/smollm2-shape-q4_1.gguf", TinySpec(dim=576, hidden_dim=1536, n_layers=30, n_heads=9,
                 n_kv_heads=3, n_vocab=49152, context_length=8192, wtype="Q4_1", tied=True, seed=5))
write_tiny_model(f"{d}/qwen3-06b-shape-q4_k.gguf", TinySpec(dim=1024, hidden_dim=3072, n_layers=8, n_heads=16,
                 n_kv_heads=8, n_vocab=151936, context_length=8192, wtype="Q4_K", embd_type="Q8_0",
                 out_type="Q6_K", seed=6))
print("models written")
EOF
for m in "$models"/*.gguf; do
  name="$(basename "$m" .gguf)"
  step "bench_engine_$name" bench.log bash -c "timeout 150 $py -m tinyserve.cli bench engine --device cuda --json \
    --model '$m' --prompt-sizes 512 --batches 1,32,128 --gen 64 --reps 3 --peak-gbps $peak >'$out/bench_engine_$name.json'"
done
# the same with each step's kernels replayed from a CUDA graph (launch overhead out of decode)
step bench_engine_graphs bench.log bash -c "TINYSERVE_CUDA_GRAPHS=1 timeout 150 $py -m tinyserve.cli bench engine \
  --device cuda --json --model '$models/smollm2-shape-q4_1.gguf' --prompt-sizes 512 --batches 1,32,128 --gen 64 \
  --reps 3 --peak-gbps $peak >'$out/bench_engine_graphs_smollm2-shape-q4_1.json'"

# 4. the server on the GPU under load: 32 and 256 streams
port=50161
timeout 200 "$py" -m tinyserve.cli serve --device cuda --model "$models/smollm2-shape-q4_1.gguf" --port $port \
  --max-num-seqs 256 --max-waiting 1024 --kv-budget-mb 8192 >>"$out/serve.log" 2>&1 &
srv=$!
for _ in $(seq 60); do grep -q "listening" "$out/serve.log" 2>/dev/null && break; sleep 1; done
for c in 32 256; do
  step "bench_serve_c$c" bench.log bash -c "timeout 90 $py -m tinyserve.cli bench serve --server 127.0.0.1:$port \
    --concurrency $c --requests $((c * 2)) --prompt-tokens 128 --max-tokens 64 --json >'$out/bench_serve_c$c.json'"
done
kill "$srv" 2>/dev/null
wait "$srv" 2>/dev/null
exit "$failed"
