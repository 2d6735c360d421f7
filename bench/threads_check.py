"""CPU threads beside a busy process: `kve-fast sample` and the Python API, quiet and with a busy neighbour.

    python bench/threads_check.py                       # 5 repeats, ~10 minutes on a 2-core machine
    python bench/threads_check.py --reps 3 --out bench/results/DATE-cpu-threads_check.json

Each repeat runs every configuration once, in turn, in both conditions: "quiet" (no neighbour started here;
other users' load is measured and reported) and "busy" (one busy-loop process started here, as the issue's
"one busy neighbour"). Configurations:

- ``cli before``: ``kve-fast sample`` as at 25c8ced: torch's thread count with OpenMP's default spin-waiting
  (``KVE_FAST_THREADS=off`` turns this package's thread handling off);
- ``cli now``: ``kve-fast sample`` as shipped: torch's count, threads that sleep while they wait;
- ``cli 1 thread``: ``kve-fast sample --threads 1``, the single-thread time the issue's target refers to;
- ``api before`` / ``api for_call``: the same 64 digits through ``pipe(...)`` in a fresh Python process that
  imported torch first (as a user's script does), without and with ``kve_fast.threads.for_call("cpu")``.

The time is the sampling time (the command's own "in X s"; the pipe call for the API), model loading excluded;
the process's wall time is recorded too. Also recorded per run: the other processes' load (busy cores, from
/proc/stat, minus this run's own CPU time) and a SHA-256 of the result (the PNG; the API's final latents), the
same in every configuration of a kind for the bundled model, whose CPU operators give the same bits with any
thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import ScriptRun, busy_neighbour, measure_load, stats  # noqa: E402
KVE = [sys.executable, "-m", "kve_fast"]
API = """
import sys, time, hashlib, torch, kve_fast
pipe = kve_fast.load_pipeline("digits"); pipe.set_progress_bar_config(disable=True)
use = sys.argv[1] == "for_call"
t = time.perf_counter()
if use:
    import warnings
    warnings.simplefilter("ignore")
    with kve_fast.threads.for_call("cpu") as choice:
        x = pipe(64, 50, torch.Generator().manual_seed(0), output_type="latent").images
    threads = choice.threads or torch.get_num_threads()
else:
    x = pipe(64, 50, torch.Generator().manual_seed(0), output_type="latent").images
    threads = torch.get_num_threads()
print("SECONDS", time.perf_counter() - t, "THREADS", threads, "SHA", hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""
CONFIGS = {
    "cli before": ("cli", [], {"KVE_FAST_THREADS": "off"}),
    "cli now": ("cli", [], {}),
    "cli 1 thread": ("cli", ["--threads", "1"], {}),
    "api before": ("api", ["plain"], {}),
    "api for_call": ("api", ["for_call"], {}),
}


def run_one(name: str, out_dir: str) -> dict:
    kind, extra, env_extra = CONFIGS[name]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KVE_FAST_THREADS")}
    env.update(env_extra)
    png = os.path.join(out_dir, "grid.png")
    cmd = KVE + ["sample", "--out", png, "--device", "cpu"] + extra if kind == "cli" else \
        [sys.executable, "-c", API] + extra
    with measure_load() as load:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out_dir, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    rec = {"config": name, "wall_s": load.wall_s, "others_busy_cores": load.others_busy_cores}
    if kind == "cli":
        m = re.search(r"in ([0-9.]+) s on cpu, (\d+) thread", proc.stdout)
        rec.update(seconds=float(m.group(1)), threads=int(m.group(2)),
                   sha256=hashlib.sha256(Path(png).read_bytes()).hexdigest())
    else:
        m = re.search(r"SECONDS ([0-9.e-]+) THREADS (\d+) SHA (\w+)", proc.stdout)
        rec.update(seconds=float(m.group(1)), threads=int(m.group(2)), sha256=m.group(3))
    return rec


def measure(run, args) -> None:
    """Every repetition: each condition (the busy neighbour started for "busy"), each configuration in turn."""
    with tempfile.TemporaryDirectory() as out_dir:
        for rep in range(args.reps):
            for condition in args.conditions:
                with busy_neighbour(condition == "busy"):
                    for name in args.configs:
                        rec = dict(run_one(name, out_dir), condition=condition, rep=rep)
                        run.result["runs"].append(rec)
                        print(f"rep {rep} {condition:5s} {name:13s} {rec['seconds']:7.2f} s ({rec['threads']} threads; "
                              f"others busy {rec['others_busy_cores']:.2f} cores)", flush=True)


def summarize(result: dict, args) -> None:
    """min / median / max per condition and configuration, the issue's ratios of medians, the same images?"""
    table = {}
    for condition in args.conditions:
        for name in args.configs:
            runs = [r for r in result["runs"] if r["condition"] == condition and r["config"] == name]
            table[f"{condition} / {name}"] = {"seconds": stats([r["seconds"] for r in runs]),
                                              "others_busy_cores": stats([r["others_busy_cores"] for r in runs]),
                                              "threads": sorted({r["threads"] for r in runs})}
    ratios = {}
    for condition in args.conditions:
        one = table.get(f"{condition} / cli 1 thread", {}).get("seconds", {}).get("median")
        for name in args.configs:
            if one:
                ratios[f"{condition} / {name} vs {condition} / cli 1 thread"] = (
                    table[f"{condition} / {name}"]["seconds"]["median"] / one)
        before = table.get(f"{condition} / cli before", {}).get("seconds", {}).get("median")
        now = table.get(f"{condition} / cli now", {}).get("seconds", {}).get("median")
        if before and now:
            ratios[f"{condition} / cli now vs cli before"] = now / before
    same = {kind: len({r["sha256"] for r in result["runs"] if CONFIGS[r["config"]][0] == kind}) <= 1
            for kind in ("cli", "api")}
    result.update(summary=table, ratios=ratios, same_images=same)
    for key, s in table.items():
        sec = s["seconds"]
        print(f"{key:28s} {sec['min']:7.2f} {sec['median']:7.2f} {sec['max']:7.2f} s (min/median/max of {sec['n']}); "
              f"threads {s['threads']}; others busy {s['others_busy_cores']['median']:.2f} cores (median)")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")
    print("same images in every run (PNG for the command, latents for the API):", same)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--conditions", nargs="+", choices=("quiet", "busy"), default=["quiet", "busy"])
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    import torch

    from kve_fast.generate import device_identity

    run = ScriptRun("threads_check", "cpu", path=args.out, argv=[os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    prov = run.provenance
    run.result.update(env={"date": prov["date_utc"], "host": prov["host"], "cores": len(os.sched_getaffinity(0)),
                           "cpu": device_identity(torch.device("cpu"))["cpu"], "torch": prov["torch"],
                           "python": prov["python"], "commit": (prov["commit"] or "")[:7],
                           "tree_clean": None if prov["dirty"] is None else not prov["dirty"],
                           "command": prov["command"]}, runs=[])
    measure(run, args)
    summarize(run.result, args)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
