"""Low precision's accuracy table: how far fp32, TF32, bf16 and fp16 runs land from a float64 run.

    python bench/precision_check.py [--device auto|cuda|cpu] [--quick] [--out DIR] [--cases a,b] [--batch N]

For each case (a model, a schedule, a step count, a batch), every run uses the same seed and the
reference's noise stream, and is compared per image with the sampler's float64 twin
(``tests/test_accuracy.py``'s ``algorithm2``: state, scalars and a float64 copy of the model in
float64): the RMS over pixels of the final sample ([-1, 1] space), reported as mean / max over the
batch. Columns (on CUDA, kve_fast's fast modes run NCSN++ FIR blocks on its Triton kernel, so the
NCSN++ rows measure that too):

- ``fp32``: kve_fast as is (backend "auto": Triton on CUDA; CUDA graphs as by default);
- ``TF32``: kve_fast with ``tf32=True`` (TF32 matmuls and convolutions; a no-op on the CPU);
- ``bf16`` / ``fp16``: kve_fast with the model converted (``model.to(dtype)``, ``unet_dtype=None``);
- ``bf16 autocast`` / ``fp16 autocast``: the float32 model with ``unet_dtype=dtype`` (``torch.autocast``);
- ``plain TF32`` / ``plain bf16`` / ``plain fp16``: "PyTorch's own op in that dtype", the yardstick of
  flash-attention's rule: the same float32 loop (``algorithm2`` in float32) with TF32 switched on, or
  with the model run the plain way (a converted copy, input cast to the dtype, output cast back to
  float32), as a user would write it by hand around diffusers' pipeline.

A second table checks the rule: each kve_fast low-precision column against its plain column, mean and
max, at most 2x (``YARDSTICK_FACTOR``); TF32 against plain TF32 likewise. Also checked per case: the float32
loop equals kve_fast's float32 run (max |diff| <= 1e-5; the twin is the sampler), and float32 lands within
1e-4 RMS (mean over the batch) of float64. Exit status 1 if a check fails or a run raises (each run is in
its own try/except, so one failure does not hide the rest).

Cases: those of tests/test_accuracy.py (the exact Gaussian score over 300 steps; Gaussian + diffusers'
test UNet; Gaussian + a small NCSN++; the bundled digits model on the paper's schedule), plus
``digits-default`` (the reference schedule, 30 steps: bf16-sized perturbations send some trajectories
to another digit there, so its max mostly measures that chaos) and, without --quick on a GPU,
``ncsnpp32+gaussian`` (graph_bench's 61.9 M NCSN++ at 32x32, random weights, plus the Gaussian score so
images stay in range). Batches: 64 on a GPU (32 with --quick); on the CPU tiny ones (fp16 convolutions
are slow on CPUs), so ``--device cpu --quick`` is a smoke test of the script (under a minute) whose
numbers still mean what they say.

Writes precision_check.json (every per-image distance, settings, environment) and precision_check.md
(the tables) under --out (default: $OUT, else bench/out), and prints the markdown last.

On the GPU machine (no network, no diffusers: carry the wheel; bench/device_prepare.sh downloads it),
about 1 to 2 minutes on an H100 with --quick, 2 to 4 without:

    run(carry=[".whl"], timeout_s=400, command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --target /tmp/site .whl/diffusers-*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
        python3 bench/precision_check.py --device cuda --out $OUT")
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LOW_VARIANTS = ("bf16", "bf16 autocast", "fp16", "fp16 autocast")
VARIANTS = ("fp32", "TF32") + LOW_VARIANTS + ("plain TF32", "plain bf16", "plain fp16")
# The float64 twin is the sampler if float32 lands next to it: mean per-image distance at most 1e-4. Measured
# 6e-8 to 2e-7 on the test cases and 2e-5 on digits-default, whose reference schedule amplifies float32's
# rounding ~1000x (its max, 1.5e-4, is why this is the mean, not tests/test_accuracy.py's 1e-5 max); a twin
# with another noise draw or another step lands O(0.1) to O(1) away.
TWIN_MEAN_BOUND = 1e-4
# kve_fast column -> its yardstick column
YARDSTICK = {"TF32": "plain TF32", "bf16": "plain bf16", "bf16 autocast": "plain bf16", "fp16": "plain fp16",
             "fp16 autocast": "plain fp16"}


def log(*parts) -> None:
    print(*parts, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="fewer cases and smaller batches")
    ap.add_argument("--out", default=None, help="folder for precision_check.json/.md (default: $OUT, else bench/out)")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all for the mode)")
    ap.add_argument("--batch", type=int, default=None, help="images per case (fp16 too; default: by device and mode)")
    ap.add_argument("--no-quality", dest="quality", action="store_false",
                    help="skip the quality section (the Gaussian oracle's W2 and the digits judge on this device)")
    return ap.parse_args(argv)


def _graph_bench():
    spec = importlib.util.spec_from_file_location("graph_bench", ROOT / "bench" / "graph_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases_for(tp, gpu: bool, quick: bool, names: list[str] | None, batch: int | None) -> dict:
    """name -> (Case, model builder) for this run, batches set for the device and mode."""
    from kve_fast.testing import UNET_TERM_SCALE, GaussianPlusUNet

    extra = {"digits-default": tp.Case("digits", (), 30, 16, 8)}
    builders = {name: (lambda model=case.model: tp.make_model(model)) for name, case in tp.CASES.items()}
    builders["digits-default"] = lambda: tp.make_model("digits")
    if gpu:
        extra["ncsnpp32+gaussian"] = tp.Case("ncsnpp32+gaussian", tp.CASES["ncsnpp+gaussian"].scheduler, 12, 16, 16)
        builders["ncsnpp32+gaussian"] = lambda: GaussianPlusUNet(_graph_bench().ncsnpp_unet("cpu", 0),
                                                                 UNET_TERM_SCALE["ncsnpp"])
    everything = {**tp.CASES, **extra}
    if names is None:
        names = list(everything)
        if quick:
            names = [n for n in names if n not in ("ncsnpp32+gaussian",)]
            if not gpu:
                names = ["gaussian-300", "test_unet+gaussian", "digits-edm"]
    unknown = [n for n in names if n not in everything]
    if unknown:
        raise SystemExit(f"precision_check.py: unknown case(s) {unknown}; known: {sorted(everything)}")
    chosen = {}
    for name in names:
        case = everything[name]
        if batch is not None:
            b, b16 = batch, batch
        elif gpu:
            b = 32 if quick else 64
            b = min(b, 16) if name == "ncsnpp32+gaussian" else b
            b16 = b
        else:  # CPU: tiny batches; fp16 convolutions are ~25x slower than bf16 ones on CPUs
            b, b16 = (4, 2) if quick else (case.batch, case.fp16_batch)
            if name == "gaussian-300":
                b16 = b
        chosen[name] = (dataclasses.replace(case, batch=b, fp16_batch=b16), builders[name])
    return chosen


def run_case(tp, name: str, case, build, device, failures: list) -> dict:
    """Every column of one case: per-image distances to its float64 twin, and the twin's own checks."""
    import torch

    from kve_fast.precision import tf32_for_run

    rec = {"case": dataclasses.asdict(case), "batch": {"fp32": case.batch, "fp16": case.fp16_batch}, "variants": {},
           "errors": []}
    model = build().to(device).eval()
    twins, fp32_runs = {}, {}

    def twin(batch):
        if batch not in twins:
            t0 = time.perf_counter()
            twins[batch] = tp.twin_sample(case, tp.converted(model, torch.float64), batch, device=device)
            rec.setdefault("float64_seconds", {})[batch] = time.perf_counter() - t0
        return twins[batch]

    def record(variant, batch, make):
        try:
            t0 = time.perf_counter()
            x = make()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            d = tp.distances(x, twin(batch))
            entry = {"batch": batch, "mean": float(d.mean()), "max": float(d.max()), "per_image": d.tolist(),
                     "seconds": seconds, "dtype": str(x.dtype), "finite": bool(torch.isfinite(x).all())}
            if x.dtype != torch.float32:
                failures.append(f"{name} {variant}: result dtype {x.dtype}, not float32")
            if not entry["finite"]:
                failures.append(f"{name} {variant}: non-finite values in the result")
            rec["variants"][variant] = entry
            log(f"  {variant:14s} batch {batch:3d}: mean {d.mean():.3g}  max {d.max():.3g}  ({seconds:.2f} s)")
            return x
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the rest
            msg = f"{name} {variant}: {type(exc).__name__}: {exc}"
            failures.append(msg)
            rec["errors"].append({"variant": variant, "error": msg, "traceback": traceback.format_exc()})
            log(f"  {variant:14s} FAILED {msg}")
            return None

    log(f"== {name}: {case.model}, scheduler {dict(case.scheduler) or 'default'}, {case.steps} steps, "
        f"batch {case.batch} (fp16 {case.fp16_batch}), on {device}")
    for batch in sorted({case.batch, case.fp16_batch}):
        fp32_runs[batch] = record("fp32" if batch == case.batch else f"fp32 (batch {batch})", batch,
                                  lambda b=batch: tp.kve_run(case, model, b, device=device))
    record("TF32", case.batch, lambda: tp.kve_run(case, model, case.batch, device=device, tf32=True))
    for dtype_name, dtype in tp.LOW.items():
        b = case.batch_for(dtype_name)
        record(dtype_name, b, lambda b=b, dtype=dtype: tp.kve_run(case, tp.converted(model, dtype), b, device=device))
        if case.autocast:
            record(f"{dtype_name} autocast", b,
                   lambda b=b, dtype=dtype: tp.kve_run(case, model, b, device=device, unet_dtype=dtype))
    with tf32_for_run(True):
        record("plain TF32", case.batch,
               lambda: tp.twin_sample(case, model, case.batch, dtype=torch.float32, device=device))
    for dtype_name, dtype in tp.LOW.items():
        b = case.batch_for(dtype_name)
        record(f"plain {dtype_name}", b,
               lambda b=b, dtype=dtype: tp.twin_sample(case, tp.InDtype(model, dtype), b, dtype=torch.float32,
                                                         device=device))

    # the twin is the sampler: the float32 loop gives kve_fast's float32 result, float64 lands next to it
    try:
        loop32 = tp.twin_sample(case, model, case.batch, dtype=torch.float32, device=device)
        fp32 = fp32_runs[case.batch]
        worst = float((loop32 - fp32).abs().max()) if fp32 is not None else float("nan")
        rec["loop32_vs_kve_fp32_max_abs"] = worst
        if not worst <= tp.LOOP_TOLERANCE:
            failures.append(f"{name}: the float32 loop differs from kve_fast's float32 run by {worst:g}")
        fp32_mean = rec["variants"].get("fp32", {}).get("mean", float("nan"))
        if not fp32_mean <= TWIN_MEAN_BOUND:
            failures.append(f"{name}: float32 lands {fp32_mean:.3g} RMS (mean) from float64 (> {TWIN_MEAN_BOUND:g})")
    except Exception as exc:  # noqa: BLE001
        failures.append(f"{name} twin check: {type(exc).__name__}: {exc}")
    return rec


# Quality where it is known (tests/test_accuracy.py's settings; constants repeated here, since bench scripts do not
# import tests/): the Gaussian oracle's empirical W2 from 16384 samples at 40 steps (float32 within 5 % of the exact
# value: the statistic is stable to ~2 %), and the digits judge's scores of 256 digits (the paper's schedule, 20
# steps); each non-exact mode within 10 % of float32's.
ORACLE_N, ORACLE_STEPS, ORACLE_STABLE = 16384, 40, 0.05
JUDGE_N, JUDGE_STEPS = 256, 20
QUALITY_RTOL = 0.10
# ... except the FD of fast noise, which judges other digits than float32's run: the Frechet distance of 256 digits
# moves +-17 % from seed to seed (tests/test_accuracy.py), so 35 % (about 2x that) is its bound.
FD_RTOL_OTHER_DIGITS = 0.35


def quality(device, quick: bool, failures: list) -> dict:
    """The non-exact modes on this device (fast noise, bf16 native and autocast, TF32; NCSN++-free models) judged
    by the Gaussian oracle's W2 and the digits judge, each against float32's score (see the constants)."""
    out = {"oracle": {}, "digits": {}, "bounds": {"oracle_stable": ORACLE_STABLE, "rtol": QUALITY_RTOL}}
    backend = "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    n_ok = oracle_quality(out["oracle"], device, quick, failures, backend)
    count = digits_quality(out["digits"], device, quick, failures, backend)
    if count is not None and (count < JUDGE_N or not n_ok):
        out["note"] = "a CPU dry run: fewer samples, so the bounds are not applied"
    return out


def _modes(model, low: dict, backend: str) -> dict:
    """name: (model, sampler keywords) of float32 (torch), fast noise, ``low``'s low-precision runs and TF32."""
    modes = {"fp32": (model, {"backend": "torch"}), "fast noise": (model, {"backend": backend, "noise": "fast"})}
    modes.update({name: (m, {"backend": backend, **kw}) for name, (m, kw) in low.items()})
    modes["TF32"] = (model, {"backend": backend, "tf32": True})
    return modes


def _score(out: dict, modes: dict, score, what: str, failures: list) -> None:
    """``out[name] = score(model, **keywords)`` for each mode; a failure is named in ``failures``."""
    for name, (model, kw) in modes.items():
        try:
            out[name] = score(model, **kw)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{what} {name}: {type(exc).__name__}: {exc}")


def oracle_quality(out: dict, device, quick: bool, failures: list, backend: str) -> bool:
    """The Gaussian oracle's W2 of each mode against float32's, and float32's against the exact value; whether
    the sample is large enough for the bounds (a CPU dry run draws fewer)."""
    import torch

    import kve_fast
    import kve_fast.accuracy as tp
    from kve_fast.oracle import GaussianScore, output_moments, w2_diagonal
    from kve_fast.sampler import plan_steps

    n = ORACLE_N if not quick or device.type == "cuda" else 2048
    model = tp.ParamGaussian(GaussianScore.random(channels=1, size=8)).to(device)
    scheduler = kve_fast.KarrasVeScheduler()
    mu, var = model.x_moments()
    m, v = output_moments(plan_steps(scheduler, ORACLE_STEPS), mu, var, scheduler.init_noise_sigma,
                          scheduler.config.s_noise)
    exact = w2_diagonal(m, v, mu, var)
    out.update(exact_w2=exact, n=n)

    def w2(mdl, **kwargs):
        x = kve_fast.sample_karras_ve(mdl, scheduler, (n, 1, 8, 8), ORACLE_STEPS, torch.Generator().manual_seed(0),
                                      device=device, **kwargs)
        xs = x.double().cpu().reshape(n, *mu.shape).numpy()
        return w2_diagonal(xs.mean(0), xs.var(0), mu, var)

    low = tp.converted(model, torch.bfloat16)
    runs = _modes(model, {"bf16": (low, {}), "bf16, fast noise": (low, {"noise": "fast"})}, backend)
    _score(out, runs, w2, "oracle", failures)
    fp32 = out.get("fp32")
    n_ok = n >= ORACLE_N  # the bound's statistics hold at ORACLE_N samples
    if fp32 is not None and n_ok and not abs(fp32 - exact) <= ORACLE_STABLE * exact:
        failures.append(f"oracle: float32 W2 {fp32:.4f} vs exact {exact:.4f}: not stable")
    for name in runs:
        w = out.get(name)
        if name != "fp32" and w is not None and fp32 is not None and n_ok and not abs(w - fp32) <= QUALITY_RTOL * fp32:
            failures.append(f"oracle {name}: W2 {w:.4f} vs float32 {fp32:.4f} (> {QUALITY_RTOL:.0%} apart)")
    log("  oracle W2 (exact {:.4f}, n={}): ".format(exact, n)
        + ", ".join(f"{k} {out[k]:.4f}" for k in runs if k in out))
    return n_ok


def digits_quality(out: dict, device, quick: bool, failures: list, backend: str) -> int | None:
    """The digits judge's scores of each mode against float32's; how many digits it judged (None: no judge)."""
    import torch

    import kve_fast
    import kve_fast.accuracy as tp

    try:
        from kve_fast.models import quality as q
    except Exception as exc:  # noqa: BLE001 - sklearn missing, say
        failures.append(f"digits judge: {type(exc).__name__}: {exc}")
        return None
    judge = q.fit_judge(0)
    unet = kve_fast.load_model("digits")[0].to(device)
    count = JUDGE_N if not quick or device.type == "cuda" else 32

    def judged(mdl, **kw):
        pipe = kve_fast.KarrasVePipeline(mdl, kve_fast.KarrasVeScheduler(sigma_schedule="edm"))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(count, JUDGE_STEPS, torch.Generator().manual_seed(0), output_type="pt", **kw).images
        res = q.evaluate_images(images, judge)
        return {k: res[k] for k in ("confidence", "accepted", "fd", "classes_covered")}

    digits = _modes(unet, {"bf16": (tp.converted(unet, torch.bfloat16), {}),
                           "bf16 autocast": (unet, {"unet_dtype": torch.bfloat16})}, backend)
    _score(out, digits, judged, "digits", failures)
    base = out.get("fp32")
    for name, res in out.items():
        if name == "fp32" or base is None or count < JUDGE_N:
            continue
        for key in ("confidence", "accepted", "fd"):
            # fast noise draws other digits: its FD moves with which digits were drawn (+-17 % seed to seed)
            rtol = FD_RTOL_OTHER_DIGITS if key == "fd" and "fast" in name else QUALITY_RTOL
            if not abs(res[key] - base[key]) <= rtol * base[key]:
                failures.append(f"digits {name}: {key} {res[key]:.4f} vs float32 {base[key]:.4f} (> {rtol:.0%} apart)")
    log("  digits judge (n={}): ".format(count) + "; ".join(
        f"{k}: conf {r['confidence']:.3f}, accepted {r['accepted']:.3f}, FD {r['fd']:.3f}" for k, r in out.items()))
    return count


def rule_rows(tp, name: str, rec: dict, failures: list) -> list[dict]:
    rows = []
    v = rec["variants"]
    for variant, yard in YARDSTICK.items():
        if variant not in v or yard not in v:
            continue
        ratio_mean = v[variant]["mean"] / v[yard]["mean"] if v[yard]["mean"] > 0 else float("inf")
        ratio_max = v[variant]["max"] / v[yard]["max"] if v[yard]["max"] > 0 else float("inf")
        ok = ratio_mean <= tp.YARDSTICK_FACTOR and ratio_max <= tp.YARDSTICK_FACTOR
        verdict = "ok" if ok else f"FAIL (> {tp.YARDSTICK_FACTOR:g}x)"
        if variant == "TF32" and v[variant]["per_image"] == v.get("fp32", {}).get("per_image"):
            verdict += " (= fp32: no TF32 here)"
        if not ok:
            failures.append(f"{name} {variant}: {ratio_mean:.2f}x / {ratio_max:.2f}x the plain run's distance")
        rows.append({"case": name, "variant": variant, "yardstick": yard, "ratio_mean": ratio_mean,
                     "ratio_max": ratio_max, "ok": ok, "verdict": verdict})
    return rows


def markdown(result: dict) -> str:
    env = result["env"]
    gpu = env.get("gpu") or "CPU"
    lines = [f"## precision_check: {gpu}, torch {env.get('torch')}, {env.get('date')}", "",
             f"Command: `{env.get('command')}`  (kve_fast {env.get('git')})", "",
             "Distance to the float64 twin, per image RMS of the final sample ([-1, 1] space): mean / max over "
             "the batch. bf16/fp16 = the model converted (`unet_dtype=None`); autocast = a float32 model with "
             "`unet_dtype`; plain = the same float32 loop with the model run by hand in that dtype (TF32: "
             "switched on), the yardstick.", ""]
    head = ["case", "batch"] + list(VARIANTS)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rec in result["cases"].items():
        v = rec["variants"]
        cells = [name, f"{rec['batch']['fp32']} ({rec['batch']['fp16']})"]
        for variant in VARIANTS:
            cells.append(f"{v[variant]['mean']:.2g} / {v[variant]['max']:.2g}" if variant in v else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Rule: kve_fast's distance at most {result['settings']['yardstick_factor']:g}x the plain "
              "run's, mean and max (flash-attention's rule).", "",
              "| case | column | vs | mean ratio | max ratio | verdict |", "|---|---|---|---|---|---|"]
    for r in result["rule"]:
        lines.append(f"| {r['case']} | {r['variant']} | {r['yardstick']} | {r['ratio_mean']:.2f} | "
                     f"{r['ratio_max']:.2f} | {r['verdict']} |")
    qual = result.get("quality")
    if qual:
        o = qual["oracle"]
        lines += ["", f"Quality: the Gaussian oracle's W2 (exact {o['exact_w2']:.4f}, {o['n']} samples): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in o.items() if k not in ("exact_w2", "n"))
                  + "; the digits judge: " + "; ".join(f"{k}: confidence {r['confidence']:.3f}, accepted "
                                                       f"{r['accepted']:.3f}, FD {r['fd']:.3f}"
                                                       for k, r in qual["digits"].items())
                  + f" (each within {QUALITY_RTOL:.0%} of float32's" + (f"; {qual['note']}" if qual.get("note") else "")
                  + ")"]
    twins = [f"{n}: {rec.get('loop32_vs_kve_fp32_max_abs', float('nan')):.2g}" for n, rec in result["cases"].items()]
    lines += ["", "Float32 loop vs kve_fast float32, max |diff| (0 = same bits): " + ", ".join(twins)]
    if result["failures"]:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in result["failures"]]
    else:
        lines += ["", "All checks passed."]
    lines += ["", f"{result['seconds']:.0f} s in all."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("precision_check.py: --device cuda but torch sees no CUDA GPU")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        # A CPU user's kve_fast: without Triton's interpreter (the tests' conftest turns it on),
        # so NCSN++ FIR blocks keep diffusers' ops instead of running kve_fast's FIR kernel interpreted (~0.5 s
        # a forward). Set TRITON_INTERPRET=1 yourself to measure that path on the CPU.
        os.environ.setdefault("TRITON_INTERPRET", "0")
    from kve_fast.precision import tf32_for_run

    with tf32_for_run(False):  # TF32 off except where a column asks for it (the fp32 columns must be float32)
        return _run(args, device)


def _run(args, device) -> int:
    """``main`` after its arguments: the cases, the quality part, the rule's checks, the files."""
    import torch

    from bench.harness import ScriptRun

    gpu = device.type == "cuda"
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()  # the "cast with to()" notice on every conversion
    except ImportError:
        pass
    import kve_fast.accuracy as tp  # the float64 twin, the plain runs, the cases: shared with the tests

    names = args.cases.split(",") if args.cases else None
    cases = cases_for(tp, gpu, args.quick, names, args.batch)
    run = ScriptRun("precision_check", device, args.out or os.environ.get("OUT") or str(ROOT / "bench" / "out"),
                    record="env")
    failures: list[str] = []
    run.result.update(settings={"quick": args.quick, "yardstick_factor": tp.YARDSTICK_FACTOR,
                                "loop_tolerance": tp.LOOP_TOLERANCE, "twin_mean_bound": TWIN_MEAN_BOUND,
                                "distance": "per image RMS over pixels of (run - float64 twin), final sample, [-1, 1]"},
                      cases={}, rule=[], failures=failures)
    for name, (case, build) in cases.items():
        try:
            rec = run_case(tp, name, case, build, device, failures)
        except Exception as exc:  # noqa: BLE001 - building the model failed, say
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
            continue
        run.result["cases"][name] = rec
        run.result["rule"] += rule_rows(tp, name, rec, failures)
        if gpu:
            torch.cuda.empty_cache()
    if args.quality:
        try:
            run.result["quality"] = quality(device, args.quick, failures)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"quality: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
    for r in run.result["rule"]:
        run.check(f"{r['case']} {r['variant']} within {tp.YARDSTICK_FACTOR:g}x {r['yardstick']}", r["ok"])
    for f in failures:
        run.check(f, False)
    return run.finish(markdown=markdown)


if __name__ == "__main__":
    sys.exit(main())
