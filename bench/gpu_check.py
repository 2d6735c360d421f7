"""GPU check of the step kernels (Triton, and the CUDA extension: ``--backends``) and the graphed pipeline, in
one run (about 1.5-3 minutes on an H100/H200 with the Triton kernels).

    python bench/gpu_check.py [--out DIR] [--quick] [--backends triton,cuda]
                              [--parts build,kernels,pipelines,hazards,threads,bandwidth,per_step,cold_start]
    python bench/gpu_check.py --device cpu --quick      # a dry run: Triton's interpreter, the fake graphs, tiny sizes
    python bench/gpu_check.py --device cpu --backends cuda --parts build,kernels   # the extension's CPU operators

``--backends`` (comma-separated ``triton``, ``cuda``): the step kernels checked and timed. Default: Triton, and in
the pipelines also the CUDA extension where it is built (``setup.py build_ext --inplace``; none is built here).
Parts (default: kernels to per_step):

0. build (``cuda``): the extension's install-time build, ``setup.py build_ext --inplace`` (sm_80 + sm_90 + PTX,
   ninja), timed, then its operators loaded (``kve_fast._C``, else a just-in-time build); on the CPU, the CPU
   operators built just in time.
1. kernels: each kernel against the reference's torch ops (0-d CPU float32 scalars, as diffusers holds them),
   element by element. Triton (``kve_fast.ops.step_triton``'s public ops): churn (gamma = 0 and > 0), Euler (mid
   and last step, float and uint8 images), Heun fused with the next churn; fast noise reproducible. The extension
   (its launchers): the same, with unaligned views and sizes not divisible by 4, the next x_hat written in place,
   scalars from device memory, k-diffusion's convention (true division), and its Philox noise against Triton's.
2. pipelines: kve_fast's pipeline (torch and each backend, eager and graphed, ``cuda_graph=True``) against
   diffusers' real ``KarrasVePipeline``: np, pil and the final latent (recorded from diffusers' own scheduler), the
   global RNG's state after the run; on models whose images stay inside (0, 1) (the Gaussian score plus a small
   UNet term). With Triton, graphed against eager: a callback that replaces the sample (its tensors too), Euler,
   fast noise, channels_last (against diffusers on the same converted model), bf16 (a converted copy and
   autocast). With the extension: its fast noise reproducible, and k-diffusion's ``sample_heun`` (contiguous and
   channels_last) against the torch backend.
3. hazards: what the restructured graph runner must notice between graphed calls, on real graphs: ``unet.half();
   unet.float()`` (new storages), S_noise changed (two pipelines on one UNet), a forward hook added after the
   capture: graphed = eager = diffusers after each, and each change changes the images.
4. threads: graphed calls from two threads at once on two models (each its own capture and memory pool), each
   against its eager output.
5. bandwidth (CUDA): each kernel's bytes-it-must-move / time (CUDA-graph replays; capturing also checks that the
   extension launches on torch's current stream) against a device-to-device copy measured in the same run.
6. per_step: the sampler's own per-step cost with a near-free stand-in model at 256x256 x 16 and 64x64 x 64
   (CPU: 16x16 x 2): diffusers against kve_fast (torch, each backend exact and fast, eager and graphed); n per
   the repeat rule, min / median / max, ratios of medians in this run.
7. cold_start: process start to the first image (bundled digits model, 2 steps, ``cuda_graph=False``) in a fresh
   process per variant: the floor (``import torch`` and a first tensor), torch; on CUDA Triton with an empty and a
   warm kernel cache, and the extension installed (after the build part), built just in time into an empty cache,
   and from torch's warm cache.

Every section runs in its own try/except; the JSON (provenance: commit, dirty flag, card, driver, versions,
command) is written after each to --out/gpu_check.json (default: $OUT, else bench/out). The last line says
PASS, FAIL (which checks and sections) or INCOMPLETE (what was skipped); exit status 0, 1 or 3.

``--device cpu``: Triton in its interpreter (``TRITON_INTERPRET=1``) and the CPU stand-in for CUDA graphs
(``KVE_FAST_FAKE_GRAPHS=1``), both set before kve_fast loads; ``backend="cuda"`` runs on the extension's CPU
operators; tiny sizes; bandwidth is left out. A dry run of this script: its numbers mean nothing. NCSN++ models'
graphed fast-mode checks are left out there (with a note): ``kve_fast/ops/fir_triton.py`` launches its kernel
outside ``fake_graph.launch``, so the fake graph does not replay it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("build", "kernels", "pipelines", "hazards", "threads", "bandwidth", "per_step", "cold_start")
DEFAULT_PARTS = ("kernels", "pipelines", "hazards", "threads", "bandwidth", "per_step")
BACKENDS = ("triton", "cuda")


def _names(ap, option: str, text: str, allowed) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(names) - set(allowed)
    if unknown:
        ap.error(f"unknown {option} {sorted(unknown)}")
    return names


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and cases")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run (see the top)")
    ap.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--backends", default=None, help="comma-separated step backends to check: triton, cuda "
                                                     "(default: triton, and cuda in the pipelines where built)")
    ap.add_argument("--build-timeout", type=int, default=240, help="seconds for the build part's setup.py")
    args = ap.parse_args(argv)
    args.parts = _names(ap, "--parts", args.parts, PARTS)
    args.backends = None if args.backends is None else _names(ap, "--backends", args.backends, BACKENDS)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":  # before triton and kve_fast load
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVE_FAST_FAKE_GRAPHS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kve_fast  # noqa: E402
from bench.harness import ScriptRun, time_calls  # noqa: E402
from kve_fast.precision import tf32_for_run  # noqa: E402
from kve_fast.testing import mismatches  # noqa: E402

RUN: ScriptRun | None = None


def log(*args):
    print(*args, flush=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _np(images):
    if isinstance(images, list):  # PIL
        return np.stack([np.asarray(i) for i in images])
    return images


def _cmp(a, b) -> tuple[int, int]:
    a, b = _np(a), _np(b)
    if not isinstance(a, torch.Tensor):
        a, b = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
    return a.numel(), mismatches(a, b)


def exact(name, a, b):
    n, bad = _cmp(a, b)
    return RUN.exact(name, n, bad)


def extension_built(device) -> bool:
    """Whether backend="cuda" runs here without a just-in-time build (the build part, or ``setup.py build_ext
    --inplace``, made it)."""
    if device.type != "cuda":
        return False
    try:
        from kve_fast.ops import step_cuda

        step_cuda.load_ops(jit=False)
        return bool(step_cuda.has_cuda_kernels())
    except Exception as exc:  # noqa: BLE001 - not built: the cuda rows are left out, with a note
        RUN.note(f"backend 'cuda' left out: {type(exc).__name__}: {exc}")
        return False


def cuda_on_the_cpu() -> None:
    """``backend="cuda"`` on the extension's CPU operators (true division, as torch on the CPU): a dry run."""
    from kve_fast import backends

    original = backends.check_backend
    backends.check_backend = lambda name, dev: "cuda" if name == "cuda" else original(name, dev)


# -- 0. build -------------------------------------------------------------------------------------------------


def build(device, timeout: int):
    from kve_fast.ops import step_cuda

    b = RUN.result.setdefault("build", {})
    t0 = time.perf_counter()
    if device.type != "cuda":
        step_cuda.jit_build(cuda=False, build_directory=tempfile.mkdtemp(prefix="kve_cpu_"))
        b["cpu_jit_s"] = time.perf_counter() - t0
        return
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    env.pop("KVE_FAST_SKIP_CUDA_BUILD", None)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    b.update(setup_build_s=time.perf_counter() - t0, setup_build_ok=proc.returncode == 0,
             setup_build_log_tail=(proc.stdout + proc.stderr)[-4000:],
             setup_built=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kve_fast").glob("_C*.so")))
    log(f"  setup.py build_ext --inplace: {'ok' if proc.returncode == 0 else 'FAILED'} in {b['setup_build_s']:.1f} s")
    if proc.returncode != 0:  # (the operators are then built just in time below)
        log(b["setup_build_log_tail"])
    t0 = time.perf_counter()
    step_cuda.load_ops()
    b["load_s"] = time.perf_counter() - t0
    b["loaded_from"] = "kve_fast._C" if "kve_fast._C" in sys.modules else "jit"
    b["has_cuda_kernels"] = step_cuda.has_cuda_kernels()
    log(f"  operators loaded from {b['loaded_from']} in {b['load_s']:.1f} s; CUDA kernels: {b['has_cuda_kernels']}")


# -- 1. kernels ------------------------------------------------------------------------------------------------


def check_kernels(sizes, device):
    from kve_fast.ops import step_torch as st
    from kve_fast.ops import step_triton as tr
    from kve_fast.sampler import plan_steps

    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    g = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        shape = (1, 1, 1, n)

        def randn(scale):
            return torch.randn(shape, generator=g, device=device) * scale

        x, eps, raw, hat, prev, d = randn(3), randn(1), randn(0.2), randn(2), randn(2), randn(1)
        for which in (0, 3, 6):  # gamma = 0 above S_max, gamma > 0, gamma = 0 below S_min
            s = steps[which]
            h, xin = tr.churn(x, eps, 1.007, s.sigma, s.sigma_hat)
            rh = st.churn(x, 1.007 * eps, s.sigma, s.sigma_hat)
            RUN.exact(f"churn step {which} n={n}", 2 * n, mismatches(h, rh) + mismatches(xin, st.model_input(rh)))
        for which in (3, 7):  # 7: the last step, sigma_{i+1} = 0
            s = steps[which]
            nxt, dd, xin, pred, img = tr.euler(raw, hat, s.sigma_hat, s.sigma_next, want_pred=True, image="float")
            rp, rd, rpred = st.euler(st.scale_model_output(raw, s.sigma_hat), s.sigma_hat, s.sigma_next, hat)
            bad = (mismatches(nxt, rp) + mismatches(dd, rd) + mismatches(pred, rpred)
                   + mismatches(xin, st.model_input(rp)) + mismatches(img, st.to_image(rp)))
            RUN.exact(f"euler step {which} n={n}", 5 * n, bad)
            img8 = tr.euler(raw, hat, s.sigma_hat, s.sigma_next, image="uint8")[4]
            RUN.exact(f"euler uint8 image step {which} n={n}", n, mismatches(img8, st.to_image(rp, "uint8")))
        s, nx = steps[3], steps[4]
        x2, pred, hn, xin = tr.heun(raw, hat, prev, d, s.sigma_hat, s.sigma_next, want_pred=True,
                                    next_churn=(eps, 1.007, nx.sigma, nx.sigma_hat, None))
        rx, rpred = st.heun(st.scale_model_output(raw, s.sigma_next), s.sigma_hat, s.sigma_next, hat, prev, d)
        rh = st.churn(rx, 1.007 * eps, nx.sigma, nx.sigma_hat)
        RUN.exact(f"heun + next churn n={n}", 4 * n, mismatches(x2, rx) + mismatches(pred, rpred) + mismatches(hn, rh)
                  + mismatches(xin, st.model_input(rh)))
        a = tr.churn(x, None, 1.0, steps[3].sigma, steps[3].sigma_hat, seed=1234)[0]
        b = tr.churn(x, None, 1.0, steps[3].sigma, steps[3].sigma_hat, seed=1234)[0]
        RUN.exact(f"device noise reproducible n={n}", n, mismatches(a, b))
        e = ((a - x) / steps[3].noise_coef).double()
        RUN.note(f"device noise n={n}: mean {e.mean().item():.4f}, var {e.var().item():.4f}")
        if n >= 4096:
            RUN.check(f"device noise n={n} looks standard normal", abs(e.mean().item()) < 0.1
                      and abs(e.var().item() - 1) < 0.1, f"mean {e.mean().item():.4f}, var {e.var().item():.4f}")
    if device.type == "cuda":  # what the launch option buys: the same Euler kernel with FMA contraction allowed
        n = sizes[-1]
        s = steps[3]
        raw = torch.randn((1, 1, 1, n), generator=g, device=device) * 0.2
        hat = torch.randn((1, 1, 1, n), generator=g, device=device) * 2
        nxt, d = torch.empty_like(hat), torch.empty_like(hat)
        lv = s.at_hat
        tr._euler_kernel[tr._grid(n)](
            raw, hat, nxt, d, nxt, nxt, nxt, n, 1, lv.half, lv.sigma, lv.inverse, lv.dt, nxt, SCAL_MEM=False,
            DENOISER=False, TRUE_DIV=False, STORE_D=True, STORE_XIN=False, STORE_PRED=False, STORE_IMG=False, C=1,
            TO_UINT8=False, BLOCK=tr._BLOCK, num_warps=4, enable_fp_fusion=True)
        rp, rd, _ = st.euler(st.scale_model_output(raw, s.sigma_hat), s.sigma_hat, s.sigma_next, hat)
        RUN.note(f"euler with enable_fp_fusion=True: {mismatches(nxt, rp)} (x_next) and {mismatches(d, rd)} (d) "
                 f"mismatches of {n}; the kernels launch with False (0 above)")


def _true_div(device) -> bool:
    from kve_fast.convention import REFERENCE

    return REFERENCE.true_division(torch.device(device))


def churn_op(m, x, eps, seed, coef, store_xin=True):
    """``m``'s churn launcher with new outputs: ``(hat, model_input)``."""
    hat, xin = torch.empty_like(x), (torch.empty_like(x) if store_xin else None)
    m._launch_churn(x, eps, seed, coef, hat=hat, model_input=xin)
    return hat, xin


def euler_op(m, raw, hat, level, image=None, denoiser=False, true_div=None):
    """``m``'s Euler launcher with new outputs: ``(x_next, d, model_input, denoised, image)``."""
    from kve_fast.ops.fused import image_tensor

    out = [torch.empty_like(hat) for _ in range(4)]
    img = None if image is None else image_tensor(hat, image)
    m._launch_euler(raw, hat, level, x_next=out[0], d=out[1], model_input=out[2], denoised=out[3], image=img,
                    image_kind=image, denoiser=denoiser, true_div=_true_div(hat.device) if true_div is None else true_div)
    return (*out, img)


def heun_op(m, raw, hat, nxt, d, level, then=None, hat_next=None, denoiser=False, true_div=None):
    """``m``'s Heun launcher with new outputs; ``then``: None or ``(eps, seed, coef)`` of the next churn (its x_hat
    into ``hat_next``, a new tensor by default). Returns ``(x, denoised, hat_next, model_input_next)``."""
    from kve_fast.ops.fused import NextChurn

    x, pred = torch.empty_like(hat), torch.empty_like(hat)
    fused = None
    if then is not None:
        eps, seed, coef = then
        fused = NextChurn(eps, seed, coef, torch.empty_like(hat) if hat_next is None else hat_next,
                          torch.empty_like(hat))
    m._launch_heun(raw, hat, nxt, d, level, x=x, denoised=pred, then=fused, denoiser=denoiser,
                   true_div=_true_div(hat.device) if true_div is None else true_div)
    return x, pred, None if fused is None else fused.hat, None if fused is None else fused.model_input


def check_extension_kernels(sizes, device):
    """The extension's kernels through its launchers (see the top), aligned and at an odd offset."""
    from kve_fast.ops import step_cuda as sc
    from kve_fast.ops import step_torch as st
    from kve_fast.sampler import plan_steps

    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    g = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        for offset in (0, 1):  # offset 1: a view at an odd element, the unaligned (scalar) path
            tag = f"n={n}{' unaligned' if offset else ''}"

            def view(scale):
                return (torch.randn((n + offset,), generator=g, device=device) * scale)[offset:].reshape(1, 1, 1, n)

            x, eps, raw, hat, prev, d = view(3), view(1), view(0.2), view(2), view(2), view(1)
            for which in (0, 3, 6):
                s = steps[which]
                h, xin = churn_op(sc, x, eps, None, (s.noise_coef, 1.007))
                rh = st.churn(x, 1.007 * eps, s.sigma, s.sigma_hat)
                RUN.exact(f"cuda churn step {which} {tag}", n, mismatches(h, rh) + mismatches(xin, st.model_input(rh)))
            for which in (3, 7):
                s = steps[which]
                p, dd, xin, pred, img = euler_op(sc, raw, hat, s.at_hat, "float")
                rp, rd, rpred = st.euler(st.scale_model_output(raw, s.sigma_hat), s.sigma_hat, s.sigma_next, hat)
                RUN.exact(f"cuda euler step {which} {tag}", n, mismatches(p, rp) + mismatches(dd, rd)
                          + mismatches(pred, rpred) + mismatches(xin, st.model_input(rp)) + mismatches(img, st.to_image(rp)))
                img8 = euler_op(sc, raw, hat, s.at_hat, "uint8")[4]
                RUN.exact(f"cuda euler uint8 image step {which} {tag}", n, mismatches(img8, st.to_image(rp, "uint8")))
            extension_heun(sc, steps, (raw, hat, prev, d, eps), tag, device)
        extension_noise(sc, n, device)


def extension_heun(sc, steps, tensors, tag: str, device):
    """Heun fused with the next churn: new outputs, in place, scalars from device memory; k-diffusion's
    convention (true division by device tensors)."""
    from kve_fast.ops import step_torch as st

    raw, hat, prev, d, eps = tensors
    n = hat.numel()
    s, nx = steps[3], steps[4]
    coef = (nx.noise_coef, 1.007)
    x2, pred, hn, xin = heun_op(sc, raw, hat, prev, d, s.at_next, then=(eps, None, coef))
    rx, rpred = st.heun(st.scale_model_output(raw, s.sigma_next), s.sigma_hat, s.sigma_next, hat, prev, d)
    rh = st.churn(rx, 1.007 * eps, nx.sigma, nx.sigma_hat)
    RUN.exact(f"cuda heun+churn {tag}", n, mismatches(x2, rx) + mismatches(pred, rpred) + mismatches(hn, rh)
              + mismatches(xin, st.model_input(rh)))
    hat_copy = hat.clone()  # in place: the next x_hat written over x_hat (as the backend's buffers are used)
    heun_op(sc, raw, hat_copy, prev, d, s.at_next, then=(eps, None, coef), hat_next=hat_copy)
    RUN.exact(f"cuda heun+churn in place {tag}", n, mismatches(hat_copy, rh))
    mem = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731 (the CUDA-graph mode)
    a = heun_op(sc, raw, hat, prev, d, mem(tuple(s.at_next)), then=(eps, None, mem([nx.noise_coef, 1.007])))
    RUN.exact(f"cuda heun+churn scalars in device memory {tag}", n, mismatches(a[0], rx) + mismatches(a[2], rh))
    sh, sn = torch.tensor(1.7, device=device), torch.tensor(0.9, device=device)
    dt = sn - sh
    p, dd = euler_op(sc, raw, hat, (0.0, float(sh), 0.0, float(dt)), denoiser=True, true_div=True)[:2]
    rd = (hat - raw) / sh
    x3 = heun_op(sc, raw, hat, prev, d, (0.0, float(sn), 0.0, float(dt)), denoiser=True, true_div=True)[0]
    rx3 = hat + ((d + (prev - raw) / sn) * 0.5) * dt
    RUN.exact(f"cuda k-diffusion euler/heun {tag}", n, mismatches(dd, rd) + mismatches(p, hat + rd * dt)
              + mismatches(x3, rx3))


def extension_noise(sc, n: int, device):
    """The extension's Philox noise: reproducible, and against the Triton kernels' stream (per_sample divisible by
    4: one Philox call per 4 elements; odd: one per element)."""
    for per_sample in (max(4, n // 16 * 4), max(5, n // 4) | 1):
        zero = torch.zeros((4, per_sample), device=device)
        tag = f"4 x {per_sample}"
        keys = torch.tensor([3, 2**62 + 1, 17, 99], device=device)
        a = churn_op(sc, zero, None, keys, (1.0, 1.0), store_xin=False)[0]
        b = churn_op(sc, zero, None, keys, (1.0, 1.0), store_xin=False)[0]
        RUN.exact(f"cuda device noise reproducible {tag}", zero.numel(), mismatches(a, b))
        e = a.double()
        RUN.note(f"cuda device noise {tag}: mean {e.mean().item():.4f}, var {e.var().item():.4f}")
        try:
            from kve_fast.ops import step_triton
        except ImportError as exc:
            RUN.note(f"no Triton to compare the noise with: {exc}")
            continue
        diff = (a - churn_op(step_triton, zero, None, keys, (1.0, 1.0), store_xin=False)[0]).abs()
        RUN.note(f"cuda vs triton device noise {tag}: max |diff| {diff.max().item():.3g}, "
                 f"{(diff == 0).double().mean().item():.1%} bit-identical")
        RUN.exact(f"cuda noise within 1e-4 of triton's {tag}", zero.numel(), int((diff > 1e-4).sum()))


KERNEL_CHECKS = {"triton": check_kernels, "cuda": check_extension_kernels}


def kernel_sizes(backend: str, quick: bool, gpu: bool) -> list[int]:
    if backend == "cuda":
        return [1003, 2**20 + 7] if quick or not gpu else [1003, 2**20 + 7, 8 * 2**20 + 3]
    return ([1000, 2**20 + 7] if quick else [1000, 2**20 + 7, 8 * 2**20 + 3]) if gpu else [1000, 4099]


# -- 2. pipelines -----------------------------------------------------------------------------------------------


def _pipe(model, config):
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CONFIG = {"sigma_min": 0.002, "sigma_max": 1.0, "s_churn": 10.0, "s_min": 0.0, "s_max": 1.0}


def check_pipelines(quick: bool, device, size: int, backends):
    """kve_fast's pipeline (``backends``: torch and the ones checked) against diffusers' real one, eager and graphed
    (see the top)."""
    from kve_fast.testing import (GaussianPlusUNet, GaussianScore, inside_share, make_generator, ncsnpp_unet,
                                  reference_test_unet, run_reference)

    models = {"test_unet": lambda: GaussianPlusUNet(reference_test_unet(size), 0.1),
              "ncsnpp": lambda: GaussianPlusUNet(ncsnpp_unet(size), 0.01), "gaussian": lambda: GaussianScore(size)}
    cases = [("test_unet", "single", 3, 6), ("ncsnpp", "list", 2, 5), ("gaussian", "global", 5, 6),
             ("test_unet", "list", 1, 4)]
    if quick:
        cases = cases[:3]
    if device.type != "cuda":  # a dry run: the interpreter is slow
        cases = [("test_unet", "single", 1, 3), ("gaussian", "global", 2, 3)] + ([] if quick else [("ncsnpp", "list", 1, 2)])
    runs = [(b, False) for b in backends] + [(b, True) for b in backends if b != "torch"]
    for name, form, batch, steps in cases:
        model = models[name]().to(device)
        ours = _pipe(model, CONFIG)
        for ref_type in ("np", "pil"):
            ref, ref_latent = run_reference(model, CONFIG, batch, steps, make_generator(form, 3, batch), ref_type)
            ref_rng = torch.get_rng_state()
            if ref_type == "np":
                RUN.note(f"{name}: {inside_share(ref):.1%} of pixels strictly inside (0, 1)")
            for output_type in (("np", "latent") if ref_type == "np" else ("pil",)):
                want = ref_latent if output_type == "latent" else ref
                for backend, graphed in runs:
                    label = f"pipeline {name} {form} b{batch} {steps} steps {output_type} {backend}" + (
                        " graphed" if graphed else "")
                    got = ours(batch, steps, make_generator(form, 3, batch), output_type=output_type,
                               backend=backend, cuda_graph=graphed).images
                    exact(label, got, want)
                    if form == "global":  # the global RNG left where diffusers leaves it
                        RUN.exact(f"{label}: global RNG state after", 1,
                                  int(not torch.equal(torch.get_rng_state(), ref_rng)))
        if "cuda" in backends:
            fast = [ours(batch, steps, make_generator(form, 5, batch), output_type="latent", backend="cuda",
                         noise="fast", cuda_graph=False).images for _ in range(2)]
            exact(f"pipeline {name} fast noise reproducible (cuda)", fast[0], fast[1])
        if "triton" not in backends:
            continue
        if graphs_fake() and name == "ncsnpp":
            RUN.note("ncsnpp: graphed fast-mode checks left out on the fake graphs (kve_fast/ops/fir_triton.py launches "
                     "outside fake_graph.launch: the fake graph does not replay the FIR kernel)")
            continue
        graphed_extras(name, ours, model, form, batch, steps, device)
        kve_fast.graphs.clear_graphs()
    if "cuda" in backends:
        kdiffusion_layouts(device, [b for b in backends if b != "torch"])


def graphs_fake() -> bool:
    return kve_fast.graphs.fake()


def kdiffusion_layouts(device, backends):
    """k-diffusion's convention through the extension: ``sample_heun`` contiguous and channels_last, each backend
    against the torch backend."""
    from kve_fast import k_diffusion as kd
    from kve_fast.testing import GaussianScore

    sigmas = kd.get_sigmas_karras(8, 0.02, 10.0).to(device)
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device) * 10.0
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        denoiser = kd.score_to_denoiser(GaussianScore(16).to(device))
        runs = {}
        for backend in ["torch"] + backends:
            torch.manual_seed(4)
            if device.type == "cuda":
                torch.cuda.manual_seed(4)
            runs[backend] = kd.sample_heun(denoiser, x, sigmas, s_churn=10.0, disable=True, backend=backend)
        for backend in backends:
            exact(f"k-diffusion sample_heun {layout} {backend} vs torch", runs[backend], runs["torch"])


def graphed_extras(name, ours, model, form, batch, steps, device):
    """Graphed against eager (and diffusers where it can run): callbacks, Euler, fast noise, channels_last, bf16."""
    import copy

    from kve_fast.testing import make_generator, run_reference

    def run(graphed, backend="triton", **kw):
        return ours(batch, steps, make_generator(form, 3, batch), output_type="latent", backend=backend,
                    cuda_graph=graphed, **kw).images

    # a callback that replaces the sample at step 1 and records what it is handed
    def callback(seen):
        def cb(pipe, i, t, kw):
            seen.append((kw["sample"].clone(), kw["pred_original_sample"].clone()))
            return {"sample": kw["sample"] * 0.9} if i == 1 else {}
        return cb

    seen_e, seen_g = [], []
    tensors = ["sample", "pred_original_sample"]
    eager = run(False, backend="torch", callback_on_step_end=callback(seen_e),
                callback_on_step_end_tensor_inputs=tensors)
    graphed = run(True, callback_on_step_end=callback(seen_g), callback_on_step_end_tensor_inputs=tensors)
    exact(f"{name}: callback replacing the sample, graphed triton = eager torch", graphed, eager)
    RUN.exact(f"{name}: callback tensors, graphed = eager", max(len(seen_e), 1) * 2,
              sum(mismatches(a[0], b[0]) + mismatches(a[1], b[1]) for a, b in zip(seen_g, seen_e))
              + (0 if len(seen_g) == len(seen_e) == steps else 10**6))
    exact(f"{name}: Euler, graphed triton = eager torch", run(True, solver="euler"),
          run(False, backend="torch", solver="euler"))
    fast_e, fast_g = run(False, noise="fast"), run(True, noise="fast")
    exact(f"{name}: fast noise, graphed = eager", fast_g, fast_e)
    RUN.check(f"{name}: fast noise differs from exact noise", not torch.equal(fast_e, run(False)))
    # channels_last: a converted copy, against diffusers' pipeline on the same copy
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_pipe = _pipe(cl, CONFIG)
    ref_latent = run_reference(cl, CONFIG, batch, steps, make_generator(form, 3, batch), "np")[1]
    for graphed in (False, True):
        got = cl_pipe(batch, steps, make_generator(form, 3, batch), output_type="latent", backend="triton",
                      cuda_graph=graphed, channels_last=True).images
        exact(f"{name}: channels_last{' graphed' if graphed else ''} = diffusers on the converted model", got,
              ref_latent)
    del cl_pipe, cl
    # bf16: a converted copy natively, and the float32 model under autocast; graphed = eager (same kernels)
    low = _pipe(copy.deepcopy(model).to(torch.bfloat16), CONFIG)
    for what, pipe, kw in (("bf16 copy", low, {}), ("bf16 autocast", ours, {"unet_dtype": torch.bfloat16})):
        for noise in ("exact", "fast"):
            args = dict(output_type="latent", backend="triton", noise=noise, **kw)
            e = pipe(batch, steps, make_generator(form, 3, batch), cuda_graph=False, **args).images
            g = pipe(batch, steps, make_generator(form, 3, batch), cuda_graph=True, **args).images
            exact(f"{name}: {what}, {noise} noise, graphed = eager", g, e)
            RUN.check(f"{name}: {what}, {noise} noise, finite", bool(torch.isfinite(g).all()))
    del low


# -- 3. hazards between graphed calls ------------------------------------------------------------------------


def check_hazards(device, size):
    """Graphed = eager = diffusers after what a capture baked in changes (see the top)."""
    from kve_fast.testing import GaussianPlusUNet, make_generator, reference_test_unet, run_reference

    unet = reference_test_unet(size).to(device)
    model = GaussianPlusUNet(unet, 0.2).to(device)
    config = dict(CONFIG, s_min=0.0, s_max=10.0)
    batch, steps = (2, 5) if device.type == "cuda" else (1, 3)

    def three(what, cfg=config):
        pipe = _pipe(model, cfg)
        gen = lambda: make_generator("single", 7, batch)  # noqa: E731
        graphed = pipe(batch, steps, gen(), output_type="latent", backend="triton", cuda_graph=True).images
        eager = pipe(batch, steps, gen(), output_type="latent", backend="torch", cuda_graph=False).images
        ref = run_reference(model, cfg, batch, steps, gen(), "np")[1]
        exact(f"{what}: graphed = eager", graphed, eager)
        exact(f"{what}: graphed = diffusers", graphed, ref)
        return graphed

    kve_fast.graphs.clear_graphs()
    three("first call (captured)")
    unet.half()  # new storages (and weights rounded to float16: other values, the same in all three runs)
    unet.float()
    first = three("after unet.half(); unet.float() (new storages)")
    RUN.check("after half/float: a capture for the new storages, the stale one freed",
              kve_fast.graphs.graph_info()["captures"] == 1, str(kve_fast.graphs.graph_info()["captures"]))
    outs = [three(f"S_noise {s} (another pipeline, the same UNet)", dict(config, s_noise=s)) for s in (1.0, 1.05, 0.9)]
    RUN.check("S_noise changes the images", not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]))
    RUN.check("S_noise is fed, not captured: one capture", kve_fast.graphs.graph_info()["captures"] == 1,
              str(kve_fast.graphs.graph_info()["captures"]))
    handle = unet.conv_in.register_forward_hook(lambda m, i, o: o * 2)
    try:
        hooked = three("a forward hook added after the capture")
    finally:
        handle.remove()
    RUN.check("the hook changes the images", not torch.equal(hooked, first))
    exact("the hook removed: the first values again", three("the hook removed"), first)
    kve_fast.graphs.clear_graphs()


# -- 4. two threads, two models ---------------------------------------------------------------------------------


def check_threads(device, size, calls: int):
    from kve_fast.testing import GaussianPlusUNet, reference_test_unet

    torch.manual_seed(0)
    models = [GaussianPlusUNet(reference_test_unet(size), scale, seed=seed).to(device)
              for scale, seed in ((0.1, 3), (0.2, 5))]
    pipes = [_pipe(m, CONFIG) for m in models]
    batch, steps = 2, 5

    def call(k, graphed, seed):
        return pipes[k](batch, steps, torch.Generator().manual_seed(seed), output_type="latent", backend="triton",
                        cuda_graph=graphed).images

    kve_fast.graphs.clear_graphs()
    expected = {(k, s): call(k, False, s) for k in range(2) for s in range(calls)}
    for k in range(2):
        call(k, True, 0)  # captured before the race: the threads replay
    pools = [c.pool for c in kve_fast.graphs._CACHE.values()]
    RUN.check("two models: two captures", len(pools) == 2, str(len(pools)))
    if device.type == "cuda":
        RUN.check("two models: separate memory pools", len(pools) == 2 and pools[0] != pools[1] and None not in pools,
                  str(pools))
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(k):
        try:
            barrier.wait(60)
            for s in range(calls):
                got[(k, s)] = call(k, True, s)
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    RUN.check("two threads: no errors", not errors, "; ".join(errors))
    for key, want in expected.items():
        if key in got:
            exact(f"thread {key[0]} call {key[1]}: graphed = eager", got[key], want)
    RUN.check("two threads: every call ran", len(got) == len(expected), f"{len(got)} of {len(expected)}")
    kve_fast.graphs.clear_graphs()


# -- 5. bandwidth -------------------------------------------------------------------------------------------------


def copy_bandwidth(device) -> float:
    from triton.testing import do_bench_cudagraph

    x = torch.randn(64 * 2**20, device=device)  # 256 MiB
    y = torch.empty_like(x)
    ms = do_bench_cudagraph(lambda: y.copy_(x), rep=200, return_mode="median")
    bw = 2 * x.numel() * 4 / (ms * 1e-3) / 1e9
    RUN.result["copy_GBps"] = bw
    log(f"  device-to-device copy: {bw:.0f} GB/s (bytes read + written)")
    return bw


def _launches(m, tensors, steps) -> dict:
    """name: (a launch of ``m``'s kernel on ``tensors``, the bytes per element it must move)."""
    from kve_fast.ops.fused import NextChurn

    raw, hat, nxt, d, eps, o1, o2, o3, keys = tensors
    st, nx = steps[3], steps[4]
    coef = (nx.noise_coef, 1.007)
    kw = dict(denoiser=False, true_div=False)
    return {
        "churn, host noise": (lambda: m._launch_churn(nxt, eps, None, coef, hat=o1, model_input=o2), 16),
        "churn, device noise": (lambda: m._launch_churn(nxt, None, keys, coef, hat=o1, model_input=o2), 12),
        "euler": (lambda: m._launch_euler(raw, hat, st.at_hat, x_next=o1, d=o2, model_input=o3, **kw), 20),
        "heun + churn, host noise": (lambda: m._launch_heun(
            raw, hat, nxt, d, st.at_next, then=NextChurn(eps, None, coef, o1, o2), **kw), 28),
        "heun + churn, device noise": (lambda: m._launch_heun(
            raw, hat, nxt, d, st.at_next, then=NextChurn(None, keys, coef, o1, o2), **kw), 24),
    }


def kernel_bandwidth(sizes, device, backends):
    import importlib

    from triton.testing import do_bench, do_bench_cudagraph

    from kve_fast.sampler import plan_steps

    copy_bw = copy_bandwidth(device)
    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    rows = RUN.result.setdefault("bandwidth", [])
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        tensors = [torch.randn(n, generator=g, device=device) for _ in range(5)]
        tensors += [torch.empty_like(tensors[0]) for _ in range(3)]
        tensors.append(torch.arange(1, 17, device=device, dtype=torch.int64))  # 16 per-sample keys (a batch of 16)
        for backend in backends:
            m = importlib.import_module(f"kve_fast.ops.step_{backend}")
            for name, (fn, bpe) in _launches(m, tensors, steps).items():
                fn()
                try:
                    ms, how = do_bench_cudagraph(fn, rep=100, return_mode="median"), "graph"
                except Exception as exc:  # noqa: BLE001 - not capturable (stream handling): a finding; timed eagerly
                    RUN.check(f"{backend} {name} n={n}: capturable", False, f"capture failed: {exc}")
                    ms, how = do_bench(fn, warmup=25, rep=100, return_mode="median"), "eager"
                call_ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                bw = bpe * n / (ms * 1e-3) / 1e9
                rows.append({"backend": backend, "kernel": name, "elements": n, "bytes_per_element": bpe, "ms": ms,
                             "graph_ms": ms if how == "graph" else None, "timed": how, "call_ms": call_ms, "GBps": bw,
                             "pct_of_copy": 100 * bw / copy_bw})
                log(f"  {backend:6s} {name:28s} n={n:>9d} {ms * 1e3:8.1f} us ({how}) {call_ms * 1e3:8.1f} us (call) "
                    f"{bw:6.0f} GB/s = {100 * bw / copy_bw:5.1f}% of copy")
        torch.cuda.empty_cache()


# -- 6. per-step cost with a near-free stand-in model -----------------------------------------------------------


def per_step_runs(ours, ref, batch: int, steps: int, backends) -> dict:
    """name: a call of diffusers' pipeline, or of kve_fast's with a backend, noise and graphs."""
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def kve(backend, noise, graphed, output_type="np"):
        return lambda: ours(batch, steps, gen(), output_type=output_type, backend=backend, noise=noise,
                            cuda_graph=graphed)

    runs = {"reference (diffusers)": lambda: ref(batch, steps, gen(), output_type="np"),
            "kve_fast torch exact": kve("torch", "exact", False)}
    for b in backends:
        runs.update({f"kve_fast {b} exact": kve(b, "exact", False), f"kve_fast {b} fast": kve(b, "fast", False)})
    for b in backends:
        runs.update({f"kve_fast {b} exact, graphed": kve(b, "exact", True),
                     f"kve_fast {b} fast, graphed": kve(b, "fast", True),
                     f"kve_fast {b} fast, graphed, latent": kve(b, "fast", True, "latent")})
    return runs


def per_step(configs, steps, device, backends):
    from kve_fast.testing import NearFreeScore, reference_pipe

    rows = RUN.result.setdefault("per_step", [])
    for size, batch in configs:
        model = NearFreeScore(size).to(device)
        runs = per_step_runs(_pipe(model, {}), reference_pipe(model), batch, steps, backends)
        stats = {name: time_calls(fn, lambda: _sync(device))[0] for name, fn in runs.items()}
        base = stats["reference (diffusers)"]["median_ms"]
        for name, s in stats.items():
            row = {"image": size, "batch": batch, "steps": steps, "run": name, "ms_per_step": s["median_ms"] / steps,
                   "min_ms_per_step": s["min_ms"] / steps, "max_ms_per_step": s["max_ms"] / steps, "n": s["n"],
                   "speedup_vs_reference": base / s["median_ms"], "times_ms": s["times_ms"]}
            rows.append(row)
            log(f"  {size}x{size} b{batch} {name:38s} {row['ms_per_step']:8.3f} ms/step (min {row['min_ms_per_step']:.3f},"
                f" max {row['max_ms_per_step']:.3f}, n={s['n']})  x{row['speedup_vs_reference']:6.1f}")
        kve_fast.graphs.clear_graphs()


# -- 7. cold start ------------------------------------------------------------------------------------------------

COLD = r"""
import sys, time
t0 = time.time()
import torch
import kve_fast
backend, mode, device = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "jit":
    from kve_fast.ops import step_cuda
    step_cuda.jit_build()
t_built = time.time()
pipe = kve_fast.load_pipeline("digits").to(device)
pipe.set_progress_bar_config(disable=True)
images = pipe(1, 2, torch.Generator().manual_seed(0), output_type="np", backend=backend, cuda_graph=False).images
if device == "cuda":
    torch.cuda.synchronize()
print("COLD", t0, t_built, time.time(), float(images.mean()), flush=True)
"""
COLD_FLOOR = ("import time, sys; t0 = time.time(); import torch; torch.zeros(1, device=sys.argv[1]); "
              "print('COLD', t0, t0, time.time(), 0)")


def cold_variants(device) -> list[tuple]:
    """(label, backend, mode, environment) of each cold start (see the top)."""
    variants = [("floor: import torch + first tensor on the device", None, "floor", {}), ("torch", "torch", "plain", {})]
    if device.type == "cuda":
        tmp = Path(tempfile.mkdtemp(prefix="kve_cold_"))
        tri, ext = str(tmp / "triton_cache"), str(tmp / "torch_extensions")
        variants += [("triton, empty kernel cache", "triton", "plain", {"TRITON_CACHE_DIR": tri}),
                     ("triton, warm kernel cache", "triton", "plain", {"TRITON_CACHE_DIR": tri}),
                     ("cuda, installed (kve_fast._C)", "cuda", "plain", {}),
                     ("cuda, just-in-time build, empty cache", "cuda", "jit", {"TORCH_EXTENSIONS_DIR": ext}),
                     ("cuda, just-in-time build, warm cache", "cuda", "jit", {"TORCH_EXTENSIONS_DIR": ext})]
    return variants


def cold_start(device):
    rows = RUN.result.setdefault("cold_start", [])
    for label, backend, mode, env_extra in cold_variants(device):
        if backend == "cuda" and mode == "plain" and not RUN.result.get("build", {}).get("setup_build_ok"):
            rows.append({"variant": label, "skipped": "kve_fast._C was not built"})
            continue
        argv = [sys.executable, "-c", COLD_FLOOR, device.type] if mode == "floor" else \
            [sys.executable, "-c", COLD, backend, mode, device.type]
        start = time.time()
        proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, **env_extra), capture_output=True, text=True,
                              timeout=600)
        end = time.time()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COLD")), None)
        if proc.returncode != 0 or line is None:
            rows.append({"variant": label, "error": (proc.stdout + proc.stderr)[-2000:]})
            RUN.check(f"cold start: {label}", False, (proc.stdout + proc.stderr)[-300:])
            continue
        _, t0, t_built, t_image, _ = line.split()
        row = {"variant": label, "to_first_image_s": float(t_image) - start, "python_start_s": float(t0) - start,
               "build_s": float(t_built) - float(t0) if mode == "jit" else 0.0, "process_total_s": end - start}
        rows.append(row)
        log(f"  {label:45s} {row['to_first_image_s']:7.2f} s to the first image (build {row['build_s']:.1f} s)")


# -- the run ------------------------------------------------------------------------------------------------------


def run_parts(args, device) -> None:
    """Each asked-for part in its own section (see the top)."""
    gpu = device.type == "cuda"
    size = 32 if gpu else 8
    checked = args.backends or ["triton"]
    in_pipes = args.backends or (["triton"] + (["cuda"] if "pipelines" in args.parts and extension_built(device)
                                               else []))  # (looked at first: a build may run beside this script)
    if "build" in args.parts:
        RUN.section("build", build, device, args.build_timeout)
    if "kernels" in args.parts:
        for backend in checked:
            name = "kernels" if backend == "triton" else f"kernels ({backend})"
            RUN.section(name, KERNEL_CHECKS[backend], kernel_sizes(backend, args.quick, gpu), device)
    if "pipelines" in args.parts:
        RUN.section("pipelines", check_pipelines, args.quick or not gpu, device, size, ["torch"] + in_pipes)
    if "hazards" in args.parts:
        RUN.section("hazards", check_hazards, device, size)
    if "threads" in args.parts:
        if gpu:
            RUN.section("threads", check_threads, device, size, 3)
        else:
            RUN.skip("threads", "Triton's interpreter is not thread-safe (two threads launching at once fail there)")
    if "bandwidth" in args.parts:
        if gpu:
            RUN.section("bandwidth", kernel_bandwidth,
                        [2**20, 8 * 2**20] if args.quick else [2**20, 8 * 2**20, 16 * 2**20, 48 * 2**20], device, checked)
        else:
            RUN.skip("bandwidth", "CUDA only")
    if "per_step" in args.parts:
        configs, steps = ([(256, 16), (64, 64)], 10 if args.quick else 50) if gpu else ([(16, 2)], 3)
        RUN.section("per_step", per_step, configs, steps, device, checked)
    if "cold_start" in args.parts:
        RUN.section("cold_start", cold_start, device)


@tf32_for_run(False)  # float32 throughout: TF32 off for the run, the caller's setting back after it
def main(args=None) -> int:
    global RUN
    args = args or ARGS or parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    RUN = ScriptRun("gpu_check", device, args.out)
    RUN.result.update(quick=args.quick, parts=args.parts, backends=args.backends, tf32=False)
    if device.type != "cuda" and "cuda" in (args.backends or ()):
        cuda_on_the_cpu()
    run_parts(args, device)
    return RUN.finish()


if __name__ == "__main__":
    sys.exit(main())
