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
- ``tf32=True`` lets float32 matmuls and cuDNN convolutions use TF32 for the run (CUDA only; the two
  ``torch.backends`` switches are put back afterwards, also when the run fails).

Accuracy against a float64 run is measured in ``bench/precision_check.py`` and guarded in
``tests/test_precision.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

UNET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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

    @contextlib.contextmanager
    def switches(self):
        """TF32 on for the run (and back as it was afterwards); nothing without ``tf32``."""
        if not self.tf32:
            yield
            return
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


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
