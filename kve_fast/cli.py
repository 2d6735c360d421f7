"""``kve-fast`` (also ``python -m kve_fast``): sample images from a VE score model.

    kve-fast sample                       # 64 digits from the bundled model, as a grid PNG here
    kve-fast sample --model path/to/unet --batch-size 16 --steps 100 --out samples.png
    kve-fast generate --seeds 0-49999 --outdir fid_images     # one PNG per seed (kve_fast.generate)
    torchrun --nproc_per_node=8 -m kve_fast generate --seeds 0-49999 --outdir fid_images

Every argument is checked before anything heavy: the parser and the checks of paths, output sizes and the
model folder's JSON need neither torch, diffusers nor numpy, so ``--help`` and mistakes answer at once.
torch comes in for the device checks, after them, and the model and the sampling after that.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
import time

from .cli_common import MODEL_HELP, CliError, check_model as _check_model, load_for_command
from .cli_common import at_least as _at_least, device_name as _device_name, resolve_device as _device
from .cli_common import pin_threads as _pin_threads, unpin_threads as _unpin_threads
from .images import check_channels, grid_size
from .options import BACKENDS, NOISE_MODES, REFERENCE_SCHEDULE_MIN_STEPS, SCHEDULES, SOLVERS

# Output file formats, from the file's extension (all through PIL).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}
_MAX_SIDE = {"JPEG": 65_535, "WEBP": 16_383}  # the formats' own limits on width and height
_RGBA_FORMATS = ("PNG", "WEBP", "TIFF")  # those that store 4 channels
# PIL's Image.MAX_IMAGE_PIXELS: PIL warns when it opens a larger image (a "decompression bomb") and
# refuses one over twice as large; no output of ours is larger.
MAX_PIXELS = 89_478_485
SAMPLE_FILE = "sample_{:04d}.png"  # --no-grid: the file of image k
DEFAULT_OUT = "kve_fast_samples.png"  # sample's grid, in the current folder (.gitignore: a checkout stays clean)
DEFAULT_OUT_FOLDER = "kve_fast_samples"  # ... and its folder with --no-grid
TRAJECTORY_COLUMNS = 8  # --trajectory: the sample after this many marked steps (then the final image)
TRAJECTORY_ROWS = 8  # ... of the first this many images
MAX_STEPS = sys.maxsize  # the most steps a run can index (a larger --steps is refused before anything loads)


class _Terminated(BaseException):
    """Raised by the SIGTERM handler, so that cleanups (temporary files) run before the exit."""


def _seed(text: str) -> int:
    """An argparse type: what ``torch.Generator.manual_seed`` takes as a distinct seed, 0 to 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= 2**64 - 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**64 - 1 = {2**64 - 1}, got {text}")
    return value


def _workers(text: str):
    """An argparse type: 'auto' or an integer >= 1 (``generate --workers``)."""
    return text if text == "auto" else _at_least(int, 1)(text)


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--step`` is not taken for ``--steps``), but a bad value (``argument
    --steps: ...``) is one line, as every other user error is: the usage block is for mistakes in the command's
    shape (an unknown option, a missing subcommand); an unknown option is told against the subcommand's usage, with
    the option it looks like."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        if message.startswith("argument -"):
            option, _, why = message[len("argument "):].partition(": ")
            self.exit(2, f"kve-fast: error: {option.split('/')[0]}: {why}\n")
        super().error(message)

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._subcommands().get(getattr(args, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(unknown, command)}")
        return args

    def _subcommands(self) -> dict:
        return next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})


def _did_you_mean(unknown: list[str], parser) -> str:
    """``"; did you mean --steps?"`` for the options among ``unknown`` that look like one of ``parser``'s."""
    import difflib

    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    close = [difflib.get_close_matches(word.partition("=")[0], options, n=1) for word in unknown if word.startswith("--")]
    names = list(dict.fromkeys(c[0] for c in close if c))
    return f"; did you mean {' or '.join(names)}?" if names else ""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None and False ones (whose help says what happens without the option)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _steps_option(p) -> None:
    p.add_argument("--steps", type=_at_least(int, 2, MAX_STEPS), default=50,
                   help=f"sampling steps N (Heun: 2N - 1 model calls); the 'diffusers' schedule needs about "
                        f"{REFERENCE_SCHEDULE_MIN_STEPS}+")


def _sampler_options(p, device_help: str) -> None:
    """The options ``sample`` and ``generate`` share, after --steps (and sample's --seed)."""
    p.add_argument("--device", type=_device_name, default="auto", help=device_help)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="step backend (triton, cuda: CUDA only)")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default=None,
                   help="capture each step in a CUDA graph and replay it (same bits; on CUDA with the triton or "
                        "cuda backend): 'auto' where possible, 'on' fails where not, 'off' never (default: the "
                        "library's, auto; KVE_FAST_CUDA_GRAPH=0 turns graphs off)")
    p.add_argument("--noise", choices=NOISE_MODES, default="exact",
                   help="exact: the reference's noise stream; fast: generated on the device")
    p.add_argument("--unet-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the dtype the model runs in (the sampler's state stays float32); bf16/fp16 are fast "
                        "modes, not bit-exact with the reference")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions for an fp32 model on CUDA "
                                                       "(a fast mode, not bit-exact)")
    p.add_argument("--channels-last", action="store_true",
                   help="the model and the sampler's state in channels_last memory (triton/cuda backends); the "
                        "convolutions may pick other kernels, so images can differ in low-order bits (they do on CPUs)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="noise levels: the reference's ('diffusers'), Table 1 VE ('ve') or Eq. 5 ('edm'); "
                        "default: the model's scheduler config ('diffusers' when it has none)")
    p.add_argument("--solver", choices=SOLVERS, default="heun", help="Heun (Algorithm 2) or Euler only")
    p.add_argument("--s-churn", type=_at_least(float, 0), default=None, help="S_churn (default: the model's)")
    p.add_argument("--s-noise", type=_at_least(float, 0), default=None, help="S_noise (default: the model's)")
    p.add_argument("--s-min", type=_at_least(float, 0), default=None, help="S_tmin (default: the model's)")
    p.add_argument("--s-max", type=_at_least(float, 0), default=None, help="S_tmax (default: the model's)")


_CUDA_GRAPH = {"auto": "auto", "on": True, "off": False, None: None}


def _apply_precision(pipe, args) -> None:
    """--unet-dtype and --channels-last: the command owns the model it loaded, so it converts it (faster than
    autocast, and no layout conversion inside the model)."""
    from .precision import parse_dtype

    dtype = parse_dtype(args.unet_dtype)
    if dtype is not parse_dtype("fp32"):
        pipe.unet.to(dtype)
    if args.channels_last:
        import torch

        pipe.unet.to(memory_format=torch.channels_last)


def _ruled(option: str, check, *args):
    """``check(*args)``: a rule the command shares with the Python API (one wording), its error as ``option``'s."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{option}: {exc}") from None


def _check_churn_range(args, folder) -> None:
    """--s-min <= --s-max, each the model's (its scheduler_config.json) where not given, before the model loads:
    the scheduler's own rule and words (``kve_fast.plan.check_churn_range``). A bound the model's config leaves
    out is the scheduler's default, which its own check (after loading) compares."""
    given = {name: value for name, value in (("s_min", args.s_min), ("s_max", args.s_max)) if value is not None}
    if not given:
        return
    from .plan import check_churn_range

    config = folder.scheduler_config or {}
    bounds = [given.get(name, config.get(name)) for name in ("s_min", "s_max")]
    if all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        _ruled(", ".join("--" + name.replace("_", "-") for name in given), check_churn_range, *bounds)


def _check_cuda_graph(args, device) -> None:
    """--cuda-graph on needs a CUDA device (the rest of its conditions are the sampler's, checked before sampling)."""
    if args.cuda_graph == "on" and device.type != "cuda":
        raise CliError(f"--cuda-graph: 'on' needs a CUDA device, the device is {device}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kve-fast", description="Karras et al. (2022) VE sampler, fast and exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="generate images", description="Generate images with Algorithm 2.",
                       formatter_class=_HelpFormatter)
    p.add_argument("--model", default="digits", help=MODEL_HELP)
    p.add_argument("--download", action="store_true",
                   help="fetch a Hugging Face Hub --model that is not in the local cache (only its UNet and scheduler "
                        "files); without it, nothing is downloaded")
    p.add_argument("--batch-size", type=_at_least(int, 1), default=64, help="number of images")
    _steps_option(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the CPU generator, 0 to 2**64 - 1")
    _sampler_options(p, "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--out", default=None,
                   help=f"the grid image (default {DEFAULT_OUT}), its format from the extension: .png, "
                        ".webp (lossless), .jpg/.jpeg (lossy, quality 95), .bmp, .tif/.tiff; with --no-grid, "
                        f"a folder (default {DEFAULT_OUT_FOLDER}) for sample_0000.png, ...")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="one grid image, or one PNG file per image")
    p.add_argument("--scale", type=_at_least(int, 1), default=None,
                   help=f"nearest-neighbour upscaling of each image (default: to at least 32 pixels, less where an "
                        f"output would exceed {MAX_PIXELS:,} pixels, the most any output may have)")
    p.add_argument("--trajectory", default=None, metavar="FILE",
                   help="also write an image (format from the extension, as --out) of the first "
                        f"{TRAJECTORY_ROWS} samples after up to {TRAJECTORY_COLUMNS} of the steps, then the final image")
    p.add_argument("--threads", type=_at_least(int, 1), default=None, metavar="N",
                   help="CPU threads, fixed for the run (default: torch's, one per core, or OMP_NUM_THREADS); they "
                        "sleep instead of spinning while they wait, so a busy neighbour does not slow them down "
                        "(kve_fast/threads.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary (warnings still)")

    g = sub.add_parser(
        "generate", help="one PNG per seed, on one or many processes (torchrun)", formatter_class=_HelpFormatter,
        description="Write DIR/{seed:06d}.png for every seed, for evaluation sets such as FID's 50,000 images. "
                    "Each image depends only on its seed (sampled with torch.Generator().manual_seed(seed)). Under "
                    "torchrun (torchrun --nproc_per_node=K -m kve_fast generate ...) the seeds are split across the "
                    "processes: NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on CPUs. Files are written to "
                    "a temporary name and renamed once DIR/manifest.jsonl lists it with its SHA-256; DIR/record.json "
                    "holds everything that can change the files' bytes, and a rerun must match it. Rerunning the same "
                    "command completes an interrupted set. Reference: docs/generate.md.")
    g.add_argument("--model", default="digits", help=MODEL_HELP)
    g.add_argument("--seeds", required=True,
                   help="the seeds: 0-49999, or a list such as 0,5,10-19 (each 0 to 2**32 - 1)")
    g.add_argument("--outdir", required=True, help="the output folder (created if missing; its parent must exist)")
    g.add_argument("--workers", type=_workers, default="auto",
                   help="CPU only (Linux): worker processes sampling batches side by side, each on one CPU thread "
                        "(the files do not depend on how many; 1: sample in this process); 'auto': the CPUs this "
                        "process may use over the processes torchrun starts on this machine (1 off Linux)")
    g.add_argument("--batch", type=_at_least(int, 1), default=64,
                   help="images per model batch on each process (every batch is padded to this size)")
    g.add_argument("--subdirs", action="store_true",
                   help="files in subfolders of 1,000 (DIR/000000/000123.png), as EDM's generate.py writes them")
    _steps_option(g)
    _sampler_options(g, "'auto' (under torchrun: cuda:LOCAL_RANK when CUDA is available), 'cpu', 'cuda' (under "
                        "torchrun: cuda:LOCAL_RANK) or 'cuda:N' (one process only)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary (warnings still)")

    from .benchmark import cli as bench  # import-light: torch and diffusers load inside bench.run

    b = sub.add_parser(
        "bench", help="time the reference and kve_fast (eager, CUDA-graphed) on your model",
        formatter_class=_HelpFormatter,
        description="Time diffusers' pipeline and kve_fast's runners on a model, next to the floor of 99 model "
                    "forwards (replayed from a CUDA graph where possible), and check that the outputs are "
                    "bit-identical. The same table as bench/graph_bench.py, for your own model and GPU.")
    bench.add_arguments(b)
    return parser


# ---- checks that need neither torch nor diffusers --------------------------------------------------------

def _image_format(path: str, option: str) -> str:
    ext = os.path.splitext(path)[1]
    fmt = IMAGE_FORMATS.get(ext.lower())
    if fmt is None:
        what = f"the extension {ext!r}" if ext else "no extension"
        raise CliError(f"{option}: {path!r} has {what}; the image format comes from it, one of "
                       f"{', '.join(IMAGE_FORMATS)}")
    if fmt == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise CliError(f"{option}: this PIL cannot write WebP images; use .png")
    return fmt


def _check_writable_file(path: str, what: str) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise CliError(f"{what}: {path} is a folder, expected an image file path")
    if not os.path.isdir(parent):
        raise CliError(f"{what}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CliError(f"{what}: cannot write to {path}")
    return path


def _check_writable_dir(path: str, what: str) -> str:
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{what}: {path} exists and is not a folder")
    parent = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(parent):
        raise CliError(f"{what}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{what}: cannot write to {parent}")
    return path


def _same_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _check_outputs(args):
    """``(out, out_format, trajectory, trajectory_format)``; ``out`` is a folder and its format None with --no-grid."""
    if args.grid:
        given = args.out or DEFAULT_OUT
        fmt = _image_format(given, "--out")
        out = _check_writable_file(given, "--out")
    else:
        given = args.out or DEFAULT_OUT_FOLDER
        fmt = None
        if os.path.splitext(given)[1].lower() in IMAGE_FORMATS and not os.path.isdir(given):
            raise CliError(f"--out: with --no-grid, --out names a folder, got the image file name {given!r} "
                           "(for one grid image, leave out --no-grid)")
        out = _check_writable_dir(given, "--out")
    if not args.trajectory:
        return out, fmt, None, None
    trajectory_format = _image_format(args.trajectory, "--trajectory")
    trajectory = _check_writable_file(args.trajectory, "--trajectory")
    if args.grid and _same_path(trajectory, out):
        raise CliError(f"--trajectory: {trajectory} is also the --out file; give them different names")
    if not args.grid and _same_path(os.path.dirname(trajectory), out):
        name = os.path.basename(trajectory)
        match = re.fullmatch(r"sample_(\d+)\.png", name, re.IGNORECASE)
        if match and int(match.group(1)) < args.batch_size and SAMPLE_FILE.format(int(match.group(1))).lower() == name.lower():
            raise CliError(f"--trajectory: {trajectory} is also the file of sample {int(match.group(1))} in the --out "
                           "folder; give it another name")
    return out, fmt, trajectory, trajectory_format


def _over_limit(size: tuple[int, int], fmt: str) -> str | None:
    width, height = size
    if width * height > MAX_PIXELS:
        return f"{width}x{height} pixels, over the limit of {MAX_PIXELS:,} pixels"
    side = _MAX_SIDE.get(fmt)
    if side is not None and max(width, height) > side:
        return f"{width}x{height} pixels, over {fmt}'s limit of {side} pixels a side"
    return None


def _trajectory_marks(steps: int) -> set[int]:
    """The step indices after which --trajectory keeps the sample."""
    return {int(round(k * (steps - 1) / (TRAJECTORY_COLUMNS - 1))) for k in range(TRAJECTORY_COLUMNS)}


def _check_sizes(args, shape, out_format, trajectory_format) -> int:
    """The --scale in effect, after checking that every output image fits (PIL's and the formats' limits)."""
    channels, height, width = shape
    _ruled("--model", check_channels, channels)
    formats = [("--out", out_format or "PNG")] + ([("--trajectory", trajectory_format)] if args.trajectory else [])
    for option, fmt in formats:
        if channels == 4 and fmt not in _RGBA_FORMATS:
            raise CliError(f"{option}: the model's images have 4 channels (RGBA), which {fmt} cannot store; use .png")
    scale = args.scale or max(1, math.ceil(32 / max(height, width)))
    batch = args.batch_size
    outputs = []  # (option to blame at --scale 1, what, format, size(scale))
    if args.grid:
        ncols = math.ceil(math.sqrt(batch))
        outputs.append(("--batch-size", f"a grid of {batch} images of {width}x{height}", out_format,
                        lambda s: grid_size(batch, ncols, height, width, s)))
    else:
        outputs.append(("--model", f"each {width}x{height} image", "PNG", lambda s: (width * s, height * s)))
    if args.trajectory:
        rows, cols = min(batch, TRAJECTORY_ROWS), len(_trajectory_marks(args.steps)) + 1
        outputs.append(("--trajectory", f"the trajectory image ({rows} rows of {cols} images of {width}x{height})",
                        trajectory_format, lambda s: grid_size(rows * cols, cols, height, width, s)))

    def fits(s: int) -> bool:
        return all(_over_limit(size(s), fmt) is None for _, _, fmt, size in outputs)

    for option, what, fmt, size in outputs:
        problem = _over_limit(size(1), fmt)
        if problem is not None:
            hint = {"--batch-size": "; lower --batch-size or use --no-grid", "--trajectory": "; leave out --trajectory",
                    "--model": ""}[option]
            raise CliError(f"{option}: even at --scale 1, {what} would be {problem}{hint}")
    if fits(scale):
        return scale
    lo, hi = 1, scale  # the largest scale that fits: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if args.scale is None:  # the default: as large as asked for above, but no larger than fits
        return lo
    what, problem = next((what, p) for _, what, fmt, size in outputs if (p := _over_limit(size(scale), fmt)))
    raise CliError(f"--scale: at --scale {scale}, {what} would be {problem}; the largest --scale that fits is {lo}")


# ---- torch from here on ----------------------------------------------------------------------------------

def _load(args, device):
    """The pipeline of --model on ``device`` (``kve_fast.cli_common.load_for_command``)."""
    return load_for_command(args.model, device)


def _apply_scheduler_options(pipe, args) -> None:
    """--schedule, --s-churn, --s-noise, --s-min, --s-max over the model's scheduler config."""
    overrides = {k: v for k, v in {"sigma_schedule": args.schedule, "s_churn": args.s_churn, "s_noise": args.s_noise,
                                   "s_min": args.s_min, "s_max": args.s_max}.items() if v is not None}
    if overrides:
        from .karras_ve_scheduler import KarrasVeScheduler

        try:
            pipe.scheduler = KarrasVeScheduler.from_config(pipe.scheduler.config, **overrides)
        except (ValueError, TypeError) as exc:
            given = ", ".join("--" + k.replace("_", "-") for k in overrides if k != "sigma_schedule")
            raise CliError(f"{given or '--schedule'}: with the model's scheduler config: {exc}") from None


def _warn_few_steps(pipe, args) -> None:
    schedule = pipe.scheduler.config.get("sigma_schedule", "diffusers")
    if schedule == "diffusers" and args.steps < REFERENCE_SCHEDULE_MIN_STEPS:
        print(f"kve-fast: warning: the reference schedule ('diffusers') needs about {REFERENCE_SCHEDULE_MIN_STEPS}+ "
              f"steps (--steps {args.steps} gives noisy images or noise); try --schedule edm", file=sys.stderr)


def sample_command(args) -> int:
    # 1. Everything that needs neither torch nor diffusers.
    out, out_format, trajectory, trajectory_format = _check_outputs(args)
    folder = _check_model(args.model, args.download)
    scale = _check_sizes(args, folder.image_shape, out_format, trajectory_format)

    # 2. The device and the backend (torch).
    import torch

    from ._files import save_image_atomic
    from .backends import check_backend
    from .images import make_grid, scaled, to_image, uint8_to_pil

    device = _device(args.device)
    try:
        check_backend(args.backend, device)
    except ValueError as exc:
        raise CliError(f"--backend: {exc}") from None
    _check_cuda_graph(args, device)
    threads = _pin_threads(args.threads, device)

    # 3. The model and the sampler settings.
    _check_churn_range(args, folder)
    pipe = _load(args, device)
    _apply_precision(pipe, args)
    _apply_scheduler_options(pipe, args)
    _warn_few_steps(pipe, args)
    pipe.set_progress_bar_config(disable=args.quiet, desc="sampling")

    # 4. Sampling.
    snapshots: list[tuple[int, torch.Tensor]] = []
    callback = None
    if trajectory:
        keep = min(args.batch_size, TRAJECTORY_ROWS)
        marks = _trajectory_marks(args.steps)

        def callback(p, i, t, kwargs):
            if i in marks:
                snapshots.append((i, kwargs["sample"][:keep].detach().clone()))
            return {}

    start = time.perf_counter()
    try:
        latents = pipe(args.batch_size, args.steps, torch.Generator().manual_seed(args.seed), output_type="latent",
                       backend=args.backend, noise=args.noise, solver=args.solver,
                       callback_on_step_end=callback, cuda_graph=_CUDA_GRAPH[args.cuda_graph], tf32=args.tf32,
                       channels_last=args.channels_last).images
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seconds = time.perf_counter() - start

    # 5. The files, each written whole or not at all.
    arrays = to_image(latents, "uint8").cpu()
    if args.grid:
        grid = make_grid(arrays, math.ceil(math.sqrt(len(arrays))), scale)
        save_image_atomic(grid, out, out_format, **_SAVE_OPTIONS.get(out_format, {}))
        where = f"{out} ({len(arrays)} images in a grid)"
    else:
        os.makedirs(out, exist_ok=True)
        for k in range(len(arrays)):
            save_image_atomic(scaled(uint8_to_pil(arrays[k:k + 1])[0], scale), os.path.join(out, SAMPLE_FILE.format(k)),
                              "PNG")
        where = f"{out}/{SAMPLE_FILE.format(0)} ... ({len(arrays)} files)"
    if trajectory:
        # rows: samples; columns: the sample after the marked steps, then the final image
        columns = [s for _, s in snapshots] + [latents[: snapshots[0][1].shape[0]]]
        cols = len(columns)
        strip = torch.stack(columns, dim=1).reshape(-1, *latents.shape[1:])
        save_image_atomic(make_grid(to_image(strip, "uint8").cpu(), cols, scale), trajectory, trajectory_format,
                          **_SAVE_OPTIONS.get(trajectory_format, {}))
        where += f"; trajectory ({cols} columns: after steps {', '.join(str(i + 1) for i, _ in snapshots)}, final) in {trajectory}"
    if not args.quiet:
        on = f"{device}" + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else "") + (
            f", {args.wait_policy}" if getattr(args, "wait_policy", None) and threads else "")
        print(f"kve-fast: wrote {where} in {seconds:.1f} s on {on} "
              f"({args.steps} {args.solver} steps, noise={args.noise})")
    return 0


def _generate_device(name: str, local_rank: int, torchrun: bool, world: int):
    """--device for ``generate``: under torchrun, 'auto' and 'cuda' mean this process's GPU, cuda:LOCAL_RANK."""
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CliError("--device: CUDA was asked for but no CUDA GPU is available")
    if not torchrun:
        return _device("cuda" if name == "auto" else name)
    if name not in ("auto", "cuda") and world > 1:
        raise CliError(f"--device: {name} would put every process on one GPU; under torchrun use --device cuda (each "
                       "process takes cuda:LOCAL_RANK)")
    if name not in ("auto", "cuda"):
        return _device(name)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise CliError(f"--device: this process has LOCAL_RANK {local_rank} but the machine has {count} CUDA GPU(s): "
                       f"start at most {count} processes per machine (--nproc_per_node {count})")
    return torch.device("cuda", local_rank)


def generate_command(args) -> int:
    """``kve-fast generate``: the checks (first those that need neither torch nor diffusers, the same on every
    process), the device and the process group, the model on every process, then the images."""
    from . import generate as gen

    seeds, outdir, folder = _generate_inputs(args)
    import torch

    device, backend, workers = _generate_setup(args)
    _check_churn_range(args, folder)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = gen.connect(device)
    try:
        pipe, model, code = _load_everywhere(args, device, folder, comm)
        if code is not None:
            return code
        if comm.rank == 0:
            _warn_few_steps(pipe, args)
        status: dict = {}
        try:
            summary = gen.generate_images(pipe, seeds, outdir, steps=args.steps, batch=args.batch, subdirs=args.subdirs,
                                          backend=backend, noise=args.noise, solver=args.solver, model=model, comm=comm,
                                          quiet=args.quiet, status=status, cuda_graph=_CUDA_GRAPH[args.cuda_graph],
                                          tf32=args.tf32, channels_last=args.channels_last, workers=workers)
        except (KeyboardInterrupt, _Terminated):
            if comm.rank == 0:
                print(f"kve-fast: stopped: {_stopped(status)}; rerun the same command to resume", file=sys.stderr)
            raise
        if comm.rank == 0 and not args.quiet:
            print(_generated(summary, args, len(seeds), outdir, device, backend))
        return 0
    finally:
        comm.close()


def _generate_inputs(args) -> tuple:
    """``generate``'s checks that need neither torch nor diffusers: ``(seeds, outdir, the model's folder)``."""
    from .generate import check_outdir, parse_seeds

    seeds = _ruled("--seeds", parse_seeds, args.seeds)
    outdir = _check_writable_dir(_ruled("--outdir", check_outdir, args.outdir), "--outdir")
    folder = _check_model(args.model)
    _ruled("--model", check_channels, folder.image_shape[0])
    return seeds, outdir, folder


def _generate_setup(args) -> tuple:
    """``(device, backend, workers)`` of ``generate`` (torch from here on)."""
    from . import generate as gen
    from .backends import check_backend

    rank, world, local_rank = gen.env_rank()
    device = _generate_device(args.device, local_rank, gen.launched_by_torchrun(), world)
    backend = _ruled("--backend", check_backend, args.backend, device)
    _check_cuda_graph(args, device)
    workers = None if args.workers == "auto" else args.workers
    _ruled("--workers", gen.check_workers, workers, device)
    return device, backend, workers


def _load_everywhere(args, device, folder, comm) -> tuple:
    """The model on every process; all go on only if all have it (rank 0 hashes it for the record). Returns
    ``(pipe, model identity, None)``, or ``(None, None, exit status)`` once the error is printed."""
    from .generate import model_identity

    error = model = pipe = None
    try:
        pipe = _load(args, device)
        _apply_precision(pipe, args)
        _apply_scheduler_options(pipe, args)
        if comm.rank == 0:
            model = model_identity(args.model, folder)
    except CliError as exc:
        error = (str(exc), 2)
    except Exception as exc:
        error = (f"--model: {type(exc).__name__}: {exc}", 1)
    results = comm.all_gather((error, model))
    failed = [(i, e) for i, (e, _) in enumerate(results) if e is not None]
    if not failed:
        return pipe, results[0][1], None
    where = (lambda i: f"rank {i}: " if comm.world > 1 else "")
    if error is not None:
        print(f"kve-fast: error: {where(comm.rank)}{error[0]}", file=sys.stderr)
    elif comm.rank == 0:
        print(f"kve-fast: error: {where(failed[0][0])}{failed[0][1][0]}", file=sys.stderr)
    return None, None, failed[0][1][1]


def _generated(summary, args, seeds: int, outdir: str, device, backend: str) -> str:
    """``generate``'s summary line."""
    if summary.written == 0:
        return f"kve-fast: nothing to do: the {seeds} images in {outdir} are complete"
    procs = f"{summary.world} process{'es' if summary.world > 1 else ''}"
    if device.type == "cpu":
        procs += f" x {summary.workers} worker{'s' if summary.workers > 1 else ''}"
    return (f"kve-fast: wrote {summary.written} images to {outdir} ({summary.skipped} were already there) in "
            f"{summary.seconds:.1f} s: {summary.images_per_second:.2f} images/s on {procs} ({device.type}, "
            f"{args.steps} {args.solver} steps, noise={args.noise}, backend={backend})")


def _stopped(status: dict) -> str:
    """What an interrupted ``generate`` kept: the bar counts images as they are sampled, ahead of those written."""
    written, sampled = status.get("written", 0), status.get("sampled", 0)
    if sampled <= written:
        return f"{written} images written"
    return (f"{written} images written; {sampled - written} more were sampled but not written, and are dropped (the "
            "progress bar counts images as they are sampled)")


def _on_sigterm(signum, frame):
    raise _Terminated()


# Subcommands whose process, once main() returns, has nothing left to do but tear down torch and diffusers (about
# 0.9 s of the interpreter's shutdown: bench/RESULTS.md, "Cold start"): entry() skips that teardown for them.
FAST_EXIT = ("sample", "bench")
_last_command: list[str] = []


def entry(argv: list[str] | None = None) -> None:
    """The ``kve-fast`` console script and ``python -m kve_fast``: ``main``, then the exit (``exit_now``)."""
    exit_now(main(argv))


def exit_now(code: int) -> None:
    """Exit with ``code``. After ``sample`` or ``bench``, without the interpreter's teardown (``os._exit``): their
    files are complete by then (written to a temporary name, fsync'd, renamed), and the streams and logging are
    flushed here. Other commands (``generate``'s process group) exit normally."""
    if _last_command and _last_command[-1] in FAST_EXIT:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _last_command[:] = [args.command]
    from .threads import wait_policy_for

    # How OpenMP's threads wait (they sleep if a core is busy now): must precede torch's import (kve_fast/threads.py)
    args.wait_policy = wait_policy_for(getattr(args, "device", "auto"))
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():  # signal handlers: the main thread only
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    try:
        if args.command == "sample":
            return sample_command(args)
        if args.command == "generate":
            return generate_command(args)
        if args.command == "bench":
            from .benchmark.cli import run

            return run(args)
    except CliError as exc:
        print(f"kve-fast: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .generate import GenerateError

        if not isinstance(exc, GenerateError):
            raise
        if not exc.printed:
            print(f"kve-fast: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("kve-fast: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("kve-fast: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        _unpin_threads()
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    return 0


if __name__ == "__main__":
    entry()
