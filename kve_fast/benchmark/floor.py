"""The floor of a run: ``2N - 1`` model forwards alone, replayed from a CUDA graph (eager on the CPU).

Import-light: torch loads inside the functions.
"""

from __future__ import annotations

import contextlib
import statistics

from .timing import _fast_fir_runs, _first_line, _median_ms, _sync, _timed, compare, precision_label

__all__ = ["measure_floor"]


def has_fir(model) -> bool:
    """Whether ``model`` has NCSN++ FIR blocks (patched by ``kve_fast.ncsnpp`` or not)."""
    import torch

    from .. import ncsnpp

    return isinstance(model, torch.nn.Module) and (ncsnpp.needs_patch(model) or bool(ncsnpp._records(model)))


def measure_floor(unet, shape, device, calls: int, log=print, seconds: float = 1.0, dtype=None,
                  fast_fir: bool = False, tf32: bool = False) -> dict:
    """``calls`` x one model forward: captured in a ``torch.cuda.CUDAGraph`` (device timestep) and replayed,
    median of CUDA-event timings; also the eager forward (0-d CPU timestep, as the sampler passes it).

    The forward is the one the rows it is the floor of run (a floor in another precision, FIR kernel
    or layout than its row measures something else):

    - ``dtype``: the dtype of the model's input (a bf16/fp16 model's own; None: float32), as the sampler's
      kernels write it;
    - ``fast_fir``: the NCSN++ FIR blocks on the Triton kernel exactly as the sampler's fast modes run them
      (``kve_fast.ncsnpp.make_capturable``, then ``with ncsnpp.fast_fir():`` around the eager forwards, the
      warm-up and the capture), where the sampler would (CUDA, or Triton's interpreter); else diffusers' ops;
    - ``tf32``: TF32 matmuls and convolutions on for the measurement (put back afterwards);
    - the layout is the sampler's state's, contiguous (the bench rows are contiguous).

    NCSN++ models are made capturable with ``kve_fast.ncsnpp.make_capturable`` for the measurement
    (bit-identical) and restored afterwards, so the reference runs the model as diffusers ships it. Where no
    graph can be captured (the CPU, a failed capture) the floor is ``calls`` x the eager forward.
    """
    import torch

    from ..precision import Precision

    label = None
    res: dict = {"calls": calls, "layout": "contiguous",
                 "dtype": str(dtype if dtype is not None else torch.float32).replace("torch.", ""), "tf32": tf32}
    if dtype is not None or fast_fir or tf32:
        label = precision_label(dtype, tf32) or "fp32"
    fir_ctx = contextlib.nullcontext()
    fir = None
    patched = 0
    if has_fir(unet):
        from .. import ncsnpp

        fir = "diffusers' ops"
        if fast_fir:
            if _fast_fir_runs(device):
                if ncsnpp.needs_patch(unet):
                    patched = ncsnpp.make_capturable(unet)  # what the sampler does before fast_fir()
                fir_ctx = ncsnpp.fast_fir()
                fir = "Triton"
            else:
                fir = f"diffusers' ops (as the sampler's fast modes on {device})"
        label = f"{label or 'fp32'}, FIR on {fir}"
    res["fir"] = fir
    if label is not None:
        res["label"] = label
    switches = Precision(tf32=tf32).switches() if tf32 else contextlib.nullcontext()
    try:
        with switches, fir_ctx:
            res.update(_measure_floor(unet, shape, device, calls, log, seconds, dtype))
    finally:
        if patched:
            from .. import ncsnpp

            ncsnpp.restore(unet)
    if label is not None:
        res["floor_note"] = res["floor_note"].replace("floor = ", f"floor ({label}) = ", 1)
    return res


def _measure_floor(unet, shape, device, calls: int, log, seconds: float, dtype) -> dict:
    import torch

    sync = _sync(device)
    res: dict = {}
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(shape, generator=gen).to(device)
    if dtype is not None:
        x = x.to(dtype)  # the model's input in its dtype, as the sampler writes it
    t_host = torch.tensor(0.5)  # sigma / 2, a 0-d CPU float32 tensor like the sampler's
    with torch.no_grad():
        for _ in range(2):
            unet(x, t_host)
        est, _ = _timed(lambda: unet(x, t_host), sync)
        n = max(5, min(20, int(seconds / max(est, 1e-6))))
        times = [_timed(lambda: unet(x, t_host), sync)[0] for _ in range(n)]
    res["forward_eager_ms"], res["forward_eager_n"] = _median_ms(times), n
    res["forward_eager_min_ms"], res["forward_eager_max_ms"] = min(times) * 1e3, max(times) * 1e3
    eager_floor = calls * res["forward_eager_ms"]
    if device.type != "cuda":
        res.update(floor_ms=eager_floor, floor_kind="eager",
                   floor_note=f"floor = {calls} x one eager forward")
        return res
    try:
        res.update(_graphed_forward(unet, x, device, seconds))
        res.update(floor_ms=calls * res["forward_graphed_ms"], floor_kind="graphed",
                   floor_note=f"floor = {calls} x one graphed forward")
    except Exception as exc:  # a model that cannot be captured: say so, fall back to the eager forward
        log(f"    floor: capture failed ({_first_line(exc)}); using the eager forward")
        res.update(floor_ms=eager_floor, floor_kind="eager", capture_error=_first_line(exc),
                   floor_note=f"floor = {calls} x one EAGER forward (capture failed: {_first_line(exc)})")
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
    return res


def _graphed_forward(unet, x, device, seconds: float) -> dict:
    import torch

    from .. import ncsnpp

    patched = ncsnpp.needs_patch(unet)
    if patched:
        ncsnpp.make_capturable(unet)
    graph = out = None
    try:
        static_x = x.clone()
        t_dev = torch.full((), 0.5, dtype=torch.float32, device=device)
        with torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    unet(static_x, t_dev)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = unet(static_x, t_dev).sample
            graph.replay()
            torch.cuda.synchronize(device)
            eager = unet(static_x, t_dev).sample
            same = compare(out, eager)["equal"]
            graph.replay()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(device)
            est_ms = start.elapsed_time(end)
            n = max(5, min(50, int(seconds * 1e3 / max(est_ms, 1e-3))))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for s, e in zip(starts, ends):
                s.record()
                graph.replay()
                e.record()
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return {"forward_graphed_ms": statistics.median(times), "forward_graphed_n": n,
                "forward_graphed_min_ms": min(times), "forward_graphed_max_ms": max(times), "graph_equals_eager": same,
                "ncsnpp_patched": patched}
    finally:
        del graph, out
        if patched:
            ncsnpp.restore(unet)
        torch.cuda.empty_cache()
