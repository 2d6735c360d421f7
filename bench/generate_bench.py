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
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.harness import ScriptRun, measure_load, stats  # noqa: E402
RATE = re.compile(r"([0-9.]+) images/s")
MODES = ("one", "w1", "t2")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    loadavg = os.getloadavg()[0]
    with measure_load() as load:
        proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    sha, count = _files_sha(outdir)
    shutil.rmtree(os.path.dirname(outdir), ignore_errors=True)
    match = RATE.search(proc.stdout)
    run = {"kind": kind, "argv": argv[1:], "images_per_second": float(match.group(1)) if match else None,
           "wall_s": load.wall_s, "load_average": loadavg, "others_busy_cores": load.others_busy_cores,
           "own_cpu_s": load.own_cpu_s, "files_sha256": sha, "files": count, "returncode": proc.returncode,
           "summary": proc.stdout.strip().splitlines()[-1:] or None}
    if proc.returncode != 0 or match is None:  # reported, and kept out of the figures
        lines = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "terminate" in line]
        run["failure"] = " | ".join(lines[:3]) or " | ".join(proc.stderr.strip().splitlines()[-2:])
    return run


def parse_args(argv=None):
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
    args.trees = {"now": ROOT}
    for item in args.tree:
        name, _, path = item.partition("=")
        if not name or not path or name == "now":
            parser.error(f"--tree: expected NAME=PATH (NAME not 'now'), got {item!r}")
        args.trees[name] = os.path.abspath(path)
    args.kinds = args.kinds.split(",") if args.kinds else [f"{t}:{m}" for t in args.trees for m in ("one", "t2")]
    for kind in args.kinds:
        tree, _, mode = kind.partition(":")
        if tree not in args.trees or mode not in MODES:
            parser.error(f"--kinds: {kind!r} is not TREE:MODE with TREE in {sorted(args.trees)} and MODE in {MODES}")
    return args


def summarize(result: dict, trees: dict, kinds: list[str]) -> None:
    """Per kind: min / median / max of images/s, wall time and the others' load; the same files within each tree?
    This tree's medians over each other tree's."""
    table = {}
    for kind in kinds:
        ok = [x for x in result["runs"] if x["kind"] == kind and "failure" not in x]
        failed = sum(x["kind"] == kind and "failure" in x for x in result["runs"])
        if not ok:
            table[kind] = {"failed": failed}
            continue
        table[kind] = {"images_per_second": stats([x["images_per_second"] for x in ok]),
                       "wall_s": stats([x["wall_s"] for x in ok]),
                       "others_busy_cores": stats([x["others_busy_cores"] for x in ok]),
                       "load_average": stats([x["load_average"] for x in ok]),
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
            if other != tree and tree == "now" and f"{other}:{mode}" in medians:
                ratios[f"{kind} / {other}:{mode}"] = value / medians[f"{other}:{mode}"]
    result.update(summary=table, same_files_within_tree=same, ratios_of_medians=ratios)


def print_table(result: dict) -> None:
    print("\n| kind | images/s min / median / max | wall s (median) | others busy cores (median) | failed |")
    print("|---|---|---|---|---|")
    for kind, v in result["summary"].items():
        if "images_per_second" not in v:
            print(f"| {kind} | all {v['failed']} failed | | | |")
            continue
        s = v["images_per_second"]
        print(f"| {kind} | {s['min']:.1f} / {s['median']:.1f} / {s['max']:.1f} | {v['wall_s']['median']:.1f} | "
              f"{v['others_busy_cores']['median']:.2f} | {v['failed']} |")
    for key, value in result["ratios_of_medians"].items():
        print(f"{key}: {value:.2f}x (medians)")
    print("same files within each tree:", result["same_files_within_tree"])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kve_fast.generate import device_identity

    run = ScriptRun("generate_bench", "cpu", path=args.out,
                    argv=[os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    prov = run.provenance
    run.result.update(env={"date": prov["date_utc"], "host": prov["host"],
                           "cpu": device_identity(torch.device("cpu"))["cpu"], "cores": len(os.sched_getaffinity(0)),
                           "python": prov["python"], "torch": prov["torch"], "commit": (prov["commit"] or "")[:7],
                           "tree_clean": None if prov["dirty"] is None else not prov["dirty"], "trees": args.trees,
                           "command": prov["command"]},
                      settings={"seeds": args.seeds, "steps": args.steps, "batch": args.batch, "rounds": args.rounds},
                      runs=[])
    env = run.result["env"]
    print(f"commit {env['commit']} (tree {'clean' if env['tree_clean'] else 'DIRTY'}), {env['cpu']}, "
          f"{env['cores']} cores", flush=True)
    for r in range(args.rounds):
        for kind in args.kinds:
            rec = dict(_run(kind, args.trees[kind.split(":")[0]], args), round=r)
            run.result["runs"].append(rec)
            failed = f"  FAILED (exit {rec['returncode']}): {rec['failure']}" if "failure" in rec else ""
            print(f"round {r} {kind:12s} {rec['images_per_second'] or 0:7.2f} images/s  wall {rec['wall_s']:5.1f} s  "
                  f"load {rec['load_average']:.2f}  others busy {rec['others_busy_cores']:.2f} cores  "
                  f"files {rec['files_sha256'][:12]} ({rec['files']}){failed}", flush=True)
    summarize(run.result, args.trees, args.kinds)
    print_table(run.result)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
