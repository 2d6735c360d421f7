"""NVlabs' EDM sampler on a stand-in of EDM's CIFAR-10 nets: the published loop vs kve_fast.edm, eager and graphed.

    python bench/edm_bench.py                          # CUDA: 32x32 NCSN++-like UNet (61.9 M) behind EDM's
                                                       # preconditioner, batch 1 and 64, 18 steps
    python bench/edm_bench.py --device cpu --tiny      # a logic check on the CPU (fake graphs, Triton's
                                                       # interpreter): an 8x8 NCSN++, batch 1, 2 steps

The rows are ``kve-fast bench --edm``'s (``kve_fast.benchmark.edm_rows.bench_edm``): our reading of EDM's
``edm_sampler`` (``kve_fast.edm_reading``) and ``kve_fast.edm.edm_sampler`` eager and graphed, each timed against
its floor (2N - 1 of the net's own forwards, graphed on CUDA) and compared bit for bit with the published loop.
The targets on a GPU: graphed within 1.05x of its floor, bit-identical; the ratio to the published loop recorded.
Writes ``edm_bench.json`` and ``edm_bench.md`` under --out; exits 1 if a bit check failed or a row failed.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny: a logic check)")
    ap.add_argument("--tiny", action="store_true", help="an 8x8 NCSN++ stand-in, batch 1, 2 steps (CPU dry runs)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None, help="default: 1 64 (--tiny: 1)")
    ap.add_argument("--steps", type=int, default=None, help="default: 18, EDM's (--tiny: 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: by time)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "out"))
    return ap.parse_args(argv)


def build_net(tiny: bool, device):
    """The EDM-interface stand-in: EDM's float32 preconditioner around an NCSN++-like diffusers UNet."""
    import torch

    from kve_fast.edm_testing import cifar_standin

    if tiny:
        from kve_fast.testing import ncsnpp_unet

        with torch.device(device):
            return cifar_standin(ncsnpp_unet(8))
    from bench.graph_bench import ncsnpp_unet

    return cifar_standin(ncsnpp_unet(device))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
        os.environ.setdefault("KVE_FAST_FAKE_GRAPHS", "1")  # the graphed row on the CPU stand-in
    import torch

    from bench.harness import ScriptRun
    from kve_fast.benchmark.edm_rows import bench_edm
    from kve_fast.benchmark.report import exactness_failures, format_markdown
    from kve_fast.benchmark.rows import FLOOR_TARGET
    from kve_fast.benchmark.timing import RepeatPolicy

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("edm_bench.py: --device cuda but no CUDA GPU is available (use --device cpu --tiny)")
        return 2
    batches = args.batch_size or ([1] if args.tiny else [1, 64])
    steps = args.steps or (2 if args.tiny else 18)
    run = ScriptRun("edm_bench", device, path=os.path.join(args.out, "edm_bench.json"), record="env", log=log)
    run.result.update(configs=[], settings={"batch_sizes": batches, "steps": steps, "tiny": args.tiny})
    if device.type != "cuda":
        run.note("not a GPU: Triton's interpreter and the CPU graph stand-in, timings mean nothing (a logic check)")
    net = build_net(args.tiny, device)
    policy = RepeatPolicy(fixed=args.repeats)
    for batch in batches:
        config = run.section(f"EDM b{batch}", lambda b=batch: bench_edm(
            net, name=f"edm-standin-b{b}", batch_size=b, steps=steps, device=device, step_backend="triton",
            policy=policy, log=log))
        if config is not None:
            run.result["configs"].append(config)
            for r in config["rows"]:
                run.check(f"{config['name']} / {r['row']} ran", r["status"] in ("ok", "unavailable"),
                          r["why"] or "")
    for config in run.result["configs"] if device.type == "cuda" else ():  # (the CPU's floor is eager)
        for r in config["rows"]:
            if r["kind"] == "graphed" and r["status"] == "ok":
                run.check(f"{config['name']}: graphed within {FLOOR_TARGET}x its floor",
                          r["floor_ratio"] is not None and r["floor_ratio"] <= FLOOR_TARGET, f"{r['floor_ratio']:.3f}")
    for bad in exactness_failures(run.result["configs"]):
        run.check(bad, False)
    return run.finish(markdown=lambda result: format_markdown(result, "EDM's sampler, CIFAR-10-sized stand-in"))


if __name__ == "__main__":
    sys.exit(main())
