"""How OpenMP's waiting threads affect a CPU run: torch's default spinning, passive waiting (GOMP_SPINCOUNT=0, what
OMP_WAIT_POLICY=PASSIVE gives), spin counts in between, and one thread, quiet and beside one busy process.

    python bench/openmp_spin_check.py --reps 4 --out bench/results/DATE-cpu-openmp_spin_check.json

Each run is a fresh process that loads the bundled digits model and times ``pipe(64, 50)`` (after a 2-step warm-up).
libgomp reads GOMP_SPINCOUNT / OMP_WAIT_POLICY when torch loads it, so each setting needs its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import sys, time, torch, kve_fast
pipe = kve_fast.load_pipeline("digits"); pipe.set_progress_bar_config(disable=True)
pipe(64, 2, torch.Generator().manual_seed(0), output_type="latent")
t = time.perf_counter(); pipe(64, 50, torch.Generator().manual_seed(0), output_type="latent")
print(time.perf_counter() - t)
"""
CONFIGS = {"default": {}, "sc0": {"GOMP_SPINCOUNT": "0"}, "sc3k": {"GOMP_SPINCOUNT": "3000"},
           "sc10k": {"GOMP_SPINCOUNT": "10000"}, "sc30k": {"GOMP_SPINCOUNT": "30000"}, "t1": {"OMP_NUM_THREADS": "1"}}


def ticks():
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                x = [int(v) for v in fields[:8]]
                total += sum(x)
                busy += sum(x) - x[3] - x[4]
    return busy, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    runs, cores = [], os.cpu_count()
    for rep in range(args.reps):
        for condition in ("quiet", "busy"):
            neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
            try:
                for name, env in CONFIGS.items():
                    if condition == "busy" and name == "default":
                        continue  # minutes per run (bench/threads_check.py measures it)
                    e = {k: v for k, v in os.environ.items()
                         if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
                    e.update(env)
                    b0, t0, r0 = *ticks(), os.times()
                    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=e, check=True)
                    b1, t1, r1 = *ticks(), os.times()
                    own = (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system)
                    others = (b1 - b0) / max(t1 - t0, 1) * cores - own / (r1.elapsed - r0.elapsed)
                    rec = {"condition": condition, "config": name, "seconds": float(proc.stdout.split()[-1]),
                           "others_busy_cores": others}
                    runs.append(rec)
                    print(rep, condition, name, f"{rec['seconds']:.2f}", f"{others:.2f}", flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
