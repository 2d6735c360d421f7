"""Any layout in, the contiguous bits out: ``channels_last=True`` (the model fed channels_last input, its output read by
the kernels without a copy, eager and graphed)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CAN_RUN_TRITON, CHURN_EVERY_STEP, assert_bitwise, assert_meaningful, kve_pipe, make_generator, reference_test_unet,
)

import kve_fast
from kve_fast import graphs


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
