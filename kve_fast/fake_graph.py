"""A CPU stand-in for ``torch.cuda.CUDAGraph`` that fails the way a real graph does.

A CUDA graph records the kernels a function launches, with their arguments baked in (pointers to the
memory they read and write, host scalars as constants), and a replay launches exactly those kernels
again: no Python runs, so a value read on the host at capture stays what it was, a hook added later
never runs, and memory freed since the capture is read anyway. A stand-in that re-runs the Python
function at every replay hides all of that. This one records instead:

- every ATen operator the captured function dispatches (through a ``TorchDispatchMode``) and every Triton
  launch (through ``launch``, which kve_fast's kernels launch with), with each tensor argument kept as its
  storage, offset, sizes and strides, and every other argument as the value it had;
- storages allocated during the capture belong to the graph (its memory pool: kept alive with it), the
  others are the graph's inputs, held weakly as a real graph holds a raw pointer;
- the global switches that pick kernels (TF32, cuDNN, deterministic algorithms) as they were.

``replay()`` launches the recorded operators again on those storages and raises ``StaleCapture`` if an
input storage has been freed since, or a switch changed: what a real graph would turn into silently
wrong values (or a crash). Operators that draw random numbers, and host syncs (``.item()``, a branch on
a tensor's value), refuse the capture (``CaptureRefused``), as they break or corrupt a real one.

Switched on by ``KVE_FAST_FAKE_GRAPHS=1`` (``kve_fast.graphs``): the graphed path then runs on the CPU,
for tests and for anyone who wants to see what a capture would replay.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .precision import fp32_precision

__all__ = ["FakeGraph", "StaleCapture", "CaptureRefused", "launch", "switches", "refusal"]


class StaleCapture(RuntimeError):
    """A replay would read memory that was freed, or kernels that the global switches no longer select."""


class CaptureRefused(RuntimeError):
    """The function cannot be captured: it draws random numbers or synchronizes with the host."""


def switches() -> tuple:
    """The global switches that change which kernels run or how they round (a graph keeps the ones it
    was captured with). The float32 precision (TF32) comes from ``kve_fast.precision.fp32_precision``: both of
    torch's APIs, read without the error torch raises where a process mixed them."""
    b = torch.backends
    return (*fp32_precision().switches,
            ("cuda.matmul.allow_fp16_reduced_precision_reduction", b.cuda.matmul.allow_fp16_reduced_precision_reduction),
            ("cuda.matmul.allow_bf16_reduced_precision_reduction", b.cuda.matmul.allow_bf16_reduced_precision_reduction),
            ("cudnn.enabled", b.cudnn.enabled),
            ("cudnn.benchmark", b.cudnn.benchmark), ("cudnn.deterministic", b.cudnn.deterministic),
            ("deterministic_algorithms", torch.are_deterministic_algorithms_enabled()),
            ("sdp", (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled())))


_HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.item.default}
_CONSTANTS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


_MISSING = object()


def _argument(func, args, kwargs, name: str):
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else a.default_value
    return _MISSING


def _draws(func, args, kwargs) -> bool:
    """Whether this call of a seeded operator draws random numbers (attention with ``dropout_p`` 0, and
    dropout or an RNN with ``train`` False, do not)."""
    if _argument(func, args, kwargs, "dropout_p") == 0:
        return False
    return _argument(func, args, kwargs, "train") is not False


def refusal(func, args=(), kwargs=None) -> str | None:
    """Why a graph cannot capture this call of ``func`` (an ATen operator), or None."""
    if torch.Tag.nondeterministic_seeded in func.tags and _draws(func, args, kwargs or {}):
        return (f"the model draws random numbers in its forward ({func}): dropout in train mode, or noise; a graph "
                "would replay the captured draw")
    if func in _HOST_SYNCS:
        return f"the model reads a tensor's value on the host ({func}: .item(), or a branch on a tensor)"
    return None


class _Watch(TorchDispatchMode):
    """Refuses what a graph cannot capture, before it runs (a random draw is not made)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = refusal(func, args, kwargs)
        if why:
            raise CaptureRefused(why)
        return func(*args, **(kwargs or {}))


def watch() -> TorchDispatchMode:
    """A mode under which an operator a graph cannot capture raises ``CaptureRefused`` (used around the
    warm-up of real captures too, so that a model that draws random numbers never draws any there)."""
    return _Watch()


# -- recording --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """A tensor argument as a graph holds it: storage (strong for the graph's own, weak for an input),
    offset, sizes, strides, dtype."""

    storage: object  # UntypedStorage (owned) or weakref.ref to it (input)
    owned: bool
    offset: int
    size: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    name: str

    def tensor(self) -> torch.Tensor:
        storage = self.storage if self.owned else self.storage()
        if storage is None:
            raise StaleCapture(f"the graph reads a tensor that was freed after the capture ({self.name}: "
                               f"{self.dtype} {list(self.size)}); a CUDA graph would read freed memory")
        return torch.empty(0, dtype=self.dtype, device=self.device).set_(storage, self.offset, self.size, self.stride)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.owned: dict[int, object] = {}  # id(storage) -> storage, allocated during the capture
        self.inputs: dict[int, weakref.ref] = {}

    def _ref(self, t: torch.Tensor, name: str) -> _Ref:
        storage = t.untyped_storage()
        key = id(storage)
        owned = self.owned.get(key) is storage
        if not owned:
            ref = self.inputs.get(key)
            if ref is None or ref() is not storage:
                ref = self.inputs[key] = weakref.ref(storage)
            holder = ref
        else:
            holder = storage
        return _Ref(holder, owned, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, name)

    def _own(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if self.owned.get(key) is not storage and (key not in self.inputs or self.inputs[key]() is not storage):
            self.owned[key] = storage

    def _spec(self, tree, name: str):
        return pytree.tree_map(lambda v: self._ref(v, name) if isinstance(v, torch.Tensor) else v, tree)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = refusal(func, args, kwargs)
        if why:
            raise CaptureRefused(why)
        out = func(*args, **kwargs)
        if func in _CONSTANTS:  # a tensor made from host data: a constant the graph keeps
            pytree.tree_map(lambda v: self._own(v) if isinstance(v, torch.Tensor) else v, out)
            return out
        schema = func._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        views = any(r.alias_info is not None for r in schema.returns)
        inputs = self._spec((args, kwargs), str(func))
        for v in pytree.tree_leaves(out):  # new storages belong to the graph's pool
            if isinstance(v, torch.Tensor):
                self._own(v)
        if views and not writes:
            return out  # a view: nothing runs on a replay
        self.ops.append(("op", func, inputs, self._spec(out, str(func))))
        return out

    def launch(self, kernel, grid, args, meta) -> None:
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        spec = self._spec(args, f"Triton {name}")
        with _disable_current_modes():  # the interpreter's own tensor work is not the graph's
            kernel[grid](*args, **meta)
        self.ops.append(("triton", (kernel, grid, meta), spec, None))


_local = threading.local()


def launch(kernel, grid, args: tuple, meta: dict) -> None:
    """Launch a Triton kernel (``kernel[grid](*args, **meta)``), recorded when a fake capture is on in this thread."""
    recorder = getattr(_local, "recorder", None)
    if recorder is None:
        kernel[grid](*args, **meta)
    else:
        recorder.launch(kernel, grid, args, meta)


def _tensors(tree):
    return pytree.tree_map(lambda v: v.tensor() if isinstance(v, _Ref) else v, tree)


class FakeGraph:
    """``capture(fn)`` records ``fn``'s work and returns its outputs; ``replay()`` runs the record again (see
    the module docstring)."""

    def __init__(self):
        self._ops: list = []
        self._owned: dict = {}
        self._switches = None

    def capture(self, fn):
        recorder = _Recorder()
        self._switches = switches()
        _local.recorder = recorder
        try:
            with recorder:
                outputs = fn()
        finally:
            _local.recorder = None
        self._ops, self._owned = recorder.ops, recorder.owned
        return outputs

    def replay(self) -> None:
        now = switches()
        if now != self._switches:
            changed = [f"{a[0]}: {a[1]!r} -> {b[1]!r}" for a, b in zip(self._switches, now) if a != b]
            raise StaleCapture(f"the global switches changed since the capture ({', '.join(changed)}); a CUDA graph "
                               "would keep running the kernels it captured")
        with torch.no_grad():
            for kind, what, inputs, outputs in self._ops:
                if kind == "triton":
                    kernel, grid, meta = what
                    kernel[grid](*_tensors(inputs), **meta)
                    continue
                args, kwargs = _tensors(inputs)
                result = what(*args, **kwargs)
                for ref, value in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(result)):
                    if isinstance(ref, _Ref) and ref.owned and isinstance(value, torch.Tensor):
                        target = ref.tensor()
                        if target.untyped_storage() is not value.untyped_storage():
                            target.copy_(value)
