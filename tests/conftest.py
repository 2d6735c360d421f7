"""Models, the diffusers reference and a verbose bitwise assertion shared by the tests."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run in its interpreter (numpy on the CPU). Must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from diffusers import UNet2DModel
from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as RefPipeline
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler

import kve_fast
from kve_fast.oracle import GaussianScore as OracleScore


def assert_bitwise(actual, expected, what: str = "output") -> None:
    """``torch.equal`` / ``np.array_equal``, and on failure: how many differ, where, and by how much."""
    a = actual if isinstance(actual, torch.Tensor) else torch.from_numpy(np.array(actual))
    e = expected if isinstance(expected, torch.Tensor) else torch.from_numpy(np.array(expected))
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    if torch.equal(a, e):
        return
    a, e = a.detach().cpu(), e.detach().cpu()
    diff = a != e
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(e))  # NaN where the reference has NaN is a match
        if not diff.any():
            return
    idx = diff.nonzero()[:5].tolist()
    worst = (a.double() - e.double()).abs().max().item()
    raise AssertionError(f"{what}: {int(diff.sum())} of {a.numel()} elements differ; first at {idx}; max |diff| {worst:g}")


def reference_test_unet(sample_size: int = 16, channels: int = 3) -> UNet2DModel:
    """The tiny UNet of diffusers' own KarrasVePipeline tests (at a smaller image size)."""
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size,
        in_channels=channels, out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def ncsnpp_unet(sample_size: int = 16) -> UNet2DModel:
    """A small NCSN++-style UNet: fourier noise embedding and FIR Skip blocks, as the score-SDE models."""
    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 32, 64), time_embedding_type="fourier", norm_eps=1e-6,
        mid_block_scale_factor=math.sqrt(2), flip_sin_to_cos=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ).eval()


def GaussianScore(sample_size: int = 8, channels: int = 3) -> OracleScore:  # noqa: N802
    """The exact score of Gaussian data (kve_fast.oracle): images stay inside (0, 1), never saturate."""
    return OracleScore.random(channels=channels, size=sample_size, std=(0.15, 0.15))


MODELS = {
    "test_unet": lambda: reference_test_unet(16),
    "ncsnpp": lambda: ncsnpp_unet(16),
    "gaussian": lambda: GaussianScore(8),
}


@pytest.fixture(scope="session")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = MODELS[name]()
        return cache[name]

    return get


def make_generator(form: str, seed: int, batch_size: int):
    """``"global"`` seeds the global RNG and returns None; ``"single"`` one generator; ``"list"`` one per sample."""
    if form == "global":
        torch.manual_seed(seed)
        return None
    if form == "single":
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + 1000 * i) for i in range(batch_size)]


def reference_pipe(unet, **scheduler_config) -> RefPipeline:
    pipe = RefPipeline(unet=unet, scheduler=RefScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kve_pipe(unet, **scheduler_config) -> kve_fast.KarrasVePipeline:
    pipe = kve_fast.KarrasVePipeline(unet=unet, scheduler=kve_fast.KarrasVeScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_latent(unet, scheduler, shape, num_inference_steps, generator, device="cpu"):
    """diffusers' KarrasVePipeline loop verbatim (with diffusers' own scheduler and randn_tensor), stopped
    before the final clamp, for any channel count. The oracle for ``output_type="latent"``."""
    from diffusers.utils.torch_utils import randn_tensor

    model = unet
    sample = randn_tensor(shape, generator=generator, device=torch.device(device)) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        sigma = scheduler.schedule[t]
        sigma_prev = scheduler.schedule[t - 1] if t > 0 else 0
        sample_hat, sigma_hat = scheduler.add_noise_to_input(sample, sigma, generator=generator)
        model_output = (sigma_hat / 2) * model((sample_hat + 1) / 2, sigma_hat / 2).sample
        step_output = scheduler.step(model_output, sigma_hat, sigma_prev, sample_hat)
        if sigma_prev != 0:
            model_output = (sigma_prev / 2) * model((step_output.prev_sample + 1) / 2, sigma_prev / 2).sample
            step_output = scheduler.step_correct(
                model_output, sigma_hat, sigma_prev, sample_hat, step_output.prev_sample, step_output["derivative"]
            )
        sample = step_output.prev_sample
    return sample
