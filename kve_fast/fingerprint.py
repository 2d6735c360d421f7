"""What a CUDA-graph capture of a model bakes in, and a cheap check, once per call, that none of it changed.

A capture records the model's kernels with raw pointers to its parameters and buffers and with the
Python-level choices its forward made (which submodules ran, which hooks, training or eval, kve_fast's
NCSN++ patches). ``ModelState(model)`` snapshots all of that:

- every module of the tree, by identity and type;
- every parameter and buffer: its storage (by identity, held weakly: a freed or replaced storage no
  longer matches), shape, strides, storage offset, dtype and device;
- each module's training flag, its forward and forward-pre hooks (by handle: handles are never reused),
  an instance-level ``forward`` that replaces the class's, and kve_fast's NCSN++ patch (``kve_fast.ncsnpp``:
  which patch object, in fast mode or not, how many device filters it holds);
- the global forward hooks of ``torch.nn.modules.module``.

``state.difference(model)`` is None while all of it is as it was, else what changed (one short phrase).
Not covered: other Python attributes a forward reads (``module.negative_slope = 0.2`` after the capture):
call ``kve_fast.clear_graphs(model)`` after changing those. ``bench/fingerprint_bench.py`` measures the
check's cost on a 62 M-parameter NCSN++.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch.nn.modules import module as _module

__all__ = ["ModelState"]

_PATCH = "_kve_ncsnpp_patch"  # kve_fast.ncsnpp's per-module record
_storage = torch.Tensor.untyped_storage
_stride = torch.Tensor.stride
_offset = torch.Tensor.storage_offset
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


def _modules(model) -> list:
    """The module tree in a fixed order (``model.modules()`` without the names it builds)."""
    if not isinstance(model, torch.nn.Module):
        return []
    out, seen, i = [model], {id(model)}, 0
    while i < len(out):
        for m in out[i]._modules.values():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        i += 1
    return out


def _flags(modules) -> list:
    """Per module: training, hook handles, and the NCSN++ patch's state (its identity is checked apart)."""
    flags = []
    for m in modules:
        d = m.__dict__
        hooks, pre = d.get("_forward_hooks"), d.get("_forward_pre_hooks")
        patch = d.get(_PATCH)
        flags.append((d.get("training"), tuple(hooks) if hooks else (), tuple(pre) if pre else (),
                      None if patch is None else (patch.fast, len(patch.filters))))
    return flags


def _tensors(modules) -> list:
    out = []
    for m in modules:
        d = m.__dict__
        for group in (d.get("_parameters"), d.get("_buffers")):
            if group:
                out.extend(t for t in group.values() if t is not None)
    return out


def _global_hooks() -> tuple:
    return tuple(tuple(getattr(_module, name, ())) for name in
                 ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


class ModelState:
    """A snapshot of what a capture of ``model`` depends on (see the module docstring)."""

    def __init__(self, model):
        modules = _modules(model)
        tensors = _tensors(modules)
        self._modules = [weakref.ref(m) for m in modules]
        self._types = list(map(type, modules))
        self._flags = _flags(modules)
        self._forwards = [_weak(m.__dict__.get("forward")) for m in modules]
        self._patches = [_weak(m.__dict__.get(_PATCH)) for m in modules]
        self._storages = [weakref.ref(s) for s in map(_storage, tensors)]
        self._meta = self._tensor_meta(tensors)
        self._global = _global_hooks()

    @staticmethod
    def _tensor_meta(tensors) -> tuple:
        return (list(map(_shape, tensors)), list(map(_stride, tensors)), list(map(_offset, tensors)),
                list(map(_dtype, tensors)), list(map(_device, tensors)))

    def difference(self, model) -> str | None:
        """None if ``model`` is as it was at the snapshot, else what changed."""
        modules = _modules(model)
        if len(modules) != len(self._modules) or not all(r() is m for r, m in zip(self._modules, modules)):
            return "its modules changed"
        if list(map(type, modules)) != self._types:
            return "a module's class changed"
        if _flags(modules) != self._flags:
            return "a training flag, a hook, a forward or an NCSN++ patch changed"
        for refs, attr in ((self._forwards, "forward"), (self._patches, _PATCH)):
            for r, m in zip(refs, modules):
                now = m.__dict__.get(attr)
                if (now is not None) if r is None else (r() is not now):
                    return f"a module's {attr} was set, replaced or removed"
        tensors = _tensors(modules)
        if len(tensors) != len(self._storages):
            return "parameters or buffers were added or removed"
        if not all(r() is s for r, s in zip(self._storages, map(_storage, tensors))):
            return "a parameter or buffer was replaced (new storage: .to(), .half(), load_state_dict(assign=True)...)"
        if self._tensor_meta(tensors) != self._meta:
            return "a parameter or buffer changed its shape, strides, dtype or device"
        if _global_hooks() != self._global:
            return "the global module hooks changed"
        return None


def _weak(obj):
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda o=obj: o  # not weakly referenceable: compared by identity, held
