"""The CUDA C++ extension (csrc/, backend="cuda"): it compiles, it builds optionally, and its arithmetic is exact.

Without a GPU (the development and CI machines), what can be checked is checked:
- every ``.cu`` file compiles with nvcc for sm_80 and sm_90 (compile only, the build's flags), and its
  PTX shows the flags at work (no contracted multiply-add in the Euler kernel, every float op rounded
  to nearest); every ``.cpp`` binding compiles with the host compiler against the installed torch's
  headers (the CPU wheel's: no c10/cuda header may be included). These skip only where nvcc or a C++
  compiler is missing;
- setup.py's flags, and that the install skips the extension with a warning where it cannot build it;
- ``import kve_fast`` without the extension, and ``backend="cuda"`` refused clearly without CUDA;
- the operators themselves, built for the CPU (the same element code as the kernels, ``step_math.h``,
  on the host): bit for bit against torch's ops (true division, as torch on the CPU), the CUDA
  arithmetic (multiply by the host's reciprocal) forced, the image rounding, the Philox noise against
  Triton's stream, the whole pipeline against diffusers, and torch's operator checks (opcheck);
- the argument checks (csrc/ops.h), all before a data pointer is taken: sizes checked without overflow,
  outputs overlapping inputs or one another refused (the exact aliasing the kernels allow gives the same
  bits), tensors for a stage the call does not run refused; nothing is written by a refused call.
With a GPU, the same operator tests (the argument checks included) also run on CUDA tensors, through the
CUDA implementation, against torch's CUDA ops (``bench/gpu_check.py --backends cuda`` checks the pipelines,
bandwidth and cold start there).
"""

from __future__ import annotations

import copy
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension
from conftest import (
    CAN_RUN_TRITON, SMALL_SIGMAS, SMALL_SIGMAS_NO_CHURN, assert_bitwise, check_image_parity, kve_pipe,
    make_generator, run_reference,
)

import kve_fast
from kve_fast.ops import step_cuda, step_torch
from kve_fast.sampler import plan_steps
from kve_fast.ops.fused import NextChurn
from kve_fast.plan import churn_coefficient

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SETUP = runpy.run_path(str(ROOT / "setup.py"))  # the build settings (setup() runs only as __main__)
NVCC = SETUP["find_nvcc"]()
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


# -- compile checks -------------------------------------------------------------------------------------


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _nvcc(*args):
    return [NVCC, "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}", *args]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_compiles_for_sm80_and_sm90(source, tmp_path):
    flags = SETUP["nvcc_flags"]()
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= set(flags)
    _run(_nvcc("-c", *flags, str(CSRC / source), "-o", str(tmp_path / "kernels.o")), tmp_path)
    assert (tmp_path / "kernels.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_kernels_ptx_rounds_every_float_op(tmp_path):
    """With the build's flags every float multiply/add is rounded on its own (``.rn``) and the Euler kernel,
    which draws no noise, contains no fused multiply-add (the noise's logf/sincosf use FMAs internally)."""
    ptx = tmp_path / "k.ptx"
    _run(_nvcc("-ptx", *SETUP["NVCC_FLAGS"], "-arch=compute_90", str(CSRC / "step_kernels.cu"), "-o", str(ptx)), tmp_path)
    kernels, name = {}, None
    for line in ptx.read_text().splitlines():
        if ".entry" in line:
            m = re.search(r"(churn|euler|heun)_kernelILb([01])", line)
            name = f"{m.group(1)}<{'vec' if m.group(2) == '1' else 'scalar'}>"
            kernels[name] = []
        elif name is not None:
            kernels[name].append(line.strip())
    assert sum(k.startswith("euler") for k in kernels) == 2 and len(kernels) == 6, list(kernels)
    for k, body in kernels.items():
        ops = [ln.split()[0] for ln in body if ln and ln.split()[0].split(".")[0] in ("mul", "add", "sub", "div")
               and ln.split()[0].endswith(".f32")]
        loose = [op for op in ops if ".rn" not in op and ".approx" not in op]
        assert not loose, f"{k}: float ops without explicit rounding: {sorted(set(loose))}"
        assert not [op for op in ops if op.startswith("div") and ".rn" not in op], f"{k}: approximate division"
        if k.startswith("euler"):
            assert not [ln for ln in body if ln.startswith("fma")], f"{k}: a contracted multiply-add"
            assert "div.rn.f32" in " ".join(ops), f"{k}: the denoiser's IEEE division is missing"


def _cxx_compile(source: Path, out: Path):
    includes = torch.utils.cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(CSRC)]
    cmd = [CXX, "-std=c++20", "-fPIC", "-Wall", "-Wextra", *SETUP["CXX_FLAGS"],
           *[f"-I{p}" for p in includes], "-c", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600), cmd


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_cpp_bindings_compile_against_the_installed_torch(tmp_path):
    sources = sorted(CSRC.glob("*.cpp"))
    assert {p.name for p in sources} >= {"ops.cpp", "ops_cuda.cpp", "step_cpu.cpp"}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda p: _cxx_compile(p, tmp_path / (p.stem + ".o")), sources))
    for source, (proc, cmd) in zip(sources, results):
        assert proc.returncode == 0, f"{source.name}: {' '.join(cmd)}\n{proc.stderr[-6000:]}"
        ours = [ln for ln in proc.stderr.splitlines() if "warning" in ln and str(CSRC) in ln]
        assert not ours, f"{source.name}: warnings in csrc/:\n" + "\n".join(ours)
    for source in sorted(CSRC.iterdir()):  # the split: no torch header that needs a CUDA torch
        bad = re.findall(r"#include\s*[<\"]((?:c10|ATen)/(?:cuda|hip)/[^>\"]*)", source.read_text())
        assert not bad, f"{source.name} includes {bad}, which the CPU torch wheel cannot compile"


# -- the build ------------------------------------------------------------------------------------------


def test_setup_builds_for_both_archs_without_fma_contraction():
    assert "--fmad=false" in SETUP["NVCC_FLAGS"] and "-ffp-contract=off" in SETUP["CXX_FLAGS"]
    flags = SETUP["nvcc_flags"]()
    for arch in ("80", "90"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for later GPUs
    on_disk = {f"csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert set(SETUP["SOURCES"]) == on_disk, "every source is built"
    assert set(SETUP["CPU_SOURCES"]) < set(SETUP["SOURCES"])


def _setup_module():
    return runpy.run_path(str(ROOT / "setup.py"))


def test_setup_skips_the_extension_with_a_warning(monkeypatch):
    s = _setup_module()
    monkeypatch.setenv("KVE_FAST_SKIP_CUDA_BUILD", "1")
    with pytest.warns(UserWarning, match="KVE_FAST_SKIP_CUDA_BUILD=1"):
        assert s["extension_kwargs"]() == {}
    monkeypatch.delenv("KVE_FAST_SKIP_CUDA_BUILD")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.warns(UserWarning, match="no CUDA"):
        assert s["extension_kwargs"]() == {}


def test_setup_makes_the_extension_with_cuda_torch_and_nvcc(monkeypatch, tmp_path):
    """A build machine needs a CUDA torch and nvcc, no GPU: the extension is then kve_fast._C with the flags."""
    import torch.utils.cpp_extension as cpp

    s = _setup_module()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")  # found, never run: nothing is compiled here
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("KVE_FAST_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(tmp_path))
    assert s["find_nvcc"]() == str(tmp_path / "bin" / "nvcc")
    kwargs = s["extension_kwargs"]()
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "kve_fast._C" and sorted(ext.sources) == sorted(s["SOURCES"])
    assert "--fmad=false" in ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in ext.extra_compile_args["nvcc"]
    assert "build_ext" in kwargs["cmdclass"]


def test_setup_runs_without_torch(tmp_path):
    """pip's isolated build environment has no torch: setup.py must still produce the pure-Python package."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "KVE_FAST_SKIP_CUDA_BUILD"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kve_fast" in proc.stdout
    assert "not building the CUDA extension" in proc.stderr and "--no-build-isolation" in proc.stderr


def test_import_without_the_extension_and_cuda_backend_refused_on_cpu():
    code = """
import importlib.util, torch, kve_fast
from kve_fast.ops import step_cuda
from kve_fast.backends import check_backend
assert not step_cuda.registered()
try:
    check_backend("cuda", torch.device("cpu"))
except ValueError as exc:
    print("REFUSED", exc)
if not torch.version.cuda:
    try:
        step_cuda.load_ops()
    except step_cuda.ExtensionUnavailable as exc:
        print("UNAVAILABLE", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED `backend`='cuda' needs CUDA tensors" in proc.stdout
    if not torch.version.cuda:
        assert "has no CUDA" in proc.stdout and "--no-build-isolation" in proc.stdout


@pytest.mark.skipif(CUDA, reason="the CPU's refusal")
def test_cuda_backend_on_cpu_is_a_clear_error(models, tmp_path, capsys):
    pipe = kve_pipe(models("gaussian"))
    with pytest.raises(ValueError, match="`backend`='cuda' needs CUDA tensors"):
        pipe(1, 2, torch.Generator().manual_seed(0), backend="cuda")
    with pytest.raises(ValueError, match="`backend`='cuda'"):
        kve_fast.k_diffusion.sample_heun(lambda x, s: x, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 0.0]),
                                         backend="cuda", disable=True)
    from kve_fast.cli import main

    assert main(["sample", "--backend", "cuda", "--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "CUDA" in err and "Traceback" not in err


# -- the operators --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ops(tmp_path_factory):
    """The operators: the built extension, or (no GPU) the CPU operators built just in time here."""
    if CUDA:
        try:
            return step_cuda.load_ops()
        except step_cuda.ExtensionUnavailable as exc:
            pytest.skip(f"the CUDA extension is unavailable: {exc}")
    if not step_cuda.registered():
        why = step_cuda.jit_problem(cuda=False)
        if why:
            pytest.skip(f"cannot build the CPU operators: {why}")
        step_cuda.jit_build(cuda=False, build_directory=str(tmp_path_factory.mktemp("kve_fast_cpu")))
    return torch.ops.kve_fast


def _steps(n=8, **config):
    return plan_steps(kve_fast.KarrasVeScheduler(**config), n)


def _rand(shape, seed, scale=1.0, device="cpu"):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


# Sizes not divisible by 4 (a partial last group), a batch of 1, and a view at an odd offset (unaligned).
SHAPES = [(1, 3, 5, 7), (3, 3, 16, 16), (2, 1, 33, 31)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", [0, 3, 6])  # gamma = 0 (sigma > s_max), gamma > 0, gamma = 0 (sigma < s_min)
def test_churn_matches_torch(ops, device, shape, which):
    step = _steps()[which]
    x, eps = _rand(shape, 1, 3.0, device), _rand(shape, 2, 1.0, device)
    hat, xin = step_cuda.churn(x, eps, 1.007, step.sigma, step.sigma_hat)
    ref = step_torch.churn(x, 1.007 * eps, step.sigma, step.sigma_hat)
    assert_bitwise(hat, ref, "sample_hat")
    assert_bitwise(xin, step_torch.model_input(ref), "model input")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", [0, 3, 7])  # 7 is the last step: sigma_prev = 0
def test_euler_matches_torch(ops, device, shape, which):
    step = _steps()[which]
    raw, hat = _rand(shape, 3, 0.2, device), _rand(shape, 4, 2.0, device)
    prev, d, xin, pred, img = step_cuda.euler(raw, hat, step.sigma_hat, step.sigma_next, want_pred=True,
                                              image="float")
    r_prev, r_d, r_pred = step_torch.euler(step_torch.scale_model_output(raw, step.sigma_hat), step.sigma_hat,
                                           step.sigma_next, hat)
    assert_bitwise(prev, r_prev, "sample_prev")
    assert_bitwise(d, r_d, "derivative")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    assert_bitwise(xin, step_torch.model_input(r_prev), "model input")
    assert_bitwise(img, step_torch.to_image(r_prev), "float image")
    img8 = step_cuda.euler(raw, hat, step.sigma_hat, step.sigma_next, image="uint8")[4]
    assert_bitwise(img8, step_torch.to_image(r_prev, "uint8"), "uint8 image")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", [False, True])
def test_heun_matches_torch(ops, device, shape, fused):
    steps = _steps()
    step, nxt = steps[3], steps[4]
    raw, hat = _rand(shape, 5, 0.2, device), _rand(shape, 6, 2.0, device)
    prev, d, eps = _rand(shape, 7, 2.0, device), _rand(shape, 8, 1.0, device), _rand(shape, 9, 1.0, device)
    churn = (eps, 1.007, nxt.sigma, nxt.sigma_hat, None) if fused else None
    x, pred, hat_n, xin = step_cuda.heun(raw, hat, prev, d, step.sigma_hat, step.sigma_next, want_pred=True,
                                         next_churn=churn)
    r_x, r_pred = step_torch.heun(step_torch.scale_model_output(raw, step.sigma_next), step.sigma_hat,
                                  step.sigma_next, hat, prev, d)
    assert_bitwise(x, r_x, "corrected sample")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    if fused:
        r_hat = step_torch.churn(r_x, 1.007 * eps, nxt.sigma, nxt.sigma_hat)
        assert_bitwise(hat_n, r_hat, "next sample_hat")
        assert_bitwise(xin, step_torch.model_input(r_hat), "next model input")


@pytest.mark.parametrize("device", DEVICES)
def test_image_rounding_covers_ties_clamping_and_nan(ops, device):
    k = torch.arange(0, 256, dtype=torch.float32)
    y = (k + 0.5) / 255  # image values at rounding ties
    x = torch.cat([(y - 0.5) * 2, torch.tensor([-5.0, 7.0, -1.0, 1.0, 0.0, -0.0, float("nan")])])
    x = x.reshape(1, 1, 1, -1).to(device)
    last, zero = _steps()[-1], torch.zeros_like(x)
    # raw = 0: pred = hat, d = 0, so the image is of x itself
    img8 = step_cuda.euler(zero, x, last.sigma_hat, last.sigma_hat, want_derivative=False, image="uint8")[4]
    img = step_cuda.euler(zero, x, last.sigma_hat, last.sigma_hat, want_derivative=False, image="float")[4]
    assert_bitwise(img, step_torch.to_image(x))
    assert torch.isnan(img[..., -1]).all()
    assert_bitwise(img8[..., :-1], step_torch.to_image(x, "uint8")[..., :-1])
    as_pil = (step_torch.to_image(x)[..., :-1].cpu().numpy() * 255).round().astype(np.uint8)  # numpy_to_pil's
    assert np.array_equal(img8[0, 0, :-1, 0].cpu().numpy(), as_pil[0, 0, 0])


def _host_reciprocal(sigma) -> torch.Tensor:
    """What torch on CUDA multiplies by for ``x / sigma`` with ``sigma`` a 0-d float32 CPU tensor."""
    return torch.tensor(1.0, dtype=torch.float32) / sigma


def _differs(a, b) -> float:
    return float((a != b).float().mean())


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 33, 31)])
@pytest.mark.parametrize("which", [0, 3, 7])
def test_cuda_arithmetic_forced_on_the_cpu(ops, shape, which):
    """The CUDA branch (multiply by the host's float32 reciprocal, ``true_div=False``) through the CPU operators,
    against torch's formula for it, on inputs where it differs from true division (asserted)."""
    steps = _steps()
    step = steps[which]
    raw, hat = _rand(shape, 3, 1.0 / float(step.sigma_hat) ** 2), _rand(shape, 4, 2.0)
    prev, d, xin, pred, _ = step_cuda.euler(raw, hat, step.sigma_hat, step.sigma_next, want_pred=True, true_div=False)
    r_pred = hat + step.sigma_hat * step_torch.scale_model_output(raw, step.sigma_hat)
    r_d = (hat - r_pred) * _host_reciprocal(step.sigma_hat)
    r_prev = hat + (step.sigma_next - step.sigma_hat) * r_d
    assert _differs(r_d, (hat - r_pred) / step.sigma_hat) > 0.01, "inputs must tell the two divisions apart"
    assert_bitwise(d, r_d, "derivative")
    assert_bitwise(prev, r_prev, "sample_prev")
    assert_bitwise(pred, r_pred, "pred_original_sample")
    if which == 7:
        return
    step, nxt = steps[3], steps[4]
    raw, prev, d, eps = _rand(shape, 5, 0.2), _rand(shape, 7, 2.0), _rand(shape, 8), _rand(shape, 9)
    x, pred, hat_n, _ = step_cuda.heun(raw, hat, prev, d, step.sigma_hat, step.sigma_next, want_pred=True,
                                       next_churn=(eps, 1.007, nxt.sigma, nxt.sigma_hat, None), true_div=False)
    r_pred = prev + step.sigma_next * step_torch.scale_model_output(raw, step.sigma_next)
    r_dc = (prev - r_pred) * _host_reciprocal(step.sigma_next)
    r_x = hat + (step.sigma_next - step.sigma_hat) * (0.5 * d + 0.5 * r_dc)
    assert _differs(r_dc, (prev - r_pred) / step.sigma_next) > 0.01
    assert_bitwise(x, r_x, "corrected sample")
    assert_bitwise(hat_n, step_torch.churn(r_x, 1.007 * eps, nxt.sigma, nxt.sigma_hat), "next sample_hat")


@pytest.mark.parametrize("device", DEVICES)
def test_denoiser_convention_matches_k_diffusion_arithmetic(ops, device):
    """k-diffusion's ops: d = (x - D) / sigma_hat with true division by a device tensor, x + d * dt,
    (d + d') / 2, and the churn skipped where gamma = 0."""
    shape = (2, 3, 5, 5)
    x, raw, raw2, eps = (_rand(shape, s, 1.0, device) for s in (1, 2, 3, 4))
    sigma_hat, sigma_next = torch.tensor(1.7, device=device), torch.tensor(0.9, device=device)
    dt = sigma_next - sigma_hat
    prev, d = torch.empty_like(x), torch.empty_like(x)
    step_cuda._launch_euler(raw, x, (0.0, float(sigma_hat), 0.0, float(dt)), x_next=prev, d=d, denoiser=True,
                            true_div=True)
    r_d = (x - raw) / sigma_hat
    assert_bitwise(d, r_d, "derivative")
    assert_bitwise(prev, x + r_d * dt, "x_prev")
    c = churn_coefficient(torch.tensor(0.5), torch.tensor(0.6))
    for apply in (True, False):
        out, hat_next = torch.empty_like(x), torch.empty_like(x)
        step_cuda._launch_heun(raw2, x, prev, d, (0.0, float(sigma_next), 0.0, float(dt)), x=out,
                               then=NextChurn(eps, None, (c, 1.007) if apply else None, hat_next, None, apply),
                               denoiser=True, true_div=True)
        r_x = x + (d + (prev - raw2) / sigma_next) / 2 * dt
        assert_bitwise(out, r_x, "corrected sample")
        r_hat = r_x + (eps * 1.007) * c if apply else r_x
        assert_bitwise(hat_next, r_hat, "next x_hat")


@pytest.mark.parametrize("device", DEVICES)
def test_scalars_from_device_memory_are_the_same_bits(ops, device):
    shape = (2, 3, 8, 8)
    steps = _steps()
    step, nxt = steps[3], steps[4]
    x, raw, prev, d, eps = (_rand(shape, s, 1.0, device) for s in range(5))
    mem = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
    new = lambda n: tuple(torch.empty_like(x) for _ in range(n))  # noqa: E731
    a, b = new(2), new(2)
    step_cuda._launch_churn(x, eps, None, (nxt.noise_coef, 1.007), hat=a[0], model_input=a[1])
    step_cuda._launch_churn(x, eps, None, mem([nxt.noise_coef, 1.007]), hat=b[0], model_input=b[1])
    for u, v in zip(a, b):
        assert_bitwise(u, v)
    a, b = new(4), new(4)
    for level, out in ((step.at_hat, a), (mem(step.at_hat), b)):
        step_cuda._launch_euler(raw, x, level, x_next=out[0], d=out[1], model_input=out[2], denoised=out[3],
                                denoiser=False, true_div=True)
    for u, v in zip(a, b):
        assert_bitwise(u, v)
    a, b = new(4), new(4)
    for level, coef, out in ((step.at_next, (nxt.noise_coef, 1.007), a),
                             (mem(step.at_next), mem([nxt.noise_coef, 1.007]), b)):
        step_cuda._launch_heun(raw, x, prev, d, level, x=out[0], denoised=out[1],
                               then=NextChurn(eps, None, coef, out[2], out[3]), denoiser=False, true_div=True)
    for u, v in zip(a, b):
        assert_bitwise(u, v)
    with pytest.raises(ValueError, match="both"):
        step_cuda._launch_heun(raw, x, prev, d, mem(step.at_next), x=a[0],
                               then=NextChurn(eps, None, (nxt.noise_coef, 1.007), a[2], a[3]), denoiser=False,
                               true_div=True)


# -- argument checks: every one before any data pointer is taken or a kernel launched (csrc/ops.h) ----------

SHAPE = (2, 3, 4, 4)  # 96 elements


def _args(op: str, device: str, **kw) -> dict:
    """A valid call of ``op`` as keywords (euler and heun without optional outputs, heun without the fused
    churn), with ``kw`` replacing arguments."""
    t = lambda seed: _rand(SHAPE, seed, 1.0, device)  # noqa: E731
    out = lambda: torch.empty(SHAPE, device=device)  # noqa: E731
    stage = dict(half_sigma=0.5, sigma=1.0, inv_sigma=1.0, dt=-0.5, scalars=None, denoiser=False, true_div=True)
    args = {
        "churn": lambda: dict(x=t(0), eps=t(1), keys=None, per_sample=0, s_noise=1.007, c=0.5, scalars=None,
                              hat=out(), xin=out()),
        "euler": lambda: dict(raw=t(0), hat=t(1), **stage, prev=out(), d=None, xin=None, pred=None, image=None),
        "heun": lambda: dict(raw=t(0), hat=t(1), prev=t(2), d=t(3), **stage, x=out(), pred=None, churn=False,
                             apply=False, eps=None, keys=None, per_sample=0, s_noise=1.007, c=0.5,
                             churn_scalars=None, hat_next=None, xin=None),
    }[op]()
    args.update(kw)
    return args


def _refused(ops, op: str, args: dict, match: str, exc=RuntimeError) -> None:
    """``op`` refuses ``args`` with ``match``, having written nothing (every tensor argument keeps its bits)."""
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=match):
        getattr(ops, op)(**args)
    for k, v in before.items():
        assert_bitwise(args[k], v, f"`{k}` after the refused call")


@pytest.mark.parametrize("device", DEVICES)
def test_operators_check_their_arguments(ops, device):
    """On a GPU these run through the CUDA implementation (ops_cuda.cpp), which checks with the same code."""
    x = torch.zeros(SHAPE, device=device)
    _refused(ops, "churn", _args("churn", device, eps=torch.zeros(2, 3, 4, device=device)),
             "kve_fast::churn: `eps` has shape")
    _refused(ops, "churn", _args("churn", device, hat=torch.empty_like(x, dtype=torch.float64)),
             "`hat` must be float32")
    _refused(ops, "churn", _args("churn", device, eps=None, keys=torch.tensor([1, 2, 3], device=device),
                                 per_sample=30), "3 keys of 30 elements each do not cover the 96 elements")
    _refused(ops, "churn", _args("churn", device, eps=None), "give `eps`")
    _refused(ops, "euler", _args("euler", device, prev=torch.empty_like(x).transpose(2, 3)), "`prev` has strides")
    _refused(ops, "euler", _args("euler", device, image=torch.empty(SHAPE, dtype=torch.uint8, device=device)),
             "uint8 `image` must be contiguous BHWC")
    _refused(ops, "heun", _args("heun", device, churn=True), "needs `hat_next`")
    _refused(ops, "heun", _args("heun", device, scalars=torch.zeros(3, device=device)),
             "`scalars` must be a contiguous tensor of 4 values")
    if device == "cuda":  # the dispatcher picks the CUDA implementation: it checks each tensor's device
        _refused(ops, "churn", _args("churn", device, eps=torch.zeros(SHAPE)), "`eps` is on cpu, expected cuda")
        _refused(ops, "euler", _args("euler", device, hat=torch.zeros(SHAPE)),
                 "the CUDA implementation got `hat` on cpu")
        _refused(ops, "heun", _args("heun", device, scalars=torch.zeros(4)), "`scalars` is on cpu")
        _refused(ops, "churn", _args("churn", device, eps=None, keys=torch.tensor([7])), "`keys` is on cpu")
    with pytest.raises(TypeError, match="sample"):
        step_cuda.churn(x.double(), x, 1.0, torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="seed"):
        step_cuda.churn(x, None, 1.0, torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["churn", "heun"])
def test_keys_count_check_cannot_overflow(ops, device, op):
    """4 keys of 2**62 + 24 elements: 4 * (2**62 + 24) wraps to 96 in int64, the tensor's size (accepted before)."""
    keys = torch.tensor([1, 2, 3, 4], device=device)
    kw = dict(eps=None, keys=keys, per_sample=2**62 + 24)
    if op == "heun":
        kw.update(churn=True, apply=True, hat_next=torch.empty(SHAPE, device=device))
    _refused(ops, op, _args(op, device, **kw), "4 keys of 4611686018427387928 elements each do not cover the 96")


def _overlap_cases(device):
    """(name, op, arguments, match): outputs that overlap inputs or one another."""
    buf = lambda n=200: _rand((n,), 5, 1.0, device)  # noqa: E731
    view = lambda b, start: b[start : start + 96].view(SHAPE)  # noqa: E731
    a, b, c, d, e, f = buf(), buf(), buf(), buf(), buf(), buf()
    out = lambda: torch.empty(SHAPE, device=device)  # noqa: E731
    return [
        # the case: x_prev one element past x_hat (wrong values on the CPU, a data race on a GPU)
        ("euler prev partly on hat", "euler", _args("euler", device, hat=view(a, 0), prev=view(a, 1)),
         "output `prev` partially overlaps input `hat`"),
        ("euler pred partly on raw", "euler", _args("euler", device, raw=view(b, 4), pred=view(b, 0)),
         "output `pred` partially overlaps input `raw`"),
        ("churn hat partly on x", "churn", _args("churn", device, x=view(c, 0), hat=view(c, 8)),
         "output `hat` partially overlaps input `x`"),
        ("heun hat_next partly on prev", "heun",
         _args("heun", device, prev=view(d, 0), churn=True, apply=True, eps=out(), hat_next=view(d, 3), xin=out()),
         "output `hat_next` partially overlaps input `prev`"),
        ("euler d is prev", "euler", _args("euler", device, prev=view(e, 0), d=view(e, 0)),
         "outputs `prev` and `d` are the same memory"),
        ("euler xin partly on prev", "euler", _args("euler", device, prev=view(e, 0), xin=view(e, 50)),
         "outputs `prev` and `xin` overlap in memory"),
        # heun writes x, then reads eps at the same element: even the same view would read x, not the noise
        ("heun x is eps", "heun", _args("heun", device, x=view(f, 0), churn=True, apply=True, eps=view(f, 0),
                                        hat_next=out(), xin=out()),
         "output `x` overlaps `eps`"),
        # read by every thread: scalars in an output, keys in an output
        ("euler scalars in prev", "euler", _args("euler", device, prev=view(a, 100), scalars=a[100:104]),
         "output `prev` overlaps `scalars`"),
        ("churn keys in hat", "churn",
         _args("churn", device, eps=None, keys=view(b, 100).reshape(-1).view(torch.int64)[:1], hat=view(b, 100)),
         "output `hat` overlaps `keys`"),
        # the uint8 image in the bytes of x_hat
        ("euler uint8 image on hat", "euler",
         _args("euler", device, hat=view(c, 100), image=view(c, 100).reshape(-1).view(torch.uint8)[:96].view(2, 4, 4, 3)),
         "output `image` partially overlaps input `hat`"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_overlapping_inputs_or_each_other_are_refused(ops, device):
    for name, op, args, match in _overlap_cases(device):
        try:
            _refused(ops, op, args, match)
        except BaseException as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("device", DEVICES)
def test_exact_aliasing_the_kernels_allow_gives_the_same_bits(ops, device):
    """An output may be an input that its kernel reads at each element first (csrc/ops.h): heun's hat_next = hat
    is how FusedStep reuses its buffers, euler's prev = hat is k-diffusion's Euler where gamma = 0."""
    steps = _steps()
    step, nxt = steps[3], steps[4]
    raw, hat, prev, d, eps = (_rand(SHAPE, s, 1.0, device) for s in range(5))
    ref = step_cuda.heun(raw, hat, prev, d, step.sigma_hat, step.sigma_next, want_pred=True,
                         next_churn=(eps, 1.007, nxt.sigma, nxt.sigma_hat, None))
    hat_in_place = hat.clone()
    x, pred, xin = torch.empty_like(hat), torch.empty_like(hat), torch.empty_like(hat)
    step_cuda._launch_heun(raw, hat_in_place, prev, d, step.at_next, x=x, denoised=pred,
                           then=NextChurn(eps, None, (nxt.noise_coef, 1.007), hat_in_place, xin), denoiser=False,
                           true_div=True)
    for got, want, what in zip((x, pred, hat_in_place, xin), ref, ("x", "pred", "hat_next = hat", "xin")):
        assert_bitwise(got, want, what)
    new = lambda: torch.empty_like(hat)  # noqa: E731
    ref = (new(), new(), new(), new())
    step_cuda._launch_euler(raw, hat, step.at_hat, x_next=ref[0], d=ref[1], model_input=ref[2], denoised=ref[3],
                            denoiser=False, true_div=True)
    h, r = hat.clone(), raw.clone()
    got = (h, r, new(), new())
    step_cuda._launch_euler(r, h, step.at_hat, x_next=h, d=r, model_input=got[2], denoised=got[3], denoiser=False,
                            true_div=True)
    for g, w, what in zip(got, ref, ("prev = hat", "d = raw", "xin", "pred")):
        assert_bitwise(g, w, what)
    ref = (new(), new())
    step_cuda._launch_churn(hat, eps, None, (nxt.noise_coef, 1.007), hat=ref[0], model_input=ref[1])
    h, e = hat.clone(), eps.clone()
    step_cuda._launch_churn(h, e, None, (nxt.noise_coef, 1.007), hat=h, model_input=e)
    assert_bitwise(h, ref[0], "churn hat = x")
    assert_bitwise(e, ref[1], "churn xin = eps")


def _unused_cases(device):
    """(op, arguments, match): tensors (and per_sample, apply) for a stage the call does not run."""
    out = lambda: torch.empty(SHAPE, device=device)  # noqa: E731
    keys = torch.tensor([5], device=device)
    cs = torch.tensor([0.5, 1.0], device=device)
    no_churn = "`churn` is False"
    no_noise = "`apply` is False"
    fused = dict(churn=True, apply=False, hat_next=out(), xin=out())
    return [
        ("churn", _args("churn", device, keys=keys), "give `eps` .* or `keys` .*, not both"),
        ("churn", _args("churn", device, per_sample=48), "`per_sample` counts the elements of one key"),
        ("heun", _args("heun", device, hat_next=out()), f"`hat_next` is given but {no_churn}"),
        ("heun", _args("heun", device, xin=out()), f"`xin` is given but {no_churn}"),
        ("heun", _args("heun", device, eps=out()), f"`eps` is given but {no_churn}"),
        ("heun", _args("heun", device, keys=keys), f"`keys` is given but {no_churn}"),
        ("heun", _args("heun", device, churn_scalars=cs), f"`churn_scalars` is given but {no_churn}"),
        ("heun", _args("heun", device, apply=True), f"`apply` is True but {no_churn}"),
        ("heun", _args("heun", device, per_sample=48), f"`per_sample` is 48 but {no_churn}"),
        ("heun", _args("heun", device, **fused, eps=out()), f"`eps` is given but {no_noise}"),
        ("heun", _args("heun", device, **fused, keys=keys), f"`keys` is given but {no_noise}"),
        ("heun", _args("heun", device, **fused, churn_scalars=cs), f"`churn_scalars` is given but {no_noise}"),
        ("heun", _args("heun", device, **fused, per_sample=48), f"`per_sample` is 48 but {no_noise}"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_for_stages_not_run_are_refused(ops, device):
    """What the kernel would ignore is refused; the launchers pass None there (test_*_matches_torch run them)."""
    for op, args, match in _unused_cases(device):
        try:
            _refused(ops, op, args, match)
        except BaseException as exc:
            raise AssertionError(f"{op} with {match!r}: {exc}") from exc


def test_operators_pass_torch_opcheck(ops):
    """Schemas (which arguments are written), fake tensors and tracing with dynamic shapes (torch.compile)."""
    shape = (2, 3, 4, 4)
    x, eps, raw, d = (_rand(shape, s) for s in range(4))
    keys = torch.tensor([5, 2**62 + 7])
    buf = lambda: torch.empty(shape)  # noqa: E731
    cases = [
        (ops.churn.default, (x, eps, None, 0, 1.007, 0.5, None, buf(), buf())),
        (ops.churn.default, (x, None, keys, 48, 1.007, 0.5, torch.tensor([0.5, 1.0]), buf(), None)),
        (ops.euler.default, (raw, x, 0.5, 1.0, 1.0, -0.3, None, False, True, buf(), buf(), buf(), None,
                             torch.empty(2, 4, 4, 3, dtype=torch.uint8))),
        (ops.heun.default, (raw, x, eps, d, 0.5, 1.0, 1.0, -0.3, None, False, True, buf(), buf(), True, True, None,
                            keys, 48, 1.0, 0.3, None, buf(), buf())),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)

    def step(raw, hat, prev, d, xin):
        ops.euler(raw, hat, 0.5, 1.0, 1.0, -0.3, None, False, True, prev, d, xin, None, None)
        return prev * 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert_bitwise(compiled(raw, x, buf(), buf(), buf()), step(raw, x, buf(), buf(), buf()), "torch.compile")


# -- Philox noise ---------------------------------------------------------------------------------------


def _noise(seed, shape=(4096,), device="cpu", module=None):
    zero = torch.zeros(shape, device=device)
    # sample = 0, c = 1, S_noise = 1: x_hat is the generated noise itself
    hat = torch.empty_like(zero)
    (module or step_cuda)._launch_churn(zero, None, seed, (1.0, 1.0), hat=hat)
    return hat


@pytest.mark.parametrize("device", DEVICES)
def test_device_noise_is_standard_normal_deterministic_and_keyed_per_sample(ops, device):
    from scipy import stats

    a, b = _noise(123, device=device).cpu().double(), _noise(124, device=device).cpu().double()
    for e in (a, b):
        assert abs(e.mean()) < 5 / 64 and abs(e.var() - 1) < 5 * (2 / 4096) ** 0.5
        assert stats.kstest(e.numpy(), "norm").pvalue > 1e-4
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 5 / 64
    assert_bitwise(_noise(123, device=device).cpu().double(), a, "same seed, same noise")
    for per_sample in (48, 75):  # groups of 4, and one Philox call per element
        keys = torch.tensor([11, 12, 13], device=device)
        z = _noise(keys, (3, per_sample), device)
        swapped = _noise(torch.tensor([13, 99, 11], device=device), (3, per_sample), device)
        assert_bitwise(swapped[0], z[2], "a sample's noise depends on its key only")
        assert_bitwise(swapped[2], z[0])
        assert_bitwise(_noise(keys[1:2], (1, per_sample), device)[0], z[1], "and not on the batch around it")
        assert not torch.equal(z[0], z[1])


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs Triton (or its interpreter)")
def test_philox_stream_is_tritons(ops):
    """The same Philox integers, counters and element order as Triton's kernels: normals equal up to the
    last bits of logf / cos / sin (Triton's interpreter computes them with numpy)."""
    from kve_fast.ops import step_triton

    cases = [(2**40 + 5, (3, 1001)), (torch.tensor([7, 2**62 + 3]), (2, 48)), (torch.tensor([7, 8, 9]), (3, 75))]
    device = "cuda" if CUDA else "cpu"
    for seed, shape in cases:
        seed = seed.to(device) if isinstance(seed, torch.Tensor) else seed
        ours = _noise(seed, shape, device).cpu()
        theirs = _noise(seed, shape, device, step_triton).cpu()
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)
        assert float((ours - theirs).abs().max()) < 1e-4


# -- the backend in the sampler -------------------------------------------------------------------------


@pytest.fixture
def run_with(ops):
    """``run_with(kind, fn)`` calls ``fn(backend)`` with the backend name that runs ``kind`` ("cuda": CudaStep,
    "torch": the reference's ops). On the CPU, "cuda" patches the samplers' make_backend to make CudaStep
    (its CPU operators divide truly, as torch on the CPU); on a GPU it is backend="cuda" itself."""
    from kve_fast import k_diffusion, sampler
    from kve_fast.ops.step_cuda import CudaStep

    def make(name, device, convention, shape=None, layout=None, model_dtype=torch.float32):
        return CudaStep(convention, device, shape, layout=layout, model_dtype=model_dtype)

    def run(kind, fn):
        if kind == "torch" or CUDA:
            return fn(kind)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sampler, "make_backend", make)
            mp.setattr(k_diffusion, "make_backend", make)
            return fn("torch")

    return run


DEVICE = "cuda" if CUDA else "cpu"
PIPE_CASES = [
    ("test_unet+gaussian", "single", 2, 6, SMALL_SIGMAS),
    ("ncsnpp+gaussian", "list", 3, 5, SMALL_SIGMAS_NO_CHURN),
    ("gaussian", "global", 2, 14, {}),
]


@pytest.mark.parametrize("model, form, batch, steps, config", PIPE_CASES)
def test_cuda_backend_pipeline_matches_diffusers(models, run_with, model, form, batch, steps, config):
    unet = copy.deepcopy(models(model)).to(DEVICE)
    run_with("cuda", lambda backend: check_image_parity(unet, form, batch, steps, config, seed=8 + steps,
                                                        backend=backend))
    ours = run_with("cuda", lambda backend: kve_pipe(unet, **config)(
        batch, steps, make_generator(form, 7, batch), output_type="latent", backend=backend).images)
    _, ref = run_reference(unet, config, batch, steps, make_generator(form, 7, batch))
    assert_bitwise(ours, ref, "cuda backend vs diffusers latent")


def test_cuda_backend_with_callback_euler_and_fast_noise(models, run_with):
    pipe = kve_pipe(copy.deepcopy(models("gaussian")).to(DEVICE), **SMALL_SIGMAS)

    def runs(backend):
        seen = []

        def callback(p, i, t, kw):
            seen.append(kw["pred_original_sample"].clone())
            return {}

        gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
        np_images = pipe(2, 4, gen(), output_type="np", backend=backend, callback_on_step_end=callback,
                         callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"]).images
        euler = pipe(2, 4, gen(), output_type="latent", backend=backend, solver="euler").images
        return [np_images, euler] + seen

    got, ref = run_with("cuda", runs), run_with("torch", runs)
    assert len(got) == len(ref) == 6
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_bitwise(a, b, ["np images", "euler latent"][i] if i < 2 else f"pred_original_sample {i - 2}")
    fast = [run_with("cuda", lambda backend: pipe(2, 4, torch.Generator().manual_seed(1), output_type="latent",
                                                 backend=backend, noise="fast").images) for _ in range(2)]
    assert_bitwise(fast[0], fast[1], "fast noise: same seed, same sample")
    assert not torch.equal(fast[0], got[1])


def test_cuda_backend_with_a_bf16_unet_gives_the_torch_backends_bits(models, run_with):
    """The extension's kernels are float32 only: CudaStep casts around a bf16 UNet, with the same values as
    the torch backend's casts (and the Triton kernels' own, tests/test_precision.py)."""
    unet = copy.deepcopy(models("test_unet")).to(DEVICE).to(torch.bfloat16)
    pipe = kve_pipe(unet, sigma_min=0.02, sigma_max=2.0, s_churn=10.0)  # small sigmas: no bf16 saturation
    run = lambda backend: pipe(2, 3, torch.Generator().manual_seed(3), output_type="latent",  # noqa: E731
                               backend=backend).images
    got, ref = run_with("cuda", run), run_with("torch", run)
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and got.std() > 0.1
    assert_bitwise(got, ref, "cuda backend vs torch, bf16 UNet")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_backend_k_diffusion_matches_torch(run_with, layout):
    from kve_fast import k_diffusion as kd

    sigmas = kd.get_sigmas_karras(6, 0.05, 5.0).to(DEVICE)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 5.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def denoiser(x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def run(backend):
        torch.manual_seed(3)
        if CUDA:
            torch.cuda.manual_seed(3)
        return kd.sample_heun(denoiser, x, sigmas, s_churn=10.0, disable=True, backend=backend)

    assert_bitwise(run_with("cuda", run), run_with("torch", run), f"k-diffusion sample_heun ({layout})")
