"""Cold start of `kve-fast sample`: from process start to the first image, and where the time goes.

    python bench/cold_start.py                      # 5 runs of `kve-fast sample --device cpu` (bundled digits)
    python bench/cold_start.py --reps 5 --out bench/results/DATE-cpu-cold_start.json -- --batch-size 16

Each run starts a fresh Python process that runs the command (``kve_fast.cli.main``) with its phases marked:
the interpreter up, ``import kve_fast.cli`` (what ``--help`` costs), the OpenMP wait policy (``main()`` looks at
the cores for 0.1 s before torch loads, ``kve_fast/threads.py``), ``import torch``, ``import diffusers``
(``UNet2DModel``), the rest of the pipeline's imports (``kve_fast.pipeline``: diffusers' ``DiffusionPipeline``
and kve_fast's sampler), loading the model (``load_for_command``: the folder's checks, the weights), the first
model call, the first step (its two model calls), the remaining steps, and writing the image. The imports are
made in that order before the command runs (the command would make the same ones, interleaved with its
checks), so each is charged once. Times are from the parent's clock just before it starts the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys, time
marks = [("interpreter up", time.time())]
import kve_fast.cli as cli
marks.append(("import kve_fast.cli", time.time()))
from kve_fast.threads import wait_policy_for
policy = wait_policy_for("cpu")  # what main() does before torch loads
marks.append(("OpenMP wait policy (a look at the cores)", time.time()))
import torch
marks.append(("import torch", time.time()))
from diffusers import UNet2DModel
marks.append(("import diffusers (UNet2DModel)", time.time()))
import kve_fast.pipeline
marks.append(("import kve_fast.pipeline (DiffusionPipeline, the sampler)", time.time()))
calls = []
real = cli.load_for_command
def load(model, device):
    start = time.time()
    pipe = real(model, device)
    marks.append(("load the model", time.time()))
    pipe.unet.register_forward_hook(lambda *a: calls.append(time.time()))
    return pipe
cli.load_for_command = load
rc = cli.main(json.loads(sys.argv[1]))
end = time.time()
marks.append(("first model call", calls[0]))
marks.append(("first step (2 model calls)", calls[1]))
marks.append(("remaining steps", calls[-1]))
marks.append(("image written", end))
print("MARKS" + json.dumps({"rc": rc, "marks": marks, "calls": len(calls), "wait_policy": policy}))
if sys.argv[2] == "fast":
    getattr(cli, "exit_now", sys.exit)(rc)  # as the kve-fast script exits
sys.exit(rc)  # as `kve-fast` exited before 5a68a71
"""


def run_once(argv: list[str], out_dir: str, exit_kind: str = "fast") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT", "KVE_FAST_THREADS")}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), exit_kind], capture_output=True, text=True,
                          env=env, cwd=out_dir, timeout=900)
    exited = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MARKS")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    data = json.loads(line[len("MARKS"):])
    phases, last = {}, start
    for name, t in data["marks"]:
        phases[name] = t - last
        last = t
    phases["process exit"] = exited - last
    return {"exit": exit_kind, "phases_s": phases, "first_image_s": data["marks"][-1][1] - start, "total_s": exited - start,
            "model_calls": data["calls"], "wait_policy": data["wait_policy"]}


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--exits", nargs="+", choices=("fast", "normal"), default=["fast"],
                   help="how the process ends: fast (kve_fast.cli.exit_now, as the kve-fast script does) and/or "
                        "normal (sys.exit: the interpreter's teardown), in turn, in one run")
    p.add_argument("sample_args", nargs="*", help="after --: more `kve-fast sample` options")
    args = p.parse_args()
    argv = ["sample", "--device", "cpu", "--quiet", "--out", "grid.png"] + args.sample_args
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    import torch

    result = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
                      "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                      "python": platform.python_version(), "commit": git.stdout.strip(), "tree_clean": not dirty,
                      "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                      "kve-fast": " ".join(["kve-fast"] + argv)}, "runs": []}
    with tempfile.TemporaryDirectory() as out_dir:
        for rep in range(args.reps):
            for kind in args.exits:
                rec = run_once(argv, out_dir, kind)
                result["runs"].append(rec)
                print(f"run {rep} ({kind} exit): first image {rec['first_image_s']:.2f} s, exit {rec['total_s']:.2f} "
                      f"s; {rec['wait_policy'] or 'OpenMP default wait'}", flush=True)
    names = list(result["runs"][0]["phases_s"])
    result["summary"] = {}
    for kind in args.exits:
        runs = [r for r in result["runs"] if r["exit"] == kind]
        result["summary"][kind] = {"phases_s": {n: summary([r["phases_s"][n] for r in runs]) for n in names},
                                   "first_image_s": summary([r["first_image_s"] for r in runs]),
                                   "total_s": summary([r["total_s"] for r in runs])}
        print(f"{kind} exit: {'phase':46s} {'min':>6s} {'median':>7s} {'max':>6s}  (s, {len(runs)} runs)")
        table = result["summary"][kind]
        for n in names + ["first_image_s", "total_s"]:
            s = table["phases_s"].get(n) or table[n]
            print(f"{n:58s} {s['min']:6.2f} {s['median']:7.2f} {s['max']:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
