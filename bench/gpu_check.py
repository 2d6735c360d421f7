"""GPU check of the fused step kernels, in one run (about 2-4 minutes on an H100/H200).

    python bench/gpu_check.py [--out DIR] [--quick]

1. Exactness on CUDA: each Triton kernel against the reference's torch ops (0-d CPU float32 scalars,
   as diffusers holds them), and the whole pipeline (torch and triton backends) against diffusers'
   KarrasVePipeline on the GPU, counted element by element (``torch.equal``, no tolerance).
2. Bandwidth: each kernel's bytes-it-must-move / time against a device-to-device copy measured in
   the same run (CUDA-graph replays, so launch overhead is out; also the plain per-call time).
3. The sampler's own per-step cost with a near-free stand-in model at 256x256x16 and 64x64x64:
   the reference pipeline vs kve_fast (torch backend, triton exact, triton fast), as ratios.

Prints a table last and writes gpu_check.json to --out (default: $OUT, else bench/out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import kve_fast  # noqa: E402
from kve_fast.ops import step_torch, step_triton  # noqa: E402
from kve_fast.sampler import plan_steps  # noqa: E402

RESULTS: dict = {"exact": [], "bandwidth": [], "per_step": [], "notes": []}


def log(*args):
    print(*args, flush=True)


from kve_fast.testing import mismatches  # noqa: E402  (elements that differ; -1: shape or dtype)


def record_exact(name: str, n: int, bad: int):
    RESULTS["exact"].append({"check": name, "elements": n, "mismatches": bad})
    log(f"  {'OK ' if bad == 0 else 'BAD'} {name}: {bad} mismatches of {n}")


# -- 1. kernels against torch on CUDA ---------------------------------------------------------------


def check_kernels(sizes):
    log("kernels vs torch ops on CUDA")
    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in sizes:
        shape = (1, 1, 1, n)
        x = torch.randn(shape, generator=g, device="cuda") * 3
        eps = torch.randn(shape, generator=g, device="cuda")
        raw = torch.randn(shape, generator=g, device="cuda") * 0.2
        hat = torch.randn(shape, generator=g, device="cuda") * 2
        prev = torch.randn(shape, generator=g, device="cuda") * 2
        d = torch.randn(shape, generator=g, device="cuda")
        for which in (0, 3, 6):  # gamma = 0, gamma > 0, gamma = 0 below s_min
            st = steps[which]
            h, xin = step_triton.churn(x, eps, 1.007, st.sigma, st.sigma_hat)
            rh = step_torch.churn(x, 1.007 * eps, st.sigma, st.sigma_hat)
            record_exact(f"churn step {which} n={n}", n, mismatches(h, rh) + mismatches(xin, step_torch.model_input(rh)))
        for which in (3, 7):  # 7: last step, sigma_prev = 0
            st = steps[which]
            p, dd, xin, pred, img = step_triton.euler(raw, hat, st.sigma_hat, st.sigma_prev, want_pred=True,
                                                      image="float")
            mo = step_torch.scale_model_output(raw, st.sigma_hat)
            rp, rd, rpred = step_torch.euler(mo, st.sigma_hat, st.sigma_prev, hat)
            bad = (mismatches(p, rp) + mismatches(dd, rd) + mismatches(pred, rpred)
                   + mismatches(xin, step_torch.model_input(rp)) + mismatches(img, step_torch.to_image(rp)))
            record_exact(f"euler step {which} n={n}", n, bad)
            img8 = step_triton.euler(raw, hat, st.sigma_hat, st.sigma_prev, image="uint8")[4]
            ref8 = (step_torch.to_image(rp).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
            record_exact(f"euler uint8 image step {which} n={n}", n, mismatches(img8.cpu(), torch.from_numpy(ref8)))
        st, nx = steps[3], steps[4]
        x2, pred, hn, xin = step_triton.heun(raw, hat, prev, d, st.sigma_hat, st.sigma_prev, want_pred=True,
                                             next_churn=(eps, 1.007, nx.sigma, nx.sigma_hat, None))
        mo = step_torch.scale_model_output(raw, st.sigma_prev)
        rx, rpred = step_torch.heun(mo, st.sigma_hat, st.sigma_prev, hat, prev, d)
        rh = step_torch.churn(rx, 1.007 * eps, nx.sigma, nx.sigma_hat)
        bad = (mismatches(x2, rx) + mismatches(pred, rpred) + mismatches(hn, rh)
               + mismatches(xin, step_torch.model_input(rh)))
        record_exact(f"heun+churn n={n}", n, bad)
        a = step_triton.churn(x, None, 1.0, steps[3].sigma, steps[3].sigma_hat, seed=1234)[0]
        b = step_triton.churn(x, None, 1.0, steps[3].sigma, steps[3].sigma_hat, seed=1234)[0]
        record_exact(f"device noise deterministic n={n}", n, mismatches(a, b))
        e = ((a - x) / float(step_triton.churn_coefficient(steps[3].sigma, steps[3].sigma_hat))).double()
        RESULTS["notes"].append(f"device noise n={n}: mean {e.mean().item():.4f}, var {e.var().item():.4f}")

    # What the launch option buys: the same Euler kernel with FMA contraction allowed.
    n = sizes[-1]
    st = steps[3]
    raw = torch.randn((1, 1, 1, n), generator=g, device="cuda") * 0.2
    hat = torch.randn((1, 1, 1, n), generator=g, device="cuda") * 2
    prev = torch.empty_like(hat)
    d = torch.empty_like(hat)
    scal = step_triton.euler_scalars(st.sigma_hat, st.sigma_prev)
    step_triton._euler_kernel[step_triton._grid(n)](
        raw, hat, prev, d, prev, prev, prev, n, 1, *scal, prev, SCAL_MEM=False, DENOISER=False, TRUE_DIV=False,
        STORE_D=True, STORE_XIN=False,
        STORE_PRED=False, STORE_IMG=False, C=1, TO_UINT8=False, BLOCK=step_triton._BLOCK, num_warps=4,
        enable_fp_fusion=True)
    rp, rd, _ = step_torch.euler(step_torch.scale_model_output(raw, st.sigma_hat), st.sigma_hat, st.sigma_prev, hat)
    note = (f"euler with enable_fp_fusion=True: {mismatches(prev, rp)} (sample_prev) and {mismatches(d, rd)} "
            f"(derivative) mismatches of {n}; with False: 0 expected")
    RESULTS["notes"].append(note)
    log("  " + note)


# -- 1b. whole pipeline on CUDA vs diffusers --------------------------------------------------------


def check_pipelines(quick: bool):
    """kve_fast's pipeline on CUDA (torch and Triton backends, eager and CUDA-graphed) against diffusers' real
    pipeline: np, pil and latent (recorded from diffusers' own scheduler calls), on models whose images stay
    inside (0, 1) (the Gaussian score plus a small UNet term), so equality is about values, not clamping."""
    from kve_fast.testing import GaussianPlusUNet, GaussianScore, inside_share, make_generator, ncsnpp_unet, \
        reference_test_unet, run_reference

    log("pipelines on CUDA vs diffusers")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = {"sigma_min": 0.002, "sigma_max": 1.0, "s_churn": 10.0, "s_min": 0.0, "s_max": 1.0}
    models = {"test_unet": GaussianPlusUNet(reference_test_unet(32), 0.1),
              "ncsnpp": GaussianPlusUNet(ncsnpp_unet(32), 0.01), "gaussian": GaussianScore(32)}
    cases = [("test_unet", "single", 3, 6), ("ncsnpp", "list", 2, 5), ("gaussian", "global", 5, 6),
             ("test_unet", "list", 1, 4)]
    if quick:
        cases = cases[:2]
    runs = [("torch", False), ("triton", False), ("triton", True)]
    for name, form, batch, steps in cases:
        unet = models[name].to("cuda")
        ours = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler(**config))
        ours.set_progress_bar_config(disable=True)
        for output_type in ("np", "pil"):
            r, rl = run_reference(unet, config, batch, steps, make_generator(form, 3, batch), output_type)
            if output_type == "np":
                log(f"  {name}: {inside_share(r):.1%} of pixels strictly inside (0, 1)")
            for backend, graphed in runs:
                label = f"{backend}{' graphed' if graphed else ''}"
                try:
                    o = ours(batch, steps, make_generator(form, 3, batch), output_type=output_type, backend=backend,
                             cuda_graph=graphed).images
                except Exception as exc:  # a failed capture is a finding, not a crash of the whole check
                    log(f"  FAILED pipeline {name} {output_type} {label}: {type(exc).__name__}: {exc}")
                    RESULTS.setdefault("failures", []).append(f"{name} {output_type} {label}: {exc}")
                    continue
                if output_type == "pil":
                    a, b = np.stack([np.asarray(i) for i in o]), np.stack([np.asarray(i) for i in r])
                else:
                    a, b = o, r
                record_exact(f"pipeline {name} {form} b{batch} {steps} steps {output_type} {label}", a.size,
                             mismatches(torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))))
            if output_type == "np":
                for backend, graphed in runs:
                    label = f"{backend}{' graphed' if graphed else ''}"
                    try:
                        ol = ours(batch, steps, make_generator(form, 3, batch), output_type="latent",
                                  backend=backend, cuda_graph=graphed).images
                    except Exception as exc:
                        log(f"  FAILED pipeline {name} latent {label}: {type(exc).__name__}: {exc}")
                        continue
                    record_exact(f"pipeline {name} {form} latent {label}", ol.numel(), mismatches(ol, rl))
        kve_fast.graphs.clear_graphs()


# -- 2. bandwidth -------------------------------------------------------------------------------------


def copy_bandwidth() -> float:
    x = torch.randn(64 * 2**20, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    ms = do_bench_cudagraph(lambda: y.copy_(x), rep=200, return_mode="median")
    bw = 2 * x.numel() * 4 / (ms * 1e-3) / 1e9
    log(f"device-to-device copy: {bw:.0f} GB/s (bytes read + written)")
    RESULTS["copy_GBps"] = bw
    return bw


def kernel_bandwidth(sizes, copy_bw):
    log("kernel bandwidth")
    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    st, nx = steps[3], steps[4]
    c = step_triton.churn_coefficient(nx.sigma, nx.sigma_hat)
    es = step_triton.euler_scalars(st.sigma_hat, st.sigma_prev)
    hs = step_triton.heun_scalars(st.sigma_hat, st.sigma_prev)
    for n in sizes:
        g = torch.Generator(device="cuda").manual_seed(n)
        t = [torch.randn(n, generator=g, device="cuda") for _ in range(5)]
        raw, hat, prev, d, eps = t
        kernels = {
            # name: (fn, bytes per element it must move)
            "churn (host noise)": (lambda: step_triton._launch_churn(prev, eps, None, 1.007, c), 16),
            "churn (device noise)": (lambda: step_triton._launch_churn(prev, None, 7, 1.007, c), 12),
            "euler": (lambda: step_triton._launch_euler(raw, hat, es, True, True, False, None), 20),
            "heun+churn (host noise)": (lambda: step_triton._launch_heun(raw, hat, prev, d, hs, False, False,
                                                                          (eps, 0, 1.007, c)), 28),
            "heun+churn (device noise)": (lambda: step_triton._launch_heun(raw, hat, prev, d, hs, False, False,
                                                                            (None, 7, 1.007, c)), 24),
        }
        copy_ms = do_bench_cudagraph(lambda: prev.copy_(hat), rep=100, return_mode="median")
        for name, (fn, bpe) in list(kernels.items()):
            if "device noise" in name:  # the per-element tl.randn variant, for comparison
                kernels[name + " [tl.randn]"] = (fn, bpe)
        default_noise4 = step_triton.NOISE4
        for name, (fn, bpe) in kernels.items():
            step_triton.NOISE4 = default_noise4 if "[tl.randn]" not in name else False
            fn()
            ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            call_ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            bw = bpe * n / (ms * 1e-3) / 1e9
            row = {"kernel": name, "elements": n, "bytes_per_element": bpe, "graph_ms": ms, "call_ms": call_ms,
                   "GBps": bw, "pct_of_copy": 100 * bw / copy_bw,
                   "copy_same_size_GBps": 8 * n / (copy_ms * 1e-3) / 1e9}
            RESULTS["bandwidth"].append(row)
            log(f"  {name:38s} n={n:>9d} {ms * 1e3:8.1f} us (graph) {call_ms * 1e3:8.1f} us (call) "
                f"{bw:6.0f} GB/s = {row['pct_of_copy']:5.1f}% of copy")
        step_triton.NOISE4 = default_noise4


# -- 3. per-step cost with a near-free stand-in model ------------------------------------------------


from kve_fast.testing import NearFreeScore as StandIn  # noqa: E402  (a near-free score model)


def per_step(configs, steps):
    from kve_fast.testing import reference_pipe

    log("per-step cost, near-free model")
    for size, batch in configs:
        unet = StandIn(size).to("cuda")
        ref = reference_pipe(unet)
        ours = kve_fast.KarrasVePipeline(unet, kve_fast.KarrasVeScheduler())
        ours.set_progress_bar_config(disable=True)
        runs = {
            "reference (diffusers)": lambda: ref(batch, steps, torch.Generator().manual_seed(0), output_type="np"),
            "kve_fast torch exact": lambda: ours(batch, steps, torch.Generator().manual_seed(0), output_type="np",
                                                 backend="torch", cuda_graph=False),
            "kve_fast triton exact": lambda: ours(batch, steps, torch.Generator().manual_seed(0), output_type="np",
                                                  backend="triton", cuda_graph=False),
            "kve_fast triton fast": lambda: ours(batch, steps, torch.Generator().manual_seed(0), output_type="np",
                                                 backend="triton", noise="fast", cuda_graph=False),
            "kve_fast triton fast (latent)": lambda: ours(batch, steps, torch.Generator().manual_seed(0),
                                                          output_type="latent", backend="triton", noise="fast",
                                                          cuda_graph=False),
        }
        times = {}
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            times[name] = sorted(ts)[1] / steps * 1e3
        base = times["reference (diffusers)"]
        for name, ms in times.items():
            row = {"image": size, "batch": batch, "elements": 3 * size * size * batch, "steps": steps, "run": name,
                   "ms_per_step": ms, "speedup_vs_reference": base / ms}
            RESULTS["per_step"].append(row)
            log(f"  {size}x{size} b{batch} {name:30s} {ms:8.3f} ms/step  x{base / ms:6.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and cases")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    t0 = time.time()
    RESULTS["env"] = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
    }
    log(RESULTS["env"])
    check_kernels([1000, 2**20 + 7] if args.quick else [1000, 2**20 + 7, 8 * 2**20 + 3])
    check_pipelines(args.quick)
    copy_bw = copy_bandwidth()
    kernel_bandwidth([2**20, 8 * 2**20] if args.quick else [2**20, 8 * 2**20, 16 * 2**20, 48 * 2**20], copy_bw)
    per_step([(256, 16), (64, 64)], 10 if args.quick else 50)
    RESULTS["seconds"] = time.time() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))

    bad = [r for r in RESULTS["exact"] if r["mismatches"] != 0]
    log("\n==== summary: " + RESULTS["env"]["gpu"] + f", torch {torch.__version__}, triton {triton.__version__} ====")
    log(f"exactness: {len(RESULTS['exact']) - len(bad)}/{len(RESULTS['exact'])} checks bit-exact"
        + ("" if not bad else "; FAILED: " + ", ".join(r["check"] for r in bad[:6])))
    for note in RESULTS["notes"][-1:]:
        log(note)
    log(f"copy: {RESULTS['copy_GBps']:.0f} GB/s")
    log(f"{'kernel':38s} {'elements':>9s} {'us':>8s} {'GB/s':>6s} {'%copy':>6s}")
    for r in RESULTS["bandwidth"]:
        log(f"{r['kernel']:38s} {r['elements']:>9d} {r['graph_ms'] * 1e3:8.1f} {r['GBps']:6.0f} {r['pct_of_copy']:6.1f}")
    log(f"{'per step':40s} {'ms':>8s} {'speedup':>8s}")
    for r in RESULTS["per_step"]:
        log(f"{r['image']}x{r['image']} b{r['batch']} {r['run']:30s} {r['ms_per_step']:8.3f} {r['speedup_vs_reference']:8.1f}")
    log(f"total {RESULTS['seconds']:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
