"""The host side both fused GPU backends share: input checks, the public ops, the step backend class.

The kernels live in ``step_triton.py`` (Triton) and ``csrc/`` (the CUDA C++ extension, ``step_cuda.py``);
each module has launchers with the same contracts (``_launch_churn``, ``_launch_euler``, ``_launch_heun``:
inputs, then keyword outputs, each a tensor to write or None for "not wanted"), and everything here takes
the module to launch with. This module imports neither Triton nor the extension, so the CUDA backend works
without Triton.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..convention import REFERENCE
from ..images import to_image
from ..noise import Draw, StepKeys
from ..plan import _f32, churn_coefficient, level_at
from ..stages import NEW

MAX_ELEMENTS = 2**31 - 1024  # int32 offsets and Philox counters in both kernel sets
_MAX_ELEMENTS = MAX_ELEMENTS


class NextChurn(NamedTuple):
    """The next step's lines 4-6, fused into a Heun launch: its noise (``eps``, or ``seed``: an int or
    per-sample keys), ``coef`` (``(c, S_noise)`` floats, or a device tensor ``[c, S_noise]``), where it writes
    x_hat (``hat``, which may be the Heun launch's own ``hat``: each element is read before the same program
    writes it) and the score model's input (``model_input``, or None), and whether it adds noise at all
    (``noise`` False: k-diffusion's gamma = 0, x_hat is the corrected sample itself)."""

    eps: torch.Tensor | None
    seed: object
    coef: object
    hat: torch.Tensor
    model_input: torch.Tensor | None
    noise: bool = True


def _validate(name: str, t: torch.Tensor, like: torch.Tensor | None = None, dtypes=(torch.float32,)) -> None:
    """A tensor argument of the kernels: one of ``dtypes``, ``like``'s shape and device, int32-indexable; else a
    TypeError or ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"`{name}` must be {names}, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"`{name}` is on {t.device}, expected {like.device}")
    if t.numel() > _MAX_ELEMENTS:
        raise ValueError(f"`{name}` has {t.numel()} elements; the kernels index with int32 (at most {_MAX_ELEMENTS})")


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 argument of the public ops (``_validate``), contiguous."""
    _validate(name, t, like)
    return t.contiguous()


def in_layout(t: torch.Tensor, layout: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` with ``layout``'s strides (the kernels index every tensor linearly): itself where they are the same,
    else a copy (in ``dtype``, by default ``t``'s own)."""
    if t.stride() == layout.stride():
        return t
    return torch.empty_like(layout, dtype=t.dtype if dtype is None else dtype).copy_(t)


# Public ops: check inputs (wrong dtype or device is an error; non-contiguous inputs are copied), compute
# the reference's scalars on the host, launch with ``launch``'s launchers. ``true_div``: divide by sigma
# truly, or multiply by its float32 reciprocal; None: as torch does with the reference's CPU scalars on
# the tensors' device (``kve_fast.convention.REFERENCE.true_division``).


def _check_seed(seed, sample: torch.Tensor):
    """An int seed, or per-sample keys: a 1-D int64 tensor on ``sample``'s device whose length divides its size."""
    if seed is None:
        raise ValueError("`seed` is required when `eps` is None (device noise)")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 1 or seed.numel() == 0:
            raise TypeError(f"`seed` as per-sample keys must be a 1-D int64 tensor, got {seed.dtype} "
                            f"{tuple(seed.shape)}")
        if seed.device != sample.device:
            raise ValueError(f"`seed` is on {seed.device}, expected {sample.device}")
        if sample.numel() % seed.numel():
            raise ValueError(f"`seed` has {seed.numel()} keys, which do not divide the sample's {sample.numel()} "
                             "elements into equal samples")
        return seed.contiguous()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int or a tensor of per-sample keys, got {type(seed).__name__}")
    return seed


def _true_div(true_div, t: torch.Tensor) -> bool:
    return REFERENCE.true_division(t.device) if true_div is None else bool(true_div)


def churn(sample, eps, s_noise, sigma, sigma_hat, seed: int | torch.Tensor | None = None, *, launch):
    """Lines 5-6. ``eps`` is unscaled noise, or None with ``seed`` for in-kernel Philox noise: an int (one
    key for the whole tensor) or a 1-D int64 device tensor of K per-sample keys (sample b, the b-th of K
    equal slices of the flattened sample, draws from key b alone, counted from the slice's start).

    Returns ``(sample_hat, model_input)``.
    """
    sample = _check("sample", sample)
    if eps is None:
        seed = _check_seed(seed, sample)
    eps = None if eps is None else _check("eps", eps, sample)
    hat, xin = torch.empty_like(sample), torch.empty_like(sample)
    launch._launch_churn(sample, eps, seed, (churn_coefficient(sigma, sigma_hat), _f32(s_noise)), hat=hat,
                         model_input=xin)
    return hat, xin


def euler(raw, sample_hat, sigma_hat, sigma_next, want_input=True, want_derivative=True,
          want_pred=False, image: str | None = None, *, true_div: bool | None = None, launch):
    """Lines 7-8 from the raw model output (scaled by sigma_hat / 2 here, as the reference does).

    Returns ``(sample_next, derivative, model_input, pred, image)`` with None for what was not asked.
    ``image``: None, ``"float"`` ((x / 2 + 0.5).clamp(0, 1), BCHW) or ``"uint8"`` (BHWC, rounded as PIL).
    """
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    if image not in (None, "float", "uint8"):
        raise ValueError(f"`image` must be None, 'float' or 'uint8', got {image!r}")
    if image is not None and sample_hat.dim() != 4:
        raise ValueError("`image` output needs a BCHW `sample_hat`")
    new = torch.empty_like
    out = (new(sample_hat), new(sample_hat) if want_derivative else None, new(sample_hat) if want_input else None,
           new(sample_hat) if want_pred else None, None if image is None else image_tensor(sample_hat, image))
    launch._launch_euler(raw, sample_hat, level_at(sigma_hat, sigma_hat, sigma_next), x_next=out[0], d=out[1],
                         model_input=out[2], denoised=out[3], image=out[4], image_kind=image, denoiser=False,
                         true_div=_true_div(true_div, sample_hat))
    return out


def heun(raw, sample_hat, sample_next, derivative, sigma_hat, sigma_next, want_sample=True, want_pred=False,
         next_churn: tuple | None = None, *, true_div: bool | None = None, launch):
    """Lines 9-11, optionally fused with the next step's churn.

    ``next_churn`` is ``(eps, s_noise, sigma_next_step, sigma_hat_next_step, seed)`` (eps None for device
    noise; ``seed`` as in ``churn``).
    Returns ``(sample, pred, sample_hat_next, model_input_next)`` with None for what was not asked.
    """
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    sample_next = _check("sample_next", sample_next, sample_hat)
    derivative = _check("derivative", derivative, sample_hat)
    then = None
    if next_churn is not None:
        eps, s_noise, sigma_n, sigma_hat_n, seed = next_churn
        if eps is None:
            seed = _check_seed(seed, sample_hat)
        eps = None if eps is None else _check("eps", eps, sample_hat)
        then = NextChurn(eps, seed, (churn_coefficient(sigma_n, sigma_hat_n), _f32(s_noise)),
                         torch.empty_like(sample_hat), torch.empty_like(sample_hat))
    x = torch.empty_like(sample_hat) if want_sample else None
    pred = torch.empty_like(sample_hat) if want_pred else None
    launch._launch_heun(raw, sample_hat, sample_next, derivative, level_at(sigma_next, sigma_hat, sigma_next), x=x,
                        denoised=pred, then=then, denoiser=False, true_div=_true_div(true_div, sample_hat))
    return x, pred, None if then is None else then.hat, None if then is None else then.model_input


def image_tensor(like: torch.Tensor, kind: str) -> torch.Tensor:
    """A new image tensor for ``like`` (BCHW): float32 BCHW for ``"float"``, uint8 BHWC for ``"uint8"``."""
    if kind == "float":
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    b, channels, h, w = like.shape
    return torch.empty((b, h, w, channels), dtype=torch.uint8, device=like.device)


def bind_ops(launch):
    """``(churn, euler, heun)``: the public ops above, launching with ``launch``'s kernels."""
    bound = []
    for op in (churn, euler, heun):
        fn = functools.partial(op, launch=launch)
        functools.update_wrapper(fn, op)
        bound.append(fn)
    return tuple(bound)


class FusedStep:
    """A fused step backend: two launches per Heun step in steady state (``step_triton``'s docstring).

    Subclasses name the module whose launchers run the kernels (``launch``): ``TritonStep``
    (``step_triton``) and ``CudaStep`` (``step_cuda``, the CUDA C++ extension). The stages of
    ``kve_fast.stages`` call ``churn``, ``euler`` and ``heun`` with the step's values (floats, or device
    tensors in a CUDA graph) and, for each output, a tensor to write, ``NEW`` or None.

    ``convention`` (``kve_fast.convention``) fixes the kernels' arithmetic for the run: the score model's
    or the denoiser's, and true division or the float32 reciprocal on ``device``. ``layout``: a tensor whose
    dense layout every tensor the kernels touch shares (they index linearly), contiguous by default.
    ``model_dtype``: the dtype the kernels write a score model's inputs in (``model_dtypes``), else float32.
    The backend holds nothing of a call: a run's buffers are ``kve_fast.stages.Buffers``.
    """

    name = "fused"
    launch = None  # the module with _launch_churn / _launch_euler / _launch_heun
    # The model output dtypes the float32 kernels read as torch would promote them (a float64 output would
    # make the original's state float64: ``kve_fast.stages.StepContext.cannot_read``)
    reads = (torch.float32, torch.bfloat16, torch.float16)
    # The dtypes the kernels write model inputs in and read model outputs in (others are cast around them)
    model_dtypes = (torch.float32,)

    def __init__(self, convention, device: torch.device, shape=None, layout: torch.Tensor | None = None,
                 model_dtype: torch.dtype = torch.float32):
        if shape is not None:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            if numel > _MAX_ELEMENTS:  # the kernels index with int32: refuse rather than misread
                raise ValueError(f"`shape` {tuple(shape)} has {numel} elements; the {self.name} backend takes at most "
                                 f"{_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
        self.denoiser = convention.denoiser
        self.true_div = convention.true_division(torch.device(device))
        self.layout = layout
        self.model_dtype = model_dtype if model_dtype in self.model_dtypes and not self.denoiser else torch.float32

    @property
    def fuses_image(self) -> bool:
        """Whether the final image can be written by the last Euler kernel: the kernels map BCHW to a BHWC
        uint8 image by position, which holds for the contiguous layout only (else the final sample is
        converted with torch's ops: the same values, one pass more at the end)."""
        return self.layout is None or self.layout.is_contiguous()

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the state's layout (a copy only when its strides differ)."""
        if self.layout is None:
            return t.contiguous()
        return in_layout(t, self.layout, self.layout.dtype)

    def _new(self, like: torch.Tensor, target, dtype: torch.dtype = torch.float32):
        """``target``'s tensor: itself, a new one in the state's layout (``NEW``), or None."""
        if target is not NEW:
            return target
        return torch.empty_like(like if self.layout is None else self.layout, dtype=dtype)

    def _raw(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's output as the kernels read it: its own dtype where they can, else float32; the state's layout."""
        if raw.dtype not in self.model_dtypes:
            raw = raw.float()
        return self.like(raw)

    def _noise(self, noise, like: torch.Tensor | None = None):
        """``(eps, seed)`` for the launchers: a noise tensor in the state's layout, or device-noise keys
        (``StepKeys``, or the int64 key tensor of a graph); a ``Draw`` is drawn now, like ``like``."""
        if isinstance(noise, Draw):
            noise = noise.get(like)
        keys = noise.device if isinstance(noise, StepKeys) else noise if _is_keys(noise) else None
        if keys is None:
            return (None, int(noise)) if isinstance(noise, int) else (self.like(noise), None)
        if self.layout is not None and not self.layout.is_contiguous():
            # the kernels count positions in memory order: draw the noise contiguous (positions as in any
            # other layout), then copy it into the state's layout
            zero = torch.zeros(self.layout.shape, dtype=torch.float32, device=keys.device)
            eps = torch.empty_like(zero)
            self.launch._launch_churn(zero, None, keys, (1.0, 1.0), hat=eps)  # 0 + 1 * (1 * z) = z
            return self.like(eps), None
        return None, keys

    @staticmethod
    def _coef(values):
        """The churn's ``(c, S_noise)`` floats, or the device tensor ``[c, S_noise]`` of a graph."""
        return values.coef if values.s_noise is None else (values.coef, values.s_noise)

    @staticmethod
    def _level(values):
        return values.scalars if isinstance(values.scalars, torch.Tensor) else tuple(values.scalars)

    def churn(self, x, values, *, noise: bool, hat, model_input):
        """Lines 5-6 (``kve_fast.stages.Churn``); returns ``(hat, model_input)``."""
        x = self.like(x)
        eps, seed = self._noise(values.noise, x)  # drawn also where it adds nothing, as the originals draw it
        if not noise:  # x_hat is x itself (k-diffusion's gamma = 0): a copy only into a buffer
            return (x if hat is NEW else hat.copy_(x)), None
        hat = self._new(x, hat)
        model_input = self._new(x, model_input, self.model_dtype)
        self.launch._launch_churn(x, eps, seed, self._coef(values), hat=hat, model_input=model_input)
        return hat, model_input

    def euler(self, raw, hat, values, *, x_next, d, model_input, denoised, image):
        """Lines 7-8 (``kve_fast.stages.Euler``); ``image``: None or ``(kind, target)``. Returns
        ``(x_next, d, model_input, denoised, image)``."""
        x_next, d = self._new(hat, x_next), self._new(hat, d)
        model_input, denoised = self._new(hat, model_input, self.model_dtype), self._new(hat, denoised)
        kind = img = None
        if image is not None:
            kind, img = image
            img = image_tensor(hat, kind) if img is NEW else img
        self.launch._launch_euler(self._raw(raw), hat, self._level(values), x_next=x_next, d=d, model_input=model_input,
                                  denoised=denoised, image=img, image_kind=kind, denoiser=self.denoiser,
                                  true_div=self.true_div)
        return x_next, d, model_input, denoised, img

    def advance(self, hat, d, values, *, x_next):
        """Line 8 from a ``d`` computed earlier (``kve_fast.stages.Advance``): ``hat + d * dt``, torch's two ops
        (k-diffusion's expression; ``dt`` a float or the device slot of a graph)."""
        dt = values.scalars[3] if isinstance(values.scalars, torch.Tensor) else values.scalars.dt
        step = torch.mul(d, dt)
        return torch.add(hat, step) if x_next is NEW else torch.add(hat, step, out=x_next)

    def heun(self, raw, hat, x_next, d, values, *, x, denoised, then):
        """Lines 9-11 (``kve_fast.stages.Heun``), with ``then``: None or ``(ChurnValues, noise, hat target,
        model input target)`` of the next step's churn. Returns ``(x, denoised, hat_next, model_input_next)``."""
        x, denoised = self._new(hat, x), self._new(hat, denoised)
        fused = None
        if then is not None:
            values_next, noise, hat_next, input_next = then
            eps, seed = self._noise(values_next.noise, hat)  # drawn also where it adds nothing
            eps, seed = (eps, seed) if noise else (None, None)
            fused = NextChurn(eps, seed, self._coef(values_next) if noise else None, self._new(hat, hat_next),
                              self._new(hat, input_next, self.model_dtype), noise)
        self.launch._launch_heun(self._raw(raw), hat, x_next, d, self._level(values), x=x, denoised=denoised,
                                 then=fused, denoiser=self.denoiser, true_div=self.true_div)
        if fused is None:
            return x, denoised, None, None
        return x, denoised, fused.hat, fused.model_input

    def to_image(self, sample, kind: str):
        """The final image where the last Euler kernel did not write it."""
        return to_image(sample, kind)


def _is_keys(noise) -> bool:
    return isinstance(noise, torch.Tensor) and noise.dtype == torch.int64
