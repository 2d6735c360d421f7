#!/usr/bin/env bash
# One device-tool call that checks what a GPU session can check in about 9 minutes. Each stage runs in its
# own `timeout` (seconds, overridable), capped by what is left of LIMIT_S (default 555; a stage with under
# 15 s left is skipped), most valuable first:
#   build  the CUDA extension's install-time build (setup.py build_ext --inplace), in the background,
#          niced, 4 jobs (about 20 s on the H100 machine's 16 cores); waited for before stage 2
#   1. gpu_check --quick: kernels and whole pipelines (eager and graphed) against diffusers     GC_S=85
#   2. kdiffusion_check --quick (scalars, exact, timing): the k-diffusion drop-in against the   KD_S=140
#      real package, eager AND graphed (cuda_graph=True); its last line says whether
#      kve_fast.graphs.KDIFFUSION_DEFAULT_MODE can be "auto"
#   3. the CUDA tests (real graph capture, k-diffusion graphs, low precision, the extension,    TEST_S=100
#      k-diffusion), without -x; full output in session.log, its last 60 lines in the stream
#   4. graph_bench $GB_ARGS (default: the one configuration not measured yet, graphed rows)      GB_S=185
#   5. precision_check --device cuda --quick, if bench/precision_check.py exists                PC_S=60
#   6. fir_bench, if bench/fir_bench.py exists                                                  FIR_S=120
#   7. csrc_check --quick --no-setup-build: the extension's exactness, bandwidth, cold start    the rest
#   4b. gb16: graph_bench $GB16_ARGS (bf16 UNet, graphs, fast noise vs the fp32 reference and the
#       bf16 floor: issue 12's speed targets; not in the default set)                         GB16_S=200
# STAGES (default "gc kd tests gb pc fir csrc") picks stages by those names. One call cannot hold them
# all (10 minutes at most); the next session's two calls, back to back on the warm machine:
#   STAGES="kd tests gb gc" bash bench/gpu_session.sh      (issues 8 and 9; about 8 minutes)
#   STAGES="gb16 pc fir" bash bench/gpu_session.sh         (issue 12; about 6 minutes)
# Superseded by bench/device_correctness.sh and bench/device_speed.sh (issue 20: provenance, budgets, one JSON).
# Exit status: 1 if any stage exited non-zero, timed out or crashed (the last line lists them), else 0.
# Usage (device tool): run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Needs in .whl/ (git-ignored): diffusers 0.42.1, k-diffusion 0.1.1.post1, torchsde 0.2.6, trampoline
# 0.1.2 (the download command is in bench/RESULTS.md). Results in $OUT (at most 8 files come back):
# session.log (everything printed, then the full pytest output and every script's .md/.txt/.log appended)
# and each script's json; PNGs are dropped; if more than 8 files remain, the extra JSONs are bundled into
# more_results.json.
set -u -o pipefail
OUT=${OUT:-bench/out}
LIMIT_S=${LIMIT_S:-555}
GB_ARGS=${GB_ARGS:---configs celebahq256-b8 --no-eager}
GB16_ARGS=${GB16_ARGS:---unet-dtype bf16 --configs ncsnpp-b64 celebahq256-b8 --no-eager}
STAGES=" ${STAGES:-gc kd tests gb pc fir csrc} "
mkdir -p "$OUT"
FAILED=$(mktemp)  # one line per failed stage: the stages run inside `{ ...; } | tee`, a subshell
export PYTHONUNBUFFERED=1
START=$(date +%s)
t() { echo $(( $(date +%s) - START )); }
on() { [[ "$STAGES" == *" $1 "* ]]; }
# stage NAME SLOT_S CMD...: CMD under `timeout`, at most SLOT_S and at most what is left of LIMIT_S
stage() {
  local name=$1 s=$2 left rc
  shift 2
  left=$(( LIMIT_S - $(t) ))
  (( s > left )) && s=$left
  if (( s < 15 )); then echo "==== [$(t) s] $name: SKIPPED (${left} s left of LIMIT_S=${LIMIT_S})"; return 0; fi
  echo "==== [$(t) s] $name (timeout ${s} s)"
  timeout -k 5 "$s" "$@"
  rc=$?
  echo "==== [$(t) s] $name: exit ${rc}$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
  (( rc != 0 )) && echo "$name: exit $rc" >>"$FAILED"
  return 0
}
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; echo "wheel install" >>"$FAILED"; exit 1; }
  export PYTHONPATH=/tmp/site
  kd=~/.cache/kve_fast/k-diffusion-0.1.1.post1  # where tests/test_k_diffusion.py looks before downloading
  mkdir -p "$kd" && python3 -m zipfile -e .whl/k_diffusion-*.whl "$kd"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  (t0=$(date +%s); MAX_JOBS=4 timeout 240 nice -n 19 python3 setup.py build_ext --inplace >/tmp/csrc_build.log 2>&1;
   echo "csrc build (setup.py build_ext --inplace, MAX_JOBS=4, niced): exit $? in $(( $(date +%s) - t0 )) s" \
     >>/tmp/csrc_build.log) &
  BUILD=$!
  on gc && stage "1. gpu_check --quick (the csrc build runs in the background)" "${GC_S:-85}" \
    python3 bench/gpu_check.py --quick --out "$OUT"
  wait $BUILD; tail -3 /tmp/csrc_build.log
  on kd && stage "2. kdiffusion_check --quick (eager and graphed; backend cuda too if the build worked)" \
    "${KD_S:-140}" python3 bench/kdiffusion_check.py --quick --out "$OUT"
  if on tests; then
    stage "3. CUDA tests (full output appended to session.log)" "${TEST_S:-100}" bash -c 'python3 -m pytest -q \
      -p no:cacheprovider -rfEs --tb=short tests/test_graphs.py tests/test_graphs_kdiffusion.py tests/test_lowp.py \
      tests/test_csrc.py tests/test_k_diffusion.py >"$0" 2>&1' "$OUT/pytest.log"
    tail -60 "$OUT/pytest.log"  # ends with pytest's summary line (none if it timed out)
  fi
  GB=${GB_S:-185}
  on gb && stage "4. graph_bench $GB_ARGS" "$GB" python3 bench/graph_bench.py --out "$OUT" --budget-s $(( GB - 15 )) $GB_ARGS
  GB16=${GB16_S:-200}
  on gb16 && stage "4b. graph_bench $GB16_ARGS (issue 12's speed targets)" "$GB16" \
    python3 bench/graph_bench.py --out "$OUT" --budget-s $(( GB16 - 15 )) $GB16_ARGS
  if on pc; then
    if [ -f bench/precision_check.py ]; then
      stage "5. precision_check --device cuda --quick" "${PC_S:-60}" \
        python3 bench/precision_check.py --device cuda --quick --out "$OUT"
    else echo "==== [$(t) s] 5. precision_check: bench/precision_check.py is not in this tree, skipped"; fi
  fi
  if on fir; then
    if [ -f bench/fir_bench.py ]; then
      stage "6. fir_bench" "${FIR_S:-120}" python3 bench/fir_bench.py --out "$OUT"
    else echo "==== [$(t) s] 6. fir_bench: bench/fir_bench.py is not in this tree, skipped"; fi
  fi
  on csrc && stage "7. csrc_check --quick --no-setup-build (what is left)" 600 \
    python3 bench/csrc_check.py --quick --no-setup-build --out "$OUT"
  echo "==== [$(t) s] done"
} 2>&1 | tee "$OUT/session.log"
# At most 8 files come back: drop PNGs, append the text outputs (pytest's, the scripts' markdown) to
# session.log, and bundle JSONs beyond that into one.
find "$OUT" -type f -name '*.png' -delete
find "$OUT" -type f \( -name '*.md' -o -name '*.txt' -o -name '*.log' \) ! -path "$OUT/session.log" -print \
  | sort | while read -r f; do
    printf '\n\n===== %s\n' "${f#"$OUT"/}" >>"$OUT/session.log"; cat "$f" >>"$OUT/session.log"; rm -f "$f"
  done
python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
if len(files) > 8:
    keep = {"session.log", "kdiffusion_check.json", "gpu_check.json", "graph_bench.json", "csrc_check.json"}
    extra = [f for f in files if f not in keep]
    bundle = {}
    for f in extra:
        path = os.path.join(out, f)
        try:
            text = open(path, encoding="utf-8").read()
            try:
                bundle[f] = json.loads(text)
            except ValueError:
                bundle[f] = text
        except (OSError, UnicodeDecodeError) as exc:
            bundle[f] = f"not bundled: {type(exc).__name__} (binary, {os.path.getsize(path)} bytes)"
        os.remove(path)
    with open(os.path.join(out, "more_results.json"), "w") as fh:
        json.dump(bundle, fh, indent=1)
    print(f"bundled {len(extra)} files into more_results.json: {', '.join(extra)}")
EOF
find "$OUT" -mindepth 1 -type d -empty -delete
ls -la "$OUT"
if [ -s "$FAILED" ]; then
  echo "gpu_session.sh: FAIL: $(paste -sd ';' "$FAILED")"
  exit 1
fi
echo "gpu_session.sh: PASS: every stage exited 0"
