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

Low precision (``--unet-dtype bf16|fp16``, ``--tf32``; issue 12): diffusers' row runs the float32 model as
always (it cannot run a bf16 UNet); kve_fast's rows run a copy of the model converted to that dtype, natively
(made once per configuration, freed after); the floor is 99 x one graphed forward of that copy (input in its
dtype, NCSN++ FIR blocks on the Triton kernel as the sampler's fast modes run them); exact-noise rows report
the relative RMS difference of their final latent from diffusers' float32 one instead of bit equality, graphed
rows are still compared bit for bit with eager ones. Results go to graph_bench_bf16.* (graph_bench_fp16.*,
graph_bench_tf32.*, ...). The Targets section states issue 12's for bf16:

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

from kve_fast import benchmark as kb  # noqa: E402

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


# name: (builder, parameter count, image size)
MODELS = {
    "tiny": (tiny_unet, 1_002_883, 32),
    "ncsnpp": (ncsnpp_unet, 61_894_924, 32),
    "celebahq256": (celebahq256_unet, 65_574_549, 256),
}
# name: (model, batch size), in the issue's order
CONFIGS = {
    "tiny-b1": ("tiny", 1), "tiny-b64": ("tiny", 64),
    "ncsnpp-b1": ("ncsnpp", 1), "ncsnpp-b64": ("ncsnpp", 64),
    "celebahq256-b1": ("celebahq256", 1), "celebahq256-b8": ("celebahq256", 8),
}
QUICK = ("tiny-b1", "tiny-b64", "ncsnpp-b1", "celebahq256-b1")
# Repeats: as many timed calls as fit in row_seconds at the first call's duration, within [min, max].
# Full set, H200 estimates from gpu-baseline.md: tiny 5 repeats, ncsnpp-b1 2 (graphed 4-5), ncsnpp-b64 and
# celebahq256 1 (one warm-up call + one timed call per row). About 400 s in all.
POLICY = {"full": dict(row_seconds=5.0, min_repeats=1, max_repeats=5),
          "quick": dict(row_seconds=2.0, min_repeats=1, max_repeats=3)}
BUDGET_S = {"full": 480.0, "quick": 170.0}
# Issue 12 (bf16): the graphed fast-noise row against diffusers' float32 pipeline and the bf16 floor.
ISSUE12_TARGETS = {"ncsnpp-b64": {"speedup": 4.5, "floor_ratio": 1.05}, "celebahq256-b8": {"speedup": 2.0}}
DTYPES = ("fp32", "bf16", "fp16")


def output_suffix(unet_dtype: str = "fp32", tf32: bool = False) -> str:
    """The output files' stem suffix: "" for fp32 (graph_bench.*), "_bf16", "_fp16", "_tf32", "_bf16_tf32"."""
    parts = ([unet_dtype] if unet_dtype != "fp32" else []) + (["tf32"] if tf32 else [])
    return "".join("_" + p for p in parts)


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
    ap.add_argument("--unet-dtype", choices=DTYPES, default="fp32",
                    help="the dtype kve_fast's rows run the UNet in (a converted copy; diffusers' row stays fp32); "
                         "bf16/fp16: relative RMS against diffusers instead of bits, floor in the same dtype")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions in kve_fast's rows and the floor")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"), help="output folder")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    names = args.configs or (list(QUICK) if args.quick else list(CONFIGS))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("graph_bench.py: --device cuda but no CUDA GPU is available (use --device cpu for a smoke test)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import kve_fast
    from diffusers.utils import logging as diffusers_logging
    from kve_fast.precision import parse_dtype

    unet_dtype = parse_dtype(args.unet_dtype)
    unet_dtype = None if unet_dtype == torch.float32 else unet_dtype
    label = kb.precision_label(unet_dtype, args.tf32)

    diffusers_logging.set_verbosity_error()
    t0 = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else BUDGET_S[mode]
    deadline = t0 + budget
    policy = kb.RepeatPolicy(fixed=args.repeats, **POLICY[mode])
    title = "graph_bench" + (f" ({label})" if label else "")
    stem = ("graph_bench_quick" if args.quick else "graph_bench") + output_suffix(args.unet_dtype, args.tf32)
    result = {
        "env": kb.environment(device), "settings": {
            "mode": mode, "configs": names, "steps": args.steps, "seed": args.seed, "output_type": args.output_type,
            "reference": args.reference, "fast": args.fast, "budget_s": budget, "repeat_policy": policy.as_dict()},
        "configs": [], "notes": [],
    }
    if label is not None:
        result["settings"].update(unet_dtype=args.unet_dtype, tf32=args.tf32)
        if unet_dtype == torch.bfloat16:
            result["targets"], result["targets_source"] = ISSUE12_TARGETS, "issue 12"
    log(result["env"])
    ok, why = kb.graph_support(kve_fast.KarrasVePipeline, device)
    if not ok:
        result["notes"].append(why)
        log(why)
    try:
        warm = kb.jit_warmup(device, log=log, unet_dtype=unet_dtype, tf32=args.tf32)
        if warm is not None:
            result["notes"].append(f"kernel warm-up before any timing (Triton JIT of the step kernels, eager and "
                                   f"graphed, on a throwaway tiny UNet): {warm:.1f} s")
    except Exception as exc:
        result["notes"].append(f"kernel warm-up failed: {kb._first_line(exc)}")
        traceback.print_exc()

    for name in names:
        model_name, batch = CONFIGS[name]
        left = deadline - time.monotonic()
        if left <= 0:
            result["configs"].append({"name": name, "status": "skipped", "rows": [],
                                      "notes": [f"skipped: the time budget ({budget:.0f} s, --budget-s) ran out"]})
            log(f"== {name}: skipped (time budget)")
            continue
        unet = pipe = None
        try:
            build, params, _ = MODELS[model_name]
            unet = build("cpu", args.seed).to(device)
            pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
            pipe.set_progress_bar_config(disable=True)
            rec = kb.bench_pipeline(
                pipe, name=name, batch_size=batch, steps=args.steps, device=device, seed=args.seed,
                noises=("exact", "fast") if args.fast else ("exact",), reference=args.reference,
                kinds=kb.KINDS if args.eager else ("graphed",),
                output_type=args.output_type, policy=policy, deadline=deadline, log=log, model_label=model_name,
                unet_dtype=unet_dtype, tf32=args.tf32)
        except Exception as exc:
            traceback.print_exc()
            rec = {"name": name, "model": model_name, "batch_size": batch, "status": "failed",
                   "error": kb._first_line(exc), "rows": [], "notes": [f"failed: {kb._first_line(exc)}"]}
            log(f"== {name}: FAILED {rec['error']}")
        finally:
            del pipe, unet
            try:
                graphs = kb._graphs_module()
                if graphs is not None and hasattr(graphs, "clear_graphs"):
                    graphs.clear_graphs()
            except Exception:
                pass
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["configs"].append(rec)
        result["seconds"] = time.monotonic() - t0
        paths = kb.write_outputs(result, args.out, stem, chart=False, title=title)
    result["seconds"] = time.monotonic() - t0
    paths = kb.write_outputs(result, args.out, stem, title=title)
    log(f"\nwrote {', '.join(v for k, v in paths.items() if k != 'chart_note')}"
        + (f" ({paths['chart_note']})" if "chart_note" in paths else ""))
    bad = kb.exactness_failures(result["configs"])
    failed = [c["name"] for c in result["configs"] if c.get("status") in ("failed", "partial")]
    log(f"total {result['seconds']:.0f} s of a {budget:.0f} s budget; "
        f"exactness: {'all checks passed' if not bad else 'FAILED: ' + '; '.join(bad)}"
        + (f"; failed configurations: {', '.join(failed)}" if failed else ""))
    log("")
    log(kb.format_markdown(result, title))
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
