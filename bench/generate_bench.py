"""``kve-fast generate`` throughput on the CPU: this tree against older ones, 1 process and torchrun, in one run.

    python bench/generate_bench.py --tree before=/tmp/main_tree --rounds 5 \\
        --kinds now:one,now:t2,before:one,before:t2 --out bench/results/DATE-cpu-generate_bench.json
    python bench/generate_bench.py --seeds 0-127 --rounds 1 --steps 10        # a quick look at this tree

A kind is ``TREE:MODE``. ``TREE`` is ``now`` (this checkout) or a name given with ``--tree NAME=PATH`` (an older
kve_fast tree, e.g. ``git archive main | tar -x -C /tmp/main_tree``: run with ``PYTHONPATH=PATH``, the same
Python, torch and diffusers). ``MODE``:

    one   kve-fast generate --seeds S --outdir DIR --steps N --batch B           # 1 process, its defaults
    w1    the same with --workers 1                                              # (trees that have --workers)
    t2    torchrun --standalone --nproc_per_node=2 -m kve_fast generate ...     # 2 processes

Each run writes into a fresh folder, with the bundled digits model and backend auto (torch on the CPU). The
kinds of a round run one after the other and the rounds repeat, so a busy machine slows every kind alike; the
ratios of medians are the figures to compare. Recorded per run: the command's own images/s (sampling and
writing, first batch to last), the wall time (with start-up), the load average, the other processes' load (busy
cores from /proc/stat minus this run's own CPU time, children included), and one SHA-256 over every PNG (name and
bytes): the kinds of a tree must agree (the same files however the work is split). A failed run is reported and
left out of the figures. Results: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from kve_fast.threads import busy_ticks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = re.compile(r"([0-9.]+) images/s")
MODES = ("one", "w1", "t2")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(tree: str, *args) -> str:
    proc = subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _files_sha(outdir: str) -> tuple[str, int]:
    """One SHA-256 over every PNG under ``outdir`` (relative name and bytes, in name order), and their count."""
    h, count = hashlib.sha256(), 0
    found = []
    for folder, _, names in os.walk(outdir):
        for name in names:
            if name.endswith(".png") and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), outdir))
    for rel in sorted(found):
        with open(os.path.join(outdir, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + hashlib.sha256(f.read()).digest())
        count += 1
    return h.hexdigest(), count


def _command(mode: str, args, outdir: str) -> list[str]:
    common = ["generate", "--seeds", args.seeds, "--outdir", outdir, "--steps", str(args.steps),
              "--batch", str(args.batch)]
    if mode == "t2":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", "kve_fast", *common]
    return [sys.executable, "-m", "kve_fast", *common, *(["--workers", "1"] if mode == "w1" else [])]


def _run(kind: str, tree: str, args) -> dict:
    mode = kind.split(":")[1]
    outdir = os.path.join(tempfile.mkdtemp(prefix="kve_gen_bench_"), "out")
    argv = _command(mode, args, outdir)
    env = dict(os.environ, PYTHONPATH=tree)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KVE_FAST_THREADS",
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    load = os.getloadavg()[0]
    usage0, ticks0, start = resource.getrusage(resource.RUSAGE_CHILDREN), busy_ticks(), time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    ticks1, usage1 = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    cores = len(os.sched_getaffinity(0))
    busy = (ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1) * cores
    sha, count = _files_sha(outdir)
    shutil.rmtree(os.path.dirname(outdir), ignore_errors=True)
    match = RATE.search(proc.stdout)
    run = {"kind": kind, "argv": argv[1:], "images_per_second": float(match.group(1)) if match else None,
           "wall_s": wall, "load_average": load, "others_busy_cores": max(busy - own / wall, 0.0),
           "own_cpu_s": own, "files_sha256": sha, "files": count, "returncode": proc.returncode,
           "summary": proc.stdout.strip().splitlines()[-1:] or None}
    if proc.returncode != 0 or match is None:  # reported, and kept out of the figures
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "terminate" in line]
        run["failure"] = " | ".join(lines[:3]) or " | ".join(proc.stderr.strip().splitlines()[-2:])
    return run


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-511")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="an older kve_fast tree to run beside this one (repeatable)")
    parser.add_argument("--kinds", default=None, help="comma-separated TREE:MODE (default: now:one,now:t2 and "
                                                      "one,t2 of each --tree)")
    parser.add_argument("--out", default=None, help="also write every run and the summary here (JSON)")
    args = parser.parse_args(argv)
    trees = {"now": ROOT}
    for item in args.tree:
        name, _, path = item.partition("=")
        if not name or not path or name == "now":
            parser.error(f"--tree: expected NAME=PATH (NAME not 'now'), got {item!r}")
        trees[name] = os.path.abspath(path)
    kinds = args.kinds.split(",") if args.kinds else [f"{t}:{m}" for t in trees for m in ("one", "t2")]
    for kind in kinds:
        tree, _, mode = kind.partition(":")
        if tree not in trees or mode not in MODES:
            parser.error(f"--kinds: {kind!r} is not TREE:MODE with TREE in {sorted(trees)} and MODE in {MODES}")
    import torch

    dirty = _git(ROOT, "status", "--porcelain", "--untracked-files=no")
    result = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpu": _cpu_model(),
                      "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                      "torch": torch.__version__, "commit": _git(ROOT, "rev-parse", "--short", "HEAD"),
                      "tree_clean": not dirty, "trees": trees,
                      "command": " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])},
              "settings": {"seeds": args.seeds, "steps": args.steps, "batch": args.batch, "rounds": args.rounds},
              "runs": []}
    print(f"commit {result['env']['commit']} (tree {'clean' if not dirty else 'DIRTY'}), {result['env']['cpu']}, "
          f"{result['env']['cores']} cores", flush=True)
    for r in range(args.rounds):
        for kind in kinds:
            run = dict(_run(kind, trees[kind.split(':')[0]], args), round=r)
            result["runs"].append(run)
            failed = f"  FAILED (exit {run['returncode']}): {run['failure']}" if "failure" in run else ""
            print(f"round {r} {kind:12s} {run['images_per_second'] or 0:7.2f} images/s  wall {run['wall_s']:5.1f} s  "
                  f"load {run['load_average']:.2f}  others busy {run['others_busy_cores']:.2f} cores  "
                  f"files {run['files_sha256'][:12]} ({run['files']}){failed}", flush=True)
    table = {}
    for kind in kinds:
        ok = [x for x in result["runs"] if x["kind"] == kind and "failure" not in x]
        failed = sum(x["kind"] == kind and "failure" in x for x in result["runs"])
        if not ok:
            table[kind] = {"failed": failed}
            continue
        table[kind] = {"images_per_second": _summary([x["images_per_second"] for x in ok]),
                       "wall_s": _summary([x["wall_s"] for x in ok]),
                       "others_busy_cores": _summary([x["others_busy_cores"] for x in ok]),
                       "load_average": _summary([x["load_average"] for x in ok]),
                       "files_sha256": sorted({x["files_sha256"] for x in ok}), "failed": failed}
    same = {}
    for tree in trees:
        shas = {s for k, v in table.items() if k.startswith(tree + ":") for s in v.get("files_sha256", [])}
        if shas:
            same[tree] = len(shas) == 1
    ratios = {}
    medians = {k: v["images_per_second"]["median"] for k, v in table.items() if "images_per_second" in v}
    for kind, value in medians.items():
        tree, _, mode = kind.partition(":")
        for other in trees:
            base = f"{other}:{mode}"
            if other != tree and tree == "now" and base in medians:
                ratios[f"{kind} / {base}"] = value / medians[base]
    result.update(summary=table, same_files_within_tree=same, ratios_of_medians=ratios)
    print("\n| kind | images/s min / median / max | wall s (median) | others busy cores (median) | failed |")
    print("|---|---|---|---|---|")
    for kind, v in table.items():
        if "images_per_second" not in v:
            print(f"| {kind} | all {v['failed']} failed | | | |")
            continue
        s = v["images_per_second"]
        print(f"| {kind} | {s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f} | {v['wall_s']['median']:.1f} | "
              f"{v['others_busy_cores']['median']:.2f} | {v['failed']} |")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x (medians)")
    print("same files within each tree:", same)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
