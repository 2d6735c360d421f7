"""The per-step scalars of Algorithm 2, computed like the reference computes them.

A ``Plan`` is the sequence of a run's steps from a scheduler's settings. It is lazy: step i's scalars
(sigma_i, gamma_i, sigma_hat, sigma_{i+1}, and the constants the fused kernels take) are computed when the
loop reaches step i, with the reference's 0-d float32 tensor operations, so nothing before step 1 grows
with the step count. Plans of small step counts are kept in a cache bounded in bytes and guarded by a
lock; a run puts its plan there only when it completes. Where the caller hands over the whole sigma
sequence (``sigmas_plan``: ``sample_karras_ve_sigmas``; ``kdiffusion_plan``: k-diffusion's samplers), it
is already in memory, so ``VectorPlan`` and ``KPlan`` compute the steps' floats ``CHUNK`` steps at a time
with elementwise ops over a slice of it, each element the same IEEE operation as the 0-d one, when a step
of the chunk is first asked for; they keep the last few chunks only, so what they hold beyond one float32
copy of the sequence does not grow with the step count either.

Steps hold plain floats (each exactly a float32 value) and hand out *new* 0-d tensors on every
access, so nothing a model or a callback receives can change a later call.
"""

from __future__ import annotations

import copy
import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._checks import check_bound, check_real
from .options import SCHEDULES
from .noise_levels import schedule_value


def _f32(x) -> float:
    """A 0-d tensor or number as the float32 value torch would use (exact in a Python float)."""
    return float(torch.as_tensor(x, dtype=torch.float32))


def reciprocal(s) -> float:
    """1 / s in float32 on the host: what torch on CUDA multiplies by when dividing by a CPU scalar."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.as_tensor(s, dtype=torch.float32))


# -- Algorithm 2, lines 4-6: gamma_i, the range test, sigma_hat and the churn's coefficient ---------------

GAMMA_CAP = 2**0.5 - 1  # gamma_i's cap sqrt(2) - 1 (the same float64 as EDM's np.sqrt(2) - 1)


@dataclass(frozen=True)
class ChurnRule:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max (else 0), sigma_hat = sigma_i +
    gamma_i sigma_i and line 6's c = sqrt(sigma_hat^2 - sigma_i^2), as one original rounds them. Every plan and
    every check of where they overflow computes them here, and only here.

    ``sigma`` is a tensor in the dtype the original computes in (the reference: float32 on the host; k-diffusion:
    the sigmas' dtype; EDM's would be float64): 0-d for one step (``at``) or 1-D for a chunk of steps (``over``),
    each element the same IEEE operations either way. gamma is a Python float (N, S_churn and the cap are
    Python numbers in every original), which torch rounds to sigma's dtype inside each op; the range test
    compares in sigma's dtype, inclusive at both ends.

    ``order``: ``"add"`` is ``sigma + gamma * sigma`` (the reference's; EDM's, which then rounds it with its net's
    ``round_sigma``), ``"scale"`` is ``sigma * (gamma + 1)`` (k-diffusion's: ``gamma + 1`` in Python floats).
    ``outside``: gamma outside the range, as the original writes it (the reference's int 0, k-diffusion's 0.).
    ``root``: how line 6's square root is taken: ``"pow"`` is ``** 0.5`` (the reference's, k-diffusion's),
    ``"sqrt"`` is ``.sqrt()`` (NVlabs' EDM and EDM2).
    """

    name: str
    order: str
    outside: float
    root: str = "pow"

    @staticmethod
    def gamma(s_churn, n: int) -> float:
        """gamma_i of a step inside the range: min(S_churn / N, sqrt(2) - 1)."""
        return min(s_churn / n, GAMMA_CAP)

    @staticmethod
    def in_range(sigma: torch.Tensor, s_min, s_max) -> torch.Tensor:
        """S_min <= sigma <= S_max, element by element."""
        return (sigma >= s_min) & (sigma <= s_max)

    def sigma_hat(self, sigma: torch.Tensor, gamma) -> torch.Tensor:
        """sigma + gamma sigma in this original's order of operations (``gamma`` a Python number)."""
        return sigma + gamma * sigma if self.order == "add" else sigma * (gamma + 1)

    def coefficient(self, sigma: torch.Tensor, sigma_hat: torch.Tensor) -> torch.Tensor:
        """Line 6's c: ``(sigma_hat ** 2 - sigma ** 2) ** 0.5`` (or ``.sqrt()``: ``root``)."""
        square = sigma_hat**2 - sigma**2
        return square.sqrt() if self.root == "sqrt" else square**0.5

    def at(self, sigma: torch.Tensor, s_churn, n: int, s_min, s_max) -> tuple:
        """One step, ``sigma`` 0-d: ``(sigma_hat, gamma_i)`` (gamma computed only inside the range, as there)."""
        gamma = self.gamma(s_churn, n) if bool(self.in_range(sigma, s_min, s_max)) else self.outside
        return self.sigma_hat(sigma, gamma), gamma

    def over(self, sigma: torch.Tensor, g: float, s_min, s_max) -> tuple:
        """A chunk of steps, ``sigma`` 1-D, ``g`` their ``gamma(...)``: ``(inside the range, sigma_hat)``, each
        element as ``at`` makes it."""
        inside = self.in_range(sigma, s_min, s_max)
        return inside, torch.where(inside, self.sigma_hat(sigma, g), self.sigma_hat(sigma, self.outside))


REFERENCE_CHURN = ChurnRule("reference", "add", 0)
K_DIFFUSION_CHURN = ChurnRule("k-diffusion", "scale", 0.0)
# NVlabs' EDM and EDM2 (``kve_fast.edm_plan``): "t_cur + gamma * t_cur" (EDM then through its net's round_sigma;
# EDM2 only where it churns, else t_hat is t_cur itself), gamma 0 outside the range, "(...).sqrt()"
EDM_CHURN = ChurnRule("edm", "add", 0, root="sqrt")


def churn_sigma(sigma, num_inference_steps: int, s_churn, s_min, s_max):
    """Algorithm 2, lines 4-5: ``(sigma_hat, gamma_i)`` as the reference rounds them (``sigma`` a 0-d float32
    tensor)."""
    return REFERENCE_CHURN.at(sigma, s_churn, num_inference_steps, s_min, s_max)


def churn_coefficient(sigma, sigma_hat) -> float:
    """c = sqrt(sigma_hat^2 - sigma^2), computed with the reference's 0-d float32 tensor ops."""
    return _f32(REFERENCE_CHURN.coefficient(torch.as_tensor(sigma), torch.as_tensor(sigma_hat)))


class Level(NamedTuple):
    """The scalars of one noise level a step's model is called at (sigma_hat, or sigma_{i+1}), as the fused
    kernels take them: ``half`` (sigma / 2, the score model's noise-level argument), ``sigma``, ``inverse``
    (1 / sigma in float32: what torch on CUDA multiplies by when it divides by a CPU scalar) and ``dt``
    (sigma_{i+1} - sigma_hat), each a Python float holding a float32 value. k-diffusion's convention uses
    ``sigma`` and ``dt`` only (its model takes sigma itself, and it divides truly): ``half`` and ``inverse``
    are 0.0 there."""

    half: float
    sigma: float
    inverse: float
    dt: float


def level_at(sigma, sigma_hat, sigma_next) -> Level:
    """``Level`` of ``sigma`` (sigma_hat or sigma_{i+1}) as the reference rounds it: 0-d float32 tensor ops."""
    sigma = torch.as_tensor(sigma)
    return Level(_f32(sigma / 2), _f32(sigma), reciprocal(sigma), _f32(sigma_next - sigma_hat))


class LevelValues(NamedTuple):
    """What an Euler (``feed.at_hat``) or Heun (``feed.at_next``) stage reads: the step, and its ``Level`` as
    floats or a device tensor of them."""

    step: object
    scalars: object


def _values(step) -> tuple:
    """``(LevelValues at sigma_hat, LevelValues at sigma_{i+1})`` of ``step``: what its Euler and Heun stages read
    in an eager run (``kve_fast.stages.HostFeed``), made once with the step."""
    return LevelValues(step, step.at_hat), LevelValues(step, step.at_next)


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


class Step:
    """One step of the reference's Algorithm 2: its noise levels and the constants the kernels take.

    Data (Python floats holding float32 values): ``index``, ``timestep``, ``gamma``, ``last`` (sigma_{i+1}
    is 0), ``noise_coef`` (sqrt(sigma_hat^2 - sigma^2), line 6), ``at_hat`` and ``at_next`` (``Level`` of
    sigma_hat and of sigma_{i+1}; ``at_next`` is None on the last step). ``sigma``, ``sigma_hat`` and
    ``sigma_next`` return new 0-d float32 CPU tensors, as the reference holds them (``sigma_next`` is the
    int 0 on the last step, as the reference's ``sigma_prev``), so nothing a model or a callback receives
    can change a later call.
    """

    __slots__ = ("index", "timestep", "gamma", "last", "_sigma", "_sigma_hat", "_sigma_next", "noise_coef", "at_hat",
                 "at_next", "values")

    def __init__(self, index: int, timestep: int, sigma: torch.Tensor, sigma_next, s_churn, s_min, s_max, n: int):
        sigma_hat, gamma = churn_sigma(sigma, n, s_churn, s_min, s_max)
        self.index, self.timestep, self.gamma = index, int(timestep), float(gamma)
        self.last = isinstance(sigma_next, int)
        self._sigma, self._sigma_hat = _f32(sigma), _f32(sigma_hat)
        self._sigma_next = 0.0 if self.last else _f32(sigma_next)
        self.noise_coef = churn_coefficient(sigma, sigma_hat)
        self.at_hat = level_at(sigma_hat, sigma_hat, sigma_next)
        self.at_next = None if self.last else level_at(sigma_next, sigma_hat, sigma_next)
        self.values = _values(self)

    @property
    def sigma(self) -> torch.Tensor:
        return _scalar(self._sigma)

    @property
    def sigma_hat(self) -> torch.Tensor:
        return _scalar(self._sigma_hat)

    @property
    def sigma_next(self) -> torch.Tensor | int:
        return 0 if self.last else _scalar(self._sigma_next)

    @classmethod
    def _of(cls, index: int, timestep: int, row: tuple) -> "Step":
        """The step of ``_step_rows``' ``row``: the same data as ``Step(...)`` computes (see ``VectorPlan``)."""
        step = cls.__new__(cls)
        step.index, step.timestep = index, timestep
        (step.gamma, step.last, step._sigma, step._sigma_hat, step._sigma_next, step.noise_coef, step.at_hat,
         step.at_next) = row
        step.values = _values(step)
        return step

    def __repr__(self) -> str:
        return (f"Step(index={self.index}, sigma={self._sigma!r}, sigma_hat={self._sigma_hat!r}, "
                f"sigma_next={self._sigma_next!r}, gamma={self.gamma!r})")


class _LazySteps(Sequence):
    """Steps made on access by ``_make(i)``; the last two made are kept, since the loop asks for steps i and
    i+1 together (step i's stages fuse step i+1's churn). ``n``: the number of steps; ``memo``: keep every
    step (cached plans)."""

    def __init__(self, n: int, memo: bool = False):
        self._n = n
        self._memo = [None] * n if memo else None
        self._recent = ((None, None), (None, None))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        (i0, s0), (i1, s1) = self._recent  # the loop's accesses: steps i and i+1, again and again
        if i == i1 and i1 is not None:
            return s1
        if i == i0 and i0 is not None:
            return s0
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        if self._memo is not None and self._memo[i] is not None:
            return self._memo[i]
        for made_i, made in self._recent:  # (a negative index, now made positive)
            if made_i == i:
                return made
        step = self._make(i)
        if self._memo is not None:
            self._memo[i] = step  # an atomic store: racing threads compute the same values
        self._recent = (self._recent[1], (i, step))  # one tuple store: safe to read from another thread
        return step

    def __iter__(self):
        return (self[i] for i in range(self._n))

    def _make(self, i: int):
        raise NotImplementedError


class Plan(_LazySteps):
    """The steps of one run, computed on first access (see the module docstring).

    ``sigma_at(k)`` is the k-th noise level of the descending sequence (a 0-d float32 tensor), for
    k < ``len(plan)``; after the last one comes 0. ``memo``: keep computed steps (for cached plans).
    """

    def __init__(self, n: int, sigma_at, s_churn, s_min, s_max, memo: bool):
        super().__init__(n, memo)
        self._sigma_at, self._churn = sigma_at, (s_churn, s_min, s_max)

    def _make(self, i: int) -> Step:
        sigma_next = self._sigma_at(i + 1) if i + 1 < self._n else 0
        return Step(i, self._n - 1 - i, self._sigma_at(i), sigma_next, *self._churn, self._n)


CHUNK = 1024  # steps whose floats a whole-sequence plan computes together (tests set a small one)
CHUNKS_KEPT = 3  # the chunks it keeps: the loop's current and next, and the graph runner's first or last


class _Chunks:
    """The rows of steps ``0 .. n - 1`` (what ``make(lo, hi)`` computes for steps ``lo .. hi - 1``), made ``CHUNK``
    at a time when a step of the chunk is first asked for; the ``CHUNKS_KEPT`` chunks made last are kept. The loop
    walks forward asking for steps i and i + 1, and the graph runner asks for the first and the last steps
    before it: a chunk is made once in a run, and the memory held does not grow with n."""

    def __init__(self, n: int, make):
        self._n, self._make, self._size = n, make, CHUNK
        self._kept = ()  # ((first step, rows), ...), the newest last; replaced whole (one store)
        self._replaced: dict = {}  # step -> its row, where it is not what make() gives (KPlan.reread)

    def replace(self, i: int, row) -> None:
        """Step ``i``'s row is ``row`` from now on."""
        self._replaced = {**self._replaced, i: row}

    def __getitem__(self, i: int):
        if self._replaced and i in self._replaced:
            return self._replaced[i]
        start = i - i % self._size
        for first, rows in self._kept:
            if first == start:
                return rows[i - first]
        rows = self._make(start, min(start + self._size, self._n))
        self._kept = (self._kept + ((start, rows),))[-CHUNKS_KEPT:]
        return rows[i - start]


class VectorPlan(_LazySteps):
    """``Plan``'s steps over float32 CPU tensors known whole: ``sigma`` (step i's sigma_i) and ``nxt`` (its
    sigma_{i+1}, 0 on the last step). Their floats come from a few elementwise ops over a chunk of them
    (``_Chunks``; each element is the reference's 0-d float32 op on that element: the same IEEE operation),
    not a dozen 0-d tensor ops per step. ``gamma_n``: what gamma_i divides S_churn by (the scheduler's
    ``num_inference_steps``; default: the number of steps); ``timesteps``: each step's timestep (default:
    n - 1 - i); ``to_zero``: the last step goes to sigma = 0 (the int 0, as the reference's), not to its ``nxt``.
    tests/test_plan.py checks every field against ``Step``'s 0-d arithmetic."""

    def __init__(self, sigma: torch.Tensor, nxt: torch.Tensor, s_churn, s_min, s_max, gamma_n: int | None = None,
                 timesteps: torch.Tensor | None = None, to_zero: bool = True):
        super().__init__(sigma.numel())
        g = REFERENCE_CHURN.gamma(s_churn, self._n if gamma_n is None else gamma_n)
        self._timesteps = timesteps
        self._rows = _Chunks(self._n, lambda lo, hi: _step_rows(sigma[lo:hi], nxt[lo:hi], to_zero and hi == self._n,
                                                                 g, s_min, s_max))

    def _make(self, i: int) -> Step:
        t = self._n - 1 - i if self._timesteps is None else int(self._timesteps[i])
        return Step._of(i, t, self._rows[i])


def _step_rows(sigma: torch.Tensor, nxt: torch.Tensor, ends: bool, g, s_min, s_max) -> list:
    """``(gamma, last, sigma, sigma_hat, sigma_next, noise_coef, at_hat, at_next)`` of the steps at ``sigma`` (to
    ``nxt``), as ``Step`` computes them (``churn_sigma`` with gamma ``g``, ``churn_coefficient``, ``level_at``),
    element by element; ``ends``: the last of these is the run's step to sigma = 0."""
    churned, hat = REFERENCE_CHURN.over(sigma, g, s_min, s_max)
    coef = REFERENCE_CHURN.coefficient(sigma, hat)
    one = torch.ones_like(hat)
    dt = nxt - hat  # (the last step's sigma_{i+1} is the int 0 there: 0 - sigma_hat, the same op)
    last_at = sigma.numel() - 1 if ends else -1
    rows = []
    for c, s, h, s_next, k, h_half, h_inv, d, n_half, n_inv in zip(
            churned.tolist(), sigma.tolist(), hat.tolist(), nxt.tolist(), coef.tolist(), (hat / 2).tolist(),
            (one / hat).tolist(), dt.tolist(), (nxt / 2).tolist(), (one / nxt).tolist()):
        last = len(rows) == last_at
        at_next = None if last else Level(n_half, s_next, n_inv, d)
        rows.append((g if c else 0.0, last, s, h, 0.0 if last else s_next, k, Level(h_half, h, h_inv, d), at_next))
    return rows


# -- the plan cache ------------------------------------------------------------------------------------

STEP_BYTES = 1024  # a memoized step (object, floats, tuples), rounded up; measured in tests/test_plan.py
CACHE_BYTES = 16 * 2**20  # all cached plans together
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _plan_bytes(n: int) -> int:
    return 256 + n * (STEP_BYTES + 8)


def plan_cache_info() -> dict:
    """``{"plans": count, "bytes": estimated bytes, "max_bytes": the bound}`` of the plan cache."""
    with _CACHE_LOCK:
        return {"plans": len(_CACHE), "bytes": sum(_plan_bytes(len(p)) for p in _CACHE.values()),
                "max_bytes": CACHE_BYTES}


def clear_plan_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _config_key(scheduler):
    try:
        key = (type(scheduler), tuple(sorted((k, v) for k, v in scheduler.config.items() if not k.startswith("_"))))
        hash(key)
    except TypeError:  # an unhashable config value: no caching
        return None
    return key


class PlanHandle:
    """A plan for one run, and ``commit()`` to cache it once the run has completed."""

    def __init__(self, plan: Plan, key):
        self.plan, self._key = plan, key

    def commit(self) -> None:
        """Cache the plan (most recently used last), evicting the least recently used beyond the bound."""
        if self._key is None or _plan_bytes(len(self.plan)) > CACHE_BYTES // 4:
            return
        with _CACHE_LOCK:
            _CACHE[self._key] = self.plan
            _CACHE.move_to_end(self._key)
            total = sum(_plan_bytes(len(p)) for p in _CACHE.values())
            while total > CACHE_BYTES and len(_CACHE) > 1:
                _, old = _CACHE.popitem(last=False)
                total -= _plan_bytes(len(old))


def scheduler_plan(scheduler, n: int, source: str) -> PlanHandle:
    """The steps of an ``n``-step run (``n`` checked) with ``scheduler``'s settings (not modifying it), from where
    ``source`` says (the front's ``kve_fast.karras_ve_scheduler.schedule_source(scheduler)``): ``"config"``, or ``"methods"``
    for a subclass that makes its schedule its own way (planned from what its methods make: ``subclass_plan``;
    not cached)."""
    if source == "methods":
        return PlanHandle(subclass_plan(scheduler, n), None)
    c = scheduler.config
    key = _config_key(scheduler)
    key = None if key is None else (key, n)
    if key is not None:
        with _CACHE_LOCK:
            plan = _CACHE.get(key)
        if plan is not None:
            return PlanHandle(plan, key)
    name, sigma_min, sigma_max, rho = c.get("sigma_schedule", "diffusers"), c.sigma_min, c.sigma_max, c.get("rho", 7.0)

    def sigma_at(k: int) -> torch.Tensor:
        # step k runs at schedule[timesteps[k]] = schedule[n - 1 - k] (the reference's indexing)
        return schedule_value(name, n - 1 - k, n, sigma_min, sigma_max, rho)

    memo = key is not None and _plan_bytes(n) <= CACHE_BYTES // 4
    return PlanHandle(Plan(n, sigma_at, c.s_churn, c.s_min, c.s_max, memo), key)


def subclass_plan(scheduler, n: int) -> "VectorPlan":
    """The steps of a scheduler subclass's own schedule, as diffusers' pipeline takes them: ``set_timesteps(n)``
    (on a copy), then for each ``t`` of ``timesteps``: sigma = ``schedule[t]``, sigma_prev = ``schedule[t - 1]``
    if t > 0 else 0, gamma_i = min(S_churn / ``num_inference_steps``, sqrt(2) - 1), with the reference's float32
    rounding (``VectorPlan``). What kve_fast cannot run as diffusers would is refused, naming the method: a
    schedule that is not a 1-D float32 tensor (another dtype changes every step's rounding), timesteps that are
    not integers indexing it, with t = 0 before the last step (a step to 0 then 0 again: kve_fast's steps end at
    0 only at the end), noise levels that are not finite and positive in float32."""
    made = copy.deepcopy(scheduler)
    made.set_timesteps(n)
    where = f"{type(scheduler).__qualname__}.set_timesteps({n})"
    schedule, steps = made.schedule, made.num_inference_steps
    if not isinstance(schedule, torch.Tensor) or schedule.dtype != torch.float32 or schedule.dim() != 1:
        raise TypeError(f"`scheduler`: {where} made a `schedule` that is not a 1-D float32 tensor ({schedule!r:.80}): "
                        "kve_fast runs the reference's float32 step arithmetic")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise TypeError(f"`scheduler`: {where} left `num_inference_steps` = {steps!r}, which gamma is divided by")
    try:
        t = torch.as_tensor(made.timesteps).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dim() != 1 or not t.numel() or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`scheduler`: {where} made `timesteps` that are not a 1-D sequence of ints")
    t, sched = t.to(torch.int64), schedule.detach().cpu()
    if not bool(((t >= 0) & (t < sched.numel())).all()) or bool((t[:-1] == 0).any()):
        raise TypeError(f"`scheduler`: {where} made `timesteps` that do not index its schedule, or reach 0 before "
                        "the last step (kve_fast's runs step to sigma = 0 at their end only)")
    to_zero = int(t[-1]) == 0
    sigma = sched[t]
    nxt = torch.cat([sched[t[:-1] - 1], sched.new_zeros(1) if to_zero else sched[t[-1:] - 1]])
    visited = torch.cat([sigma, nxt[:-1] if to_zero else nxt])
    if not bool((torch.isfinite(visited) & (visited > 0)).all()):
        raise ValueError(f"`scheduler`: {where} made noise levels that are not finite and positive")
    c = made.config
    why = _float32_range_problem(float(visited.max()), float(visited.min()), churn=c.s_churn > 0)
    if why:
        raise ValueError(f"`scheduler`: the noise levels {where} made {why}")
    return VectorPlan(sigma, nxt, c.s_churn, c.s_min, c.s_max, gamma_n=steps, timesteps=t, to_zero=to_zero)


def sigmas_plan(sigmas, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf")) -> Plan:
    """Steps for a user's descending ``sigmas`` (ending in 0), with the reference's per-step rounding."""
    check_real("s_churn", s_churn, minimum=0)
    s_tmin = check_bound("s_tmin", s_tmin, minimum=0, finite=True)
    s_tmax = check_bound("s_tmax", s_tmax)
    check_churn_range(s_tmin, s_tmax, ("s_tmin", "s_tmax"))
    try:
        sig = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"`sigmas` must be a 1-D sequence of numbers: {exc}") from None
    if sig.dim() != 1 or sig.numel() < 2:
        raise ValueError(f"`sigmas` must be 1-D with at least 2 values (the last one 0), got shape {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()) or float(sig[-1]) != 0 or not bool((sig[:-1] > 0).all()):
        raise ValueError("`sigmas` must be finite, positive, and end with a single 0")
    if not bool((sig[1:] <= sig[:-1]).all()):
        raise ValueError("`sigmas` must be non-increasing")
    n = sig.numel() - 1
    why = _float32_range_problem(float(sig[0]), float(sig[n - 1]), churn=s_churn > 0)
    if why:
        raise ValueError(f"`sigmas` {why}")
    if not isinstance(sigmas, (list, tuple)):  # (a tensor or array may share its memory with sig)
        sig = sig.clone()  # the floats are made as the run goes: from the sigmas as the call got them
    return VectorPlan(sig[:-1], sig[1:], s_churn, s_tmin, s_tmax)


# -- settings whose float32 arithmetic stays finite ------------------------------------------------------


def _float32_range_problem(high: float, low: float, churn: bool = True) -> str:
    """Why noise levels in [low, high] break the reference's float32 step arithmetic ('' if they do not).

    Every step computes sigma**2 and sigma_hat**2 (sigma_hat <= sqrt(2) sigma with churn), divides by
    sigma_hat and sigma_{i+1}, and calls the model at sigma / 2: all must be finite and non-zero.
    """
    top = torch.tensor(high, dtype=torch.float32)
    bottom = torch.tensor(low, dtype=torch.float32)
    if not math.isfinite(float(top)) or not float(top) > 0:
        return f"reach {high:g}, which is not a finite positive float32"
    hat = REFERENCE_CHURN.sigma_hat(top, GAMMA_CAP) if churn else top
    if not math.isfinite(float(hat * hat)):
        return f"reach {high:g}, whose square (sigma**2, computed every step) overflows float32"
    if not float(bottom) > 0 or not float(bottom / 2) > 0:
        return f"go down to {low:g}, which is 0 in float32"
    if not math.isfinite(reciprocal(bottom)):
        return f"go down to {low:g}, whose reciprocal overflows float32"
    return ""


def check_churn_range(s_min, s_max, names: tuple = ("s_min", "s_max")) -> None:
    """The churn's range [S_min, S_max] is not empty (two real numbers; ``names``: the arguments'). The command
    line checks its --s-min and --s-max with it before loading a model."""
    if s_min > s_max:
        raise ValueError(f"`{names[0]}` ({s_min}) must not be larger than `{names[1]}` ({s_max})")


def check_sampler_config(sigma_min, sigma_max, s_noise, s_churn, s_min, s_max, sigma_schedule="diffusers",
                         rho=7.0) -> None:
    """Check a scheduler's settings, including that its float32 noise levels are finite and positive."""
    check_real("sigma_min", sigma_min, positive=True)
    check_real("sigma_max", sigma_max, positive=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"`sigma_min` ({sigma_min}) must be smaller than `sigma_max` ({sigma_max})")
    check_real("s_noise", s_noise, minimum=0)
    check_real("s_churn", s_churn, minimum=0)
    check_real("s_min", s_min, minimum=0)
    check_real("s_max", s_max, minimum=0)
    check_churn_range(s_min, s_max)
    if not isinstance(sigma_schedule, str) or sigma_schedule not in SCHEDULES:
        raise ValueError(f"`sigma_schedule` must be one of {SCHEDULES}, got {sigma_schedule!r}")
    check_real("rho", rho, positive=True)
    # The schedules are monotone between their two ends: check the ends of a 2-step schedule.
    what = {"diffusers": "the reference schedule runs from sigma_max**2 down to sigma_min**2 and would",
            "ve": "the schedule would", "edm": "the schedule would"}[sigma_schedule]
    for name, shown, t in (("sigma_max", sigma_max, 1), ("sigma_min", sigma_min, 0)):
        try:
            value = float(schedule_value(sigma_schedule, t, 2, sigma_min, sigma_max, rho))
        except (OverflowError, ZeroDivisionError):
            raise ValueError(f"`{name}` ({shown!r}): {what} overflow a float") from None
        if name == "sigma_max":
            why = _float32_range_problem(value, 1.0, churn=s_churn > 0 and s_max > 0)
        else:
            why = _float32_range_problem(1.0, value)
        if why:
            raise ValueError(f"`{name}` ({shown!r}): {what} {why}")


# -- k-diffusion's convention ----------------------------------------------------------------------------


class KStep:
    """One step of k-diffusion's ``sample_heun`` / ``sample_euler``, with its scalar arithmetic.

    k-diffusion computes ``gamma`` in Python, ``sigma_hat = sigmas[i] * (gamma + 1)``, the churn
    coefficient ``(sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5`` (applied only where gamma > 0) and
    ``dt = sigmas[i + 1] - sigma_hat`` as 0-d float32 tensors on the sigmas' device. The multiplies and
    subtractions are IEEE float32 operations, so the same ops on a CPU copy give the same bits without a
    device round trip. The churn coefficient's powers are not: on CUDA, ``** 2`` and ``** 0.5`` gave a
    value 1 ulp away from the CPU's in 13 of 1,100 churned steps (H100, bench/kdiffusion_check.py), so on
    another device it is computed there, for all steps at once (``device_churn``). The device tensors the
    model and the callback receive are computed on the device with k-diffusion's own expressions
    (``sigma_hat_on_device``).

    Data as in ``Step``: ``index``, ``gamma``, ``last``, ``noise_coef`` (None where gamma = 0: no churn),
    ``at_hat`` and ``at_next`` (``Level``s with ``sigma`` and ``dt``; None on the last step).
    """

    __slots__ = ("index", "gamma", "last", "noise_coef", "at_hat", "at_next", "values", "_sigmas", "_hat", "_hat_version")

    def __init__(self, index: int, sigmas, row: tuple, hat: torch.Tensor | None = None):
        self.index, self._sigmas = index, sigmas
        self.gamma, self.last, self.noise_coef, sigma_hat, sigma_next, dt = row
        self.at_hat = Level(0.0, sigma_hat, 0.0, dt)
        self.at_next = None if self.last else Level(0.0, sigma_next, 0.0, dt)
        self.values = _values(self)
        self._hat, self._hat_version = hat, None if hat is None else hat._version

    @property
    def sigma(self) -> torch.Tensor:
        """``sigmas[i]``, on the sigmas' device."""
        return self._sigmas[self.index]

    @property
    def sigma_next(self) -> torch.Tensor:
        return self._sigmas[self.index + 1]

    def sigma_hat_on_device(self) -> torch.Tensor:
        """``sigmas[i] * (gamma + 1)`` computed as k-diffusion does, on the sigmas' device (no sync): one tensor
        for the step, as k-diffusion's ``sigma_hat`` is (the callback gets it, and its line 8 reads it)."""
        if self._hat is None:
            self._hat = K_DIFFUSION_CHURN.sigma_hat(self._sigmas[self.index], self.gamma)
            self._hat_version = self._hat._version
        return self._hat

    def hat_edited(self) -> bool:
        """Whether the step's ``sigma_hat`` tensor was edited in place (by a callback) since it was made."""
        return self._hat is not None and self._hat._version != self._hat_version


class KPlan(_LazySteps):
    """The steps of a k-diffusion-convention run over ``sigmas`` (computed on access).

    The host floats of the steps (``KStep``'s) come from a few elementwise ops over a chunk of the CPU copy of
    the sigmas (``_Chunks``): each element is what k-diffusion's 0-d expression gives (the same IEEE operation
    per element, in the sigmas' dtype, then rounded to float32 as ``_f32`` rounds), without a dozen 0-d tensor
    ops per step."""

    def __init__(self, sigmas: torch.Tensor, sigmas_cpu: torch.Tensor, s_churn, s_tmin, s_tmax):
        super().__init__(max(sigmas_cpu.numel() - 1, 0))
        self.sigmas = sigmas
        self._churn = (s_churn, s_tmin, s_tmax)
        self._read(sigmas_cpu)

    def _read(self, cpu: torch.Tensor) -> None:
        """Plan every step from ``cpu``, the sigmas as read now (their version is remembered)."""
        sigmas, (s_churn, s_tmin, s_tmax) = self.sigmas, self._churn
        self._cpu, self._version = cpu, sigmas._version
        self._device_churn = device_churn(sigmas, s_churn) if sigmas.device.type != "cpu" else None
        g = K_DIFFUSION_CHURN.gamma(s_churn, self._n) if self._n else 0.0
        self._rows = _Chunks(self._n, lambda lo, hi: _kstep_rows(
            cpu[lo:hi], cpu[lo + 1:hi + 1], g, s_tmin, s_tmax,
            None if self._device_churn is None else self._device_churn[lo:hi]))
        self._recent = ((None, None), (None, None))

    def _make(self, i: int) -> KStep:
        return KStep(i, self.sigmas, self._rows[i])

    def reread(self, step: KStep) -> KStep | None:
        """k-diffusion reads ``sigmas`` as its loop goes, and its line 8 reads the very ``sigma_hat`` it handed
        the callback: if either was edited in place since (through any torch op: a version counter moved),
        ``step`` is returned as k-diffusion finishes it (its gamma and churn as they were; dt, sigma_{i+1} and
        the Heun correction from the values now) and the later steps are planned again from the sigmas now.
        None if neither was edited."""
        sigmas_edited = self.sigmas._version != self._version
        if not (sigmas_edited or step.hat_edited()):
            return None
        i, old = step.index, self._cpu
        gamma, _, coef, *_ = self._rows[i]
        if sigmas_edited:
            cpu = self.sigmas.detach().cpu()
            self._read(cpu.clone() if cpu.data_ptr() == self.sigmas.data_ptr() else cpu)
        if step.hat_edited():
            hat = step.sigma_hat_on_device().detach().cpu()
        else:
            hat = K_DIFFUSION_CHURN.sigma_hat(old[i], gamma)  # k-diffusion's, made from sigmas[i] before the edit
        nxt = self._cpu[i + 1]
        row = (gamma, bool(nxt == 0), coef, _f32(hat), _f32(nxt), _f32(nxt - hat))
        self._rows.replace(i, row)
        self._recent = ((None, None), (None, None))
        return KStep(i, self.sigmas, row, step.sigma_hat_on_device())


def _kstep_rows(sig: torch.Tensor, nxt: torch.Tensor, g, s_tmin, s_tmax, churn: torch.Tensor | None) -> list:
    """``(gamma, last, noise_coef, sigma_hat, sigma_next, dt)`` of the steps from ``sig`` to ``nxt``, as Python
    floats and bools: k-diffusion's ``gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax
    else 0.`` (``g`` is the min), ``sigma_hat = sigmas[i] * (gamma + 1)``, the churn coefficient
    ``(sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5`` (None where gamma is 0; ``churn``'s value where it was computed
    on the sigmas' device) and ``dt = sigmas[i + 1] - sigma_hat``, each an elementwise op in the sigmas' dtype
    like k-diffusion's 0-d one, the floats rounded to float32."""
    n = sig.numel()
    inside, hat = K_DIFFUSION_CHURN.over(sig, g, s_tmin, s_tmax)
    churned = inside if g > 0 else torch.zeros(n, dtype=torch.bool)  # (k-diffusion churns where gamma > 0)
    f32 = lambda t: t.to(torch.float32).tolist()  # noqa: E731 - (as _f32 rounds, element by element)
    if not bool(churned.any()):
        coefs = [None] * n
    elif churn is not None:
        coefs = churn.tolist()  # (its own dtype's values, as float(churn[i]) gives them)
    else:
        coefs = f32(K_DIFFUSION_CHURN.coefficient(sig, hat))
    rows = []
    for c, last, coef_i, h, s_next, dt in zip(churned.tolist(), (nxt == 0).tolist(), coefs, f32(hat), f32(nxt),
                                              f32(nxt - hat)):
        rows.append((g if c else 0.0, last, coef_i if c else None, h, s_next, dt))
    return rows


def device_churn(sigmas: torch.Tensor, s_churn: float) -> torch.Tensor | None:
    """k-diffusion's churn coefficient ``(sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5`` for every step, with
    its ops on the sigmas' device (one launch per op and one copy to the host for the whole run). Each
    element is what k-diffusion's 0-d expression gives on that device: elementwise kernels apply the same
    per-element function at any size. The steps where gamma is 0 (outside [s_tmin, s_tmax]) do not use
    their value. A CPU tensor in the sigmas' dtype with one value per step (n = len(sigmas) - 1), or None without
    churn. (Only float32 values reach a kernel: other dtypes run the torch ops, which use the device's own.)"""
    n = sigmas.numel() - 1
    if s_churn <= 0 or n < 1:
        return None
    rule, sigma = K_DIFFUSION_CHURN, sigmas[:-1]
    return rule.coefficient(sigma, rule.sigma_hat(sigma, rule.gamma(s_churn, n))).cpu()


def kdiffusion_plan(sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf")) -> KPlan:
    """Check k-diffusion's arguments and plan its steps.

    ``sigmas`` is what k-diffusion's samplers take: a 1-D floating-point tensor of any dtype, in any order
    (ComfyUI's FlipSigmas ascends, its SplitSigmas can leave one value), zeros anywhere; step i goes from
    ``sigmas[i]`` to ``sigmas[i + 1]`` and has a Heun correction unless ``sigmas[i + 1]`` is 0. Refused: a
    churned step (gamma > 0) whose ``sigma_hat ** 2``, which k-diffusion computes there, overflows the
    sigmas' dtype (k-diffusion would go on with inf and NaN). Fewer than two values: no step (the callers
    return x as it is, as k-diffusion does).
    """
    check_real("s_churn", s_churn, minimum=0)
    s_tmin, s_tmax = check_bound("s_tmin", s_tmin), check_bound("s_tmax", s_tmax)
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point():
        raise TypeError(f"`sigmas` must be a floating-point torch.Tensor (as k-diffusion's get_sigmas_* return), "
                        f"got {type(sigmas).__name__}")
    if sigmas.dim() != 1:
        raise ValueError(f"`sigmas` must be 1-D, got shape {tuple(sigmas.shape)}")
    cpu = sigmas.detach().cpu()
    if cpu.data_ptr() == sigmas.data_ptr():
        cpu = cpu.clone()  # the host floats are made as the run goes: from the sigmas as the call got them
    n = cpu.numel() - 1
    if n >= 1 and s_churn > 0:
        sig = cpu[:-1]
        churned, hat = K_DIFFUSION_CHURN.over(sig, K_DIFFUSION_CHURN.gamma(s_churn, n), s_tmin, s_tmax)
        overflow = churned & torch.isfinite(sig) & ~torch.isfinite(hat * hat)
        if bool(overflow.any()):
            k = int(overflow.nonzero()[0])
            raise ValueError(f"`sigmas`[{k}] = {float(sig[k]):g} is churned (s_tmin <= sigma <= s_tmax) and its "
                             f"sigma_hat ** 2 overflows {sigmas.dtype}")
    return KPlan(sigmas.detach(), cpu, s_churn, s_tmin, s_tmax)
