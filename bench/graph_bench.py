"""Whole-run benchmark: diffusers' KarrasVePipeline against kve_fast eager and CUDA-graphed, on one GPU.

    python bench/graph_bench.py            # the full set (about 7 minutes on an H100/H200)
    python bench/graph_bench.py --quick    # 4 configurations, fewer repeats (about 2 minutes)
    python bench/graph_bench.py --configs tiny-b1 ncsnpp-b1 --budget-s 120

Configurations (fp32, TF32 off, random weights from a fixed seed, 50 steps = 99 model calls; see
../shared/notes/gpu-baseline.md): the reference's own test UNet (1.0 M parameters, 32x32) at batch 1 and
64; the NCSN++-like CIFAR-sized UNet (61.9 M, 32x32) at batch 1 and 64; the CelebA-HQ-256 NCSN++
architecture (65.6 M, 256x256) at batch 1 and 8.

Per configuration (kve_fast/benchmark.py does the measuring; ``kve-fast bench`` prints the same table for a
user's own model):
- the floor: 99 x one model forward captured in a ``torch.cuda.CUDAGraph`` with a device timestep
  (NCSN++ made capturable by ``kve_fast.ncsnpp.make_capturable`` for that capture only), median of
  CUDA-event-timed replays; the eager forward beside it;
- rows: diffusers' pipeline (CPU generator, ``output_type="np"``), kve_fast eager and graphed
  (``cuda_graph=False`` / ``True``), each with exact and fast noise (``output_type="latent"``);
- columns: ms per call (median of n calls after a first one; ``torch.cuda.synchronize`` around each),
  speedup over diffusers, ratio to the floor, time of the first call in a fresh state (``clear_graphs()``
  first, capture included), n, and bit-exactness: exact rows against diffusers' final sample
  (``torch.equal``) and its ``np`` images (``np.array_equal``; the share of pixels strictly inside (0, 1)
  is reported because saturated images prove little), graphed rows against eager ones.

Low precision (``--unet-dtype bf16|fp16``, ``--tf32``): diffusers' row runs the float32 model as
always (it cannot run a bf16 UNet); kve_fast's rows run a copy of the model converted to that dtype, natively
(made once per configuration, freed after); the floor is 99 x one graphed forward of that copy (input in its
dtype, NCSN++ FIR blocks on the Triton kernel as the sampler's fast modes run them); exact-noise rows report
the relative RMS difference of their final latent from diffusers' float32 one instead of bit equality, graphed
rows are still compared bit for bit with eager ones. Results go to graph_bench_bf16.* (graph_bench_fp16.*,
graph_bench_tf32.*, ...). The Targets section states the bf16 targets:

    python bench/graph_bench.py --unet-dtype bf16 --configs ncsnpp-b64 celebahq256-b8 --no-eager

ncsnpp-b64 graphed + fast noise >= 4.5x faster than diffusers and <= 1.05 x its bf16 floor;
celebahq256-b8 graphed + fast noise >= 2x faster than diffusers.

Graphed rows the installed kve_fast cannot run (no ``cuda_graph`` option, a model it cannot capture, fast
noise not captured) are reported as "graphs unavailable: <why>". Each configuration runs in its own
try/except; ``--budget-s`` skips what no longer fits (with a note). Results go to ``--out`` (default
``$OUT``, else bench/out): graph_bench[_quick][_bf16].json, .md, .png (matplotlib permitting), written after
every configuration; the markdown table is printed last. Exit status 1 if an exactness check failed or a
configuration failed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.harness import ScriptRun  # noqa: E402
from kve_fast import benchmark as kb  # noqa: E402
from kve_fast.benchmark.rows import KINDS, _graphs_module  # noqa: E402
from kve_fast.benchmark.timing import _first_line  # noqa: E402
from kve_fast.precision import tf32_for_run  # noqa: E402

# ---- the models (gpu-baseline.md), random weights from a fixed seed -------------------------------------------


def _unet(device, seed, **config):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DModel(**config).eval()


def tiny_unet(device="cpu", seed=0):
    """The UNet of diffusers' own KarrasVePipeline tests: 32x32, 3 channels, 1.0 M parameters."""
    return _unet(device, seed, block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=3,
                 out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def ncsnpp_unet(device="cpu", seed=0):
    """NCSN++-like, CIFAR-sized: 32x32, fourier embedding, FIR Skip blocks, 61.9 M parameters."""
    return _unet(device, seed, sample_size=32, layers_per_block=4, block_out_channels=(128, 256, 256, 256),
                 time_embedding_type="fourier", norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2),
                 flip_sin_to_cos=True,
                 down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
                 up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"))


def celebahq256_unet(device="cpu", seed=0):
    """The NCSN++ CelebA-HQ 256 architecture (the seed's own model), random weights: 65.6 M parameters."""
    return _unet(device, seed, sample_size=256, layers_per_block=2,
                 block_out_channels=(128, 128, 256, 256, 256, 256, 256), time_embedding_type="fourier",
                 norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2), flip_sin_to_cos=True, downsample_padding=1,
                 down_block_types=("SkipDownBlock2D",) * 4 + ("AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
                 up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D") + ("SkipUpBlock2D",) * 4)


def ncsnpp16_unet(device="cpu", seed=0):
    """A small NCSN++ (kve_fast.testing.ncsnpp_unet at 16x16: FIR Skip blocks, fourier embedding), for CPU dry
    runs of the FIR paths (fast FIR rows, their floors and accuracy checks)."""
    from kve_fast.testing import ncsnpp_unet as small

    with torch.device(device):
        return small(16)


# name: (builder, parameter count, image size)
MODELS = {
    "tiny": (tiny_unet, 1_002_883, 32),
    "ncsnpp": (ncsnpp_unet, 61_894_924, 32),
    "celebahq256": (celebahq256_unet, 65_574_549, 256),
    "ncsnpp16": (ncsnpp16_unet, None, 16),
}
# name: (model, batch size), in the issue's order
CONFIGS = {
    "tiny-b1": ("tiny", 1), "tiny-b64": ("tiny", 64),
    "ncsnpp-b1": ("ncsnpp", 1), "ncsnpp-b64": ("ncsnpp", 64),
    "celebahq256-b1": ("celebahq256", 1), "celebahq256-b8": ("celebahq256", 8),
    "ncsnpp16-b2": ("ncsnpp16", 2),  # CPU dry runs only
}
QUICK = ("tiny-b1", "tiny-b64", "ncsnpp-b1", "celebahq256-b1")
# Repeats: as many timed calls as fit in row_seconds at the first call's duration, within [min, max].
# Full set, H200 estimates from gpu-baseline.md: tiny 5 repeats, ncsnpp-b1 2 (graphed 4-5), ncsnpp-b64 and
# celebahq256 1 (one warm-up call + one timed call per row). About 400 s in all.
POLICY = {"full": dict(row_seconds=5.0, min_repeats=1, max_repeats=5),
          "quick": dict(row_seconds=2.0, min_repeats=1, max_repeats=3)}
BUDGET_S = {"full": 480.0, "quick": 170.0}
# Issues 12 and 20 (bf16): the graphed fast-noise row against diffusers' float32 pipeline and the bf16 floor.
ISSUE12_TARGETS = {"ncsnpp-b64": {"speedup": 4.5, "floor_ratio": 1.05}, "celebahq256-b8": {"speedup": 2.0}}
DTYPES = ("fp32", "bf16", "fp16")


def output_suffix(unet_dtype="fp32", tf32: bool = False) -> str:
    """The output files' stem suffix: "" for fp32 (graph_bench.*), "_bf16", "_fp16", "_tf32", "_bf16_tf32", and for
    several dtypes in one run each of them ("_fp32_bf16")."""
    dtypes = [unet_dtype] if isinstance(unet_dtype, str) else list(unet_dtype)
    parts = ([] if dtypes == ["fp32"] else dtypes) + (["tf32"] if tf32 else [])
    return "".join("_" + p for p in parts)


def _config_steps(items) -> dict:
    out = {}
    for item in items or ():
        name, _, steps = item.partition("=")
        if name not in CONFIGS or not steps.isdigit() or int(steps) < 2:
            raise SystemExit(f"graph_bench.py: --config-steps takes NAME=STEPS (NAME one of {sorted(CONFIGS)}, "
                             f"STEPS >= 2), got {item!r}")
        out[name] = int(steps)
    return out


def log(*parts):
    print(*parts, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, fewer repeats")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=None,
                    help="configurations to run (default: all, or the quick set)")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (Heun: 2N - 1 model calls)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: by time, see POLICY)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"overall time budget; later configurations are skipped with a note (default "
                         f"{BUDGET_S['full']:.0f}, --quick {BUDGET_S['quick']:.0f})")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke test: no graphs, no floor)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the sampling generator")
    ap.add_argument("--output-type", choices=("latent", "np"), default="latent", help="what kve_fast's rows return")
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="skip diffusers' pipeline")
    ap.add_argument("--no-fast", dest="fast", action="store_false", help="skip the fast-noise rows")
    ap.add_argument("--no-eager", dest="eager", action="store_false",
                    help="skip kve_fast's eager rows (the targets are the graphed rows; saves time on big models)")
    ap.add_argument("--unet-dtype", choices=DTYPES, nargs="+", default=["fp32"],
                    help="the dtype(s) kve_fast's rows run the UNet in (a converted copy; diffusers' row stays fp32 "
                         "and is timed once per configuration, so every ratio is to the same median); bf16/fp16: an "
                         "accuracy check against the float32 reference instead of bits, floor in the same dtype")
    ap.add_argument("--config-steps", nargs="+", default=None, metavar="NAME=STEPS",
                    help="another step count for some configurations (ratios are per call of the same step count; "
                         "the floor is 2N - 1 forwards), e.g. celebahq256-b8=10 to fit a lease")
    ap.add_argument("--step-backend", default="auto", choices=("auto", "torch", "triton", "cuda"),
                    help="kve_fast's step kernels (CPU dry runs: triton, in Triton's interpreter)")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions in kve_fast's rows and the floor")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"), help="output folder")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def target_results(configs: list[dict], targets: dict) -> list[dict]:
    """Each target (``{config: {"speedup": x, "floor_ratio": y}}``, on the graphed fast-noise row of that
    configuration's low-precision record) with what was measured and whether it was met (None: not measured)."""
    out = []
    for name, want in targets.items():
        rows = [(c, r) for c in configs if c.get("name") == name and c.get("precision")
                for r in c.get("rows", []) if r["kind"] == "graphed" and r["noise"] == "fast"]
        if not rows:
            out.append({"config": name, "target": want, "met": None, "why": "not measured in this run"})
            continue
        c, r = rows[0]
        rec = {"config": name, "precision": c["precision"]["label"], "row": r["row"], "target": want,
               "speedup": r.get("speedup"), "floor_ratio": r.get("floor_ratio"), "floor": r.get("floor"),
               "steps": c.get("steps"), "accuracy_ok": (r.get("accuracy") or {}).get("ok")}
        checks = []
        if "speedup" in want:
            checks.append(r.get("speedup") is not None and r["speedup"] >= want["speedup"])
        if "floor_ratio" in want:
            checks.append(r.get("floor_ratio") is not None and r["floor_ratio"] <= want["floor_ratio"])
        floor_kind = ((c.get("floors") or {}).get(r.get("floor")) or {}).get("floor_kind")
        measured = r["status"] == "ok" and all(r.get(k) is not None for k in want)
        graphed_floor = "floor_ratio" not in want or floor_kind == "graphed"  # (an eager floor is an easier one)
        rec["met"] = (all(checks) and rec["accuracy_ok"] is True) if measured and graphed_floor else None
        if not measured:
            rec["why"] = f"row {r['status']}" + (f": {r['why']}" if r.get("why") else "")
        elif not graphed_floor:
            rec["why"] = f"its floor is {floor_kind}, not the graphed forward: the floor target is not measured"
        out.append(rec)
    return out


def _measured(t: dict) -> str:
    """A target's measured figures, in words (a figure the target does not ask for may be missing)."""
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    return (f"speedup {fmt(t.get('speedup'), '.2f')}x, {fmt(t.get('floor_ratio'), '.3f')} x floor, accuracy ok: "
            f"{t.get('accuracy_ok')}")


class Plan:
    """What one run measures: the configurations, the dtypes and their labels, the budget and the repeat policy."""

    def __init__(self, args):
        from kve_fast.benchmark.timing import precision_label
        from kve_fast.precision import parse_dtype

        self.mode = "quick" if args.quick else "full"
        self.names = args.configs or (list(QUICK) if args.quick else [n for n in CONFIGS if n != "ncsnpp16-b2"])
        self.config_steps = _config_steps(args.config_steps)
        self.dtypes = list(dict.fromkeys(args.unet_dtype))
        self.unet_dtypes = {d: (None if parse_dtype(d) == torch.float32 else parse_dtype(d)) for d in self.dtypes}
        self.labels = {d: precision_label(self.unet_dtypes[d], args.tf32) for d in self.dtypes}
        self.shown = [self.labels[d] or "fp32" for d in self.dtypes]
        self.budget = args.budget_s if args.budget_s is not None else BUDGET_S[self.mode]
        self.policy = kb.RepeatPolicy(fixed=args.repeats, **POLICY[self.mode])
        self.title = "graph_bench" + ("" if self.shown == ["fp32"] else f" ({' and '.join(self.shown)})")
        self.stem = ("graph_bench_quick" if args.quick else "graph_bench") + output_suffix(self.dtypes, args.tf32)
        self.settings = {
            "mode": self.mode, "configs": self.names, "steps": args.steps, "config_steps": self.config_steps,
            "seed": args.seed, "output_type": args.output_type, "reference": args.reference, "fast": args.fast,
            "eager": args.eager, "step_backend": args.step_backend, "budget_s": self.budget,
            "repeat_policy": self.policy.as_dict()}
        if self.shown != ["fp32"]:
            self.settings.update(unet_dtype=self.dtypes if len(self.dtypes) > 1 else self.dtypes[0], tf32=args.tf32)


def warm_up(run, plan: Plan, args, device) -> None:
    """The step kernels compiled before any timing, once per precision."""
    for d in plan.dtypes:
        try:
            warm = kb.jit_warmup(device, args.step_backend, log=log, unet_dtype=plan.unet_dtypes[d], tf32=args.tf32)
            if warm is not None:
                run.result["notes"].append(f"kernel warm-up before any timing ({plan.labels[d] or 'fp32'}; Triton JIT "
                                           f"of the step kernels, eager and graphed, on a throwaway tiny UNet): "
                                           f"{warm:.1f} s")
        except Exception as exc:
            run.result["notes"].append(f"kernel warm-up failed: {_first_line(exc)}")
            traceback.print_exc()


def _failed(name: str, model_name: str, batch: int, exc: BaseException, label: str | None = None, **extra) -> dict:
    """The record of a configuration (of one precision, ``extra``) that raised ``exc``."""
    traceback.print_exc()
    rec = {"name": name, "model": model_name, "batch_size": batch, "status": "failed", **extra,
           "error": _first_line(exc), "rows": [], "notes": [f"failed: {_first_line(exc)}"]}
    log(f"== {name}{f' ({label})' if label else ''}: FAILED {rec['error']}")
    return rec


def run_config(run, plan: Plan, args, name: str, device, deadline: float) -> None:
    """One configuration, each precision in turn (diffusers' row timed once, shared), into ``run.result``."""
    import kve_fast

    model_name, batch = CONFIGS[name]
    left = deadline - time.monotonic()
    if left <= 0:
        why = f"skipped: the time budget ({plan.budget:.0f} s, --budget-s) ran out"
        run.result["configs"].append({"name": name, "status": "skipped", "rows": [], "notes": [why]})
        log(f"== {name}: skipped (time budget)")
        return
    unet = pipe = None
    shared = kb.SharedReference(name)
    try:
        unet = MODELS[model_name][0]("cpu", args.seed).to(device)
        pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
        pipe.set_progress_bar_config(disable=True)
        for d in plan.dtypes:
            label = plan.labels[d]
            try:
                rec = kb.bench_pipeline(
                    pipe, name=name, batch_size=batch, steps=plan.config_steps.get(name, args.steps), device=device,
                    seed=args.seed, noises=("exact", "fast") if args.fast else ("exact",), reference=args.reference,
                    kinds=KINDS if args.eager else ("graphed",), step_backend=args.step_backend,
                    output_type=args.output_type, policy=plan.policy, deadline=deadline, log=log,
                    model_label=model_name, unet_dtype=plan.unet_dtypes[d], tf32=args.tf32, shared=shared)
            except Exception as exc:
                rec = _failed(name, model_name, batch, exc, label or "fp32",
                              precision={"label": label} if label else None)
            run.result["configs"].append(rec)
            run.save()
    except Exception as exc:
        run.result["configs"].append(_failed(name, model_name, batch, exc))
    finally:
        del pipe, unet, shared
        try:
            graphs = _graphs_module()
            if graphs is not None and hasattr(graphs, "clear_graphs"):
                graphs.clear_graphs()
        except Exception:
            pass
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def verdicts(run, names: list[str], device) -> None:
    """The run's checks and stages: the targets (missed: a failure; asked for but not measured: a skip), the
    exactness failures, the configurations and rows that failed or were skipped."""
    result = run.result
    if result.get("targets"):
        result["target_results"] = target_results(result["configs"], result["targets"])
    for t in result.get("target_results", []):
        if t["config"] not in names:
            continue
        label = f"target {t['config']} {t.get('precision', '')} {t['target']}"
        if t["met"] is None:
            run.outcome.stage(label, "skipped", f"not measured: {t.get('why')}")
        else:
            run.outcome.check(label, t["met"], _measured(t))
    for bad in kb.exactness_failures(result["configs"]):
        run.outcome.check(bad.split(": ", 1)[0], False, bad.split(": ", 1)[-1])
    for c in result["configs"]:
        label = c["name"] + (f" ({c['precision']['label']})" if c.get("precision") else "")
        if c.get("status") == "failed":
            run.outcome.stage(label, "failed", c.get("error", ""))
        for r in c.get("rows", []):
            if r["status"] == "failed":
                run.outcome.stage(f"{label} / {r['row']}", "failed", r.get("why") or "")
            elif r["status"] == "skipped" or (r["status"] == "unavailable" and device.type == "cuda"):
                # (on a GPU, a row that could not run is not a pass: graphs were expected to capture there)
                run.outcome.stage(f"{label} / {r['row']}", "skipped", r.get("why") or "")
        if c.get("status") == "skipped" and not c.get("rows"):
            run.outcome.stage(label, "skipped", "; ".join(c.get("notes", [])))


def report(result: dict, plan: Plan) -> str:
    """The markdown table, each target's verdict and the time against the budget."""
    lines = [kb.format_markdown(result, plan.title)]
    for t in result.get("target_results", []):
        lines.append(f"target {t['config']} {t.get('precision', '')}: {t['target']} -> "
                     + ("not measured" if t["met"] is None else "met" if t["met"] else "NOT met")
                     + (f" ({_measured(t)})" if t["met"] is not None else f" ({t.get('why')})"))
    lines.append(f"total {result['seconds']:.0f} s of a {plan.budget:.0f} s budget")
    return "\n".join(lines)


@tf32_for_run(False)  # TF32 off for the run (a --unet-dtype row turns on only what it asks for), put back after
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("graph_bench.py: --device cuda but no CUDA GPU is available (use --device cpu for a smoke test)",
              file=sys.stderr)
        return 2
    plan = Plan(args)

    def write(result, final):
        paths = kb.write_outputs(result, args.out, plan.stem, chart=final, title=plan.title)
        return ", ".join(v for k, v in paths.items() if k != "chart_note") + (
            f" ({paths['chart_note']})" if "chart_note" in paths else "")

    run = ScriptRun("graph_bench", device, record="env", writer=write)  # first: the tree before this run writes
    import kve_fast
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    deadline = time.monotonic() + plan.budget
    run.result.update(settings=plan.settings, configs=[])
    if "bf16" in plan.dtypes and not args.tf32:
        run.result["targets"], run.result["targets_source"] = ISSUE12_TARGETS, "issues 12 and 20"
    ok, why = kb.graph_support(kve_fast.KarrasVePipeline, device)
    if not ok:
        run.result["notes"].append(why)
        log(why)
    warm_up(run, plan, args, device)
    for name in plan.names:
        run_config(run, plan, args, name, device, deadline)
    verdicts(run, plan.names, device)
    return run.finish(markdown=lambda result: report(result, plan))


if __name__ == "__main__":
    sys.exit(main())
