"""``kve-fast bench``: time diffusers' pipeline and kve_fast (eager and CUDA-graphed, exact and fast noise)
on your own model and GPU, against the floor of the model itself.

    kve-fast bench --model path/to/unet --batch-size 1 8 --device cuda --json bench.json

For each batch size, one table row per way of sampling:

- ``diffusers KarrasVePipeline``: the reference (a CPU ``torch.Generator``, the only kind it accepts;
  only for 3-channel models with an int ``sample_size`` and the reference's schedule: its pipeline
  hard-codes ``(batch, 3, size, size)``);
- ``kve_fast eager`` and ``kve_fast graphed`` (``cuda_graph=False`` / ``True``), each with ``exact``
  noise (the reference's stream, bit-identical) and ``fast`` noise (drawn on the device).

Columns: median ms per call (``torch.cuda.synchronize`` around each call, host clock), the speedup over
the reference, the ratio to the floor (``2N - 1`` times one model forward captured in a CUDA graph, measured
in the same run; on the CPU, or where capture fails, one eager forward instead, and the table says so), the
time from the first call to the first image (capture included: ``clear_graphs()`` first), how many timed
calls the median is of, and bit-exactness: exact rows against diffusers (the final sample with
``torch.equal``, the ``np`` images with ``np.array_equal``) and graphed rows against eager ones.

Low precision (``--unet-dtype bf16|fp16``, ``--tf32``; ``bench_pipeline(..., unet_dtype=, tf32=)``): diffusers'
row runs the float32 UNet as always (it cannot run a half-precision one); kve_fast's rows run a copy of the
UNet converted to that dtype (``copy.deepcopy(unet).to(dtype)``, made per configuration, freed after; the
caller's UNet is not touched) natively, and the floor is ``2N - 1`` graphed forwards of that copy (input in
its dtype; NCSN++ FIR blocks on the Triton kernel, ``kve_fast.ncsnpp.make_fast``, as the sampler's fast
modes run them). Bits cannot match diffusers there: exact-noise rows report the relative RMS difference of
their final latent from diffusers' float32 one (``||a - b|| / ||b||``) instead; graphed rows are still
compared bit for bit with eager ones (same kernels, same precision). Row labels and the floor say the
precision.

The same engine (``bench_pipeline``, ``format_markdown``, ``write_outputs``) drives
``bench/graph_bench.py``. Import-light: torch, numpy and diffusers load inside the functions, so
``kve-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

from .options import BACKENDS, NOISE_MODES

__all__ = ["add_arguments", "run", "bench_pipeline", "measure_floor", "format_markdown", "write_outputs",
           "environment", "RepeatPolicy", "graph_support", "jit_warmup", "BenchError", "ROW_LABELS", "COLUMNS",
           "precision_label", "relative_rms"]

KINDS = ("eager", "graphed")
ROW_LABELS = {
    ("reference", "exact"): "diffusers KarrasVePipeline",
    ("eager", "exact"): "kve_fast eager, exact noise",
    ("eager", "fast"): "kve_fast eager, fast noise",
    ("graphed", "exact"): "kve_fast graphed, exact noise",
    ("graphed", "fast"): "kve_fast graphed, fast noise",
}
COLUMNS = ("config", "row", "ms/call", "vs diffusers", "/ floor", "first image", "n", "= diffusers", "= eager")
FLOOR_TARGET = 1.05  # the issue's target: graphed exact total <= 1.05 x the floor
FIRST_IMAGE_TARGET_S = 3.0  # ... and the first image within 3 s (capture included)
GRAPH_ENV = "KVE_FAST_CUDA_GRAPH"


class BenchError(ValueError):
    """A user error of ``kve-fast bench``: one line, exit status 2."""


# ---- small helpers -----------------------------------------------------------------------------------

class RepeatPolicy:
    """How many timed calls follow the first (untimed-for-the-median) call of a row.

    ``fixed``: exactly that many. Otherwise as many as fit in ``row_seconds`` at the first call's
    duration, between ``min_repeats`` and ``max_repeats``.
    """

    def __init__(self, row_seconds: float = 5.0, min_repeats: int = 1, max_repeats: int = 5, fixed: int | None = None):
        self.row_seconds, self.min_repeats, self.max_repeats, self.fixed = row_seconds, min_repeats, max_repeats, fixed

    def repeats(self, first_call_s: float) -> int:
        if self.fixed is not None:
            return self.fixed
        n = int(self.row_seconds // max(first_call_s, 1e-6))
        return max(self.min_repeats, min(self.max_repeats, n))

    def as_dict(self) -> dict:
        return {"row_seconds": self.row_seconds, "min_repeats": self.min_repeats, "max_repeats": self.max_repeats,
                "fixed": self.fixed}


def _sync(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _host(x):
    """A host copy of an output (tensor or array), so later calls cannot change it."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().to("cpu", copy=True)
    return np.array(x, copy=True)


def compare(a, b) -> dict:
    """Element-by-element comparison, no tolerance (NaN where the other has NaN counts as equal):
    ``{"equal", "mismatches", "elements", "bitwise"}``; ``bitwise``: the float32 bit patterns are equal."""
    import numpy as np
    import torch

    ta = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    tb = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    ta, tb = ta.detach().cpu(), tb.detach().cpu()
    if ta.shape != tb.shape or ta.dtype != tb.dtype:
        return {"equal": False, "mismatches": None, "elements": ta.numel(), "bitwise": False,
                "why": f"shape/dtype {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}"}
    diff = ta != tb
    if ta.is_floating_point():
        diff &= ~(torch.isnan(ta) & torch.isnan(tb))
    bad = int(diff.sum())
    bitwise = bad == 0
    if bitwise and ta.dtype == torch.float32:
        bitwise = torch.equal(ta.contiguous().view(torch.int32), tb.contiguous().view(torch.int32))
    return {"equal": bad == 0, "mismatches": bad, "elements": ta.numel(), "bitwise": bool(bitwise)}


def inside_share(images) -> float:
    """The share of pixels strictly inside (0, 1) of float images (saturated pixels prove little)."""
    import numpy as np

    a = np.asarray(images)
    return float(((a > 0) & (a < 1)).mean()) if a.size else float("nan")


def _latent_to_np(latent):
    """diffusers' own last lines on a final sample: ``(x / 2 + 0.5).clamp(0, 1)``, BHWC numpy."""
    return (latent / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()


def relative_rms(a, b) -> float:
    """``||a - b|| / ||b||`` over all elements, in float64 (tensors or arrays; inf where ``b`` is all zeros)."""
    import numpy as np
    import torch

    ta = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    tb = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    ta, tb = ta.detach().cpu().double(), tb.detach().cpu().double()
    if ta.shape != tb.shape:
        raise ValueError(f"relative_rms: shapes differ, {tuple(ta.shape)} vs {tuple(tb.shape)}")
    den = float(tb.norm())
    num = float((ta - tb).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


_DTYPE_SHORT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def precision_label(unet_dtype=None, tf32: bool = False) -> str | None:
    """How kve_fast's rows run the UNet, for labels: ``"bf16"``, ``"fp16"``, ``"fp32 + TF32"``,
    ``"bf16 + TF32"``; None for float32 without TF32 (the exact path, labelled as before)."""
    name = _DTYPE_SHORT.get(str(unet_dtype), "fp32") if unet_dtype is not None else "fp32"
    if name == "fp32" and not tf32:
        return None
    return name + (" + TF32" if tf32 else "")


def _fast_fir_runs(device) -> bool:
    """Where the sampler's fast modes put NCSN++ FIR blocks on the Triton kernel (kve_fast/sampler.py::_fast_fir):
    CUDA, or Triton's interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def _diffusers_quiet():
    """diffusers' logger at error level for the block (``ModelMixin.to(dtype)`` warns about an empty list of
    float32 modules)."""
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        yield
        return
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def low_precision_copy(unet, dtype):
    """``copy.deepcopy(unet).to(dtype)``: the caller's float32 UNet stays as it is."""
    with _diffusers_quiet():
        return copy.deepcopy(unet).to(dtype)


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _params(model) -> int | None:
    try:
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def environment(device, command: list[str] | None = None) -> dict:
    """Card, versions, date and command, for the record."""
    import importlib.metadata as md
    import subprocess

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
        "diffusers": version("diffusers"), "numpy": version("numpy"), "python": platform.python_version(),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
        "command": " ".join(command if command is not None else sys.argv),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "KVE_FAST_CUDA_GRAPH": os.environ.get(GRAPH_ENV),
    }
    try:
        from . import __version__

        env["kve_fast"] = __version__
        here = os.path.dirname(os.path.abspath(__file__))
        env["git"] = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except Exception:
        env.setdefault("git", None)
    return env


# ---- graphs: what the runner offers ---------------------------------------------------------------------

def _graphs_module():
    """``kve_fast.graphs`` if this kve_fast has it, else None."""
    try:
        from . import graphs
    except Exception:  # absent, or half-written: graphed rows then say why when they run
        return None
    return graphs


def supports_cuda_graph(pipe) -> bool:
    """Whether ``pipe.__call__`` (a pipeline or its class) takes ``cuda_graph=`` (the graph runner's switch)."""
    import inspect

    try:
        cls = pipe if isinstance(pipe, type) else type(pipe)
        return "cuda_graph" in inspect.signature(cls.__call__).parameters
    except (TypeError, ValueError):
        return False


def graph_support(pipe, device) -> tuple[bool, str]:
    """``(True, "")`` when graphed rows can be tried, else ``(False, why)``."""
    if device.type != "cuda":
        return False, f"graphs unavailable: CUDA graphs need a CUDA device (the device is {device})"
    value = os.environ.get(GRAPH_ENV)
    if value is not None and value.strip().lower() in ("0", "false", "off", "no"):
        return False, f"graphs unavailable: {GRAPH_ENV}={value} in the environment"
    if not supports_cuda_graph(pipe):
        return False, "graphs unavailable: this kve_fast's pipeline has no cuda_graph option"
    return True, ""


def _clear_graphs(note: list | None = None) -> None:
    graphs = _graphs_module()
    if graphs is not None and hasattr(graphs, "clear_graphs"):
        graphs.clear_graphs()
    elif note is not None and not any("clear_graphs is missing" in n for n in note):
        note.append("kve_fast.graphs.clear_graphs is missing: graphed first calls may reuse earlier captures")


def _captures() -> int | None:
    graphs = _graphs_module()
    if graphs is None or not hasattr(graphs, "graph_info"):
        return None
    try:
        return int(graphs.graph_info().get("captures"))
    except Exception:
        return None


# ---- the floor: one model forward, eager and in a CUDA graph -----------------------------------------------

def measure_floor(unet, shape, device, calls: int, log=print, seconds: float = 1.0, dtype=None,
                  fast_fir: bool = False, tf32: bool = False) -> dict:
    """``calls`` x one model forward: captured in a ``torch.cuda.CUDAGraph`` (device timestep) and replayed,
    median of CUDA-event timings; also the eager forward (0-d CPU timestep, as the sampler passes it).

    NCSN++ models are made capturable with ``kve_fast.ncsnpp.make_capturable`` for the capture only
    (bit-identical) and restored afterwards, so the reference runs the model as diffusers ships it.
    Where no graph can be captured (the CPU, a failed capture) the floor is ``calls`` x the eager forward.

    The floor in another precision (what low-precision rows are measured against): ``dtype``, the dtype
    of the model's input (a bf16/fp16 model's own; None: float32); ``fast_fir``, the model's NCSN++ FIR
    blocks on the Triton kernel (``kve_fast.ncsnpp.make_fast``, where the sampler's fast modes use it:
    CUDA or Triton's interpreter) for the measurement, ``restore_fast`` afterwards; ``tf32``, TF32
    matmuls and convolutions on for the measurement (put back afterwards).
    """
    import torch

    from .precision import Precision

    label = None
    res: dict = {"calls": calls}
    if dtype is not None or fast_fir or tf32:
        label = precision_label(dtype, tf32) or "fp32"
        res.update(dtype=str(dtype if dtype is not None else torch.float32).replace("torch.", ""), tf32=tf32)
    patched = 0
    if fast_fir and isinstance(unet, torch.nn.Module):
        from . import ncsnpp

        has_fir = _needs_patch(unet) or ncsnpp.is_fast(unet)
        if has_fir and _fast_fir_runs(device):
            patched = ncsnpp.make_fast(unet)
        fir = (None if not has_fir else "FIR on Triton" if ncsnpp.is_fast(unet)
               else "FIR on diffusers' ops" + ("" if _fast_fir_runs(device) else f" (as the sampler's on {device})"))
        res["fir"] = fir
        if fir:
            label = f"{label}, {fir}"
    if label is not None:
        res["label"] = label
    switches = Precision(tf32=tf32).switches() if tf32 else contextlib.nullcontext()
    try:
        with switches:
            res.update(_measure_floor(unet, shape, device, calls, log, seconds, dtype))
    finally:
        if patched:
            from . import ncsnpp

            ncsnpp.restore_fast(unet)
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
        n = max(3, min(20, int(seconds / max(est, 1e-6))))
        times = [_timed(lambda: unet(x, t_host), sync)[0] for _ in range(n)]
    res["forward_eager_ms"], res["forward_eager_n"] = _median_ms(times), n
    eager_floor = calls * res["forward_eager_ms"]
    if device.type != "cuda":
        res.update(floor_ms=eager_floor, floor_kind="eager",
                   floor_note=f"floor = {calls} x one eager forward (no CUDA graphs on {device})")
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

    from . import ncsnpp

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
                "forward_graphed_min_ms": min(times), "graph_equals_eager": same, "ncsnpp_patched": patched}
    finally:
        del graph, out
        if patched:
            ncsnpp.restore(unet)
        torch.cuda.empty_cache()


# ---- rows --------------------------------------------------------------------------------------------------

def _reference_pipeline(pipe):
    """diffusers' own pipeline on the same UNet, with the scheduler settings of ``pipe``; or ``(None, why)``."""
    config = getattr(pipe.unet, "config", None)
    channels = getattr(config, "in_channels", 3)
    size = getattr(config, "sample_size", None)
    if channels != 3:
        return None, (f"diffusers' KarrasVePipeline hard-codes 3 channels (batch, 3, size, size); this model has "
                      f"{channels}")
    if not isinstance(size, int):
        return None, f"diffusers' KarrasVePipeline needs a square int sample_size; this model has {size!r}"
    sched = dict(pipe.scheduler.config)
    if sched.get("sigma_schedule", "diffusers") != "diffusers":
        return None, (f"the model's scheduler uses sigma_schedule={sched['sigma_schedule']!r}; diffusers' scheduler "
                      "has only its own ('diffusers')")
    try:
        from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as RefPipeline
        from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler
    except ImportError as exc:
        return None, f"diffusers' KarrasVePipeline does not import: {_first_line(exc)}"
    keys = ("sigma_min", "sigma_max", "s_noise", "s_churn", "s_min", "s_max")
    ref = RefPipeline(unet=pipe.unet, scheduler=RefScheduler(**{k: sched[k] for k in keys if k in sched}))
    ref.set_progress_bar_config(disable=True)
    return ref, ""


class _LatentHook:
    """Records the final sample of diffusers' loop (the last ``step``/``step_correct`` ``prev_sample``)
    while active, by wrapping the scheduler instance's two methods; the timed calls run unwrapped."""

    def __init__(self, scheduler):
        self.scheduler, self.latent = scheduler, None

    def __enter__(self):
        sched = self.scheduler
        step, correct = sched.step, sched.step_correct

        def wrapped(fn):
            def call(*args, **kwargs):
                out = fn(*args, **kwargs)
                self.latent = out.prev_sample
                return out
            return call

        object.__setattr__(sched, "step", wrapped(step))
        object.__setattr__(sched, "step_correct", wrapped(correct))
        return self

    def __exit__(self, *exc):
        vars(self.scheduler).pop("step", None)
        vars(self.scheduler).pop("step_correct", None)
        return False


def row_label(kind: str, noise: str, precision: str | None = None) -> str:
    """``ROW_LABELS``' label; with a low ``precision`` label, which UNet the row runs: diffusers' row
    "(fp32 UNet)", kve_fast's rows ", bf16 UNet" (or ", fp32 UNet + TF32")."""
    base = ROW_LABELS[(kind, noise)]
    if precision is None:
        return base
    if kind == "reference":
        return f"{base} (fp32 UNet)"
    dtype, _, tf32 = precision.partition(" + ")
    return f"{base}, {dtype} UNet" + (f" + {tf32}" if tf32 else "")


def _row_record(kind: str, noise: str, precision: str | None = None) -> dict:
    rec = {"row": row_label(kind, noise, precision), "kind": kind, "noise": noise, "status": "pending", "why": None,
           "ms_per_call": None, "times_ms": [], "repeats": 0, "first_call_s": None, "speedup": None,
           "floor_ratio": None, "equal_reference_latent": None, "equal_reference_np": None, "equal_eager": None,
           "repeat_consistent": None, "warnings": []}
    if precision is not None and kind != "reference":
        rec.update(precision=precision, rel_rms_reference=None)
    return rec


def _row_estimate(call_s: float, policy: RepeatPolicy) -> float:
    """Seconds a row should take: its first call and the repeats ``policy`` gives such calls (+5 %)."""
    return 1.05 * call_s * (1 + policy.repeats(call_s))


def _time_row(rec: dict, call, sync, policy: RepeatPolicy, log, before_first=None):
    """First call (timed as first image), then the policy's repeats; returns the first call's output (host)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if before_first is not None:
            before_first()
        first_s, out = _timed(call, sync)
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in rec["warnings"]:
            rec["warnings"].append(text)
            log(f"    warning: {text}")
    first = _host(out)
    del out
    n = policy.repeats(first_s)
    times, consistent = [], True
    for _ in range(n):
        dt, out = _timed(call, sync)
        times.append(dt)
        consistent = consistent and compare(_host(out), first)["equal"]
        del out
    rec.update(status="ok", first_call_s=first_s, times_ms=[t * 1e3 for t in times], repeats=n,
               ms_per_call=_median_ms(times), repeat_consistent=consistent)
    return first


def bench_pipeline(pipe, *, name: str, batch_size: int, steps: int = 50, device=None, seed: int = 0,
                   noises=NOISE_MODES, kinds=KINDS, reference: bool = True, step_backend: str = "auto",
                   output_type: str = "latent", policy: RepeatPolicy | None = None, deadline: float | None = None,
                   log=print, model_label: str | None = None, unet_dtype=None, tf32: bool = False) -> dict:
    """Measure every row for one pipeline and batch size; return the configuration's record (see the module
    docstring). ``deadline``: a ``time.monotonic()`` value after which rows are skipped with a note (and the
    whole configuration, when its estimated cost does not fit the time left).

    ``unet_dtype`` (None, ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``) and ``tf32``: how
    kve_fast's rows run the UNet. Low precision: they run a converted copy of ``pipe.unet`` (which must
    be float32; it is not modified) natively, with ``unet_dtype`` and ``tf32`` passed to the pipeline;
    diffusers' row runs the float32 UNet with TF32 off; the floor is measured on the copy (see
    ``measure_floor``); exact-noise rows get ``rel_rms_reference`` instead of bit comparisons with
    diffusers. The copy is dropped (and the graph captures holding it cleared) before returning.
    """
    import torch

    from .precision import check_tf32, check_unet_dtype, model_dtype

    unet_dtype, tf32 = check_unet_dtype(unet_dtype), check_tf32(tf32)
    if unet_dtype == torch.float32:
        unet_dtype = None
    label = precision_label(unet_dtype, tf32)
    common = dict(name=name, batch_size=batch_size, steps=steps, device=device, seed=seed, noises=noises,
                  kinds=kinds, reference=reference, step_backend=step_backend, output_type=output_type,
                  policy=policy, deadline=deadline, log=log, model_label=model_label)
    if label is None:
        return _bench_pipeline(pipe, pipe, **common)
    own = model_dtype(pipe.unet)
    if unet_dtype is not None and own != torch.float32:
        raise ValueError(f"bench_pipeline: `unet_dtype`={unet_dtype} needs the float32 UNet (diffusers' row runs it; "
                         f"kve_fast's rows run a converted copy), got a {own} one")
    run_pipe = pipe
    if unet_dtype is not None:
        run_pipe = copy.copy(pipe)  # shares the scheduler; only its unet differs
        run_pipe.__dict__["unet"] = low_precision_copy(pipe.unet, unet_dtype)
    precision = {"label": label, "unet_dtype": str(unet_dtype or torch.float32).replace("torch.", ""), "tf32": tf32,
                 "converted_copy": run_pipe is not pipe, "reference": "float32, TF32 off"}
    try:
        return _bench_pipeline(pipe, run_pipe, precision=precision, **common)
    finally:
        if run_pipe is not pipe:
            _clear_graphs()  # captures of the copy hold it and its buffers
            run_pipe.__dict__.pop("unet", None)
            del run_pipe
            import gc

            gc.collect()
            dev = torch.device(device) if device is not None else pipe.device
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _bench_pipeline(pipe, run_pipe, *, name: str, batch_size: int, steps: int, device, seed: int, noises, kinds,
                    reference: bool, step_backend: str, output_type: str, policy: RepeatPolicy | None,
                    deadline: float | None, log, model_label: str | None, precision: dict | None = None) -> dict:
    """``bench_pipeline``'s rows: diffusers' on ``pipe`` (float32), kve_fast's on ``run_pipe`` (``pipe`` itself,
    or a copy holding the low-precision UNet); ``precision``: None (float32, exact) or bench_pipeline's record."""
    import torch

    device = torch.device(device) if device is not None else pipe.device
    policy = policy or RepeatPolicy()
    sync = _sync(device)
    t_config = time.monotonic()
    unet = pipe.unet
    low = precision is not None
    label = precision["label"] if low else None
    shape = pipe._image_shape(batch_size)
    calls = 2 * steps - 1
    rec = {"name": name, "model": model_label, "params": _params(unet), "shape": list(shape), "batch_size": batch_size,
           "steps": steps, "model_calls": calls, "output_type": output_type, "step_backend": step_backend,
           "seed": seed, "repeat_policy": policy.as_dict(), "status": "ok", "floor": None, "rows": [], "notes": [],
           "inside_share": None}
    if low:
        rec["precision"] = dict(precision)
    log(f"== {name}: image {'x'.join(map(str, shape[1:]))}, batch {batch_size}, {steps} steps ({calls} model calls), "
        f"{(rec['params'] or 0) / 1e6:.1f} M parameters, {device}" + (f"; kve_fast rows in {label}" if low else ""))

    if low:
        dtype = getattr(torch, precision["unet_dtype"])
        floor = measure_floor(run_pipe.unet, shape, device, calls, log, dtype=None if dtype == torch.float32 else dtype,
                              fast_fir=True, tf32=precision["tf32"])
    else:
        floor = measure_floor(unet, shape, device, calls, log)
    rec["floor"] = floor
    log(f"    one forward: eager {floor['forward_eager_ms']:.3f} ms"
        + (f", graphed {floor['forward_graphed_ms']:.3f} ms" if "forward_graphed_ms" in floor else "")
        + f"; floor {floor['floor_ms']:.1f} ms ({floor['floor_note']})")

    rows = ([("reference", "exact")] if reference else []) + [(k, n) for k in KINDS if k in kinds
                                                                for n in NOISE_MODES if n in noises]
    records = {key: _row_record(*key, precision=label) for key in rows}
    rec["rows"] = list(records.values())

    shipped = _needs_patch(unet)  # NCSN++ as diffusers ships it: put back after the graph runner patched it
    ref_pipe, ref_why = (None, "not asked for (--no-reference)") if not reference else _reference_pipeline(pipe)
    graphs_ok, graphs_why = graph_support(run_pipe, device)
    cuda_graph_kw = supports_cuda_graph(run_pipe)
    precision_kw = {"unet_dtype": getattr(torch, precision["unet_dtype"]), "tf32": precision["tf32"]} if low else {}

    # Skip the whole configuration if its rows (first call + the policy's repeats) cannot fit the time left.
    # (Low precision: the floor is the low-precision model's, so diffusers' float32 row is underestimated.)
    if deadline is not None:
        eager_call_s = calls * floor["forward_eager_ms"] / 1e3
        graph_call_s = floor["floor_ms"] / 1e3
        est = sum(_row_estimate(graph_call_s if k == "graphed" else eager_call_s * (1.1 if k == "reference" else 1.0),
                                policy) for k, _ in rows)
        left = deadline - time.monotonic()
        if est > left:
            why = f"skipped: about {est:.0f} s needed, {max(left, 0):.0f} s left of the time budget (--budget-s)"
            for r in rec["rows"]:
                r.update(status="skipped", why=why)
            rec.update(status="skipped", notes=[why], seconds=time.monotonic() - t_config)
            log("    " + why)
            return rec

    def generator():
        return torch.Generator().manual_seed(seed)

    def ours(kind, noise, out_type=output_type):
        kwargs = {"cuda_graph": kind == "graphed"} if cuda_graph_kw else {}
        return lambda: run_pipe(batch_size, steps, generator(), output_type=out_type, backend=step_backend,
                                noise=noise, **kwargs, **precision_kw).images

    outputs: dict = {}
    ref_latent = ref_np = None
    for key in rows:
        kind, noise = key
        r = records[key]
        if deadline is not None and time.monotonic() > deadline:
            r.update(status="skipped", why="skipped: the time budget (--budget-s) ran out")
            log(f"    {r['row']}: {r['why']}")
            continue
        try:
            if kind == "reference":
                if ref_pipe is None:
                    r.update(status="unavailable", why=ref_why)
                    log(f"    {r['row']}: unavailable ({ref_why})")
                    continue
                hook = _LatentHook(ref_pipe.scheduler)
                call = lambda: ref_pipe(batch_size, steps, generator(), output_type="np").images  # noqa: E731
                state = {"first": True}

                def ref_call():
                    if state["first"]:
                        state["first"] = False
                        with hook:
                            return call()
                    return call()

                ref_np = _time_row(r, ref_call, sync, policy, log)
                ref_latent = _host(hook.latent) if hook.latent is not None else None
                rec["inside_share"] = inside_share(ref_np)
            else:
                if kind == "graphed" and not graphs_ok:
                    r.update(status="unavailable", why=graphs_why)
                    log(f"    {r['row']}: {graphs_why}")
                    continue
                def fresh(r=r):  # graphed rows start from no captures, so the first call includes capturing
                    _clear_graphs(rec["notes"])
                    r["captures_before"] = _captures()

                try:
                    out = _time_row(r, ours(kind, noise), sync, policy, log,
                                    before_first=fresh if kind == "graphed" else None)
                except (ValueError, TypeError, NotImplementedError) as exc:
                    # The runner's documented refusal (cuda_graph=True and the run cannot be captured) is a
                    # ValueError; anything else is a failure, reported as such.
                    if kind != "graphed":
                        raise
                    r.update(status="unavailable", why=f"graphs unavailable: {_first_line(exc)}")
                    log(f"    {r['row']}: {r['why']}")
                    _settle(device)
                    continue
                if kind == "graphed":
                    r["captures_after"] = _captures()
                    if r.get("captures_after") == 0:
                        rec["notes"].append(f"{r['row']}: graph_info() reports no capture after the run: it may "
                                            "have run eagerly")
                outputs[key] = out
                if rec["inside_share"] is None:
                    rec["inside_share"] = inside_share(_latent_to_np(out) if output_type == "latent" else out)
                if noise == "exact" and ref_np is not None and low:
                    # Bits cannot match a float32 run: how far the final sample is from diffusers' instead.
                    if output_type == "latent" and ref_latent is not None:
                        r["rel_rms_reference"] = {"of": "latent", "value": relative_rms(out, ref_latent)}
                    elif output_type != "latent":
                        r["rel_rms_reference"] = {"of": "np", "value": relative_rms(out, ref_np)}
                elif noise == "exact" and ref_np is not None:
                    if output_type == "latent":
                        if ref_latent is not None:
                            r["equal_reference_latent"] = compare(out, ref_latent)
                        # diffusers' own conversion, on the device diffusers ran it on
                        r["equal_reference_np"] = compare(_latent_to_np(out.to(device)), ref_np)
                    else:
                        r["equal_reference_np"] = compare(out, ref_np)
                if kind == "graphed" and ("eager", noise) in outputs:
                    r["equal_eager"] = compare(out, outputs[("eager", noise)])
        except Exception as exc:
            _settle(device)
            r.update(status="failed", why=_first_line(exc))
            log(f"    {r['row']}: FAILED {r['why']}")
            import traceback

            traceback.print_exc(file=sys.stderr)
            continue
        log(f"    {_row_line(r)}")
    if any(k == "graphed" for k, _ in rows) and graphs_ok:
        _clear_graphs()
        if shipped and not _needs_patch(unet):
            from . import ncsnpp

            ncsnpp.restore(unet)
            rec["notes"].append("the graph runner made the UNet capturable (kve_fast.ncsnpp); restored afterwards, "
                                "so later configurations see the model as diffusers ships it")

    ref_ms = records[("reference", "exact")]["ms_per_call"] if ("reference", "exact") in records else None
    for r in rec["rows"]:
        if r["ms_per_call"]:
            r["floor_ratio"] = r["ms_per_call"] / floor["floor_ms"]
            if ref_ms:
                r["speedup"] = ref_ms / r["ms_per_call"]
    rec["seconds"] = time.monotonic() - t_config
    if any(r["status"] == "failed" for r in rec["rows"]):
        rec["status"] = "partial"
    return rec


def _needs_patch(model) -> bool:
    try:
        import torch

        from . import ncsnpp

        return isinstance(model, torch.nn.Module) and ncsnpp.needs_patch(model)
    except Exception:
        return False


def _settle(device) -> None:
    """After a failed call: wait for the device (errors here are reported by the next call, not raised)."""
    if device.type == "cuda":
        try:
            import torch

            torch.cuda.synchronize(device)
        except Exception:
            pass


def _row_line(r: dict) -> str:
    return (f"{r['row']}: {r['ms_per_call']:.1f} ms/call (median of {r['repeats']}), first call "
            f"{r['first_call_s']:.2f} s" + ("" if r["repeat_consistent"] else ", REPEATS DIFFER"))


def jit_warmup(device, step_backend: str = "auto", log=print, unet_dtype=None, tf32: bool = False) -> float | None:
    """Compile the step kernels (eager and graphed, both noises) on a throwaway tiny UNet, 2 steps, so that
    first-call times are not Triton's one-time JIT; returns the seconds it took (None on the CPU).
    ``unet_dtype``/``tf32``: warm up the variants low-precision rows run (the UNet converted to ``unet_dtype``;
    the kernels write the model input in it)."""
    import torch

    if device.type != "cuda":
        return None
    from diffusers import UNet2DModel

    from .pipeline import KarrasVePipeline
    from .scheduler import KarrasVeScheduler

    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=3, out_channels=3,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet = unet.to(device).eval()
    precision_kw = {}
    if unet_dtype is not None and unet_dtype != torch.float32:
        unet = low_precision_copy(unet, unet_dtype)
        precision_kw["unet_dtype"] = unet_dtype
    if tf32:
        precision_kw["tf32"] = True
    pipe = KarrasVePipeline(unet, KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    graphs_ok, _ = graph_support(pipe, device)
    kinds = [False, True] if graphs_ok else [False]
    for graphed in kinds:
        for noise in NOISE_MODES:
            kwargs = {"cuda_graph": graphed} if supports_cuda_graph(pipe) else {}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipe(1, 2, torch.Generator().manual_seed(0), output_type="latent", backend=step_backend,
                         noise=noise, **kwargs, **precision_kw)
            except Exception as exc:
                log(f"    warm-up ({'graphed' if graphed else 'eager'}, {noise}): {_first_line(exc)}")
    if graphs_ok:
        _clear_graphs()
    torch.cuda.synchronize(device)
    del pipe, unet
    torch.cuda.empty_cache()
    return time.perf_counter() - t0


# ---- reporting ---------------------------------------------------------------------------------------------

def _fmt_eq(c) -> str:
    if c is None:
        return ""
    if c.get("equal"):
        return "yes" if c.get("bitwise", True) else "yes (not bitwise: signed zeros/NaN payloads differ)"
    if c.get("mismatches") is None:
        return f"NO ({c.get('why')})"
    return f"NO ({c['mismatches']:,} of {c['elements']:,} differ)"


def _fmt_rel(value) -> str:
    """A relative RMS difference; NaN/inf (a run that overflowed, e.g. fp16) said plainly."""
    if value is None or not math.isfinite(value):
        return f"{value} (NON-FINITE: the output has NaN/inf)"
    return f"{value:.2e}"


def _eq_reference(r: dict) -> str:
    if r["kind"] == "reference":
        return ""
    if r["noise"] == "fast" and r["status"] == "ok":
        return "n/a (own noise stream)"
    if r.get("precision") is not None:  # low precision: bits cannot match diffusers' float32 run
        rel = r.get("rel_rms_reference")
        if rel is None:
            return ""
        return f"rel. RMS {_fmt_rel(rel['value'])} ({rel['of']}; {r['precision']}: not bitwise)"
    parts = []
    if r.get("equal_reference_latent") is not None:
        parts.append(f"latent {_fmt_eq(r['equal_reference_latent'])}")
    if r.get("equal_reference_np") is not None:
        parts.append(f"np {_fmt_eq(r['equal_reference_np'])}")
    return ", ".join(parts)


def _config_label(c: dict) -> str:
    shape = c.get("shape")
    dims = f"{shape[2]}x{shape[3]}x{shape[1]}" if shape and len(shape) == 4 else ""
    params = f", {c['params'] / 1e6:.1f} M" if c.get("params") else ""
    return f"{c['name']} ({dims}{params})" if dims else c["name"]


def table_rows(configs: list[dict]) -> list[list[str]]:
    """The main table's cells, one list per row (``COLUMNS``)."""
    out = []
    for c in configs:
        label = _config_label(c)
        if not c.get("rows"):
            out.append([label, c.get("status", "?"), (c.get("error") or "; ".join(c.get("notes", [])))[:200],
                        "", "", "", "", "", ""])
            continue
        for k, r in enumerate(c["rows"]):
            first = label if k == 0 else ""
            if r["status"] != "ok":
                out.append([first, r["row"], f"{r['status']}: {r['why']}", "", "", "", "", "", ""])
                continue
            tail = "" if r["repeat_consistent"] else " (repeats differ!)"
            out.append([
                first, r["row"], f"{r['ms_per_call']:.1f}",
                f"{r['speedup']:.2f}x" if r["speedup"] else "",
                f"{r['floor_ratio']:.3f}" if r["floor_ratio"] else "",
                f"{r['first_call_s']:.2f} s", str(r["repeats"]),
                _eq_reference(r), (_fmt_eq(r["equal_eager"]) if r["equal_eager"] is not None else "") + tail,
            ])
    return out


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in rows]
    return "\n".join(lines)


def floors_table(configs: list[dict]) -> str:
    rows = []
    for c in configs:
        f = c.get("floor")
        if not f:
            continue
        graphed = f.get("forward_graphed_ms")
        rows.append([
            _config_label(c), f"{f['forward_eager_ms']:.3f} (n={f['forward_eager_n']})",
            f"{graphed:.3f} (n={f['forward_graphed_n']})" if graphed is not None else f.get("capture_error", "-"),
            ("yes" if f.get("graph_equals_eager") else "NO") if "graph_equals_eager" in f else "",
            f"{f['floor_ms']:.1f} ({f['calls']} x {f['floor_kind']}" + (f"; {f['label']}" if f.get("label") else "")
            + ")",
            f"{c['inside_share']:.1%}" if c.get("inside_share") is not None else "",
        ])
    header = ("config", "one forward, eager ms", "one forward, graphed ms", "graph = eager", "floor ms",
              "pixels inside (0,1)")
    return _md_table(header, rows) if rows else ""


def verdicts(configs: list[dict]) -> list[str]:
    """The issue's targets for graphed exact rows: <= 1.05 x floor, first image < 3 s, bit-identical."""
    lines = []
    for c in configs:
        if c.get("precision"):  # low precision: precision_verdicts
            continue
        for r in c.get("rows", []):
            if r["kind"] != "graphed" or r["noise"] != "exact":
                continue
            if r["status"] != "ok":
                lines.append(f"- {c['name']}: graphed exact {r['status']} ({r['why']})")
                continue
            floor_ok = r["floor_ratio"] is not None and r["floor_ratio"] <= FLOOR_TARGET
            once = r["first_call_s"] - r["ms_per_call"] / 1e3
            eqs = [x for x in (r.get("equal_reference_latent"), r.get("equal_reference_np"), r.get("equal_eager")) if x]
            exact = all(x["equal"] for x in eqs) if eqs else None
            floor_kind = (c.get("floor") or {}).get("floor_kind")
            lines.append(
                f"- {c['name']}: {r['floor_ratio']:.3f} x floor{' (EAGER floor)' if floor_kind != 'graphed' else ''} "
                f"(target <= {FLOOR_TARGET}: {'met' if floor_ok else 'NOT met'}); first image {r['first_call_s']:.2f} s, "
                f"of which {max(once, 0):.2f} s one-time (target < {FIRST_IMAGE_TARGET_S:.0f} s: "
                f"{'met' if r['first_call_s'] < FIRST_IMAGE_TARGET_S else ('one-time cost met' if once < FIRST_IMAGE_TARGET_S else 'NOT met')}); "
                f"bit-identical: {'n/a' if exact is None else ('yes' if exact else 'NO')}"
                + (f" ({len(eqs)} checks)" if eqs else ""))
    return lines


def precision_verdicts(configs: list[dict], targets: dict | None = None) -> list[str]:
    """Low-precision configurations: one line per graphed row, its speedup over diffusers (float32) and its
    ratio to the floor in its own precision. ``targets``: ``{config name: {"speedup": x, "floor_ratio": y}}``
    for the graphed fast-noise row (bench/graph_bench.py passes issue 12's); a configuration not named
    there gets the floor target ``FLOOR_TARGET`` only. The other graphed rows are for information."""
    lines = []
    for c in configs:
        p = c.get("precision")
        if not p:
            continue
        named = (targets or {}).get(c["name"])
        target = named if named is not None else {"floor_ratio": FLOOR_TARGET}
        floor = c.get("floor") or {}
        floor_name = f"the floor ({floor.get('label') or p['label']}" + (
            ", EAGER" if floor.get("floor_kind") not in (None, "graphed") else "") + ")"
        graphed = [r for r in c.get("rows", []) if r["kind"] == "graphed"]
        if not graphed:
            lines.append(f"- {c['name']}: no graphed rows measured" + (f" ({c['status']})" if c.get("status") != "ok"
                                                                       else ""))
        for r in graphed:
            aimed = r["noise"] == "fast"
            if r["status"] != "ok":
                lines.append(f"- {c['name']}, {r['row']}: {r['status']} ({r['why']})"
                             + ("; targets NOT met (not measured)" if aimed and named else ""))
                continue
            parts = []
            want = target.get("speedup") if aimed else None
            if r.get("speedup"):
                parts.append(f"{r['speedup']:.2f}x diffusers (fp32)"
                             + (f" (target >= {want:g}x: {'met' if r['speedup'] >= want else 'NOT met'})" if want else ""))
            else:
                parts.append("speedup n/a (no diffusers row)" + (f" (target >= {want:g}x: NOT met)" if want else ""))
            want = target.get("floor_ratio") if aimed else None
            if r.get("floor_ratio"):
                if want:
                    verdict = f" (target <= {want:g}: {'met' if r['floor_ratio'] <= want else 'NOT met'})"
                elif aimed and named is not None:
                    verdict = " (no floor target for this configuration)"
                else:
                    verdict = ""
                parts.append(f"{r['floor_ratio']:.3f} x {floor_name}{verdict}")
            parts.append(f"first image {r['first_call_s']:.2f} s")
            if r.get("rel_rms_reference"):
                rel = r["rel_rms_reference"]
                parts.append(f"rel. RMS vs diffusers' fp32 {rel['of']} {_fmt_rel(rel['value'])}")
            if r.get("equal_eager") is not None:
                parts.append(f"graphed = eager: {_fmt_eq(r['equal_eager'])}")
            lines.append(f"- {c['name']}, {r['row']}: " + "; ".join(parts) + ("" if aimed else " (for information)"))
    return lines


def _precision_paragraph(configs: list[dict]) -> str:
    """What low-precision rows are, for the top of the report."""
    ps = {c["precision"]["label"]: c["precision"] for c in configs if c.get("precision")}
    names = " / ".join(sorted(ps))
    examples = " / ".join(f"\"{row_label('graphed', 'fast', k).split(', ', 2)[-1]}\"" for k in sorted(ps))
    copied = any(p.get("converted_copy") for p in ps.values())
    floors = sorted({(c.get("floor") or {}).get("label") for c in configs if c.get("precision")} - {None})
    return (f"**Low precision ({names}):** kve_fast's rows (labelled {examples}) run "
            + ("a copy of the UNet converted to that dtype, natively" if copied else "the float32 UNet with TF32 on")
            + " (the sampler's state stays float32); diffusers' row runs the float32 UNet with TF32 off (it cannot "
            "run a half-precision UNet). The floor is 2N - 1 forwards in the same precision as kve_fast's rows"
            + (f" ({'; '.join(floors)})" if floors else "")
            + ("; \"FIR on Triton\": the NCSN++ FIR blocks run on the Triton kernel the sampler's fast modes use"
               if any("FIR on Triton" in f for f in floors) else "")
            + ". Bits cannot match diffusers: \"= diffusers\" gives, for exact-noise rows (the same noise stream), the relative "
            "RMS difference ||a - b|| / ||b|| of the final latent from diffusers' float32 one; \"= eager\" is still "
            "bit equality (same kernels, same precision).")


def format_markdown(result: dict, title: str = "kve_fast benchmark") -> str:
    env = result.get("env", {})
    head = (f"## {title}\n\n{env.get('gpu') or env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"diffusers {env.get('diffusers')}, Python {env.get('python')}, {env.get('date')}; TF32 "
            f"{'on' if env.get('tf32_matmul') or env.get('tf32_cudnn') else 'off'}; kve_fast {env.get('git') or ''}\n"
            f"Command: `{env.get('command')}`\n")
    configs = result.get("configs", [])
    low = sorted({c["precision"]["label"] for c in configs if c.get("precision")})
    if low:
        head += "\n" + _precision_paragraph(configs) + "\n"
    parts = [head, "### Floors\n", floors_table(configs), "", "### Per call\n", _md_table(COLUMNS, table_rows(configs))]
    v = verdicts(configs)
    if v:
        parts += ["", "### Targets (graphed, exact noise)\n", "\n".join(v)]
    pv = precision_verdicts(configs, result.get("targets"))
    if pv:
        source = result.get("targets_source")
        if source and result.get("targets"):
            source += " for " + ", ".join(result["targets"])
        parts += ["", f"### Targets ({' / '.join(low)}, graphed, fast noise{'; ' + source if source else ''})\n",
                  "\n".join(pv)]
    notes = list(result.get("notes", []))
    for c in configs:
        notes += [f"{c['name']}: {n}" for n in c.get("notes", [])]
    notes.append("ms/call: median of n timed calls after a first call (the first image column), "
                 "torch.cuda.synchronize before and after each call, host clock; / floor: ms/call over "
                 "(2N - 1) x one model forward replayed from a CUDA graph (CUDA events), measured in the same run; "
                 "first image: the first call of the row in this configuration (graphed rows: clear_graphs() first, "
                 "so the capture is included), after the floor measurement and the kernel warm-up")
    parts += ["", "Notes:", "\n".join(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def write_chart(result: dict, path: str) -> str | None:
    """A PNG of the speedup over diffusers and the ratio to the floor per row; None (and why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as exc:
        return f"no chart: matplotlib does not import ({_first_line(exc)})"
    configs = [c for c in result.get("configs", []) if any(r["status"] == "ok" for r in c.get("rows", []))]
    if not configs:
        return "no chart: no measured rows"
    keys = list(ROW_LABELS)
    labels = []
    for key in keys:  # the rows' own labels (low-precision rows say their precision)
        found = next((r["row"] for c in configs for r in c["rows"] if (r["kind"], r["noise"]) == key), None)
        labels.append(found or ROW_LABELS[key])
    low = sorted({c["precision"]["label"] for c in configs if c.get("precision")})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(configs)) * 1.6, 4.8))
    width = 0.8 / len(labels)
    for ax, field, title in ((axes[0], "speedup", "speedup over diffusers (higher is better)"),
                             (axes[1], "floor_ratio", "time / floor (99 graphed forwards"
                              + (f", {' / '.join(low)}" if low else "") + "; 1 is ideal)")):
        for j, (key, label) in enumerate(zip(keys, labels)):
            xs, ys = [], []
            for i, c in enumerate(configs):
                r = next((r for r in c["rows"] if (r["kind"], r["noise"]) == key and r["status"] == "ok"), None)
                if r is not None and r.get(field):
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    ys.append(r[field])
            if xs:
                ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([c["name"] for c in configs], rotation=20, ha="right")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        if field == "floor_ratio":
            ax.axhline(FLOOR_TARGET, color="k", linestyle="--", linewidth=1, label=f"target {FLOOR_TARGET}")
        else:
            ax.axhline(1.0, color="k", linewidth=0.8)
    axes[1].legend(fontsize=8)
    env = result.get("env", {})
    fig.suptitle(f"kve_fast, {env.get('gpu') or env.get('device')}, torch {env.get('torch')}, {env.get('date')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_outputs(result: dict, out_dir: str, stem: str, chart: bool = True, title: str = "kve_fast benchmark") -> dict:
    """``<stem>.json``, ``<stem>.md`` and (matplotlib permitting) ``<stem>.png`` in ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    _atomic_write(paths["json"], json.dumps(_jsonable(result), indent=1))
    _atomic_write(paths["md"], format_markdown(result, title))
    if chart:
        png = os.path.join(out_dir, stem + ".png")
        why = write_chart(result, png)
        if why is None:
            paths["png"] = png
        else:
            paths["chart_note"] = why
    return paths


def exactness_failures(configs: list[dict]) -> list[str]:
    """Every exactness check that failed (exact rows against diffusers, graphed against eager, repeats)."""
    bad = []
    for c in configs:
        for r in c.get("rows", []):
            for key in ("equal_reference_latent", "equal_reference_np", "equal_eager"):
                if r.get(key) is not None and not r[key]["equal"]:
                    bad.append(f"{c['name']} / {r['row']}: {key}")
            if r.get("repeat_consistent") is False:
                bad.append(f"{c['name']} / {r['row']}: repeated calls differ")
        f = c.get("floor") or {}
        if f.get("graph_equals_eager") is False:
            bad.append(f"{c['name']}: the floor's graphed forward differs from the eager forward")
    return bad


# ---- the command ----------------------------------------------------------------------------------------------

# The argument types of ``kve-fast sample`` (kve_fast/cli.py, import-light as this module is).
def _types():
    from .cli import _at_least, _device_name

    return _at_least(int, 1), _at_least(int, 2), _device_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kve-fast bench`` (no torch needed to parse them)."""
    _positive_int, _steps, _device_name = _types()
    parser.add_argument("--model", default="digits", help="bundled model name ('digits') or a local diffusers folder")
    parser.add_argument("--batch-size", type=_positive_int, nargs="+", default=[1], metavar="N",
                        help="batch size(s): one table section each")
    parser.add_argument("--steps", type=_steps, default=50, help="sampling steps N (Heun: 2N - 1 model calls)")
    parser.add_argument("--device", type=_device_name, default="auto", help="'auto' (CUDA when available), 'cpu', "
                        "'cuda' or 'cuda:N'")
    parser.add_argument("--noise", choices=NOISE_MODES, nargs="+", default=list(NOISE_MODES),
                        help="noise modes to time: exact (the reference's stream) and/or fast (on the device)")
    parser.add_argument("--backends", choices=KINDS, nargs="+", default=list(KINDS),
                        help="kve_fast runners to time: eager and/or graphed (CUDA graphs; CUDA only)")
    parser.add_argument("--step-backend", choices=BACKENDS, default="auto", help="kve_fast's step kernels")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip diffusers' pipeline (it only runs 3-channel models)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed calls per row after the first (default: as many as fit in 5 s, 1 to 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU generator")
    parser.add_argument("--output-type", choices=("latent", "np"), default="latent",
                        help="what kve_fast's rows return (diffusers' always returns np)")
    parser.add_argument("--unet-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="the dtype kve_fast's rows run the model in (a converted copy; the sampler's state stays "
                             "float32; diffusers' row runs fp32): bf16/fp16 are fast modes, compared with diffusers "
                             "by relative RMS, and the floor is measured in the same dtype")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls and convolutions in kve_fast's rows and the floor (CUDA; not bit-exact)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the report as markdown")


def _check_out_file(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"{option}: {path!r} is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise BenchError(f"{option}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise BenchError(f"{option}: cannot write to the folder {folder!r}")


def _resolve_device(name: str):
    """--device as ``kve-fast sample`` resolves it (its errors as this command's)."""
    from .cli import CliError, _device

    try:
        return _device(name)
    except CliError as exc:
        raise BenchError(str(exc)) from None


def run(args) -> int:
    """``kve-fast bench``: returns 0, 1 when an exactness check failed, 2 for a user error (printed)."""
    try:
        return _run(args)
    except BenchError as exc:
        print(f"kve-fast: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # Everything cheap first: the output files and the model folder's JSON.
    _check_out_file(args.json, "--json")
    _check_out_file(args.markdown, "--markdown")
    from .loading import check_model_folder

    try:
        folder = check_model_folder(args.model)
    except (ValueError, TypeError) as exc:
        raise BenchError(f"--model: {exc}".replace("`name_or_path`: ", "")) from None

    import torch

    device = _resolve_device(args.device)

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    from .cli import CliError, _load

    try:
        pipe = _load(args, device)  # as kve-fast sample loads it (diffusers' own warnings muted)
    except CliError as exc:
        raise BenchError(str(exc)) from None
    pipe.set_progress_bar_config(disable=True)
    from .precision import parse_dtype

    unet_dtype = parse_dtype(getattr(args, "unet_dtype", "fp32"))
    unet_dtype = None if unet_dtype == torch.float32 else unet_dtype
    use_tf32 = bool(getattr(args, "tf32", False))

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        result = {"env": environment(device),
                  "settings": {"model": args.model, "model_path": folder.path, "steps": args.steps,
                               "batch_sizes": args.batch_size, "noise": args.noise, "backends": args.backends,
                               "step_backend": args.step_backend, "reference": args.reference,
                               "output_type": args.output_type, "seed": args.seed},
                  "configs": [], "notes": []}
        if precision_label(unet_dtype, use_tf32) is not None:
            result["settings"].update(unet_dtype=args.unet_dtype, tf32=use_tf32)
        policy = RepeatPolicy(fixed=args.repeats)
        ok, why = graph_support(pipe, device)
        if not ok and "graphed" in args.backends:
            result["notes"].append(why)
        warm = jit_warmup(device, args.step_backend, log, unet_dtype=unet_dtype, tf32=use_tf32)
        if warm is not None:
            result["notes"].append(f"kernel warm-up (Triton JIT, before any timing): {warm:.1f} s")
        for batch in args.batch_size:
            result["configs"].append(bench_pipeline(
                pipe, name=f"{os.path.basename(os.path.normpath(args.model))} b{batch}", batch_size=batch,
                steps=args.steps, device=device, seed=args.seed, noises=args.noise, kinds=args.backends,
                reference=args.reference, step_backend=args.step_backend, output_type=args.output_type,
                policy=policy, log=log, model_label=args.model, unet_dtype=unet_dtype, tf32=use_tf32))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    label = precision_label(unet_dtype, use_tf32)
    text = format_markdown(result, f"kve-fast bench: {args.model}" + (f" ({label})" if label else ""))
    if args.json:
        _atomic_write(args.json, json.dumps(_jsonable(result), indent=1))
    if args.markdown:
        _atomic_write(args.markdown, text)
    print(text, end="")
    bad = exactness_failures(result["configs"])
    if bad:
        print(f"kve-fast: exactness checks FAILED: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0
