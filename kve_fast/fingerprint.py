"""What a CUDA-graph capture of a model bakes in, and a cheap check, once per call, that none of it changed.

A capture records the model's kernels with raw pointers to its parameters and buffers and with the
Python-level choices its forward made (which submodules ran, which hooks, training or eval, kve_fast's
NCSN++ patches). ``ModelState(model)`` snapshots all of that:

- every module of the tree, by identity and type;
- every parameter and buffer: its storage (by identity, held weakly: a freed or replaced storage no
  longer matches; its device with it), data pointer (offset, or a storage resized in place), shape,
  strides and dtype;
- each module's training flag, its forward and forward-pre hooks (by handle: handles are never reused),
  its instance attributes' count (a new instance ``forward`` or NCSN++ patch adds one), and for the modules
  that have them, which instance ``forward`` and which kve_fast NCSN++ patch (``kve_fast.ncsnpp``: in fast
  mode or not, how many device filters it holds);
- the global forward hooks of ``torch.nn.modules.module``.

``state.difference(model)`` is None while all of it is as it was, else what changed (one short phrase).
Not covered: other Python attributes a forward reads (``module.negative_slope = 0.2`` after the capture):
call ``kve_fast.clear_graphs(model)`` after changing those. ``bench/fingerprint_bench.py`` measures the
check's cost on a 62 M-parameter NCSN++.
"""

from __future__ import annotations

import itertools
import operator
import weakref

import torch
from torch.nn.modules import module as _module

__all__ = ["ModelState"]

_PATCH = "_kve_ncsnpp_patch"  # kve_fast.ncsnpp's per-module record
_MAX_MODULES = 1_000_000  # a module tree larger than this is a cycle
_storage = torch.Tensor.untyped_storage
_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_row = operator.itemgetter("training", "_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers")
_first = operator.itemgetter(0)


def _modules(model) -> list:
    """The module tree in a fixed order (``model.modules()`` without the names it builds; a module shared by
    two parents appears twice)."""
    if not isinstance(model, torch.nn.Module):
        return []
    out, i = [model], 0
    while i < len(out):
        out.extend(out[i]._modules.values())
        i += 1
        if len(out) > _MAX_MODULES:
            raise ValueError("the model's module tree is a cycle")
    return [m for m in out if m is not None] if _has_none(out) else out


def _has_none(items) -> bool:
    """``None in items`` by identity (``in`` compares with ``==``, which a tensor answers elementwise)."""
    return any(map(operator.is_, items, itertools.repeat(None)))


def _hooks(rows) -> list:
    """(index, forward hook handles, forward-pre hook handles) of each module that has hooks."""
    return [(i, tuple(r[1]), tuple(r[2])) for i, r in enumerate(rows) if r[1] or r[2]]


def _tensors(rows) -> list:
    out = []
    for r in rows:
        if r[3]:
            out.extend(r[3].values())
        if r[4]:
            out.extend(r[4].values())
    return [t for t in out if t is not None] if _has_none(out) else out


def _global_hooks() -> tuple:
    return tuple(tuple(getattr(_module, name, ())) for name in
                 ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


class ModelState:
    """A snapshot of what a capture of ``model`` depends on (see the module docstring)."""

    def __init__(self, model):
        modules = _modules(model)
        dicts = list(map(vars, modules))
        rows = list(map(_row, dicts))
        tensors = _tensors(rows)
        self._modules = [weakref.ref(m) for m in modules]
        self._types = list(map(type, modules))
        self._sizes = list(map(len, dicts))  # an instance attribute set or deleted (a forward, a patch) changes one
        self._training = list(map(_first, rows))
        self._hooks = _hooks(rows)
        # modules with an instance forward or an NCSN++ patch: which object, and the patch's state
        self._special = [(i, _weak(d.get("forward")), _weak(d.get(_PATCH)), _patch_state(d.get(_PATCH)))
                         for i, d in enumerate(dicts) if "forward" in d or _PATCH in d]
        self._storages = [weakref.ref(s) for s in map(_storage, tensors)]
        self._meta = self._tensor_meta(tensors)
        self._global = _global_hooks()

    @staticmethod
    def _tensor_meta(tensors) -> tuple:
        # (the device is the storage's: checked with it)
        return (list(map(_ptr, tensors)), list(map(_shape, tensors)), list(map(_stride, tensors)),
                list(map(_dtype, tensors)))

    def difference(self, model) -> str | None:
        """None if ``model`` is as it was at the snapshot, else what changed."""
        modules = _modules(model)
        if len(modules) != len(self._modules) or not all(r() is m for r, m in zip(self._modules, modules)):
            return "its modules changed"
        if list(map(type, modules)) != self._types:
            return "a module's class changed"
        dicts = list(map(vars, modules))
        if list(map(len, dicts)) != self._sizes:
            return "a module's attributes changed (an instance forward, an NCSN++ patch...)"
        rows = list(map(_row, dicts))
        if list(map(_first, rows)) != self._training:
            return "a training flag changed (train() / eval())"
        if _hooks(rows) != self._hooks:
            return "a forward hook was added or removed"
        for i, forward, patch, state in self._special:
            d = dicts[i]
            if not _same(forward, d.get("forward")) or not _same(patch, d.get(_PATCH)) or \
                    _patch_state(d.get(_PATCH)) != state:
                return "an instance forward or an NCSN++ patch changed"
        tensors = _tensors(rows)
        if len(tensors) != len(self._storages):
            return "parameters or buffers were added or removed"
        if not all(r() is s for r, s in zip(self._storages, map(_storage, tensors))):
            return "a parameter or buffer was replaced (new storage: .to(), .half(), load_state_dict(assign=True)...)"
        if self._tensor_meta(tensors) != self._meta:
            return "a parameter or buffer changed its memory, shape, strides or dtype"
        if _global_hooks() != self._global:
            return "the global module hooks changed"
        return None


def _patch_state(patch):
    return None if patch is None else (patch.fast, len(patch.filters))


def _same(ref, obj) -> bool:
    return obj is None if ref is None else ref() is obj


def _weak(obj):
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda o=obj: o  # not weakly referenceable: compared by identity, held
