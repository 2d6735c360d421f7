"""CUDA graphs around a whole step: both model calls and the fused kernels, replayed for every step.

At small batches a UNet forward is launch-bound (the reference's tiny test UNet: 6.4 ms eagerly, 1.4 ms
replayed from a graph, on an H200). The graph runner captures one step of Algorithm 2 per (model,
shape, layout, device, noise mode, solver, callback or not, output, precision) and replays it for every
step of every later call with those keys:

- Per-step values live in device memory the graph reads: the kernels' scalars (``sigma_hat / 2``,
  ``sigma_hat``, its float32 reciprocal, ``dt``, the churn coefficients, ``S_noise``) in one small
  float32 buffer, and the model's noise-level input as a 0-d view of that buffer (holding the value
  the reference computes, so the model's output is unchanged). One capture serves all steps and all
  step counts. Before each replay the host writes the step's values into pinned memory and copies
  them over without blocking.
- Exact noise: the host draws the reference's stream ahead (``kve_fast.noise.ReferenceNoise``) and
  each step's draw is copied into a static device buffer before the replay. Fast noise: the kernels
  read each sample's Philox key from a static device buffer that receives the step's keys.
- Warm-up and capture run on a side stream, with every RNG state saved and restored around them: they
  never consume the user's randomness. One memory pool per device; at most ``MAX_CAPTURES`` captures
  are kept (least recently used dropped first); ``clear_graphs()`` (and ``KarrasVePipeline.to``) frees
  them. What a run hands out (the final sample or image, a callback's tensors) is a copy, never graph
  memory; a sample a callback returns is copied into the static input buffer.
- diffusers' NCSN++ Skip blocks build their FIR filters on the host inside forward, which forbids
  capture: ``kve_fast.ncsnpp.make_capturable`` fixes that per model instance, bit for bit.
- k-diffusion's convention (``kve_fast.k_diffusion``): the denoiser's ``sigma * s_in`` is a per-sample
  buffer filled inside the graph from the scalar buffer; ``torch.randn_like`` draws each step's noise
  outside the graph (the global RNG moves as k-diffusion moves it) into the static noise buffer; steps
  where gamma = 0 replay graphs without a churn; ``extra_args``' tensors are copied into static ones
  each call (their other values are part of the key). Off by default there (``KDIFFUSION_DEFAULT_MODE``)
  until a GPU run confirms the bits.

``cuda_graph="auto"`` captures where it can and otherwise runs eagerly with the same bits, after one
warning naming the reason; ``True`` raises that reason instead; ``False`` (or the environment
variable ``KVE_FAST_CUDA_GRAPH=0``) never captures. The default (``cuda_graph=None``) is
``DEFAULT_MODE``, "auto": the graphed output was confirmed bit for bit against eager runs and diffusers'
pipeline on an H100 (bench/RESULTS.md, 2026-11-26).
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from .engine import StepEngine

ENV_VAR = "KVE_FAST_CUDA_GRAPH"
MODES = ("auto", True, False)
DEFAULT_MODE = "auto"  # what cuda_graph=None means (see the module docstring)
# ... in kve_fast.k_diffusion: off until a GPU run confirms that convention's graphed output bit for bit
KDIFFUSION_DEFAULT_MODE = False
MAX_CAPTURES = 4
# Scalar slots: [churn c, S_noise | sigma_hat/2, sigma_hat, 1/sigma_hat, dt | sigma_{i+1}/2, sigma_{i+1},
#                1/sigma_{i+1}, dt | next churn c, S_noise]
_CHURN, _EULER, _HEUN, _NEXT = slice(0, 2), slice(2, 6), slice(6, 10), slice(10, 12)
_SLOTS = 12
_RING = 4

_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()
_POOLS: dict = {}
_warned: set = set()
# Tests only: run the graph path on the CPU with an eager stand-in for torch.cuda.CUDAGraph.
_FAKE_GRAPHS = False


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def check_cuda_graph(value):
    """``cuda_graph`` must be ``"auto"``, True, False or None (``DEFAULT_MODE``); returns the mode."""
    if value is None:
        return DEFAULT_MODE
    if not (value is True or value is False or (isinstance(value, str) and value == "auto")):
        raise ValueError(f"`cuda_graph` must be 'auto', True, False or None (the default), got {value!r}")
    return value


def _env_off() -> bool:
    value = os.environ.get(ENV_VAR)
    return value is not None and value.strip().lower() in ("0", "false", "off", "no")


def decide(cuda_graph, device: torch.device, backend, noise: str) -> bool:
    """Whether this run is graphed. ``True`` with a reason it cannot be raises a ValueError naming it;
    ``"auto"`` warns once (on CUDA) and runs eagerly, with the same bits."""
    cuda_graph = check_cuda_graph(cuda_graph)
    if cuda_graph is False or _env_off():
        return False
    on_device = device.type == "cuda" or _FAKE_GRAPHS
    if not on_device:
        reason = f"the device is {device}, not CUDA"
    elif getattr(backend, "name", None) not in ("triton", "cuda"):
        reason = "graphs run the fused kernels: use backend='triton' or 'cuda' (or 'auto' with Triton installed)"
    else:
        return True
    if cuda_graph is True:
        raise ValueError(f"`cuda_graph`=True but {reason}")
    if device.type == "cuda":
        _warn_once(("decide", reason), f"kve_fast: not using CUDA graphs ({reason}); running eagerly, same results")
    return False


def extra_signature(extra: dict) -> tuple | None:
    """What of k-diffusion's ``extra_args`` a capture depends on (tensors' shapes, dtypes, devices and
    strides; other values themselves), or None if they cannot be captured (a value that is neither a
    tensor nor a plain scalar or string: a list of tensors, say)."""
    items = []
    for key in sorted(extra):
        value = extra[key]
        if isinstance(value, torch.Tensor):
            items.append((key, "tensor", tuple(value.shape), str(value.dtype), str(value.device), value.stride()))
        elif value is None or isinstance(value, (bool, int, float, str)):
            items.append((key, type(value).__name__, repr(value)))
        else:
            return None
    return tuple(items)


# What a capture's key holds (``capture_for``), after the model's id; the precision or k-diffusion variant follows
KEY_FIELDS = ("backend", "shape", "strides", "device", "noise", "solver", "hand_out", "image")


def graph_info() -> dict:
    """``{"captures": n, "keys": [...], "entries": [...]}``: the captures held now; ``entries`` names each key's
    fields (``KEY_FIELDS`` and ``variant``)."""
    with _LOCK:
        keys = [k[1:] for k in _CACHE]
    n = len(KEY_FIELDS)
    entries = [dict(zip(KEY_FIELDS, k[:n]), variant=tuple(k[n:])) for k in keys]
    return {"captures": len(keys), "keys": keys, "entries": entries}


def clear_graphs(model=None) -> None:
    """Free every capture (or only ``model``'s) and the memory pools they used."""
    with _LOCK:
        for key in [k for k in _CACHE if model is None or k[0] == id(model)]:
            _CACHE.pop(key)
        if model is None:
            _POOLS.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class _EagerGraph:
    """A stand-in for ``torch.cuda.CUDAGraph`` (tests on the CPU): replay calls the captured function
    again and writes its results into the tensors the capture returned, as a replay writes into the
    captured graph's memory."""

    def __init__(self):
        self._fn = self._out = None

    def capture(self, fn):
        self._fn = fn
        self._out = fn()
        return self._out

    def replay(self):
        for static, new in zip(self._out, self._fn()):
            if static is not None:
                static.copy_(new)


def _capture(fn, device: torch.device):
    """Warm ``fn`` up on a side stream and capture it; every RNG state is saved and put back."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        if _FAKE_GRAPHS or device.type != "cuda":
            graph = _EagerGraph()
            fn()  # warm-up, as on CUDA
            return graph, graph.capture(fn)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = _POOLS.get(device)
        if pool is None:
            pool = _POOLS[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn()
        return graph, outputs
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


class _Capture:
    """One capture: the backend whose buffers the graphs use, the static scalar and noise buffers, graphs."""

    def __init__(self, model, backend, shape, device, solver, hand_out, image, call_model, noise: str = "exact"):
        self.model_ref = weakref.ref(model) if _weakrefable(model) else (lambda m=model: m)
        self.backend, self.shape, self.device = backend, tuple(shape), device
        self.heun_solver, self.hand_out, self.image_kind = solver == "heun", hand_out, image
        self.call_model = call_model
        pin = device.type == "cuda"
        self.scalars = torch.zeros(_SLOTS, dtype=torch.float32, device=device)
        # pinned staging rows, used in turn: writing a step's scalars waits only for the copy _RING steps back
        self.host = torch.zeros(_RING, _SLOTS, dtype=torch.float32, pin_memory=pin)
        self._events: list = [None] * _RING
        self._row = 0
        self.fast = noise == "fast"
        # k-diffusion's convention: a denoiser called at x_hat with sigma * s_in (a per-sample tensor),
        # true division, no churn where gamma = 0; ``extra`` holds static copies of its extra_args' tensors
        self.denoiser = getattr(backend, "denoiser", False)
        self.levels = torch.zeros(2, shape[0], dtype=torch.float32, device=device) if self.denoiser else None
        self.extra: dict | None = None
        self.eps = None if self.fast else self._zeros()
        # fast noise: one Philox key per sample (kve_fast.noise.StepKeys), read by the kernels
        self.keys = torch.zeros(shape[0], dtype=torch.int64, device=device) if self.fast else None
        self.sample_in = self._zeros() if hand_out else None
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.busy = threading.Lock()
        buffers = backend._buf(torch.empty(shape, dtype=torch.float32, device=device))
        for b in buffers:
            b.zero_()
        self.buffers = buffers

    def _zeros(self) -> torch.Tensor:
        """A static buffer in the state's layout (the kernels index every tensor they touch linearly)."""
        layout = getattr(self.backend, "_layout", None)
        if layout is not None:
            return torch.zeros_like(layout, dtype=torch.float32)
        return torch.zeros(self.shape, dtype=torch.float32, device=self.device)

    # -- what a graph reads -------------------------------------------------------------------------

    def load(self, step, nxt, s_noise: float) -> None:
        """Write ``step``'s scalars (and the next step's churn) into the buffer the graphs read."""
        row = self._row
        if self._events[row] is not None:
            self._events[row].synchronize()  # that row's copy, _RING steps back, has long been read
        h = self.host[row]
        be = self.backend
        h[0], h[1] = (step.churn or 0.0), s_noise  # k-diffusion's gamma = 0 steps: no churn (a graph without it)
        h[2:6] = torch.tensor(be._euler_scalars(step), dtype=torch.float32)
        if self.denoiser:
            if not step.last:
                h[6:10] = torch.tensor(be._heun_scalars(step), dtype=torch.float32)
        elif step.heun is not None:
            h[6:10] = torch.tensor(step.heun, dtype=torch.float32)
        h[10], h[11] = ((nxt.churn or 0.0) if nxt is not None else 0.0), s_noise
        self.scalars.copy_(h, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[row] = event
        self._row = (row + 1) % _RING

    def set_noise(self, noise) -> None:
        """The next churn's noise into the static buffer the graph reads: a draw (exact) or the keys (fast)."""
        if self.fast:
            self.keys.copy_(noise.device, non_blocking=True)
        else:
            self.eps.copy_(noise, non_blocking=True)

    def noise_args(self):
        """``(eps, seed)`` as the launchers take them, pointing at the static buffers. Fast noise in a
        non-contiguous layout (channels_last): drawn here, inside the graph, as the eager path draws it
        (contiguous from the keys, then copied into the layout), so both give the same values."""
        if not self.fast:
            return self.eps, None
        layout = getattr(self.backend, "_layout", None)
        if layout is None or layout.is_contiguous():
            return None, self.keys
        if self.eps is None:
            self.eps = self._zeros()
            self._zero = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        drawn = self.backend.launch._launch_churn(self._zero, None, self.keys, 1.0, 1.0, store_xin=False)[0]
        self.eps.copy_(drawn)  # 0 + 1 * (1 * z) = z, as FusedStep._noise
        return self.eps, None

    def half_sigma(self, which: str) -> torch.Tensor:
        """The model's noise-level input: a 0-d view of the scalar buffer (sigma_hat / 2 or sigma_{i+1} / 2);
        for a denoiser, ``sigma * s_in``: the per-sample buffer, filled inside the graph from the scalar
        buffer (sigma_hat or sigma_{i+1}, the values k-diffusion's ``sigma * s_in`` holds)."""
        if not self.denoiser:
            return self.scalars[2] if which == "hat" else self.scalars[6]
        row, slot = (0, 3) if which == "hat" else (1, 7)
        level = self.levels[row]
        level.copy_(self.scalars[slot].expand_as(level))
        return level

    def set_extra(self, extra: dict) -> None:
        """k-diffusion's ``extra_args``: its tensors into static copies the graphs' model calls read (the
        other values are part of the capture's key)."""
        if self.extra is None:
            self.extra = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        else:
            for k, v in extra.items():
                if isinstance(v, torch.Tensor):
                    self.extra[k].copy_(v)

    def _model(self, x, which: str):
        if self.denoiser:
            return self.call_model(x, self.half_sigma(which), extra=self.extra)
        return self.call_model(x, self.half_sigma(which))

    # -- the captured functions ---------------------------------------------------------------------

    def _fused_step(self, correct: bool, last: bool, apply_next: bool = True):
        """No callback: x_hat and the model input arrive in buffers 0 and 1 (written by the previous
        replay's fused churn, or by the first step's eager churn). ``apply_next``: the next step churns
        (False only for k-diffusion's gamma = 0 steps)."""
        if self.denoiser:
            return self._denoiser_fused_step(correct, last, apply_next)
        b, s, be = self.buffers, self.scalars, self.backend
        _launch_churn, _launch_euler, _launch_heun = be.launch._launch_churn, be.launch._launch_euler, \
            be.launch._launch_heun
        image = self.image_kind if last and be.fuses_image else None  # else the engine converts the sample

        def fn():
            raw = self.call_model(b[1], self.half_sigma("hat"))
            if last:
                prev, _, _, _, img = _launch_euler(be._raw(raw), b[0], s[_EULER], False, False, False, image,
                                                   out=None)
                return prev, img
            if not correct:  # Euler solver: x_{i+1} into buffer 2, then the next step's churn into 0 and 1
                _launch_euler(be._raw(raw), b[0], s[_EULER], False, False, False, None, out=(b[2], b[3], b[4]))
                _launch_churn(b[2], *self.noise_args(), s[_NEXT], s[_NEXT], out=(b[0], b[1]))
                return ()
            _launch_euler(be._raw(raw), b[0], s[_EULER], True, True, False, None, out=(b[2], b[3], b[4]))
            raw2 = self.call_model(b[4], self.half_sigma("next"))
            _launch_heun(be._raw(raw2), b[0], b[2], b[3], s[_HEUN], False, False,
                         (*self.noise_args(), s[_NEXT], s[_NEXT]), out=(b[0], b[1]))
            return ()

        return fn

    def _denoiser_fused_step(self, correct: bool, last: bool, apply_next: bool):
        """k-diffusion's convention without a callback: x_hat (also the model's input) in buffer 0."""
        b, s, be = self.buffers, self.scalars, self.backend
        launch = be.launch

        def fn():
            raw = self._model(b[0], "hat")
            if last:
                return (launch._launch_euler(be._raw(raw), b[0], s[_EULER], False, False, False, None, out=None,
                                             denoiser=True)[0],)
            if not correct:  # Euler solver: x_{i+1} into buffer 2, then the next x_hat into buffer 0
                launch._launch_euler(be._raw(raw), b[0], s[_EULER], False, False, False, None,
                                     out=(b[2], b[3], b[4]), denoiser=True)
                if apply_next:
                    launch._launch_churn(b[2], *self.noise_args(), s[_NEXT], s[_NEXT], out=(b[0], None),
                                         store_xin=False)
                else:
                    b[0].copy_(b[2])
                return ()
            launch._launch_euler(be._raw(raw), b[0], s[_EULER], False, True, False, None, out=(b[2], b[3], b[4]),
                                 denoiser=True)
            raw2 = self._model(b[2], "next")
            nxt = (*self.noise_args(), s[_NEXT], s[_NEXT]) if apply_next else (None, None, s[_NEXT], None)
            launch._launch_heun(be._raw(raw2), b[0], b[2], b[3], s[_HEUN], False, False, nxt, out=(b[0], None),
                                denoiser=True)
            return ()

        return fn

    def _denoiser_handout_step(self, correct: bool, apply: bool):
        """k-diffusion's convention with a callback: the sample in through ``sample_in``; x, x_hat and the
        first model call's D go out (k-diffusion's callback sees x_hat and D; the engine calls it after
        the replay, with copies)."""
        b, s, be = self.buffers, self.scalars, self.backend
        launch = be.launch

        def fn():
            if apply:
                launch._launch_churn(self.sample_in, *self.noise_args(), s[_CHURN], s[_CHURN], out=(b[0], None),
                                     store_xin=False)
            else:
                b[0].copy_(self.sample_in)
            raw = be._raw(self._model(b[0], "hat"))
            if not correct:
                prev = launch._launch_euler(raw, b[0], s[_EULER], False, False, False, None, denoiser=True)[0]
                return prev, raw, b[0]
            launch._launch_euler(raw, b[0], s[_EULER], False, True, False, None, out=(b[2], b[3], b[4]),
                                 denoiser=True)
            raw2 = self._model(b[2], "next")
            x = launch._launch_heun(be._raw(raw2), b[0], b[2], b[3], s[_HEUN], True, False, None, denoiser=True)[0]
            return x, raw, b[0]

        return fn

    def _handout_step(self, correct: bool, apply: bool = True):
        """With a callback: the sample comes in through ``sample_in``; x and D go out as graph memory
        that the engine copies."""
        if self.denoiser:
            return self._denoiser_handout_step(correct, apply)
        b, s, be = self.buffers, self.scalars, self.backend
        _launch_churn, _launch_euler, _launch_heun = be.launch._launch_churn, be.launch._launch_euler, \
            be.launch._launch_heun

        def fn():
            _launch_churn(self.sample_in, *self.noise_args(), s[_CHURN], s[_CHURN], out=(b[0], b[1]))
            raw = self.call_model(b[1], self.half_sigma("hat"))
            if not correct:
                prev, _, _, pred, _ = _launch_euler(be._raw(raw), b[0], s[_EULER], False, False, True, None)
                return prev, pred
            _launch_euler(be._raw(raw), b[0], s[_EULER], True, True, False, None, out=(b[2], b[3], b[4]))
            raw2 = self.call_model(b[4], self.half_sigma("next"))
            x, pred, _, _ = _launch_heun(be._raw(raw2), b[0], b[2], b[3], s[_HEUN], True, True, None)
            return x, pred

        return fn

    def graph(self, kind: tuple):
        """The graph for ``kind`` = (correct, last, apply), captured at first use (before any real state is
        in the buffers: the caller captures every kind a run needs before its first step). ``apply``: the
        churn this graph runs (the step's own with a callback, else the next step's) adds noise; always
        True in the reference's convention, False for k-diffusion's gamma = 0 steps."""
        g = self.graphs.get(kind)
        if g is None:
            correct, last, apply = kind
            fn = self._handout_step(correct, apply) if self.hand_out else self._fused_step(correct, last, apply)
            g, out = _capture(fn, self.device)
            self.graphs[kind], self.outputs[kind] = g, out
        return g


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _kind(plan, i: int, heun: bool, hand_out: bool, denoiser: bool) -> tuple:
    """The (correct, last, apply) kind of graph step ``i`` of ``plan`` replays (see ``_Capture.graph``)."""
    last = i == len(plan) - 1
    apply = True
    if denoiser:  # k-diffusion churns only where gamma > 0
        apply = plan[i].churn is not None if hand_out else (last or plan[i + 1].churn is not None)
    return heun and not last, last and not hand_out, apply


def _kinds(plan, heun: bool, hand_out: bool, denoiser: bool = False) -> set:
    """The kinds of graph a run of ``plan`` replays (every step's, for k-diffusion's convention, whose
    gamma changes along the run; the reference's steps differ only at the end)."""
    n = len(plan)
    steps = range(n) if denoiser or n <= 2 else (0, n - 2, n - 1)
    return {_kind(plan, i, heun, hand_out, denoiser) for i in steps}


def capture_for(model, backend, shape, device, noise: str, solver: str, hand_out: bool, image, call_model,
                variant: tuple = ()):
    """The cached capture for these keys (a new one if there is none), or None if it is busy in another
    thread (that run then goes eagerly). ``variant``: more of what the captured kernels depend on (the
    precision: the UNet's dtype, autocast, TF32)."""
    layout = getattr(backend, "_layout", None)  # k-diffusion keeps x's layout: the graphs index buffers linearly
    strides = None if layout is None else tuple(layout.stride())
    key = (id(model), backend.name, tuple(shape), strides, str(device), noise, solver, hand_out, image) + tuple(variant)
    with _LOCK:
        cap = _CACHE.get(key)
        if cap is not None and cap.model_ref() is not model:
            _CACHE.pop(key)
            cap = None
        if cap is not None:
            _CACHE.move_to_end(key)
    if cap is None:
        cap = _Capture(model, backend, shape, device, solver, hand_out, image, call_model, noise)
        cap.key = key
    else:
        cap.call_model = call_model
    return cap if cap.busy.acquire(blocking=False) else None


def release(cap: _Capture) -> None:
    """Release ``cap`` after a failed run without caching it (a cached one stays cached)."""
    cap.busy.release()


def keep(cap: _Capture) -> None:
    """Cache ``cap`` after a completed run (least recently used dropped beyond ``MAX_CAPTURES``) and release it."""
    with _LOCK:
        _CACHE[cap.key] = cap
        _CACHE.move_to_end(cap.key)
        while len(_CACHE) > MAX_CAPTURES:
            _CACHE.popitem(last=False)
    cap.busy.release()


def graphed_engine(cuda_graph, model, backend, source, plan, shape, device, noise, solver, hand_out, image,
                   s_noise, call_model, noise_level, variant: tuple = (), extra: dict | None = None):
    """A ``GraphedEngine`` with its graphs captured, or None to run eagerly (the capture is busy in
    another thread, or the model cannot be captured: ``"auto"`` warns once, ``True`` raises).
    ``extra``: k-diffusion's ``extra_args`` (its tensors are copied into the capture's static ones; the
    caller puts ``extra_signature(extra)`` into ``variant``)."""
    from .ncsnpp import make_capturable, needs_patch

    cap = capture_for(model, backend, shape, device, noise, solver, hand_out, image, call_model, variant)
    if cap is None:
        return None
    try:
        if cap.denoiser:
            cap.set_extra(extra or {})
        if isinstance(model, torch.nn.Module) and needs_patch(model):
            make_capturable(model)  # host-built FIR filters -> device-cached, bit-identical
        engine = GraphedEngine(cap, source, plan, solver, hand_out, image, s_noise, call_model, noise_level)
        engine.prepare()
    except Exception as exc:
        release(cap)
        clear_graphs(model)
        reason = f"{type(exc).__name__}: {exc}".strip()
        if cuda_graph is True:
            raise ValueError(f"`cuda_graph`=True but the model cannot be captured in a CUDA graph ({reason})") from exc
        _warn_once(("capture", type(model)), f"kve_fast: this model cannot be captured in a CUDA graph ({reason}); "
                                            "running eagerly, same results")
        return None
    return engine


class GraphedEngine(StepEngine):
    """``StepEngine`` whose steps are replays of captured graphs (same buffers, same kernels, same bits)."""

    def __init__(self, capture: _Capture, source, plan, solver: str, hand_out: bool, image, s_noise: float,
                 call_model, noise_level):
        super().__init__(capture.backend, source, plan, solver, hand_out, image, call_model, noise_level)
        self.cap, self.s_noise = capture, s_noise

    def prepare(self) -> None:
        """Capture every graph this run replays, before any real state is in the buffers (warm-up
        computes with the first step's scalars, so it sees finite values)."""
        self.cap.load(self.plan[0], self.plan[1] if len(self.plan) > 1 else None, self.s_noise)
        for kind in sorted(_kinds(self.plan, self.heun_solver, self.hand_out, self.cap.denoiser)):
            self.cap.graph(kind)

    def step(self, step, on_denoised=None) -> None:
        cap, i = self.cap, step.index
        nxt = self.plan[i + 1] if i + 1 < len(self.plan) else None
        kind = _kind(self.plan, i, self.heun_solver, self.hand_out, cap.denoiser)
        if self.hand_out:
            cap.sample_in.copy_(self.sample)
            cap.set_noise(self.source.step())
            cap.load(step, None, self.s_noise)
            cap.graph(kind).replay()
            if cap.denoiser:  # k-diffusion's callback sees x_hat and D of the first model call
                x, denoised, x_hat = cap.outputs[kind]
                if on_denoised is not None:
                    on_denoised(step, x_hat.clone(), denoised.clone())
                self.sample, self.denoised = x.clone(), denoised.clone()
                return
            x, pred = cap.outputs[kind]
            self.sample, self.denoised = x.clone(), pred.clone()
            return
        if self._fused is None:  # the first step: its churn runs eagerly into the graphs' buffers 0 and 1
            self._first_churn(step)
        self._fused = None
        last = step.last
        if not last:
            cap.set_noise(self.source.step())  # the next step's churn noise
        cap.load(step, nxt, self.s_noise)
        cap.graph(kind).replay()
        if last:
            out = cap.outputs[kind]
            self.sample = out[0].clone()
            self.image = None if len(out) < 2 or out[1] is None else out[1].clone()
        else:
            self._fused = True

    def _first_churn(self, step) -> None:
        cap, b = self.cap, self.cap.buffers
        be = cap.backend
        eps, seed = be._noise(self.source.step())  # drawn also where k-diffusion's gamma is 0, as it does
        sample = be._like(self.sample)
        if not cap.denoiser:
            be.launch._launch_churn(sample, eps, seed, be.s_noise, step.churn, out=(b[0], b[1]))
        elif step.churn is None:
            b[0].copy_(sample)
        else:
            be.launch._launch_churn(sample, eps, seed, be.s_noise, step.churn, out=(b[0], None), store_xin=False)
