#!/usr/bin/env bash
# One device call on a lent GPU: the GPU tests, compute-sanitizer, backend timings, the sweep.
# Logs and results go to $OUT (the device tool brings that folder back); commit them under
# bench/results/gpu-<device>/ afterwards.
#
#   bash bench/gpu_check.sh [build] [tests] [sanitize] [kernels] [profile] [graph] [pooled] [autotune] [sweep]
#       (default: build tests graph pooled profile, what one lease has time for; `all`: all nine)
#   SWEEP_ARGS="--n 8600 100000" bash bench/gpu_check.sh sweep
#   PYTEST_ARGS="-x" bash bench/gpu_check.sh tests   (default: -n 8 --maxfail 40 -rf with pytest-xdist)
#
# A lease is 15 minutes of device time, the machine's start (1-2 minutes) included, so one
# session gets one full call of about 9.5 minutes: the default stages, in the order that answers
# the open questions first (are the GPU tests green; do CUDA-graph replays reach issue 13's goals
# at N = 1e5; the pooled backward's two forms; where the host time goes). Then give the machine
# back. A device call is capped at 10 minutes, so nothing here may take the whole call with it:
# * the script stops starting stages at DEADLINE_S seconds (default 570) and cuts each stage's
#   limit to what is left before it;
# * every stage runs under `timeout` (STAGE_S seconds, default 150; autotune AUTOTUNE_S, 270;
#   graph GRAPH_S, 240),
#   and a stage that hits it is reported and the next stage runs;
# * `build` compiles the cuda backend's extension (cached for the stages after it);
# * `tests` runs only the GPU tests (`-m gpu`), 120 s per test, in 8 processes stopping after 40
#   failures (pytest-xdist, on the GPU image) or, without xdist or with PYTEST_ARGS set (even
#   empty), as PYTEST_ARGS says;
# * the sweep rewrites scaling.csv/json after every point, so a killed sweep keeps its points;
# * the project is used from this checkout through PYTHONPATH: no `pip install -e`, no build.
#
# What to carry. The GPU image has torch 2.11, triton 3.6, scipy, matplotlib, tqdm, ninja,
# pytest, pytest-timeout, hypothesis and nvidia-ml-py on Python 3.12, no network, and no
# pymetis. Carry pymetis as a wheel in .whl/ (ignored by git; `carry: [".whl"]`), fetched here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pymetis==2025.2.2
# (pymetis has no other Python dependency.) tqdm and matplotlib are optional for the sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-run}
STAGE_S=${STAGE_S:-150}
DEADLINE_S=${DEADLINE_S:-570}
mkdir -p "$OUT"
stages=${*:-build tests graph pooled profile}
[ "$stages" = all ] && stages="build tests sanitize kernels profile graph pooled autotune sweep"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "installing the carried wheels failed"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# SBA_TREE=<commit> names the tree that runs, where the machine's .git is stale (scaling.json
# records it as "tree"; `git rev-parse` below then names the stale copy, not this tree).
{ nvidia-smi; git rev-parse HEAD 2>/dev/null; echo "SBA_TREE=${SBA_TREE:-}"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

status=0
stage() {   # stage NAME LOG COMMAND...: run under the time limit, log to $OUT/LOG, say how it ended
    local name=$1 log=$2; shift 2
    local limit=$STAGE_S left=$((DEADLINE_S - SECONDS - 15))    # 15 s for the kill and the copy back
    if [ $left -lt 30 ]; then
        echo "[$name] not started: $((DEADLINE_S - SECONDS)) s left of DEADLINE_S=$DEADLINE_S, under the 45 a stage needs" | tee "$OUT/$log"
        status=1; return
    fi
    [ $left -lt "$limit" ] && limit=$left
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "[$name] stopped at the ${limit} s limit" | tee -a "$OUT/$log"
    [ $rc -ne 0 ] && status=1
    tail -15 "$OUT/$log"
    echo "[$name] exit $rc"
}

for s in $stages; do
    case $s in
        build)      # the cuda backend's extension, so that tests and the sanitizer watch kernels, not nvcc
            stage build build.log python3 -c "from sba_kernels import cuda_backend as c; print('cuda backend:', c.unavailable_reason())" ;;
        tests)      # SPEC 5 on CUDA: the tests marked gpu (fp32 IEEE, tf32, bf16; the cuda backend)
            if [ -z "${PYTEST_ARGS+set}" ]; then    # 8 processes: about 100 s on the H200 (run4-run6)
                if python3 -c "import xdist" 2>/dev/null; then PYTEST_ARGS="-n 8 --maxfail 40 -rf"; else PYTEST_ARGS="-x"; fi
            fi
            # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
            stage tests tests.log python3 -m pytest -q -m gpu $PYTEST_ARGS --timeout 120 -p no:cacheprovider tests ;;
        sanitize)   # the cuda backend's kernels under compute-sanitizer, on a small case (after build)
            for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
                stage "sanitize-$tool" "sanitize-$tool.log" \
                    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 bench/cuda_small_case.py
            done ;;
        kernels)    # first timings: triton (contiguous and gathered rows), cuda and torch backends,
                    # N = 10k and 100k, M = 32, 64, 128
            for m in 32 64 128; do
                stage "kernels-m$m" "kernels-m$m.log" python3 bench/scaling.py --n 10000 100000 --subgraph-size "$m" \
                    --dtype bf16 --out "$OUT/kernels-m$m" --methods 'intra[triton]' 'intra_gathered[triton]' \
                    'intra[cuda]' 'intra[torch]' \
                    'sba_layer[triton]' 'sba_layer[cuda]' 'sba_layer[torch]'
            done ;;
        profile)    # where a forward+backward's time goes: kernels against the host's issue time, and
                    # the host's Python by function (at N = 1e5 the host took 1.6-2.6x the kernels' time, run3-run5)
            stage profile profile.log python3 bench/profile_intra.py --n 8600 100000 1000000 --host-profile \
                --out "$OUT/profile.md" ;;
        graph)      # the same calls replayed from CUDA graphs: the kernels' time with the host out of the
                    # way (where `profile` finds the host slower than the kernels), triton against its peers
            STAGE_S=${GRAPH_S:-240} stage graph graph.log python3 bench/scaling.py --n 8600 100000 1000000 --cuda-graph \
                --methods 'intra[triton]' flex_document sdpa_padded 'sba_layer[triton]' --out "$OUT/graph" ;;
        pooled)     # the pooled backward: z's gradient in the kernel (POOLED) against a pass before it
            stage pooled pooled.log python3 bench/pooled_options.py --n 100000 1000000 --out "$OUT/pooled_options.md" ;;
        autotune)   # triton_tuning: tuned against default configurations, N = 1e5 and 1e6; M = 64 (the
                    # one-tile kernels) and 128 (the tiled ones, where the compile rule's picks,
                    # bench/results/static/tuning/, replaced the blocks). Own limit (AUTOTUNE_S, default 270 s,
                    # two of them in one 600 s call): each key compiles its candidates before timing them
            for m in 64 128; do
                STAGE_S=${AUTOTUNE_S:-270} stage "autotune-m$m" "autotune-m$m.log" \
                    python3 bench/autotune.py --n 100000 1000000 --subgraph-size "$m" --out "$OUT/autotune-m$m.md"
            done ;;
        sweep)      # the main job at full size
            # shellcheck disable=SC2086  # SWEEP_ARGS is a list of words on purpose
            stage sweep scaling.log python3 bench/scaling.py --out "$OUT/scaling" ${SWEEP_ARGS:-} ;;
        *) echo "unknown stage $s"; status=1 ;;
    esac
done
exit $status
