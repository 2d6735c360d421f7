"""Low precision: the UNet in bfloat16 or float16 while the sampler's state stays float32; TF32.

Bits cannot match the reference here (it cannot even run a half-precision UNet: its float32 sample
meets half weights); this is the mode for people who want images fast. What is kept:

- the sampler state (x, x_hat, d, the returned sample) is float32, and every step's arithmetic is the
  float32 arithmetic of the exact path;
- the model is called with its input in the UNet's dtype, and its output is read in whatever float
  dtype it returns. The Triton kernels write the model input in that dtype and read the output in it
  (no extra pass); the torch and CUDA backends cast around the call (the same values: a float32 ->
  bfloat16/float16 cast rounds to nearest even everywhere);
- ``unet_dtype=None`` is the model's own parameter dtype: a model converted with
  ``.to(torch.bfloat16)`` runs natively. A low-precision ``unet_dtype`` for a float32 model runs its
  forward under ``torch.autocast`` (weights stay float32; matmuls and convolutions run in that dtype);
- ``tf32=True`` lets float32 matmuls and cuDNN convolutions use TF32 for the run (CUDA only; the switches
  are put back afterwards, also when the run fails, in whichever of torch's two APIs the process set them:
  ``fp32_precision`` and ``tf32_for_run`` below).

Accuracy against a float64 run is measured in ``bench/precision_check.py`` and guarded in
``tests/test_accuracy.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

UNET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How far from a float64 run a non-exact mode may land: YARDSTICK_FACTOR times as far as the plain PyTorch run in
# that precision (kve_fast.accuracy's yardstick; the benchmark's accuracy gate). flash-attention's rule (its tests
# assert `(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max()`, both against a higher-precision
# reference): two computations in the same dtype that round in different places have errors of the same size but
# not equal ones (each is a sum of many rounding errors), so the rule allows 2x. Applied to the mean and to the max
# over the batch. What it catches: test_yardstick_rejects_a_low_precision_state (a state kept in bf16/fp16 lands
# 10x further on the 300-step case).
YARDSTICK_FACTOR = 2.0
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``/``"half"``, ``"fp32"``/``"float32"`` (the CLI's names)."""
    try:
        return _NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: one of {sorted(_NAMES)}") from None


def check_unet_dtype(unet_dtype) -> torch.dtype | None:
    if unet_dtype is None:
        return None
    if not isinstance(unet_dtype, torch.dtype):
        raise TypeError(f"`unet_dtype` must be None or a torch.dtype, got {type(unet_dtype).__name__}")
    if unet_dtype not in UNET_DTYPES:
        raise ValueError(f"`unet_dtype` must be one of {UNET_DTYPES} (or None: the model's own), got {unet_dtype}")
    return unet_dtype


def check_tf32(tf32) -> bool:
    if not isinstance(tf32, bool):
        raise TypeError(f"`tf32` must be True or False, got {type(tf32).__name__}")
    return tf32


def model_dtype(model) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter, else of its first floating-point buffer
    (a model of constants, such as ``kve_fast.oracle``'s); float32 for a function or a module of neither."""
    if isinstance(model, torch.nn.Module):
        for tensors in (model.parameters(), model.buffers()):
            for t in tensors:
                if t.is_floating_point():
                    return t.dtype
    return torch.float32


@dataclass(frozen=True)
class Precision:
    """How a run calls its model: ``dtype`` (the model input's), ``autocast`` (the forward runs under
    ``torch.autocast(device, dtype)``), ``tf32``."""

    dtype: torch.dtype = torch.float32
    autocast: bool = False
    tf32: bool = False

    @property
    def exact(self) -> bool:
        """Float32 throughout, no TF32: the bit-exact path."""
        return self.dtype == torch.float32 and not self.tf32

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the model's input is written in: the UNet's, or float32 under autocast (which casts
        where it computes, and a model may also use its input in float32 ops)."""
        return torch.float32 if self.autocast else self.dtype

    def key(self) -> tuple:
        return (str(self.dtype), self.autocast, self.tf32)

    def call(self, model, device: torch.device):
        """``model`` wrapped: input cast to ``dtype`` (a no-op where it already is), forward under autocast if asked."""
        dtype, autocast = self.dtype, self.autocast

        def run(x, *args):
            if autocast:
                # no weight-cast cache: PyTorch's rule for autocast under CUDA-graph capture (a cast cached
                # outside the capture would be read by the graph after the context frees it); same values
                with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
                    return model(x, *args)  # x is float32 (input_dtype)
            return model(x if x.dtype == dtype else x.to(dtype), *args)

        return run

    def switches(self):
        """TF32 on for the run (and back as it was afterwards: ``tf32_for_run``); nothing without ``tf32``."""
        return tf32_for_run(True) if self.tf32 else contextlib.nullcontext()


def resolve(model, unet_dtype, tf32, device: torch.device) -> Precision:
    """Check ``unet_dtype`` and ``tf32`` and decide how ``model`` is called (see the module docstring)."""
    unet_dtype, tf32 = check_unet_dtype(unet_dtype), check_tf32(tf32)
    own = model_dtype(model)
    if unet_dtype is None or unet_dtype == own:
        dtype, autocast = own, False
    elif own == torch.float32:
        dtype, autocast = unet_dtype, True
    else:
        raise ValueError(f"`unet_dtype`={unet_dtype} but the model's parameters are {own}: convert the model "
                         f"(model.to({unet_dtype})) or leave `unet_dtype` None")
    if dtype not in UNET_DTYPES:
        raise ValueError(f"the model's parameters are {dtype}; kve_fast runs UNets in {UNET_DTYPES}")
    return Precision(dtype, autocast, tf32)


# -- torch's float32 precision switches ------------------------------------------------------------------------------
# torch keeps TF32 in two APIs. The legacy flags: ``torch.backends.cuda.matmul.allow_tf32`` (with
# ``torch.get_float32_matmul_precision()``) and ``torch.backends.cudnn.allow_tf32``. The new tree of
# ``fp32_precision`` values: ``torch.backends`` (generic) -> ``cuda`` / ``mkldnn`` -> ``matmul`` / ``conv`` /
# ``rnn``, "none" following the parent (``torch.backends.cudnn`` is the tree's ``cuda`` node). A write of either
# never raises, and a legacy write sets the tree too; but once the tree was set apart from the legacy flags, torch
# refuses to read a legacy flag that disagrees with it (RuntimeError: "a mix of the legacy and new APIs"; torch 2.13):
# cudnn.allow_tf32 unless cuda's conv, its rnn and the legacy flag agree; cuda.matmul.allow_tf32 unless cuda's matmul
# is "tf32" exactly when get_float32_matmul_precision() is not "highest"; get_float32_matmul_precision() likewise,
# also against mkldnn's matmul. The tree always reads: it is what the kernels use, so it decides what TF32 is on.

FP32_NODES = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
              ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))  # parents first
MIXED = "unreadable (legacy and new APIs mixed)"
_LEGACY = (("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
           ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
           ("float32_matmul_precision", torch.get_float32_matmul_precision))


def _node(backend: str, op: str) -> str:
    return torch._C._get_fp32_precision_getter(backend, op)


def _set_node(backend: str, op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter(backend, op, value)


def _legacy(read):
    """A legacy flag's value, or ``MIXED`` where torch refuses to read it."""
    try:
        return read()
    except RuntimeError as exc:
        if "legacy and new APIs" not in str(exc):
            raise
        return MIXED


@dataclass(frozen=True)
class Fp32Precision:
    """torch's float32 precision switches as the process left them (``fp32_precision()``)."""

    matmul_tf32: bool  # CUDA float32 matmuls (cuBLAS) may use TF32
    cudnn_tf32: bool  # cuDNN float32 convolutions may use TF32
    switches: tuple  # (name, value) of every switch of both APIs; a legacy flag torch refuses to read: MIXED


_DEVICE_NODES = {  # the tree's nodes that reach a device kind's kernels, named as generate's record names them
    "cpu": {"all": ("generic", "all"), "mkldnn": ("mkldnn", "all"), "mkldnn.matmul": ("mkldnn", "matmul"),
            "mkldnn.conv": ("mkldnn", "conv"), "mkldnn.rnn": ("mkldnn", "rnn")},
    "cuda": {"all": ("generic", "all"), "cuda": ("cuda", "all"), "cuda.matmul": ("cuda", "matmul"),
             "cudnn.conv": ("cuda", "conv"), "cudnn.rnn": ("cuda", "rnn")},
}


def fp32_nodes(kind: str) -> dict:
    """The ``fp32_precision`` tree's values that reach ``kind``'s kernels ('cpu': oneDNN, 'cuda': cuBLAS and
    cuDNN; another kind: none): what a record of the bits a run depends on holds."""
    return {name: _node(*node) for name, node in _DEVICE_NODES.get(kind, {}).items()}


def fp32_precision() -> Fp32Precision:
    """Read torch's float32 precision switches in whichever API the process set them, without ever raising
    torch's "mix of the legacy and new APIs" error (see the comment above). A flip of TF32 by either API
    changes ``switches``; ``matmul_tf32`` and ``cudnn_tf32`` are what the kernels use (the tree's values)."""
    nodes = tuple((f"fp32_precision {b}.{op}", _node(b, op)) for b, op in FP32_NODES)
    legacy = tuple((name, _legacy(read)) for name, read in _LEGACY)
    return Fp32Precision(_node("cuda", "matmul") == "tf32", _node("cuda", "conv") == "tf32", legacy + nodes)


@contextlib.contextmanager
def tf32_for_run(on: bool = True):
    """TF32 ``on`` (or off) for CUDA float32 matmuls and cuDNN convolutions inside the block; afterwards (also
    after an exception) every switch reads as before (``fp32_precision().switches``). A switch already as asked is
    not touched. One that torch still reads the legacy way (the process set it that way, or never) is set through
    its legacy flag; one it would refuse to read that way (the process used ``fp32_precision``) through the tree
    (cuda's ``matmul``, or its ``conv`` and ``rnn``), as is one the legacy flag leaves otherwise (a tree value
    following a parent set the other way). A legacy flag that torch read before reads inside the block too."""
    before = fp32_precision()
    try:
        _turn("matmul", on)
        _turn("conv", on)
        yield
    finally:
        _put_back(before)


def _turn(op: str, on: bool) -> None:
    """TF32 ``on`` or off for cuda's ``op`` ("matmul", or "conv" with cuDNN's RNNs as its legacy flag does), where
    it is not already."""
    if (_node("cuda", op) == "tf32") == on:
        return
    holder = torch.backends.cuda.matmul if op == "matmul" else torch.backends.cudnn
    if _legacy(lambda: holder.allow_tf32) != MIXED:
        holder.allow_tf32 = on
    if (_node("cuda", op) == "tf32") != on:
        for node in (op,) if op == "matmul" else ("conv", "rnn"):
            _set_node("cuda", node, "tf32" if on else "ieee")


# the legacy setters, each with the reads it changes and the values to try where torch refused to read it before
_LEGACY_SETTERS = ((("cudnn.allow_tf32",), lambda v: setattr(torch.backends.cudnn, "allow_tf32", v), (True, False)),
                   (("float32_matmul_precision", "cuda.matmul.allow_tf32"), torch.set_float32_matmul_precision,
                    ("highest", "high", "medium")))


def _put_back(before: Fp32Precision) -> None:
    """Make every switch read as in ``before``: the tree's values, then a legacy flag that reads otherwise through
    its setter (which writes the tree too, so the tree again after it). A legacy flag torch refused to read is put
    back to the value that makes it refuse again (the first of its values that does). torch has no setter for a
    tree value's untouched default, so a value may come back set explicitly where it followed its parent."""
    was = dict(before.switches)
    _put_back_tree(was)
    for names, setter, values in _LEGACY_SETTERS:
        now = dict(fp32_precision().switches)
        if all(now[n] == was[n] for n in names):
            continue
        for value in values if was[names[0]] == MIXED else (was[names[0]],):
            setter(value)
            _put_back_tree(was)
            now = dict(fp32_precision().switches)
            if all(now[n] == was[n] for n in names):
                break


def _put_back_tree(was: dict) -> None:
    """Each tree value that differs from ``was``: "none" where following its parent gives it back, else itself."""
    for backend, op in FP32_NODES:
        value = was[f"fp32_precision {backend}.{op}"]
        if _node(backend, op) != value:
            _set_node(backend, op, "none")
            if _node(backend, op) != value:
                _set_node(backend, op, value)
