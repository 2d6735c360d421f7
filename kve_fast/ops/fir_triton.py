"""Triton ``upfirdn2d`` for diffusers' FIR resampling (the NCSN++ blocks): fast mode only, not bit-exact.

``upfirdn2d(x, kernel, up, down, pad)`` computes what diffusers' ``upfirdn2d_native`` computes (diffusers
0.42.1, models/upsampling.py:421), with the same arguments: upsample by inserting ``up - 1`` zeros after
each pixel, pad by ``pad[0]`` before and ``pad[1]`` after (crop where negative), in both dimensions, convolve
with ``kernel`` (``upfirdn2d_native`` correlates with the flipped kernel), keep every ``down``-th pixel::

    out[n, c, oy, ox] = sum_{a, b} kernel[KH-1-a, KW-1-b] * u[n, c, oy*down + a - pad[0], ox*down + b - pad[0]]
    u[n, c, m, l]     = x[n, c, m / up, l / up]  where up divides m and l and both are inside x, else 0

``upfirdn2d_native`` builds the zero-stuffed, padded tensor and runs ``F.conv2d`` on it (on a GPU, slow
convolutions with one input and one output channel: about 28 % of a CelebA-HQ-256 NCSN++ forward). Here
each output pixel is a direct sum of products, computed from ``x`` in place: the taps that would meet an
inserted zero are skipped by phase (``up=2`` with the 4x4 filter: 4 products per pixel instead of 16),
the padding is a load mask. Products are accumulated in float32 (order: rows of taps, then columns) and
rounded once to the input's dtype (to nearest even). The kernel tensor is read on the device in its own
dtype (diffusers passes it in the input's dtype), so no host value is needed and a launch can be captured
in a CUDA graph.

Accuracy (checked by tests/test_fir.py): with ``n = ceil(KH/up) * ceil(KW/up)`` terms per output and
``u = 2**-24``, each float32 output is within ``gamma_n * sum |w_i x_i|`` (``gamma_n = n u / (1 - n u)``,
the dot-product bound for any summation order, with or without FMA) of the exact sum; a bfloat16 / float16
output adds one rounding of the sum (``2**-8`` / ``2**-11`` relative). ``upfirdn2d_native`` obeys the same
bound with its ``KH * KW`` terms, so the two differ by at most ``(gamma_n + gamma_{KH KW}) * sum |w_i x_i|``
(on a GPU with TF32 convolutions allowed, diffusers' side is less accurate than that; this kernel never
uses TF32).

Inference only: no backward (``supports`` is False for inputs that require grad while grad is enabled).
Layouts: ``x`` may have any strides (contiguous, channels_last, a strided view); the output is
channels_last when ``x`` is (and not also contiguous), else contiguous. Dtypes: float32, bfloat16,
float16. Where Triton cannot run (no CUDA and no ``TRITON_INTERPRET=1``), ``can_run()`` is False and
there is no fallback here: ``kve_fast.ncsnpp.make_fast`` then leaves diffusers' own op in place.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import fake_graph

__all__ = ["upfirdn2d", "can_run", "supports", "out_size", "terms", "DTYPES"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TAPS = 16  # kernel height / width (the loops over taps are unrolled)
MAX_FACTOR = 8  # up / down
_TILE = 1024  # output elements per program
_INT32 = 2**31 - 1


@triton.jit
def _tap(k_ptr, ry, rx, jy: tl.constexpr, jx: tl.constexpr, skh, skw, UP: tl.constexpr, KH: tl.constexpr,
         KW: tl.constexpr):
    # weight of term (jy, jx) for the output phase (ry, rx): tap a = ry + UP * jy, b = rx + UP * jx of the
    # flipped kernel, i.e. kernel[KH-1-a, KW-1-b] (0 where the phase has no such tap)
    if UP == 1:
        w = tl.load(k_ptr + (KH - 1 - jy) * skh + (KW - 1 - jx) * skw).to(tl.float32)
    else:
        w = tl.zeros_like(ry + rx).to(tl.float32)
        for qy in tl.static_range(UP):
            if qy + UP * jy < KH:
                for qx in tl.static_range(UP):
                    if qx + UP * jx < KW:
                        wq = tl.load(k_ptr + (KH - 1 - qy - UP * jy) * skh + (KW - 1 - qx - UP * jx) * skw)
                        w = tl.where((ry == qy) & (rx == qx), wq.to(tl.float32), w)
    return w


@triton.jit
def _phase(o, DOWN: tl.constexpr, P0: tl.constexpr, UP: tl.constexpr, SHIFT: tl.constexpr):
    # tap 0 of output o sits at m = o * DOWN - P0 of the upsampled, padded signal; the first tap that meets
    # an input pixel is r = (-m) mod UP, at input index (m + r) / UP. SHIFT (a multiple of UP, >= P0) keeps
    # the operands of % and / non-negative, where truncating and flooring division agree.
    m = o * DOWN + (SHIFT - P0)
    if UP == 1:
        r = tl.zeros_like(m)
        i0 = m - SHIFT
    else:
        r = (UP - m % UP) % UP
        i0 = (m + r) // UP - SHIFT // UP
    return r, i0


@triton.jit
def _round(acc, dtype: tl.constexpr):
    # float32 -> dtype, round to nearest even; bfloat16 by hand (what the GPU's conversion does, and
    # what Triton's interpreter, which truncates, does not): add 0x7FFF + lsb, keep the top 16 bits
    if dtype == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(acc != acc, 0x7FC00000, bits)  # NaN stays NaN
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = acc.to(dtype)
    return out


@triton.jit
def _upfirdn2d_kernel(x_ptr, k_ptr, out_ptr, C, H, W, OH, OW, sxn, sxc, sxh, sxw, son, soc, soh, sow, skh, skw,
                      n_rows, n_cols, tiles_c, UP: tl.constexpr, DOWN: tl.constexpr, P0: tl.constexpr,
                      SHIFT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, CL: tl.constexpr,
                      WIDE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    tr = pid // tiles_c
    tc = pid - tr * tiles_c
    rows = tr * BR + tl.arange(0, BR)[:, None]
    cols = tc * BC + tl.arange(0, BC)[None, :]
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    mask = (rows < n_rows) & (cols < n_cols)
    if CL:
        # rows: output pixels (n, oy, ox) in that order; cols: channels
        t = rows // OW
        ox = rows - t * OW
        n = t // OH
        oy = t - n * OH
        c = cols
    else:
        # rows: output rows (n, c, oy) in that order; cols: output columns
        plane = rows // OH
        oy = rows - plane * OH
        n = plane // C
        c = plane - n * C
        ox = cols
    ry, iy0 = _phase(oy, DOWN, P0, UP, SHIFT)
    rx, ix0 = _phase(ox, DOWN, P0, UP, SHIFT)
    base = x_ptr + n * sxn + c * sxc
    # out = sum over the phase's taps of w * x, in float32
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for jy in tl.static_range((KH + UP - 1) // UP):
        iy = iy0 + jy
        my = (iy >= 0) & (iy < H)
        if UP > 1:
            my = my & (ry + UP * jy < KH)
        for jx in tl.static_range((KW + UP - 1) // UP):
            ix = ix0 + jx
            mx = (ix >= 0) & (ix < W)
            if UP > 1:
                mx = mx & (rx + UP * jx < KW)
            w = _tap(k_ptr, ry, rx, jy, jx, skh, skw, UP, KH, KW)
            v = tl.load(base + iy * sxh + ix * sxw, mask=mask & my & mx, other=0.0)
            acc += w * v.to(tl.float32)
    dst = out_ptr + n * son + c * soc + oy * soh + ox * sow
    tl.store(dst, _round(acc, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Host side.


def can_run() -> bool:
    """Whether Triton kernels can run here: a CUDA device, or Triton's interpreter (``TRITON_INTERPRET=1``
    when this module was imported)."""
    return _INTERPRET or torch.cuda.is_available()


def out_size(size: int, k: int, up: int, down: int, pad) -> int:
    """``upfirdn2d_native``'s output size along one dimension."""
    return (size * up + pad[0] + pad[1] - k) // down + 1


def terms(k: int, up: int) -> int:
    """Products per output along one dimension (the taps of one phase): ``ceil(k / up)``."""
    return -(-k // up)


def supports(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> bool:
    """Whether ``upfirdn2d`` takes these arguments (else the caller runs diffusers' op)."""
    return _why_not(x, kernel, up, down, pad) is None


def _why_not(x, kernel, up, down, pad):
    if not isinstance(x, torch.Tensor) or not isinstance(kernel, torch.Tensor):
        return "`x` and `kernel` must be tensors"
    if x.dim() != 4:
        return f"`x` must be 4-D (N, C, H, W), got shape {tuple(x.shape)}"
    if x.dtype not in DTYPES:
        return f"`x` must be float32, bfloat16 or float16, got {x.dtype}"
    if kernel.dim() != 2 or not kernel.is_floating_point():
        return f"`kernel` must be a 2-D float tensor, got {kernel.dtype} {tuple(kernel.shape)}"
    if not 1 <= kernel.shape[0] <= MAX_TAPS or not 1 <= kernel.shape[1] <= MAX_TAPS:
        return f"`kernel` must be at most {MAX_TAPS}x{MAX_TAPS}, got {tuple(kernel.shape)}"
    if kernel.device != x.device:
        return f"`kernel` is on {kernel.device}, `x` on {x.device}"
    if torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad):
        return "no autograd here: `x` or `kernel` requires grad"
    if x.device.type != "cuda" and not _INTERPRET:
        return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got one on {x.device}"
    for name, v in (("up", up), ("down", down)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_FACTOR:
            return f"`{name}` must be an int in [1, {MAX_FACTOR}], got {v!r}"
    if (not isinstance(pad, (tuple, list)) or len(pad) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in pad)):
        return f"`pad` must be a pair of ints, got {pad!r}"
    if min(out_size(s, k, up, down, pad) for s, k in zip(x.shape[2:], kernel.shape)) < 1:
        return f"empty output: x {tuple(x.shape)}, kernel {tuple(kernel.shape)}, up {up}, down {down}, pad {tuple(pad)}"
    return None


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset of ``t``."""
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _tiles(n_rows: int, n_cols: int):
    """Tile shape (rows, cols): columns are output columns (contiguous) or channels (channels_last)."""
    bc = min(_pow2(n_cols), 128)
    br = max(1, min(_TILE // bc, _pow2(n_rows)))
    return br, bc


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """diffusers' ``upfirdn2d_native(x, kernel, up, down, pad)`` as one Triton launch (float32 accumulation;
    within the bound of this module's docstring, not bit-identical); ``kernel`` on ``x``'s device."""
    why = _why_not(x, kernel, up, down, pad)
    if why is not None:
        raise ValueError(f"upfirdn2d: {why}")
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    pad = (int(pad[0]), int(pad[1]))
    oh, ow = out_size(h, kh, up, down, pad), out_size(w, kw, up, down, pad)
    cl = _channels_last(x)
    out = torch.empty((n, c, oh, ow), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    if out.numel() == 0:
        return out
    # a tile: rows are output pixels (channels_last) or output rows, across images and planes
    n_rows, n_cols = (n * oh * ow, c) if cl else (n * c * oh, ow)
    br, bc = _tiles(n_rows, n_cols)
    tiles_c = triton.cdiv(n_cols, bc)
    programs = triton.cdiv(n_rows, br) * tiles_c
    if programs > _INT32:
        raise ValueError(f"upfirdn2d: {programs} programs, more than one launch takes")
    wide = max(_span(x), out.numel(), n_rows + br, n_cols + bc, h * w * up * up) > _INT32
    shift = up * terms(max(pad[0], 0), up)
    # (through fake_graph.launch: a CPU stand-in for a CUDA graph records the launch, as a real graph does)
    fake_graph.launch(_upfirdn2d_kernel, (programs,),
                      (x, kernel, out, c, h, w, oh, ow, *x.stride(), *out.stride(), *kernel.stride(), n_rows, n_cols,
                       tiles_c),
                      dict(UP=up, DOWN=down, P0=pad[0], SHIFT=shift, KH=kh, KW=kw, CL=cl, WIDE=wide, BR=br, BC=bc,
                           num_warps=4))
    return out
