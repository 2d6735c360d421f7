"""What a CUDA-graph capture of a model bakes in, and a cheap check that none of it changed.

A capture records the model's kernels with raw pointers to its parameters and buffers and with the
Python-level choices its forward made (which submodules ran, which hooks, training or eval, which attention
processor, which activation, every flag a forward branches on). A replay runs no Python: whatever the
forward would read differently now is silently ignored. ``ModelState(model)`` snapshots what a forward can
read of the model:

- every module of the tree, by identity and type (``None`` children, as diffusers' ``ModuleList([None])``,
  are skipped);
- every parameter and buffer: its storage (by identity, held weakly: a freed or replaced storage no
  longer matches; its device with it), data pointer (offset, or a storage resized in place), shape,
  strides and dtype;
- each module's training flag and its forward and forward-pre hooks (by handle: handles are never reused);
- each module's other instance attributes, one level deep, and the attributes of the plain objects held
  there (an attention processor, kve_fast's NCSN++ patch: two levels): numbers, strings, ``None`` and
  tuples of them by value (``eps = 1e-6`` set again to the same value is no change); everything else by
  identity (a processor, an activation, an instance ``forward``, a list or a tensor replaced by another);
- the class attributes (methods) of every module's class and of those plain objects' classes, up to
  ``torch.nn.Module`` (``Attention.forward = patched`` is a change);
- the global forward hooks of ``torch.nn.modules.module``.

Not looked into: the contents of containers held as attributes (a list or dict changed in place), objects
below the second level, module-level globals a forward calls (a function of ``torch.nn.functional``
replaced), and state outside the model (the capture key holds the global switches). After changing one of
those, call ``kve_fast.clear_graphs(model)``.

A call may run several models (EDM2's net and its guiding net): ``Nets`` holds them, and a snapshot of a
``Nets`` covers every module of every net (``nets``).

``state.difference(model)`` is None while all of it is as it was, else what changed (one short phrase). The
graph runner calls it once per graphed call, and after each callback of a call that has one (a callback may
change the model between two steps). Objects that could reference the model (modules, functions, methods,
plain objects) are held weakly, so a snapshot never keeps a model alive. ``bench/fingerprint_bench.py``
measures the check's cost on a 62 M-parameter NCSN++.
"""

from __future__ import annotations

import itertools
import operator
import types
import weakref

import numpy as np
import torch
from torch.nn.modules import module as _module

__all__ = ["ModelState", "Nets", "nets"]

_PATCH = "_kve_ncsnpp_patch"  # kve_fast.ncsnpp's per-module record
_MAX_MODULES = 1_000_000  # a module tree larger than this is a cycle
_storage = torch.Tensor.untyped_storage
_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_ROW_KEYS = ("training", "_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers")
_row = operator.itemgetter(*_ROW_KEYS)
_first = operator.itemgetter(0)
_call = getattr(operator, "call", lambda f, *args: f(*args))  # (operator.call is Python 3.11+)
# what torch.nn.Module keeps in every instance's __dict__ (checked through the rows above, or not read by forward)
_BOOKKEEPING = frozenset(vars(torch.nn.Module()))
# values compared by value, not identity: the same number set again is no change
_PLAIN = (type(None), bool, int, float, complex, str, bytes, np.generic, torch.dtype, torch.device)


class Nets(tuple):
    """The models one call runs, in the order it calls them (EDM2's net, then its guiding net): a CUDA-graph
    capture keys, snapshots, watches and holds each one (``kve_fast.graphs``), never the tuple."""

    __slots__ = ()


def nets(model) -> tuple:
    """The models behind ``model``: a ``Nets``' members, else ``model`` alone."""
    return tuple(model) if isinstance(model, Nets) else (model,)


def _modules(model) -> list:
    """The module tree in a fixed order (``model.modules()`` without the names it builds; a module shared by
    two parents appears twice; ``None`` entries of ``_modules`` are skipped); of a ``Nets``, each net's in turn."""
    out = [m for m in nets(model) if isinstance(m, torch.nn.Module)]
    i = 0
    while i < len(out):
        m = out[i]
        i += 1
        if m is not None:
            out.extend(m._modules.values())
            if len(out) > _MAX_MODULES:
                raise ValueError("the model's module tree is a cycle")
    return [m for m in out if m is not None] if _has_none(out) else out


def _has_none(items) -> bool:
    """``None in items`` by identity (``in`` compares with ``==``, which a tensor answers elementwise)."""
    return any(map(operator.is_, items, itertools.repeat(None)))


def _rows(modules: list, dicts: list) -> list:
    """``_row`` of each module's ``__dict__``; a module that keeps one of them elsewhere (``torch.compile``'s
    ``OptimizedModule`` forwards ``training`` to the module it wraps) is read through its attributes."""
    try:
        return list(map(_row, dicts))
    except KeyError:
        return [_row(d) if all(k in d for k in _ROW_KEYS) else
                (m.training, d.get("_forward_hooks", {}), d.get("_forward_pre_hooks", {}), d.get("_parameters", {}),
                 d.get("_buffers", {})) for m, d in zip(modules, dicts)]


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


# -- attributes ---------------------------------------------------------------------------------------------


class _Same:
    """Equal to exactly one object: held weakly where it can be (a snapshot must not keep a model alive through
    a bound method or a processor that refers to it), else strongly (a list, a dict: then it cannot be freed and
    its address reused by another)."""

    __slots__ = ("ref",)

    def __init__(self, obj):
        try:
            self.ref = weakref.ref(obj)
        except TypeError:
            self.ref = lambda obj=obj: obj

    def __eq__(self, other) -> bool:
        return self.ref() is other

    __hash__ = None


def _plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return type(value) is tuple and all(map(_plain, value))


def _held(value):
    """How a snapshot keeps ``value``: itself where equality is by value, else ``_Same``."""
    return value if _plain(value) else _Same(value)


def _is_object(value) -> bool:
    """A plain object whose own attributes a forward may read (an attention processor, a patch record)."""
    return not (_plain(value) or isinstance(value, (torch.nn.Module, torch.Tensor, type, types.FunctionType,
                                                    types.MethodType, types.BuiltinFunctionType, tuple, list, dict,
                                                    set, frozenset)))


def _fields(obj) -> tuple:
    """The values of ``obj``'s own attributes: its ``__dict__`` and its ``__slots__``."""
    d = getattr(obj, "__dict__", None)
    out = tuple(d.values()) if d is not None else ()
    for cls in type(obj).__mro__:
        for name in cls.__dict__.get("__slots__", ()):
            if name not in ("__dict__", "__weakref__"):
                out += (getattr(obj, name, _fields),)  # (a sentinel for an unset slot)
    return out


def _getter(keys: tuple):
    """``getter(d)``: the values of ``keys`` in ``d`` as a tuple (a KeyError where one is missing)."""
    if len(keys) == 1:
        key = keys[0]
        return lambda d: (d[key],)
    return operator.itemgetter(*keys)


def _classes(types_) -> list:
    """Every class of ``types_``' MROs up to ``torch.nn.Module`` / ``object``, each once, in a fixed order."""
    seen, out = set(), []
    for t in types_:
        for cls in t.__mro__:
            if cls is torch.nn.Module or cls is object:
                break
            if cls not in seen:
                seen.add(cls)
                out.append(cls)
    return out


def _class_values(classes) -> list:
    return [tuple(vars(cls).values()) for cls in classes]


class _Attributes:
    """The instance attributes of a module tree (one level), and those of the plain objects held there."""

    def __init__(self, dicts: list):
        self.where = [i for i, d in enumerate(dicts) if not _BOOKKEEPING.issuperset(d)]
        self.getters = [_getter(tuple(k for k in dicts[i] if k not in _BOOKKEEPING)) for i in self.where]
        values = self._read(dicts)
        self.values = [tuple(map(_held, v)) for v in values]
        # (module, attribute) of each plain object a module holds, and that object's own attributes
        self.objects = [(m, a) for m, v in enumerate(values) for a, x in enumerate(v) if _is_object(x)]
        self.held = [values[m][a] for m, a in self.objects]  # (only to name their classes: not kept)
        self.fields = [tuple(map(_held, _fields(x))) for x in self.held]

    def _read(self, dicts: list) -> list:
        return list(map(_call, self.getters, [dicts[i] for i in self.where]))

    def difference(self, dicts: list) -> str | None:
        try:
            values = self._read(dicts)
            if self.values != values:
                return "a module's attribute changed (an attention processor, an activation, a flag, a forward...)"
            if self.fields != [_fields(values[m][a]) for m, a in self.objects]:
                return "an attribute of an object a module holds changed (an attention processor's...)"
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
            # a key renamed, or an attribute that answers == elementwise (an array): changed
            return "a module's attribute changed (an attention processor, an activation, a flag, a forward...)"
        return None


class ModelState:
    """A snapshot of what a capture of ``model`` depends on (see the module docstring)."""

    def __init__(self, model):
        modules = _modules(model)
        dicts = list(map(vars, modules))
        rows = _rows(modules, dicts)
        tensors = _tensors(rows)
        self._modules = [weakref.ref(m) for m in modules]
        self._types = list(map(type, modules))
        self._sizes = list(map(len, dicts))  # an instance attribute set or deleted changes one
        self._training = list(map(_first, rows))
        self._hooks = _hooks(rows)
        self._attributes = _Attributes(dicts)
        self._classes = _classes(self._types + [type(x) for x in self._attributes.held])
        self._attributes.held = None
        self._class_values = _class_values(self._classes)
        self._patches = [(i, _patch_state(d[_PATCH])) for i, d in enumerate(dicts) if _PATCH in d]
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
            return "a module's attributes changed (one set or deleted: an instance forward, an NCSN++ patch...)"
        rows = _rows(modules, dicts)
        if list(map(_first, rows)) != self._training:
            return "a training flag changed (train() / eval())"
        if _hooks(rows) != self._hooks:
            return "a forward hook was added or removed"
        why = self._attributes.difference(dicts)
        if why:
            return why
        if _class_values(self._classes) != self._class_values:
            return "a method or attribute of a module's class changed"
        if any(_patch_state(dicts[i][_PATCH]) != state for i, state in self._patches):
            return "an NCSN++ patch changed"
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
