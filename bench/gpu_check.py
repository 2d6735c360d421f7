"""GPU check of the fused step kernels and the graphed pipeline, in one run (about 1.5-3 minutes on an H100/H200).

    python bench/gpu_check.py [--out DIR] [--quick] [--parts kernels,pipelines,hazards,threads,bandwidth,per_step]
    python bench/gpu_check.py --device cpu --quick      # a dry run: Triton's interpreter, the fake graphs, tiny sizes

1. kernels: each Triton kernel (``kve_fast.ops.step_triton``'s public ops) against the reference's torch ops
   (0-d CPU float32 scalars, as diffusers holds them), element by element: churn (gamma = 0 and > 0), Euler
   (mid and last step, float and uint8 images), Heun fused with the next churn; fast noise reproducible.
2. pipelines: kve_fast's pipeline (torch and Triton backends, eager and graphed, ``cuda_graph=True``; the CUDA
   extension too where it is built) against diffusers' real ``KarrasVePipeline``: np, pil and the final latent
   (recorded from diffusers' own scheduler), the global RNG's state after the run; on models whose images stay
   inside (0, 1) (the Gaussian score plus a small UNet term). Also, graphed against eager: a callback that
   replaces the sample (its tensors too), Euler, fast noise, channels_last (against diffusers on the same
   converted model), bf16 (a converted copy and autocast).
3. hazards: what the restructured graph runner must notice between graphed calls, on real graphs: ``unet.half();
   unet.float()`` (new storages), S_noise changed (two pipelines on one UNet), a forward hook added after the
   capture: graphed = eager = diffusers after each, and each change changes the images.
4. threads: graphed calls from two threads at once on two models (each its own capture and memory pool), each
   against its eager output.
5. bandwidth (CUDA): each kernel's bytes-it-must-move / time (CUDA-graph replays) against a device-to-device
   copy measured in the same run.
6. per_step: the sampler's own per-step cost with a near-free stand-in model at 256x256 x 16 and 64x64 x 64
   (CPU: 16x16 x 2): diffusers against kve_fast (torch, Triton exact and fast, eager and graphed); n per
   issue 20's rule, min / median / max, ratios of medians in this run.

Every section runs in its own try/except; the JSON (provenance: commit, dirty flag, card, driver, versions,
command) is written after each to --out/gpu_check.json (default: $OUT, else bench/out). The last line says
PASS, FAIL (which checks and sections) or INCOMPLETE (what was skipped); exit status 0, 1 or 3.

``--device cpu``: Triton in its interpreter (``TRITON_INTERPRET=1``) and the CPU stand-in for CUDA graphs
(``KVE_FAST_FAKE_GRAPHS=1``), both set before kve_fast loads; tiny sizes; bandwidth is left out. A dry run of
this script: its numbers mean nothing. NCSN++ models' graphed fast-mode checks are left out there (with a
note): ``kve_fast/ops/fir_triton.py`` launches its kernel outside ``fake_graph.launch``, so the fake graph does
not replay it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("kernels", "pipelines", "hazards", "threads", "bandwidth", "per_step")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    ap.add_argument("--quick", action="store_true", help="fewer sizes and cases")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run (see the top)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":  # before triton and kve_fast load
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVE_FAST_FAKE_GRAPHS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kve_fast  # noqa: E402
from kve_fast import benchmark as kb  # noqa: E402
from kve_fast.precision import tf32_for_run  # noqa: E402
from kve_fast.testing import mismatches  # noqa: E402

RUN: kb.ScriptRun | None = None


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
    """Whether backend="cuda" runs here without a just-in-time build (bench/gpu_correctness.py builds it first)."""
    if device.type != "cuda":
        return False
    try:
        from kve_fast.ops import step_cuda

        step_cuda.load_ops(jit=False)
        return bool(step_cuda.has_cuda_kernels())
    except Exception as exc:  # noqa: BLE001 - not built: the cuda rows are left out, with a note
        RUN.note(f"backend 'cuda' left out: {type(exc).__name__}: {exc}")
        return False


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


# -- 2. pipelines -----------------------------------------------------------------------------------------------


def _pipe(model, config):
    pipe = kve_fast.KarrasVePipeline(model, kve_fast.KarrasVeScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CONFIG = {"sigma_min": 0.002, "sigma_max": 1.0, "s_churn": 10.0, "s_min": 0.0, "s_max": 1.0}


def check_pipelines(quick: bool, device, size: int, backends):
    """kve_fast's pipeline against diffusers' real one, eager and graphed (see the top)."""
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
        if graphs_fake() and name == "ncsnpp":
            RUN.note("ncsnpp: graphed fast-mode checks left out on the fake graphs (kve_fast/ops/fir_triton.py launches "
                     "outside fake_graph.launch: the fake graph does not replay the FIR kernel)")
            continue
        graphed_extras(name, ours, model, form, batch, steps, device)
        kve_fast.graphs.clear_graphs()


def graphs_fake() -> bool:
    return kve_fast.graphs.fake()


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


def kernel_bandwidth(sizes, device):
    from triton.testing import do_bench, do_bench_cudagraph

    from kve_fast.ops import step_triton as tr
    from kve_fast.ops.fused import NextChurn
    from kve_fast.sampler import plan_steps

    copy_bw = copy_bandwidth(device)
    steps = plan_steps(kve_fast.KarrasVeScheduler(), 8)
    st, nx = steps[3], steps[4]
    coef = (nx.noise_coef, 1.007)
    rows = RUN.result.setdefault("bandwidth", [])
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        raw, hat, nxt, d, eps = (torch.randn(n, generator=g, device=device) for _ in range(5))
        o1, o2, o3 = (torch.empty_like(hat) for _ in range(3))
        keys = torch.arange(1, 17, device=device, dtype=torch.int64)  # 16 per-sample keys (a batch of 16)
        kw = dict(denoiser=False, true_div=False)
        kernels = {  # name: (launch, bytes per element it must move)
            "churn, host noise": (lambda: tr._launch_churn(nxt, eps, None, coef, hat=o1, model_input=o2), 16),
            "churn, device noise": (lambda: tr._launch_churn(nxt, None, keys, coef, hat=o1, model_input=o2), 12),
            "euler": (lambda: tr._launch_euler(raw, hat, st.at_hat, x_next=o1, d=o2, model_input=o3, **kw), 20),
            "heun + churn, host noise": (lambda: tr._launch_heun(
                raw, hat, nxt, d, st.at_next, then=NextChurn(eps, None, coef, o1, o2), **kw), 28),
            "heun + churn, device noise": (lambda: tr._launch_heun(
                raw, hat, nxt, d, st.at_next, then=NextChurn(None, keys, coef, o1, o2), **kw), 24),
        }
        for name, (fn, bpe) in kernels.items():
            fn()
            ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            call_ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            bw = bpe * n / (ms * 1e-3) / 1e9
            rows.append({"kernel": name, "elements": n, "bytes_per_element": bpe, "graph_ms": ms, "call_ms": call_ms,
                         "GBps": bw, "pct_of_copy": 100 * bw / copy_bw})
            log(f"  {name:28s} n={n:>9d} {ms * 1e3:8.1f} us (graph) {call_ms * 1e3:8.1f} us (call) {bw:6.0f} GB/s = "
                f"{100 * bw / copy_bw:5.1f}% of copy")


# -- 6. per-step cost with a near-free stand-in model -----------------------------------------------------------


def per_step(configs, steps, device):
    from kve_fast.testing import NearFreeScore, reference_pipe

    rows = RUN.result.setdefault("per_step", [])
    for size, batch in configs:
        model = NearFreeScore(size).to(device)
        ref = reference_pipe(model)
        ours = _pipe(model, {})
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731

        def kve(backend, noise, graphed, output_type="np"):
            return lambda: ours(batch, steps, gen(), output_type=output_type, backend=backend, noise=noise,
                                cuda_graph=graphed)

        runs = {"reference (diffusers)": lambda: ref(batch, steps, gen(), output_type="np"),
                "kve_fast torch exact": kve("torch", "exact", False),
                "kve_fast triton exact": kve("triton", "exact", False),
                "kve_fast triton fast": kve("triton", "fast", False),
                "kve_fast triton exact, graphed": kve("triton", "exact", True),
                "kve_fast triton fast, graphed": kve("triton", "fast", True),
                "kve_fast triton fast, graphed, latent": kve("triton", "fast", True, "latent")}
        stats = {}
        for name, fn in runs.items():
            fn()  # the first call (a capture for the graphed runs) is not timed
            _sync(device)
            times = []
            while len(times) < kb.required_repeats(sorted(times)[len(times) // 2] if times else 0.0):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - t0)
            stats[name] = kb.time_stats(times)
        base = stats["reference (diffusers)"]["median_ms"]
        for name, s in stats.items():
            row = {"image": size, "batch": batch, "steps": steps, "run": name, "ms_per_step": s["median_ms"] / steps,
                   "min_ms_per_step": s["min_ms"] / steps, "max_ms_per_step": s["max_ms"] / steps, "n": s["n"],
                   "speedup_vs_reference": base / s["median_ms"], "times_ms": s["times_ms"]}
            rows.append(row)
            log(f"  {size}x{size} b{batch} {name:38s} {row['ms_per_step']:8.3f} ms/step (min {row['min_ms_per_step']:.3f},"
                f" max {row['max_ms_per_step']:.3f}, n={s['n']})  x{row['speedup_vs_reference']:6.1f}")
        kve_fast.graphs.clear_graphs()


@tf32_for_run(False)  # float32 throughout: TF32 off for the run, the caller's setting back after it
def main(args=None) -> int:
    global RUN
    args = args or ARGS or parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    RUN = kb.ScriptRun("gpu_check", device, args.out)
    RUN.result.update(quick=args.quick, parts=args.parts, tf32=False)
    gpu = device.type == "cuda"
    backends = ["torch", "triton"] + (["cuda"] if "pipelines" in args.parts and extension_built(device) else [])
    size = 32 if gpu else 8
    if "kernels" in args.parts:
        sizes = ([1000, 2**20 + 7] if args.quick else [1000, 2**20 + 7, 8 * 2**20 + 3]) if gpu else [1000, 4099]
        RUN.section("kernels", check_kernels, sizes, device)
    if "pipelines" in args.parts:
        RUN.section("pipelines", check_pipelines, args.quick or not gpu, device, size, backends)
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
                        [2**20, 8 * 2**20] if args.quick else [2**20, 8 * 2**20, 16 * 2**20, 48 * 2**20], device)
        else:
            RUN.skip("bandwidth", "CUDA only")
    if "per_step" in args.parts:
        configs, steps = ([(256, 16), (64, 64)], 10 if args.quick else 50) if gpu else ([(16, 2)], 3)
        RUN.section("per_step", per_step, configs, steps, device)
    return RUN.finish()


if __name__ == "__main__":
    sys.exit(main())
