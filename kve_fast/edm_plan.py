"""The noise levels and per-step scalars of NVlabs' EDM and EDM2 samplers (docs/edm-reading.md), as they round them.

Both ``edm_sampler`` functions (NVlabs/edm ``generate.py``, NVlabs/edm2 ``generate_images.py``) make their levels
with one whole-vector torch expression in the state's dtype on the latents' device, and every scalar of a step
with 0-d tensor operations there. ``levels`` makes the levels the same way (CPU torch computes a vector's SIMD
chunks and its tail with ``pow`` functions that differ in the last bit, and CUDA's ``pow`` is another again: the
same expression, length, dtype and device, or other bits). ``EPlan`` holds them and makes each step's scalars
when the loop reaches it (``EStep``): on the device, with the originals' 0-d operations (``plan.EDM_CHURN``),
so nothing is copied to the host but the levels, once: the range test ``S_min <= t <= S_max``, which the
originals evaluate on a device tensor every step (a host sync), is decided here from that copy (the same values,
compared in the same dtype).

What differs between the two samplers is asked of the plan's arguments: EDM rounds every level and every t_hat
with its net's ``round_sigma`` and runs line 6 at every step (adding 0 * noise where gamma is 0: it draws there
too); EDM2 has no ``round_sigma`` and runs line 6 only where it churns (S_churn > 0 and the level in range;
elsewhere t_hat is t itself and nothing is drawn).

``SLOTS`` is the order of a step's scalars in the small device tensor the fused kernels read
(``kve_fast.ops.edm_triton``) and a CUDA graph's feed writes (``slots``).
"""

from __future__ import annotations

import torch

from .plan import EDM_CHURN, LevelValues, _LazySteps

__all__ = ["SLOTS", "KERNEL_DTYPES", "levels", "churn_scale", "EStep", "EPlan", "edm_plan", "slots"]

# A step's scalars in the order the kernels read them: cs (this step's churn coefficient times S_noise),
# t_hat, dt = t_next - t_hat, t_next, cs_next (the next step's cs: a Heun launch fused with that churn).
SLOTS = ("cs", "t_hat", "dt", "t_next", "cs_next")
KERNEL_DTYPES = (torch.float32, torch.float64)  # the states the fused kernels keep (EDM2's float16: torch only)


def levels(num_steps: int, sigma_min, sigma_max, rho, dtype: torch.dtype, device, round_sigma=None) -> torch.Tensor:
    """t_0 ... t_{N-1}, then 0 (``num_steps + 1`` values in ``dtype`` on ``device``), as both originals make them:
    ``(sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho`` over
    ``i = arange(N)``, the Python numbers as given (rounded to ``dtype`` inside each op); ``round_sigma`` (EDM's net)
    then rounds the whole vector."""
    index = torch.arange(num_steps, dtype=dtype, device=device)
    top = sigma_max ** (1 / rho)
    t = (top + index / (num_steps - 1) * (sigma_min ** (1 / rho) - top)) ** rho
    if round_sigma is not None:
        rounded = round_sigma(t)
        if not isinstance(rounded, torch.Tensor) or rounded.shape != t.shape or rounded.dtype != dtype \
                or rounded.device != t.device:
            got = (f"{tuple(rounded.shape)} {rounded.dtype} on {rounded.device}" if isinstance(rounded, torch.Tensor)
                   else type(rounded).__name__)
            raise TypeError(f"`net.round_sigma` must return a tensor like its input ({tuple(t.shape)} {dtype} on "
                            f"{t.device}), got {got}")
        t = rounded
    return torch.cat([t, torch.zeros_like(t[:1])])


def churn_scale(t_cur, t_hat, s_noise):
    """Line 6's coefficient as both originals round it: ``(t_hat ** 2 - t_cur ** 2).sqrt() * S_noise``, 0-d, the
    Python number ``S_noise`` rounded to the dtype in the product."""
    return EDM_CHURN.coefficient(t_cur, t_hat) * s_noise


class EStep:
    """One step of NVlabs' loop. Host data: ``index``, ``last`` (t_{i+1} is the final 0), ``churned`` (line 6 runs:
    every step in EDM, where it churns in EDM2), ``gamma`` (a Python number as the original computes it; None where
    it does not churn). Device data, 0-d tensors in the state's dtype: ``t_cur`` and ``t_next`` (views of the
    levels, as the original's loop hands them out), and, made on first access, ``t_hat`` (``t_cur + gamma *
    t_cur``, through ``round_sigma`` in EDM; ``t_cur`` itself where EDM2 does not churn) and ``noise_coef``
    (``churn_scale``; None where it does not churn)."""

    __slots__ = ("index", "last", "churned", "gamma", "t_cur", "t_next", "values", "_plan", "_hat", "_coef", "_slots")

    def __init__(self, plan: "EPlan", index: int, churned: bool, gamma):
        self.index, self.last, self.churned, self.gamma = index, index == len(plan) - 1, churned, gamma
        self._plan = plan
        self.t_cur, self.t_next = plan.levels[index], plan.levels[index + 1]
        self._hat = self._coef = self._slots = None
        self.values = (LevelValues(self, None), LevelValues(self, None))  # (what an eager run's stages read)

    @property
    def t_hat(self) -> torch.Tensor:
        if self._hat is None:
            self._hat = self._plan.sigma_hat(self)
        return self._hat

    @property
    def noise_coef(self) -> torch.Tensor | None:
        if self._coef is None and self.churned:
            self._coef = churn_scale(self.t_cur, self.t_hat, self._plan.s_noise)
        return self._coef

    def slots(self) -> torch.Tensor:
        """This step's ``SLOTS`` tensor (the next step's cs included), made once."""
        if self._slots is None:
            self._slots = slots(self, None if self.last else self._plan[self.index + 1])
        return self._slots

    def __repr__(self) -> str:
        return f"EStep(index={self.index}, churned={self.churned}, gamma={self.gamma!r})"


def slots(step: EStep, nxt: EStep | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``SLOTS`` of ``step`` (``nxt``: the next step, whose cs a fused Heun launch adds; None: 0 there), stacked
    on the device from the step's 0-d tensors (dt is the originals' ``t_next - t_hat``), into ``out`` if given."""
    zero = step._plan.zero
    t_hat, coef = step.t_hat, step.noise_coef
    coef_next = None if nxt is None else nxt.noise_coef
    values = {"cs": zero if coef is None else coef, "t_hat": t_hat, "dt": step.t_next - t_hat, "t_next": step.t_next,
              "cs_next": zero if coef_next is None else coef_next}
    return torch.stack([values[name] for name in SLOTS], out=out)


class EPlan(_LazySteps):
    """The steps of one call of NVlabs' sampler over ``levels`` (``levels()``' tensor: the device's, in the state's
    dtype), made on access (``EStep``). ``gammas[i]``: step i's gamma, None where line 6 does not run (EDM2 outside
    its churn); ``round_sigma``: EDM's net's (None in EDM2)."""

    def __init__(self, levels: torch.Tensor, gammas: list, s_noise, round_sigma=None):
        super().__init__(len(gammas))
        self.levels, self.zero = levels, levels[-1]
        self._gammas, self.s_noise, self.round_sigma = gammas, s_noise, round_sigma

    def _make(self, i: int) -> EStep:
        gamma = self._gammas[i]
        return EStep(self, i, gamma is not None, gamma)

    def sigma_hat(self, step: EStep) -> torch.Tensor:
        """``step``'s t_hat: ``t_cur + gamma * t_cur`` (``EDM_CHURN``), through ``round_sigma`` in EDM, where the
        step churns; else ``t_cur`` itself."""
        if not step.churned:
            return step.t_cur
        hat = EDM_CHURN.sigma_hat(step.t_cur, step.gamma)
        if self.round_sigma is None:
            return hat
        hat = self.round_sigma(hat)
        t = step.t_cur
        if not isinstance(hat, torch.Tensor) or hat.dim() != 0 or hat.dtype != t.dtype or hat.device != t.device:
            got = (f"{tuple(hat.shape)} {hat.dtype} on {hat.device}" if isinstance(hat, torch.Tensor)
                   else type(hat).__name__)
            raise TypeError(f"`net.round_sigma` must return a 0-d {t.dtype} tensor on {t.device} for a 0-d one, got "
                            f"{got}")
        return hat


def edm_plan(levels: torch.Tensor, s_churn, s_min, s_max, s_noise, every_step: bool, round_sigma=None) -> EPlan:
    """The plan of a call over ``levels`` (``levels()``: N levels then 0), the range test decided on a host copy of
    them (in their dtype, inclusive at both ends: ``EDM_CHURN.in_range``). ``every_step``: line 6 runs at every step
    with gamma 0 outside the range (EDM), else only where S_churn > 0 and the level is in range (EDM2). Refused
    (ValueError): levels that are not finite and positive (before the final 0), or whose squares, which line 6
    computes, overflow their dtype."""
    host = levels.detach().cpu()
    body = host[:-1]
    n = body.numel()
    what = f"the noise levels ({levels.dtype})"
    if not bool(torch.isfinite(body).all()) or not bool((body > 0).all()):
        raise ValueError(f"{what} must be finite and positive: `sigma_min` and `sigma_max` (and `rho`) make "
                         f"{body[0].item():g} ... {body[-1].item():g}")
    g = EDM_CHURN.gamma(s_churn, n)
    inside = EDM_CHURN.in_range(body, s_min, s_max).tolist()
    if every_step:
        gammas = [g if k else EDM_CHURN.outside for k in inside]
    else:
        gammas = [g if s_churn > 0 and k else None for k in inside]
    churned = torch.tensor([gamma is not None for gamma in gammas])
    hat = EDM_CHURN.sigma_hat(body, g)
    if bool((churned & ~torch.isfinite(torch.maximum(hat, body) ** 2)).any()):
        raise ValueError(f"{what}: `sigma_max` makes a level whose square (line 6 computes t_hat ** 2) overflows "
                         f"{levels.dtype}")
    return EPlan(levels, gammas, s_noise, round_sigma)
