#!/usr/bin/env bash
# Run here (not on the device) right before the device calls, from the repository root, after the last commit:
#   bash bench/device_prepare.sh
# 1. .whl/ (git-ignored: never commit wheels) gets the packages the GPU image lacks, for Python 3.12 there:
#    diffusers 0.42.1 (pure Python; its needs are in the image, /work/.library/device/KINDS.md), and for the
#    k-diffusion checks k-diffusion 0.1.1.post1 with torchsde 0.2.6 and trampoline 0.1.2. Skipped where present.
# 2. .whl/tree_stamp.json: the commit, the dirty flag and a hash of every file that travels (the device machine's
#    copy has no .git; kve_fast.benchmark.provenance reads the stamp there, and a file changed after the stamp
#    makes the record dirty; bench.harness.write_stamp writes it). Rewrite it after every commit or edit.
# Then call the device tool with carry=[".whl"] (see bench/RESULTS.md, "Next GPU session").
set -eu -o pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" \
  2>/dev/null || grep -qx '/.whl/' .gitignore || { echo "add /.whl/ to .gitignore or .git/info/exclude first"; exit 1; }
mkdir -p .whl
for spec in diffusers==0.42.1 k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2; do
  name=${spec%%==*}; ver=${spec##*==}
  if ls .whl/"${name//-/_}"-"$ver"-*.whl >/dev/null 2>&1; then continue; fi
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
python3 - <<'PY'
from bench.harness import write_stamp
from kve_fast.benchmark.provenance import STAMP
s = write_stamp()
print(f"wrote {STAMP}: commit {s['commit']}, dirty {s['dirty']}, {len(s['files'])} files")
if s["dirty"]:
    print("WARNING: the tree is dirty: commit first, or the device JSON records dirty: true")
PY
du -sh .whl
