"""Fused Triton step kernels, float32 state: two launches per Heun step in steady state.

Three kernels replace the reference's ~20 elementwise launches per step; the first step starts with
``churn``, and every later step's churn is fused into the previous step's ``heun`` launch, so a step
is ``euler`` + ``heun`` (one launch per step with ``solver="euler"``, or with a callback that must see
the sample between steps: then ``churn`` runs on its own):

- ``churn``: x_hat = x + c * (S_noise * eps), and the model input (x_hat + 1) / 2.
- ``euler``: from the raw model output, the derivative, x_next and the next model input, or on the
  last step the final image (x / 2 + 0.5).clamp(0, 1) (float BCHW, or uint8 BHWC for PIL).
- ``heun``: the second-order correction, fused with the next step's churn.

Bit-exactness: each kernel performs the reference's float32 operations in the reference's order,
with scalars computed on the host exactly as the reference computes them. Kernels are launched with
``enable_fp_fusion=False`` (a contracted multiply-add rounds once, the reference rounds twice). The
reference divides by a CPU scalar differently per device: on CUDA torch multiplies by the host's
float32 reciprocal, on the CPU it divides; ``TRUE_DIV`` selects true division (k-diffusion's convention
divides truly by device tensors everywhere; the reference's only on the CPU, under ``TRITON_INTERPRET=1``:
``kve_fast.convention.Convention.true_division`` decides), as ``tl.div_rn``, and Triton's own fp32 ``/``
(approximate on GPUs) is never used.

Noise: ``eps`` comes from a tensor (the reference's stream, "exact" mode) or, with ``DEVICE_NOISE``,
is generated in the kernel by Philox ("fast" mode): no noise tensor is written, read or copied. In
fast mode each sample has its own key per step (``KEYED``: an int64 array of B keys; each element
loads its sample's key, and its Philox counter is its position within the sample), so a sample's noise
does not depend on the batch around it. A single int seed (the public ops) keys the whole tensor,
counted by the global offset.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .. import fake_graph
from . import fused

_BLOCK = 1024
# Device noise: one Philox randn4x call per 4 elements (True) or tl.randn per element (False).
NOISE4 = True
# Per-sample keys, samples of at least a block: find each element's sample with one scalar division per
# program (True) or one division per element (False); the same values either way.
BIG_SAMPLES = True
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch options: no mul+add contraction into FMA, so each op rounds like torch's separate kernels.
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
_MAX_ELEMENTS = fused.MAX_ELEMENTS  # int32 offsets (and Philox counters)


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


@triton.jit
def _as_model_dtype(v, ptr):
    """float32 ``v`` in the dtype ``ptr`` points to (a low-precision UNet's input), rounded as torch rounds it.

    bfloat16 is rounded to nearest even with integer ops (what ``Tensor.to(torch.bfloat16)`` does, NaN to
    0x7FC0) rather than with ``.to``: Triton's interpreter truncates there, so this keeps the CPU tests'
    bits equal to the GPU's and to torch's. float16 and float32 use ``.to`` (round to nearest even).
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


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
        tl.store(xin_ptr + offs, _as_model_dtype((hat + 1.0) * 0.5, xin_ptr), mask=mask)  # in the UNet's dtype


@triton.jit
def _divide(num, s, inv_s, TRUE_DIV: tl.constexpr):
    # num / s, as torch rounds it on the device the kernel runs on: true division is IEEE's, rounded to
    # nearest (Triton's float32 `/` is approximate on GPUs, tl.div_rn takes float32 only, and its float64 `/`
    # is div.rn.f64 on NVIDIA GPUs)
    if TRUE_DIV:
        if num.dtype == tl.float64:
            q = num / s
        else:
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
    raw = tl.load(raw_ptr + offs, mask=mask).to(tl.float32)  # a low-precision UNet's output, read as is
    hat = tl.load(hat_ptr + offs, mask=mask)
    if DENOISER:
        # a denoiser returns D itself
        pred = raw
    else:
        # model_output = (sigma_hat / 2) * F ; D = x_hat + sigma_hat * model_output
        mo = half_sigma_hat * raw
        pred = hat + sigma_hat * mo
    # d = (x_hat - D) / sigma_hat ; x_next = x_hat + (sigma_next - sigma_hat) * d
    d = _divide(hat - pred, sigma_hat, inv_sigma_hat, TRUE_DIV)
    prev = hat + dt * d
    tl.store(prev_ptr + offs, prev, mask=mask)
    if STORE_D:
        tl.store(d_ptr + offs, d, mask=mask)
    if STORE_XIN:
        tl.store(xin_ptr + offs, _as_model_dtype((prev + 1.0) * 0.5, xin_ptr), mask=mask)
    if STORE_PRED:
        tl.store(pred_ptr + offs, pred, mask=mask)
    if STORE_IMG:
        _store_image(img_ptr, offs, mask, prev, hw, C, TO_UINT8)


@triton.jit(do_not_specialize=["seed"])
def _heun_kernel(raw_ptr, hat_ptr, prev_ptr, d_ptr, x_ptr, pred_ptr, eps_ptr, hat_next_ptr, xin_ptr, n,
                 half_sigma_next, sigma_next, inv_sigma_next, dt, seed, keys_ptr, per_sample, s_noise, c_next, sc_ptr,
                 cs_ptr, SCAL_MEM: tl.constexpr, DENOISER: tl.constexpr, TRUE_DIV: tl.constexpr, STORE_X: tl.constexpr,
                 STORE_PRED: tl.constexpr, CHURN: tl.constexpr, APPLY: tl.constexpr, STORE_XIN: tl.constexpr,
                 DEVICE_NOISE: tl.constexpr, KEYED: tl.constexpr, BIG: tl.constexpr, NOISE4: tl.constexpr,
                 BLOCK: tl.constexpr):
    if SCAL_MEM:
        half_sigma_next = tl.load(sc_ptr)
        sigma_next = tl.load(sc_ptr + 1)
        inv_sigma_next = tl.load(sc_ptr + 2)
        dt = tl.load(sc_ptr + 3)
        if CHURN and APPLY:
            c_next = tl.load(cs_ptr)
            s_noise = tl.load(cs_ptr + 1)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    raw = tl.load(raw_ptr + offs, mask=mask).to(tl.float32)  # a low-precision UNet's output, read as is
    hat = tl.load(hat_ptr + offs, mask=mask)
    prev = tl.load(prev_ptr + offs, mask=mask)
    d = tl.load(d_ptr + offs, mask=mask)
    if DENOISER:
        # D' is the denoiser's output ; d' = (x_next - D') / sigma_next ; x = x_hat + ((d + d') / 2) * dt
        pred = raw
        dc = _divide(prev - pred, sigma_next, inv_sigma_next, TRUE_DIV)
        x = hat + ((d + dc) * 0.5) * dt
    else:
        # model_output = (sigma_next / 2) * F ; D' = x_next + sigma_next * model_output
        mo = half_sigma_next * raw
        pred = prev + sigma_next * mo
        # d' = (x_next - D') / sigma_next ; x = x_hat + (sigma_next - sigma_hat) * (d / 2 + d' / 2)
        dc = _divide(prev - pred, sigma_next, inv_sigma_next, TRUE_DIV)
        x = hat + dt * (0.5 * d + 0.5 * dc)
    if STORE_X:
        tl.store(x_ptr + offs, x, mask=mask)
    if STORE_PRED:
        tl.store(pred_ptr + offs, pred, mask=mask)
    if CHURN:
        # the next step's lines 5-6
        _churn_store(x, eps_ptr, hat_next_ptr, xin_ptr, offs, mask, n, pid, seed, keys_ptr, per_sample, s_noise,
                     c_next, APPLY, STORE_XIN, DEVICE_NOISE, KEYED, BIG, NOISE4, BLOCK)


# ----------------------------------------------------------------------------------------------------
# Host side: launchers. No checks (callers pass float32 tensors of one shape and dense layout); each output
# is a tensor to write or None ("not wanted"). Scalars are floats, or a device tensor the kernel reads them
# from (a CUDA graph replays the launch for every step). ``true_div``: divide by sigma truly (the CPU's
# torch, k-diffusion's device tensors), else multiply by its float32 reciprocal (torch on CUDA dividing by
# the reference's CPU scalar): ``kve_fast.convention.Convention.true_division`` decides.


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def _launch(kernel, n: int, *args, **meta) -> None:
    fake_graph.launch(kernel, _grid(n), args, {**meta, "BLOCK": _BLOCK, **_LAUNCH})


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


def _launch_churn(x, eps, seed, coef, *, hat, model_input=None):
    """Lines 5-6: ``hat`` = x + c (S_noise eps), and the score model's input (hat + 1) / 2 into ``model_input``.

    ``coef``: ``(c, S_noise)`` floats, or a device tensor ``[c, S_noise]``. ``eps`` None: device noise from
    ``seed``, an int or an int64 tensor of per-sample keys (``_seed_args``).
    """
    n = x.numel()
    (c, s_noise), cs, mem = _scalar_args(coef, 2)
    seed, keys, per_sample, keyed, big, noise4 = _seed_args(seed, n, x)
    _launch(_churn_kernel, n, x, x if eps is None else eps, hat, hat if model_input is None else model_input, n, seed,
            keys, per_sample, s_noise, c, x if cs is None else cs, SCAL_MEM=mem, STORE_XIN=model_input is not None,
            DEVICE_NOISE=eps is None, KEYED=keyed and eps is None, BIG=big, NOISE4=noise4)


def _launch_euler(raw, hat, level, *, x_next, d=None, model_input=None, denoised=None, image=None, image_kind=None,
                  denoiser: bool, true_div: bool):
    """Lines 7-8 at ``level`` (``Level`` floats or a device tensor of them); ``denoiser``: ``raw`` is D itself.
    ``image``: the final image of kind ``image_kind`` (``"float"`` BCHW, ``"uint8"`` BHWC) from ``x_next``."""
    n = hat.numel()
    channels, hw = (hat.shape[1], hat.shape[2] * hat.shape[3]) if image is not None else (1, 1)
    scalars, sc, mem = _scalar_args(level, 4)
    _launch(_euler_kernel, n, raw, hat, x_next, x_next if d is None else d,
            x_next if model_input is None else model_input, x_next if denoised is None else denoised,
            x_next if image is None else image, n, hw, *scalars, hat if sc is None else sc, SCAL_MEM=mem,
            DENOISER=denoiser, TRUE_DIV=true_div, STORE_D=d is not None, STORE_XIN=model_input is not None,
            STORE_PRED=denoised is not None, STORE_IMG=image is not None, C=channels, TO_UINT8=image_kind == "uint8")


def _launch_heun(raw, hat, x_next, d, level, *, x=None, denoised=None, then=None, denoiser: bool, true_div: bool):
    """Lines 9-11 at ``level``: the corrected sample into ``x``, D' into ``denoised``, and ``then``
    (``kve_fast.ops.fused.NextChurn``): the next step's churn of the corrected sample, fused."""
    n = hat.numel()
    eps, seed, coef, hat_next, input_next, apply = (hat, 0, (0.0, 0.0), None, None, False) if then is None else then
    scalars, sc, mem = _scalar_args(level, 4)
    if not apply:  # the next x_hat is the corrected sample itself: no noise, no coefficient
        eps, coef = None, (0.0, 0.0)
    (c, s_noise), cs, cmem = _scalar_args(coef, 2)
    if then is not None and apply and mem != cmem:
        raise ValueError("the step's scalars and the next churn's must both be floats or both device tensors")
    device_noise = then is not None and apply and eps is None
    seed, keys, per_sample, keyed, big, noise4 = _seed_args(seed, n, hat)
    _launch(_heun_kernel, n, raw, hat, x_next, d, hat if x is None else x, hat if denoised is None else denoised,
            hat if eps is None else eps, hat if hat_next is None else hat_next, hat if input_next is None else input_next,
            n, *scalars, seed, keys, per_sample, s_noise, c, hat if sc is None else sc, hat if cs is None else cs,
            SCAL_MEM=mem, DENOISER=denoiser, TRUE_DIV=true_div, STORE_X=x is not None, STORE_PRED=denoised is not None,
            CHURN=then is not None, APPLY=apply, STORE_XIN=input_next is not None, DEVICE_NOISE=device_noise,
            KEYED=keyed and device_noise, BIG=big, NOISE4=noise4)


# ----------------------------------------------------------------------------------------------------
# Public ops and the step backend: the shared host side (``fused.py``) with these launchers.

_SELF = sys.modules[__name__]


# churn (lines 5-6), euler (7-8), heun (9-11, optionally fused with the next churn): see fused.py
churn, euler, heun = fused.bind_ops(_SELF)


class TritonStep(fused.FusedStep):
    """The Triton step backend (``fused.FusedStep`` with this module's kernels)."""

    name = "triton"
    launch = _SELF
    model_dtypes = (torch.float32, torch.bfloat16, torch.float16)
