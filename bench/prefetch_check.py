"""Does drawing the exact-mode noise ahead on a thread keep the GPU busy? One run, on a CUDA GPU:

    python bench/prefetch_check.py [--out DIR]
    python bench/prefetch_check.py --device cpu     # a dry run of the script (16x16 x 2, 3 steps): no prefetch there

A conv stand-in model sized so that one step's GPU work is comparable to the reference's CPU noise
draw (256x256 x 16: ~11 ms of CPU randn per step). Times 20-step calls of: diffusers' pipeline,
kve_fast exact with the noise drawn in the loop (kve_fast.noise.PREFETCH = False), kve_fast exact with
the prefetch thread (the default), and fast mode; checks the exact outputs are identical to each
other and to diffusers'. After a warm-up call, at least 5 timed calls where a call takes under 2 s, else 3
(issue 20's rule): min, median and max; ratios of medians. Writes prefetch_check.json (with the provenance:
commit, dirty flag, card, driver, versions, command) and ends with the PASS / FAIL line; exit status 0 or 1.
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
from kve_fast.precision import tf32_for_run  # noqa: E402


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


def timed(fn, device):
    """(time statistics, the last output) of ``fn`` after one warm-up call, repeated per issue 20's rule."""
    from kve_fast.benchmark import required_repeats, time_stats

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    ts, out = [], None
    while len(ts) < required_repeats(sorted(ts)[len(ts) // 2] if ts else 0.0):
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return time_stats(ts), out


@tf32_for_run(False)  # float32 throughout: TF32 off for the run, put back after it
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("prefetch_check.py needs a CUDA GPU (or --device cpu for a dry run)")
    from kve_fast.benchmark import Outcome, missing, provenance

    prov = provenance(device)
    from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as Ref
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler

    size, batch, steps = (256, 16, 20) if device.type == "cuda" else (16, 2, 3)
    backend = "triton" if device.type == "cuda" else "torch"
    model = ConvScore(size).to(device).eval()
    ref = Ref(unet=model, scheduler=RefScheduler())
    ref.set_progress_bar_config(disable=True)
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    # cost of the model alone, per step (2 calls), and of the CPU draws, for the table
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        model_stats = timed(lambda: [model(x, torch.tensor(1.0)) for _ in range(2 * steps)], device)[0]
    cpu_stats = timed(lambda: [torch.randn(batch, 3, size, size, generator=gen()) for _ in range(steps)],
                      torch.device("cpu"))[0]

    rows, outs = {}, {}
    rows["reference (diffusers)"], outs["ref"] = timed(lambda: ref(batch, steps, gen(), output_type="np").images,
                                                       device)
    kve_fast.noise.PREFETCH = False
    rows["kve_fast exact, noise drawn in the loop"], outs["loop"] = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend=backend, cuda_graph=False).images, device)
    kve_fast.noise.PREFETCH = True
    rows["kve_fast exact, prefetch thread"], outs["prefetch"] = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend=backend, cuda_graph=False).images, device)
    rows["kve_fast fast"], _ = timed(
        lambda: pipe(batch, steps, gen(), output_type="np", backend=backend, noise="fast", cuda_graph=False).images,
        device)
    exact = {k: bool(np.array_equal(outs[k], outs["ref"])) for k in ("loop", "prefetch")}
    outcome = Outcome()
    gaps = missing(prov)
    outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
    for k, ok in exact.items():
        outcome.check(f"kve_fast exact ({k}) = diffusers, bit for bit", ok)

    def per_step(st):
        return {"median_ms": st["median_ms"] / steps, "min_ms": st["min_ms"] / steps, "max_ms": st["max_ms"] / steps,
                "n": st["n"]}

    result = {
        "provenance": prov, "gpu": prov["card"], "torch": torch.__version__, "date": prov["date_utc"],
        "command": prov["command"], "image": size, "batch": batch, "steps": steps, "backend": backend,
        "model_ms_per_step": model_stats["median_ms"] / steps, "cpu_randn_ms_per_step": cpu_stats["median_ms"] / steps,
        "bit_exact_vs_reference": exact, "ms_per_step": {k: per_step(v) for k, v in rows.items()},
        "outcome": outcome.as_dict(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefetch_check.json").write_text(json.dumps(result, indent=1))
    base = result["ms_per_step"]["reference (diffusers)"]["median_ms"]
    print(f"{result['gpu'] or device}, torch {torch.__version__}, kve_fast {prov['commit']}: {size}x{size} x {batch}, "
          f"{steps} steps")
    print(f"model alone: {result['model_ms_per_step']:.2f} ms per step (2 calls); CPU randn alone: "
          f"{result['cpu_randn_ms_per_step']:.2f} ms per step")
    print(f"bit-exact vs diffusers: {exact}")
    for k, v in result["ms_per_step"].items():
        print(f"{k:50s} {v['median_ms']:8.2f} ms/step (min {v['min_ms']:.2f}, max {v['max_ms']:.2f}, n={v['n']})"
              f"  x{base / v['median_ms']:5.2f}")
    print(f"prefetch_check: {outcome.summary()}")
    sys.exit(outcome.exit_code())


if __name__ == "__main__":
    main()
