"""Helpers for checking kve_fast against the reference packages. The tests and bench/ scripts share all of them;
three are also public, used as documented by the README and docs/ (their names and calls are kept):
``FoldChannels`` (README, docs/python.md: a 1-channel model in diffusers' 3-channel pipeline),
``import_k_diffusion_sampling`` (docs/k-diffusion.md: the original beside the drop-in) and ``NearFreeScore``
(docs/speed.md). The rest may change with the tests.

- ``import_k_diffusion_sampling(root)``: the real k-diffusion ``sampling`` module from the folder
  holding its ``k_diffusion`` package, without running the package ``__init__`` (which imports its
  training stack: wandb, CLIP, torchvision models). ``utils.py``, which ``sampling.py`` imports,
  imports ``torchvision.transforms.functional`` at the top and never uses it for sampling, so
  torchvision is stubbed for the import (an installed torchvision may not match this torch);
  ``sys.modules`` is put back as it was. Nothing of k-diffusion is copied here.
- ``mismatches(a, b)``: how many elements differ (NaN where the other has NaN counts as equal; -1 for
  another shape or dtype), for the bit-exactness tables of bench/ scripts.
- ``NearFreeScore``: a score model that costs one elementwise kernel, so the sampler's own cost is
  what a benchmark times.
- The models the tests and the GPU checks run (``reference_test_unet``, ``ncsnpp_unet``, ``GaussianScore``,
  ``GaussianPlusUNet``, ``FoldChannels``) and the runs of diffusers' real pipeline they compare with
  (``reference_pipe``, ``run_reference``, ``reference_latent``), with ``make_generator`` and ``inside_share``.
  diffusers loads when one of them is first used.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types

import numpy as np
import torch

K_DIFFUSION = "k-diffusion==0.1.1.post1"


def import_k_diffusion_sampling(root: str):
    """``k_diffusion.sampling`` from ``root/k_diffusion`` (see the module docstring)."""
    names = ["k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "torchvision", "torchvision.transforms",
             "torchvision.transforms.functional"]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [os.path.join(root, "k_diffusion")]
        sys.modules["k_diffusion"] = package
        for name in names[3:]:
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules[name] = stub
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def mismatches(a, b) -> int:
    """Elements of ``a`` and ``b`` (tensors or arrays) that differ; -1 when shapes or dtypes differ."""
    import numpy as np

    a = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))
    b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return -1
    a, b = a.cpu(), b.cpu()
    if torch.equal(a, b):
        return 0
    diff = a != b
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(b))
    return int(diff.sum())


class NearFreeScore(torch.nn.Module):
    """A near-free score model (``-x``, one elementwise kernel) with the config a pipeline reads."""

    def __init__(self, size: int, channels: int = 3):
        super().__init__()
        self.config = types.SimpleNamespace(sample_size=size, in_channels=channels, out_channels=channels)
        self.w = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.w.device

    @property
    def dtype(self):
        return self.w.dtype

    def forward(self, x, sigma):
        from diffusers.utils import BaseOutput

        return BaseOutput(sample=torch.neg(x))


# -- the models and the reference runs the tests and the GPU checks share ---------------------------------------


def _diffusers():
    from diffusers import UNet2DModel
    from diffusers.pipelines.deprecated.stochastic_karras_ve import KarrasVePipeline as RefPipeline
    from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler as RefScheduler
    from diffusers.utils import BaseOutput

    return UNet2DModel, RefPipeline, RefScheduler, BaseOutput


def _assert_equal(a, b, what: str) -> None:
    n = mismatches(a, b)
    if n:
        raise AssertionError(f"{what}: {n} elements differ" if n > 0 else f"{what}: shapes or dtypes differ")


def reference_test_unet(sample_size: int = 16, channels: int = 3):
    """The tiny UNet of diffusers' own KarrasVePipeline tests (at a smaller image size)."""
    UNet2DModel = _diffusers()[0]
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size,
        in_channels=channels, out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def ncsnpp_unet(sample_size: int = 16):
    """A small NCSN++-style UNet: fourier noise embedding and FIR Skip blocks, as the score-SDE models."""
    UNet2DModel = _diffusers()[0]
    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 32, 64), time_embedding_type="fourier", norm_eps=1e-6,
        mid_block_scale_factor=math.sqrt(2), flip_sin_to_cos=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ).eval()


def GaussianScore(sample_size: int = 8, channels: int = 3):  # noqa: N802
    """The exact score of Gaussian data (kve_fast.oracle): images stay inside (0, 1) with enough steps."""
    from .oracle import GaussianScore as OracleScore

    return OracleScore.random(channels=channels, size=sample_size, std=(0.15, 0.15))


class GaussianPlusUNet(torch.nn.Module):
    """The exact Gaussian score plus a small multiple of a random UNet's output, for image parity tests.

    A random UNet alone drives almost every pixel to 0 or 1 (then image equality only checks which side
    of 0 and 1 each pixel fell on); the Gaussian score alone never runs a convolution. Here::

        score(y, s) = (mean - y) / v + scale * unet(y, s).sample / v,    v = std^2 + s^2

    i.e. the Gaussian denoiser's prediction moved by ``scale * unet(y, s)``: a bounded nudge at every
    noise level (the UNet term of a plain score would grow like s^2 in the denoiser), so images stay
    inside (0, 1), while every output bit still depends on the UNet's arithmetic (convolutions,
    attention, the NCSN++ FIR skip blocks, its time embedding of ``s``). Tests assert both: most pixels
    strictly inside (0, 1), and images that differ from those of ``self.gaussian`` alone.
    diffusers' pipeline needs only ``config.sample_size``, ``device`` and ``model(x, s).sample``.
    """

    def __init__(self, unet: torch.nn.Module, scale: float, seed: int = 3):
        super().__init__()
        cfg = unet.config
        self.unet = unet
        self.scale = scale
        from .oracle import GaussianScore as OracleScore

        self.gaussian = OracleScore.random(channels=cfg.in_channels, size=cfg.sample_size, seed=seed, std=(0.15, 0.15))
        self.config = types.SimpleNamespace(sample_size=cfg.sample_size, in_channels=cfg.in_channels,
                                            out_channels=cfg.out_channels)

    @property
    def device(self) -> torch.device:
        return self.gaussian.device

    def forward(self, y, sigma):
        g = self.gaussian
        v = g.std**2 + torch.as_tensor(sigma, dtype=y.dtype, device=y.device) ** 2
        return _diffusers()[3](sample=(g.mean - y) / v + self.scale * self.unet(y, sigma).sample / v)


class FoldChannels(torch.nn.Module):
    """A 1-channel model as a 3-channel one, for diffusers' pipeline (which hard-codes 3 channels).

    Each channel runs as a sample of its own: (B, 3, H, W) is viewed as (3B, 1, H, W), the same memory.
    diffusers' pipeline at batch B with one generator (or the global RNG) then draws exactly the numbers
    kve_fast's 1-channel pipeline draws at batch 3B (same count, same order) and calls ``model`` on the
    same tensors, so its final sample, viewed as (3B, 1, H, W), is a real diffusers reference for the
    1-channel pipeline. (Not for a list of generators: those draw per sample, and the samples differ.)
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        size = model.config.sample_size
        self.config = types.SimpleNamespace(sample_size=size, in_channels=3, out_channels=3)

    @property
    def device(self) -> torch.device:
        return next(iter(list(self.model.parameters()) + list(self.model.buffers()))).device

    def forward(self, y, sigma):
        b, c, h, w = y.shape
        out = self.model(y.reshape(b * c, 1, h, w), sigma).sample
        return _diffusers()[3](sample=out.reshape(b, c, h, w))



# The UNet terms' scales: test UNet outputs are O(0.3) at every noise level, NCSN++ ones O(0.4 / s)
# (the model divides by s), so NCSN++ takes a smaller scale. Measured: 90-98% of pixels strictly inside
# (0, 1) in the parity cases, and 80-98% of the uint8 pixels differ from the Gaussian score's alone.
UNET_TERM_SCALE = {"test_unet": 0.1, "ncsnpp": 0.01}


MODELS = {
    "test_unet": lambda: reference_test_unet(16),
    "ncsnpp": lambda: ncsnpp_unet(16),
    "gaussian": lambda: GaussianScore(8),
    # image parity models: 8x8, mostly inside (0, 1)
    "test_unet+gaussian": lambda: GaussianPlusUNet(reference_test_unet(8), UNET_TERM_SCALE["test_unet"]),
    "ncsnpp+gaussian": lambda: GaussianPlusUNet(ncsnpp_unet(8), UNET_TERM_SCALE["ncsnpp"]),
}

# Scheduler settings under which the Gaussian-based models' images stay inside (0, 1) in few steps (the
# default settings start at sigma = sigma_max^2 = 1e4 and need about 14 steps for that).
SMALL_SIGMAS = {"sigma_min": 0.05, "sigma_max": 2.0, "s_churn": 10.0, "s_min": 0.1, "s_max": 1.0}
SMALL_SIGMAS_NO_CHURN = {"sigma_max": 1.0, "s_churn": 0.0, "s_noise": 1.003}
CUSTOM = {"sigma_min": 0.01, "sigma_max": 50.0, "s_noise": 1.0, "s_churn": 30.0, "s_min": 0.1, "s_max": 10.0}
# gamma_i = S_churn / N below its cap sqrt(2) - 1 on most steps (0.2 at 6 steps; the others sit at the cap, where
# a sampler that forgot to divide by N would give the same bits), churned between s_min and s_max only
BELOW_CAP = {"sigma_min": 0.05, "sigma_max": 2.0, "s_churn": 1.2, "s_min": 0.02, "s_max": 3.0, "s_noise": 1.004}


def inside_share(images) -> float:
    """The share of pixels strictly inside the image range: (0, 1) for float images, (0, 255) for uint8
    or PIL images (a list of them)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    top = 255 if a.dtype == np.uint8 else 1
    return float(((a > 0) & (a < top)).mean())



def make_generator(form: str, seed: int, batch_size: int):
    """``"global"`` seeds the global RNG and returns None; ``"single"`` one generator; ``"list"`` one per sample."""
    if form == "global":
        torch.manual_seed(seed)
        return None
    if form == "single":
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + 1000 * i) for i in range(batch_size)]


def reference_pipe(unet, **scheduler_config):
    """diffusers' real ``KarrasVePipeline`` with its real scheduler, progress bar off."""
    _, RefPipeline, RefScheduler, _ = _diffusers()
    pipe = RefPipeline(unet=unet, scheduler=RefScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe



def run_reference(unet, config, batch_size: int, num_inference_steps: int, generator, output_type: str = "np"):
    """Run diffusers' real ``KarrasVePipeline`` with its real scheduler; return ``(images, latent)``.

    ``config``: the scheduler's settings (a dict), or a diffusers ``KarrasVeScheduler`` instance.
    ``latent`` is the final sample before the pipeline's clamp to an image: the scheduler instance's
    ``step`` and ``step_correct`` are wrapped to record each ``prev_sample`` they return (the pipeline's
    loop itself is diffusers' code, run as is), and the last one recorded is the sample the loop ends
    with. The pipeline is 3-channel only (see ``FoldChannels`` for 1-channel models).
    """
    _, RefPipeline, RefScheduler, _ = _diffusers()
    scheduler = config if isinstance(config, RefScheduler) else RefScheduler(**config)
    recorded = []

    def recording(method):
        def wrapper(*args, **kwargs):
            out = method(*args, **kwargs)
            recorded.append((out[0] if isinstance(out, tuple) else out.prev_sample).clone())
            return out

        return wrapper

    scheduler.step = recording(scheduler.step)
    scheduler.step_correct = recording(scheduler.step_correct)
    pipe = RefPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size, num_inference_steps, generator, output_type=output_type).images
    assert len(recorded) == 2 * num_inference_steps - 1, "one step per level and a correction on all but the last"
    latent = recorded[-1]
    if output_type in ("np", "numpy"):  # the recorded sample is the one the pipeline turned into its images
        _assert_equal((latent / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy(), images,
                       "reference images vs the recorded final sample")
    return images, latent



def reference_latent(unet, scheduler, shape, num_inference_steps, generator, device=None):
    """diffusers' final sample for ``output_type="latent"`` (kept for bench/gpu_check.py; the tests call
    ``run_reference``): now from diffusers' real pipeline, no longer a copy of its loop. ``shape`` must be
    what the pipeline draws, (batch, 3, sample_size, sample_size), on the UNet's device."""
    size = unet.config.sample_size
    if tuple(shape[1:]) != (3, size, size):
        raise ValueError(f"diffusers' pipeline draws (batch, 3, {size}, {size}), not {tuple(shape)}")
    latent = run_reference(unet, scheduler, shape[0], num_inference_steps, generator)[1]
    if device is not None and latent.device.type != torch.device(device).type:
        raise ValueError(f"the reference ran on {latent.device}, not {device}: move the UNet there")
    return latent
