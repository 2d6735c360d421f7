"""``KarrasVeScheduler``: the reference scheduler's API and arithmetic, with its inputs checked.

A drop-in for ``diffusers.schedulers.deprecated.scheduling_karras_ve.KarrasVeScheduler``: the same
config fields and defaults, the same ``set_timesteps`` / ``add_noise_to_input`` / ``step`` /
``step_correct`` results bit for bit, and diffusers-style config files, so it also works inside
diffusers' own ``KarrasVePipeline``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ._checks import check_int
from .noise import draw_randn
from .ops import step_torch
from .plan import check_sampler_config, churn_sigma
from .noise_levels import make_schedule


def diffusers_class():
    """diffusers' own ``KarrasVeScheduler`` class (imported when first asked for), or None where diffusers lacks it."""
    try:
        from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as reference
    except ImportError:
        return None
    return reference


# What diffusers' KarrasVePipeline calls of a scheduler besides init_noise_sigma: set_timesteps, then timesteps and
# schedule, and each step's arithmetic; ours also routes them through make_schedule (made when first read) and
# churn_sigma. A subclass's schedule is planned from what its own methods make; the fused steps cannot honour a
# subclass's step arithmetic.
SCHEDULE_MEMBERS = ("set_timesteps", "timesteps", "schedule")
STEP_MEMBERS = ("add_noise_to_input", "step", "step_correct")
_OURS_ALSO = {SCHEDULE_MEMBERS: ("make_schedule", "_materialize"), STEP_MEMBERS: ("churn_sigma",)}


def _overrides(scheduler, base: type, names: tuple) -> list:
    """The members of ``names`` (and what ours routes them through) that ``scheduler`` defines other than ``base``
    does: in a class before ``base`` in its method order, or as a function on the instance itself."""
    if base is KarrasVeScheduler:
        names = names + _OURS_ALSO[names]
    mro = type(scheduler).__mro__
    own = getattr(scheduler, "__dict__", {})
    return [name for name in names
            if any(name in vars(k) for k in mro[:mro.index(base)]) or callable(own.get(name))]


def schedule_source(scheduler) -> str:
    """Where a run takes ``scheduler``'s noise levels from: ``"config"`` (kve_fast's or diffusers' class with its
    own schedule, made from the config; also any other object) or ``"methods"`` (a subclass, or an instance, that
    replaces how the schedule is made: planned from what its ``set_timesteps``, ``timesteps`` and ``schedule``
    give, as diffusers' pipeline takes them). One that replaces the per-step arithmetic is a TypeError naming
    its class and the methods."""
    base = KarrasVeScheduler if isinstance(scheduler, KarrasVeScheduler) else diffusers_class()
    if base is None or not isinstance(scheduler, base):
        return "config"
    replaced = _overrides(scheduler, base, STEP_MEMBERS)
    if replaced:
        methods = ", ".join(f"`{name}`" for name in replaced)
        raise TypeError(f"`scheduler` is a {type(scheduler).__module__}.{type(scheduler).__qualname__}, which replaces "
                        f"{methods} of {base.__module__}.{base.__name__}: kve_fast runs that arithmetic in its own "
                        "fused steps and cannot honour the change (diffusers' own pipeline runs it)")
    return "methods" if _overrides(scheduler, base, SCHEDULE_MEMBERS) else "config"


@dataclass
class KarrasVeOutput(BaseOutput):
    """Output of ``step`` / ``step_correct``: the next sample, the derivative and the denoised estimate."""

    prev_sample: torch.Tensor
    derivative: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class KarrasVeScheduler(SchedulerMixin, ConfigMixin):
    """Stochastic sampler of Karras et al. (2022), Algorithm 2, for variance-exploding models.

    Args:
        sigma_min: smallest noise level of Table 1's VE column (the schedule ends at sigma_min**2).
        sigma_max: largest noise level (the schedule starts at sigma_max**2; initial noise std).
        s_noise: S_noise, scale of the churn noise (paper: 1.000 to 1.011).
        s_churn: S_churn, overall amount of stochasticity (gamma_i = min(S_churn / N, sqrt(2) - 1)).
        s_min, s_max: the sigma range [S_tmin, S_tmax] in which churn is applied.
        sigma_schedule: ``"diffusers"`` (default: the reference's, bit-exact; it uses Table 1's VE t_i directly
            as sigma, from sigma_max**2 down to sigma_min**2), ``"ve"`` (Table 1's VE column as the paper
            means it: sigma_i = sqrt(t_i), sigma_max down to sigma_min) or ``"edm"`` (Eq. 5 with ``rho``).
        rho: the EDM schedule's exponent (paper: 7).
    """

    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
        s_noise: float = 1.007,
        s_churn: float = 80,
        s_min: float = 0.05,
        s_max: float = 50,
        sigma_schedule: str = "diffusers",
        rho: float = 7.0,
    ):
        check_sampler_config(sigma_min, sigma_max, s_noise, s_churn, s_min, s_max, sigma_schedule, rho)
        self.init_noise_sigma = sigma_max
        self.num_inference_steps: int | None = None
        self._schedule_device = None
        self._made: tuple | None = None  # (timesteps, schedule), made on first read

    @property
    def timesteps(self) -> torch.Tensor | None:
        """``[N - 1, ..., 0]`` after ``set_timesteps(N)`` (made on first read), else None."""
        made = self._materialize()
        return None if made is None else made[0]

    @timesteps.setter
    def timesteps(self, value) -> None:
        made = self._materialize()  # (a subclass's set_timesteps may replace one of the two after super()'s)
        self._made = (value, None if made is None else made[1])

    @property
    def schedule(self) -> torch.Tensor | None:
        """sigma(t_i), ascending, indexed by ``timesteps`` (the reference's, bit for bit; made on first read)."""
        made = self._materialize()
        return None if made is None else made[1]

    @schedule.setter
    def schedule(self, value) -> None:
        made = self._materialize()
        self._made = (None if made is None else made[0], value)

    def _materialize(self):
        if self._made is None and self.num_inference_steps is not None:
            self._made = self.make_schedule(self.num_inference_steps, self._schedule_device)
        return self._made

    # -- configs diffusers' own class loads without a word -------------------------------------------------------

    _EXTRAS = {"sigma_schedule": "diffusers", "rho": 7.0}  # kve_fast's settings, and their defaults
    _EXTRAS_KEY = "_kve_fast"  # a private key: diffusers drops keys that start with "_" without a warning

    def to_json_string(self) -> str:
        """The config as diffusers writes it, with kve_fast's own settings (``sigma_schedule``, ``rho``) left out
        where they are the defaults and kept under ``_kve_fast`` otherwise, so that diffusers'
        ``KarrasVeScheduler`` loads the file without warning about them (and ignores them, as it must)."""
        config = json.loads(super().to_json_string())
        extras = {k: config.pop(k) for k in self._EXTRAS if k in config}
        extras = {k: v for k, v in extras.items() if v != self._EXTRAS[k]}
        if extras:
            config[self._EXTRAS_KEY] = extras
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' ``extract_init_dict``, with kve_fast's settings read from where ``to_json_string`` puts them:
        under ``_kve_fast``, or left out where they are the defaults. Both are put back as given, so diffusers
        counts neither among the values it filled in (``_use_default_values``) and the private key stays out of
        the config: a saved and reloaded config equals the saved one, as diffusers' own does."""
        config_dict = dict(config_dict)
        extras = config_dict.pop(cls._EXTRAS_KEY, None)
        extras = extras if isinstance(extras, dict) else {}
        for name, default in cls._EXTRAS.items():
            config_dict.setdefault(name, extras.get(name, default))
        return super().extract_init_dict(config_dict, **kwargs)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity, for interchangeability with schedulers that scale the model input."""
        return sample

    def make_schedule(self, num_inference_steps: int, device=None):
        """Return ``(timesteps, schedule)`` for ``num_inference_steps`` without changing the scheduler."""
        check_int("num_inference_steps", num_inference_steps, 2)
        c = self.config
        return make_schedule(c.get("sigma_schedule", "diffusers"), num_inference_steps, c.sigma_min, c.sigma_max,
                             c.get("rho", 7.0), device)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """Set ``timesteps`` and the noise levels ``schedule`` (bitwise the reference's). Both are made when
        first read, so a call with a huge step count (which the sampler plans one step at a time) costs
        nothing here."""
        check_int("num_inference_steps", num_inference_steps, 2)
        self.num_inference_steps = num_inference_steps
        self._schedule_device = device
        self._made = None

    def churn_sigma(self, sigma, num_inference_steps: int | None = None):
        """Algorithm 2, lines 4-5: gamma_i and sigma_hat = sigma + gamma_i * sigma, as the reference rounds them."""
        n = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        if n is None:
            raise ValueError("call `set_timesteps` before adding churn noise (num_inference_steps is unset)")
        return churn_sigma(sigma, n, self.config.s_churn, self.config.s_min, self.config.s_max)

    def add_noise_to_input(self, sample: torch.Tensor, sigma, generator: torch.Generator | None = None):
        """Algorithm 2, lines 5-6: raise the noise level to sigma_hat; returns ``(sample_hat, sigma_hat)``.

        The noise is drawn like the reference's (``randn`` on the CPU, or on a CUDA generator's own
        device, which the reference rejects) and moved to ``sample``'s device.
        """
        sigma_hat, _ = self.churn_sigma(sigma)
        eps = self.config.s_noise * draw_randn(sample.shape, generator).to(sample.device)
        return step_torch.churn(sample, eps, sigma, sigma_hat), sigma_hat

    def step(self, model_output, sigma_hat, sigma_prev, sample_hat, return_dict: bool = True):
        """Algorithm 2, lines 7-8: the Euler step from sigma_hat to sigma_prev."""
        sample_prev, derivative, pred = step_torch.euler(model_output, sigma_hat, sigma_prev, sample_hat)
        if not return_dict:
            return (sample_prev, derivative)
        return KarrasVeOutput(prev_sample=sample_prev, derivative=derivative, pred_original_sample=pred)

    def step_correct(
        self, model_output, sigma_hat, sigma_prev, sample_hat, sample_prev, derivative, return_dict: bool = True
    ):
        """Algorithm 2, lines 9-11: the Heun correction at sigma_prev."""
        sample_prev, pred = step_torch.heun(model_output, sigma_hat, sigma_prev, sample_hat, sample_prev, derivative)
        if not return_dict:
            return (sample_prev, derivative)
        return KarrasVeOutput(prev_sample=sample_prev, derivative=derivative, pred_original_sample=pred)

    def add_noise(self, original_samples, noise, timesteps):
        raise NotImplementedError("KarrasVeScheduler is a sampling-only scheduler, as in diffusers")
