#!/usr/bin/env bash
# The GPU session's one command: the kernel exactness/bandwidth checks, then the whole-run benchmark.
#
#   bash bench/run_gpu.sh quick   # gpu_check --quick + graph_bench --quick: about 3 minutes
#   bash bench/run_gpu.sh full    # gpu_check + graph_bench (all 6 configurations): about 8 to 9 minutes
#
# Prepare on the development machine (the GPU machine has no network and no diffusers; .whl/ is
# git-ignored: never commit wheels). diffusers' other needs (filelock, huggingface-hub>=1.32, numpy,
# regex, requests, safetensors>=0.8, Pillow) are in the GPU image (/work/.library/device/KINDS.md), and
# importlib_metadata is not used on Python 3.12; diffusers is pure Python, 6.4 MB:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1
#
# Then, with the device tool (timeout_s leaves ~30 s over LIMIT_S; graph_bench's --budget-s is what is left
# of LIMIT_S after gpu_check, so it skips trailing configurations with a note instead of being killed):
#
#   run(command="bash bench/run_gpu.sh quick", carry=[".whl"], timeout_s=300)
#   run(command="bash bench/run_gpu.sh full",  carry=[".whl"], timeout_s=600)
#
# Environment: LIMIT_S (default 270 quick, 560 full), GPU_CHECK=0 skips gpu_check.py, EXTRA passes more
# options to graph_bench.py (e.g. EXTRA="--configs tiny-b1 celebahq256-b8").
# What comes back in $OUT (5 files): run_gpu.log (everything printed), gpu_check.json,
# graph_bench[_quick].json, .md and .png (the markdown table is also the log's last lines).

set -u -o pipefail
MODE=${1:-full}
case "$MODE" in
  quick) LIMIT_S=${LIMIT_S:-270}; CHECK_ARGS="--quick"; BENCH_ARGS="--quick" ;;
  full)  LIMIT_S=${LIMIT_S:-560}; CHECK_ARGS="";        BENCH_ARGS="" ;;
  *) echo "usage: bash bench/run_gpu.sh quick|full" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
export PYTHONUNBUFFERED=1
START=$(date +%s)
left() { echo $(( LIMIT_S - ($(date +%s) - START) )); }

{
  echo "run_gpu.sh $MODE: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), limit ${LIMIT_S} s"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv 2>&1 || true
  python3 -c "import sys, torch, triton, diffusers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| diffusers', diffusers.__version__, '| cuda', torch.cuda.is_available())" \
    || { echo "imports failed: carry .whl with diffusers (see the top of this file)"; exit 1; }

  STATUS=0
  if [ "${GPU_CHECK:-1}" != "0" ]; then
    echo; echo "==== python bench/gpu_check.py $CHECK_ARGS ($(left) s left)"
    timeout -k 10 $(( $(left) - 60 )) python3 bench/gpu_check.py --out "$OUT" $CHECK_ARGS || STATUS=$?
  fi
  BUDGET=$(( $(left) - 40 ))  # soft: configurations that do not fit are skipped; the timeout below is the hard stop
  echo; echo "==== python bench/graph_bench.py $BENCH_ARGS --budget-s $BUDGET ${EXTRA:-}"
  timeout -k 5 $(( $(left) - 5 )) python3 bench/graph_bench.py --out "$OUT" $BENCH_ARGS --budget-s "$BUDGET" ${EXTRA:-} \
    || STATUS=$(( STATUS > 0 ? STATUS : $? ))
  echo; echo "run_gpu.sh $MODE: done in $(( $(date +%s) - START )) s, status $STATUS"
  exit $STATUS
} 2>&1 | tee "$LOG"
