"""Does drawing the exact-mode noise ahead on a thread keep the GPU busy? One run, on a CUDA GPU:

    python bench/prefetch_check.py [--out DIR]

A conv stand-in model sized so that one step's GPU work is comparable to the reference's CPU noise
draw (256x256 x 16: ~11 ms of CPU randn per step). Times 20-step calls of: diffusers' pipeline,
kve_fast exact with the noise drawn in the loop (kve_fast.noise.PREFETCH = False), kve_fast exact with
the prefetch thread (the default), and fast mode; checks the exact outputs are identical to each
other and to diffusers'. Median of 3 after a warm-up; prints a table and writes prefetch_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kve_fast  # noqa: E402
import kve_fast.noise  # noqa: E402


class ConvScore(torch.nn.Module):
    """Four 3x3 convolutions (3 -> C -> C -> C -> 3): a GPU cost per call without a real UNet's setup."""

    def __init__(self, size: int, width: int = 48):
        super().__init__()
        self.config = types.SimpleNamespace(sample_size=size, in_channels=3, out_channels=3)
        torch.manual_seed(0)
        chans = [3, width, width, width, 3]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))

    @property
    def device(self):
        return self.convs[0].weight.device

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, sigma):
        from diffusers.utils import BaseOutput

        for k, conv in enumerate(self.convs):
            x = conv(x)
            if k < len(self.convs) - 1:
                x = torch.nn.functional.silu(x)
        return BaseOutput(sample=x * 0.01)


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as Ref
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler

    size, batch, steps = 256, 16, 20
    model = ConvScore(size).to("cuda").eval()
    ref = Ref(unet=model, scheduler=RefScheduler())
    ref.set_progress_bar_config(disable=True)
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    # GPU cost of the model alone, per step (2 calls), for the table
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.no_grad():
        model_ms = timed(lambda: [model(x, torch.tensor(1.0)) for _ in range(2 * steps)])[0] / steps * 1e3
    cpu_ms = timed(lambda: [torch.randn(batch, 3, size, size, generator=gen()) for _ in range(steps)])[0] / steps * 1e3

    rows, outs = {}, {}
    rows["reference (diffusers)"], outs["ref"] = timed(lambda: ref(batch, steps, gen(), output_type="np").images)
    kve_fast.noise.PREFETCH = False
    rows["kve_fast triton exact, noise drawn in the loop"], outs["loop"] = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend="triton").images)
    kve_fast.noise.PREFETCH = True
    rows["kve_fast triton exact, prefetch thread"], outs["prefetch"] = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend="triton").images)
    rows["kve_fast triton fast"], _ = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend="triton", noise="fast").images)
    exact = {k: bool(np.array_equal(outs[k], outs["ref"])) for k in ("loop", "prefetch")}

    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/prefetch_check.py", "image": size, "batch": batch, "steps": steps,
        "model_ms_per_step": model_ms, "cpu_randn_ms_per_step": cpu_ms, "bit_exact_vs_reference": exact,
        "ms_per_step": {k: v / steps * 1e3 for k, v in rows.items()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefetch_check.json").write_text(json.dumps(result, indent=1))
    base = result["ms_per_step"]["reference (diffusers)"]
    print(f"{result['gpu']}, torch {torch.__version__}: {size}x{size} x {batch}, {steps} steps")
    print(f"model alone: {model_ms:.2f} ms per step (2 calls); CPU randn alone: {cpu_ms:.2f} ms per step")
    print(f"bit-exact vs diffusers: {exact}")
    for k, v in result["ms_per_step"].items():
        print(f"{k:50s} {v:8.2f} ms/step  x{base / v:5.2f}")
    sys.exit(0 if all(exact.values()) else 1)


if __name__ == "__main__":
    main()
