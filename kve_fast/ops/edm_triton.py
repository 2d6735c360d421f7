"""Fused Triton step kernels for NVlabs' EDM and EDM2 samplers (docs/edm-reading.md), float32 or float64 state.

A step of both ``edm_sampler`` functions, in the state's dtype (float64 in EDM, ``dtype`` in EDM2), with D the
net's output cast to that dtype and every scalar a 0-d value of that dtype:

- ``churn``: x_hat = x + cs * eps, where cs = sqrt(t_hat^2 - t^2) * S_noise is already rounded (the originals
  compute it as a 0-d tensor: ``kve_fast.ops.step_torch.edm_churn_scale``) and eps is the caller's draw;
- ``euler``: d = (x_hat - D) / t_hat; x_next = x_hat + dt * d, dt = t_next - t_hat (the 0-d difference); on
  the last step (t_next = 0) x_next is the sample itself;
- ``heun``: d' = (x_next - D') / t_next; x = x_hat + dt * (0.5 d + 0.5 d'), optionally fused with the next
  step's churn hat_next = x + cs_next * eps_next (eps_next drawn before the launch), writing x only if asked.

One kernel per stage, specialized by Triton for the pointers' dtype (float32 or float64). The torch reference
is ``step_torch.edm_churn`` / ``edm_euler`` / ``edm_heun``.

Bit-exactness: each operation is one IEEE operation rounded to nearest, in the originals' order, as torch's
separate kernels compute it: launched with ``enable_fp_fusion=False`` (no multiply-add contracted into an FMA,
float64 too), the divisions true (``step_triton._divide``: ``tl.div_rn`` in float32, whose ``/`` is approximate
on GPUs, and ``/`` in float64, which Triton lowers to ``div.rn.f64``), D read in its own dtype and widened in the
kernel (exact: what ``.to(dtype)`` does). The only literal, 0.5, is exact in both dtypes.

Scalars: a step's scalars are read from a small tensor in the state's dtype on the state's device, ``SLOTS``
(Triton would pass a Python float as float32), so a CUDA graph replays the launches for every step after the
runner writes that step's values (``step_scalars(..., out=slots)``).

Layout: the kernels index every tensor linearly, so all of them share the state's dense layout (contiguous or
channels_last): the public ops copy a tensor of other strides in first; the launchers take them as they are.

From a stage runner: the state's buffers (x, x_hat, x_next, d, the noise) in the state's dtype and one dense
layout; each step's ``SLOTS`` from the 0-d tensors the originals compute on the device (t_hat, through
``round_sigma`` in EDM; cs = ``step_torch.edm_churn_scale(t_cur, t_hat, S_noise)``), with ``step_scalars``;
``launch_churn`` on the first step (or where the previous Heun launch did not take the churn), ``launch_euler``
(``d=None`` on the last step, whose ``x_next`` is the result), ``launch_heun`` with ``eps_next``/``hat_next`` where
the next step churns (every step in EDM, also at gamma = 0; in EDM2 only where it churns: else the corrected
sample is the next x_hat). D as the net returns it where its dtype is in ``READS[state dtype]`` (else
``.to(dtype)`` first), in the state's layout (``fused.in_layout``); EDM2's guidance stays ``torch.lerp`` before.
"""

from __future__ import annotations

from numbers import Real

import torch
import triton
import triton.language as tl

from .. import edm_plan
from ..noise import Draw
from ..stages import NEW
from . import fused
from .step_triton import _divide, _launch

# A step's scalars, in this order, in the state's dtype: a 1-D tensor (or a row of a table of steps) that each
# kernel reads at these positions. cs: this step's churn coefficient (c * S_noise, rounded); t_hat; dt =
# t_next - t_hat; t_next; cs_next: the next step's churn coefficient (the Heun launch fused with that churn).
# Unused slots may hold anything (``step_scalars`` writes 0).
SLOTS = edm_plan.SLOTS  # (the plan writes them in this order: ``edm_plan.slots``)
_CS = tl.constexpr(SLOTS.index("cs"))
_T_HAT = tl.constexpr(SLOTS.index("t_hat"))
_DT = tl.constexpr(SLOTS.index("dt"))
_T_NEXT = tl.constexpr(SLOTS.index("t_next"))
_CS_NEXT = tl.constexpr(SLOTS.index("cs_next"))

STATE_DTYPES = edm_plan.KERNEL_DTYPES  # float32 and float64
# The dtypes of D each state dtype's kernels read and widen themselves (exact); another (a float64 D for a
# float32 state) is cast with torch's ``.to(dtype)`` first.
READS = {torch.float32: (torch.float32, torch.float16, torch.bfloat16),
         torch.float64: (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


@triton.jit
def _denoised(raw_ptr, offs, mask, like):
    # D = net output .to(state dtype): 16-bit floats through float32, each widening exact
    raw = tl.load(raw_ptr + offs, mask=mask)
    if raw.dtype.is_fp16() or raw.dtype.is_bf16():
        raw = raw.to(tl.float32)
    return raw.to(like.dtype)


@triton.jit
def _churned(x, cs, eps):
    # x + cs * eps
    return x + cs * eps


@triton.jit
def _edm_churn_kernel(x_ptr, eps_ptr, hat_ptr, sc_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    eps = tl.load(eps_ptr + offs, mask=mask)
    tl.store(hat_ptr + offs, _churned(x, tl.load(sc_ptr + _CS), eps), mask=mask)


@triton.jit
def _edm_euler_kernel(raw_ptr, hat_ptr, x_next_ptr, d_ptr, sc_ptr, n, STORE_D: tl.constexpr, BLOCK: tl.constexpr):
    t_hat = tl.load(sc_ptr + _T_HAT)
    dt = tl.load(sc_ptr + _DT)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hat = tl.load(hat_ptr + offs, mask=mask)
    # d = (x_hat - D) / t_hat ; x_next = x_hat + dt * d
    d = _divide(hat - _denoised(raw_ptr, offs, mask, hat), t_hat, t_hat, True)
    tl.store(x_next_ptr + offs, hat + dt * d, mask=mask)
    if STORE_D:
        tl.store(d_ptr + offs, d, mask=mask)


@triton.jit
def _edm_heun_kernel(raw_ptr, hat_ptr, x_next_ptr, d_ptr, x_ptr, eps_ptr, hat_next_ptr, sc_ptr, n,
                     STORE_X: tl.constexpr, CHURN: tl.constexpr, BLOCK: tl.constexpr):
    t_next = tl.load(sc_ptr + _T_NEXT)
    dt = tl.load(sc_ptr + _DT)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hat = tl.load(hat_ptr + offs, mask=mask)
    x_next = tl.load(x_next_ptr + offs, mask=mask)
    d = tl.load(d_ptr + offs, mask=mask)
    # d' = (x_next - D') / t_next ; x = x_hat + dt * (0.5 d + 0.5 d')
    d_prime = _divide(x_next - _denoised(raw_ptr, offs, mask, hat), t_next, t_next, True)
    x = hat + dt * (0.5 * d + 0.5 * d_prime)
    if CHURN:
        # the next step's x_hat = x + cs_next * eps_next
        eps = tl.load(eps_ptr + offs, mask=mask)
        tl.store(hat_next_ptr + offs, _churned(x, tl.load(sc_ptr + _CS_NEXT), eps), mask=mask)
    if STORE_X:
        tl.store(x_ptr + offs, x, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers, for a stage runner or a graph capture: no checks. Every tensor is float32 or float64 (the state's
# dtype; D also one of ``READS``), of one shape, with the state's dense strides, on one device; ``scalars`` is a
# ``SLOTS`` tensor of the state's dtype there. Outputs are keyword arguments, each a tensor to write or None; an
# output may be an input of the same launch (each element is read before its program writes it).


def launch_churn(x, eps, scalars, *, hat) -> None:
    """Line 6 into ``hat``: ``x + cs * eps``."""
    _launch(_edm_churn_kernel, x.numel(), x, eps, hat, scalars, x.numel())


def launch_euler(denoised, hat, scalars, *, x_next, d=None) -> None:
    """Lines 7-8: ``x_next`` and, where given (the Heun launch reads it), ``d``."""
    _launch(_edm_euler_kernel, hat.numel(), denoised, hat, x_next, x_next if d is None else d, scalars, hat.numel(),
            STORE_D=d is not None)


def launch_heun(denoised, hat, x_next, d, scalars, *, x=None, eps_next=None, hat_next=None) -> None:
    """Lines 10-11: the corrected sample into ``x`` (where given) and, with ``eps_next``, the next step's churn
    of it into ``hat_next`` (which may be ``hat``)."""
    churn = eps_next is not None
    if churn and hat_next is None:
        raise ValueError("`hat_next` is required with `eps_next`")
    _launch(_edm_heun_kernel, hat.numel(), denoised, hat, x_next, d, hat if x is None else x,
            eps_next if churn else hat, hat_next if churn else hat, scalars, hat.numel(), STORE_X=x is not None,
            CHURN=churn)


# ----------------------------------------------------------------------------------------------------
# The step's scalars and the public ops (checked: a wrong argument is a TypeError or ValueError naming it,
# before any work; tensors of other strides are copied into the state's layout; new outputs).


def _scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of ``like``'s dtype on its device (as the originals hold each t), or a Python number rounded to
    that dtype as torch rounds one in an op."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TypeError(f"`{name}` must be a 0-d tensor or a Python number, got "
                        f"{type(value).__name__ if not isinstance(value, torch.Tensor) else tuple(value.shape)}")
    if value.dtype != like.dtype:
        raise TypeError(f"`{name}` must be {like.dtype} (the state's dtype), got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"`{name}` is on {value.device}, expected {like.device}")
    return value


@torch.no_grad()
def step_scalars(like: torch.Tensor, *, cs=None, t_hat=None, t_next=None, cs_next=None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``SLOTS`` tensor of a step (in ``like``'s dtype, on its device; into ``out`` where given, e.g. the
    tensor a graph reads): each value a 0-d tensor or a number (``_scalar``), 0 where not given; dt is torch's
    0-d ``t_next - t_hat`` (the originals' difference) when both are given."""
    _validate_state("like", like)
    given = {"cs": cs, "t_hat": t_hat, "t_next": t_next, "cs_next": cs_next}
    values = {k: _scalar(k, v, like) for k, v in given.items() if v is not None}
    if out is not None:
        fused._validate("out", out, dtypes=(like.dtype,))
        if out.shape != (len(SLOTS),) or out.device != like.device or not out.is_contiguous():
            raise ValueError(f"`out` must be a contiguous ({len(SLOTS)},) tensor on {like.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
    if "t_hat" in values and "t_next" in values:
        values["dt"] = values["t_next"] - values["t_hat"]
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.stack([values.get(name, zero) for name in SLOTS], out=out)


def _validate_state(name: str, t) -> None:
    fused._validate(name, t, dtypes=STATE_DTYPES)


def _prepare(state_name: str, state, tensors: dict, **scalars):
    """Check the state (``state_name``), the tensors (name -> tensor: the state's dtype, shape and device; D,
    named ``denoised``, any dtype of ``READS``) and the scalars, all before any work; then return the state in its
    own dense layout (contiguous or channels_last, else contiguous), the tensors in that layout, and the step's
    ``SLOTS`` tensor."""
    _validate_state(state_name, state)
    for name, t in tensors.items():
        fused._validate(name, t, state, READS[state.dtype] if name == "denoised" else (state.dtype,))
    scalars = {k: _scalar(k, v, state) for k, v in scalars.items() if v is not None}
    if not (state.is_contiguous() or (state.dim() == 4 and state.is_contiguous(memory_format=torch.channels_last))):
        state = state.contiguous()
    return state, [fused.in_layout(t, state) for t in tensors.values()], step_scalars(state, **scalars)


@torch.no_grad()
def churn(x: torch.Tensor, eps: torch.Tensor, cs) -> torch.Tensor:
    """Line 6: returns ``x + cs * eps`` (``cs`` the 0-d coefficient times S_noise, in ``x``'s dtype)."""
    x, (eps,), scalars = _prepare("x", x, {"eps": eps}, cs=cs)
    hat = torch.empty_like(x)
    launch_churn(x, eps, scalars, hat=hat)
    return hat


@torch.no_grad()
def euler(denoised: torch.Tensor, x_hat: torch.Tensor, t_hat, t_next, want_derivative: bool = True):
    """Lines 7-8 from D (the net's output, any dtype of ``READS``): returns ``(x_next, d)``, d None where not
    wanted (the last step)."""
    x_hat, (denoised,), scalars = _prepare("x_hat", x_hat, {"denoised": denoised}, t_hat=t_hat, t_next=t_next)
    x_next = torch.empty_like(x_hat)
    d = torch.empty_like(x_hat) if want_derivative else None
    launch_euler(denoised, x_hat, scalars, x_next=x_next, d=d)
    return x_next, d


@torch.no_grad()
def heun(denoised: torch.Tensor, x_hat: torch.Tensor, x_next: torch.Tensor, d: torch.Tensor, t_hat, t_next,
         want_sample: bool = True, next_churn: tuple | None = None):
    """Lines 10-11 from D' (any dtype of ``READS``), optionally fused with the next step's churn ``next_churn =
    (eps_next, cs_next)``. Returns ``(x, hat_next)``, None for what was not asked."""
    tensors = {"denoised": denoised, "x_next": x_next, "d": d}
    cs_next = None
    if next_churn is not None:
        if not isinstance(next_churn, tuple) or len(next_churn) != 2 or next_churn[1] is None:
            raise TypeError("`next_churn` must be a tuple (eps_next, cs_next)")
        tensors["eps_next"], cs_next = next_churn
    x_hat, (denoised, x_next, d, *eps_next), scalars = _prepare("x_hat", x_hat, tensors, t_hat=t_hat, t_next=t_next,
                                                                 cs_next=cs_next)
    x = torch.empty_like(x_hat) if want_sample else None
    hat_next = torch.empty_like(x_hat) if eps_next else None
    launch_heun(denoised, x_hat, x_next, d, scalars, x=x, eps_next=eps_next[0] if eps_next else None,
                hat_next=hat_next)
    return x, hat_next


class EDMTritonStep:
    """The step backend of NVlabs' samplers on these kernels (``kve_fast.convention.EDM``/``EDM2``): one launch per
    stage, the state in ``layout``'s dtype (float32 or float64) and dense strides, every buffer and noise draw in
    them (``fused.in_layout``). The step's scalars come as a ``SLOTS`` tensor: a CUDA graph's feed (``values[1]``), or
    the plan's (``EStep.slots``) in an eager run. The net's output is read in its own dtype where the kernels widen
    it exactly (``READS``), else cast with torch's ``.to(dtype)`` first. Line 6 draws its noise only where it runs
    (the caller's ``randn_like``, just before the launch that adds it: after the model call before it)."""

    name = "triton"
    fuses_image = False
    reads = None  # any dtype (cast as above)

    def __init__(self, layout: torch.Tensor):
        fused._validate("layout", layout, dtypes=STATE_DTYPES)
        self.layout, self.dtype = layout, layout.dtype
        self.model_dtype = layout.dtype

    def _new(self, target):
        return torch.empty_like(self.layout) if target is NEW else target

    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        return fused.in_layout(t, self.layout)

    def _raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self._dense(raw if raw.dtype in READS[self.dtype] else raw.to(self.dtype))

    def _eps(self, noise, like: torch.Tensor) -> torch.Tensor:
        """The churn noise: drawn now from the run's source (``Draw``, with ``like``), or a graph's static buffer."""
        return self._dense(noise.get(like) if isinstance(noise, Draw) else noise)

    @staticmethod
    def _slots(values) -> torch.Tensor:
        """The ``SLOTS`` tensor of a stage's values (``LevelValues`` or ``ChurnValues``)."""
        step = values[0]
        return values[1] if step is None else step.slots()

    def churn(self, x, values, *, noise: bool, hat, model_input):
        """Line 6 (slot cs) into ``hat``; where it does not run (EDM2), x_hat is x (a copy only into a buffer)."""
        x = self._dense(x)
        if not noise:
            return (x if hat is NEW else hat.copy_(x)), None
        eps = self._eps(values.noise, x)
        hat = self._new(hat)
        launch_churn(x, eps, self._slots(values), hat=hat)
        return hat, None

    def euler(self, raw, hat, values, *, x_next, d, model_input, denoised, image):
        x_next, d = self._new(x_next), self._new(d)
        launch_euler(self._raw(raw), hat, self._slots(values), x_next=x_next, d=d)
        return x_next, d, None, None, None

    def heun(self, raw, hat, x_next, d, values, *, x, denoised, then):
        """Lines 10-11 and, with ``then``, the next step's line 6 (slot cs_next) fused into the same launch; where
        the next step does not churn (EDM2) the corrected sample is its x_hat."""
        raw, scalars, x = self._raw(raw), self._slots(values), self._new(x)
        if then is None:
            launch_heun(raw, hat, x_next, d, scalars, x=x)
            return x, None, None, None
        values_next, noise, hat_next, _ = then
        hat_next = self._new(hat_next)
        if not noise:
            launch_heun(raw, hat, x_next, d, scalars, x=hat_next)
            return (None if x is None else x.copy_(hat_next)), None, hat_next, None
        eps = self._eps(values_next.noise, hat)
        launch_heun(raw, hat, x_next, d, scalars, x=x, eps_next=eps, hat_next=hat_next)
        return x, None, hat_next, None
