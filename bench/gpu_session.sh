#!/usr/bin/env bash
# One device-tool call that checks what a GPU session can check in about 9 minutes, each stage in its
# own time slot (seconds, overridable), most valuable first:
#   build  the CUDA extension's install-time build (setup.py build_ext --inplace), in the background,
#          niced, 4 jobs (about 20 s on the H100 machine's 16 cores)
#   1. gpu_check --quick: kernels and whole pipelines (eager and graphed) against diffusers    GC_S=120
#   2. kdiffusion_check --quick --parts scalars,exact: the drop-in against the real package    KD_S=50
#   3. the CUDA tests (real graph capture, the extension, k-diffusion) on this GPU            TEST_S=70
#   4. graph_bench $GB_ARGS (default: the two big configurations, graphed rows only)          GB_S=180
#   5. csrc_check --quick --no-setup-build: the extension's exactness, bandwidth, cold start   rest
# Usage (device tool): run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=570)
# Needs in .whl/ (git-ignored): diffusers 0.42.1, k-diffusion 0.1.1.post1, torchsde 0.2.6, trampoline
# 0.1.2 (the download command is in bench/RESULTS.md). Results in $OUT: session.log (everything printed)
# and each script's json/md (at most 8 files come back, so PNGs are dropped).
set -u -o pipefail
OUT=${OUT:-bench/out}
LIMIT_S=${LIMIT_S:-550}
GB_ARGS=${GB_ARGS:---configs ncsnpp-b64 celebahq256-b8 --no-eager}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
t() { echo $(( $(date +%s) - START )); }
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
  kd=~/.cache/kve_fast/k-diffusion-0.1.1.post1  # where tests/test_k_diffusion.py looks before downloading
  mkdir -p "$kd" && python3 -m zipfile -e .whl/k_diffusion-*.whl "$kd"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  (t0=$(date +%s); MAX_JOBS=4 nice -n 19 python3 setup.py build_ext --inplace >/tmp/csrc_build.log 2>&1;
   echo "csrc build (setup.py build_ext --inplace, MAX_JOBS=4, niced): exit $? in $(( $(date +%s) - t0 )) s" \
     >>/tmp/csrc_build.log) &
  BUILD=$!
  echo "==== [$(t) s] 1. gpu_check --quick (the csrc build runs in the background)"
  timeout -k 5 ${GC_S:-120} python3 bench/gpu_check.py --quick --out "$OUT"
  echo "==== [$(t) s] 2. kdiffusion_check --quick --parts scalars,exact"
  timeout -k 5 ${KD_S:-50} python3 bench/kdiffusion_check.py --quick --parts scalars,exact --out "$OUT/kd"
  wait $BUILD; tail -3 /tmp/csrc_build.log
  echo "==== [$(t) s] 3. CUDA tests"
  timeout -k 5 ${TEST_S:-70} python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py tests/test_csrc.py \
    tests/test_k_diffusion.py 2>&1 | tail -40
  echo "==== [$(t) s] 4. graph_bench $GB_ARGS"
  GB=${GB_S:-180}
  timeout -k 5 $GB python3 bench/graph_bench.py --out "$OUT" --budget-s $(( GB - 15 )) $GB_ARGS
  echo "==== [$(t) s] 5. csrc_check --quick --no-setup-build ($(( LIMIT_S - $(t) )) s left)"
  timeout -k 5 $(( LIMIT_S - $(t) )) python3 bench/csrc_check.py --quick --no-setup-build --out "$OUT"
  echo "==== [$(t) s] done"
} 2>&1 | tee "$OUT/session.log"
find "$OUT" -name '*.png' -delete
[ -f "$OUT/kd/kdiffusion_check.json" ] && mv "$OUT/kd/kdiffusion_check.json" "$OUT/kd_kdiffusion_check.json"
rm -rf "$OUT/kd"
ls -la "$OUT"
