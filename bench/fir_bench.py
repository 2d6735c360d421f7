"""FIR resampling of the CelebA-HQ-256 NCSN++: diffusers' upfirdn2d_native against the Triton kernel.

    python bench/fir_bench.py                         # one GPU: fp32 and bf16, batch 8 (about 1-2 minutes)
    python bench/fir_bench.py --device cpu --smoke    # the logic only, in Triton's interpreter, tiny shapes

1. The FIR calls of one forward of the CelebA-HQ-256 NCSN++ architecture (bench/graph_bench.py's
   ``celebahq256_unet``, random weights, batch 8), recorded from the model itself (every
   ``upfirdn2d`` call ``kve_fast.ncsnpp`` makes in fast mode: shape, up, down, pad, filter, calls per
   forward). For each distinct call, in each dtype and in both memory formats: diffusers'
   ``upfirdn2d_native`` and ``kve_fast.ops.fir_triton.upfirdn2d`` on the same input (CUDA events, median
   of ``--repeats`` after warm-up), the largest error of each against a float64 evaluation, and whether the
   kernel is within its bound (fir_triton's docstring: gamma_n * sum |w x|, plus one rounding of the
   output dtype). "per forward" sums calls x time.
2. Whole eager forwards (``torch.no_grad``) of that model, without and with ``kve_fast.ncsnpp.make_fast``,
   in each dtype, and the largest difference between the two outputs.

TF32 is off unless ``--tf32`` (as in bench/graph_bench.py; with TF32 on, diffusers' float32 convolutions,
upfirdn2d_native's included, run in TF32 on the GPU and are less accurate than the kernel). Results: a
markdown table on stdout and JSON in ``--out`` (a folder: fir_bench[_smoke].json and .md in it; or a
path ending in .json). Exit status 1 if the kernel broke its bound anywhere.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
UNIT = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}  # unit roundoff of the output


def log(*parts):
    print(*parts, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (Triton's interpreter: a smoke test)")
    ap.add_argument("--smoke", action="store_true", help="a tiny NCSN++ at 16x16, batch 2, one repeat")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8, --smoke 2)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per op (default 20, --smoke 1)")
    ap.add_argument("--forward-repeats", type=int, default=None, help="timed forwards (default 5, --smoke 1)")
    ap.add_argument("--no-forward", dest="forward", action="store_false", help="skip the whole-forward rows")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN/cuBLAS (off by default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"),
                    help="output folder, or a .json path")
    args = ap.parse_args(argv)
    args.dtypes = list(dict.fromkeys(DTYPES[d] for d in args.dtypes))
    args.batch = args.batch or (2 if args.smoke else 8)
    args.repeats = args.repeats or (1 if args.smoke else 20)
    args.forward_repeats = args.forward_repeats or (1 if args.smoke else 5)
    return args


# ---- models ----------------------------------------------------------------------------------------------

def build_model(smoke: bool, device, seed: int):
    """CelebA-HQ-256 NCSN++ (graph_bench.celebahq256_unet), or for --smoke a tiny NCSN++ (same block types)."""
    import graph_bench as gb

    if not smoke:
        return gb.celebahq256_unet("cpu", seed).to(device), "celebahq256 (65.6 M, 256x256)"
    model = gb._unet("cpu", seed, sample_size=16, layers_per_block=1, block_out_channels=(32, 32, 32),
                     time_embedding_type="fourier", norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2),
                     flip_sin_to_cos=True,
                     down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                     up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"))
    return model.to(device), "tiny NCSN++ (smoke, 16x16)"


def record_fir_calls(model, x, t):
    """The distinct ``upfirdn2d`` calls of one forward in fast mode: shape, filter, up, down, pad, count."""
    import torch

    from kve_fast import ncsnpp
    from kve_fast.ops import fir_triton

    seen = {}
    original = fir_triton.upfirdn2d

    def recording(inp, kernel, up=1, down=1, pad=(0, 0)):
        key = (tuple(inp.shape), tuple(kernel.shape), tuple(kernel.flatten().tolist()), up, down, tuple(pad))
        if key not in seen:
            seen[key] = {"shape": list(inp.shape), "kernel": kernel.detach().float().clone(), "up": up, "down": down,
                         "pad": list(pad), "calls": 0}
        seen[key]["calls"] += 1
        return original(inp, kernel, up=up, down=down, pad=pad)

    patched = ncsnpp.make_fast(model)
    if not ncsnpp.is_fast(model):
        raise RuntimeError("make_fast patched nothing (no FIR blocks, or Triton cannot run here)")
    fir_triton.upfirdn2d = recording  # ncsnpp looks it up on the module at each call
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        fir_triton.upfirdn2d = original
        if patched:
            ncsnpp.restore_fast(model)
    return list(seen.values())


# ---- timing ----------------------------------------------------------------------------------------------

def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, repeats: int, warmup: int = 2) -> dict:
    """Median and min milliseconds of ``repeats`` calls after ``warmup`` (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    from bench.harness import stats
    from kve_fast.benchmark.provenance import required_repeats

    st = stats(times)
    return {"ms": st["median"], "min_ms": st["min"], "max_ms": st["max"], "n": repeats,
            "repeat_rule_met": repeats >= required_repeats(st["median"] / 1e3)}


# ---- the op ----------------------------------------------------------------------------------------------

def bench_op(case: dict, dtype_name: str, layout: str, device, repeats: int, warmup: int, seed: int) -> dict:
    import torch
    from diffusers.models.upsampling import upfirdn2d_native

    from kve_fast.ops import fir_triton

    dtype = getattr(torch, dtype_name)
    up, down, pad = case["up"], case["down"], tuple(case["pad"])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(case["shape"], generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    kernel = case["kernel"].to(device=device, dtype=dtype)  # diffusers passes its filter in x's dtype
    native = upfirdn2d_native(x, kernel, up, down, pad)
    ours = fir_triton.upfirdn2d(x, kernel, up, down, pad)
    x64, k64 = x.double(), kernel.double()
    exact = upfirdn2d_native(x64, k64, up, down, pad)
    scale = upfirdn2d_native(x64.abs(), k64.abs(), up, down, pad)
    kh, kw = kernel.shape
    n_terms = fir_triton.terms(kh, up) * fir_triton.terms(kw, up)
    gamma = n_terms * 2.0**-24 / (1 - n_terms * 2.0**-24)
    u = UNIT[dtype_name] if dtype_name != "float32" else 0.0
    bound = u * exact.abs() * (1 + 1e-6) + (1 + u) * gamma * scale + 16 * 2.0**-52 * scale
    err_ours = (ours.double() - exact).abs()
    err_native = (native.double() - exact).abs()
    row = {
        "shape": list(x.shape), "up": up, "down": down, "pad": list(pad), "calls_per_forward": case["calls"],
        "dtype": dtype_name, "layout": layout, "terms": n_terms,
        "native": time_ms(lambda: upfirdn2d_native(x, kernel, up, down, pad), device, repeats, warmup),
        "triton": time_ms(lambda: fir_triton.upfirdn2d(x, kernel, up, down, pad), device, repeats, warmup),
        "max_err_native": err_native.max().item(), "max_err_triton": err_ours.max().item(),
        "max_abs": exact.abs().max().item(),
        "within_bound": bool((err_ours <= bound).all().item()),
        "bound_used": (err_ours / bound.clamp_min(1e-300)).max().item(),
        "same_shape": tuple(ours.shape) == tuple(native.shape),
    }
    row["speedup"] = row["native"]["ms"] / max(row["triton"]["ms"], 1e-9)
    return row


# ---- whole forwards ----------------------------------------------------------------------------------------

def bench_forward(model, x, t, dtype_name: str, device, repeats: int, warmup: int) -> dict:
    import torch

    from kve_fast import ncsnpp

    dtype = getattr(torch, dtype_name)
    m = copy.deepcopy(model).to(dtype)
    xd, td = x.to(dtype), t.to(dtype)

    def forward():
        with torch.no_grad():
            return m(xd, td).sample

    rec = {"dtype": dtype_name, "shape": list(x.shape)}
    native_out = forward()
    rec["native"] = time_ms(forward, device, repeats, warmup)
    rec["patched_modules"] = ncsnpp.make_fast(m)
    try:
        fast_out = forward()
        rec["fast"] = time_ms(forward, device, repeats, warmup)
    finally:
        ncsnpp.restore_fast(m)
    rec["speedup"] = rec["native"]["ms"] / max(rec["fast"]["ms"], 1e-9)
    rec["max_abs_diff"] = (fast_out.double() - native_out.double()).abs().max().item()
    rec["max_abs"] = native_out.double().abs().max().item()
    return rec


# ---- output ----------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"## fir_bench: {result['model']}, batch {result['batch']} "
             f"({env.get('gpu') or env.get('device')}, TF32 {'on' if result['tf32'] else 'off'})", ""]
    lines += ["| shape (N, C, H, W) | up | down | pad | calls/fwd | dtype | layout | native ms | triton ms | speedup "
              "| max err native | max err triton | in bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["ops"]:
        lines.append(f"| {tuple(r['shape'])} | {r['up']} | {r['down']} | {tuple(r['pad'])} | {r['calls_per_forward']} "
                     f"| {r['dtype']} | {r['layout']} | {r['native']['ms']:.3f} | {r['triton']['ms']:.3f} "
                     f"| {r['speedup']:.1f}x | {r['max_err_native']:.2e} | {r['max_err_triton']:.2e} "
                     f"| {'yes' if r['within_bound'] else 'NO'} ({r['bound_used']:.2f}) |")
    lines += ["", "| dtype | layout | FIR per forward, native ms | triton ms | saved ms |", "|---|---|---|---|---|"]
    for s in result["per_forward"]:
        lines.append(f"| {s['dtype']} | {s['layout']} | {s['native_ms']:.2f} | {s['triton_ms']:.2f} "
                     f"| {s['native_ms'] - s['triton_ms']:.2f} |")
    if result["forward"]:
        lines += ["", "| dtype | forward ms (diffusers) | forward ms (make_fast) | speedup | max abs diff | max abs |",
                  "|---|---|---|---|---|---|"]
        for f in result["forward"]:
            lines.append(f"| {f['dtype']} | {f['native']['ms']:.2f} | {f['fast']['ms']:.2f} | {f['speedup']:.2f}x "
                         f"| {f['max_abs_diff']:.2e} | {f['max_abs']:.2e} |")
    lines += ["", "Errors against float64; 'in bound': the kernel within gamma_n * sum |w x| (+ one rounding of the "
              "dtype) everywhere, (largest share of the bound used)."]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def json_path(out: str, stem: str) -> str:
    """``--out``: a folder (``<stem>.json`` in it; the markdown beside it), or a path ending in .json."""
    return out if out.endswith(".json") else os.path.join(out, f"{stem}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import torch

    from kve_fast.ops import fir_triton
    from kve_fast.precision import tf32_for_run

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fir_bench.py: --device cuda but no CUDA GPU is available (use --device cpu --smoke)", file=sys.stderr)
        return 2
    if not fir_triton.can_run():
        print("fir_bench.py: Triton cannot run here (no CUDA and TRITON_INTERPRET is not 1)", file=sys.stderr)
        return 2
    with tf32_for_run(args.tf32):
        return _measure(args, device)


def _measure(args, device) -> int:
    """The ops, the forwards, their checks and the files (``main`` after its checks, under ``--tf32``)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from bench.harness import ScriptRun

    diffusers_logging.set_verbosity_error()
    run = ScriptRun("fir_bench", device, path=json_path(args.out, "fir_bench_smoke" if args.smoke else "fir_bench"),
                    record="env")
    warmup = 0 if args.smoke else 3
    model, label = build_model(args.smoke, device, args.seed)
    size = model.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    t = torch.full((), 0.5, device=device)
    result = run.result
    result.update(model=label, batch=args.batch, dtypes=args.dtypes, tf32=args.tf32, smoke=args.smoke,
                  repeats=args.repeats, ops=[], per_forward=[], forward=[])
    if device.type != "cuda":
        result["notes"].append("not a GPU: Triton's interpreter, timings mean nothing (a logic check)")
    log(f"fir_bench: {label}, batch {args.batch}, {', '.join(args.dtypes)}, on {result['env'].get('gpu') or device}")
    cases = record_fir_calls(model, x, t)
    log(f"{len(cases)} distinct FIR calls, {sum(c['calls'] for c in cases)} per forward")
    for dtype_name in args.dtypes:
        for layout in ("contiguous", "channels_last"):
            bench_ops(result, cases, dtype_name, layout, device, args.repeats, warmup, args.seed)
    if args.forward:
        for dtype_name in args.dtypes:
            rec = bench_forward(model, x, t, dtype_name, device, args.forward_repeats, 0 if args.smoke else 2)
            result["forward"].append(rec)
            log(f"  forward {dtype_name}: diffusers {rec['native']['ms']:.2f} ms, make_fast {rec['fast']['ms']:.2f} ms "
                f"({rec['speedup']:.2f}x), max |diff| {rec['max_abs_diff']:.2e} of max |out| {rec['max_abs']:.2e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in result["ops"]:
        run.check(f"{r['dtype']} {r['layout']} {tuple(r['shape'])} up {r['up']} down {r['down']}: within the bound",
                  r["within_bound"] and r["same_shape"], f"{r['bound_used']:.2f} of the bound used")
    timed = [r[k] for r in result["ops"] for k in ("native", "triton")] + [r[k] for r in result["forward"]
                                                                           for k in ("native", "fast")]
    short = [t for t in timed if not t["repeat_rule_met"]]
    if short and not args.smoke:
        run.check("timings repeated per the repeat rule", False, f"{len(short)} timings with too few calls")
    return run.finish(markdown=markdown)


def bench_ops(result: dict, cases, dtype_name: str, layout: str, device, repeats: int, warmup: int, seed: int):
    """Every distinct FIR call in one dtype and layout, and their sum per forward."""
    import torch

    total = {"dtype": dtype_name, "layout": layout, "native_ms": 0.0, "triton_ms": 0.0}
    for case in cases:
        row = bench_op(case, dtype_name, layout, device, repeats, warmup, seed)
        result["ops"].append(row)
        total["native_ms"] += row["native"]["ms"] * row["calls_per_forward"]
        total["triton_ms"] += row["triton"]["ms"] * row["calls_per_forward"]
        log(f"  {dtype_name:8s} {layout:13s} {tuple(row['shape'])} up {row['up']} down {row['down']} "
            f"pad {tuple(row['pad'])}: native {row['native']['ms']:.3f} ms, triton {row['triton']['ms']:.3f} ms"
            f" ({row['speedup']:.1f}x), in bound: {row['within_bound']} ({row['bound_used']:.2f})")
    result["per_forward"].append(total)
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
