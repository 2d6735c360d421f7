"""Fused Triton step kernels, float32 state: two launches per Heun step in steady state.

Three kernels replace the reference's ~20 elementwise launches per step; the first step starts with
``churn``, and every later step's churn is fused into the previous step's ``heun`` launch, so a step
is ``euler`` + ``heun`` (one launch per step with ``solver="euler"``, or with a callback that must see
the sample between steps: then ``churn`` runs on its own):

- ``churn``: x_hat = x + c * (S_noise * eps), and the model input (x_hat + 1) / 2.
- ``euler``: from the raw model output, the derivative, x_prev and the next model input, or on the
  last step the final image (x / 2 + 0.5).clamp(0, 1) (float BCHW, or uint8 BHWC for PIL).
- ``heun``: the second-order correction, fused with the next step's churn.

Bit-exactness: each kernel performs the reference's float32 operations in the reference's order,
with scalars computed on the host exactly as the reference computes them. Kernels are launched with
``enable_fp_fusion=False`` (a contracted multiply-add rounds once, the reference rounds twice). The
reference divides by a CPU scalar differently per device: on CUDA torch multiplies by the host's
float32 reciprocal, on the CPU it divides; ``TRUE_DIV`` selects the CPU form (only reachable under
``TRITON_INTERPRET=1``), and Triton's own fp32 ``/`` (approximate on GPUs) is never used.

Noise: ``eps`` comes from a tensor (the reference's stream, "exact" mode) or, with ``DEVICE_NOISE``,
is generated in the kernel by Philox ("fast" mode): no noise tensor is written, read or copied. In
fast mode each sample has its own key per step (``KEYED``: an int64 array of B keys; each element
loads its sample's key, and its Philox counter is its position within the sample), so a sample's noise
does not depend on the batch around it. A single int seed (the public ops) keys the whole tensor,
counted by the global offset.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..images import to_image
from ..noise import StepKeys
from ..plan import _f32, churn_coefficient, euler_scalars, heun_scalars

_BLOCK = 1024
# Device noise: one Philox randn4x call per 4 elements (True) or tl.randn per element (False).
NOISE4 = True
# Per-sample keys, samples of at least a block: find each element's sample with one scalar division per
# program (True) or one division per element (False); the same values either way.
BIG_SAMPLES = True
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch options: no mul+add contraction into FMA, so each op rounds like torch's separate kernels.
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
_MAX_ELEMENTS = 2**31 - _BLOCK  # int32 offsets (and Philox counters)


@triton.jit
def _sample_of(i, start, size, BIG: tl.constexpr):
    # (sample index, position within it) of the indices i (a block from start on), samples of `size` each;
    # BIG: size >= the block's length, so the block spans at most two samples: one scalar division
    if BIG:
        b0 = start // size
        rel = i - b0 * size
        nxt = (rel >= size).to(tl.int32)
        b = b0 + nxt
        pos = rel - nxt * size
    else:
        b = i // size
        pos = i - b * size
    return b, pos


@triton.jit
def _block_randn(seed, keys_ptr, per_sample, n, pid, KEYED: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
                 NOISE4: tl.constexpr):
    # BLOCK standard normals for program pid (Philox, counter-based: a pure function of key and counter).
    if KEYED:
        # per-sample keys: element i belongs to sample i // per_sample and counts from the sample's start
        if NOISE4:
            # per_sample % 4 == 0 (checked by the launcher), so no group of 4 straddles two samples; the
            # group order within a block is the one below (z0, z2, z1, z3)
            Q: tl.constexpr = BLOCK // 4
            q = pid * Q + tl.arange(0, Q)
            b, pos = _sample_of(q, pid * Q, per_sample // 4, BIG)
            key = tl.load(keys_ptr + b, mask=q * 4 < n, other=0)
            z0, z1, z2, z3 = tl.randn4x(key, pos)
            z = tl.reshape(tl.join(tl.join(z0, z1), tl.join(z2, z3)), [BLOCK])
        else:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            b, pos = _sample_of(offs, pid * BLOCK, per_sample, BIG)
            key = tl.load(keys_ptr + b, mask=offs < n, other=0)
            z = tl.randn(key, pos)
    elif NOISE4:
        # one randn4x call per 4 elements, counter q: join(join(z0, z1), join(z2, z3)) is [Q, 2, 2] with
        # [q, i, k] = z_{i + 2k}[q], so elements 4q .. 4q + 3 take z0, z2, z1, z3 in that order
        Q: tl.constexpr = BLOCK // 4
        z0, z1, z2, z3 = tl.randn4x(seed, pid * Q + tl.arange(0, Q))
        z = tl.reshape(tl.join(tl.join(z0, z1), tl.join(z2, z3)), [BLOCK])
    else:
        z = tl.randn(seed, pid * BLOCK + tl.arange(0, BLOCK))
    return z


@triton.jit(do_not_specialize=["seed"])
def _churn_kernel(x_ptr, eps_ptr, hat_ptr, xin_ptr, n, seed, keys_ptr, per_sample, s_noise, c, cs_ptr,
                  SCAL_MEM: tl.constexpr, STORE_XIN: tl.constexpr, DEVICE_NOISE: tl.constexpr, KEYED: tl.constexpr,
                  BIG: tl.constexpr, NOISE4: tl.constexpr, BLOCK: tl.constexpr):
    if SCAL_MEM:
        # c and S_noise from device memory (a CUDA graph replays this launch for every step)
        c = tl.load(cs_ptr)
        s_noise = tl.load(cs_ptr + 1)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    _churn_store(x, eps_ptr, hat_ptr, xin_ptr, offs, mask, n, pid, seed, keys_ptr, per_sample, s_noise, c, True,
                 STORE_XIN, DEVICE_NOISE, KEYED, BIG, NOISE4, BLOCK)


@triton.jit
def _churn_store(x, eps_ptr, hat_ptr, xin_ptr, offs, mask, n, pid, seed, keys_ptr, per_sample, s_noise, c,
                 APPLY: tl.constexpr, STORE_XIN: tl.constexpr, DEVICE_NOISE: tl.constexpr, KEYED: tl.constexpr,
                 BIG: tl.constexpr, NOISE4: tl.constexpr, BLOCK: tl.constexpr):
    # eps = S_noise * N(0, 1) ; x_hat = x + c * eps (x_hat = x where k-diffusion skips gamma = 0) ;
    # model input (x_hat + 1) / 2 (the score convention; a denoiser takes x_hat itself)
    if APPLY:
        if DEVICE_NOISE:
            e = s_noise * _block_randn(seed, keys_ptr, per_sample, n, pid, KEYED, BIG, BLOCK, NOISE4)
        else:
            e = s_noise * tl.load(eps_ptr + offs, mask=mask)
        hat = x + c * e
    else:
        hat = x
    tl.store(hat_ptr + offs, hat, mask=mask)
    if STORE_XIN:
        tl.store(xin_ptr + offs, (hat + 1.0) * 0.5, mask=mask)


@triton.jit
def _divide(num, s, inv_s, TRUE_DIV: tl.constexpr):
    # num / s, as torch rounds it on the device the kernel runs on
    if TRUE_DIV:
        q = tl.div_rn(num, s)
    else:
        q = num * inv_s
    return q


@triton.jit
def _store_image(img_ptr, offs, mask, x, hw, C: tl.constexpr, TO_UINT8: tl.constexpr):
    # (x / 2 + 0.5).clamp(0, 1) ; for PIL: round(img * 255) as uint8, BCHW -> BHWC
    img = x * 0.5 + 0.5
    img = tl.minimum(tl.maximum(img, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    if TO_UINT8:
        v = img * 255.0
        v = (v + 8388608.0) - 8388608.0  # round half to even, exact for 0 <= v < 2**23
        b = offs // (C * hw)
        rem = offs - b * (C * hw)
        ch = rem // hw
        p = rem - ch * hw
        tl.store(img_ptr + (b * hw + p) * C + ch, v.to(tl.uint8), mask=mask)
    else:
        tl.store(img_ptr + offs, img, mask=mask)


@triton.jit
def _euler_kernel(raw_ptr, hat_ptr, prev_ptr, d_ptr, xin_ptr, pred_ptr, img_ptr, n, hw,
                  half_sigma_hat, sigma_hat, inv_sigma_hat, dt, sc_ptr, SCAL_MEM: tl.constexpr,
                  DENOISER: tl.constexpr, TRUE_DIV: tl.constexpr, STORE_D: tl.constexpr, STORE_XIN: tl.constexpr,
                  STORE_PRED: tl.constexpr, STORE_IMG: tl.constexpr, C: tl.constexpr,
                  TO_UINT8: tl.constexpr, BLOCK: tl.constexpr):
    if SCAL_MEM:
        half_sigma_hat = tl.load(sc_ptr)
        sigma_hat = tl.load(sc_ptr + 1)
        inv_sigma_hat = tl.load(sc_ptr + 2)
        dt = tl.load(sc_ptr + 3)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = tl.load(raw_ptr + offs, mask=mask)
    hat = tl.load(hat_ptr + offs, mask=mask)
    if DENOISER:
        # a denoiser returns D itself
        pred = raw
    else:
        # model_output = (sigma_hat / 2) * F ; D = x_hat + sigma_hat * model_output
        mo = half_sigma_hat * raw
        pred = hat + sigma_hat * mo
    # d = (x_hat - D) / sigma_hat ; x_prev = x_hat + (sigma_prev - sigma_hat) * d
    d = _divide(hat - pred, sigma_hat, inv_sigma_hat, TRUE_DIV)
    prev = hat + dt * d
    tl.store(prev_ptr + offs, prev, mask=mask)
    if STORE_D:
        tl.store(d_ptr + offs, d, mask=mask)
    if STORE_XIN:
        tl.store(xin_ptr + offs, (prev + 1.0) * 0.5, mask=mask)
    if STORE_PRED:
        tl.store(pred_ptr + offs, pred, mask=mask)
    if STORE_IMG:
        _store_image(img_ptr, offs, mask, prev, hw, C, TO_UINT8)


@triton.jit(do_not_specialize=["seed"])
def _heun_kernel(raw_ptr, hat_ptr, prev_ptr, d_ptr, x_ptr, pred_ptr, eps_ptr, hat_next_ptr, xin_ptr, n,
                 half_sigma_prev, sigma_prev, inv_sigma_prev, dt, seed, keys_ptr, per_sample, s_noise, c_next, sc_ptr,
                 cs_ptr, SCAL_MEM: tl.constexpr, DENOISER: tl.constexpr, TRUE_DIV: tl.constexpr, STORE_X: tl.constexpr,
                 STORE_PRED: tl.constexpr, CHURN: tl.constexpr, APPLY: tl.constexpr, DEVICE_NOISE: tl.constexpr,
                 KEYED: tl.constexpr, BIG: tl.constexpr, NOISE4: tl.constexpr, BLOCK: tl.constexpr):
    if SCAL_MEM:
        half_sigma_prev = tl.load(sc_ptr)
        sigma_prev = tl.load(sc_ptr + 1)
        inv_sigma_prev = tl.load(sc_ptr + 2)
        dt = tl.load(sc_ptr + 3)
        if CHURN:
            c_next = tl.load(cs_ptr)
            s_noise = tl.load(cs_ptr + 1)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = tl.load(raw_ptr + offs, mask=mask)
    hat = tl.load(hat_ptr + offs, mask=mask)
    prev = tl.load(prev_ptr + offs, mask=mask)
    d = tl.load(d_ptr + offs, mask=mask)
    if DENOISER:
        # D' is the denoiser's output ; d' = (x_prev - D') / sigma_prev ; x = x_hat + ((d + d') / 2) * dt
        pred = raw
        dc = _divide(prev - pred, sigma_prev, inv_sigma_prev, TRUE_DIV)
        x = hat + ((d + dc) * 0.5) * dt
    else:
        # model_output = (sigma_prev / 2) * F ; D' = x_prev + sigma_prev * model_output
        mo = half_sigma_prev * raw
        pred = prev + sigma_prev * mo
        # d' = (x_prev - D') / sigma_prev ; x = x_hat + (sigma_prev - sigma_hat) * (d / 2 + d' / 2)
        dc = _divide(prev - pred, sigma_prev, inv_sigma_prev, TRUE_DIV)
        x = hat + dt * (0.5 * d + 0.5 * dc)
    if STORE_X:
        tl.store(x_ptr + offs, x, mask=mask)
    if STORE_PRED:
        tl.store(pred_ptr + offs, pred, mask=mask)
    if CHURN:
        # the next step's lines 5-6
        _churn_store(x, eps_ptr, hat_next_ptr, xin_ptr, offs, mask, n, pid, seed, keys_ptr, per_sample, s_noise,
                     c_next, APPLY, not DENOISER, DEVICE_NOISE, KEYED, BIG, NOISE4, BLOCK)


# ----------------------------------------------------------------------------------------------------
# Host side: the reference's scalars, input checks, launches.


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


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def _true_div(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


# Launchers: no checks (callers pass contiguous float32 tensors of one shape); None for "not wanted".


def _scalar_args(scalars, count: int):
    """Floats as kernel arguments, or (for a device tensor) zeros and the tensor as the pointer to read them from."""
    if isinstance(scalars, torch.Tensor):
        return (0.0,) * count, scalars, True
    return tuple(scalars), None, False


def _seed_args(seed, n: int, dummy):
    """Kernel arguments ``(seed, keys_ptr, per_sample, KEYED, BIG, NOISE4)`` for device noise from ``seed``:
    an int (one key for the whole tensor, counted by the global offset) or an int64 device tensor of K
    per-sample keys (K divides ``n``; sample b is elements b * n / K onwards, counted from its start).
    BIG: samples at least a block long (a block spans at most two: one scalar division per program)."""
    if isinstance(seed, torch.Tensor):
        per_sample = n // seed.numel()
        noise4 = NOISE4 and per_sample % 4 == 0
        big = BIG_SAMPLES and per_sample >= _BLOCK
        return 0, seed, per_sample, True, big, noise4
    return seed or 0, dummy, 1, False, False, NOISE4


def _launch_churn(x, eps, seed, s_noise, c, out=None, store_xin: bool = True):
    """``store_xin``: also write the score model's input (x_hat + 1) / 2 (a denoiser takes x_hat).

    ``c`` is a float (with ``s_noise``), or a device tensor ``[c, s_noise]`` the kernel reads (graphs).
    ``seed`` (device noise, ``eps`` None): an int, or an int64 tensor of per-sample keys (``_seed_args``).
    """
    hat, xin = out if out is not None else (torch.empty_like(x), torch.empty_like(x) if store_xin else None)
    n = x.numel()
    (s_noise, c), cs, mem = _scalar_args(c, 2) if isinstance(c, torch.Tensor) else ((s_noise, c), None, False)
    seed, keys, per_sample, keyed, big, noise4 = _seed_args(seed, n, x)
    _churn_kernel[_grid(n)](x, x if eps is None else eps, hat, hat if xin is None else xin, n, seed, keys, per_sample,
                            s_noise, c, x if cs is None else cs, SCAL_MEM=mem, STORE_XIN=store_xin,
                            DEVICE_NOISE=eps is None, KEYED=keyed and eps is None, BIG=big, NOISE4=noise4,
                            BLOCK=_BLOCK, **_LAUNCH)
    return hat, (xin if store_xin else None)


def _launch_euler(raw, hat, scalars, want_input: bool, want_derivative: bool, want_pred: bool, image, out=None,
                  denoiser: bool = False):
    """``out``: optional ``(prev, d, xin)`` buffers to write instead of new tensors. ``denoiser``: ``raw``
    is D itself and the division is true division (k-diffusion divides by device tensors)."""
    n = hat.numel()
    if out is not None:
        prev, d, xin = out
        d, xin = (d if want_derivative else None), (xin if want_input else None)
    else:
        prev = torch.empty_like(hat)
        d = torch.empty_like(hat) if want_derivative else None
        xin = torch.empty_like(hat) if want_input else None
    pred = torch.empty_like(hat) if want_pred else None
    img, hw, channels = None, 1, 1
    if image is not None:
        b, channels, h, w = hat.shape
        hw = h * w
        img = (torch.empty_like(hat) if image == "float"
               else torch.empty((b, h, w, channels), dtype=torch.uint8, device=hat.device))
    scalars, sc, mem = _scalar_args(scalars, 4)
    _euler_kernel[_grid(n)](
        raw, hat, prev, prev if d is None else d, prev if xin is None else xin, prev if pred is None else pred,
        prev if img is None else img, n, hw, *scalars, hat if sc is None else sc, SCAL_MEM=mem,
        DENOISER=denoiser, TRUE_DIV=denoiser or _true_div(hat), STORE_D=want_derivative, STORE_XIN=want_input,
        STORE_PRED=want_pred, STORE_IMG=img is not None, C=channels, TO_UINT8=image == "uint8", BLOCK=_BLOCK,
        **_LAUNCH,
    )
    return prev, d, xin, pred, img


def _launch_heun(raw, hat, prev, d, scalars, want_sample: bool, want_pred: bool, churn_next, out=None,
                 denoiser: bool = False):
    """``churn_next``: None, or ``(eps or None, seed, s_noise, c)`` for the fused next-step churn (``c``
    None: k-diffusion's gamma = 0, the next x_hat is x itself; ``seed``: as in ``_launch_churn``).

    ``out``: optional ``(hat_next, xin)`` buffers for the churn outputs (``hat_next`` may be ``hat``:
    each element is read before it is written, by the same program). ``denoiser``: as in ``_launch_euler``.
    """
    n = hat.numel()
    x = torch.empty_like(hat) if want_sample else None
    pred = torch.empty_like(hat) if want_pred else None
    hat_next = xin = None
    eps, seed, s_noise, c = hat, 0, 0.0, 0.0
    if churn_next is not None:
        eps, seed, s_noise, c = churn_next
        hat_next, xin = out if out is not None else (torch.empty_like(hat), torch.empty_like(hat))
        xin = None if denoiser else xin
    apply = c is not None
    scalars, sc, mem = _scalar_args(scalars, 4)
    cs = c if isinstance(c, torch.Tensor) else None
    if churn_next is not None and mem != (cs is not None):
        raise ValueError("the step's scalars and the next churn's must both be floats or both device tensors")
    device_noise = churn_next is not None and apply and eps is None
    seed, keys, per_sample, keyed, big, noise4 = _seed_args(seed, n, hat)
    _heun_kernel[_grid(n)](
        raw, hat, prev, d, hat if x is None else x, hat if pred is None else pred, hat if eps is None else eps,
        hat if hat_next is None else hat_next, hat if xin is None else xin, n, *scalars, seed, keys, per_sample,
        0.0 if cs is not None else s_noise, c if apply and cs is None else 0.0, hat if sc is None else sc,
        hat if cs is None else cs, SCAL_MEM=mem, DENOISER=denoiser, TRUE_DIV=denoiser or _true_div(hat), STORE_X=want_sample,
        STORE_PRED=want_pred, CHURN=churn_next is not None, APPLY=apply, DEVICE_NOISE=device_noise,
        KEYED=keyed and device_noise, BIG=big, NOISE4=noise4, BLOCK=_BLOCK, **_LAUNCH,
    )
    return x, pred, hat_next, xin


# Public ops: check inputs (wrong dtype or device is an error; non-contiguous inputs are copied).


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


def churn(sample, eps, s_noise, sigma, sigma_hat, seed: int | torch.Tensor | None = None):
    """Lines 5-6. ``eps`` is unscaled noise, or None with ``seed`` for in-kernel Philox noise: an int (one
    key for the whole tensor) or a 1-D int64 device tensor of K per-sample keys (sample b, the b-th of K
    equal slices of the flattened sample, draws from key b alone, counted from the slice's start).

    Returns ``(sample_hat, model_input)``.
    """
    sample = _check("sample", sample)
    if eps is None:
        seed = _check_seed(seed, sample)
    eps = None if eps is None else _check("eps", eps, sample)
    return _launch_churn(sample, eps, seed, _f32(s_noise), churn_coefficient(sigma, sigma_hat))


def euler(raw, sample_hat, sigma_hat, sigma_prev, want_input=True, want_derivative=True,
          want_pred=False, image: str | None = None):
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
    return _launch_euler(raw, sample_hat, euler_scalars(sigma_hat, sigma_prev), want_input, want_derivative,
                         want_pred, image)


def heun(raw, sample_hat, sample_prev, derivative, sigma_hat, sigma_prev, want_sample=True, want_pred=False,
         next_churn: tuple | None = None):
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
    return _launch_heun(raw, sample_hat, sample_prev, derivative, heun_scalars(sigma_hat, sigma_prev),
                        want_sample, want_pred, churn_next)


class TritonStep:
    """The Triton step backend: two fused launches per Heun step in steady state (module docstring).

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

    name = "triton"

    def __init__(self, s_noise: float, want_pred: bool = False, shape=None, denoiser: bool = False,
                 layout: torch.Tensor | None = None):
        if shape is not None:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            if numel > _MAX_ELEMENTS:  # the kernels index with int32: refuse rather than misread
                raise ValueError(f"`shape` {tuple(shape)} has {numel} elements; the Triton backend takes at most "
                                 f"{_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
        self.s_noise = _f32(s_noise)
        self.want_pred = want_pred
        self.denoiser = denoiser
        self._layout = layout
        self._buffers = None

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the state's layout (a copy only when its strides differ)."""
        if self._layout is None:
            return t.contiguous()
        if t.stride() == self._layout.stride():
            return t
        return torch.empty_like(self._layout).copy_(t)

    def _new(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like if self._layout is None else self._layout)

    def _buf(self, like: torch.Tensor):
        b = self._buffers
        if b is None or b[0].shape != like.shape or b[0].device != like.device:
            if like.numel() > _MAX_ELEMENTS:
                raise ValueError(f"`shape` {tuple(like.shape)} has {like.numel()} elements; the Triton backend "
                                 f"takes at most {_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
            if self._layout is None:
                b = [torch.empty(like.shape, dtype=torch.float32, device=like.device) for _ in range(5)]
            else:
                b = [torch.empty_like(self._layout) for _ in range(5)]
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
                eps = _launch_churn(zero, None, keys, 1.0, 1.0, store_xin=False)[0]  # 0 + 1 * (1 * z) = z
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
        out = None if not keep else (self._new(sample), None if self.denoiser else self._new(sample))
        hat, xin = _launch_churn(sample, eps, seed, self.s_noise, step.churn,
                                 out=out or (b[0], None if self.denoiser else b[1]), store_xin=not self.denoiser)
        return hat, hat if self.denoiser else xin

    def euler(self, raw, sample_hat, step, want_input: bool, want_derivative: bool = True,
              image: str | None = None, keep: bool = True):
        """``keep``: x_prev is handed out (the final sample, or a callback's): a new tensor, not a buffer."""
        b = self._buf(sample_hat)
        out = None if keep else (b[2], b[3], b[4])
        prev, d, xin, pred, img = _launch_euler(self._like(raw), sample_hat, self._euler_scalars(step),
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
        x, pred, hat, xin = _launch_heun(self._like(raw), sample_hat, sample_prev, derivative,
                                         self._heun_scalars(step), next_step is None, self.want_pred, churn_next,
                                         out=(b[0], b[1]), denoiser=self.denoiser)
        if next_step is None:
            return x, pred, None
        return x, pred, (hat, hat if self.denoiser else xin)

    def to_image(self, sample, kind: str):
        """The final image of a sample that a callback replaced (the fused Euler path did not run)."""
        return to_image(sample, kind)
