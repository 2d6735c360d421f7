"""Device-resident FIR filters for diffusers' NCSN++ blocks, so the UNet can be captured in a CUDA graph.

diffusers' NCSN++ building blocks (``SkipDownBlock2D``, ``AttnSkipDownBlock2D``, ``SkipUpBlock2D``,
``AttnSkipUpBlock2D``) resample with FIR filters, and diffusers 0.42 builds each filter on the host
inside every forward: ``torch.tensor(kernel, dtype=torch.float32)``, normalised, then
``kernel.to(device=x.device, dtype=x.dtype)``. The places (diffusers 0.42.1)::

    FirUpsample2D._upsample_2d      models/upsampling.py:261    (each Skip up block's ``upsampler``)
    FirDownsample2D._downsample_2d  models/downsampling.py:217  (each Skip down block's ``downsamplers``)
    upsample_2d                     models/upsampling.py:502    via ResnetBlock2D(up=True, kernel="fir"):
                                                                ``self.upsample = lambda x: upsample_2d(...)``
                                                                (models/resnet.py:292; ``resnet_up``)
    downsample_2d                   models/downsampling.py:386  via ResnetBlock2D(down=True, kernel="fir")
                                                                (models/resnet.py:300; ``resnet_down``)

(the same lambdas in models/unets/unet_dreamlite.py:204/212 are recognised too). On CUDA that is a
pageable host->device copy per block per forward, and it makes CUDA-graph capture fail ("Cannot copy
between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned").

``make_capturable(model)`` patches one model INSTANCE: on each such module it replaces the helper that
builds the filter (``_upsample_2d`` / ``_downsample_2d`` as an instance attribute, the ``upsample`` /
``downsample`` lambda of a FIR ``ResnetBlock2D``) by one that takes the filter from a cache on the
module, built once per (kernel, factor, gain, device, dtype): on a miss it is built exactly as
diffusers builds it (the same float32 ``torch.tensor`` / ``torch.outer`` / ``/= torch.sum`` /
``* gain`` steps, in the same order, then the same ``.to(device, dtype)``), and every tensor op after
that is diffusers' own (``upfirdn2d_native``, ``conv_transpose2d``, ``conv2d`` with the same
arguments). Outputs are therefore bit-identical to the unpatched model's, in every dtype and on every
device. The modules' ``forward`` is left alone (so forward hooks and wrappers such as accelerate's
keep working), and neither diffusers' classes nor its module functions are touched: other models in
the process are unaffected. The cache is a plain attribute, not a buffer: ``state_dict()`` and
``save_pretrained`` are unchanged, and after ``.to(device/dtype)`` the next forward builds (once) the
filter for the new device and dtype. ``make_capturable`` also builds the filters for the model's
current parameter device and dtype right away, so a capture after it needs no warm-up forward for
them (a capture that still misses the cache raises a clear error instead of a failed copy).

``restore(model)`` undoes the patch; ``needs_patch(model)`` says whether some module of ``model``
still builds a host filter in its forward (what a graph runner asks before capturing).

Other host work in an NCSN++ ``UNet2DModel.forward`` (diffusers 0.42.1) is not patched here; see
``GRAPH_CAPTURE_NOTES``.

Fast mode for one call (not bit-exact): ``with fast_fir():`` makes the modules ``make_capturable``
patched run their ``upfirdn2d`` on the Triton kernel in this thread only (a context variable), leaving the
model as it is: the sampler's fast modes use this, so an exact call on the same model in another thread
keeps diffusers' bits. Fast mode for good: ``make_fast(model)`` makes the same modules run their ``upfirdn2d`` as one
Triton launch (``kve_fast.ops.fir_triton``: a direct sum of products in float32 instead of diffusers'
zero-stuffing, padding and ``F.conv2d``) with the same cached device filter, and ``restore_fast(model)``
undoes it. Intended use: only in the sampler's fast mode / low precision, never in exact mode (float32
parity with diffusers needs diffusers' own ops and bits; each fast FIR output may differ from diffusers'
by a few float32 roundings, see fir_triton's docstring for the bound). The patch is the same per-instance
mechanism as ``make_capturable`` (the same helpers and lambdas replaced, forwards untouched), with one
flag per module deciding which op runs, so the two compose in either order: a fast module needs no host
filter (it is capturable too: ``needs_patch`` is False for it), ``restore`` undoes only
``make_capturable`` (a module made fast stays fast) and ``restore_fast`` only ``make_fast`` (a module made
capturable stays capturable, bit-identical to diffusers); a module returns to diffusers' own code when
both are undone. In fast mode, a call the kernel does not take (a float64 input, a CPU tensor when Triton
runs only on CUDA, a filter over 16 taps, an input that requires grad: the kernel has no backward) runs
diffusers' ``upfirdn2d_native`` as before. Where Triton
cannot run at all (no CUDA device and no ``TRITON_INTERPRET=1``, or Triton missing), ``make_fast`` patches
nothing and warns once: there is no torch re-implementation of the op here.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import types
import warnings

import torch
import torch.nn.functional as F

from ._warn import warn_once

__all__ = ["make_capturable", "restore", "needs_patch", "make_fast", "restore_fast", "is_fast", "fast_fir",
           "GRAPH_CAPTURE_NOTES"]

GRAPH_CAPTURE_NOTES = """\
Host work left in diffusers 0.42.1's UNet2DModel.forward for NCSN++ configs (not patched here):
- models/unets/unet_2d.py:280: a timestep that is not a tensor becomes
  torch.tensor([timestep], dtype=torch.long, device=...): a host->device copy (and a Python float
  sigma is truncated to an integer). Pass a tensor.
- models/unets/unet_2d.py:282: a 0-d timestep tensor is moved with .to(sample.device): a
  host->device copy when it lives on the CPU (kve_fast's sampler passes 0-d float32 CPU tensors, as
  diffusers' pipeline does). For capture, pass a 0-d tensor already on the device (a static input
  whose value is copied in before each replay).
- models/unets/unet_2d.py:285: torch.ones(batch, device=timesteps.device): a device fill, capturable.
- models/embeddings.py:1114-1116 (GaussianFourierProjection): torch.log and multiplications by
  Python floats only: capturable.
- Python-only work every call (no sync, but CPU time a graph saves): self.dtype walks the parameters
  (unet_2d.py:292), Attention.forward inspects the processor's signature
  (attention_processor.py:596), ``shape[0] >= 64`` check in ResnetBlock2D (resnet.py:331).
No .item(), .cpu() or branch on a tensor's value is reached by these configs.
"""

_RECORD = "_kve_ncsnpp_patch"  # instance attribute of a patched module: what was replaced, and the cache
_LOCK = threading.RLock()  # patching and restoring one model from several threads
# fast mode for this thread's calls only (``fast_fir``): patched modules run the Triton kernel
_FAST_HERE = contextvars.ContextVar("kve_fast_ncsnpp_fast_fir", default=False)
_HELPERS = {"up": "_upsample_2d", "down": "_downsample_2d"}
_LAMBDA_ATTRS = {"upsample": "upsample_2d", "downsample": "downsample_2d"}


def _diffusers():
    from diffusers.models import downsampling, upsampling

    return upsampling, downsampling


def _freeze(value):
    """A hashable key for a kernel / gain argument that tells apart every value ``torch.tensor`` could
    read differently (types included); ``None`` when there is none (a tensor, an array...)."""
    if value is None or type(value) in (int, float, bool):
        return (type(value), value)
    if type(value) in (tuple, list):
        items = tuple(_freeze(v) for v in value)
        return None if any(i is None for i in items) else (type(value), items)
    return None


def _host_filter(kernel, factor: int, gain, up: bool) -> torch.Tensor:
    """The filter exactly as diffusers builds it (upsampling.py:257-266 and 499-507,
    downsampling.py:213-222 and 383-391): the same float32 ops in the same order."""
    if kernel is None:
        kernel = [1] * factor
    kernel = torch.tensor(kernel, dtype=torch.float32)
    if kernel.ndim == 1:
        kernel = torch.outer(kernel, kernel)
    kernel /= torch.sum(kernel)
    if up:
        return kernel * (gain * (factor**2))
    return kernel * gain


class _Patch:
    """What ``make_capturable`` / ``make_fast`` replaced on one module, that module's filter cache, and
    which of the two asked for the patch (it is removed when neither does any more)."""

    __slots__ = ("kind", "originals", "lambda_kernels", "filters", "capturable", "fast", "__weakref__")

    def __init__(self, kind: str, capturable: bool = True, fast: bool = False):
        self.kind = kind  # "up", "down" (FirUpsample2D / FirDownsample2D) or "resnet"
        self.originals: dict = {}  # attribute -> original value (lambdas), or absent (helpers)
        self.lambda_kernels: dict = {}  # "upsample"/"downsample" -> the lambda's fir_kernel
        self.filters: dict = {}  # (kernel key, factor, gain key, up, device, dtype) -> device tensor
        self.capturable = capturable  # make_capturable asked for it (restore clears it)
        self.fast = fast  # make_fast asked for it: upfirdn2d runs the Triton kernel (restore_fast clears it)

    def filter(self, kernel, factor: int, gain, up: bool, device: torch.device, dtype: torch.dtype):
        """The filter on ``device`` in ``dtype``; ``None`` when the arguments cannot be cached."""
        kkey, gkey = _freeze(kernel), _freeze(gain)
        if kkey is None or gkey is None:
            return None
        key = (kkey, factor, gkey, up, device, dtype)
        found = self.filters.get(key)
        if found is None:
            found = self.filters[key] = _build(kernel, factor, gain, up, device, dtype)
        return found


def _build(kernel, factor, gain, up, device, dtype) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"kve_fast.ncsnpp: no FIR filter cached for {device} / {dtype} during CUDA-graph capture; run one "
            "eager forward on that device and dtype before capturing (or call make_capturable after .to())")
    # A plain tensor (not an inference tensor, no autograd history), whatever mode the forward runs in.
    with torch.inference_mode(False), torch.no_grad():
        return _host_filter(kernel, factor, gain, up).to(device=device, dtype=dtype)


# --- the replacements ------------------------------------------------------------------------------
# Each mirrors diffusers 0.42.1's function line by line, except that the filter comes from the cache and
# that in fast mode ``_upfirdn2d`` runs the Triton kernel instead of diffusers' ``upfirdn2d_native``.



def _locked(fn):
    """``fn`` under the module's lock: two threads patching one model never interleave."""
    import functools

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _LOCK:
            return fn(*args, **kwargs)

    return locked


@contextlib.contextmanager
def fast_fir(enabled: bool = True):
    """Within the block, in this thread only (a context variable), every module ``make_capturable`` patched
    runs its FIR resampling on the Triton kernel, as ``make_fast`` would make it, without changing the
    model: a call in another thread on the same model keeps diffusers' ops and bits. Where Triton cannot
    run, nothing changes (the patched helpers then run ``upfirdn2d_native``; see ``_upfirdn2d``)."""
    if enabled:
        fir, why = _fast_backend()
        if fir is None:
            warn_once(("ncsnpp", "unavailable"), f"kve_fast.ncsnpp.fast_fir: not applied ({why}); diffusers' upfirdn2d_native "
                                      "keeps running")
            enabled = False
    token = _FAST_HERE.set(enabled)
    try:
        yield
    finally:
        _FAST_HERE.reset(token)


def _fast_backend():
    """``(kve_fast.ops.fir_triton, None)``, or ``(None, why)`` where Triton cannot run here."""
    try:
        from .ops import fir_triton
    except Exception as exc:  # Triton missing, or installed without what it needs
        return None, f"Triton does not import ({type(exc).__name__}: {exc})"
    if not fir_triton.can_run():
        return None, "no CUDA device and TRITON_INTERPRET is not 1"
    return fir_triton, None


def _upfirdn2d(patch: _Patch, native, x, filt, up=1, down=1, pad=(0, 0)):
    """``native(x, filt, up, down, pad)`` (diffusers' ``upfirdn2d_native``), or in fast mode the Triton
    kernel when it takes these arguments."""
    if patch.fast or _FAST_HERE.get():
        from .ops import fir_triton as fir  # imported by make_fast / fast_fir already

        if fir.supports(x, filt, up, down, pad):
            return fir.upfirdn2d(x, filt, up=up, down=down, pad=pad)
        if x.dtype in fir.DTYPES and x.device.type != "cuda":
            warn_once(("ncsnpp", "device", x.device.type), f"kve_fast.ncsnpp fast mode: FIR inputs on {x.device.type} run "
                                                  "diffusers' upfirdn2d_native (Triton kernels run on CUDA)")
    return native(x, filt, up=up, down=down, pad=pad)


def _upsample_2d(self, hidden_states, weight=None, kernel=None, factor=2, gain=1):
    """FirUpsample2D._upsample_2d (upsampling.py:222-314) with a cached filter."""
    patch = self.__dict__[_RECORD]
    upsampling, _ = _diffusers()
    assert isinstance(factor, int) and factor >= 1
    if _freeze(kernel) is None or _freeze(gain) is None:
        return type(self)._upsample_2d(self, hidden_states, weight, kernel, factor, gain)

    if self.use_conv:
        convH = weight.shape[2]
        convW = weight.shape[3]
        inC = weight.shape[1]

        stride = (factor, factor)
        output_shape = (
            (hidden_states.shape[2] - 1) * factor + convH,
            (hidden_states.shape[3] - 1) * factor + convW,
        )
        output_padding = (
            output_shape[0] - (hidden_states.shape[2] - 1) * stride[0] - convH,
            output_shape[1] - (hidden_states.shape[3] - 1) * stride[1] - convW,
        )
        assert output_padding[0] >= 0 and output_padding[1] >= 0
        num_groups = hidden_states.shape[1] // inC

        weight = torch.reshape(weight, (num_groups, -1, inC, convH, convW))
        weight = torch.flip(weight, dims=[3, 4]).permute(0, 2, 1, 3, 4)
        weight = torch.reshape(weight, (num_groups * inC, -1, convH, convW))

        inverse_conv = F.conv_transpose2d(
            hidden_states,
            weight,
            stride=stride,
            output_padding=output_padding,
            padding=0,
        )
        filt = patch.filter(kernel, factor, gain, True, inverse_conv.device, inverse_conv.dtype)
        pad_value = (filt.shape[0] - factor) - (convW - 1)
        output = _upfirdn2d(
            patch,
            upsampling.upfirdn2d_native,
            inverse_conv,
            filt,
            pad=((pad_value + 1) // 2 + factor - 1, pad_value // 2 + 1),
        )
    else:
        filt = patch.filter(kernel, factor, gain, True, hidden_states.device, hidden_states.dtype)
        pad_value = filt.shape[0] - factor
        output = _upfirdn2d(
            patch,
            upsampling.upfirdn2d_native,
            hidden_states,
            filt,
            up=factor,
            pad=((pad_value + 1) // 2 + factor - 1, pad_value // 2),
        )
    return output


def _downsample_2d(self, hidden_states, weight=None, kernel=None, factor=2, gain=1):
    """FirDownsample2D._downsample_2d (downsampling.py:179-242) with a cached filter."""
    patch = self.__dict__[_RECORD]
    _, downsampling = _diffusers()
    assert isinstance(factor, int) and factor >= 1
    if _freeze(kernel) is None or _freeze(gain) is None:
        return type(self)._downsample_2d(self, hidden_states, weight, kernel, factor, gain)

    filt = patch.filter(kernel, factor, gain, False, hidden_states.device, hidden_states.dtype)
    if self.use_conv:
        _, _, convH, convW = weight.shape
        pad_value = (filt.shape[0] - factor) + (convW - 1)
        stride_value = [factor, factor]
        upfirdn_input = _upfirdn2d(
            patch,
            downsampling.upfirdn2d_native,
            hidden_states,
            filt,
            pad=((pad_value + 1) // 2, pad_value // 2),
        )
        output = F.conv2d(upfirdn_input, weight, stride=stride_value, padding=0)
    else:
        pad_value = filt.shape[0] - factor
        output = _upfirdn2d(
            patch,
            downsampling.upfirdn2d_native,
            hidden_states,
            filt,
            down=factor,
            pad=((pad_value + 1) // 2, pad_value // 2),
        )
    return output


class _CachedResample:
    """Replaces ``lambda x: upsample_2d(x, kernel=fir_kernel)`` (or ``downsample_2d``) of a FIR
    ResnetBlock2D: upsampling.py:471-515 / downsampling.py:354-397 at factor 2, gain 1, cached filter."""

    __slots__ = ("patch", "up", "kernel")

    def __init__(self, patch: _Patch, up: bool, kernel):
        self.patch, self.up, self.kernel = patch, up, kernel

    def __call__(self, hidden_states):
        upsampling, downsampling = _diffusers()
        factor = 2
        filt = self.patch.filter(self.kernel, factor, 1, self.up, hidden_states.device, hidden_states.dtype)
        pad_value = filt.shape[0] - factor
        if self.up:
            return _upfirdn2d(self.patch, upsampling.upfirdn2d_native,
                              hidden_states, filt, up=factor, pad=((pad_value + 1) // 2 + factor - 1, pad_value // 2))
        return _upfirdn2d(self.patch, downsampling.upfirdn2d_native,
                          hidden_states, filt, down=factor, pad=((pad_value + 1) // 2, pad_value // 2))

    def __repr__(self) -> str:
        return f"<kve_fast cached FIR {'upsample_2d' if self.up else 'downsample_2d'}, kernel={self.kernel}>"


# --- finding the modules -------------------------------------------------------------------------

def _fir_lambda_kernel(fn, func_name: str):
    """``fir_kernel`` of diffusers' ``lambda x: <func_name>(x, kernel=fir_kernel)``; else ``None``."""
    if not isinstance(fn, types.FunctionType):
        return None
    upsampling, downsampling = _diffusers()
    target = upsampling.upsample_2d if func_name == "upsample_2d" else downsampling.downsample_2d
    code = fn.__code__
    if (code.co_names != (func_name,) or code.co_freevars != ("fir_kernel",) or code.co_argcount != 1
            or ("kernel",) not in code.co_consts or fn.__defaults__ or fn.__kwdefaults__
            or fn.__globals__.get(func_name) is not target):
        return None
    kernel = fn.__closure__[0].cell_contents
    return kernel if _freeze(kernel) is not None else None


def _mentions_host_filter(fn) -> bool:
    """A function attribute that calls diffusers' host-filter functions (recognised or not)."""
    if not isinstance(fn, types.FunctionType):
        return False
    return bool({"upsample_2d", "downsample_2d", "upfirdn2d_native"} & set(fn.__code__.co_names))


def _scan(model: torch.nn.Module):
    """``(patchable, unrecognised)``: ``(module, kind, lambda kernels)`` for each unpatched module this
    file can patch, and ``(name, why)`` for each module that builds host filters in a way it cannot."""
    upsampling, downsampling = _diffusers()
    fir = {"up": upsampling.FirUpsample2D, "down": downsampling.FirDownsample2D}
    patchable, unrecognised = [], []
    for name, module in model.named_modules():
        if _RECORD in module.__dict__:
            continue
        for kind, cls in fir.items():
            if isinstance(module, cls):
                helper = _HELPERS[kind]
                if (getattr(type(module), helper) is getattr(cls, helper) and type(module).forward is cls.forward
                        and helper not in module.__dict__):
                    patchable.append((module, kind, {}))
                else:
                    unrecognised.append((name or type(module).__name__,
                                         f"{type(module).__name__} with its own forward or {helper}"))
                break
        else:
            kernels, odd = {}, []
            for attr, func_name in _LAMBDA_ATTRS.items():
                fn = module.__dict__.get(attr)
                kernel = _fir_lambda_kernel(fn, func_name)
                if kernel is not None:
                    kernels[attr] = kernel
                elif _mentions_host_filter(fn):
                    odd.append(attr)
            for attr, fn in module.__dict__.items():
                if attr not in _LAMBDA_ATTRS and _mentions_host_filter(fn):
                    odd.append(attr)
            if odd:
                unrecognised.append((name or type(module).__name__,
                                     f"unrecognised host-filter function attribute(s) {odd}"))
            elif kernels:
                patchable.append((module, "resnet", kernels))
    return patchable, unrecognised


def _apply(module: torch.nn.Module, kind: str, kernels: dict, capturable: bool = True, fast: bool = False) -> _Patch:
    patch = _Patch(kind, capturable=capturable, fast=fast)
    patch.lambda_kernels = dict(kernels)
    if kind in _HELPERS:
        helper = _upsample_2d if kind == "up" else _downsample_2d
        object.__setattr__(module, _HELPERS[kind], types.MethodType(helper, module))
    else:
        for attr, kernel in kernels.items():
            patch.originals[attr] = module.__dict__[attr]
            object.__setattr__(module, attr, _CachedResample(patch, attr == "upsample", kernel))
    object.__setattr__(module, _RECORD, patch)
    return patch


def _prebuild(patch: _Patch, module: torch.nn.Module, targets) -> None:
    """Build the filters a forward at each (device, dtype) of ``targets`` will ask for."""
    for device, dtype in targets:
        if patch.kind in _HELPERS:
            kernel = module.fir_kernel
            if _freeze(kernel) is not None:
                patch.filter(kernel, 2, 1, patch.kind == "up", device, dtype)
        else:
            for attr, kernel in patch.lambda_kernels.items():
                patch.filter(kernel, 2, 1, attr == "upsample", device, dtype)


def _scan_checked(model, unrecognised_warning: str) -> list:
    """``_scan(model)``'s patchable modules; a TypeError for a non-module, a warning naming the modules it
    does not recognise."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    patchable, unrecognised = _scan(model)
    if unrecognised:
        warnings.warn(f"{unrecognised_warning}: {unrecognised}", RuntimeWarning, stacklevel=3)
    return patchable


@_locked
def make_capturable(model: torch.nn.Module) -> int:
    """Patch every module of ``model`` that builds a FIR filter on the host in its forward, so that it
    takes a device-resident cached copy instead (bit-identical outputs); return how many modules were
    patched now (0 on a second call). Only this instance is changed; ``restore`` undoes it.

    A module whose host-filter code this file does not recognise (a subclass with its own forward, an
    unknown lambda) is left alone with a warning, and ``needs_patch`` keeps returning True for it.
    Modules that ``make_fast`` patched are capturable already (not counted); ``restore`` then leaves
    them in fast mode.
    """
    patchable = _scan_checked(model, "kve_fast.ncsnpp: left unpatched (they still build FIR filters on the host in "
                                     "forward, which blocks CUDA-graph capture)")
    targets = _targets(model)
    for module, kind, kernels in patchable:
        _prebuild(_apply(module, kind, kernels), module, targets)
    for module, patch in _records(model):  # patched by make_fast only: now asked for by make_capturable too
        if not patch.capturable:
            patch.capturable = True
            _prebuild(patch, module, targets)
    return len(patchable)


def _targets(model: torch.nn.Module) -> set:
    return {(t.device, t.dtype) for t in model.parameters() if t.is_floating_point() and t.device.type != "meta"}


def _records(model: torch.nn.Module):
    return [(m, m.__dict__[_RECORD]) for m in model.modules() if _RECORD in m.__dict__]


def _remove(module: torch.nn.Module, patch: _Patch) -> None:
    """Put back what ``_apply`` replaced on ``module``."""
    if patch.kind in _HELPERS:
        module.__dict__.pop(_HELPERS[patch.kind], None)
    else:
        for attr, original in patch.originals.items():
            object.__setattr__(module, attr, original)
    del module.__dict__[_RECORD]


@_locked
def restore(model: torch.nn.Module) -> int:
    """Undo ``make_capturable`` on ``model``; return how many modules were restored. Modules that
    ``make_fast`` patched stay in fast mode (``restore_fast`` undoes that)."""
    count = 0
    for module, patch in _records(model):
        if patch.fast:  # make_fast's patch stays (and keeps the module capturable)
            count += patch.capturable
            patch.capturable = False
            continue
        _remove(module, patch)
        count += 1
    return count


def needs_patch(model: torch.nn.Module) -> bool:
    """Whether some module of ``model`` still builds a FIR filter on the host inside its forward (False
    for models without FIR blocks, and after ``make_capturable`` or ``make_fast`` patched them all)."""
    patchable, unrecognised = _scan(model)
    return bool(patchable or unrecognised)


# --- fast mode -------------------------------------------------------------------------------------

@_locked
def make_fast(model: torch.nn.Module) -> int:
    """Run the FIR resampling of ``model``'s NCSN++ blocks (``FirUpsample2D``, ``FirDownsample2D``, FIR
    ``ResnetBlock2D``) with the Triton kernel of ``kve_fast.ops.fir_triton`` instead of diffusers'
    ``upfirdn2d_native``; return how many modules were switched now (0 on a second call, and for models
    without FIR blocks). Only this instance is changed; ``restore_fast`` undoes it.

    Not bit-exact (each FIR output within a few float32 roundings of diffusers', see fir_triton): meant
    for the sampler's fast mode / low precision only, never for exact mode. The patched model is also
    CUDA-graph capturable (its filters are device-cached, built now for the model's device and dtype).
    Where Triton cannot run (no CUDA device and no ``TRITON_INTERPRET=1``, or no Triton), nothing is
    patched, diffusers' op keeps running, and a warning says so (once per process); the return is 0.
    """
    patchable = _scan_checked(model, "kve_fast.ncsnpp.make_fast: left on diffusers' ops (host-built FIR filters "
                                     "this file does not recognise)")
    records = _records(model)
    if not patchable and all(p.fast for _, p in records):
        return 0  # nothing to switch (no FIR blocks, or all fast already): no backend needed
    fir, why = _fast_backend()
    if fir is None:
        warn_once(("ncsnpp", "unavailable"), f"kve_fast.ncsnpp.make_fast: not applied ({why}); diffusers' upfirdn2d_native "
                                  "keeps running")
        return 0
    targets = _targets(model)
    count = 0
    for module, kind, kernels in patchable:
        _prebuild(_apply(module, kind, kernels, capturable=False, fast=True), module, targets)
        count += 1
    for _, patch in records:  # made capturable before: switch the same patch to fast mode
        if not patch.fast:
            patch.fast = True
            count += 1
    return count


@_locked
def restore_fast(model: torch.nn.Module) -> int:
    """Undo ``make_fast`` on ``model`` (diffusers' ``upfirdn2d_native`` runs again, bit-identical to the
    unpatched model); return how many modules were switched back. Modules that ``make_capturable`` also
    patched stay capturable; the others get diffusers' own code back."""
    count = 0
    for module, patch in _records(model):
        if not patch.fast:
            continue
        patch.fast = False
        count += 1
        if not patch.capturable:
            _remove(module, patch)
    return count


def is_fast(model: torch.nn.Module) -> bool:
    """Whether some module of ``model`` is in fast mode (``make_fast`` applied, not restored)."""
    return any(p.fast for _, p in _records(model))
