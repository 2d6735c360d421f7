"""The pipeline refuses what it cannot finish before the first model call: images PIL cannot make, a config's
``sample_size`` or channel counts that are not what they must be, ints torch cannot hold, each naming the field."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import kve_fast


class CountingScore(torch.nn.Module):
    """``-x`` as the score, counting its calls, with whatever config the test gives it."""

    def __init__(self, **config):
        super().__init__()
        self.config = types.SimpleNamespace(**config)
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        return -x


def pipe_for(**config):
    model = CountingScore(**config)
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


@pytest.mark.parametrize("channels", [5, 7])
def test_pil_images_of_more_than_four_channels_are_refused_before_any_model_call(channels):
    pipe, model = pipe_for(sample_size=4, in_channels=channels, out_channels=channels)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError, match=r"`output_type`='pil'.*have %d \(`unet.config.in_channels`\)" % channels):
        pipe(1, 3, g)
    assert model.calls == 0 and torch.equal(g.get_state(), state)
    assert pipe(1, 3, g, output_type="np").images.shape == (1, 4, 4, channels)  # the other outputs still work
    assert model.calls == 5


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_pil_images_of_one_to_four_channels_work(channels):
    pipe, _ = pipe_for(sample_size=4, in_channels=channels, out_channels=channels)
    (image,) = pipe(1, 2, torch.Generator().manual_seed(0)).images
    assert len(image.getbands()) == channels


@pytest.mark.parametrize("field, value", [
    ("sample_size", "8"), ("sample_size", (4,)), ("sample_size", 2.5), ("sample_size", True), ("sample_size", 0),
    ("sample_size", (4, "4")), ("sample_size", (4, 4, 4)), ("in_channels", "3"), ("in_channels", 0),
    ("out_channels", 2.0),
])
def test_bad_config_fields_are_named_before_any_model_call(field, value):
    config = {"sample_size": 4, "in_channels": 3, "out_channels": 3, field: value}
    if field == "in_channels":
        config["out_channels"] = value
    pipe, model = pipe_for(**config)
    with pytest.raises(ValueError, match=rf"`unet\.config\.{field}`"):
        pipe(1, 3, torch.Generator().manual_seed(0), output_type="np")
    assert model.calls == 0


@pytest.mark.parametrize("size, shape", [(4, (4, 4)), ((2, 6), (2, 6)), ([6, 2], (6, 2))])
def test_good_sample_sizes(size, shape):
    pipe, _ = pipe_for(sample_size=size, in_channels=1, out_channels=1)
    assert pipe(1, 2, torch.Generator().manual_seed(0), output_type="np").images.shape == (1, *shape, 1)


@pytest.mark.parametrize("call, name", [
    ({"num_inference_steps": 2**63}, "num_inference_steps"),  # (an unnamed OverflowError before)
    ({"num_inference_steps": 2**80}, "num_inference_steps"),
    ({"batch_size": 2**63}, "batch_size"),  # (torch's "failed to unpack the object" TypeError before)
    ({"batch_size": 2**61}, "shape"),  # each size fits int64, the float32 tensor does not
])
def test_ints_beyond_what_torch_holds_are_named_before_any_work(call, name):
    """Mutations: check_int without its maximum, check_shape without its product test -> each case fails."""
    pipe, model = pipe_for(sample_size=4, in_channels=3, out_channels=3)
    pipe.scheduler.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    state, global_state = g.get_state(), torch.get_rng_state()
    with pytest.raises(ValueError, match=f"`{name}"):
        pipe(**{"batch_size": 1, "num_inference_steps": 3, "generator": g, "output_type": "latent", **call})
    assert model.calls == 0 and pipe.scheduler.num_inference_steps == 7
    assert torch.equal(g.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.scheduler.set_timesteps(2**63)
    with pytest.raises(ValueError, match=r"`shape\[1\]`"):
        kve_fast.sample_karras_ve(model, kve_fast.KarrasVeScheduler(), (1, 2**63, 4, 4), 3)


def test_numpy_ints_are_ints():
    pipe, _ = pipe_for(sample_size=4, in_channels=3, out_channels=3)
    run = lambda b, n: pipe(b, n, torch.Generator().manual_seed(0), output_type="latent").images  # noqa: E731
    assert torch.equal(run(np.int64(2), np.int32(3)), run(2, 3))
