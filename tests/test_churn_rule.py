"""Algorithm 2, lines 4-5 (gamma_i, the range test, sigma_hat), computed in one place for every plan
(``kve_fast.plan.ChurnRule``): the reference's plans against diffusers' own scheduler, at settings where the two
conventions' orders of operations give different bits (k-diffusion's order is tested against k-diffusion itself in
tests/test_k_diffusion.py and tests/test_k_diffusion_clients.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import RefScheduler, assert_bitwise

import kve_fast
from kve_fast.plan import sigmas_plan
from kve_fast.sampler import plan_steps

STEPS = 50
# the scheduler's defaults (S_churn 80 over [0.05, 50]): 20 churned steps, gamma at the cap sqrt(2) - 1; and
# gamma = 0.2, below it
CONFIGS = [{}, {"s_churn": 10.0, "s_min": 0.01, "s_max": 20.0}]


def _diffusers_sigma_hat(config: dict, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``add_noise_to_input`` sigma_hat at each of ``sigmas`` (on a 1-element sample)."""
    ref = RefScheduler(**config)
    ref.set_timesteps(STEPS)
    return torch.stack([ref.add_noise_to_input(torch.zeros(1), s, torch.Generator().manual_seed(0))[1] for s in sigmas])


@pytest.mark.parametrize("config", CONFIGS)
def test_every_reference_plan_churns_as_diffusers_does(config):
    """The lazy 0-d plan (``Step``), the elementwise plan over chunks (``VectorPlan``) and the scheduler's own
    ``churn_sigma`` give diffusers' sigma_hat bit for bit. Mutations of ``ChurnRule`` (each fails): the reference's
    sigma_hat as sigma * (gamma + 1), k-diffusion's order (both settings); gamma over N - 1 (below the cap); gamma
    without its cap (the defaults); the range test without S_max (tests/test_trust.py and others catch it open at
    S_min)."""
    scheduler = kve_fast.KarrasVeScheduler(**config)
    steps = plan_steps(scheduler, STEPS)
    sigmas = torch.stack([s.sigma for s in steps])
    expected = _diffusers_sigma_hat(config, sigmas)
    assert_bitwise(torch.stack([s.sigma_hat for s in steps]), expected, "Step")
    c = scheduler.config
    vector = sigmas_plan(sigmas.tolist() + [0.0], c.s_churn, c.s_min, c.s_max)
    assert_bitwise(torch.stack([s.sigma_hat for s in vector]), expected, "VectorPlan")
    scheduler.set_timesteps(STEPS)
    assert_bitwise(torch.stack([scheduler.churn_sigma(s)[0] for s in sigmas]), expected, "the scheduler's churn_sigma")
    # these settings tell the orders apart: k-diffusion's sigma * (gamma + 1) differs at some churned steps
    gamma = min(c.s_churn / STEPS, 2**0.5 - 1)
    churned = [s for s in sigmas if c.s_min <= s <= c.s_max]
    assert 0 < len(churned) < STEPS, "churned steps and steps outside the range"
    assert any(s * (gamma + 1) != s + gamma * s for s in churned)


def test_sigma_hat_is_sigma_outside_the_range():
    """Outside [S_min, S_max] gamma is 0: sigma_hat is sigma (0-d and elementwise), and ``Step.gamma`` says 0."""
    steps = plan_steps(kve_fast.KarrasVeScheduler(s_churn=10.0, s_min=0.1, s_max=1.0), 8)
    outside = [s for s in steps if not 0.1 <= float(s.sigma) <= 1.0]
    assert outside and all(s.gamma == 0 and torch.equal(s.sigma_hat, s.sigma) for s in outside)
    vector = sigmas_plan([s.sigma for s in steps] + [0.0], 10.0, 0.1, 1.0)
    assert [s.gamma for s in vector] == [s.gamma for s in steps]
