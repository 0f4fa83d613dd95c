#!/usr/bin/env bash
# One call on a lent GPU: install what is missing, run the GPU tests, then the benchmarks.
# Logs and results go to $OUT (the device tool brings that folder back); commit them under
# bench/results/ afterwards.
#
#   bash bench/gpu_check.sh [tests] [sanitize] [kernels] [sweep]     (default: all four)
#   SWEEP_ARGS="--n 1024 8600 65536 1000000" bash bench/gpu_check.sh sweep
#
# One device call is capped at 10 minutes: run the stages in separate calls if they do not fit,
# and split the sweep's sizes with SWEEP_ARGS (each call writes its own $OUT/scaling).
# The GPU image has torch and triton but no pymetis and no network: carry wheels in .whl/
# (see README: "GPU sessions").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
stages=${*:-tests sanitize kernels sweep}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
for stage in $stages; do
    case $stage in
        tests)      # SPEC 5 suite on CUDA: fp32 (IEEE), tf32, bf16; torch.compile with inductor
            python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 || status=1 ;;
        sanitize)   # the cuda backend's kernels under compute-sanitizer, on a small case
            # Build (or load the cached) extension first, so the sanitizer watches kernels, not nvcc.
            python3 -c "from sba_kernels import cuda_backend as c; print('cuda backend:', c.unavailable_reason())"
            for tool in memcheck racecheck; do
                compute-sanitizer --tool "$tool" --error-exitcode 3 python3 bench/cuda_small_case.py \
                    >"$OUT/sanitize-$tool.log" 2>&1 || status=1
                tail -3 "$OUT/sanitize-$tool.log"
            done ;;
        kernels)    # first timings: triton, cuda and torch backends, N = 10k and 100k, M = 32, 64, 128
            for m in 32 64 128; do
                python3 bench/scaling.py --n 10000 100000 --subgraph-size "$m" --dtype bf16 \
                    --methods 'intra[triton]' 'intra[cuda]' 'intra[torch]' 'sba_layer[triton]' 'sba_layer[cuda]' 'sba_layer[torch]' \
                    --out "$OUT/kernels-m$m" 2>&1 | tail -12 || status=1
            done ;;
        sweep)      # the main job at full size
            # shellcheck disable=SC2086  # SWEEP_ARGS is a list of words on purpose
            python3 bench/scaling.py --out "$OUT/scaling" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/scaling.log" | tail -60 || status=1 ;;
        *) echo "unknown stage $stage"; status=1 ;;
    esac
done
exit $status
