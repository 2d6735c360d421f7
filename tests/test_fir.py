"""kve_fast.ops.fir_triton (the Triton upfirdn2d) and kve_fast.ncsnpp.make_fast, in Triton's interpreter.

Not bit-exact by design (fast mode only): every comparison is against a bound derived from float32
rounding. For a dot product of n terms computed in float32 (any order, with or without FMA) the error is
at most gamma_n * sum |w_i x_i|, gamma_n = n u / (1 - n u), u = 2**-24. The kernel sums
n = ceil(KH/up) * ceil(KW/up) terms per output, diffusers' ``upfirdn2d_native`` (an ``F.conv2d`` over the
zero-stuffed, padded input) KH * KW, and both use diffusers' filter values exactly, so

    |kernel - exact| <= gamma_n S,    |kernel - upfirdn2d_native| <= (gamma_n + gamma_{KH KW}) S,

S = sum |w_i x_i| per output (computed in float64 by ``upfirdn2d_native`` itself on |x| and |kernel|).
(That assumes torch's convolution is a plain float32 dot product, no Winograd or FFT: true for these
1-channel 4x4 convolutions on the CPU, and asserted here.) A bfloat16 / float16 output is rounded once
more (relative 2**-8 / 2**-11). The worst element must use a fair share of its bound, so the bound is
not vacuous.

Whole models: no bound carries through GroupNorm, attention and dozens of convolutions, so the fast
model is held to flash-attention's rule (../shared/STYLE.md): at most twice as far from the float64 model
as diffusers' own float32 model is. Each FIR output moves by a few float32 roundings, as much as every
other op's own rounding, so the fast model's error is of the same order (measured: 0.8x to 1.3x over
seeds) and not a multiple of it; restore_fast must give diffusers' bits back exactly.
"""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
from conftest import assert_bitwise, needs_triton, reference_test_unet
from diffusers import UNet2DModel
from diffusers.models import downsampling, upsampling
from diffusers.models.downsampling import FirDownsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import FirUpsample2D, upfirdn2d_native

from kve_fast import _warn, ncsnpp

pytestmark = needs_triton

U32 = 2.0**-24
U64 = 2.0**-53
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the output dtype


def fir_ops():
    from kve_fast.ops import fir_triton

    return fir_triton


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


def fir_filter(up: bool, dtype=torch.float32) -> torch.Tensor:
    """diffusers' filter for the (1, 3, 3, 1) kernel at factor 2, built as diffusers builds it."""
    return ncsnpp._host_filter((1, 3, 3, 1), 2, 1, up).to(dtype)


# (up, down, pad, upsampling filter?) of each upfirdn2d call diffusers' FIR blocks make with (1, 3, 3, 1):
CASES = {
    "up": (2, 1, (2, 1), True),  # FirUpsample2D, upsample_2d (ResnetBlock2D up=True)
    "down": (1, 2, (1, 1), False),  # FirDownsample2D, downsample_2d (ResnetBlock2D down=True)
    "up_conv": (1, 1, (1, 1), True),  # FirUpsample2D(use_conv=True): after conv_transpose2d
    "down_conv": (1, 1, (2, 2), False),  # FirDownsample2D(use_conv=True): before conv2d
}


def assert_within(actual, expected, bound, what: str) -> float:
    """|actual - expected| <= bound element-wise (float64); on failure: how many exceed, where, and by how
    much. Returns the largest share of its bound an element uses."""
    err = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    over = err > bound
    if over.any():
        idx = over.nonzero()[:5].tolist()
        ratio = (err / bound.clamp_min(1e-300)).max().item()
        raise AssertionError(f"{what}: {int(over.sum())} of {err.numel()} elements over the bound; first at {idx}; "
                             f"max |diff| {err.max().item():g}, max |diff| / bound {ratio:g}")
    return (err / bound.clamp_min(1e-300)).max().item()


def exact_and_scale(x, kernel, up, down, pad):
    """The exact result (float64) and S = sum |w_i x_i| per output, both by diffusers' op in float64."""
    x64, k64 = x.double(), kernel.double()
    return upfirdn2d_native(x64, k64, up, down, pad), upfirdn2d_native(x64.abs(), k64.abs(), up, down, pad)


def layouts(x):
    return {"contiguous": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}


# --- (a) the kernel against upfirdn2d_native, float32 ------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_upfirdn2d_native_float32(case):
    fir = fir_ops()
    up, down, pad, is_up = CASES[case]
    kernel = fir_filter(is_up)
    x0 = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(1)) * 3
    n_ours = fir.terms(4, up) ** 2
    for layout, x in layouts(x0).items():
        what = f"{case} {layout}"
        got = fir.upfirdn2d(x, kernel, up, down, pad)
        ref = upfirdn2d_native(x, kernel, up, down, pad)
        exact, scale = exact_and_scale(x, kernel, up, down, pad)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                 torch.contiguous_format), f"{what}: output not in the input's memory format"
        # the kernel alone against the exact sum, then against diffusers' float32 op
        used = assert_within(got, exact, gamma(n_ours) * scale + gamma(16, U64) * scale, f"{what} vs exact")
        assert_within(got, ref, (gamma(n_ours) + gamma(16)) * scale + gamma(16, U64) * scale, f"{what} vs diffusers")
        # not vacuous: the kernel does round (nonzero error), its worst element uses a fair share of its
        # bound, and the bound is tiny next to the values (about 1e-7 of them, not a loose tolerance)
        assert (got.double() != exact).any(), f"{what}: no rounding error anywhere (test inputs too easy)"
        assert used > 0.05, f"{what}: worst error only {used:.3f} of the bound (bound too loose to mean much)"
        assert (gamma(n_ours) + gamma(16)) * scale.max() < 1e-5 * exact.abs().max()


@pytest.mark.parametrize("case", ["up", "down"])
def test_kernel_many_tiles(case, monkeypatch):
    """Outputs over several tiles in both directions (rows across planes or images, columns past 128),
    and the int64 indexing path (forced by lowering the int32 limit) giving the same bits."""
    fir = fir_ops()
    up, down, pad, is_up = CASES[case]
    kernel = fir_filter(is_up)
    gen = torch.Generator().manual_seed(5)
    for x in (torch.randn(2, 3, 12, 70, generator=gen),
              torch.randn(1, 136, 3, 4, generator=gen).contiguous(memory_format=torch.channels_last)):
        got = fir.upfirdn2d(x, kernel, up, down, pad)
        exact, scale = exact_and_scale(x, kernel, up, down, pad)
        assert_within(got, exact, (gamma(fir.terms(4, up) ** 2) + gamma(16, U64)) * scale, f"{case} {tuple(x.shape)}")
        with monkeypatch.context() as m:
            m.setattr(fir, "_INT32", 2**12)
            assert_bitwise(fir.upfirdn2d(x, kernel, up, down, pad), got, f"{case} {tuple(x.shape)} int64 indexing")


@pytest.mark.parametrize("up,down,pad", [(2, 3, (1, -1)), (3, 2, (4, 0)), (1, 1, (-1, 2))])
def test_kernel_general_arguments(up, down, pad):
    """A non-symmetric, non-square kernel (the flip), negative pads (crops), up and down together, a
    non-dense strided input: the semantics are upfirdn2d_native's, not only the FIR blocks' cases."""
    fir = fir_ops()
    gen = torch.Generator().manual_seed(2)
    kernel = torch.randn(3, 5, generator=gen)
    x = torch.randn(2, 3, 9, 13, generator=gen)[:, :, 1:, ::2]  # strides (351, 117, 13, 2)
    got = fir.upfirdn2d(x, kernel, up, down, pad)
    ref = upfirdn2d_native(x, kernel, up, down, pad)
    exact, scale = exact_and_scale(x, kernel, up, down, pad)
    assert got.shape == ref.shape
    n_ours = fir.terms(3, up) * fir.terms(5, up)
    bound = (gamma(n_ours) + gamma(15)) * scale + gamma(15, U64) * scale
    assert_within(got, ref, bound, f"up {up} down {down} pad {pad}")


def test_kernel_rejects_what_it_does_not_take():
    fir = fir_ops()
    x, k = torch.randn(1, 2, 4, 4), fir_filter(True)
    for args, kwargs in [((x.double(), k), {}), ((x[0], k), {}), ((x, k[0]), {}), ((x, k), {"up": 0}),
                         ((x, k), {"pad": (-4, -4)}), ((x, torch.ones(17, 1)), {}),
                         ((x.clone().requires_grad_(), k), {})]:  # no backward
        assert not fir.supports(*args, **kwargs)
        with pytest.raises(ValueError, match="upfirdn2d"):
            fir.upfirdn2d(*args, **kwargs)


# --- (b) bfloat16 / float16 inputs ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["up", "down"])
def test_kernel_low_precision(case, dtype):
    """Float32 accumulation, one rounding to ``dtype``: against diffusers' float32 op on the same
    (low-precision) input values, |out - ref| <= u_dtype |ref| + (1 + u_dtype)(gamma_n + gamma_16) S; and
    no further from the exact result than twice torch's own ``dtype`` op (flash-attention's rule)."""
    fir = fir_ops()
    up, down, pad, is_up = CASES[case]
    x0 = (torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    for layout, x in layouts(x0).items():
        what = f"{case} {dtype} {layout}"
        got = fir.upfirdn2d(x, fir_filter(is_up, dtype), up, down, pad)
        assert got.dtype == dtype
        ref32 = upfirdn2d_native(x.float(), fir_filter(is_up), up, down, pad)
        exact, scale = exact_and_scale(x, fir_filter(is_up), up, down, pad)
        u = UNIT[dtype]
        bound = u * ref32.double().abs() + (1 + u) * (gamma(fir.terms(4, up) ** 2) + gamma(16)) * scale
        used = assert_within(got, ref32, bound, what)
        assert (got.double() != ref32.double()).any() and used > 0.1, f"{what}: bound not exercised ({used:.3f})"
        torch_own = upfirdn2d_native(x, fir_filter(is_up, dtype), up, down, pad)
        ours_err = (got.double() - exact).abs().max().item()
        torch_err = (torch_own.double() - exact).abs().max().item()
        assert ours_err <= 2 * torch_err, f"{what}: max error {ours_err:g}, torch's own {dtype} op {torch_err:g}"


# --- (c) whole UNet forwards -------------------------------------------------------------------------

def tiny_ncsnpp(seed: int = 0) -> UNet2DModel:
    """NCSN++-style: fourier noise embedding, scale-shift time conditioning, FIR Skip blocks (32 channels
    throughout: some of their GroupNorms have 32 groups whatever the width)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32, 32),
        time_embedding_type="fourier", norm_eps=1e-6, resnet_time_scale_shift="scale_shift",
        mid_block_scale_factor=math.sqrt(2), flip_sin_to_cos=True,
        down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
        up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def unets():
    """(reference model, float64 copy, input, sigma, diffusers' float32 output, float64 output)."""
    ref = tiny_ncsnpp()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    s = torch.tensor(0.7)
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        out32 = ref(x, s).sample
        out64 = ref64(x.double(), s.double()).sample
    return types.SimpleNamespace(ref=ref, x=x, s=s, out32=out32, out64=out64)


def fir_sites(model) -> int:
    """FIR up/down samplers and FIR ResnetBlock2Ds (whose up/downsample is a lambda) in ``model``."""
    return sum(isinstance(m, (FirUpsample2D, FirDownsample2D))
               or (isinstance(m, ResnetBlock2D)
                   and isinstance(m.__dict__.get("upsample") or m.__dict__.get("downsample"), types.FunctionType))
               for m in model.modules())


@pytest.fixture
def calls(monkeypatch):
    """Counts of diffusers' ``upfirdn2d_native`` calls and of Triton ``upfirdn2d`` launches."""
    fir = fir_ops()
    counts = {"native": 0, "triton": 0}

    def counting(fn, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    for mod in (upsampling, downsampling):
        monkeypatch.setattr(mod, "upfirdn2d_native", counting(upfirdn2d_native, "native"))
    monkeypatch.setattr(fir, "upfirdn2d", counting(fir.upfirdn2d, "triton"))
    return counts


def run(model, x, s):
    with torch.no_grad():
        return model(x, s).sample


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unet_fast_forward_within_bound(unets, calls, layout):
    """Every FIR op of the forward runs on Triton; the fast model is at most twice as far from the
    float64 model as diffusers' own float32 model (each FIR output moves by a few float32 roundings, see
    the module docstring, against the float32 error of every other op: the same order); restore_fast
    gives back diffusers' bits."""
    fast, x, want = copy.deepcopy(unets.ref), unets.x, unets.out32
    if layout == "channels_last":  # diffusers' own channels_last forward (other convolution bits) as reference
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        want = run(copy.deepcopy(fast), x, unets.s)
        calls["native"] = 0
    sites = fir_sites(fast)
    assert sites == 9  # 2 down blocks: resnet_down + FirDownsample2D; 3 up blocks: FirUpsample2D, 2 of them resnet_up
    assert ncsnpp.make_fast(fast) == sites
    got = run(fast, x, unets.s)
    # (the first up block's upsampler gets no skip sample; the FIR ResnetBlock2Ds resample twice)
    assert calls["native"] == 0 and calls["triton"] == 12
    fast_err = (got.double() - unets.out64).abs().max().item()
    ref_err = (want.double() - unets.out64).abs().max().item()
    assert fast_err <= 2 * ref_err, f"{layout}: fast model's max error {fast_err:g}, diffusers' float32 {ref_err:g}"
    assert not torch.equal(got, want), "fast mode gave diffusers' exact bits: did the kernel run?"
    assert ncsnpp.restore_fast(fast) == sites
    assert_bitwise(run(fast, x, unets.s), want, f"{layout}: after restore_fast")
    assert calls["triton"] == 12 and calls["native"] == 12


@pytest.mark.parametrize("use_conv", [False, True])
def test_fir_modules_fast(calls, use_conv):
    """FirUpsample2D / FirDownsample2D with and without their convolution (the use_conv paths run the FIR
    after conv_transpose2d / before conv2d) and FIR ResnetBlock2Ds, each module through its own forward."""
    torch.manual_seed(0)
    ref = torch.nn.ModuleDict({
        "up": FirUpsample2D(8, out_channels=8, use_conv=use_conv),
        "down": FirDownsample2D(8, out_channels=8, use_conv=use_conv),
        "res_up": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, up=True, kernel="fir"),
        "res_down": ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=2, down=True, kernel="fir"),
    }).eval()
    fast, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    assert ncsnpp.make_fast(fast) == 4
    gen = torch.Generator().manual_seed(1)
    x, temb = torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 16, generator=gen)
    with torch.no_grad():
        for key in ref:
            args = (x,) if key in ("up", "down") else (x, temb)
            before = dict(calls)
            got = fast[key](*args)
            assert calls["native"] == before["native"] and calls["triton"] > before["triton"], key
            want = ref[key](*args)
            exact = ref64[key](*(a.double() for a in args))
            fast_err = (got.double() - exact).abs().max().item()
            ref_err = (want.double() - exact).abs().max().item()
            assert fast_err <= 2 * ref_err, f"{key} use_conv={use_conv}: {fast_err:g} vs diffusers' {ref_err:g}"


# --- (d) per instance, idempotent, composes with make_capturable -------------------------------------

def pristine(model) -> bool:
    """No kve_fast patch left: no records, no instance helpers, the FIR resnets' original lambdas."""
    return (not any(ncsnpp._RECORD in m.__dict__ for m in model.modules())
            and not any(h in m.__dict__ for m in model.modules() for h in ncsnpp._HELPERS.values())
            and fir_sites(model) == 9)


def test_make_fast_is_per_instance_and_idempotent(unets, calls):
    model, other = copy.deepcopy(unets.ref), copy.deepcopy(unets.ref)
    lambdas = {name: dict(m.__dict__) for name, m in model.named_modules() if isinstance(m, ResnetBlock2D)}
    assert ncsnpp.make_fast(model) == 9
    assert ncsnpp.make_fast(model) == 0  # idempotent
    assert ncsnpp.is_fast(model) and not ncsnpp.is_fast(other)
    assert pristine(other) and not ncsnpp.needs_patch(model)  # a fast model is capturable too
    assert_bitwise(run(other, unets.x, unets.s), unets.out32, "the other instance")
    assert calls == {"native": 12, "triton": 0}
    assert ncsnpp.restore_fast(model) == 9 and ncsnpp.restore_fast(model) == 0
    assert pristine(model) and ncsnpp.needs_patch(model)
    for name, m in model.named_modules():
        if isinstance(m, ResnetBlock2D):
            assert all(m.__dict__.get(a) is lambdas[name].get(a) for a in ("upsample", "downsample")), name
    assert not ncsnpp.is_fast(model)


def test_make_fast_composes_with_make_capturable(unets):
    # capturable first: make_fast switches the same patch; restore_fast leaves it capturable, diffusers' bits
    model = copy.deepcopy(unets.ref)
    assert ncsnpp.make_capturable(model) == 9
    assert ncsnpp.make_fast(model) == 9 and ncsnpp.is_fast(model)
    assert not torch.equal(run(model, unets.x, unets.s), unets.out32)
    assert ncsnpp.restore_fast(model) == 9
    assert not ncsnpp.is_fast(model) and not ncsnpp.needs_patch(model)
    assert_bitwise(run(model, unets.x, unets.s), unets.out32, "capturable after restore_fast")
    assert ncsnpp.restore(model) == 9 and pristine(model)
    # fast first: make_capturable has nothing to patch; restore (the graph runner's undo) keeps fast mode
    model = copy.deepcopy(unets.ref)
    assert ncsnpp.make_fast(model) == 9
    assert ncsnpp.make_capturable(model) == 0 and not ncsnpp.needs_patch(model)
    assert ncsnpp.restore(model) == 9 and ncsnpp.is_fast(model) and not ncsnpp.needs_patch(model)
    assert ncsnpp.restore(model) == 0
    assert ncsnpp.restore_fast(model) == 9 and pristine(model)


def test_make_fast_without_fir_blocks_is_a_no_op():
    model = reference_test_unet(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ncsnpp.make_fast(model) == 0
    assert not ncsnpp.is_fast(model) and ncsnpp.restore_fast(model) == 0
    assert not any(ncsnpp._RECORD in m.__dict__ for m in model.modules())


def test_make_fast_not_applied_where_triton_cannot_run(unets, monkeypatch):
    """No CUDA and no interpreter: nothing patched, diffusers' op runs, one warning in all."""
    monkeypatch.setattr(fir_ops(), "can_run", lambda: False)
    _warn.forget()
    model = copy.deepcopy(unets.ref)
    with pytest.warns(RuntimeWarning, match="make_fast: not applied") as record:
        assert ncsnpp.make_fast(model) == 0
        assert ncsnpp.make_fast(copy.deepcopy(unets.ref)) == 0
    assert len([w for w in record if "make_fast" in str(w.message)]) == 1
    assert pristine(model) and not ncsnpp.is_fast(model)
    assert_bitwise(run(model, unets.x, unets.s), unets.out32, "unpatched")


def test_fast_mode_float64_runs_diffusers_op(unets, calls):
    """A dtype the kernel does not take (float64) runs diffusers' op, with its bits."""
    model = copy.deepcopy(unets.ref).double()
    ncsnpp.make_fast(model)
    assert_bitwise(run(model, unets.x.double(), unets.s.double()), unets.out64, "float64 in fast mode")
    assert calls["triton"] == 0 and calls["native"] == 12
