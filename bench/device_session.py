"""The lent GPU's two commands: what each runs, in order, under one hard time budget.

    python bench/device_session.py correctness [--budget-s 360] [--out DIR] [--dry-run]
    python bench/device_session.py speed       [--budget-s 290] [--out DIR] [--dry-run]
    python bench/device_session.py correctness --list      # the stages, their estimates and caps

Called by bench/device_correctness.sh and bench/device_speed.sh (which first install the carried wheels);
bench.harness.run_session runs the stages: each in its own process, skipped with the reason when its estimate
does not fit in what is left, killed at its cap or at the budget's end. Writes ``<name>.json`` (provenance, each
stage's status, exit, seconds, last lines and the JSON it wrote) and ``<name>.log`` (every stage's full output)
under --out, prints a table and the verdict last, and exits 1 if anything failed (a stage's own check, a crash,
a timeout), 3 if only something was skipped, else 0.

``--dry-run``: the same stages on this machine's CPU with tiny settings (Triton's interpreter), to test the
scripts' code paths without a GPU; the numbers mean nothing there. Estimates are for an H200 (from the H100 and
H200 sessions in bench/RESULTS.md and ../shared notes), with margin.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PY = sys.executable
CUDA_TESTS = ["tests/test_graphs.py", "tests/test_graphs_kdiffusion.py", "tests/test_precision.py",
              "tests/test_layouts.py", "tests/test_csrc.py", "tests/test_k_diffusion.py", "tests/test_fir.py",
              "tests/test_ncsnpp.py"]
CRASHED_ONCE = "tests/test_csrc.py::test_operators_check_their_arguments"  # SIGSEGV'd on a GPU once: own process
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short"]


def _b(script: str) -> str:
    return os.path.join("bench", script)


def correctness_stages(dry: bool):
    from bench.harness import Stage

    if dry:  # tiny: each exercises its script's code path on the CPU in well under a minute
        return [
            Stage("build", [PY, "-c", "print('dry run: no CUDA extension to build')"], 1, 30, background=True,
                  what="the CUDA extension's install-time build"),
            Stage("gpu_check", [PY, _b("gpu_check.py"), "--device", "cpu", "--quick", "--parts", "hazards",
                                "--out", "{out}"], 5, 300, what="kernels and pipelines (dry: hazards only)"),
            Stage("kdiffusion_check", [PY, _b("kdiffusion_check.py"), "--device", "cpu", "--quick", "--parts",
                                       "scalars", "--out", "{out}"], 5, 300, after=("build",),
                  what="k-diffusion drop-in (dry: scalars only)"),
            Stage("cuda tests", PYTEST + ["tests/test_bench_harness.py", "-k", "provenance or time_stats"], 5, 300,
                  after=("build",), what="the CUDA tests (dry: two of the harness's tests)"),
            Stage("crashed-once test", PYTEST + [CRASHED_ONCE], 5, 300, after=("build",), must_run=True,
                  what="the test that SIGSEGV'd once"),
            Stage("precision_check", [PY, _b("precision_check.py"), "--device", "cpu", "--quick", "--cases",
                                      "gaussian-300", "--no-quality", "--out", "{out}"], 5, 300,
                  what="low precision against float64 (dry: one case)"),
            Stage("csrc_check", [PY, _b("gpu_check.py"), "--device", "cpu", "--backends", "cuda", "--quick",
                                 "--parts", "build,kernels", "--out", "{out}"], 5, 300,
                  what="the extension (dry: CPU operators built here)"),
        ]
    return [
        Stage("build", ["nice", "-n", "19", PY, "setup.py", "build_ext", "--inplace"], 0, 240, background=True,
              env={"MAX_JOBS": "4"}, what="the CUDA extension's install-time build (background, niced; ~20-60 s)"),
        # (no timed parts here: bandwidth and per_step would be measured beside the build's compilers)
        Stage("gpu_check", [PY, _b("gpu_check.py"), "--quick", "--parts", "kernels,pipelines,hazards,threads",
                            "--out", "{out}"], 60, 110,
              what="Triton kernels bit-exact vs torch; pipelines eager and graphed, both conventions, callbacks, "
                   "global RNG, channels_last, hazards, threads"),
        Stage("kdiffusion_check", [PY, _b("kdiffusion_check.py"), "--quick", "--parts", "scalars,exact",
                                   "--out", "{out}"], 80, 150, after=("build",),
              what="k-diffusion drop-in vs the real package: Heun and Euler, churn, channels_last, callbacks, "
                   "extra_args, eager and graphed (capture used: every key field incl. strides), backend cuda; "
                   "says whether KDIFFUSION_DEFAULT_MODE can be 'auto'"),
        Stage("cuda tests", PYTEST + CUDA_TESTS + ["--deselect", CRASHED_ONCE], 80, 150, after=("build",),
              what="the CUDA tests: graphs, k-diffusion graphs, low precision, FIR, NCSN++, the extension"),
        Stage("crashed-once test", PYTEST + [CRASHED_ONCE], 15, 60, after=("build",), must_run=True,
              what="test_operators_check_their_arguments alone: a SIGSEGV is named, the others unaffected"),
        Stage("precision_check", [PY, _b("precision_check.py"), "--device", "cuda", "--quick", "--out", "{out}"],
              50, 90, what="bf16/fp16/TF32 against float64, each against its plain-PyTorch yardstick (<= 2x)"),
        Stage("csrc_check", [PY, _b("gpu_check.py"), "--backends", "cuda", "--quick", "--parts",
                             "kernels,pipelines", "--out", "{out}"], 40, 90, after=("build",),
              what="the extension's kernels and pipelines (gpu_check --backends cuda), bit-exact, eager and graphed"),
    ]


def speed_stages(dry: bool):
    from bench.harness import Stage

    if dry:
        return [
            Stage("graph_bench", [PY, _b("graph_bench.py"), "--device", "cpu", "--configs", "tiny-b1", "--steps",
                                  "2", "--unet-dtype", "fp32", "bf16", "--budget-s", "{budget}", "--out", "{out}"],
                  5, 400, what="speed rows with their floors and accuracy gates (dry: tiny-b1, 2 steps)"),
            Stage("cold_start", [PY, _b("cold_start.py"), "--device", "cpu", "--reps", "1", "--out",
                                 "{out}/cold_start.json"], 5, 300, what="import to first image in a fresh process"),
            Stage("edm_bench", [PY, _b("edm_bench.py"), "--device", "cpu", "--tiny", "--repeats", "1", "--out",
                                "{out}"], 30, 300,
                  what="NVlabs' EDM sampler: the published loop vs kve_fast.edm (dry: 8x8 NCSN++, b1, 2 steps)"),
            Stage("fir_bench", [PY, _b("fir_bench.py"), "--device", "cpu", "--smoke", "--no-forward", "--out",
                                "{out}"], 5, 300, what="the FIR kernel vs diffusers' FIR ops (dry: smoke)"),
        ]
    return [
        Stage("graph_bench", [PY, _b("graph_bench.py"), "--unet-dtype", "fp32", "bf16", "--configs", "ncsnpp-b64",
                              "celebahq256-b8", "--no-eager", "--config-steps", "ncsnpp-b64=20",
                              "celebahq256-b8=10", "--budget-s", "{budget}", "--out", "{out}"], 140, 175,
              what="the speed targets: CelebA-HQ-256 b8 fp32; NCSN++ 62M b64 bf16 >= 4.5x diffusers fp32 and "
                   "<= 1.05x its bf16 floor; CelebA-HQ-256 b8 bf16 >= 2x; each with its accuracy gate"),
        Stage("cold_start", [PY, _b("cold_start.py"), "--device", "cuda", "--reps", "3", "--triton-cache", "warm",
                             "--out", "{out}/cold_start.json"], 40, 55,
              what="first image cold: a fresh process, import to image, with the breakdown (n = 3)"),
        # (about 2 x 35 forwards of the 62 M UNet at b64 per timed call, three rows, n >= 3, plus the floors)
        Stage("edm_bench", [PY, _b("edm_bench.py"), "--out", "{out}"], 45, 80,
              what="NVlabs' EDM sampler on a CIFAR-10-sized stand-in (NCSN++-like 62 M behind EDM's preconditioner), "
                   "b1 and b64, 18 steps: the published loop vs kve_fast.edm eager and graphed, each against its "
                   "floor; graphed <= 1.05x its floor and bit-identical"),
        Stage("fir_bench", [PY, _b("fir_bench.py"), "--repeats", "5", "--forward-repeats", "3", "--out", "{out}"],
              40, 60, what="the FIR kernel vs diffusers' FIR ops, per op and per forward (n = 5 / 3)"),
    ]


SESSIONS = {"correctness": (correctness_stages, 360), "speed": (speed_stages, 290)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("session", choices=sorted(SESSIONS))
    ap.add_argument("--budget-s", type=float, default=None, help="hard time budget of the whole session")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "out"))
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU versions of the stages (no GPU needed)")
    ap.add_argument("--list", action="store_true", help="print the stages and exit")
    ap.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    args = ap.parse_args(argv)
    make, default_budget = SESSIONS[args.session]
    stages = make(args.dry_run)
    if args.only:
        want = args.only.split(",")
        unknown = set(want) - {s.name for s in stages}
        if unknown:
            ap.error(f"unknown stages {sorted(unknown)}")
        stages = [s for s in stages if s.name in want]
    if args.list:
        for s in stages:
            print(f"{s.name:<20s} estimate {s.estimate_s:4.0f} s, cap {s.cap_s:4.0f} s: {s.what}")
        return 0
    os.chdir(ROOT)
    env_device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        import torch

        if not torch.cuda.is_available():
            print(f"device_session {args.session}: no CUDA GPU here (use --dry-run on a CPU)", file=sys.stderr)
            return 2
    from bench.harness import run_session

    budget = args.budget_s if args.budget_s is not None else (default_budget * (3 if args.dry_run else 1))
    return run_session(f"device_{args.session}", stages, budget, os.path.abspath(args.out), device=env_device,
                       argv=[os.path.relpath(os.path.abspath(__file__), ROOT)] + list(
                           sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
