#!/usr/bin/env bash
# The GPU proof, in one script (issue: GPU path proven on an H100/H200). On a GPU host with
# Python 3.12, torch, pybind11, scikit-build-core, CMake and ninja preinstalled and no package
# registry: builds safegene with SAFEGENE_CUDA=ON for sm_90 without build isolation, runs the
# CUDA parity tests, then the calibration memory benchmark (~1B and 8B-shaped) and the kernel,
# calibration and apply benchmarks; everything lands in $OUT (or bench/gpu/out) and the tables
# are printed last. Budget: under 10 minutes (each step is capped by the time left). Without a
# GPU, `python bench/gpu/bench_gpu.py --dry-run` runs the calibration benchmark's path on CPU.
#
# Wheels the host may lack (pytest, safetensors, transformers, ...) are taken from
# bench/gpu/wheels when present: fill it on a CPU machine with bench/gpu/fetch_wheels.sh and
# carry it along.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/gpu/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if [ -d bench/gpu/wheels ]; then
  python -m pip install -q --no-index --find-links bench/gpu/wheels pytest safetensors numpy tqdm hypothesis transformers tokenizers huggingface_hub 2>&1 | tail -3
fi

echo "== build (SAFEGENE_CUDA=ON, sm_90)"
SAFEGENE_CUDA=ON CMAKE_ARGS="-DSAFEGENE_CUDA_ARCHITECTURES=90" \
  python -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -5
python -c "import safegene, safegene._core as c; print('cuda_built', c.cuda_built(), 'has_cuda', safegene.has_cuda())" | tee "$OUT/build.txt"

echo "== CUDA parity tests"
(cd /tmp && timeout 240 python -m pytest "$OLDPWD/tests/test_cuda.py" "$OLDPWD/tests/test_kernels.py" -q -p no:cacheprovider \
  --rootdir="$OLDPWD" --junitxml="$OLDPWD/$OUT/parity.xml") 2>&1 | tail -15 | tee "$OUT/parity.txt"

# Whatever ran before, the benchmarks share what is left of the 10 minutes (570 s, a margin for
# the final table): each step gets its cap or the time left, whichever is less.
left() { local l=$(( 570 - ($(date +%s) - t0) )); [ "$l" -lt "$1" ] && echo "$(( l > 10 ? l : 10 ))" || echo "$1"; }

echo "== calibrate on one GPU: peak memory and step time, ~1B and 8B-shaped random Llamas"
timeout "$(left 200)" python bench/gpu/bench_gpu.py --out "$OUT" --only calibrate_memory 2>&1 | tee "$OUT/bench-calibrate-memory.txt"

echo "== benchmarks"
timeout "$(left 300)" python bench/gpu/bench_gpu.py --out "$OUT" --skip calibrate_memory 2>&1 | tee "$OUT/bench.txt"
echo "total $(( $(date +%s) - t0 )) s"
cat "$OUT/table-calibrate_memory.md" "$OUT/table.md" 2>/dev/null
