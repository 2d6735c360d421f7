"""Low precision (kve_fast.precision): a bf16/fp16 UNet with float32 state, autocast, TF32, and what stays true.

Bits cannot match the reference here (it cannot run a half-precision UNet at all). What must hold: the
state and the result stay float32; the model sees its own dtype; the Triton kernels (which write the
model input in that dtype and read its output as is) give the torch backend's bits, which cast around
the call, so the backends stay interchangeable; graphs give the eager bits; bad arguments fail before
any draw. Accuracy against float64 is tests/test_accuracy.py's; TF32 under both of torch's APIs,
tests/test_tf32.py's; channels_last, tests/test_layouts.py's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    CAN_RUN_TRITON, CHURN_EVERY_STEP, assert_bitwise, assert_meaningful, kve_pipe, make_generator, reference_test_unet,
)

import kve_fast
from kve_fast import graphs
from kve_fast.precision import Precision, model_dtype, resolve

BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])


class Recording(torch.nn.Module):
    """Wraps a UNet; records the dtype of every input, whether autocast was on, and the output dtype."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.seen = unet, []

    def forward(self, x, t):
        out = self.unet(x, t).sample
        self.seen.append((x.dtype, torch.is_autocast_enabled(x.device.type), out.dtype))
        return out


def _sample(model, backend="torch", steps=3, **kw):
    kw.setdefault("generator", make_generator("single", 0, 2))
    return kve_fast.sample_karras_ve(model, kve_fast.KarrasVeScheduler(**CHURN_EVERY_STEP), (2, 3, 8, 8), steps,
                                     backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_unet_runs_with_float32_state_and_the_backends_agree(dtype):
    model = Recording(reference_test_unet(8).to(dtype))
    states = []

    def callback(state):
        states.append(state["sample"].dtype)

    ref = _sample(model, "torch", callback=callback, output="latent")
    assert_meaningful(ref)
    assert {x for x, _, _ in model.seen} == {dtype}, "the model must be called in its own dtype"
    assert set(states) == {torch.float32}, "the sampler's state stays float32"
    for backend in BACKENDS[1:]:
        model.seen.clear()
        out = _sample(model, backend, output="latent")
        assert {x for x, _, _ in model.seen} == {dtype}
        assert_bitwise(out, ref, f"{backend} vs torch, UNet in {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_float32_path_is_unchanged_by_an_explicit_float32(backend):
    unet = reference_test_unet(8)
    assert_bitwise(_sample(unet, backend, unet_dtype=torch.float32), _sample(unet, backend), "unet_dtype=float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float32_unet_asked_for_bf16_runs_under_autocast(backend):
    unet = reference_test_unet(8)
    model = Recording(unet)
    exact = _sample(unet, backend)
    lowp = _sample(model, backend, unet_dtype=torch.bfloat16)
    assert_meaningful(lowp)
    assert all(autocast for _, autocast, _ in model.seen) and model.seen
    assert {x for x, _, _ in model.seen} == {torch.float32}, "under autocast the input stays float32"
    assert not torch.equal(lowp, exact), "bf16 matmuls must change some bits (else the mode did nothing)"
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); through a UNet and 3 steps the run
    # drifts far more than float32 but stays close: a relative RMS difference well under 10 %.
    rel = ((lowp - exact).norm() / exact.norm()).item()
    assert rel < 0.1, rel
    if backend != "torch":
        assert_bitwise(lowp, _sample(model, "torch", unet_dtype=torch.bfloat16), "autocast, backend vs torch")


@pytest.mark.parametrize("kwargs, error, name", [
    ({"unet_dtype": "bf16"}, TypeError, "unet_dtype"),
    ({"unet_dtype": torch.float64}, ValueError, "unet_dtype"),
    ({"unet_dtype": torch.int8}, ValueError, "unet_dtype"),
    ({"tf32": 1}, TypeError, "tf32"),
])
def test_bad_precision_arguments_fail_before_any_draw(kwargs, error, name):
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(error, match=name):
        _sample(reference_test_unet(8), generator=gen, **kwargs)
    assert torch.equal(gen.get_state(), state)


def test_a_bf16_unet_cannot_be_asked_to_run_in_fp16():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match="unet_dtype"):
        _sample(reference_test_unet(8).to(torch.bfloat16), generator=gen, unet_dtype=torch.float16)
    assert torch.equal(gen.get_state(), state)


def test_resolve_reads_the_model_dtype():
    cpu = torch.device("cpu")
    assert model_dtype(lambda x, t: x) == torch.float32
    assert resolve(reference_test_unet(8).half(), None, False, cpu) == Precision(torch.float16)
    assert resolve(reference_test_unet(8), torch.bfloat16, True, cpu) == Precision(torch.bfloat16, True, True)
    assert Precision().exact and not Precision(tf32=True).exact


@pytest.fixture
def tf32_off():
    """Both TF32 switches off, put back afterwards (torch's switch objects are properties, so no monkeypatch)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("fail", [False, True])
def test_tf32_is_on_for_the_run_only(fail, tf32_off):
    seen = []

    def model(x, t):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        if fail:
            raise RuntimeError("boom")
        return torch.zeros_like(x)

    if fail:
        with pytest.raises(RuntimeError, match="boom"):
            _sample(model, tf32=True)
    else:
        _sample(model, tf32=True)
    assert seen and set(seen) == {(True, True)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


def test_the_pipeline_takes_unet_dtype():
    pipe = kve_pipe(reference_test_unet(8), **CHURN_EVERY_STEP)
    latent = pipe(2, 3, torch.Generator().manual_seed(0), output_type="latent", unet_dtype=torch.bfloat16).images
    assert_meaningful(latent)
    assert not torch.equal(latent, pipe(2, 3, torch.Generator().manual_seed(0), output_type="latent").images)
    with pytest.raises(TypeError, match="unet_dtype"):
        pipe(1, 2, unet_dtype="bfloat16")


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
def test_graphed_low_precision_gives_the_eager_bits_and_its_own_capture(fake_graphs):
    unet = reference_test_unet(8)
    pipe = kve_pipe(unet, **CHURN_EVERY_STEP)
    run = lambda **kw: pipe(2, 3, torch.Generator().manual_seed(0), output_type="latent",  # noqa: E731
                            backend="triton", **kw).images
    eager = run(cuda_graph=False, unet_dtype=torch.bfloat16)
    assert_bitwise(run(cuda_graph=True, unet_dtype=torch.bfloat16), eager, "graphed vs eager, autocast bf16")
    run(cuda_graph=True)
    assert graphs.graph_info()["captures"] == 2, "float32 and bf16 runs must not share a capture"
    unet.to(torch.bfloat16)
    native = run(cuda_graph=False)
    assert_bitwise(run(cuda_graph=True), native, "graphed vs eager, bf16 UNet")


def test_the_cli_runs_a_bf16_unet(tmp_path):
    from diffusers import UNet2DModel

    from kve_fast.cli import main

    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=1, out_channels=1,
                       norm_num_groups=8, time_embedding_type="fourier",
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    model = tmp_path / "model"
    unet.save_pretrained(model)
    kve_fast.KarrasVeScheduler(**CHURN_EVERY_STEP).save_config(model)
    out = tmp_path / "bf16.png"
    assert main(["sample", "--model", str(model), "--steps", "3", "--batch-size", "2", "--device", "cpu", "--quiet",
                 "--unet-dtype", "bf16", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_generate_records_the_precision_and_refuses_to_mix_it_on_resume():
    from kve_fast.generate import record_differences, sampler_settings

    pipe = kve_pipe(reference_test_unet(8))
    fp32 = sampler_settings(pipe, 3, "heun", "exact")
    assert fp32["precision"] == {"unet_dtype": "float32", "tf32": False}
    pipe.unet.to(torch.bfloat16)
    bf16 = sampler_settings(pipe, 3, "heun", "exact", tf32=False)
    model = {"name": "m", "sha256": None}
    assert record_differences({"model": model, "settings": fp32}, {"model": model, "settings": bf16}) == [
        "--unet-dtype 'float32' (now 'bfloat16')"]
    assert record_differences({"model": model, "settings": fp32}, {"model": model, "settings": fp32}) == []


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
def test_fast_modes_put_ncsnpp_fir_blocks_on_the_triton_kernel_for_the_run_only(monkeypatch):
    from conftest import ncsnpp_unet

    from kve_fast import ncsnpp
    from kve_fast.ops import fir_triton

    unet = ncsnpp_unet(8)
    pipe = kve_pipe(unet, **CHURN_EVERY_STEP)
    run = lambda **kw: pipe(2, 2, torch.Generator().manual_seed(0), output_type="latent",  # noqa: E731
                            backend="triton", cuda_graph=False, **kw).images
    calls = []
    original = fir_triton.upfirdn2d
    monkeypatch.setattr(fir_triton, "upfirdn2d", lambda *a, **k: calls.append(1) or original(*a, **k))
    exact = run()
    assert not calls, "exact mode keeps diffusers' FIR ops"
    fast = run(noise="fast")
    assert calls and not ncsnpp.is_fast(unet), "fast noise runs the Triton FIR kernel, then puts diffusers' back"
    # the patches stay (switched back to diffusers' ops): a CUDA graph captured in fast mode keeps reading
    # the device filters they hold, which must not be freed after the call
    assert not ncsnpp.needs_patch(unet)
    assert_meaningful(fast)
    assert_bitwise(run(), exact, "an exact run after a fast one")
    calls.clear()
    run(unet_dtype=torch.bfloat16)
    assert calls and not ncsnpp.is_fast(unet), "low precision is a fast mode too"


def test_a_model_of_buffers_runs_in_its_buffers_dtype():
    from conftest import GaussianScore

    model = GaussianScore(8)
    assert not list(model.parameters()) and model_dtype(model) == torch.float32
    assert model_dtype(model.to(torch.bfloat16)) == torch.bfloat16


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton")
def test_a_failing_fast_run_puts_everything_back():
    """A model that raises mid-run in a fast mode: the generator, the TF32 switches and the NCSN++ FIR
    patches are as before (exact runs after it keep diffusers' ops and bits)."""
    from conftest import ncsnpp_unet

    from kve_fast import ncsnpp

    unet = ncsnpp_unet(8)
    exact = kve_pipe(unet, **CHURN_EVERY_STEP)(2, 2, torch.Generator().manual_seed(0), output_type="latent",
                                               backend="triton", cuda_graph=False).images
    calls = {"n": 0}
    forward = unet.forward

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return forward(*a, **k)

    unet.forward = failing
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        with pytest.raises(RuntimeError, match="boom"):
            kve_pipe(unet, **CHURN_EVERY_STEP)(2, 2, gen, output_type="latent", backend="triton", cuda_graph=False,
                                               noise="fast", tf32=True)
    finally:
        del unet.forward
    assert torch.equal(gen.get_state(), state)
    assert torch.backends.cuda.matmul.allow_tf32 == tf32
    assert not ncsnpp.is_fast(unet)
    assert_bitwise(kve_pipe(unet, **CHURN_EVERY_STEP)(
        2, 2, torch.Generator().manual_seed(0), output_type="latent", backend="triton", cuda_graph=False).images,
        exact, "exact after a failure")
