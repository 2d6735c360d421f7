"""kve_fast.KarrasVePipeline against diffusers' KarrasVePipeline: same call, same outputs, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    GaussianScore, OracleScore, RefPipeline, RefScheduler, assert_bitwise, kve_pipe, make_generator, reference_latent,
    reference_pipe,
)
from PIL import Image

import kve_fast

CUSTOM = {"sigma_min": 0.01, "sigma_max": 50.0, "s_noise": 1.0, "s_churn": 30.0, "s_min": 0.1, "s_max": 10.0}

# (model, generator form, batch size, steps, scheduler settings): every model sees every generator form,
# batch 1 and odd batches, 2 steps (no churn, no correction but the first) up to 6 (churned steps).
CASES = [
    (model, form, batch, steps, config)
    for model in ("test_unet", "ncsnpp", "gaussian")
    for form, batch, steps, config in [
        ("global", 1, 2, {}),
        ("single", 3, 3, {}),
        ("list", 2, 5, {}),
        ("single", 1, 4, CUSTOM),
        ("list", 3, 3, {"s_churn": 0.0}),
    ]
]


def _run_both(unet, form, seed, batch, steps, config, **call):
    ref = reference_pipe(unet, **config)(batch, steps, make_generator(form, seed, batch), **call).images
    ours = kve_pipe(unet, **config)(batch, steps, make_generator(form, seed, batch), **call).images
    return ours, ref


@pytest.mark.parametrize("model, form, batch, steps, config", CASES)
def test_numpy_output_matches_reference(models, model, form, batch, steps, config):
    ours, ref = _run_both(models(model), form, 11 + steps, batch, steps, config, output_type="np")
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert_bitwise(ours, ref, f"{model} images")


def test_gaussian_outputs_stay_inside_the_image_range(models):
    """Saturated images (all 0 or 1) would prove little: the Gaussian model's stay inside (0, 1)."""
    ours, ref = _run_both(models("gaussian"), "single", 3, 2, 20, {}, output_type="np")
    assert_bitwise(ours, ref)
    inside = ((ours > 0) & (ours < 1)).mean()
    assert inside > 0.95, f"only {inside:.1%} of pixels inside (0, 1)"


@pytest.mark.parametrize("model", ["test_unet", "ncsnpp", "gaussian"])
@pytest.mark.parametrize("output_type", ["pil", "numpy"])
def test_pil_and_numpy_outputs_match_reference(models, model, output_type):
    ours, ref = _run_both(models(model), "list", 5, 2, 3, {}, output_type=output_type)
    if output_type == "pil":
        assert len(ours) == len(ref) == 2
        for o, r in zip(ours, ref):
            assert o.mode == r.mode == "RGB"
            assert_bitwise(np.asarray(o), np.asarray(r), "PIL pixels")
    else:
        assert_bitwise(ours, ref)


@pytest.mark.parametrize("model, form", [("test_unet", "single"), ("ncsnpp", "list"), ("gaussian", "global")])
def test_latent_output_matches_reference_loop(models, model, form):
    unet = models(model)
    ours = kve_pipe(unet)(3, 4, make_generator(form, 21, 3), output_type="latent").images
    ref = reference_latent(unet, RefScheduler(), (3, 3, 16 if model != "gaussian" else 8, 16 if model != "gaussian" else 8),
                           4, make_generator(form, 21, 3))
    assert_bitwise(ours, ref, "latent")
    assert ours.dtype == torch.float32 and ours.dim() == 4


def test_sampler_function_matches_reference_loop(models):
    unet = models("gaussian")
    scheduler = kve_fast.KarrasVeScheduler(**CUSTOM)
    ours = kve_fast.sample_karras_ve(unet, scheduler, (2, 3, 8, 8), 6, torch.Generator().manual_seed(4))
    ref = reference_latent(unet, RefScheduler(**CUSTOM), (2, 3, 8, 8), 6, torch.Generator().manual_seed(4))
    assert_bitwise(ours, ref)
    assert scheduler.num_inference_steps is None, "the sampler loop must not change the scheduler"


def test_one_channel_model_gives_grayscale_images():
    unet = GaussianScore(sample_size=6, channels=1)
    pipe = kve_pipe(unet)
    images = pipe(2, 3, torch.Generator().manual_seed(0)).images
    assert [im.mode for im in images] == ["L", "L"] and images[0].size == (6, 6)
    latent = pipe(2, 3, torch.Generator().manual_seed(0), output_type="latent").images
    assert_bitwise(latent, reference_latent(unet, RefScheduler(), (2, 1, 6, 6), 3, torch.Generator().manual_seed(0)))


def test_output_types_agree(models):
    pipe = kve_pipe(models("gaussian"))
    run = lambda **kw: pipe(2, 3, torch.Generator().manual_seed(9), **kw)  # noqa: E731
    np_images = run(output_type="np").images
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


def test_from_pipe_swaps_into_a_diffusers_pipeline(models):
    unet = models("ncsnpp")
    ref = reference_pipe(unet, **CUSTOM)
    ours = kve_fast.KarrasVePipeline.from_pipe(ref)
    ours.set_progress_bar_config(disable=True)
    assert ours.unet is unet and isinstance(ours.scheduler, kve_fast.KarrasVeScheduler)
    assert ours.scheduler.config.s_churn == CUSTOM["s_churn"]
    a = ref(2, 3, torch.Generator().manual_seed(2), output_type="np").images
    b = ours(2, 3, torch.Generator().manual_seed(2), output_type="np").images
    assert_bitwise(b, a)


def test_save_and_load_a_local_folder(tmp_path, models):
    pipe = kve_pipe(models("test_unet"), **CUSTOM)
    pipe.save_pretrained(tmp_path / "ours")
    loaded = kve_fast.KarrasVePipeline.from_pretrained(tmp_path / "ours")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.s_max == CUSTOM["s_max"]
    a = pipe(1, 2, torch.Generator().manual_seed(0), output_type="np").images
    assert_bitwise(loaded(1, 2, torch.Generator().manual_seed(0), output_type="np").images, a)
    # A folder written by diffusers' own pipeline loads as well.
    reference_pipe(models("test_unet"), **CUSTOM).save_pretrained(tmp_path / "ref")
    from_ref = kve_fast.KarrasVePipeline.from_pretrained(tmp_path / "ref")
    from_ref.set_progress_bar_config(disable=True)
    assert_bitwise(from_ref(1, 2, torch.Generator().manual_seed(0), output_type="np").images, a)
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
    unet = models("test_unet")
    a = RefPipeline(unet=unet, scheduler=kve_fast.KarrasVeScheduler())
    a.set_progress_bar_config(disable=True)
    ours = a(2, 3, torch.Generator().manual_seed(3), output_type="np").images
    ref = reference_pipe(unet)(2, 3, torch.Generator().manual_seed(3), output_type="np").images
    assert_bitwise(ours, ref)


def test_pipeline_rejects_wrong_components(models):
    from diffusers import DDPMScheduler

    with pytest.raises(TypeError, match="scheduler"):
        kve_fast.KarrasVePipeline(models("gaussian"), DDPMScheduler())
    with pytest.raises(TypeError, match="unet"):
        kve_fast.KarrasVePipeline(lambda x, s: x, kve_fast.KarrasVeScheduler())
