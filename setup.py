"""Build script. Metadata lives in pyproject.toml; this file adds the optional CUDA extension (csrc/).

``kve_fast._C`` (the fused step kernels as torch operators, ``backend="cuda"``) is built when the
torch that the build sees has CUDA (``torch.version.cuda``; no GPU is needed) and nvcc is found, unless
``KVE_FAST_SKIP_CUDA_BUILD=1``. Otherwise the install is pure Python, with a warning, and
``backend="cuda"`` builds the extension just in time on first use (kve_fast/ops/step_cuda.py).

pip builds in an isolated environment without torch (pyproject.toml does not require torch to
build), so a plain ``pip install -e .`` skips the extension; to build it at install time, install a
CUDA torch first and run ``pip install --no-build-isolation -e .``.

The build settings below are also read by the just-in-time build and by tests/test_csrc.py.
"""

import os
import shutil
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SKIP_ENV = "KVE_FAST_SKIP_CUDA_BUILD"
EXTENSION = "kve_fast._C"
# The extension: operators (ops.cpp), their CUDA implementations (ops_cuda.cpp), the host loops
# (step_cpu.cpp: the CPU implementations) and the kernels (step_kernels.cu).
SOURCES = ["csrc/ops.cpp", "csrc/ops_cuda.cpp", "csrc/step_cpu.cpp", "csrc/step_kernels.cu"]
# What builds without CUDA (the tests' CPU build of the same operators).
CPU_SOURCES = ["csrc/ops.cpp", "csrc/step_cpu.cpp"]
# Bit-exactness: no multiply-add contraction (a contracted a * b + c rounds once, torch rounds twice).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
# Machine code for A100 (sm_80) and H100/H200 (sm_90), plus sm_90 PTX for later GPUs to compile at load.
ARCHS = ("80", "90")


def gencode_flags(archs=ARCHS, ptx: bool = True) -> list:
    """nvcc's ``-gencode`` flags for ``archs`` (compute capabilities such as "90"), with PTX of the last."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def nvcc_flags(archs=ARCHS, ptx: bool = True) -> list:
    return NVCC_FLAGS + gencode_flags(archs, ptx)


def find_nvcc():
    """nvcc's path ($CUDA_HOME/bin/nvcc, torch's idea of CUDA_HOME, or the PATH), or None."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        homes.append(CUDA_HOME)
    except Exception:  # no torch: look on the PATH only
        pass
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def skip_reason() -> str:
    """Why the CUDA extension is not built here ('' if it is)."""
    if os.environ.get(SKIP_ENV, "").strip() == "1":
        return f"{SKIP_ENV}=1"
    try:
        import torch
    except Exception as exc:  # pip's isolated build environment has no torch
        return (f"torch does not import in the build environment ({type(exc).__name__}: {exc}); "
                "to build the extension, install a CUDA torch and use `pip install --no-build-isolation`")
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA (torch.version.cuda is None)"
    if find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on the PATH)"
    return ""


def extension_kwargs() -> dict:
    """``setup()``'s ext_modules and cmdclass for the CUDA extension, or {} with a warning saying why not."""
    why = skip_reason()
    if why:
        warnings.warn(f"kve_fast: not building the CUDA extension ({why}); installing pure Python. "
                      "backend='cuda' will build it just in time on first use (needs a CUDA torch, nvcc and ninja).",
                      stacklevel=2)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class Build(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                raise RuntimeError(f"building {ext.name} failed ({exc}); set {SKIP_ENV}=1 to install kve_fast "
                                   "without it (backend='cuda' then builds it just in time)") from exc

    ext = CUDAExtension(EXTENSION, SOURCES, include_dirs=[str(ROOT / "csrc")],
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags()})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build}}


if __name__ == "__main__":
    setup(**extension_kwargs())
