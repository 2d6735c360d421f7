"""kve_fast.KarrasVePipeline against diffusers' KarrasVePipeline: same call, same outputs, bit for bit; its callback
protocol typed (a callback returns a dict, tensor inputs are a list). It refuses what
it cannot finish before the first model call: images PIL cannot make, a config's ``sample_size`` or channel counts
that are not what they must be, ints torch cannot hold, each naming the field."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import (
    BELOW_CAP, CUSTOM, SMALL_SIGMAS, SMALL_SIGMAS_NO_CHURN, FoldChannels, GaussianScore, OracleScore, RefPipeline, assert_bitwise,
    assert_mostly_inside, check_image_parity, kve_pipe, make_generator, reference_pipe, run_reference,
)
from PIL import Image

import kve_fast

# Image parity (np and pil) against diffusers' real pipeline: (model, generator form, batch size, steps,
# scheduler settings). Models whose images stay mostly inside (0, 1) (asserted in every case): the exact
# Gaussian score plus a small multiple of the test UNet's or the NCSN++ UNet's output, and the Gaussian
# score alone. Every model sees every generator form, batch 1 and odd batches, 2 steps (one Heun
# correction) up to 14, churned and unchurned settings.
IMAGE_CASES = [
    (model, form, batch, steps, config)
    for model in ("test_unet+gaussian", "ncsnpp+gaussian", "gaussian")
    for form, batch, steps, config in [
        ("single", 2, 14, {}),
        ("list", 3, 6, SMALL_SIGMAS),
        ("global", 1, 4, SMALL_SIGMAS),
        ("single", 1, 2, SMALL_SIGMAS_NO_CHURN),
        ("list", 2, 5, SMALL_SIGMAS_NO_CHURN),
        ("global", 2, 14, CUSTOM),
        ("single", 2, 8, {"sigma_max": 1.5, "sigma_min": 0.02, "s_noise": 1.01, "s_min": 0.05, "s_max": 1.0}),
        ("list", 2, 6, BELOW_CAP),  # gamma below its cap: catches a gamma that forgets / N
    ]
]


@pytest.mark.parametrize("model, form, batch, steps, config", IMAGE_CASES)
def test_images_match_diffusers(models, model, form, batch, steps, config):
    check_image_parity(models(model), form, batch, steps, config, seed=11 + steps)


# ``latent`` parity against the real pipeline's final sample (recorded from its scheduler), with the raw
# UNets too: latents are not clamped, so saturation cannot hide anything here.
@pytest.mark.parametrize("model, form, config", [
    ("test_unet", "single", {}), ("ncsnpp", "list", {}), ("gaussian", "global", {}),
    ("ncsnpp", "global", CUSTOM), ("test_unet+gaussian", "list", SMALL_SIGMAS), ("test_unet", "single", BELOW_CAP),
])
def test_latent_output_matches_diffusers(models, model, form, config):
    unet = models(model)
    ours = kve_pipe(unet, **config)(3, 4, make_generator(form, 21, 3), output_type="latent").images
    _, ref = run_reference(unet, config, 3, 4, make_generator(form, 21, 3))
    assert_bitwise(ours, ref, "latent")
    assert ours.dtype == torch.float32 and ours.dim() == 4


def test_sampler_function_matches_diffusers(models):
    unet = models("gaussian")
    scheduler = kve_fast.KarrasVeScheduler(**CUSTOM)
    ours = kve_fast.sample_karras_ve(unet, scheduler, (2, 3, 8, 8), 6, torch.Generator().manual_seed(4))
    _, ref = run_reference(unet, CUSTOM, 2, 6, torch.Generator().manual_seed(4))
    assert_bitwise(ours, ref)
    assert scheduler.num_inference_steps is None, "the sampler loop must not change the scheduler"


@pytest.mark.parametrize("form", ["single", "global"])
def test_one_channel_model_gives_grayscale_images(form):
    unet = GaussianScore(sample_size=6, channels=1)
    pipe = kve_pipe(unet)
    images = pipe(2, 3, torch.Generator().manual_seed(0)).images
    assert [im.mode for im in images] == ["L", "L"] and images[0].size == (6, 6)
    # diffusers' pipeline hard-codes 3 channels; its reference for 1 channel is FoldChannels: batch 2 of the
    # model's 1-channel images seen as 3 channels there is batch 6 here (not possible for a generator list).
    latent = pipe(6, 3, make_generator(form, 0, 6), output_type="latent").images
    _, ref = run_reference(FoldChannels(unet), {}, 2, 3, make_generator(form, 0, 2))
    assert_bitwise(latent, ref.reshape(6, 1, 6, 6), "1-channel latent vs diffusers (channels folded)")


def test_output_types_agree(models):
    pipe = kve_pipe(models("gaussian"), **SMALL_SIGMAS)
    run = lambda **kw: pipe(2, 4, torch.Generator().manual_seed(9), **kw)  # noqa: E731
    np_images = run(output_type="np").images
    assert_mostly_inside(np_images)  # so the clamp below and the uint8 rounding see real values
    pt = run(output_type="pt").images
    latent = run(output_type="latent").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 8, 8)
    assert_bitwise(pt.permute(0, 2, 3, 1).numpy(), np_images)
    assert_bitwise((latent / 2 + 0.5).clamp(0, 1), pt)
    assert float(pt.min()) >= 0 and float(pt.max()) <= 1
    (as_tuple,) = run(output_type="np", return_dict=False)
    assert_bitwise(as_tuple, np_images)
    assert_bitwise(run(output_type=None).images, np_images)
    pil = run().images
    assert all(isinstance(im, Image.Image) for im in pil)
    assert_bitwise(np.stack([np.asarray(im) for im in pil]), (np_images * 255).round().astype(np.uint8))


def test_callback_sees_every_step_and_does_not_change_results(models):
    pipe = kve_pipe(models("gaussian"))
    plain = pipe(2, 5, torch.Generator().manual_seed(1), output_type="latent").images
    seen = []

    def callback(p, i, t, kwargs):
        assert p is pipe
        seen.append((i, int(t), kwargs["sample"].clone(), kwargs["pred_original_sample"].shape))
        return {}

    with_cb = pipe(2, 5, torch.Generator().manual_seed(1), output_type="latent", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"]).images
    assert_bitwise(with_cb, plain, "with a callback (unfused step) vs without (fused)")
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4] and [s[1] for s in seen] == [4, 3, 2, 1, 0]
    assert_bitwise(seen[-1][2], plain)
    assert seen[0][3] == (2, 3, 8, 8)


def test_callback_can_replace_the_sample_and_interrupt(models):
    pipe = kve_pipe(models("gaussian"))
    calls = []

    def stop_after_two(p, i, t, kwargs):
        calls.append(i)
        if i == 1:
            p._interrupt = True
        return {"sample": kwargs["sample"] * 0}

    out = pipe(1, 6, torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=stop_after_two).images
    assert calls == [0, 1]
    assert torch.count_nonzero(out) == 0, "the callback's returned sample must replace the pipeline's"
    calls.clear()
    pipe(1, 3, torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=lambda p, i, t, k: calls.append(i))
    assert calls == [0, 1, 2], "a new call must not stay interrupted"


def test_callback_protocol_is_typed():
    pipe = kve_pipe(GaussianScore(8))
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="callback_on_step_end"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: k["sample"])
    with pytest.raises(TypeError, match="callback_on_step_end"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: [k["sample"]])
    with pytest.raises(TypeError, match="callback_on_step_end_tensor_inputs"):
        pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: None, callback_on_step_end_tensor_inputs="sample")
    seen = []
    pipe(1, 3, gen, callback_on_step_end=lambda p, i, t, k: seen.append(sorted(k)),
         callback_on_step_end_tensor_inputs=None)
    assert seen == [[], [], []]
    with pytest.raises(TypeError, match="callback"):
        kve_fast.sample_karras_ve(GaussianScore(8), kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 3,
                                  callback=lambda s: s["sample"])


def test_from_pipe_swaps_into_a_diffusers_pipeline(models):
    unet = models("ncsnpp+gaussian")
    ref = reference_pipe(unet, **CUSTOM)
    ours = kve_fast.KarrasVePipeline.from_pipe(ref)
    ours.set_progress_bar_config(disable=True)
    assert ours.unet is unet and isinstance(ours.scheduler, kve_fast.KarrasVeScheduler)
    assert ours.scheduler.config.s_churn == CUSTOM["s_churn"]
    a = ref(2, 14, torch.Generator().manual_seed(2), output_type="np").images
    b = ours(2, 14, torch.Generator().manual_seed(2), output_type="np").images
    assert_mostly_inside(a)
    assert_bitwise(b, a)


def test_save_and_load_a_local_folder(tmp_path, models):
    unet = models("test_unet")
    pipe = kve_pipe(unet, **CUSTOM)
    pipe.save_pretrained(tmp_path / "ours")
    # A folder written by diffusers' own pipeline loads as well.
    reference_pipe(unet, **CUSTOM).save_pretrained(tmp_path / "ref")
    for folder in ("ours", "ref"):
        loaded = kve_fast.KarrasVePipeline.from_pretrained(tmp_path / folder)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.scheduler.config.s_max == CUSTOM["s_max"]
        for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.unet.state_dict().items(), strict=True):
            assert_bitwise(b, a, f"{folder}: loaded {name}")
        # Same weights do not give the same bits: torch's CPU matmul rounds differently for weights loaded
        # from safetensors at addresses not 64-byte aligned (diffusers' own from_pretrained too), so the
        # loaded pipeline is compared with diffusers' pipeline on the loaded UNet. Latents: the raw test
        # UNet's images are saturated (all 0 or 1), its latents are not clamped.
        ours = loaded(2, 3, torch.Generator().manual_seed(0), output_type="latent").images
        _, ref = run_reference(loaded.unet, CUSTOM, 2, 3, torch.Generator().manual_seed(0))
        assert_bitwise(ours, ref, f"pipeline loaded from {folder!r} vs diffusers")
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        kve_fast.KarrasVePipeline.from_pretrained(tmp_path / "missing")


def test_progress_bar_is_real_and_configurable(models, capsys):
    pipe = kve_fast.KarrasVePipeline(models("gaussian"), kve_fast.KarrasVeScheduler())
    pipe(1, 4, torch.Generator().manual_seed(0), output_type="np")
    assert "4/4" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(1, 4, torch.Generator().manual_seed(0), output_type="np")
    assert "4/4" not in capsys.readouterr().err


def test_device_and_to(models):
    pipe = kve_pipe(models("gaussian"))
    assert pipe.device == torch.device("cpu")
    assert pipe.to("cpu") is pipe


class _WrongShape(OracleScore):
    def forward(self, y, sigma):
        return super().forward(y, sigma).sample[:, :1]


BAD_CALLS = [
    ({"num_inference_steps": 1}, ValueError, "num_inference_steps"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps"),
    ({"num_inference_steps": "3"}, TypeError, "num_inference_steps"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 1.0}, TypeError, "batch_size"),
    ({"output_type": "jpg"}, ValueError, "output_type"),
    ({"generator": 0}, TypeError, "generator"),
    ({"generator": np.random.default_rng(0)}, TypeError, "generator"),
    ({"generator": "gen_list_short"}, ValueError, "generator"),
    ({"generator": "gen_list_bad"}, TypeError, "generator"),
    ({"callback_on_step_end": 3}, TypeError, "callback_on_step_end"),
    ({"callback_on_step_end_tensor_inputs": ["latents"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ({"backend": "magic"}, ValueError, "backend"),
    ({"guidance_scale": 7.5}, TypeError, "guidance_scale"),
]


@pytest.mark.parametrize("call, error, name", BAD_CALLS)
def test_bad_input_is_rejected_before_any_work(models, call, error, name):
    unet = models("gaussian")
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    pipe = kve_pipe(unet)
    pipe.scheduler.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    state, global_state = gen.get_state(), torch.get_rng_state()
    call = dict(call)
    if call.get("generator") == "gen_list_short":
        call["generator"] = [gen]
    elif call.get("generator") == "gen_list_bad":
        call["generator"] = [gen, "seed"]
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "generator": gen, **call}
    with pytest.raises(error, match=name):
        pipe(**kwargs)
    assert not calls, "the model must not be called"
    assert torch.equal(gen.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)
    assert pipe.scheduler.num_inference_steps == 7


@pytest.mark.parametrize("form", ["single", "global"])
def test_model_with_wrong_output_shape_is_rejected_and_rng_restored(form):
    pipe = kve_pipe(_WrongShape.random())
    pipe.scheduler.set_timesteps(7)
    gen = make_generator(form, 0, 2)
    state = (gen or torch.default_generator).get_state()
    with pytest.raises(ValueError, match="model"):
        pipe(2, 3, gen, output_type="np")
    assert torch.equal((gen or torch.default_generator).get_state(), state)
    assert pipe.scheduler.num_inference_steps == 7


def test_model_config_with_mismatched_channels_is_rejected(models):
    unet = GaussianScore()
    unet.config.out_channels = 1
    with pytest.raises(ValueError, match="unet"):
        kve_pipe(unet)(1, 3)


def test_diffusers_pipeline_runs_with_our_scheduler(models):
    unet = models("test_unet+gaussian")
    a = RefPipeline(unet=unet, scheduler=kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    a.set_progress_bar_config(disable=True)
    ours = a(2, 6, torch.Generator().manual_seed(3), output_type="np").images
    ref = reference_pipe(unet, **SMALL_SIGMAS)(2, 6, torch.Generator().manual_seed(3), output_type="np").images
    assert_mostly_inside(ref)
    assert_bitwise(ours, ref)


def test_pipeline_rejects_wrong_components(models):
    from diffusers import DDPMScheduler

    with pytest.raises(TypeError, match="scheduler"):
        kve_fast.KarrasVePipeline(models("gaussian"), DDPMScheduler())
    with pytest.raises(TypeError, match="unet"):
        kve_fast.KarrasVePipeline(lambda x, s: x, kve_fast.KarrasVeScheduler())


# --- what the pipeline refuses before the first model call --------------------------------------------------------

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
