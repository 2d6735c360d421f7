"""CUDA graphs around whole steps: the stage lists of ``kve_fast.stages``, captured once, replayed every step.

At small batches a UNet forward is launch-bound (the reference's tiny test UNet: 6.4 ms eagerly, 1.4 ms
replayed from a graph, on an H200). The graph runner captures the same stage lists the eager engine runs
(``Schedule.prologue`` and ``Schedule.stages``, split at ``HandOut`` stages, where the host runs a callback)
and replays them:

- What changes from step to step or call to call lives in device memory the graphs read (``DeviceFeed``):
  the step's scalars in one small float32 tensor of named slots (the churn's ``[c, S_noise]``, this
  step's and the next step's, and the ``Level`` at sigma_hat and at sigma_{i+1}), the noise (a draw of the
  reference's stream, or per-sample fast-noise keys) in a static buffer, and the model's noise-level
  argument made inside the graph from those slots. The host writes them before each replay (pinned
  staging, no blocking copy). One capture serves every step, every step count and every value of the
  ``FED`` settings (``kve_fast.spec``: S_noise).
- A capture is keyed by everything else (``CaptureKey``: the model, every setting of the run's
  ``RunSpec`` that is not fed, and the global switches that pick kernels) and checked per call against
  what it baked in of the model (``kve_fast.fingerprint.ModelState``: parameters' and buffers' storages,
  shapes, strides, dtypes and devices, training flags, hooks, the modules' attributes and classes).
  Anything that changed gives a new capture, and the old one is freed.
- A callback runs between replays and may do what it does in an eager call: an in-place edit of the state
  it was handed counts (``GraphEngine``), and a change to the model or the global switches, checked after
  each callback, makes the rest of the call run eagerly (same bits) and the next call capture anew.
- A model compiled with ``torch.compile`` compiles in the first warm-up, outside the capture and outside any
  dispatch mode (``_capture``); the CPU stand-in cannot record compiled code and refuses it.
- Captures are serialized (one at a time per process, ``capture_error_mode="thread_local"``, so other
  threads' CUDA work goes on); each capture has its own memory pool, so replays of different captures
  never share intermediates; warm-up and capture never touch an RNG (a model that draws random numbers
  in its forward is refused before it draws). A capture is used by one run at a time: with
  ``cuda_graph=True`` another thread's run waits for it, with ``"auto"`` it runs eagerly (same bits; one
  warning). ``clear_graphs()`` (also ``KarrasVePipeline.to``) frees captures and their pools, also while
  a run uses one (freed when it ends); at most ``MAX_CAPTURES`` are kept (least recently used dropped);
  a capture never keeps its model alive: when the model is garbage-collected, its captures go too.
- What a run hands out (the output, a callback's tensors) is a copy, never graph memory; a sample a
  callback returns is copied into the graph's input buffer. Model inputs are graph memory: a model
  (or a hook) that keeps a reference to its input sees it overwritten at the next replay.
- The model gets its noise-level argument as a device tensor (a 0-d view, or k-diffusion's per-sample
  ``sigma * s_in``), where an eager run of the reference's convention passes a 0-d CPU tensor: for
  diffusers' UNets the same values (they move it to the device first); a model doing its own arithmetic
  with it could round differently on CUDA (torch divides by a CPU scalar through its reciprocal): use
  ``cuda_graph=False`` for such a model.
- diffusers' NCSN++ Skip blocks build their FIR filters on the host inside forward, which forbids
  capture: ``kve_fast.ncsnpp.make_capturable`` fixes that per model instance, bit for bit.

``cuda_graph="auto"`` captures where it can and otherwise runs eagerly with the same bits, after one
warning naming the reason; ``True`` raises that reason instead; ``False`` (or the environment variable
``KVE_FAST_CUDA_GRAPH=0``) never captures. The default (``cuda_graph=None``) is ``DEFAULT_MODE``, "auto"
(the graphed output was confirmed bit for bit against eager runs and diffusers' pipeline on an H100,
bench/RESULTS.md); in ``kve_fast.k_diffusion`` it is ``KDIFFUSION_DEFAULT_MODE``.

``KVE_FAST_FAKE_GRAPHS=1`` runs all of this on the CPU with ``kve_fast.fake_graph.FakeGraph``, a stand-in
that records what a capture runs and reads and fails where a real graph would read freed memory or
stale kernels.
"""

from __future__ import annotations

import operator
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import fake_graph
from ._warn import warn_once
from .edm_plan import SLOTS as EDM_SLOTS
from .edm_plan import slots as edm_slots
from .fingerprint import ModelState, Nets, nets
from .stages import (
    Advance, Buffers, Churn, ChurnValues, Denoise, HandOut, Heun, HostDraw, LevelValues, StepContext, run_stages,
)

ENV_VAR = "KVE_FAST_CUDA_GRAPH"
FAKE_ENV_VAR = "KVE_FAST_FAKE_GRAPHS"
MODES = ("auto", True, False)
DEFAULT_MODE = "auto"  # what cuda_graph=None means (see the module docstring)
# ... in kve_fast.k_diffusion: off until a GPU run confirms that convention's graphed output bit for bit
KDIFFUSION_DEFAULT_MODE = False
# ... in kve_fast.edm and kve_fast.edm2: likewise
EDM_DEFAULT_MODE = False
MAX_CAPTURES = 4
_RING = 4  # pinned staging rows for the step's scalars, used in turn

_CACHE: OrderedDict = OrderedDict()  # CaptureKey -> Capture, least recently used first
_LIVE: "weakref.WeakSet[Capture]" = weakref.WeakSet()  # every capture not yet freed (cached or in a run)
_LOCK = threading.Lock()
_CAPTURE_LOCK = threading.Lock()  # one capture at a time in this process
_FINALIZERS: dict = {}  # id(model) -> weakref.finalize dropping its captures


def fake() -> bool:
    """Whether graphs run on ``FakeGraph`` (``KVE_FAST_FAKE_GRAPHS=1``), on the CPU."""
    return os.environ.get(FAKE_ENV_VAR, "").strip() == "1"


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


def decide(cuda_graph, device: torch.device, backend_name: str, extra=()) -> bool:
    """Whether a run on ``device`` with the step backend ``backend_name`` is graphed, ``cuda_graph`` the mode its
    front decided (``check_cuda_graph``); ``extra``: k-diffusion's ``extra_signature`` (None: its ``extra_args``
    cannot be captured). ``True`` with a reason it cannot be raises a ValueError naming it; ``"auto"`` warns
    once (on CUDA, or for the ``extra_args``) and runs eagerly, with the same bits."""
    cuda_graph = check_cuda_graph(cuda_graph)
    if cuda_graph is False or _env_off():
        return False
    key = None
    if device.type != "cuda" and not fake():
        reason = f"the device is {device}, not CUDA"
    elif backend_name not in ("triton", "cuda"):
        reason = "graphs run the fused kernels: use backend='triton' or 'cuda' (or 'auto' with Triton installed)"
    elif extra is None:
        reason, key = "`extra_args` holds values other than tensors, numbers, strings and None", ("extra_args",)
    else:
        return True
    if cuda_graph is True:
        raise ValueError(f"`cuda_graph`=True but {reason}")
    if device.type == "cuda" or key is not None:
        warn_once(key or ("decide", reason), f"kve_fast: not using CUDA graphs ({reason}); running eagerly, same "
                                             "results")
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


# -- the key ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureKey:
    """What a capture is cached under: the models a step calls (``fingerprint.nets``: the model, or EDM2's net and
    guiding net; by identity, their ids in call order; the capture checks they are the same objects), every
    setting of the run that the captured work depends on (``RunSpec.key()``), and the global switches that pick
    kernels (``kve_fast.fake_graph.switches``: TF32, cuDNN, deterministic algorithms, SDPA). What the capture
    bakes in of the models themselves is checked per call (``ModelState``)."""

    model: tuple
    spec: tuple
    switches: tuple

    @classmethod
    def of(cls, model, spec) -> "CaptureKey":
        return cls(tuple(map(id, nets(model))), spec.key(), fake_graph.switches())

    def fields(self) -> dict:
        """The key as names and values (``graph_info``)."""
        return {"model": self.model, **{name: value for name, value in self.spec}, "switches": dict(self.switches)}


def graph_info() -> dict:
    """``{"captures": n, "entries": [...]}``: the captures held now, each entry the fields of its key
    (``CaptureKey.fields``) and ``graphs``, how many stage lists it has captured."""
    with _LOCK:
        caps = list(_CACHE.values())
    return {"captures": len(caps), "entries": [{**c.key.fields(), "graphs": len(c.graphs)} for c in caps]}


def clear_graphs(model=None) -> None:
    """Free every capture (or only ``model``'s) and the memory pools they use. A capture a run is using now
    is freed when that run ends (it is not cached again)."""
    with _LOCK:
        for key in [k for k in _CACHE if model is None or id(model) in k.model]:
            _CACHE.pop(key)
        doomed = [c for c in list(_LIVE) if model is None or id(model) in c.key.model]
        for cap in doomed:
            cap.cleared = True
    for cap in doomed:
        cap.free_if_idle()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _forget_model(model_id: int) -> None:
    """The model was garbage-collected: drop its captures (their graphs point at its freed memory)."""
    with _LOCK:
        _FINALIZERS.pop(model_id, None)
        for key in [k for k in _CACHE if model_id in k.model]:
            _CACHE.pop(key).cleared = True
        for cap in list(_LIVE):
            if model_id in cap.key.model:
                cap.cleared = True


def _watch_model(model) -> None:
    for net in nets(model):
        if id(net) not in _FINALIZERS:
            try:
                _FINALIZERS[id(net)] = weakref.finalize(net, _forget_model, id(net))
            except TypeError:  # not weakly referenceable: its captures live until clear_graphs()
                pass


def _reference(model):
    """``ref()``: ``model`` while it lives, else None, without keeping it alive (each net of a ``Nets``; a model
    that cannot be weakly referenced is held)."""
    if isinstance(model, Nets):
        refs = [_reference(net) for net in model]

        def ref():
            members = [r() for r in refs]
            return None if any(m is None for m in members) else Nets(members)

        return ref
    return weakref.ref(model) if _weakrefable(model) else (lambda m=model: m)


def _same(held, model) -> bool:
    """Whether the capture's models (``held``, from ``_reference``) are ``model``'s, object for object."""
    if isinstance(held, Nets):
        return isinstance(model, Nets) and len(held) == len(model) and all(map(operator.is_, held, model))
    return held is model


# -- where a step's values live ------------------------------------------------------------------------------


class DeviceFeed:
    """A step's values where the graphs read them (see the module docstring); ``load`` and ``set_noise``
    write them before a replay. Presents the same ``churn``/``level``/``model_level`` as ``HostFeed``."""

    SLOTS = {"own": slice(0, 2), "next": slice(2, 4), "hat": slice(4, 8), "next_level": slice(8, 12)}
    SIZE = 12

    def __init__(self, convention, device: torch.device, noise: str, like: torch.Tensor):
        self.convention, self.device = convention, device
        pin = device.type == "cuda"
        self.scalars = torch.zeros(self.SIZE, dtype=torch.float32, device=device)
        self._host = torch.zeros(_RING, self.SIZE, dtype=torch.float32, pin_memory=pin)
        self._events: list = [None] * _RING
        self._row = 0
        batch = like.shape[0]
        self.fast = noise == "fast"
        # fast noise: one Philox key per sample (kve_fast.noise.StepKeys), read by the kernels; else a draw
        self.noise = (torch.zeros(batch, dtype=torch.int64, device=device) if self.fast
                      else torch.zeros_like(like, dtype=torch.float32))
        self._levels = ({at: torch.zeros(batch, dtype=torch.float32, device=device) for at in ("hat", "next")}
                        if convention.denoiser else None)
        self.extra: dict | None = None

    def load(self, step, nxt, s_noise: float) -> None:
        """Write ``step``'s scalars (and the next step's churn) into the tensor the graphs read."""
        row = self._row
        if self._events[row] is not None:
            self._events[row].synchronize()  # that row's copy, _RING steps back, has long been read
        h, s = self._host[row], self.SLOTS
        h.zero_()
        h[s["own"]] = torch.tensor((step.noise_coef or 0.0, s_noise))
        if nxt is not None:
            h[s["next"]] = torch.tensor((nxt.noise_coef or 0.0, s_noise))
        h[s["hat"]] = torch.tensor(tuple(step.at_hat))
        if step.at_next is not None:
            h[s["next_level"]] = torch.tensor(tuple(step.at_next))
        self.scalars.copy_(h, non_blocking=True)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[row] = event
        self._row = (row + 1) % _RING

    def set_noise(self, drawn) -> None:
        """One churn's noise into the static buffer: the draw (exact) or the step's keys (fast)."""
        self.noise.copy_(drawn.device if self.fast else drawn, non_blocking=True)

    def set_extra(self, extra: dict) -> None:
        """k-diffusion's ``extra_args``: its tensors into static copies the model calls read (its other
        values are part of the key)."""
        if self.extra is None:
            self.extra = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        else:
            for k, v in extra.items():
                if isinstance(v, torch.Tensor):
                    self.extra[k].copy_(v)

    def churn(self, of: str) -> ChurnValues:
        return ChurnValues(None, self.scalars[self.SLOTS[of]], None, self.noise)

    @property
    def at_hat(self) -> LevelValues:
        return LevelValues(None, self.scalars[self.SLOTS["hat"]])

    @property
    def at_next(self) -> LevelValues:
        return LevelValues(None, self.scalars[self.SLOTS["next_level"]])

    def model_level(self, at: str) -> torch.Tensor:
        scalars = self.scalars[self.SLOTS["hat" if at == "hat" else "next_level"]]
        return self.convention.graph_noise_level(scalars, None if self._levels is None else self._levels[at])


class EDMFeed(DeviceFeed):
    """``DeviceFeed`` of NVlabs' samplers (``Convention.edm``): a step's ``kve_fast.edm_plan.SLOTS`` in the state's
    dtype, written on the device from the plan's 0-d tensors (``edm_plan.slots``: nothing goes through the host),
    the churn noise in a buffer of the state's dtype and layout, and the net's noise level a 0-d view of the t_hat
    or t_next slot. Every stage reads the one slot tensor (the kernels pick their slots)."""

    def __init__(self, convention, device: torch.device, noise: str, like: torch.Tensor):
        self.convention, self.device, self.fast, self.extra = convention, device, False, None
        self.scalars = torch.zeros(len(EDM_SLOTS), dtype=like.dtype, device=device)
        self.noise = torch.zeros_like(like)
        self._levels = {"hat": self.scalars[EDM_SLOTS.index("t_hat")], "next": self.scalars[EDM_SLOTS.index("t_next")]}

    def load(self, step, nxt, s_noise: float) -> None:
        edm_slots(step, nxt, out=self.scalars)

    def churn(self, of: str) -> ChurnValues:
        return ChurnValues(None, self.scalars, None, self.noise)

    @property
    def at_hat(self) -> LevelValues:
        return LevelValues(None, self.scalars)

    at_next = at_hat

    def model_level(self, at: str) -> torch.Tensor:
        return self._levels[at]


def _host(part) -> bool:
    """Whether ``part`` of ``segments`` is host work between graphs (a callback, a draw)."""
    return isinstance(part, (HandOut, HostDraw))


def segments(stages) -> list:
    """``stages`` split at ``HandOut`` and ``HostDraw`` stages: tuples of stages a graph captures, and the host
    work between."""
    out, current = [], []
    for s in stages:
        if _host(s):
            if current:
                out.append(tuple(current))
            out.append(s)
            current = []
        else:
            current.append(s)
    if current:
        out.append(tuple(current))
    return out


def _churns(segment) -> bool:
    return any(isinstance(s, Churn) or (isinstance(s, Heun) and s.then is not None) for s in segment)


def _reads(segment) -> set:
    """The named tensors the stages of ``segment`` read."""
    names = set()
    for s in segment:
        if isinstance(s, (Churn, Denoise)):
            names.add(s.x)
        elif isinstance(s, Advance):
            names.update((s.hat, s.d))
        else:
            names.update((s.raw, s.hat) + ((s.x_next, s.d) if isinstance(s, Heun) else ()))
    return names


# -- captures ------------------------------------------------------------------------------------------------


class Capture:
    """One capture: the static buffers (named as the stages name them) and feed its graphs read, and the
    graphs, one per stage list. Holds no reference to the model."""

    def __init__(self, key: CaptureKey, spec, model, backend, like: torch.Tensor, model_dtype: torch.dtype):
        self.key, self.spec, self.backend = key, spec, backend
        self.model_ref = _reference(model)
        self.state = ModelState(model)
        self.compiled = compiled(model)
        self.buffers = Buffers(like, model_dtype, reuse=None, image_kind=spec.image)
        self.feed = (EDMFeed if spec.convention.edm else DeviceFeed)(spec.convention, spec.device, spec.noise, like)
        self.env: dict = {}
        self.graphs: dict = {}
        self.busy = threading.Lock()
        self.cleared = False
        self.pool = torch.cuda.graph_pool_handle() if spec.device.type == "cuda" and not fake() else None

    def graph(self, stages, ctx: StepContext, live_out: set):
        """The graph of ``stages``, captured at first use (before any real state is in the buffers: the
        run captures every stage list it needs before its first step). Tensors it produces that later
        stage lists read (``live_out``) are copied into static buffers inside the graph."""
        g = self.graphs.get(stages)
        if g is None:
            keep = sorted(live_out)

            def fn():
                run_stages(stages, ctx, self.feed)
                for name in keep:  # a model output read after a HandOut: into a buffer of its own
                    value = self.env[name]
                    static = self.buffers.tensors.get(name)
                    if static is None:
                        static = self.buffers.tensors[name] = torch.zeros_like(value)
                    if static is not value:
                        static.copy_(value)
                        self.env[name] = static
                return None

            g = self.graphs[stages] = _capture(fn, self.spec.device, self.pool, self.compiled)
        return g

    def free_if_idle(self) -> None:
        """Free the graphs and buffers now if no run uses this capture (else ``release`` does)."""
        if self.busy.acquire(blocking=False):
            try:
                self._free()
            finally:
                self.busy.release()

    def _free(self) -> None:
        self.graphs.clear()
        self.env.clear()
        self.buffers.tensors.clear()
        self.pool = None


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def compiled(model) -> bool:
    """Whether ``torch.compile`` wraps ``model`` or part of it: an ``OptimizedModule`` in the tree, a module
    compiled in place (``module.compile()``), a compiled instance ``forward``, or a compiled function."""
    if isinstance(model, Nets):
        return any(map(compiled, model))
    if hasattr(model, "_torchdynamo_orig_callable"):
        return True
    if not isinstance(model, torch.nn.Module):
        return False
    for m in model.modules():
        d = vars(m)
        if d.get("_compiled_call_impl") is not None or hasattr(d.get("forward"), "_torchdynamo_orig_callable") \
                or type(m).__name__ == "OptimizedModule":
            return True
    return False


# Why a compiled model is never run under a dispatch mode here: dynamo does not run compiled code while a
# TorchDispatchMode is active, and from then on runs that frame eagerly for good (torch 2.13): the stand-in's
# recorder, or ``fake_graph.watch`` around a warm-up, would silently undo the user's compile.
_COMPILED_ON_THE_CPU = ("the model is compiled with torch.compile, whose code runs outside the operators the CPU "
                        "graph stand-in (KVE_FAST_FAKE_GRAPHS=1) records: it is captured on CUDA only")


def _capture(fn, device: torch.device, pool, compiled_model: bool = False):
    """Warm ``fn`` up (twice, on a side stream) and capture it; a graph cannot take random draws or host
    syncs, and those are refused before they run (``fake_graph.watch``), so no RNG moves. A compiled model
    compiles in the first warm-up, before the capture, outside any dispatch mode (see above); its draws are
    found by the global RNGs having moved, which are then put back."""
    with _CAPTURE_LOCK:
        if fake() or device.type != "cuda":
            if compiled_model:
                raise fake_graph.CaptureRefused(_COMPILED_ON_THE_CPU)
            with fake_graph.watch():
                fn()
                fn()
            graph = fake_graph.FakeGraph()
            graph.capture(fn)
            return graph
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            if compiled_model:
                _warm_up_compiled(fn, device)
            else:
                with fake_graph.watch():
                    fn()
                    fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            fn()
        return graph


def _warm_up_compiled(fn, device: torch.device) -> None:
    """Two warm-ups of a compiled model's step (the first compiles); refused if they drew random numbers,
    with the global RNGs put back."""
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    fn()
    fn()
    if not (torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(device), cuda)):
        torch.set_rng_state(cpu)
        torch.cuda.set_rng_state(cuda, device)
        raise fake_graph.CaptureRefused("the model draws random numbers in its forward (dropout in train mode, or "
                                        "noise); a graph would replay the captured draw")


def checkout(model, spec, backend, like: torch.Tensor, model_dtype: torch.dtype, wait: bool):
    """The capture for this model and run (cached, or new), reserved for this run; None if another run
    uses it and ``wait`` is False."""
    key = CaptureKey.of(model, spec)
    stale = None
    with _LOCK:
        cap = _CACHE.get(key)
        if cap is not None and (not _same(cap.model_ref(), model) or cap.state.difference(model) is not None):
            stale = _CACHE.pop(key)  # what it baked in changed: a new capture, and the old one freed
            stale.cleared = True
            cap = None
        if cap is not None:
            _CACHE.move_to_end(key)
    if stale is not None:
        stale.free_if_idle()
    if cap is None:
        _watch_model(model)
        cap = Capture(key, spec, model, backend, like, model_dtype)
        with _LOCK:
            _LIVE.add(cap)
    if not cap.busy.acquire(blocking=wait):
        return None
    if cap.cleared:  # freed while this run waited for it
        cap.busy.release()
        return checkout(model, spec, backend, like, model_dtype, wait)
    return cap


def release(cap: Capture, completed: bool) -> None:
    """End a run's use of ``cap``: cache it after a completed run (unless it was cleared meanwhile;
    the least recently used beyond ``MAX_CAPTURES`` are freed), else free it."""
    evicted = []
    with _LOCK:
        keep = completed and not cap.cleared
        if keep:
            _CACHE[cap.key] = cap
            _CACHE.move_to_end(cap.key)
            while len(_CACHE) > MAX_CAPTURES:
                _, old = _CACHE.popitem(last=False)
                old.cleared = True
                evicted.append(old)
        elif _CACHE.get(cap.key) is cap:
            _CACHE.pop(cap.key)
    if not keep:
        cap._free()
    cap.busy.release()
    for old in evicted:
        old.free_if_idle()


# -- the engine ------------------------------------------------------------------------------------------------


class GraphEngine:
    """``kve_fast.engine.Engine``'s interface, with every stage list replayed from the capture's graphs.

    A callback runs between two replays and may do whatever it does in an eager run: an in-place edit of a
    tensor it was handed counts (the copies it gets are watched through their version counters and copied
    back into the graph's buffers), and if it changed what the capture baked in (the model: a hook, a
    processor, a parameter; or the global switches), the rest of the call runs eagerly from there, with the
    same bits, and the capture is dropped (the next call captures anew): nothing stale is ever replayed.
    ``eager()`` makes the engine that takes over."""

    def __init__(self, cap: Capture, schedule, plan, denoise, source, s_noise: float, callback=None, extra=None,
                 eager=None):
        self.cap, self.schedule, self.plan, self.source, self.s_noise = cap, schedule, plan, source, s_noise
        self.callback, self.make_eager = callback, eager
        self.eager = None  # the eager engine that took over, if one did
        self.ctx = StepContext(cap.backend, cap.buffers, denoise)
        self.ctx.env = cap.env
        self._segments: dict = {}  # id(stage list) -> (the list, segments(list))
        if extra is not None:
            cap.feed.set_extra(extra)

    def _stage_lists(self) -> list:
        plan, schedule = self.plan, self.schedule
        n = len(plan)
        # the reference's steps differ only at the end; k-diffusion's churn comes and goes with gamma
        indices = range(n) if not schedule.convention.churn_every_step else sorted({0, max(n - 2, 0), n - 1})
        lists = [schedule.prologue(plan)] if schedule.prologue(plan) else []
        for i in indices:
            stages = schedule.stages(schedule.kind(plan, plan[i]))
            if stages not in lists:
                lists.append(stages)
        return lists

    def prepare(self) -> None:
        """Capture every stage list this run replays, before any real state is in the buffers (warm-up
        computes with the first step's scalars, so it sees finite values)."""
        cap = self.cap
        cap.feed.load(self.plan[0], self.plan[1] if len(self.plan) > 1 else None, self.s_noise)
        if "x" not in cap.env:
            cap.env["x"] = cap.buffers.target("x")
        for stages in self._stage_lists():
            parts = segments(stages)
            for k, part in enumerate(parts):
                if _host(part):
                    continue
                later = parts[k + 1:]
                read = set().union(*[_reads(p) for p in later if not _host(p)])
                read |= {n for p in later if isinstance(p, HandOut) for n in (p.x, p.denoised)}
                outputs = {s.out for s in part if isinstance(s, Denoise)}  # the only names not in buffers
                cap.graph(part, self.ctx, outputs & read)

    def start(self, x0: torch.Tensor) -> None:
        self.cap.env["x"].copy_(x0)
        prologue = self.schedule.prologue(self.plan)
        if prologue:
            self._replay(prologue, self.plan[0])

    def step(self, step) -> None:
        if self.eager is not None:
            self.eager.step(step)
            return
        self._replay(self.schedule.stages(self.schedule.kind(self.plan, step)), step)

    def _replay(self, stages, step) -> None:
        cap = self.cap
        fused = any(isinstance(s, Heun) and s.then is not None or isinstance(s, Churn) and s.of == "next"
                    for s in stages)
        cap.feed.load(step, self.plan[step.index + 1] if fused else None, self.s_noise)
        held = self._segments.get(id(stages))
        if held is None or held[0] is not stages:
            held = self._segments[id(stages)] = (stages, segments(stages))
        for part in held[1]:
            if isinstance(part, HandOut):
                why = self._hand_out(part, step)
                now, rest = self.schedule.rest_after(self.plan, step, part)
                if rest is not None:  # (k-diffusion's sigmas edited by the callback: the plan changed)
                    why = why or "the callback edited the sigmas in place"
                if why is not None:
                    self._hand_over(stages[_index(stages, part) + 1:] if rest is None else rest, now, why)
                    return
                continue
            if isinstance(part, HostDraw):  # the next churn's noise, drawn where the original draws it
                cap.feed.set_noise(self.source.step())
                continue
            if not self.schedule.host_draws and _churns(part):
                cap.feed.set_noise(self.source.step())
            cap.graphs[part].replay()

    def _hand_out(self, stage: HandOut, step) -> str | None:
        """The callback, given copies of the state; returns why the capture went stale meanwhile, or None."""
        env = self.cap.env
        state = {stage.x: env[stage.x].clone(), stage.denoised: env[stage.denoised].clone()}
        versions = [t._version for t in state.values()]
        new = self.callback(stage, step, state)
        for (name, t), version in zip(state.items(), versions):
            if t._version != version:  # edited in place: in an eager run it was the state itself
                env[name].copy_(t)
        if new is not None:
            env[stage.x].copy_(new)
        return self._stale()

    def _stale(self) -> str | None:
        """Why the capture no longer matches what a replay would need (the model, the global switches), or None."""
        cap = self.cap
        if fake_graph.switches() != cap.key.switches:
            return "the global switches changed"
        model = cap.model_ref()
        return "the model was garbage-collected" if model is None else cap.state.difference(model)

    def _hand_over(self, rest: tuple, step, why: str) -> None:
        """Run ``rest`` of ``step`` and every later step eagerly, from the graph's state (copied: the capture is
        dropped when the run ends)."""
        warn_once(("hand over", why), f"kve_fast: a callback changed what this call's CUDA graphs baked in ({why}); "
                                      "the call goes on eagerly from there (same results), the next call "
                                      "captures again")
        self.cap.cleared = True
        eager = self.make_eager()
        eager.env.update({name: t.clone() for name, t in self.cap.env.items()})
        if rest:
            run_stages(rest, eager.ctx, eager.feed.at(step))
        self.eager = eager

    def sample(self) -> torch.Tensor:
        return self.eager.sample() if self.eager is not None else self.cap.env["x"]

    def output(self) -> torch.Tensor:
        if self.eager is not None:
            return self.eager.output()
        env = self.cap.env
        if self.schedule.image is None:
            return env["x"].clone()
        if self.schedule.fuses_image and "image" in env:
            return env["image"].clone()
        return self.cap.backend.to_image(env["x"], self.schedule.image)


def _index(stages: tuple, stage) -> int:
    return next(i for i, s in enumerate(stages) if s is stage)
