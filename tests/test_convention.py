"""The two conventions' rules, tested as rules (no patching): which division each device gets, where line 6
runs, what the model is called with. The arithmetic each rule selects is tested against torch and the real
references in tests/test_step_triton.py, tests/test_csrc.py, tests/test_pipeline.py and tests/test_k_diffusion.py."""

from __future__ import annotations

import torch

import kve_fast
from kve_fast.convention import K_DIFFUSION, REFERENCE
from kve_fast.ops.fused import FusedStep
from kve_fast.plan import kdiffusion_plan
from kve_fast.sampler import plan_steps

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_the_reference_divides_as_torch_does_on_each_device():
    """On CUDA torch multiplies by the host's float32 reciprocal of a 0-d CPU scalar (measured on an H200,
    ../shared/notes/gpu-baseline.md); on the CPU it divides. Mutations caught: "always divide" (the
    reciprocal branch never used on a GPU), "always multiply" (the CPU reference broken)."""
    assert REFERENCE.true_division(CUDA) is False
    assert REFERENCE.true_division(CPU) is True
    # what the CPU rule stands on: torch on the CPU divides truly by a 0-d CPU tensor (here it differs from
    # multiplying by the reciprocal on most elements)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    s = torch.tensor(0.37, dtype=torch.float32)
    assert torch.equal(x / s, torch.from_numpy(x.numpy() / s.numpy()))
    assert not torch.equal(x / s, x * (torch.tensor(1.0) / s))


def test_k_diffusion_divides_truly_everywhere():
    assert K_DIFFUSION.true_division(CUDA) is True and K_DIFFUSION.true_division(CPU) is True


def test_the_fused_backends_take_the_division_from_the_convention_and_device():
    assert FusedStep(REFERENCE, CUDA).true_div is False
    assert FusedStep(REFERENCE, CPU).true_div is True
    assert FusedStep(K_DIFFUSION, CUDA).true_div is True


def test_where_line_6_runs():
    steps = plan_steps(kve_fast.KarrasVeScheduler(s_churn=10.0, s_min=0.1, s_max=1.0), 8)
    assert any(s.gamma == 0 for s in steps) and any(s.gamma > 0 for s in steps)
    assert all(REFERENCE.churns(s) for s in steps), "the reference adds 0 * eps where gamma = 0"
    kplan = kdiffusion_plan(torch.tensor([10.0, 2.0, 0.5, 0.1, 0.0]), 1.0, 0.3, 5.0)
    assert [K_DIFFUSION.churns(s) for s in kplan] == [False, True, True, False]


def test_the_model_is_called_with_each_conventions_noise_level():
    step = plan_steps(kve_fast.KarrasVeScheduler(), 4)[1]
    level = REFERENCE.noise_level(step, "hat")
    assert level.device.type == "cpu" and level.dim() == 0 and float(level) == step.at_hat.half
    assert float(REFERENCE.noise_level(step, "next")) == step.at_next.half
    assert REFERENCE.noise_level(step, "hat") is not level, "a new tensor each time"
    kstep = kdiffusion_plan(torch.tensor([10.0, 2.0, 0.0]), 0.5)[0]
    s_in = torch.ones(3)
    assert torch.equal(K_DIFFUSION.noise_level(kstep, "hat", s_in), kstep.sigma_hat_on_device() * s_in)
    assert torch.equal(K_DIFFUSION.noise_level(kstep, "next", s_in), torch.full((3,), 2.0))
    scalars = torch.tensor(tuple(kstep.at_hat))
    out = torch.zeros(3)
    assert K_DIFFUSION.graph_noise_level(scalars, out) is out and torch.equal(out, torch.full((3,), kstep.at_hat.sigma))
    assert float(REFERENCE.graph_noise_level(torch.tensor(tuple(step.at_hat)), None)) == step.at_hat.half
