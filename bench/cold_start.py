"""Cold start of `kve-fast sample`: from process start to the first image, and where the time goes.

    python bench/cold_start.py                      # 5 runs of `kve-fast sample --device cpu` (bundled digits)
    python bench/cold_start.py --reps 5 --out bench/results/DATE-cpu-cold_start.json -- --batch-size 16
    python bench/cold_start.py --device cuda --reps 3 --triton-cache empty warm --out $OUT/cold_start.json

Each run starts a fresh Python process that runs the command (``kve_fast.cli.main``) with its phases marked:
the interpreter up, ``import kve_fast.cli`` (what ``--help`` costs), the OpenMP wait policy (``main()`` looks at
the cores for 0.1 s before torch loads, ``kve_fast/threads.py``), ``import torch``, ``import diffusers``
(``UNet2DModel``), the rest of the pipeline's imports (``kve_fast.pipeline``: diffusers' ``DiffusionPipeline``
and kve_fast's sampler), loading the model (``load_for_command``: the folder's checks, the weights), the first
model call, the first step (its two model calls), the remaining steps, and writing the image. The imports are
made in that order before the command runs (the command would make the same ones, interleaved with its
checks), so each is charged once. Times are from the parent's clock just before it starts the process.

On CUDA (``--device cuda``: `kve-fast sample --device cuda`, CUDA graphs on as by default) the model's forward
hook sees the Python forwards only: the warm-up and capture of the graphs, not their replays. The phases after
loading are then: the first model call (the CUDA context's first kernels, Triton's compilation of the step
kernels, the first warm-up forward), the later model calls run in Python (warm-up and capture), and the rest up to
the image (the replays of every step). ``--triton-cache``: ``empty`` gives each run a new, empty Triton cache (a
first run on a machine: the kernels compile), ``warm`` one cache shared by the runs and filled before the first
timed one (the kernels load from disk), ``inherit`` the environment's (default); with several, they alternate
within each repetition. The record (``--out``) holds the provenance of kve_fast.benchmark.provenance (commit,
dirty flag, card, driver, versions, command) and min / median / max of each phase; a failed run is recorded and
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
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
if sys.argv[3] == "graphed":  # the hook sees the Python forwards: warm-up and capture, not the replays
    marks.append(("later model calls run in Python (graph warm-up and capture)", calls[-1]))
    marks.append(("replays of every step, the image written", end))
else:
    marks.append(("first step (2 model calls)", calls[1]))
    marks.append(("remaining steps", calls[-1]))
    marks.append(("image written", end))
print("MARKS" + json.dumps({"rc": rc, "marks": marks, "calls": len(calls), "wait_policy": policy}))
if sys.argv[2] == "fast":
    getattr(cli, "exit_now", sys.exit)(rc)  # as the kve-fast script exits
sys.exit(rc)  # as `kve-fast` exited before 5a68a71
"""


def run_once(argv: list[str], out_dir: str, exit_kind: str = "fast", graphed: bool = False,
             triton_cache: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                            "GOMP_SPINCOUNT", "KVE_FAST_THREADS")}
    if triton_cache is not None:
        env["TRITON_CACHE_DIR"] = triton_cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv), exit_kind,
                           "graphed" if graphed else "eager"], capture_output=True, text=True,
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    p.add_argument("--device", default="cpu", help="the device `kve-fast sample` runs on (cpu, cuda, cuda:N)")
    p.add_argument("--exits", nargs="+", choices=("fast", "normal"), default=["fast"],
                   help="how the process ends: fast (kve_fast.cli.exit_now, as the kve-fast script does) and/or "
                        "normal (sys.exit: the interpreter's teardown), in turn, in one run")
    p.add_argument("--triton-cache", nargs="+", choices=("inherit", "empty", "warm"), default=["inherit"],
                   help="the Triton kernel cache of each run (see the top); several alternate")
    p.add_argument("sample_args", nargs="*", help="after --: more `kve-fast sample` options")
    return p.parse_args(argv)


def cold_runs(run, args, argv: list[str], kinds) -> None:
    """Every repetition of every kind (exit, Triton cache), each in a fresh process; a failed run is recorded."""
    graphed = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as out_dir:
        warm_dir = os.path.join(out_dir, "triton-warm")
        if "warm" in args.triton_cache:  # filled before the first timed run
            try:
                run_once(argv, out_dir, "fast", graphed, warm_dir)
            except Exception as exc:  # noqa: BLE001 - recorded; the timed runs say more
                run.result["failures"].append(f"filling the warm Triton cache: {exc}"[:2000])
        for rep in range(args.reps):
            for kind, cache in kinds:
                where = {"inherit": None, "warm": warm_dir,
                         "empty": os.path.join(out_dir, f"triton-empty-{rep}-{kind}")}[cache]
                try:
                    rec = run_once(argv, out_dir, kind, graphed, where)
                except Exception as exc:  # noqa: BLE001 - a failed run is a finding; the others still run
                    run.result["failures"].append(f"run {rep} ({kind} exit, {cache} Triton cache): {exc}"[:2000])
                    print(f"run {rep} ({kind} exit, {cache} cache): FAILED {str(exc)[:500]}", flush=True)
                    continue
                rec["triton_cache"] = cache
                run.result["runs"].append(rec)
                print(f"run {rep} ({kind} exit, {cache} Triton cache): first image {rec['first_image_s']:.2f} s, exit "
                      f"{rec['total_s']:.2f} s; {rec['wait_policy'] or 'OpenMP default wait'}", flush=True)


def summarize(result: dict, kinds, one_cache: bool) -> None:
    """min / median / max of each phase, the first image and the process's end, per kind; printed as a table."""
    from bench.harness import stats, time_stats

    result["summary"] = {}
    for kind, cache in kinds:
        runs = [r for r in result["runs"] if r["exit"] == kind and r["triton_cache"] == cache]
        if not runs:
            continue
        names = list(runs[0]["phases_s"])
        key = kind if one_cache and cache == "inherit" else f"{kind}, {cache} Triton cache"
        result["summary"][key] = {"phases_s": {n: stats([r["phases_s"][n] for r in runs]) for n in names},
                                  "first_image_s": stats([r["first_image_s"] for r in runs]),
                                  "total_s": stats([r["total_s"] for r in runs]),
                                  "first_image": time_stats([r["first_image_s"] for r in runs])}
        print(f"{key}: {'phase':46s} {'min':>6s} {'median':>7s} {'max':>6s}  (s, {len(runs)} runs)")
        table = result["summary"][key]
        for n in names + ["first_image_s", "total_s"]:
            s = table["phases_s"].get(n) or table[n]
            print(f"{n:58s} {s['min']:6.2f} {s['median']:7.2f} {s['max']:6.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = ["sample", "--device", args.device, "--quiet", "--out", "grid.png"] + args.sample_args
    sys.path.insert(0, str(ROOT))
    from bench.harness import ScriptRun

    run = ScriptRun("cold_start", args.device, path=args.out,
                    argv=[os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    prov = run.provenance
    run.result.update(env={"date": prov["date_utc"], "host": prov["host"], "cores": len(os.sched_getaffinity(0)),
                           "torch": prov["torch"], "python": prov["python"], "commit": prov["commit"],
                           "tree_clean": None if prov["dirty"] is None else not prov["dirty"],
                           "command": prov["command"], "kve-fast": " ".join(["kve-fast"] + argv)},
                      runs=[], failures=[])
    kinds = [(e, c) for e in args.exits for c in args.triton_cache]
    cold_runs(run, args, argv, kinds)
    summarize(run.result, kinds, len(args.triton_cache) == 1)
    for f in run.result["failures"]:
        run.check("a cold run", False, f[:300])
    run.check(f"{len(run.result['runs'])} cold runs", bool(run.result["runs"]))
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
