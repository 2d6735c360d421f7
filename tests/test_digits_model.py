"""The bundled 8x8 digits model: it loads, it is small, the main command works, and it draws digits.

The quality guard samples QUALITY_N digits with kve_fast's pipeline (default scheduler settings,
QUALITY_STEPS steps, seed 0; bit-exact with diffusers' sampler, checked below) and judges them with a
classifier fit on real digits. Measured on the bundled model (torch 2.13.0 CPU), see
``guard_failures`` for the bounds:

    bundled model, 30 steps, seeds 0/1/2: confidence 0.972/0.967/0.985, accepted 0.938/0.906/0.953,
        classes 10/10/10, FD 0.95/0.87/1.45 (floor at n=128: 0.73)
    real held-out digits (128):            confidence 0.964, accepted 0.891, classes 10, FD 1.07
    untrained model (same sampler):        confidence 0.776, accepted 0.391, classes 10, FD 24.3
    uniform noise:                         confidence 0.798, accepted 0.430, classes 7,  FD 30.0
    real digits blurred (3x3 box):         confidence 0.760, accepted 0.344, classes 10, FD 14.8
The classifier is overconfident off its data (noise scores 0.8), so the Frechet distance is the sharp test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FoldChannels, RefScheduler, assert_bitwise, run_reference
from PIL import Image

import kve_fast
from kve_fast.models import DIGITS_MODEL_DIR

pytest.importorskip("sklearn")
from kve_fast.models import quality  # noqa: E402

QUALITY_N = 128
QUALITY_STEPS = 30
WEIGHTS = os.path.join(DIGITS_MODEL_DIR, "diffusion_pytorch_model.safetensors")

# regression bounds, with margin from the values measured above
CONFIDENCE_MIN = 0.90
ACCEPTED_MIN = 0.75
CLASSES_MIN = 9
FD_MAX = 3.0


def guard_failures(res: dict) -> list[str]:
    """What in ``res`` breaks the bounds (empty when it passes)."""
    bounds = [
        ("confidence", res["confidence"] >= CONFIDENCE_MIN, f">= {CONFIDENCE_MIN}"),
        ("accepted", res["accepted"] >= ACCEPTED_MIN, f">= {ACCEPTED_MIN}"),
        ("classes_covered", res["classes_covered"] >= CLASSES_MIN, f">= {CLASSES_MIN}"),
        ("fd", res["fd"] <= FD_MAX, f"<= {FD_MAX}"),
    ]
    return [f"{name} = {res[name]:.4g}, want {want}" for name, ok, want in bounds if not ok]


@pytest.fixture(scope="module")
def unet():
    return kve_fast.load_model("digits")[0]


@pytest.fixture(scope="module")
def judge():
    return quality.fit_judge(0)


def test_bundled_folder_loads(unet):
    from diffusers import UNet2DModel

    assert isinstance(unet, UNet2DModel)
    cfg = unet.config
    assert (cfg.sample_size, cfg.in_channels, cfg.out_channels) == (8, 1, 1)
    assert cfg.time_embedding_type == "fourier"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "TRAINING.md"):
        assert os.path.isfile(os.path.join(DIGITS_MODEL_DIR, name)), name
    assert os.path.getsize(WEIGHTS) < 8 * 2**20
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    # the (non-trainable) Fourier frequencies were redrawn at std 1 and must come back from the file
    assert unet.time_proj.weight.abs().max() < 5
    # the plain diffusers way loads the same folder
    assert torch.equal(UNet2DModel.from_pretrained(DIGITS_MODEL_DIR).time_proj.weight, unet.time_proj.weight)


def test_scheduler_config_is_reference_default():
    ours = kve_fast.load_model("digits")[1].config
    default = RefScheduler().config
    for key in ("sigma_min", "sigma_max", "s_noise", "s_churn", "s_min", "s_max"):
        assert ours[key] == default[key], key


def test_no_sklearn_at_import():
    # With sklearn made unimportable, kve_fast and its model modules must still import (sklearn is only
    # for training and judging). Checking sys.modules instead would blame other packages' imports.
    code = ("import sys; sys.modules['sklearn'] = None; "
            "import kve_fast, kve_fast.models, kve_fast.models.quality, kve_fast.models.train_digits, kve_fast.cli")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_pipeline_matches_diffusers_on_digits(unet):
    """kve_fast's pipeline (1 channel from the config) draws the same digits as diffusers' pipeline.

    diffusers' pipeline hard-codes 3 channels: it runs the 1-channel model through ``FoldChannels``
    (each of its 3 channels is a digit of its own), so its batch 3 is kve_fast's batch 9."""
    pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(9, 10, torch.Generator().manual_seed(3), output_type="latent").images
    _, expected = run_reference(FoldChannels(unet), {}, 3, 10, torch.Generator().manual_seed(3))
    assert_bitwise(ours, expected.reshape(9, 1, 8, 8), "digits latent vs diffusers (channels folded)")


def test_quality_guard(judge):
    images = quality.sample_digits("digits", QUALITY_N, seed=0, num_inference_steps=QUALITY_STEPS)
    assert images.shape == (QUALITY_N, 1, 8, 8)
    res = quality.evaluate_images(images, judge)
    assert judge.heldout_accuracy > 0.93
    assert not guard_failures(res), (guard_failures(res), res)


def test_guard_rejects_untrained_model_and_noise(judge):
    from kve_fast.models.train_digits import build_unet

    torch.manual_seed(0)
    untrained = build_unet().eval()
    images = quality.sample_digits(untrained, QUALITY_N, seed=0, num_inference_steps=QUALITY_STEPS)
    assert guard_failures(quality.evaluate_images(images, judge))
    noise = torch.rand(QUALITY_N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert guard_failures(quality.evaluate_images(noise, judge))
    # and the real held-out digits pass it
    real = torch.from_numpy(judge.real_b[:QUALITY_N].reshape(-1, 1, 8, 8))
    assert not guard_failures(quality.evaluate_images(real, judge))


def test_main_command_with_no_arguments(tmp_path, monkeypatch, capsys):
    """`kve-fast sample` as the README gives it: 64 digits from the bundled model, a grid PNG here."""
    from kve_fast.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample"]) == 0
    grid = Image.open(tmp_path / "kve_fast_samples.png")
    assert grid.mode == "L" and grid.size == (8 * (32 + 2) + 2, 8 * (32 + 2) + 2)  # 8x8 tiles, upscaled 4x
    assert "wrote" in capsys.readouterr().out
    tiles = np.asarray(grid)[2:34, 2:34]
    assert 0 < tiles.mean() < 255, "a digit tile is neither blank nor saturated"
