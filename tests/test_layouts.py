"""Any layout in, the contiguous bits out: every layout a user can hand in (contiguous, channels_last, permuted,
sliced) and a callback's channels_last sample give the torch backend's bits on every backend; ``channels_last=True``
(the model fed channels_last input, its output read by the kernels without a copy, eager and graphed)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CAN_RUN_TRITON, CHURN_EVERY_STEP, GaussianScore, assert_bitwise, assert_meaningful, kve_pipe, make_generator,
    reference_test_unet,
)

import kve_fast
from kve_fast import graphs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])
SIGMAS = [20.0, 5.0, 1.0, 0.3, 0.0]


def _cl_run(pipe, channels_last, cuda_graph, **kw):
    kw.setdefault("output_type", "latent")
    out = pipe(2, 3, make_generator(kw.pop("form", "list"), 5, 2), backend="triton", cuda_graph=cuda_graph,
               channels_last=channels_last, **kw).images
    if kw["output_type"] == "pil":
        import numpy as np

        return torch.from_numpy(np.stack([np.asarray(i) for i in out]))
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(out)


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
@pytest.mark.parametrize("noise", ["exact", "fast"])
@pytest.mark.parametrize("output_type", ["latent", "np", "pil"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_channels_last_gives_the_contiguous_bits(fake_graphs, noise, output_type, cuda_graph):
    unet = reference_test_unet(8).to(memory_format=torch.channels_last)
    pipe = kve_pipe(unet, **CHURN_EVERY_STEP)
    seen = []
    model_forward = unet.forward

    def spy(x, *a, **k):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return model_forward(x, *a, **k)

    unet.forward = spy
    from kve_fast.ops.fused import FusedStep

    raw_layouts = []
    original_raw = FusedStep._raw

    def raw_spy(self, raw):
        raw_layouts.append(raw.is_contiguous(memory_format=torch.channels_last))
        return original_raw(self, raw)

    FusedStep._raw = raw_spy
    try:
        cl = _cl_run(pipe, True, cuda_graph, noise=noise, output_type=output_type)
        assert seen and all(seen), "the model must get channels_last input"
        assert raw_layouts and all(raw_layouts), "the model's output must reach the kernels without a layout copy"
        ref = _cl_run(pipe, False, cuda_graph, noise=noise, output_type=output_type)
    finally:
        del unet.forward
        FusedStep._raw = original_raw
    assert_bitwise(cl, ref, f"channels_last vs contiguous ({noise}, {output_type}, graphs {cuda_graph})")
    if output_type == "latent":
        assert_meaningful(ref)
    if cuda_graph:
        assert graphs.graph_info()["captures"] == 2, "one capture per layout"


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
def test_channels_last_with_a_callback_and_euler(fake_graphs):
    # the model converted too: torch's convolutions pick their algorithm by the input's and weights' layout,
    # so a contiguous model fed channels_last input may round differently (the model's bits, not the sampler's)
    pipe = kve_pipe(reference_test_unet(8).to(memory_format=torch.channels_last), **CHURN_EVERY_STEP)
    runs = {}
    for cl in (False, True):
        samples = []

        def callback(p, i, t, kw, samples=samples):
            samples.append(kw["sample"].clone())
            return {}

        out = pipe(2, 3, torch.Generator().manual_seed(1), output_type="latent", backend="triton", cuda_graph=True,
                   channels_last=cl, solver="euler", callback_on_step_end=callback).images
        runs[cl] = samples + [out]
    for a, b in zip(runs[True], runs[False]):
        assert_bitwise(a, b, "euler with a callback, channels_last vs contiguous")


def test_channels_last_needs_a_4d_shape_and_a_bool():
    model, sched = reference_test_unet(8), kve_fast.KarrasVeScheduler()
    with pytest.raises(ValueError, match="channels_last"):
        kve_fast.sample_karras_ve(lambda x, t: x, sched, (2, 3, 8), 2, channels_last=True)
    with pytest.raises(TypeError, match="channels_last"):
        kve_fast.sample_karras_ve(model, sched, (2, 3, 8, 8), 2, channels_last="yes")


def _layouts(x: torch.Tensor) -> dict:
    """The same values in the layouts a user can hand in."""
    wide = torch.zeros(x.shape[0] * 2, *x.shape[1:], device=x.device)
    wide[::2] = x
    return {
        "contiguous": x.clone(),
        "channels_last": x.clone().to(memory_format=torch.channels_last),
        "permuted": x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "sliced": wide[::2],
    }


# --- every layout gives the torch backend's bits on every backend ----------------------------------------


@pytest.mark.parametrize("model_name", ["gaussian", "unet"])
def test_every_layout_gives_the_same_bits_on_every_backend(model_name):
    model = GaussianScore(8) if model_name == "gaussian" else reference_test_unet(8)
    model = model.to(DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * SIGMAS[0]
    expected = kve_fast.sample_karras_ve_sigmas(model, x, SIGMAS, s_churn=2.0, generator=torch.Generator().manual_seed(1),
                                    backend="torch")
    for name, xl in _layouts(x).items():
        assert torch.equal(xl, x)
        for backend in BACKENDS:
            got = kve_fast.sample_karras_ve_sigmas(model, xl, SIGMAS, s_churn=2.0, generator=torch.Generator().manual_seed(1),
                                       backend=backend)
            assert_bitwise(got, expected, f"{backend} backend, {name} input")
            assert got.is_contiguous()


def test_a_callback_may_return_any_layout():
    model = GaussianScore(8).to(DEVICE)
    pipe = kve_pipe(model)

    def to_channels_last(p, i, t, kw):
        return {"sample": kw["sample"].to(memory_format=torch.channels_last)}

    out = {b: pipe(2, 4, torch.Generator().manual_seed(3), output_type="latent", backend=b,
                   callback_on_step_end=to_channels_last).images for b in BACKENDS}
    plain = pipe(2, 4, torch.Generator().manual_seed(3), output_type="latent", backend="torch").images
    for b, latent in out.items():
        assert_bitwise(latent, plain, f"{b}: a channels_last sample from the callback")
