"""kve_fast.k_diffusion against the real k-diffusion 0.1.1.post1 on CUDA: same bits, and the speed-up, in one run.

    python bench/kdiffusion_check.py [--quick] [--device auto|cuda|cpu] [--out DIR] [--parts scalars,exact,timing]

1. scalars: ``kve_fast.plan.KStep``'s host-computed floats (gamma, sigma_hat, the churn coefficient, dt)
   against what k-diffusion computes on the device (``sigmas[i] * (gamma + 1)``,
   ``(sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5``, ``sigmas[i + 1] - sigma_hat``) for get_sigmas_karras
   schedules (n = 10, 50, 200) under several churn settings. The Triton path relies on CPU float32 ops
   giving the same bits as CUDA's.
2. exact: ``sample_heun`` / ``sample_euler``, s_churn 0 and > 0 on part of the steps (s_tmin/s_tmax:
   steps with gamma = 0 and gamma > 0 in one run), batch 1 and 3, contiguous and channels_last (batch 3),
   sigmas on the device, a near-free denoiser (``x * 0.5``) and a small UNet denoiser (diffusers' tiny
   test UNet plus the exact Gaussian denoiser, as tests/test_k_diffusion.py builds it),
   ``torch.manual_seed(s)`` before each run: kve_fast (backend "torch", "triton", and "cuda" where the
   extension is already built, all with ``cuda_graph=False``; then "triton" (and "cuda") GRAPHED,
   ``cuda_graph=True``; each with a callback and without one, the fused path) ``torch.equal`` to
   k-diffusion's output, the callback dicts' tensors equal, and the global CUDA (and CPU) RNG states
   after the run equal. Also ``extra_args`` with a conditioning tensor (and a non-tensor value) that
   changes between calls: a new tensor, then the first one changed in place; each graphed call must
   match k-diffusion with that call's tensor (the capture is reused and reads the new values).
   Mismatches are counted element by element (count, first indices, max |diff|); never a tolerance.
   Each graphed run starts from no captures (``clear_graphs()``), must leave exactly one capture whose key
   matches it in every field (``capture_used``: model, convention, backend, device, shape, strides, noise,
   solver, callback, image, precision, FIR, extra_args, switches; an earlier case cannot stand in), and runs
   again replaying it ("(replayed)"). The channels_last case holds a contiguous call's capture beside its
   own (same model, shape and solver: only the strides differ); the extra_args calls 2 and 3 replay call 1's.
   Also: k-diffusion run twice (repeatable?). Every graphed check is tagged ``"graphed": backend`` in
   the JSON; the summary's last line says whether they allow ``kve_fast.graphs.KDIFFUSION_DEFAULT_MODE
   = "auto"`` (every graphed check bit-exact, on CUDA, nothing failed) or not.
3. timing (same run): per-step sampler overhead = (time of a call - time of its model calls alone) / steps
   with the near-free denoiser at 256x256 x 16 (3 channels), and the total time of a 50-step call with the
   small UNet at 32x32 x 1, for k-diffusion's own loop, kve_fast torch, kve_fast triton (exact noise),
   kve_fast triton noise="fast" (all eager, ``cuda_graph=False``), and "kve_fast triton graphed" and
   "triton graphed, fast noise" (``cuda_graph=True``); ratios to k-diffusion. perf_counter around each
   call with torch.cuda.synchronize() before and after. Each variant's first call (for the graphed rows:
   the capture and its warm-up included) is timed on its own ("first call" column) and is not in the
   median; then one more untimed warm-up call each, then the variants interleaved round by round,
   medians. The model calls alone are timed eagerly, so a graphed row's "overhead" (which also gains the
   model's replay) can be negative: compare its total.

Prints a markdown table last; writes kdiffusion_check.json and .md under --out (default: $OUT, else
bench/out). Each part runs in try/except, so one failure does not hide the rest; exit status 1 if any
check mismatched or any part failed. TF32 is off throughout (float32 exactness).

On the CPU (``--device cpu``; TRITON_INTERPRET=1 is set if unset, so the Triton backend runs in Triton's
interpreter) every part runs with tiny sizes: a smoke test of this script, whose timings mean nothing.
CUDA graphs do not exist there: the graphed runs use kve_fast.graphs' eager stand-in
(``KVE_FAST_FAKE_GRAPHS=1``, as tests/test_graphs_kdiffusion.py does: ``kve_fast.fake_graph`` replays what a
capture recorded and fails where a real graph would), not real capture; only a CUDA run decides
KDIFFUSION_DEFAULT_MODE.

What it needs besides kve_fast (imported from this checkout) and torch/triton:
- k-diffusion 0.1.1.post1's ``k_diffusion/sampling.py`` and ``utils.py``: from an installed k_diffusion,
  else the wheel at $KVE_FAST_K_DIFFUSION_WHEEL, else ``.whl/k_diffusion-*.whl``, else the test suite's
  cache (~/.cache/kve_fast/k-diffusion-0.1.1.post1). Loaded WITHOUT the package ``__init__`` (it imports
  k-diffusion's training stack), with torchvision stubbed; sys.modules is put back afterwards.
- sampling.py imports scipy, torchdiffeq, torchsde (needs trampoline), tqdm; utils.py imports PIL and
  safetensors. The GPU image (/work/.library/device/KINDS.md) has scipy, torchdiffeq 0.2.5, tqdm, Pillow,
  safetensors and numpy, but not torchsde, trampoline, diffusers or k-diffusion: carry them as wheels
  (all pure Python). On the development machine, in the repository root (.whl/ is git-ignored):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 diffusers==0.42.1

  (diffusers' own needs are in the GPU image; bench/device_prepare.sh fetches these.) If a needed pure-Python module still
  does not import, this script extracts its wheel from .whl/ into ~/.cache/kve_fast/wheels and puts it
  on sys.path, so it also runs without the pip step.

On the GPU machine (device tool; about 1.5 minutes with --quick, 2 to 4 minutes without, on an H100/H200;
bench/device_correctness.sh runs it with --quick among its stages):

    run(carry=[".whl"], timeout_s=420, command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
        PYTHONUNBUFFERED=1 python3 bench/kdiffusion_check.py")
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K_DIFFUSION_VERSION = "0.1.1.post1"
CACHE = Path(os.path.expanduser("~")) / ".cache" / "kve_fast"

RUN = None  # the run (bench.harness.ScriptRun): its record, checks and JSON
TABLES = {  # the record's own tables, beside the run's provenance, exact, notes and errors
    "env": {}, "scalars": [], "exact": [], "timing": [], "errors": [],
    "definitions": {
        "ms_per_call": "median wall time of one sampler call (perf_counter, cuda.synchronize before and after)",
        "model_alone_ms": "median time of the same number of model calls, with the same shapes, outside the sampler",
        "overhead_ms_per_step": "(ms_per_call - model_alone_ms) / steps: the sampler's own cost per step",
        "speedup_*_vs_k_diffusion": "k-diffusion's value / this variant's value, measured in the same run",
        "first_call_ms": "the variant's first call in this configuration, timed on its own and not in the median "
                         "(graphed rows: the capture and its warm-up included)",
        "graphed": "exact rows: the backend of a cuda_graph=True run; timing rows: whether the run is graphed "
                   "(its overhead_ms_per_step subtracts the EAGER model time, so it can be negative)",
    },
}


def log(*args):
    print(*args, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="kve_fast.k_diffusion vs the real k-diffusion 0.1.1.post1: exactness and per-step speed "
                    "(see the top of this file for the wheels to carry and the GPU command).")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="cuda (the real check), cpu (tiny sizes, Triton interpreter: a smoke test), auto")
    ap.add_argument("--quick", action="store_true", help="fewer timing configurations and repeats (< 2 min on a GPU)")
    ap.add_argument("--out", default=None, help="folder for kdiffusion_check.json/.md (default: $OUT, else bench/out)")
    ap.add_argument("--parts", default="scalars,exact,timing",
                    help="comma-separated subset of scalars,exact,timing (default: all)")
    args = ap.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = args.parts - {"scalars", "exact", "timing"}
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}")
    return args


# -- making the imports work (wheels carried in .whl/) ------------------------------------------------------


def _extract_wheel(wheel: str) -> str:
    """Extract a pure-Python wheel once into the cache; return the folder to put on sys.path."""
    dest = CACHE / "wheels" / Path(wheel).name[: -len(".whl")]
    if not dest.is_dir():
        tmp = str(dest) + f".tmp{os.getpid()}"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        os.makedirs(dest.parent, exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process got there first
            pass
    return str(dest)


def ensure_modules() -> list[str]:
    """Put carried pure-Python wheels on sys.path for modules that do not import as installed; what it did."""
    notes = []
    for module, pattern in (("trampoline", "trampoline-*.whl"), ("torchsde", "torchsde-*.whl"),
                            ("diffusers", "diffusers-*.whl")):
        if importlib.util.find_spec(module) is not None:
            continue
        wheels = sorted(glob.glob(str(ROOT / ".whl" / pattern)))
        if wheels:
            sys.path.append(_extract_wheel(wheels[-1]))
            importlib.invalidate_caches()
            notes.append(f"{module}: imported from the extracted wheel {Path(wheels[-1]).name}")
    return notes


def _k_diffusion_dir() -> tuple[str, str]:
    """(folder holding the k_diffusion package, where it came from)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is not None and spec.submodule_search_locations:
        return os.path.dirname(list(spec.submodule_search_locations)[0]), "installed"
    wheel = os.environ.get("KVE_FAST_K_DIFFUSION_WHEEL")
    if not wheel:
        found = sorted(glob.glob(str(ROOT / ".whl" / "k_diffusion-*.whl")))
        wheel = found[-1] if found else None
    if wheel:
        return _extract_wheel(wheel), f"wheel {wheel}"
    cached = CACHE / f"k-diffusion-{K_DIFFUSION_VERSION}"
    if (cached / "k_diffusion" / "sampling.py").is_file():
        return str(cached), f"test cache {cached}"
    raise RuntimeError(f"k-diffusion not found: install it, set KVE_FAST_K_DIFFUSION_WHEEL, or put "
                       f"k_diffusion-{K_DIFFUSION_VERSION}-py3-none-any.whl in .whl/ (pip download --no-deps)")


def _k_diffusion_version(root: str) -> str:
    for meta in glob.glob(os.path.join(root, "k_diffusion-*.dist-info", "METADATA")):
        for line in open(meta, encoding="utf-8"):
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def load_real_sampling():
    """k-diffusion's own ``sampling`` module, without its package ``__init__`` (torchvision stubbed).

    The loader is ``kve_fast.testing.import_k_diffusion_sampling``, which the tests use too.
    """
    root, source = _k_diffusion_dir()
    from kve_fast.testing import import_k_diffusion_sampling

    sampling = import_k_diffusion_sampling(root)
    version = _k_diffusion_version(root)
    RUN.result["env"]["k_diffusion"] = {"version": version, "source": source, "file": sampling.__file__}
    if version != K_DIFFUSION_VERSION:
        RUN.note(f"k-diffusion version {version}, not {K_DIFFUSION_VERSION}")
    log(f"k-diffusion {version} from {source}: {sampling.__file__}")
    return sampling


# -- element-by-element comparison ------------------------------------------------------------------------


def compare(actual, expected) -> dict:
    """Exact comparison: mismatch count, first indices, max |diff| (NaN where the reference has NaN matches)."""
    import torch

    a, e = actual, expected
    if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
        return {"elements": 1, "mismatches": 0 if a == e else 1, "note": f"{a!r} vs {e!r}"}
    info = {"elements": e.numel()}
    if a.shape != e.shape or a.dtype != e.dtype:
        info.update(mismatches=-1, note=f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(e.shape)} {e.dtype}")
        return info
    if a.device != e.device:
        info["note"] = f"device {a.device} vs {e.device}"
    a, e = a.detach().cpu(), e.detach().cpu()
    if torch.equal(a, e):
        info["mismatches"] = 0
        return info
    diff = a != e
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(e))
    bad = int(diff.sum())
    info["mismatches"] = bad
    if bad:
        info["first"] = diff.nonzero()[:3].tolist()
        d = (a.double() - e.double()).abs()[diff]
        info["max_abs_diff"] = float(d.max()) if d.numel() else float("nan")
    return info


def record(table: str, name: str, info: dict, graphed: str | None = None):
    """One check into the record's ``table``; ``graphed``: the backend of a ``cuda_graph=True`` run (counted for the
    KDIFFUSION_DEFAULT_MODE decision)."""
    info = dict(info)
    if graphed:
        info["graphed"] = graphed
    elements, bad = info.pop("elements"), info.pop("mismatches")
    RUN.exact(name, elements, bad, table=table, **info)
    if bad:
        log(f"      first at {info.get('first')} max |diff| {info.get('max_abs_diff', float('nan')):g}")


# -- models ---------------------------------------------------------------------------------------------


def make_model(name, device, size):
    """"near-free": x * 0.5; "unet": the Gaussian denoiser + 0.05 * diffusers' tiny test UNet (sample_size ``size``)."""
    import torch
    from diffusers import UNet2DModel

    from kve_fast import k_diffusion as kd
    from kve_fast.oracle import GaussianScore

    class NearFree(torch.nn.Module):
        """A near-free denoiser: one elementwise kernel per call (a real op, so the call is not empty)."""

        def forward(self, x, sigma):
            return x * 0.5

    def reference_test_unet(sample_size: int):
        """The tiny UNet of diffusers' own KarrasVePipeline tests (tests/conftest.py)."""
        torch.manual_seed(0)
        return UNet2DModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size, in_channels=3, out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        ).eval()

    class UNetDenoiser(torch.nn.Module):
        """As tests/test_k_diffusion.py: the exact Gaussian denoiser plus a small multiple of a random UNet."""

        def __init__(self, sample_size):
            super().__init__()
            self.gauss = GaussianScore.random(channels=3, size=sample_size, std=(0.15, 0.15))
            self.unet = reference_test_unet(sample_size)

        def forward(self, x, sigma, scale=0.05):
            return kd.score_to_denoiser(self.gauss)(x, sigma) + scale * self.unet(x, sigma).sample

    if name == "near-free":
        return NearFree().to(device)
    return UNetDenoiser(size).to(device).eval()


# -- 1. host scalars against the device's -----------------------------------------------------------------


def check_scalars(real, device, quick):
    import torch

    from kve_fast.plan import kdiffusion_plan

    schedules = [(10, 0.002, 80.0), (50, 0.002, 80.0), (200, 0.002, 80.0), (50, 0.02, 40.0), (200, 0.1, 10.0),
                 (10, 0.03, 150.0)]
    churns = [(0.0, 0.0, float("inf")), (1.0, 0.0, float("inf")), (7.0, 0.05, 50.0), (40.0, 0.05, 10.0),
              (80.0, 0.0, float("inf")), (13.7, 0.3, 20.0)]
    for n, lo, hi in schedules:
        sigmas = real.get_sigmas_karras(n, lo, hi, device=device)
        for s_churn, s_tmin, s_tmax in churns:
            plan = kdiffusion_plan(sigmas, s_churn, s_tmin, s_tmax)
            g_host, g_dev, hat_host, hat_dev, c_host, c_dev, dt_host, dt_dev = ([] for _ in range(8))
            for i in range(len(sigmas) - 1):
                # k-diffusion's own lines (sampling.py, sample_heun), on the sigmas' device
                gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
                sigma_hat = sigmas[i] * (gamma + 1)
                step = plan[i]
                g_host.append(step.gamma)
                g_dev.append(gamma)
                hat_host.append(step.at_hat.sigma)
                hat_dev.append(sigma_hat)
                if gamma > 0:
                    c_host.append(step.noise_coef)
                    c_dev.append((sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5)
                dt_host.append(step.at_hat.dt)
                dt_dev.append(sigmas[i + 1] - sigma_hat)
            name = f"karras n={n} [{lo}, {hi}] s_churn={s_churn} s_tmin={s_tmin} s_tmax={s_tmax}"
            record("scalars", f"{name} gamma", compare(torch.tensor(g_host, dtype=torch.float64),
                                                      torch.tensor(g_dev, dtype=torch.float64)))
            for what, host, dev in (("sigma_hat", hat_host, hat_dev), ("churn coefficient", c_host, c_dev),
                                    ("dt", dt_host, dt_dev)):
                if not host:
                    continue
                # float64 on both sides: a host value that is not exactly the device's float32 value shows
                expected = torch.stack(dev).cpu()
                assert expected.dtype == torch.float32, expected.dtype
                record("scalars", f"{name} {what} ({len(host)} steps)",
                       compare(torch.tensor(host, dtype=torch.float64), expected.double()))
            RUN.result["scalars"][-1]["gamma_positive_steps"] = len(c_host)


# -- 2. whole samplers against k-diffusion -----------------------------------------------------------------


def rng_states(device):
    import torch

    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def extension_built(device) -> bool:
    """Whether backend="cuda" can run here without a just-in-time build (the extension is loaded or installed:
    ``setup.py build_ext --inplace``). A JIT build would take minutes of this script's slot, so none is made."""
    if device.type != "cuda":
        return False
    try:
        from kve_fast.ops import step_cuda

        step_cuda.load_ops(jit=False)  # loads kve_fast._C if it is there; never builds
        return bool(step_cuda.has_cuda_kernels())
    except Exception as exc:  # noqa: BLE001 - no extension: the cuda rows are left out
        RUN.note(f"backend 'cuda' left out of the exact part: {type(exc).__name__}: {exc}")
        return False


def capture_used(model, x, backend: str, solver: str, hand_out: bool, noise: str = "exact", extra_args=None) -> str:
    """"" if kve_fast.graphs holds exactly one capture whose key matches this run in every field (the model,
    k-diffusion's convention, the backend, device, shape, strides, noise, solver, callback or not, no image,
    float32, diffusers' FIR ops, extra_args' signature, the global switches), else why not (a cuda_graph=True run
    that silently ran eagerly leaves none; a key field this check does not know is reported, so a new field
    cannot go unchecked)."""
    import torch

    from kve_fast import fake_graph, graphs
    from kve_fast.precision import Precision
    from kve_fast.spec import resolve_device

    want = {"model": id(model), "convention": "k-diffusion", "backend": backend,
            "device": str(resolve_device(x.device)), "shape": tuple(x.shape),
            "strides": tuple(torch.empty_like(x).stride()), "noise": noise, "solver": solver, "hand_out": hand_out,
            "image": None, "precision": Precision(), "fir": "diffusers",
            "extra": graphs.extra_signature(extra_args or {}), "switches": dict(fake_graph.switches())}

    def norm(key, value):
        if key == "convention":
            return getattr(value, "name", value)
        if key == "device":
            return str(value)
        if key in ("shape", "strides"):
            return tuple(value)
        return value

    entries = graphs.graph_info()["entries"]
    unknown = sorted({k for e in entries for k in e} - set(want) - {"graphs"})
    if unknown:
        return f"the capture key has fields this check does not know: {unknown}"
    found = [e for e in entries if all(norm(k, e.get(k)) == v for k, v in want.items())]
    if len(found) == 1:
        return ""
    if not found:
        near = [{k: norm(k, e.get(k)) for k in want if norm(k, e.get(k)) != want[k]} for e in entries]
        return f"no capture matches this run in every key field (the {len(entries)} held differ in: {near})"
    return f"{len(found)} captures match this run"


def graphed_error(where: str, exc: BaseException):
    RUN.failed(where, exc, graphed=True)


def run_variants(real, sampler, model, x, sigmas, seed, case, runs, extra_args=None, before_graphed=None, clear=True,
                 **churn):
    """k-diffusion (with a callback, then again without: repeatable?), then each of ``runs`` =
    [(label, kwargs, graphed backend or None)] with and without a callback, against it. Graphed backends: the
    captures are cleared first (then ``before_graphed(kwargs, with_callback)`` runs for both callback settings,
    if given: calls that leave other captures beside this run's), each run must leave one capture matching it
    in every key field (``capture_used``), and then runs again, replaying it, against the same output.
    ``clear`` False: the captures of an earlier call are kept, and the graphed runs must replay them (extra_args:
    a new tensor, the same key)."""
    import torch

    from kve_fast import graphs
    from kve_fast import k_diffusion as kd

    solver = sampler.split("_", 1)[1]
    seen = {"real": [], "ours": []}

    def recorder(key):
        return lambda d: seen[key].append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})

    torch.manual_seed(seed)
    expected = getattr(real, sampler)(model, x, sigmas, extra_args=extra_args, callback=recorder("real"),
                                      disable=True, **churn)
    states = rng_states(x.device)
    torch.manual_seed(seed)
    again = getattr(real, sampler)(model, x, sigmas, extra_args=extra_args, disable=True, **churn)
    record("exact", f"{case}: k-diffusion repeatable", compare(again, expected))
    outputs = {}
    for name, kwargs, graphed in runs:
        if graphed and clear:
            graphs.clear_graphs()  # this case's captures only: an earlier case cannot stand in
            if before_graphed is not None:
                for with_cb in (True, False):
                    before_graphed(kwargs, with_cb)
        for with_cb in (True, False):
            for replay in ((False, True) if graphed else (False,)):
                label = f"{case}: {name}{' +callback' if with_cb else ''}{' (replayed)' if replay else ''}"
                seen["ours"] = []
                try:
                    held = graphs.graph_info()["captures"]
                    torch.manual_seed(seed)
                    got = getattr(kd, sampler)(model, x, sigmas, extra_args=extra_args, disable=True,
                                               callback=recorder("ours") if with_cb else None, **kwargs, **churn)
                    after = rng_states(x.device)
                    if graphed:
                        why = capture_used(model, x, graphed, solver, with_cb, extra_args=extra_args)
                        if not why and (replay or not clear) and graphs.graph_info()["captures"] != held:
                            why = f"the replay made another capture ({held} held before it)"
                        if why:
                            raise RuntimeError(f"cuda_graph=True: {why}")
                except Exception as exc:  # noqa: BLE001 - one run's failure must not hide the others
                    if graphed:
                        graphed_error(f"exact {label}", exc)
                        continue
                    raise
                outputs[(name, with_cb, replay)] = got
                record("exact", f"{label} output", compare(got, expected), graphed)
                for dev_name, state in states.items():
                    record("exact", f"{label} {dev_name} RNG state after", compare(after[dev_name], state), graphed)
                if with_cb:
                    check_callbacks(label, seen["ours"], seen["real"], graphed)
    return expected, outputs


def variant_runs(device, extension: bool):
    """[(label, sampler kwargs, graphed backend or None)]: the eager backends, then the graphed ones."""
    eager = ["torch", "triton"] + (["cuda"] if extension else [])
    graphed = ["triton"] + (["cuda"] if extension else [])
    return ([(b, {"backend": b, "cuda_graph": False}, None) for b in eager]
            + [(f"{b} graphed", {"backend": b, "cuda_graph": True}, b) for b in graphed])


def check_exact(real, device, sizes, steps):
    import torch

    from kve_fast import graphs

    churn_on = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.007}
    models = {name: make_model(name, device, size) for name, size in sizes.items()}
    extension = extension_built(device)
    runs = variant_runs(device, extension)
    log(f"  runs: {', '.join(r[0] for r in runs)}" + ("" if extension or device.type != "cuda" else
        " (backend 'cuda' left out: the extension is not built, and a just-in-time build is not made here)"))
    graphs.clear_graphs()
    seed = 0
    for sampler in ("sample_heun", "sample_euler"):
        for model_name, model in models.items():
            size = sizes[model_name]
            for churn_name, churn in (("s_churn=0", {}), ("s_churn=40 [0.05, 10]", churn_on)):
                for batch, layout in ((1, "contiguous"), (3, "contiguous"), (3, "channels_last")):
                    seed += 1
                    case = f"{sampler} {model_name} {size}x{size} b{batch}{' ' + layout if batch > 1 else ''} " \
                           f"{churn_name}"
                    sigmas = real.get_sigmas_karras(steps, 0.02, 40.0, device=device)
                    if churn:
                        s = sigmas[:-1].cpu()
                        pos = int(((s >= churn["s_tmin"]) & (s <= churn["s_tmax"])).sum())
                        case += f" ({pos} of {steps} steps gamma > 0)"
                    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
                    x = x * sigmas[0]
                    if layout == "channels_last":
                        x = x.to(memory_format=torch.channels_last)
                    before = None
                    if layout == "channels_last":
                        # a contiguous call's capture (same model, shape, solver) held beside this run's: the
                        # channels_last run must capture for its own strides, not replay that one
                        case = case.replace(" channels_last", " channels_last (a contiguous capture held too)")

                        def contiguous_first(kwargs, with_cb, xc=x.contiguous(), sampler=sampler, model=model,
                                             sigmas=sigmas, churn=churn):
                            from kve_fast import k_diffusion as kd

                            getattr(kd, sampler)(model, xc, sigmas, disable=True,
                                                 callback=(lambda d: None) if with_cb else None, **kwargs, **churn)

                        before = contiguous_first
                    try:
                        run_variants(real, sampler, model, x, sigmas, seed, case, runs, before_graphed=before, **churn)
                    except Exception as exc:  # noqa: BLE001 - one case's failure must not hide the others
                        RUN.failed(f"exact {case}", exc)
    check_extra_args(real, device, sizes["unet"], steps, churn_on, models["unet"], runs)


def check_extra_args(real, device, size, steps, churn, base, runs):
    """``extra_args={"cond": tensor, "weight": 0.5}`` on a conditioned denoiser, three calls per sampler: the
    first tensor, a new tensor (same shape: the capture is reused and must read the new values), then the
    first tensor changed in place. Each against k-diffusion with that call's tensor."""
    import torch

    from kve_fast import graphs

    class Conditioned(torch.nn.Module):
        """The small UNet denoiser plus a conditioning image (k-diffusion passes extra_args as keywords)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, sigma, cond=None, weight=1.0):
            out = self.inner(x, sigma)
            return out if cond is None else out + (0.2 * weight) * cond

    model = Conditioned(base)
    batch = 2
    sigmas = real.get_sigmas_karras(steps, 0.02, 40.0, device=device)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device) * sigmas[0]
    cond_a = torch.randn(batch, 3, size, size, generator=gen).to(device)
    cond_b = torch.randn(batch, 3, size, size, generator=gen).to(device)
    def held():  # the capture objects held now (is the same capture reused across calls?)
        return sorted(id(c) for c in getattr(graphs, "_CACHE", {}).values())

    for sampler in ("sample_heun", "sample_euler"):
        graphs.clear_graphs()
        results = []
        captures = []
        for call, (what, cond) in enumerate((("cond A", cond_a), ("cond B (a new tensor)", cond_b),
                                             ("cond A changed in place", None))):
            if cond is None:
                cond_a.mul_(-0.5).add_(0.25)  # the same tensor object, new values
                cond = cond_a
            case = f"{sampler} unet {size}x{size} b{batch} extra_args call {call + 1}: {what}"
            try:
                expected, _ = run_variants(real, sampler, model, x, sigmas, 500 + call, case, runs,
                                           extra_args={"cond": cond, "weight": 0.5}, clear=call == 0, **churn)
                results.append(expected)
            except Exception as exc:  # noqa: BLE001
                RUN.failed(f"exact {case}", exc)
            captures.append(held())
        if len(results) == 3:
            differ = not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])
            reused = len(captures) == 3 and captures[0] == captures[1] == captures[2] and bool(captures[0])
            RUN.note(f"{sampler} extra_args: k-diffusion's outputs differ between the three conditioning tensors: "
                     f"{differ} (else these checks would be vacuous); calls 2 and 3 replayed call 1's captures "
                     f"({len(captures[0])}): {reused}")
            if not differ:
                RUN.failed(f"exact {sampler} extra_args", RuntimeError(
                    "the conditioning tensor does not change k-diffusion's output: the extra_args checks test nothing"),
                    graphed=True)


def check_callbacks(label, ours, real, graphed=None):
    if len(ours) != len(real):
        record("exact", f"{label} callback count", {"elements": len(real), "mismatches": abs(len(ours) - len(real)),
                                                    "note": f"{len(ours)} calls vs {len(real)}"}, graphed)
        return
    totals = {key: {"elements": 0, "mismatches": 0} for key in ("keys/i", "x", "sigma", "sigma_hat", "denoised")}
    for step, (a, b) in enumerate(zip(ours, real)):
        same_keys = sorted(a) == sorted(b) and a.get("i") == b.get("i") == step
        totals["keys/i"]["elements"] += 1
        totals["keys/i"]["mismatches"] += 0 if same_keys else 1
        for key in ("x", "sigma", "sigma_hat", "denoised"):
            if key not in a or key not in b:
                continue
            info = compare(a[key], b[key])
            t = totals[key]
            t["elements"] += info["elements"]
            if info["mismatches"]:
                t["mismatches"] += info["mismatches"] if info["mismatches"] > 0 else info["elements"]
                t.setdefault("first", [step] + [info.get("first")])
                t["max_abs_diff"] = max(t.get("max_abs_diff", 0.0), info.get("max_abs_diff", float("nan")))
            if info.get("note") and "note" not in t:
                t["note"] = f"step {step}: {info['note']}"
    for key, t in totals.items():
        record("exact", f"{label} callback {key} ({len(real)} steps)", t, graphed)


# -- 3. timing -------------------------------------------------------------------------------------------


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict, reps: int, device) -> dict:
    """One warm-up call each, then ``reps`` rounds calling each variant once; seconds per call, all of them."""
    import torch

    for fn in fns.values():
        torch.manual_seed(0)
        fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.manual_seed(0)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def timing(real, device, configs, reps_free, reps_unet):
    for cfg in configs:
        try:
            time_config(real, device, cfg, reps_free, reps_unet)
        except Exception as exc:  # noqa: BLE001 - one configuration's failure must not hide the others
            RUN.failed(f"timing {cfg[0]}", exc)


GRAPHED_VARIANTS = {"kve_fast triton graphed": "triton", "triton graphed, fast noise": "triton"}


def timing_variants(real, sampler: str, model, x, sigmas, churn: dict) -> dict:
    """name: one call of k-diffusion's loop or of kve_fast's drop-in (torch, triton, fast noise, graphed)."""
    from kve_fast import k_diffusion as kd

    def ours(backend, noise="exact", graphed=False):
        return lambda: getattr(kd, sampler)(model, x, sigmas, disable=True, backend=backend, noise=noise,
                                            cuda_graph=graphed, **churn)

    return {"k-diffusion": lambda: getattr(real, sampler)(model, x, sigmas, disable=True, **churn),
            "kve_fast torch": ours("torch"), "kve_fast triton": ours("triton"),
            "kve_fast triton fast": ours("triton", "fast"), "kve_fast triton graphed": ours("triton", graphed=True),
            "triton graphed, fast noise": ours("triton", "fast", graphed=True)}


def first_calls(label: str, variants: dict, device) -> tuple[dict, dict]:
    """Each variant's first call, timed on its own (graphed: capture and warm-up included; not in the medians):
    (outputs, seconds). A graphed variant's failure is recorded and does not hide the eager rows."""
    import torch

    outs, first = {}, {}
    for name, fn in variants.items():
        torch.manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        try:
            outs[name] = fn()
        except Exception as exc:  # noqa: BLE001
            if name not in GRAPHED_VARIANTS:
                raise
            graphed_error(f"timing {label}: {name}", exc)
            continue
        sync(device)
        first[name] = time.perf_counter() - t0
    return outs, first


def check_first_outputs(label: str, outs: dict, model, x, sampler: str) -> None:
    """The first calls' outputs against k-diffusion's at this size (fast noise: graphed = eager), and each graphed
    variant's capture."""
    import torch

    for name in ("kve_fast torch", "kve_fast triton", "kve_fast triton graphed"):
        if name in outs:
            record("exact", f"timing config {label}: {name} output", compare(outs[name], outs["k-diffusion"]),
                   GRAPHED_VARIANTS.get(name))
    if "triton graphed, fast noise" in outs:  # fast noise is not k-diffusion's stream: graphed = eager
        record("exact", f"timing config {label}: triton graphed, fast noise output = eager fast noise's",
               compare(outs["triton graphed, fast noise"], outs["kve_fast triton fast"]), "triton")
    for name in [n for n in GRAPHED_VARIANTS if n in outs]:
        noise = "fast" if "fast" in name else "exact"
        why = capture_used(model, x, "triton", sampler.split("_", 1)[1], False, noise)
        if why:
            graphed_error(f"timing {label}: {name}", RuntimeError(f"cuda_graph=True: {why}"))
    RUN.note(f"{label}: fast-noise output finite: {bool(torch.isfinite(outs['kve_fast triton fast']).all())}")


def time_config(real, device, cfg, reps_free, reps_unet):
    import torch

    from kve_fast.benchmark.provenance import required_repeats

    label, model_name, size, batch, steps, sampler, churn = cfg
    model = make_model(model_name, device, size)
    sigmas = real.get_sigmas_karras(steps, 0.002, 80.0, device=device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * sigmas[0]
    variants = timing_variants(real, sampler, model, x, sigmas, churn)
    log(f"  {label}: {sampler} {model_name} {size}x{size} x {batch}, {steps} steps, {churn or 's_churn=0'}")
    outs, first = first_calls(label, variants, device)
    check_first_outputs(label, outs, model, x, sampler)
    variants = {name: fn for name, fn in variants.items() if name in outs}
    del outs
    # the model calls alone, with the noise levels the sampler would pass (precomputed)
    s_in = x.new_ones([batch])
    n_calls = 2 * steps - 1 if sampler == "sample_heun" else steps
    levels = ([sigmas[i] * s_in for i in range(steps)] + [sigmas[i + 1] * s_in for i in range(steps - 1)])[:n_calls]

    def model_only():
        for lv in levels:
            model(x, lv)

    reps = reps_unet if model_name == "unet" else reps_free
    reps = max(reps, required_repeats(min(first.values())))  # the repeat rule: >= 5 calls where one is under 2 s, else >= 3
    with torch.no_grad():
        times = time_rounds({**variants, "model calls alone": model_only}, reps, device)
    timing_rows(cfg, times, first, n_calls)


def timing_rows(cfg, times: dict, first: dict, n_calls: int) -> None:
    """Each variant's row: ms per call, its overhead per step over the model calls alone, ratios to k-diffusion."""
    label, model_name, size, batch, steps, sampler, churn = cfg
    med = {name: statistics.median(ts) for name, ts in times.items()}
    model_s = med.pop("model calls alone")
    base_total = med["k-diffusion"]
    base_over = (base_total - model_s) / steps
    for name, total in med.items():
        over = (total - model_s) / steps
        row = {"config": label, "sampler": sampler, "model": model_name, "image": size, "batch": batch,
               "steps": steps, "churn": churn, "variant": name, "graphed": name in GRAPHED_VARIANTS,
               "model_calls": n_calls, "first_call_ms": first[name] * 1e3,
               "ms_per_call": total * 1e3, "ms_per_call_all": [t * 1e3 for t in times[name]],
               "min_ms": min(times[name]) * 1e3, "max_ms": max(times[name]) * 1e3, "n": len(times[name]),
               "model_alone_ms": model_s * 1e3, "model_alone_ms_all": [t * 1e3 for t in times["model calls alone"]],
               "overhead_ms_per_step": over * 1e3,
               "speedup_total_vs_k_diffusion": base_total / total,
               "speedup_overhead_vs_k_diffusion": base_over / over if over > 0 else float("nan")}
        RUN.result["timing"].append(row)
        log(f"    {name:26s} {total * 1e3:9.2f} ms/call  overhead {over * 1e3:8.3f} ms/step  "
            f"x{row['speedup_total_vs_k_diffusion']:5.2f} total  x{row['speedup_overhead_vs_k_diffusion']:6.1f} "
            f"overhead  first call {first[name] * 1e3:.1f} ms  (model alone {model_s * 1e3:.2f} ms, {n_calls} calls)")


# -- report ----------------------------------------------------------------------------------------------


def summary_markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"## kdiffusion_check: {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('date')}", "", f"Command: `{env.get('command')}`", ""]
    for table in ("scalars", "exact"):
        rows = result[table]
        bad = [r for r in rows if r["mismatches"] != 0]
        lines.append(f"- {table}: {len(rows) - len(bad)} of {len(rows)} checks bit-exact"
                     + ("" if not bad else "; MISMATCHED: " + "; ".join(
                         f"{r['check']} ({r['mismatches']} of {r['elements']}, first {r.get('first')}, "
                         f"max |diff| {r.get('max_abs_diff')})" for r in bad[:8])))
    lines += [f"- FAILED {e['part']}: {e['error']}" for e in result["errors"]]
    lines += [f"- note: {n}" for n in result["notes"]]
    if result["timing"]:
        lines += ["", "| config | variant | ms per call | first call, ms (graphed: incl. capture) | model alone, ms "
                      "| overhead ms/step | vs k-diffusion (total) | vs k-diffusion (overhead) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["timing"]:
            lines.append(f"| {r['config']} | {r['variant']} | {r['ms_per_call']:.2f} | {r['first_call_ms']:.1f} | "
                         f"{r['model_alone_ms']:.2f} | {r['overhead_ms_per_step']:.3f} | "
                         f"{r['speedup_total_vs_k_diffusion']:.2f}x | {r['speedup_overhead_vs_k_diffusion']:.1f}x |")
        if any(r.get("graphed") for r in result["timing"]):
            lines.append("")
            lines.append("Graphed rows: the model calls are replayed too, while \"model alone\" is timed eagerly, so "
                         "their overhead can be negative; compare totals.")
    lines += ["", graphs_verdict(result)]
    return "\n".join(lines)


def graphs_verdict(result: dict) -> str:
    """The line that says whether kve_fast.graphs.KDIFFUSION_DEFAULT_MODE can be "auto"."""
    rows = [r for r in result["exact"] if r.get("graphed")]
    good = [r for r in rows if r["mismatches"] == 0]
    by_backend = {}
    for r in rows:
        n, m = by_backend.get(r["graphed"], (0, 0))
        by_backend[r["graphed"]] = (n + (r["mismatches"] == 0), m + 1)
    split = ", ".join(f"{b} {n} of {m}" for b, (n, m) in sorted(by_backend.items()))
    errors = result["errors"]
    graphed_errors = [e for e in errors if e.get("graphed")]
    real_cuda = result["env"].get("device", "").startswith("cuda") and not result["env"].get("fake_graphs")
    if not real_cuda:
        verdict, why = "keep False", ("CPU run: the CPU stand-in for CUDA graphs (KVE_FAST_FAKE_GRAPHS=1), not real "
                                      "capture; only a CUDA run decides")
    elif not rows:
        verdict, why = "keep False", "no graphed check ran"
    elif len(good) != len(rows):
        verdict, why = "keep False", f"{len(rows) - len(good)} graphed checks mismatched"
    elif errors:
        verdict, why = "keep False", (f"{len(errors)} parts/cases failed ({len(graphed_errors)} of them graphed runs): "
                                      "see the FAILED lines")
    else:
        verdict, why = "set kve_fast.graphs.KDIFFUSION_DEFAULT_MODE = 'auto'", "every graphed check bit-exact on CUDA"
    return (f"**graphed k-diffusion: {len(good)} of {len(rows)} checks bit-exact"
            f"{f' ({split})' if split else ''} → {verdict}** ({why})")


# -- the run ---------------------------------------------------------------------------------------------


def record_env(args, device) -> None:
    """The run's own facts beside its provenance: the device, the graph modes, the settings."""
    import torch

    from kve_fast import graphs

    prov = RUN.provenance
    RUN.result["env"].update({
        "device": str(device), "device_name": prov["card"] or platform.processor() or "cpu", "torch": prov["torch"],
        "cuda": prov["cuda"], "python": prov["python"], "date": prov["date_utc"], "command": prov["command"],
        "quick": args.quick, "tf32": False, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "fake_graphs": graphs.fake(), "KDIFFUSION_DEFAULT_MODE": graphs.KDIFFUSION_DEFAULT_MODE,
        "graphs_DEFAULT_MODE": graphs.DEFAULT_MODE, "KVE_FAST_CUDA_GRAPH": os.environ.get("KVE_FAST_CUDA_GRAPH"),
        "triton": prov["triton"], "diffusers": prov["diffusers"], "kve_fast_commit": prov["commit"]})
    if device.type == "cuda":
        RUN.result["env"]["cpu_threads"] = torch.get_num_threads()


def timing_configs(gpu: bool, quick: bool) -> tuple[list, int, int]:
    """(configurations, repeats with the near-free model, repeats with the UNet) of the timing part."""
    churn = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    if not gpu:  # a smoke test of the code path: tiny, meaningless numbers
        RUN.note("CPU run: tiny sizes, Triton in its interpreter; the timings mean nothing")
        return ([("cpu smoke near-free 16x16 x2 heun churn", "near-free", 16, 2, 4, "sample_heun", churn),
                 ("cpu smoke unet 8x8 x1 euler", "unet", 8, 1, 3, "sample_euler", {})], 3, 3)  # raised to the rule
    free = [("near-free 256x256 x16 heun", "near-free", 256, 16, 50, "sample_heun", {}),
            ("near-free 256x256 x16 heun churn", "near-free", 256, 16, 50, "sample_heun", churn)]
    unet = [("unet 32x32 x1 heun", "unet", 32, 1, 50, "sample_heun", {})]
    if not quick:
        free += [("near-free 256x256 x16 euler", "near-free", 256, 16, 50, "sample_euler", {}),
                 ("near-free 64x64 x64 heun", "near-free", 64, 64, 50, "sample_heun", {})]
        unet += [("unet 32x32 x1 heun churn", "unet", 32, 1, 50, "sample_heun", churn)]
    return free + unet, (5 if quick else 11), 5  # at least the repeat rule


def run_parts(args, real, device) -> None:
    gpu = device.type == "cuda"
    if "scalars" in args.parts:
        RUN.section("scalars: KStep's host floats vs k-diffusion's device ops", check_scalars, real, device, args.quick)
    if "exact" in args.parts:
        sizes, steps = ({"near-free": 64, "unet": 32}, 12) if gpu else ({"near-free": 8, "unet": 8}, 5)
        RUN.section("exact: kve_fast.k_diffusion vs k-diffusion", check_exact, real, device, sizes, steps)
        log(f"\n{graphs_verdict(RUN.result)} (so far)")
    if "timing" in args.parts:
        configs, reps_free, reps_unet = timing_configs(gpu, args.quick)
        RUN.section("timing: per-step overhead and total per call", timing, real, device, configs, reps_free,
                    reps_unet)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton backend runs on the CPU
    sys.path.insert(0, str(ROOT))
    notes = ensure_modules()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kdiffusion_check.py: --device cuda but torch sees no CUDA GPU")
    device = torch.device(args.device)
    from kve_fast.precision import tf32_for_run

    with tf32_for_run(False):  # float32 throughout; the caller's setting back after the run
        return _run(args, device, notes)


def _run(args, device, notes: list[str]) -> int:
    """``main`` after its arguments: the run, its parts, its files."""
    global RUN
    from bench.harness import ScriptRun

    gpu = device.type == "cuda"
    if not gpu:  # CUDA graphs do not exist on the CPU: the graphed runs use kve_fast's stand-in
        os.environ["KVE_FAST_FAKE_GRAPHS"] = "1"
    RUN = ScriptRun("kdiffusion_check", device, args.out or os.environ.get("OUT") or str(ROOT / "bench" / "out"))
    RUN.result.update(copy.deepcopy(TABLES))
    for note in notes:
        RUN.note(note)
    if gpu and os.environ.get("TRITON_INTERPRET") == "1":
        RUN.note("TRITON_INTERPRET=1 on a CUDA run: the Triton timings are meaningless")
    if not gpu:
        RUN.note("CPU run: the graphed runs (cuda_graph=True) use kve_fast.fake_graph's CPU stand-in for CUDA graphs "
                 "(KVE_FAST_FAKE_GRAPHS=1): it replays what a capture recorded and fails where a real graph would, but "
                 "it is not real capture")
    record_env(args, device)
    real = RUN.section("load k-diffusion", load_real_sampling)
    if real is not None:
        run_parts(args, real, device)
    return RUN.finish(markdown=summary_markdown)


if __name__ == "__main__":
    sys.exit(main())
