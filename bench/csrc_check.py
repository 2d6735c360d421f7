"""GPU check of the CUDA C++ extension backend (csrc/, ``backend="cuda"``), in one run (about 4-6 minutes).

    python bench/csrc_check.py [--out DIR] [--quick] [--no-setup-build] [--parts build,kernels,pipelines,...]
    python bench/csrc_check.py --cpu-smoke      # no GPU: the script's own logic, on the CPU operators

0. Build: ``python setup.py build_ext --inplace`` (the install-time build: sm_80 + sm_90 + PTX, ninja),
   timed; the operators then load from ``kve_fast._C``, or (if that build failed) from a just-in-time build.
1. Kernels on CUDA against the reference's torch ops (0-d CPU float32 scalars, as diffusers holds them),
   element by element: churn, Euler (float and uint8 images), Heun fused with the next churn, k-diffusion's
   convention (true division), scalars from device memory, unaligned views and sizes not divisible by 4;
   the Philox noise against the Triton kernels' (same integer stream: max difference reported).
2. Pipelines: ``backend="cuda"`` (``cuda_graph=False``) against diffusers' ``KarrasVePipeline`` on the GPU
   (np, pil, latent recorded from its own scheduler), next to the torch and Triton backends, several shapes
   and generator forms; k-diffusion's ``sample_heun`` (contiguous and channels_last) against the torch
   backend; fast noise reproducible.
3. Bandwidth: each kernel's bytes-it-must-move / time (CUDA-graph replays) against a device-to-device copy
   measured in the same run, CUDA extension next to Triton. Capturing the ops in a graph also checks that
   they launch on torch's current stream.
4. The sampler's own per-step cost with a near-free stand-in model, 256x256 x 16: diffusers, Triton and
   CUDA backends, exact and fast noise.
5. Cold start: process start to the first image (bundled digits model, 2 steps, ``cuda_graph=False``) in a
   fresh process per backend: torch; Triton with an empty and a warm kernel cache; the CUDA extension
   installed (``kve_fast._C``), built just in time into an empty cache, and from torch's warm cache.

Every section runs in its own try/except (a failure is recorded, the rest still runs). Results go to
--out (default: $OUT, else bench/out): csrc_check.json after every section, csrc_check.md at the end; the
markdown is printed, then the summary line (PASS / FAIL: which checks or sections / INCOMPLETE) last. Exit status 1
if any exactness check failed or a section failed. The JSON's ``provenance``: commit, dirty flag, card, driver,
versions, command (kve_fast.benchmark.provenance).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: dict = {"exact": [], "notes": [], "failures": [], "build": {}, "bandwidth": [], "per_step": [],
                 "cold_start": []}
ARGS = None


def log(*args):
    print(*args, flush=True)


def save():
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "csrc_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def section(fn):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        log(f"\n== {fn.__name__}")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a failed section is a finding; the others still run
            tb = traceback.format_exc()
            log(tb)
            RESULTS["failures"].append({"section": fn.__name__, "error": f"{type(exc).__name__}: {exc}",
                                        "traceback": tb[-3000:]})
        finally:
            RESULTS.setdefault("seconds", {})[fn.__name__] = time.perf_counter() - t0
            save()

    return run


from kve_fast.precision import tf32_for_run  # noqa: E402
from kve_fast.testing import mismatches  # noqa: E402  (elements that differ; -1: shape or dtype)


def record(name: str, n: int, bad: int):
    RESULTS["exact"].append({"check": name, "elements": n, "mismatches": bad})
    log(f"  {'OK ' if bad == 0 else 'BAD'} {name}: {bad} mismatches of {n}")


# -- 0. build -------------------------------------------------------------------------------------------


@section
def build(setup_build: bool):
    from kve_fast.ops import step_cuda

    b = RESULTS["build"]
    if ARGS.cpu_smoke:
        t0 = time.perf_counter()
        step_cuda.jit_build(cuda=False, build_directory=tempfile.mkdtemp(prefix="kve_cpu_"))
        b["cpu_jit_s"] = time.perf_counter() - t0
        return
    if setup_build:
        env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
        env.pop("KVE_FAST_SKIP_CUDA_BUILD", None)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=ARGS.build_timeout)
        b["setup_build_s"] = time.perf_counter() - t0
        b["setup_build_ok"] = proc.returncode == 0
        b["setup_build_log_tail"] = (proc.stdout + proc.stderr)[-4000:]
        log(f"  setup.py build_ext --inplace: {'ok' if proc.returncode == 0 else 'FAILED'} in {b['setup_build_s']:.1f} s")
        if proc.returncode != 0:
            log(b["setup_build_log_tail"])
        so = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kve_fast").glob("_C*.so"))
        b["setup_built"] = so
    t0 = time.perf_counter()
    step_cuda.load_ops()
    b["load_s"] = time.perf_counter() - t0
    import importlib.util

    spec = importlib.util.find_spec("kve_fast._C")
    b["loaded_from"] = "kve_fast._C" if spec is not None and "kve_fast._C" in sys.modules else "jit"
    b["has_cuda_kernels"] = step_cuda.has_cuda_kernels()
    log(f"  operators loaded from {b['loaded_from']} in {b['load_s']:.1f} s; CUDA kernels: {b['has_cuda_kernels']}")


# -- 1. kernels -----------------------------------------------------------------------------------------


def _randn(shape, g, scale, device):
    return torch.randn(shape, generator=g, device=device) * scale


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


@section
def kernels(sizes, device):
    import kve_fast
    from kve_fast.ops import step_cuda as sc
    from kve_fast.ops import step_torch as st
    from kve_fast.sampler import plan_steps

    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    g = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        for offset in (0, 1):  # offset 1: a view at an odd element, the unaligned (scalar) path
            tag = f"n={n}{' unaligned' if offset else ''}"
            shape = (1, 1, 1, n)

            def view(scale):
                t = _randn((n + offset,), g, scale, device)[offset:]
                return t.reshape(shape)

            x, eps, raw, hat, prev, d = view(3), view(1), view(0.2), view(2), view(2), view(1)
            for which in (0, 3, 6):
                s = steps[which]
                h, xin = churn_op(sc, x, eps, None, (s.noise_coef, 1.007))
                rh = st.churn(x, 1.007 * eps, s.sigma, s.sigma_hat)
                record(f"churn step {which} {tag}", n, mismatches(h, rh) + mismatches(xin, st.model_input(rh)))
            for which in (3, 7):
                s = steps[which]
                p, dd, xin, pred, img = euler_op(sc, raw, hat, s.at_hat, "float")
                rp, rd, rpred = st.euler(st.scale_model_output(raw, s.sigma_hat), s.sigma_hat, s.sigma_next, hat)
                bad = (mismatches(p, rp) + mismatches(dd, rd) + mismatches(pred, rpred)
                       + mismatches(xin, st.model_input(rp)) + mismatches(img, st.to_image(rp)))
                record(f"euler step {which} {tag}", n, bad)
                img8 = euler_op(sc, raw, hat, s.at_hat, "uint8")[4]
                record(f"euler uint8 image step {which} {tag}", n, mismatches(img8, st.to_image(rp, "uint8")))
            s, nx = steps[3], steps[4]
            coef = (nx.noise_coef, 1.007)
            x2, pred, hn, xin = heun_op(sc, raw, hat, prev, d, s.at_next, then=(eps, None, coef))
            rx, rpred = st.heun(st.scale_model_output(raw, s.sigma_next), s.sigma_hat, s.sigma_next, hat, prev, d)
            rh = st.churn(rx, 1.007 * eps, nx.sigma, nx.sigma_hat)
            record(f"heun+churn {tag}", n, mismatches(x2, rx) + mismatches(pred, rpred) + mismatches(hn, rh)
                   + mismatches(xin, st.model_input(rh)))
            # in place: the next x_hat written over x_hat (as the backend's buffers are used)
            hat_copy = hat.clone()
            heun_op(sc, raw, hat_copy, prev, d, s.at_next, then=(eps, None, coef), hat_next=hat_copy)
            record(f"heun+churn in place {tag}", n, mismatches(hat_copy, rh))
            # scalars from device memory (the CUDA-graph mode)
            mem = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
            a = heun_op(sc, raw, hat, prev, d, mem(tuple(s.at_next)), then=(eps, None, mem([nx.noise_coef, 1.007])))
            record(f"heun+churn scalars in device memory {tag}", n, mismatches(a[0], rx) + mismatches(a[2], rh))
            # k-diffusion's convention: true division by device tensors
            sh, sn = torch.tensor(1.7, device=device), torch.tensor(0.9, device=device)
            dt = sn - sh
            p, dd = euler_op(sc, raw, hat, (0.0, float(sh), 0.0, float(dt)), denoiser=True, true_div=True)[:2]
            rd = (hat - raw) / sh
            x3 = heun_op(sc, raw, hat, prev, d, (0.0, float(sn), 0.0, float(dt)), denoiser=True, true_div=True)[0]
            rx3 = hat + ((d + (prev - raw) / sn) * 0.5) * dt
            record(f"k-diffusion euler/heun {tag}", n, mismatches(dd, rd) + mismatches(p, hat + rd * dt)
                   + mismatches(x3, rx3))
        # Philox: reproducible, and against the Triton kernels' stream (per_sample divisible by 4: one
        # Philox call per 4 elements; odd: one per element)
        for per_sample in (max(4, n // 16 * 4), max(5, n // 4) | 1):
            zero = torch.zeros((4, per_sample), device=device)
            tag = f"4 x {per_sample}"
            keys = torch.tensor([3, 2**62 + 1, 17, 99], device=device)
            a = churn_op(sc, zero, None, keys, (1.0, 1.0), store_xin=False)[0]
            b = churn_op(sc, zero, None, keys, (1.0, 1.0), store_xin=False)[0]
            record(f"device noise reproducible {tag}", zero.numel(), mismatches(a, b))
            e = a.double()
            RESULTS["notes"].append(f"cuda device noise {tag}: mean {e.mean().item():.4f}, var {e.var().item():.4f}")
            try:
                from kve_fast.ops import step_triton
            except ImportError as exc:
                RESULTS["notes"].append(f"no Triton to compare the noise with: {exc}")
                continue
            t = churn_op(step_triton, zero, None, keys, (1.0, 1.0), store_xin=False)[0]
            diff = (a - t).abs()
            note = (f"cuda vs triton device noise {tag}: max |diff| {diff.max().item():.3g}, "
                    f"{(diff == 0).double().mean().item():.1%} bit-identical")
            RESULTS["notes"].append(note)
            log("  " + note)
            record(f"cuda noise within 1e-4 of triton's {tag}", zero.numel(), int((diff > 1e-4).sum()))


# -- 2. pipelines ---------------------------------------------------------------------------------------


@section
@tf32_for_run(False)  # float32 pipelines: TF32 off while they run
def pipelines(quick: bool, device):
    import kve_fast
    from kve_fast.testing import GaussianPlusUNet, GaussianScore, inside_share, make_generator, ncsnpp_unet, \
        reference_test_unet, run_reference

    size = 32 if not ARGS.cpu_smoke else 8
    config = {"sigma_min": 0.002, "sigma_max": 1.0, "s_churn": 10.0, "s_min": 0.0, "s_max": 1.0}
    models = {"test_unet": lambda: GaussianPlusUNet(reference_test_unet(size), 0.1),
              "ncsnpp": lambda: GaussianPlusUNet(ncsnpp_unet(size), 0.01), "gaussian": lambda: GaussianScore(size)}
    cases = [("test_unet", "single", 3, 6), ("ncsnpp", "list", 2, 5), ("gaussian", "global", 5, 6),
             ("test_unet", "list", 1, 4)]
    if quick:
        cases = cases[:3]
    backends = ["torch", "triton", "cuda"]
    for name, form, batch, steps in cases:
        unet = models[name]().to(device)
        ours = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler(**config))
        ours.set_progress_bar_config(disable=True)
        for output_type in ("np", "pil"):
            ref, ref_latent = run_reference(unet, config, batch, steps, make_generator(form, 3, batch), output_type)
            if output_type == "np":
                log(f"  {name}: {inside_share(ref):.1%} of pixels strictly inside (0, 1)")
            for backend in backends:
                got = ours(batch, steps, make_generator(form, 3, batch), output_type=output_type, backend=backend,
                           cuda_graph=False).images
                if output_type == "pil":
                    got, want = np.stack([np.asarray(i) for i in got]), np.stack([np.asarray(i) for i in ref])
                else:
                    want = ref
                record(f"pipeline {name} {form} b{batch} {steps} steps {output_type} {backend}", np.asarray(got).size,
                       mismatches(got, want))
            if output_type == "np":
                for backend in backends:
                    lat = ours(batch, steps, make_generator(form, 3, batch), output_type="latent", backend=backend,
                               cuda_graph=False).images
                    record(f"pipeline {name} {form} b{batch} latent {backend}", lat.numel(), mismatches(lat, ref_latent))
        fast = [ours(batch, steps, make_generator(form, 5, batch), output_type="latent", backend="cuda", noise="fast",
                     cuda_graph=False).images for _ in range(2)]
        record(f"pipeline {name} fast noise reproducible (cuda)", fast[0].numel(), mismatches(fast[0], fast[1]))

    # k-diffusion's convention, contiguous and channels_last
    from kve_fast import k_diffusion as kd

    sigmas = kd.get_sigmas_karras(8, 0.02, 10.0).to(device)
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device) * 10.0
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        model = GaussianScore(16).to(device)
        denoiser = kd.score_to_denoiser(model)
        runs = {}
        for backend in backends:
            torch.manual_seed(4)
            if device == "cuda":
                torch.cuda.manual_seed(4)
            runs[backend] = kd.sample_heun(denoiser, x, sigmas, s_churn=10.0, disable=True, backend=backend)
        for backend in ("triton", "cuda"):
            record(f"k-diffusion sample_heun {layout} {backend} vs torch", x.numel(), mismatches(runs[backend], runs["torch"]))


# -- 3. bandwidth ---------------------------------------------------------------------------------------


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timers(device):
    """(graph timer, call timer): triton.testing's on CUDA; on the CPU (--cpu-smoke) a plain median of 3 calls."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        return (lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median"),
                lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def median_ms(fn):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[1]

    return median_ms, median_ms


def _copy_bandwidth(device) -> float:
    x = torch.randn(64 * 2**20 if device == "cuda" else 2**20, device=device)  # 256 MiB on the GPU
    y = torch.empty_like(x)
    ms = _timers(device)[0](lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def _kernel_bandwidth(n: int, copy_bw: float, device):
    import kve_fast
    from kve_fast.ops import step_cuda, step_triton
    from kve_fast.ops.fused import NextChurn
    from kve_fast.sampler import plan_steps

    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    st, nx = steps[3], steps[4]
    coef = (nx.noise_coef, 1.007)
    graph_ms, call_ms_of = _timers(device)
    g = torch.Generator(device=device).manual_seed(n)
    raw, hat, prev, d, eps = (torch.randn(n, generator=g, device=device) for _ in range(5))
    o1, o2, o3 = (torch.empty_like(hat) for _ in range(3))
    keys = torch.arange(1, 17, device=device, dtype=torch.int64)  # 16 per-sample keys (a batch of 16)
    kw = dict(denoiser=False, true_div=_true_div(device))
    for label, m in (("triton", step_triton), ("cuda", step_cuda)):
        kernels = {  # name: (launch, bytes per element it must move)
            "churn, host noise": (lambda m=m: m._launch_churn(prev, eps, None, coef, hat=o1, model_input=o2), 16),
            "churn, device noise": (lambda m=m: m._launch_churn(prev, None, keys, coef, hat=o1, model_input=o2), 12),
            "euler": (lambda m=m: m._launch_euler(raw, hat, st.at_hat, x_next=o1, d=o2, model_input=o3, **kw), 20),
            "heun + churn, host noise": (lambda m=m: m._launch_heun(
                raw, hat, prev, d, st.at_next, then=NextChurn(eps, None, coef, o1, o2), **kw), 28),
            "heun + churn, device noise": (lambda m=m: m._launch_heun(
                raw, hat, prev, d, st.at_next, then=NextChurn(None, keys, coef, o1, o2), **kw), 24),
        }
        for name, (fn, bpe) in kernels.items():
            fn()
            sync(device)
            try:
                ms, how = graph_ms(fn), "graph"
            except Exception as exc:  # not capturable: a finding (stream handling); timed eagerly instead
                RESULTS["failures"].append({"section": "bandwidth", "error": f"{label} {name}: capture failed: {exc}"})
                ms, how = call_ms_of(fn), "eager"
            call_ms = call_ms_of(fn)
            bw = bpe * n / (ms * 1e-3) / 1e9
            row = {"backend": label, "kernel": name, "elements": n, "bytes_per_element": bpe, "ms": ms,
                   "timed": how, "call_ms": call_ms, "GBps": bw, "pct_of_copy": 100 * bw / copy_bw}
            RESULTS["bandwidth"].append(row)
            log(f"  {label:6s} {name:28s} n={n:>9d} {ms * 1e3:8.1f} us ({how}) {call_ms * 1e3:8.1f} us (call) "
                f"{bw:6.0f} GB/s = {row['pct_of_copy']:5.1f}% of copy")


@section
def bandwidth(sizes, device):
    copy_bw = _copy_bandwidth(device)
    RESULTS["copy_GBps"] = copy_bw
    log(f"  device-to-device copy: {copy_bw:.0f} GB/s (bytes read + written)")
    for n in sizes:
        _kernel_bandwidth(n, copy_bw, device)
        if device == "cuda":
            torch.cuda.empty_cache()


# -- 4. per-step cost -----------------------------------------------------------------------------------


from kve_fast.testing import NearFreeScore as StandIn  # noqa: E402  (a near-free score model)


@section
def per_step(size, batch, steps, device):
    import kve_fast
    from kve_fast.testing import reference_pipe

    unet = StandIn(size).to(device)
    ref = reference_pipe(unet)
    ours = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
    ours.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    runs = {"reference (diffusers)": lambda: ref(batch, steps, gen(), output_type="np")}
    for backend in ("triton", "cuda"):
        for noise in ("exact", "fast"):
            runs[f"{backend} {noise}"] = (lambda b=backend, nz=noise: ours(
                batch, steps, gen(), output_type="np", backend=b, noise=nz, cuda_graph=False))
        runs[f"{backend} fast, latent"] = (lambda b=backend: ours(batch, steps, gen(), output_type="latent",
                                                                  backend=b, noise="fast", cuda_graph=False))
    from kve_fast.benchmark import required_repeats, time_stats

    stats = {}
    for name, fn in runs.items():
        fn()
        sync(device)
        ts = []
        while len(ts) < required_repeats(sorted(ts)[len(ts) // 2] if ts else 0.0):  # issue 20's rule
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        stats[name] = time_stats(ts)
    base = stats["reference (diffusers)"]["median_ms"]
    for name, st in stats.items():
        ms = st["median_ms"] / steps
        RESULTS["per_step"].append({"image": size, "batch": batch, "steps": steps, "run": name, "ms_per_step": ms,
                                    "min_ms_per_step": st["min_ms"] / steps, "max_ms_per_step": st["max_ms"] / steps,
                                    "n": st["n"], "speedup_vs_reference": base / st["median_ms"]})
        log(f"  {size}x{size} b{batch} {name:24s} {ms:8.3f} ms/step (n={st['n']})  x{base / st['median_ms']:6.1f}")


# -- 5. cold start --------------------------------------------------------------------------------------

CHILD = r"""
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


@section
def cold_start(device):
    tmp = Path(tempfile.mkdtemp(prefix="kve_cold_"))
    variants = [("torch", "torch", "plain", {})]
    if device == "cuda":
        tri = str(tmp / "triton_cache")
        ext = str(tmp / "torch_extensions")
        variants += [
            ("triton, empty kernel cache", "triton", "plain", {"TRITON_CACHE_DIR": tri}),
            ("triton, warm kernel cache", "triton", "plain", {"TRITON_CACHE_DIR": tri}),
            ("cuda, installed (kve_fast._C)", "cuda", "plain", {}),
            ("cuda, just-in-time build, empty cache", "cuda", "jit", {"TORCH_EXTENSIONS_DIR": ext}),
            ("cuda, just-in-time build, warm cache", "cuda", "jit", {"TORCH_EXTENSIONS_DIR": ext}),
        ]
    floor_code = "import time, sys; t0 = time.time(); import torch; torch.zeros(1, device=sys.argv[1]); print('COLD', t0, t0, time.time(), 0)"
    variants.insert(0, ("floor: import torch + first tensor on the device", None, "floor", {}))
    for label, backend, mode, env_extra in variants:
        if backend == "cuda" and mode == "plain" and not RESULTS["build"].get("setup_build_ok"):
            RESULTS["cold_start"].append({"variant": label, "skipped": "kve_fast._C was not built"})
            continue
        env = dict(os.environ, **env_extra)
        code = floor_code if mode == "floor" else CHILD
        argv = [sys.executable, "-c", code] + ([device] if mode == "floor" else [backend, mode, device])
        start = time.time()
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        end = time.time()
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COLD")), None)
        if proc.returncode != 0 or line is None:
            RESULTS["cold_start"].append({"variant": label, "error": (proc.stdout + proc.stderr)[-2000:]})
            log(f"  FAILED {label}: {(proc.stdout + proc.stderr)[-1500:]}")
            continue
        _, t0, t_built, t_image, _ = line.split()
        row = {"variant": label, "to_first_image_s": float(t_image) - start, "python_start_s": float(t0) - start,
               "build_s": float(t_built) - float(t0) if mode == "jit" else 0.0, "process_total_s": end - start}
        RESULTS["cold_start"].append(row)
        log(f"  {label:45s} {row['to_first_image_s']:7.2f} s to the first image (build {row['build_s']:.1f} s)")


# -- the report -----------------------------------------------------------------------------------------


def markdown() -> str:
    env = RESULTS["env"]
    lines = [f"## CUDA extension backend — {env['gpu']} (driver {env.get('driver')}), {env['date']}", "",
             f"torch {env['torch']}, triton {env.get('triton')}, Python {env['python']}; kve_fast {env.get('commit')} "
             f"({'DIRTY tree' if env.get('dirty') else 'clean tree' if env.get('dirty') is False else 'tree unknown'}); "
             f"command: `{env['command']}`", ""]
    b = RESULTS["build"]
    if b:
        lines += [f"Build: setup.py build_ext {'ok' if b.get('setup_build_ok') else 'not run or failed'}"
                  + (f" in {b['setup_build_s']:.0f} s" if "setup_build_s" in b else "")
                  + f"; operators from {b.get('loaded_from')} (load {b.get('load_s', 0):.1f} s)", ""]
    bad = [r for r in RESULTS["exact"] if r["mismatches"] != 0]
    lines += [f"Exactness: {len(RESULTS['exact']) - len(bad)}/{len(RESULTS['exact'])} checks bit-exact"
              + ("" if not bad else "; FAILED: " + ", ".join(r["check"] for r in bad[:8])), ""]
    for note in RESULTS["notes"]:
        lines.append(f"- {note}")
    if RESULTS["bandwidth"]:
        sizes = sorted({r["elements"] for r in RESULTS["bandwidth"]})
        lines += ["", f"Bandwidth, % of device-to-device copy ({RESULTS['copy_GBps']:.0f} GB/s), CUDA-graph replays:", "",
                  "| kernel | bytes/elt | " + " | ".join(f"{n / 2**20:.0f} M: triton / cuda" for n in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        kernels = list(dict.fromkeys(r["kernel"] for r in RESULTS["bandwidth"]))
        for k in kernels:
            cells = []
            for n in sizes:
                got = {r["backend"]: r for r in RESULTS["bandwidth"] if r["kernel"] == k and r["elements"] == n}
                cells.append(" / ".join(f"{got[bk]['pct_of_copy']:.1f} %{'' if got[bk]['timed'] == 'graph' else ' (eager)'}"
                                        if bk in got else "-" for bk in ("triton", "cuda")))
            bpe = next(r["bytes_per_element"] for r in RESULTS["bandwidth"] if r["kernel"] == k)
            lines.append(f"| {k} | {bpe} | " + " | ".join(cells) + " |")
    if RESULTS["per_step"]:
        lines += ["", "Per step, near-free model:", "", "| image x batch | run | ms/step | vs diffusers |", "|---|---|---|---|"]
        for r in RESULTS["per_step"]:
            lines.append(f"| {r['image']}x{r['image']} x {r['batch']} | {r['run']} | {r['ms_per_step']:.3f} | "
                         f"{r['speedup_vs_reference']:.1f}x |")
    if RESULTS["cold_start"]:
        lines += ["", "Cold start (process start to the first image: digits model, 2 steps, cuda_graph=False):", "",
                  "| variant | to first image | of which build |", "|---|---|---|"]
        for r in RESULTS["cold_start"]:
            if "to_first_image_s" in r:
                lines.append(f"| {r['variant']} | {r['to_first_image_s']:.2f} s | {r['build_s']:.1f} s |")
            else:
                lines.append(f"| {r['variant']} | {r.get('skipped') or 'FAILED'} | |")
    if RESULTS["failures"]:
        lines += ["", "Failures:"] + [f"- {f['section']}: {f['error']}" for f in RESULTS["failures"]]
    return "\n".join(lines)


PARTS = ("build", "kernels", "pipelines", "bandwidth", "per_step", "cold_start")


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and cases")
    ap.add_argument("--no-setup-build", action="store_true", help="skip `setup.py build_ext --inplace`")
    ap.add_argument("--build-timeout", type=int, default=240)
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the script's logic on the CPU operators")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ARGS = ap.parse_args()
    parts = [p.strip() for p in ARGS.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"unknown --parts {sorted(set(parts) - set(PARTS))}")
    device = "cpu" if ARGS.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("csrc_check.py needs a CUDA GPU (or --cpu-smoke)")
    from kve_fast import benchmark as kb

    RESULTS["provenance"] = kb.provenance(device)  # first: the tree before this run builds anything
    if ARGS.cpu_smoke:  # let backend="cuda" run CudaStep on the CPU operators (true division, as torch on the CPU)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's kernels in its interpreter
        from kve_fast import backends

        original = backends.check_backend
        backends.check_backend = lambda name, dev: "cuda" if name == "cuda" else original(name, dev)
    t0 = time.time()
    prov = RESULTS["provenance"]
    RESULTS["env"] = {"gpu": prov["card"] or "CPU (smoke)", "driver": prov["driver"], "torch": prov["torch"],
                      "cuda": prov["cuda"], "triton": prov["triton"], "python": prov["python"],
                      "date": prov["date_utc"], "command": prov["command"], "commit": prov["commit"],
                      "dirty": prov["dirty"]}
    log(RESULTS["env"])
    if "build" in parts:
        build(not ARGS.no_setup_build and not ARGS.cpu_smoke)
    if "kernels" in parts:
        kernels([1003, 2**20 + 7] if (ARGS.quick or ARGS.cpu_smoke) else [1003, 2**20 + 7, 8 * 2**20 + 3], device)
    if "pipelines" in parts:
        pipelines(ARGS.quick or ARGS.cpu_smoke, device)
    if device == "cuda":
        if "bandwidth" in parts:
            bandwidth([8 * 2**20, 16 * 2**20] if ARGS.quick else [2**20, 8 * 2**20, 16 * 2**20, 48 * 2**20], device)
        if "per_step" in parts:
            per_step(256, 16, 10 if ARGS.quick else 30, device)
    else:  # the code paths only: tiny sizes, no meaningful times
        if "bandwidth" in parts:
            bandwidth([4096], device)
        if "per_step" in parts:
            per_step(8, 2, 3, device)
    if "cold_start" in parts:
        cold_start(device)
    RESULTS["total_s"] = time.time() - t0
    outcome = kb.Outcome()
    gaps = kb.missing(prov)
    outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
    for r in RESULTS["exact"]:
        outcome.check(r["check"], r["mismatches"] == 0,
                      f"{r['mismatches']} of {r['elements']} differ" if r["mismatches"] else "")
    for f in RESULTS["failures"]:
        outcome.stage(f["section"], "failed", f["error"][:300])
    for r in RESULTS["cold_start"]:
        if "error" in r:
            outcome.stage(f"cold start: {r['variant']}", "failed", r["error"][-300:])
    RESULTS["outcome"] = outcome.as_dict()
    save()
    md = markdown()
    (Path(ARGS.out) / "csrc_check.md").write_text(md + "\n")
    log("\n==== summary ====\n" + md + f"\n\ntotal {RESULTS['total_s']:.0f} s")
    log(f"csrc_check: {outcome.summary()}")
    sys.exit(outcome.exit_code())


if __name__ == "__main__":
    main()
