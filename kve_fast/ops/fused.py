"""The host side both fused GPU backends share: input checks, the public ops, the step backend class.

The kernels live in ``step_triton.py`` (Triton) and ``csrc/`` (the CUDA C++ extension, ``step_cuda.py``);
each module has launchers with the same contracts (``_launch_churn``, ``_launch_euler``,
``_launch_heun``), and everything here takes the module to launch with. This module imports neither
Triton nor the extension, so the CUDA backend works without Triton.
"""

from __future__ import annotations

import functools

import torch

from ..images import to_image
from ..noise import StepKeys
from ..plan import _f32, churn_coefficient, euler_scalars, heun_scalars

MAX_ELEMENTS = 2**31 - 1024  # int32 offsets and Philox counters in both kernel sets
_MAX_ELEMENTS = MAX_ELEMENTS


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"`{name}` must be float32, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"`{name}` is on {t.device}, expected {like.device}")
    if t.numel() > _MAX_ELEMENTS:
        raise ValueError(f"`{name}` has {t.numel()} elements; the kernels index with int32 (at most {_MAX_ELEMENTS})")
    return t.contiguous()


# Public ops: check inputs (wrong dtype or device is an error; non-contiguous inputs are copied), compute
# the reference's scalars on the host, launch with ``launch``'s launchers.


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
    return launch._launch_churn(sample, eps, seed, _f32(s_noise), churn_coefficient(sigma, sigma_hat))


def euler(raw, sample_hat, sigma_hat, sigma_prev, want_input=True, want_derivative=True,
          want_pred=False, image: str | None = None, *, launch):
    """Lines 7-8 from the raw model output (scaled by sigma_hat / 2 here, as the reference does).

    Returns ``(sample_prev, derivative, model_input, pred, image)`` with None for what was not asked.
    ``image``: None, ``"float"`` ((x / 2 + 0.5).clamp(0, 1), BCHW) or ``"uint8"`` (BHWC, rounded as PIL).
    """
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    if image not in (None, "float", "uint8"):
        raise ValueError(f"`image` must be None, 'float' or 'uint8', got {image!r}")
    if image is not None and sample_hat.dim() != 4:
        raise ValueError("`image` output needs a BCHW `sample_hat`")
    return launch._launch_euler(raw, sample_hat, euler_scalars(sigma_hat, sigma_prev), want_input, want_derivative,
                         want_pred, image)


def heun(raw, sample_hat, sample_prev, derivative, sigma_hat, sigma_prev, want_sample=True, want_pred=False,
         next_churn: tuple | None = None, *, launch):
    """Lines 9-11, optionally fused with the next step's churn.

    ``next_churn`` is ``(eps, s_noise, sigma_next, sigma_hat_next, seed)`` (eps None for device noise;
    ``seed`` as in ``churn``).
    Returns ``(sample, pred, sample_hat_next, model_input_next)`` with None for what was not asked.
    """
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    sample_prev = _check("sample_prev", sample_prev, sample_hat)
    derivative = _check("derivative", derivative, sample_hat)
    churn_next = None
    if next_churn is not None:
        eps, s_noise, sigma_n, sigma_hat_n, seed = next_churn
        if eps is None:
            seed = _check_seed(seed, sample_hat)
        eps = None if eps is None else _check("eps", eps, sample_hat)
        churn_next = (eps, seed, _f32(s_noise), churn_coefficient(sigma_n, sigma_hat_n))
    return launch._launch_heun(raw, sample_hat, sample_prev, derivative, heun_scalars(sigma_hat, sigma_prev),
                        want_sample, want_pred, churn_next)




def euler_outputs(hat, want_input: bool, want_derivative: bool, want_pred: bool, image, out=None):
    """The Euler launchers' outputs ``(prev, d, xin, pred, img)``: the ``out`` buffers ``(prev, d, xin)`` or
    new tensors, None for what is not wanted; ``img`` BCHW float or BHWC uint8 for ``image``."""
    if out is not None:
        prev, d, xin = out
        d, xin = (d if want_derivative else None), (xin if want_input else None)
    else:
        prev = torch.empty_like(hat)
        d = torch.empty_like(hat) if want_derivative else None
        xin = torch.empty_like(hat) if want_input else None
    pred = torch.empty_like(hat) if want_pred else None
    img = None
    if image is not None:
        b, channels, h, w = hat.shape
        img = (torch.empty_like(hat) if image == "float"
               else torch.empty((b, h, w, channels), dtype=torch.uint8, device=hat.device))
    return prev, d, xin, pred, img

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
    (``step_triton``) and ``CudaStep`` (``step_cuda``, the CUDA C++ extension).

    ``denoiser=False``: the reference pipeline's convention (a score model called at ``(x + 1) / 2``,
    scalars from ``kve_fast.plan.Step``, division as torch does it on the device). ``denoiser=True``:
    k-diffusion's (a denoiser called at x_hat, scalars from ``kve_fast.plan.KStep``, true division).

    Noise arrives from the sampler's noise source as a tensor (exact mode) or per-sample keys (fast mode,
    ``kve_fast.noise.StepKeys``; an int seed keys the whole batch).
    The state the loop never hands out (x_hat, the model inputs, x_prev, d) lives in five buffers owned
    by this object and reused every step, so a step allocates nothing; what it hands out (the final
    sample or image, and what a callback sees) is always a new tensor. All tensors a kernel touches
    share one dense layout (``layout``, contiguous by default): the kernels index linearly.
    """

    name = "fused"
    launch = None  # the module with _launch_churn / _launch_euler / _launch_heun
    # The dtypes the kernels write model inputs in and read model outputs in (others are cast around them)
    model_dtypes = (torch.float32,)

    def __init__(self, s_noise: float, want_pred: bool = False, shape=None, denoiser: bool = False,
                 layout: torch.Tensor | None = None, model_dtype: torch.dtype = torch.float32):
        if shape is not None:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            if numel > _MAX_ELEMENTS:  # the kernels index with int32: refuse rather than misread
                raise ValueError(f"`shape` {tuple(shape)} has {numel} elements; the {self.name} backend takes at most "
                                 f"{_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
        self.s_noise = _f32(s_noise)
        self.want_pred = want_pred
        self.denoiser = denoiser
        self._layout = layout
        self._buffers = None
        # the score model's input buffers are in the UNet's dtype where the kernels can write it
        self.model_dtype = model_dtype if model_dtype in self.model_dtypes and not denoiser else torch.float32

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the state's layout (a copy only when its strides differ)."""
        if self._layout is None:
            return t.contiguous()
        if t.stride() == self._layout.stride():
            return t
        return torch.empty_like(self._layout).copy_(t)

    @property
    def fuses_image(self) -> bool:
        """Whether the final image can be written by the last Euler kernel: the kernels map BCHW to a BHWC
        uint8 image by position, which holds for the contiguous layout only (else the engine converts the
        final sample with torch's ops: the same values, one pass more at the end)."""
        return self._layout is None or self._layout.is_contiguous()

    def _new(self, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty_like(like if self._layout is None else self._layout, dtype=dtype)

    def _raw(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's output as the kernels read it: its own dtype where they can, else float32; the state's layout."""
        if raw.dtype not in self.model_dtypes:
            raw = raw.float()
        return self._like(raw)

    def _buf(self, like: torch.Tensor):
        b = self._buffers
        if b is None or b[0].shape != like.shape or b[0].device != like.device:
            if like.numel() > _MAX_ELEMENTS:
                raise ValueError(f"`shape` {tuple(like.shape)} has {like.numel()} elements; the {self.name} backend "
                                 f"takes at most {_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
            dtypes = (torch.float32, self.model_dtype, torch.float32, torch.float32, self.model_dtype)
            if self._layout is None:
                b = [torch.empty(like.shape, dtype=dt, device=like.device) for dt in dtypes]
            else:
                b = [torch.empty_like(self._layout, dtype=dt) for dt in dtypes]
            self._buffers = b
        return b  # hat, xin (first model input), prev, d, xin2 (second model input)

    def _noise(self, noise):
        """``(eps, seed)`` for the launchers: a noise tensor in the state's layout, or device-noise keys."""
        if isinstance(noise, StepKeys):
            keys = noise.device
            if self._layout is not None and not self._layout.is_contiguous():
                # the kernels count positions in memory order: draw the noise contiguous (positions as in
                # any other layout), then copy it into the state's layout
                zero = torch.zeros(self._layout.shape, dtype=torch.float32, device=keys.device)
                eps = self.launch._launch_churn(zero, None, keys, 1.0, 1.0, store_xin=False)[0]  # 0 + 1 * (1 * z) = z
                return self._like(eps), None
            return None, keys
        return (None, int(noise)) if isinstance(noise, int) else (self._like(noise), None)

    def _euler_scalars(self, step):
        return (0.0, step.sigma_hat_f, 0.0, step.dt) if self.denoiser else step.euler

    def _heun_scalars(self, step):
        return (0.0, step.sigma_next_f, 0.0, step.dt) if self.denoiser else step.heun

    def churn(self, sample, noise, step, keep: bool = False):
        """Lines 5-6; returns ``(x_hat, model input)``. ``keep``: x_hat is handed out (a new tensor)."""
        sample = self._like(sample)
        if self.denoiser and step.churn is None:
            return sample, sample  # k-diffusion leaves x as it is where gamma = 0 (the noise is still drawn)
        eps, seed = self._noise(noise)
        b = self._buf(sample)
        out = None if not keep else (self._new(sample), None if self.denoiser else self._new(sample, self.model_dtype))
        hat, xin = self.launch._launch_churn(sample, eps, seed, self.s_noise, step.churn,
                                 out=out or (b[0], None if self.denoiser else b[1]), store_xin=not self.denoiser)
        return hat, hat if self.denoiser else xin

    def euler(self, raw, sample_hat, step, want_input: bool, want_derivative: bool = True,
              image: str | None = None, keep: bool = True):
        """``keep``: x_prev is handed out (the final sample, or a callback's): a new tensor, not a buffer."""
        b = self._buf(sample_hat)
        out = None if keep else (b[2], b[3], b[4])
        prev, d, xin, pred, img = self.launch._launch_euler(self._raw(raw), sample_hat, self._euler_scalars(step),
                                                want_input and not self.denoiser, want_derivative, self.want_pred,
                                                image, out=out, denoiser=self.denoiser)
        if self.denoiser and want_input:
            xin = prev  # a denoiser's second call takes x_prev itself
        return prev, d, pred, xin, img

    def heun(self, raw, sample_hat, sample_prev, derivative, step, next_step=None, noise_next=None):
        churn_next = None
        if next_step is not None:
            eps, seed = self._noise(noise_next)
            churn_next = (eps, seed, self.s_noise, next_step.churn)
        b = self._buf(sample_hat)
        x, pred, hat, xin = self.launch._launch_heun(self._raw(raw), sample_hat, sample_prev, derivative,
                                         self._heun_scalars(step), next_step is None, self.want_pred, churn_next,
                                         out=(b[0], b[1]), denoiser=self.denoiser)
        if next_step is None:
            return x, pred, None
        return x, pred, (hat, hat if self.denoiser else xin)

    def to_image(self, sample, kind: str):
        """The final image of a sample that a callback replaced (the fused Euler path did not run)."""
        return to_image(sample, kind)
