# Sourced by bench/device_correctness.sh and bench/device_speed.sh: install the carried wheels (.whl/, made by
# bench/device_prepare.sh), put k-diffusion where tests/test_k_diffusion.py looks, print the card (exits the
# caller with 2 if the wheels cannot be installed: nothing would run); then `device_session NAME` runs
# bench/device_session.py NAME and exits with its status, printed last.
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if [ -n "${DRY:-}" ]; then
  echo "dry run: the wheels are not installed (this environment has diffusers)"
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  kd=~/.cache/kve_fast/k-diffusion-0.1.1.post1
  if ls .whl/k_diffusion-*.whl >/dev/null 2>&1 && [ ! -d "$kd" ]; then
    mkdir -p "$kd" && python3 -m zipfile -e .whl/k_diffusion-*.whl "$kd"
  fi
else
  echo "no .whl/ carried: diffusers must be importable already (bench/device_prepare.sh makes .whl/)"
fi
[ -f .whl/tree_stamp.json ] || echo "no .whl/tree_stamp.json: without .git the JSON cannot name its commit"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv 2>&1 || true

device_session() {
  python3 bench/device_session.py "$1" --out "$OUT" ${BUDGET_S:+--budget-s $BUDGET_S} ${DRY:+--dry-run}
  local rc=$?
  echo "device_$1.sh: exit $rc"
  exit $rc
}
