"""kve_fast.ncsnpp: device-cached FIR filters for diffusers' NCSN++ blocks (CUDA-graph capture), bit-exact."""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models import downsampling, upsampling
from diffusers.models.downsampling import FirDownsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import FirUpsample2D

from conftest import assert_bitwise, ncsnpp_unet, reference_test_unet

import kve_fast
from kve_fast import ncsnpp

SIGMAS = (0.002, 0.3, 5.0, 80.0)  # the model's noise-level argument (sigma / 2 in the sampler)


def scale_shift_unet(sample_size: int = 16) -> UNet2DModel:
    """Another NCSN++-style layout: scale-shift time conditioning, 2 layers per block, attention first,
    positional time embedding (every Skip block type, in other places than ``ncsnpp_unet``)."""
    torch.manual_seed(2)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(32, 32, 64), time_embedding_type="positional", norm_eps=1e-6,
        resnet_time_scale_shift="scale_shift", mid_block_scale_factor=math.sqrt(2),
        down_block_types=("AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D"),
    ).eval()


UNETS = {"ncsnpp": lambda: ncsnpp_unet(16), "scale_shift": lambda: scale_shift_unet(16)}


def pair(name: str):
    """``(patched, unpatched)``: two identical models, the first one patched."""
    unpatched = UNETS[name]()
    patched = copy.deepcopy(unpatched)
    assert ncsnpp.make_capturable(patched) > 0
    return patched, unpatched


def fir_sites(model) -> int:
    """How many modules build host filters: FIR up/down samplers, and FIR ResnetBlock2Ds (whose
    ``upsample`` / ``downsample`` is a lambda; a non-FIR one holds a module or a partial there)."""
    return sum(isinstance(m, (FirUpsample2D, FirDownsample2D))
               or (isinstance(m, ResnetBlock2D)
                   and isinstance(m.__dict__.get("upsample") or m.__dict__.get("downsample"), types.FunctionType))
               for m in model.modules())


def run(model, x, sigma):
    with torch.no_grad():
        return model(x, sigma).sample


class CountingTorch:
    """Stands in for ``torch`` in one module's namespace and counts ``torch.tensor`` calls there."""

    def __init__(self, counts: dict, where: str):
        self._counts, self._where = counts, where

    def __getattr__(self, name):
        return getattr(torch, name)

    def tensor(self, *args, **kwargs):
        self._counts[self._where] = self._counts.get(self._where, 0) + 1
        return torch.tensor(*args, **kwargs)


@pytest.fixture
def count_tensor_calls(monkeypatch):
    """Count ``torch.tensor`` calls made from diffusers' model modules and from kve_fast.ncsnpp."""
    counts: dict = {}
    names = [n for n, m in list(sys.modules.items())
             if m is not None and (n.startswith("diffusers.models") or n == "kve_fast.ncsnpp")
             and getattr(m, "torch", None) is torch]
    assert "diffusers.models.upsampling" in names and "diffusers.models.downsampling" in names
    for name in names:
        monkeypatch.setattr(sys.modules[name], "torch", CountingTorch(counts, name))
    return counts


# --- bits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(UNETS))
def test_bit_identical_float32(name):
    patched, unpatched = pair(name)
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        for sigma in SIGMAS:
            x = torch.rand(batch, 3, 16, 16, generator=gen)
            s = torch.tensor(sigma, dtype=torch.float32)
            assert_bitwise(run(patched, x, s), run(unpatched, x, s), f"{name} batch {batch} sigma {sigma}")
    # one noise level per sample
    x = torch.rand(4, 3, 16, 16, generator=gen)
    s = torch.tensor(SIGMAS, dtype=torch.float32)
    assert_bitwise(run(patched, x, s), run(unpatched, x, s), f"{name} per-sample sigmas")


def test_patch_counts_every_fir_module():
    model = ncsnpp_unet(16)
    expected = fir_sites(model)
    # conftest's UNet: 2 down blocks with (resnet_down, FirDownsample2D), 3 up blocks with a FirUpsample2D
    # each and 2 with a FIR resnet_up
    assert expected == 9
    assert ncsnpp.needs_patch(model)
    assert ncsnpp.make_capturable(model) == expected
    assert not ncsnpp.needs_patch(model)
    assert ncsnpp.make_capturable(model) == 0  # idempotent
    assert not ncsnpp.needs_patch(model)


def test_no_fir_model_untouched():
    model = reference_test_unet(16)
    assert not ncsnpp.needs_patch(model)
    assert ncsnpp.make_capturable(model) == 0
    assert ncsnpp.restore(model) == 0


@pytest.mark.parametrize("use_conv", [False, True])
@pytest.mark.parametrize("fir_kernel", [(1, 3, 3, 1), (1, 2, 1), [[1, 2], [3, 5]], (1.0, 3.0, 3.0, 1.0)])
def test_fir_modules_standalone(use_conv, fir_kernel):
    """FirUpsample2D / FirDownsample2D with a convolution and other kernels (public classes, not reached
    by UNet2DModel configs), and FIR ResnetBlock2Ds up and down."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "up": FirUpsample2D(8, out_channels=8, use_conv=use_conv, fir_kernel=fir_kernel),
        "down": FirDownsample2D(8, out_channels=8, use_conv=use_conv, fir_kernel=fir_kernel),
        "res_up": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, up=True, kernel="fir"),
        "res_down": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, down=True, kernel="fir"),
    }).eval()
    ref = copy.deepcopy(model)
    assert ncsnpp.make_capturable(model) == 4
    gen = torch.Generator().manual_seed(1)
    for shape in ((2, 8, 8, 8), (1, 8, 5, 7)):
        x = torch.randn(*shape, generator=gen)
        temb = torch.randn(shape[0], 16, generator=gen)
        with torch.no_grad():
            for key in ("up", "down"):
                assert_bitwise(model[key](x), ref[key](x), f"{key} {shape}")
            for key in ("res_up", "res_down"):
                assert_bitwise(model[key](x, temb), ref[key](x, temb), f"{key} {shape}")


@pytest.mark.parametrize("kernel", [None, (1, 3, 3, 1), [1, 1], (2, 7, 1)])
@pytest.mark.parametrize("factor,gain", [(2, 1), (3, 2.5), (1, 1)])
def test_helpers_honour_their_arguments(kernel, factor, gain):
    """The patched ``_upsample_2d`` / ``_downsample_2d`` take every argument diffusers' take."""
    torch.manual_seed(0)
    up, down = FirUpsample2D(4, use_conv=False), FirDownsample2D(4, use_conv=False)
    box = torch.nn.ModuleList([up, down])
    x = torch.randn(2, 4, 9, 9)
    want_up = up._upsample_2d(x, kernel=kernel, factor=factor, gain=gain)
    want_down = down._downsample_2d(x, kernel=kernel, factor=factor, gain=gain)
    assert ncsnpp.make_capturable(box) == 2
    for _ in range(2):  # a miss, then a hit
        assert_bitwise(up._upsample_2d(x, kernel=kernel, factor=factor, gain=gain), want_up, "up")
        assert_bitwise(down._downsample_2d(x, kernel=kernel, factor=factor, gain=gain), want_down, "down")
    # arguments the cache cannot key (a tensor kernel): diffusers' own code runs
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "To copy construct from a tensor")  # diffusers' torch.tensor(tensor)
        assert_bitwise(up._upsample_2d(x, kernel=k), FirUpsample2D._upsample_2d(up, x, kernel=k), "tensor kernel")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_filters_follow_dtype(dtype):
    patched, unpatched = pair("ncsnpp")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    s = torch.tensor(0.5)
    assert_bitwise(run(patched, x, s), run(unpatched, x, s), "float32 first")  # float32 filters cached
    patched.to(dtype)
    unpatched.to(dtype)
    xd, sd = x.to(dtype), s.to(dtype)
    out = run(patched, xd, sd)
    assert out.dtype == dtype
    assert_bitwise(out, run(unpatched, xd, sd), f"after .to({dtype})")
    patched.float()
    unpatched.float()
    assert_bitwise(run(patched, x, s), run(unpatched, x, s), "back to float32")


def test_filter_cache_is_on_the_device_and_dtype_of_the_input():
    model = ncsnpp_unet(16)
    ncsnpp.make_capturable(model)
    up = model.up_blocks[1].upsampler  # (the first up block's upsampler never runs: it gets no skip sample)
    patch = up.__dict__[ncsnpp._RECORD]
    # make_capturable built the model's (device, dtype) right away
    assert {(k[-2], k[-1]) for k in patch.filters} == {(torch.device("cpu"), torch.float32)}
    model.double()
    run(model, torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    assert {(k[-2], k[-1]) for k in patch.filters} == {(torch.device("cpu"), torch.float32),
                                                       (torch.device("cpu"), torch.float64)}
    for filt in patch.filters.values():
        assert not filt.requires_grad and not filt.is_inference()


# --- no host filter construction -------------------------------------------------------------------

def test_patched_forward_builds_no_host_filter(count_tensor_calls):
    patched, unpatched = pair("ncsnpp")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    s = torch.tensor(0.25)  # a tensor: UNet2DModel itself calls torch.tensor for a Python number
    run(unpatched, x, s)
    calls = dict(count_tensor_calls)
    # the unpatched model builds a filter per FIR site per forward (two per FIR ResnetBlock2D; the first
    # up block's upsampler never runs: it gets no skip sample)
    assert calls.get("diffusers.models.upsampling", 0) == 2 + 2 * 2
    assert calls.get("diffusers.models.downsampling", 0) == 2 + 2 * 2
    count_tensor_calls.clear()
    out = run(patched, x, s)
    assert count_tensor_calls == {}, count_tensor_calls  # filters came from the cache built by make_capturable
    assert_bitwise(out, run(unpatched, x, s), "patched vs unpatched")


def test_patched_forward_builds_no_host_filter_after_first_forward(count_tensor_calls):
    model = ncsnpp_unet(16)
    ncsnpp.make_capturable(model)
    model.double()  # a (device, dtype) make_capturable did not build: the first forward builds it
    x, s = torch.rand(1, 3, 16, 16, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    run(model, x, s)
    assert set(count_tensor_calls) == {"kve_fast.ncsnpp"}  # built by the cache, once per distinct filter
    count_tensor_calls.clear()
    run(model, x, s)
    run(model, x, s)
    assert count_tensor_calls == {}


# --- state, restore, isolation ---------------------------------------------------------------------

def test_state_dict_and_structure_unchanged(tmp_path):
    patched, unpatched = pair("ncsnpp")
    sd_p, sd_u = patched.state_dict(), unpatched.state_dict()
    assert list(sd_p) == list(sd_u)
    for key in sd_u:
        assert_bitwise(sd_p[key], sd_u[key], key)
    assert [n for n, _ in patched.named_modules()] == [n for n, _ in unpatched.named_modules()]
    assert [n for n, _ in patched.named_buffers()] == [n for n, _ in unpatched.named_buffers()]
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in unpatched.named_parameters()]
    patched.save_pretrained(tmp_path / "p")
    unpatched.save_pretrained(tmp_path / "u")
    files = sorted(f.name for f in (tmp_path / "u").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "p").iterdir())
    for name in files:
        assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "u" / name).read_bytes(), name
    loaded = UNet2DModel.from_pretrained(tmp_path / "p").eval()
    assert ncsnpp.needs_patch(loaded)  # the patch is not saved
    # the loaded model is compared with itself, patched: loading alone can change the last bits on the
    # CPU (time_embedding.linear_1 with equal weights; so does a deepcopy of the loaded model, presumably
    # through the weights' memory alignment)
    x, s = torch.rand(1, 3, 16, 16), torch.tensor(0.5)
    want = run(loaded, x, s)
    assert ncsnpp.make_capturable(loaded) == 9
    assert_bitwise(run(loaded, x, s), want, "loaded, patched vs unpatched")


def test_restore(count_tensor_calls):
    model = ncsnpp_unet(16)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    x, s = torch.rand(1, 3, 16, 16), torch.tensor(0.5)
    want = run(model, x, s)
    assert ncsnpp.make_capturable(model) == 9
    assert ncsnpp.restore(model) == 9
    assert ncsnpp.restore(model) == 0
    after = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for attr, value in before[name].items():
            assert after[name][attr] is value, f"{name}.{attr}"
    for m in model.modules():
        if isinstance(m, FirUpsample2D):
            assert m._upsample_2d.__func__ is FirUpsample2D._upsample_2d
            assert m.forward.__func__ is FirUpsample2D.forward
        if isinstance(m, FirDownsample2D):
            assert m._downsample_2d.__func__ is FirDownsample2D._downsample_2d
    assert ncsnpp.needs_patch(model)
    count_tensor_calls.clear()
    assert_bitwise(run(model, x, s), want, "restored")
    assert count_tensor_calls.get("diffusers.models.upsampling", 0) > 0  # diffusers' code again
    assert ncsnpp.make_capturable(model) == 9  # and it can be patched again


def test_other_instances_and_diffusers_unaffected(count_tensor_calls):
    originals = (FirUpsample2D._upsample_2d, FirUpsample2D.forward, FirDownsample2D._downsample_2d,
                 FirDownsample2D.forward, ResnetBlock2D.forward, upsampling.upsample_2d,
                 downsampling.downsample_2d, upsampling.upfirdn2d_native, downsampling.upfirdn2d_native)
    patched = ncsnpp_unet(16)
    other = ncsnpp_unet(16)
    ncsnpp.make_capturable(patched)
    assert originals == (FirUpsample2D._upsample_2d, FirUpsample2D.forward, FirDownsample2D._downsample_2d,
                         FirDownsample2D.forward, ResnetBlock2D.forward, upsampling.upsample_2d,
                         downsampling.downsample_2d, upsampling.upfirdn2d_native, downsampling.upfirdn2d_native)
    assert ncsnpp.needs_patch(other)
    for m in other.modules():
        assert ncsnpp._RECORD not in m.__dict__
        assert "_upsample_2d" not in m.__dict__ and "_downsample_2d" not in m.__dict__
    x, s = torch.rand(1, 3, 16, 16), torch.tensor(0.5)
    count_tensor_calls.clear()
    run(other, x, s)
    assert count_tensor_calls.get("diffusers.models.upsampling", 0) > 0  # still diffusers' host filters
    count_tensor_calls.clear()
    run(patched, x, s)
    assert count_tensor_calls == {}


def test_deepcopy_of_a_patched_model():
    patched, unpatched = pair("ncsnpp")
    twin = copy.deepcopy(patched)
    assert not ncsnpp.needs_patch(twin)
    for m in twin.modules():
        if isinstance(m, (FirUpsample2D, FirDownsample2D)):
            helper = m.__dict__["_upsample_2d" if isinstance(m, FirUpsample2D) else "_downsample_2d"]
            assert helper.__self__ is m  # bound to the copy, not to the original
        if isinstance(m, ResnetBlock2D) and ncsnpp._RECORD in m.__dict__:
            resample = m.__dict__.get("upsample") or m.__dict__.get("downsample")
            assert resample.patch is m.__dict__[ncsnpp._RECORD]
    x, s = torch.rand(2, 3, 16, 16), torch.tensor(3.0)
    assert_bitwise(run(twin, x, s), run(unpatched, x, s), "deepcopy")
    assert ncsnpp.restore(twin) == 9 and not ncsnpp.needs_patch(patched)


def test_unrecognised_fir_module_is_left_alone_with_a_warning():
    class MyFirUp(FirUpsample2D):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    box = torch.nn.ModuleList([MyFirUp(4), FirDownsample2D(4)])
    with pytest.warns(RuntimeWarning, match="left unpatched"):
        assert ncsnpp.make_capturable(box) == 1
    assert ncsnpp.needs_patch(box)  # the subclass still builds its filter on the host
    assert "_upsample_2d" not in box[0].__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ncsnpp.make_capturable(ncsnpp_unet(8)) == 9


def test_wrong_argument():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ncsnpp.make_capturable(object())


# --- the pipeline ----------------------------------------------------------------------------------

def test_pipeline_latent_bits(count_tensor_calls):
    patched, unpatched = pair("ncsnpp")

    def latent(unet):
        pipe = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(2, 3, generator=torch.Generator().manual_seed(0), output_type="latent").images

    want = latent(unpatched)
    count_tensor_calls.clear()
    got = latent(patched)
    assert not any(k.startswith("diffusers.models") for k in count_tensor_calls), count_tensor_calls
    assert got.shape == (2, 3, 16, 16)
    assert_bitwise(got, want, "pipeline latent, patched vs unpatched UNet")


# --- CUDA graph (runs where there is a GPU) --------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_matches_eager():
    patched, unpatched = pair("ncsnpp")
    patched.cuda()
    unpatched.cuda()
    gen = torch.Generator().manual_seed(6)
    x_static = torch.rand(2, 3, 16, 16, generator=gen).cuda()
    s_static = torch.tensor(0.5, device="cuda")  # on the device: UNet2DModel then copies nothing
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                patched(x_static, s_static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = patched(x_static, s_static).sample
        for sigma in SIGMAS:
            x = torch.rand(2, 3, 16, 16, generator=gen).cuda()
            x_static.copy_(x)
            s_static.fill_(sigma)
            graph.replay()
            want = unpatched(x, torch.tensor(sigma, device="cuda")).sample
            torch.cuda.synchronize()
            assert_bitwise(out_static, want, f"graph replay at sigma {sigma}")
