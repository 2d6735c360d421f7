"""What the graph runner's checks cost: ``ModelState.difference`` (is the model as a capture baked it in?) and
``CaptureKey.of`` (the run's settings and the global switches), once per graphed call, and ``GraphEngine._stale``
(the switches and the model again), after each callback of a graphed call; on a 62 M-parameter NCSN++.

    python bench/fingerprint_bench.py [--repeats 200] [--json FILE]

Runs on the CPU (the check reads Python objects and tensor metadata, never device memory). Reports
microseconds per call, min / median / max over ``--repeats`` calls, after a warm-up.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.harness import stats, write_json  # noqa: E402
from kve_fast.benchmark.provenance import provenance  # noqa: E402


def ncsnpp_like():
    """The NCSN++-like UNet of ../shared/notes/gpu-baseline.md (61.9 M parameters), random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, layers_per_block=4, block_out_channels=(128, 256, 256, 256), time_embedding_type="fourier",
        norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2), flip_sin_to_cos=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D")).eval()


def _time(fn, repeats: int) -> dict:
    for _ in range(10):
        fn()
    us = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        us.append((time.perf_counter() - t) * 1e6)
    return stats(us)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    from kve_fast import ncsnpp
    from kve_fast.convention import REFERENCE
    from kve_fast.fingerprint import ModelState
    from kve_fast.graphs import CaptureKey, GraphEngine
    from kve_fast.precision import Precision
    from kve_fast.spec import RunSpec

    model = ncsnpp_like()
    ncsnpp.make_capturable(model)  # as the graph runner leaves it
    params = sum(t.numel() for t in model.parameters())
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    state = ModelState(model)
    assert state.difference(model) is None
    spec = RunSpec(REFERENCE, "triton", torch.device("cuda", 0), (64, 3, 32, 32), (3072, 1024, 32, 1), "exact",
                   "heun", False, "uint8", Precision(), "diffusers", s_noise=1.007)
    key = CaptureKey.of(model, spec)
    # what a graphed call checks after each callback (kve_fast.graphs.GraphEngine._stale): the switches and the model
    engine = types.SimpleNamespace(cap=types.SimpleNamespace(key=key, model_ref=lambda: model, state=state))
    assert GraphEngine._stale(engine) is None
    rows = {
        "ModelState.difference (per call)": _time(lambda: state.difference(model), args.repeats),
        "CaptureKey.of (per call)": _time(lambda: CaptureKey.of(model, spec), args.repeats),
        "GraphEngine._stale (per step, with a callback)": _time(lambda: GraphEngine._stale(engine), args.repeats),
        "ModelState(model) (per capture)": _time(lambda: ModelState(model), max(args.repeats // 10, 5)),
    }
    prov = provenance("cpu")
    out = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
           "python": prov["python"], "torch": prov["torch"], "date": prov["date_utc"][:10], "command": prov["command"],
           "commit": (prov["commit"] or "")[:7], "dirty": prov["dirty"], "parameters": params,
           "modules": len(list(model.modules())), "tensors": tensors,
           "attributes": sum(len(vars(m)) for m in model.modules()), "rows": rows}
    print(f"NCSN++-like UNet: {params / 1e6:.1f} M parameters, {out['modules']} modules, {tensors} tensors")
    print("| check | us min / median / max |\n|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['min']:.0f} / {r['median']:.0f} / {r['max']:.0f} |")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
