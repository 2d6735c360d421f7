"""The sampler's own per-step host cost, HEAD against an earlier commit, measured in one run (CPU, eager).

    python bench/host_cost_bench.py --baseline 25c8ced [--steps 300] [--repeats 7] [--json FILE]

A near-free model (``kve_fast.testing.NearFreeScore``: one elementwise kernel) on the CPU leaves only what
the loop itself costs per step: planning the step, drawing its noise, the stage calls, the model call's
wrapping. Each configuration runs in a fresh interpreter per tree (``python -S`` with the tree first on
``sys.path``, so the tree's ``kve_fast`` is imported, not the installed one), alternating baseline and HEAD
``--repeats`` times; each run times ``--calls`` calls after a warm-up call and keeps the fastest. Reported:
ms per step, min / median / max over the repeats, and the ratio of the medians (HEAD / baseline).
``--clock cpu`` (the default) times with the process's CPU time (``time.process_time``), which other
processes on a shared machine do not inflate as they inflate the wall clock (one intra-op thread, a near-free
model: on an idle machine the two agree); ``--clock wall`` uses ``time.perf_counter``. The load average at the
start and end is recorded.
The baseline tree is checked out with ``git worktree`` into a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.harness import ScriptRun, stats  # noqa: E402

CONFIGS = {
    "pipeline 8x8 b1, exact noise": "pipe",
    "pipeline 8x8 b1, with a callback": "pipe_callback",
    "sample_karras_ve_sigmas 8x8 b1": "sigmas",
    "k_diffusion.sample_heun 8x8 b1, churn": "kdiff",
}

SNIPPET = r"""
import sys, time, json
sys.path[:0] = [TREE, SITE]
import torch
torch.set_num_threads(1)
import kve_fast
from kve_fast.testing import NearFreeScore
kind, steps, calls = KIND, STEPS, CALLS
CLOCK = time.process_time if CLOCKNAME == "cpu" else time.perf_counter
model = NearFreeScore(8)
if kind.startswith("pipe"):
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    cb = (lambda p, i, t, kw: {}) if kind == "pipe_callback" else None
    run = lambda: pipe(1, steps, torch.Generator().manual_seed(0), output_type="latent", backend="torch",
                       cuda_graph=False, callback_on_step_end=cb)
elif kind == "sigmas":
    sig = torch.linspace(10.0, 0.01, steps).tolist() + [0.0]
    x = torch.randn(1, 3, 8, 8) * 10
    run = lambda: kve_fast.sample_karras_ve_sigmas(model, x, sig, s_churn=1.0, generator=torch.Generator().manual_seed(0),
                                                   backend="torch")
else:
    from kve_fast import k_diffusion as kd
    sigmas = kd.get_sigmas_karras(steps, 0.02, 80.0)
    x = torch.randn(1, 3, 8, 8) * 80
    den = lambda x, s: x * 0.5
    run = lambda: kd.sample_heun(den, x, sigmas, disable=True, s_churn=1.0, backend="torch")
run()
best = float("inf")
for _ in range(calls):
    t = CLOCK(); run(); best = min(best, CLOCK() - t)
print(json.dumps({"ms_per_step": best * 1e3 / steps}))
"""


def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _one(tree: str, kind: str, steps: int, calls: int, clock: str) -> float:
    site = sysconfig.get_paths()["purelib"]
    code = (SNIPPET.replace("TREE", repr(tree)).replace("SITE", repr(site)).replace("KIND", repr(kind))
            .replace("STEPS", str(steps)).replace("CALLS", str(calls)).replace("CLOCKNAME", repr(clock)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{tree} {kind}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_step"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="the commit to compare HEAD with")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--calls", type=int, default=5, help="timed calls per run (the fastest is kept)")
    p.add_argument("--repeats", type=int, default=7, help="runs per tree and configuration, alternating")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: the process's CPU time (robust on a shared machine); wall: perf_counter")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def compare_trees(results: dict, base_tree: str, args) -> None:
    """Each configuration, the trees alternating ``--repeats`` times; min / median / max and the ratio of medians."""
    for label, kind in CONFIGS.items():
        runs = {"baseline": [], "head": []}
        for _ in range(args.repeats):
            runs["baseline"].append(_one(base_tree, kind, args.steps, args.calls, args.clock))
            runs["head"].append(_one(ROOT, kind, args.steps, args.calls, args.clock))
        rec = {tree: stats(v) for tree, v in runs.items()}
        rec["ratio_of_medians"] = rec["head"]["median"] / rec["baseline"]["median"]
        results["configs"][label] = rec
        print(f"{label}: baseline {rec['baseline']['median']:.4f} ms/step, HEAD {rec['head']['median']:.4f} "
              f"ms/step, ratio {rec['ratio_of_medians']:.3f}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    base_rev = _git("rev-parse", "--short", args.baseline)
    run = ScriptRun("host_cost_bench", "cpu", path=args.json)
    prov = run.provenance
    results = run.result
    results.update(machine=platform.platform(), cpus=os.cpu_count(), python=prov["python"], date=prov["date_utc"],
                   command=prov["command"], head=(prov["commit"] or "")[:7], dirty=prov["dirty"], baseline=base_rev,
                   steps=args.steps, clock=args.clock, loadavg_start=os.getloadavg(), configs={})
    tmp = tempfile.mkdtemp(prefix="kve_base_")
    base_tree = os.path.join(tmp, "tree")
    _git("worktree", "add", "--detach", base_tree, base_rev)
    try:
        compare_trees(results, base_tree, args)
    finally:
        _git("worktree", "remove", "--force", base_tree)
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    lines = [f"| configuration | {base_rev} ms/step (min / median / max) | {results['head']} ms/step (min / median / "
             "max) | ratio of medians |", "|---|---|---|---|"]
    for label, rec in results["configs"].items():
        cell = lambda s: f"{s['min']:.4f} / {s['median']:.4f} / {s['max']:.4f}"  # noqa: E731
        lines.append(f"| {label} | {cell(rec['baseline'])} | {cell(rec['head'])} | {rec['ratio_of_medians']:.3f} |")
    print("\n".join(lines))
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
