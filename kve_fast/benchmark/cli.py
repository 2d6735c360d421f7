"""``kve-fast bench``: its options (no torch needed to parse them) and the command.

The report (markdown tables) goes to stdout once; stderr only says what is being measured. Rows that cannot run
on this model or device (diffusers' pipeline for a model without 3 channels; CUDA graphs on the CPU) are left
out of the table, with one line saying why. ``--plot FILE.png`` draws each row's milliseconds per call beside
the floor, per batch size (matplotlib: ``pip install 'kve_fast[plot]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..cli_common import CliError, at_least, check_model, device_name, load_for_command, pin_threads, resolve_device
from ..options import BACKENDS, NOISE_MODES
from .report import exactness_failures, format_markdown, to_json, write_text
from .rows import KINDS, bench_pipeline, graph_support, jit_warmup
from .timing import RepeatPolicy, environment, precision_label

__all__ = ["add_arguments", "run", "BenchError"]


class BenchError(CliError):
    """A user error of ``kve-fast bench``: one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kve-fast bench`` (no torch needed to parse them)."""
    from ..cli_common import MODEL_HELP
    from .plot import PLOT_FORMATS

    positive_int = at_least(int, 1)
    parser.add_argument("--model", default="digits", help=MODEL_HELP)
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[1], metavar="N",
                        help="batch size(s): one table section each")
    parser.add_argument("--steps", type=at_least(int, 2, sys.maxsize), default=50,
                        help="sampling steps N (Heun: 2N - 1 model calls)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--noise", choices=NOISE_MODES, nargs="+", default=list(NOISE_MODES),
                        help="noise modes to time: exact (the reference's stream) and/or fast (on the device)")
    parser.add_argument("--backends", choices=KINDS, nargs="+", default=list(KINDS),
                        help="kve_fast runners to time: eager and/or graphed (CUDA graphs: CUDA only)")
    parser.add_argument("--step-backend", choices=BACKENDS, default="auto", help="kve_fast's step kernels")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time diffusers' own pipeline and check kve_fast's outputs against it bit for bit "
                             "(it runs 3-channel models only)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed calls per row after the first (default: as many as fit in 5 s, 1 to 5)")
    parser.add_argument("--seed", type=at_least(int, 0, 2**64 - 1), default=0, help="seed of the CPU generator")
    parser.add_argument("--output-type", choices=("latent", "np"), default="latent",
                        help="what kve_fast's rows return (diffusers' always returns np)")
    parser.add_argument("--unet-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="the dtype kve_fast's rows run the model in (a converted copy; the sampler's state stays "
                             "float32; diffusers' row runs fp32): bf16/fp16 are fast modes, compared with diffusers "
                             "by relative RMS, and the floor is measured in the same dtype")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls and convolutions in kve_fast's rows and the floor (CUDA; not bit-exact)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for every row, fixed for the run (default: torch's, one per core)")
    parser.add_argument("--edm", action="store_true",
                        help="time NVlabs' EDM sampler instead (use --steps 18, EDM's default): the model's UNet behind "
                             "an EDM preconditioner (kve_fast.edm_testing.cifar_standin); EDM's published loop (our "
                             "reading) vs kve_fast.edm eager and graphed, each against its floor, compared bit for bit")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the report as markdown")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help=f"also draw each row's ms per call beside its floor, per batch size "
                             f"({', '.join(PLOT_FORMATS)}; needs matplotlib: pip install 'kve_fast[plot]')")


def _check_out_file(path: str | None, option: str) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"{option}: {path!r} is a folder, expected a file name")
    if not os.path.isdir(folder):
        raise BenchError(f"{option}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise BenchError(f"{option}: cannot write to the folder {folder!r}")


def _check_plot(path: str | None) -> None:
    if path is None:
        return
    from .plot import PLOT_FORMATS

    if os.path.splitext(path)[1].lower() not in PLOT_FORMATS:
        raise BenchError(f"--plot: {path!r}: the format comes from the extension, one of {', '.join(PLOT_FORMATS)}")
    _check_out_file(path, "--plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: python -m pip install 'kve_fast[plot]' "
                         "(or leave out --plot)")


def _check_edm(args) -> None:
    """``--edm`` times float32 nets with exact noise only."""
    if not getattr(args, "edm", False):
        return
    if args.unet_dtype != "fp32" or args.tf32:
        raise BenchError("--edm times the net in float32 (EDM's sampler's own); leave out --unet-dtype and --tf32")
    if args.noise != list(NOISE_MODES) and args.noise != ["exact"]:
        raise BenchError("--edm draws its noise from EDM's per-seed generators: leave out --noise (or pass exact)")


def _bench_edm(pipe, args, batch: int, device, policy, log) -> dict:
    from ..edm_testing import cifar_standin
    from .edm_rows import bench_edm

    net = cifar_standin(pipe.unet)
    name = f"{os.path.basename(os.path.normpath(args.model))} EDM b{batch}"
    return bench_edm(net, name=name, batch_size=batch, steps=args.steps, device=device, seed=args.seed,
                     kinds=args.backends, reference=args.reference, step_backend=args.step_backend, policy=policy,
                     log=log)


def run(args) -> int:
    """``kve-fast bench``: returns 0, 1 when an exactness check failed, 2 for a user error (printed)."""
    try:
        return _run(args)
    except CliError as exc:
        print(f"kve-fast: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # Everything cheap first: the output files and the model folder's JSON.
    _check_out_file(args.json, "--json")
    _check_out_file(args.markdown, "--markdown")
    _check_plot(args.plot)
    _check_edm(args)
    folder = check_model(args.model)

    import torch

    device = resolve_device(args.device)
    threads = pin_threads(args.threads, device)

    def log(*parts):
        print(*parts, file=sys.stderr, flush=True)

    pipe = load_for_command(args.model, device)  # as kve-fast sample loads it (diffusers' own warnings muted)
    pipe.set_progress_bar_config(disable=True)
    from ..precision import parse_dtype, tf32_for_run

    unet_dtype = parse_dtype(getattr(args, "unet_dtype", "fp32"))
    unet_dtype = None if unet_dtype == torch.float32 else unet_dtype
    use_tf32 = bool(getattr(args, "tf32", False))

    with tf32_for_run(False):  # TF32 only where --tf32 asks for it (the rows' own switches)
        env = environment(device)
        if threads is not None:
            env["threads"] = threads
        result = {"env": env,
                  "settings": {"model": args.model, "model_path": folder.path, "steps": args.steps,
                               "batch_sizes": args.batch_size, "noise": args.noise, "backends": args.backends,
                               "step_backend": args.step_backend, "reference": args.reference,
                               "output_type": args.output_type, "seed": args.seed},
                  "configs": [], "notes": []}
        if precision_label(unet_dtype, use_tf32) is not None:
            result["settings"].update(unet_dtype=args.unet_dtype, tf32=use_tf32)
        policy = RepeatPolicy(fixed=args.repeats)
        if device.type == "cuda":
            ok, why = graph_support(pipe, device)
            if not ok and "graphed" in args.backends:
                result["notes"].append(why)
        warm = jit_warmup(device, args.step_backend, log, unet_dtype=unet_dtype, tf32=use_tf32)
        if warm is not None:
            result["notes"].append(f"kernel warm-up (Triton JIT, before any timing): {warm:.1f} s")
        for batch in args.batch_size:
            if getattr(args, "edm", False):
                result["configs"].append(_bench_edm(pipe, args, batch, device, policy, log))
                continue
            result["configs"].append(bench_pipeline(
                pipe, name=f"{os.path.basename(os.path.normpath(args.model))} b{batch}", batch_size=batch,
                steps=args.steps, device=device, seed=args.seed, noises=args.noise, kinds=args.backends,
                reference=args.reference, step_backend=args.step_backend, output_type=args.output_type,
                policy=policy, log=log, model_label=args.model, unet_dtype=unet_dtype, tf32=use_tf32))

    label = precision_label(unet_dtype, use_tf32)
    text = format_markdown(result, f"kve-fast bench: {args.model}" + (f" ({label})" if label else ""))
    if args.json:
        write_text(args.json, to_json(result))
    if args.markdown:
        write_text(args.markdown, text)
    if args.plot:
        from .plot import write_plot

        write_plot(result, args.plot)
    print(text, end="")
    bad = exactness_failures(result["configs"])
    if bad:
        print(f"kve-fast: exactness checks FAILED: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0
