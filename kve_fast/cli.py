"""``kve-fast`` (also ``python -m kve_fast``): sample images from a VE score model.

    kve-fast sample                       # 64 digits from the bundled model, as a grid PNG here
    kve-fast sample --model path/to/unet --batch-size 16 --steps 100 --out samples.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

SCHEDULES = ("diffusers", "ve", "edm")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _at_least(kind, minimum):
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kve-fast", description="Karras et al. (2022) VE sampler, fast and exact.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="generate images", description="Generate images with Algorithm 2.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="digits", help="bundled model name ('digits') or a local diffusers folder")
    p.add_argument("--batch-size", type=_at_least(int, 1), default=64, help="number of images")
    p.add_argument("--steps", type=_at_least(int, 2), default=50, help="sampling steps N (Heun: 2N - 1 model calls)")
    p.add_argument("--seed", type=_at_least(int, 0), default=0, help="seed of the CPU generator")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="step backend")
    p.add_argument("--noise", choices=("exact", "fast"), default="exact",
                   help="exact: the reference's noise stream; fast: generated on the device")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="noise levels: the reference's ('diffusers'), Table 1 VE ('ve') or Eq. 5 ('edm'); "
                        "default: the model's scheduler config")
    p.add_argument("--solver", choices=("heun", "euler"), default="heun", help="Heun (Algorithm 2) or Euler only")
    p.add_argument("--s-churn", type=_at_least(float, 0), default=None, help="S_churn (default: the model's)")
    p.add_argument("--s-noise", type=_at_least(float, 0), default=None, help="S_noise (default: the model's)")
    p.add_argument("--s-min", type=_at_least(float, 0), default=None, help="S_tmin (default: the model's)")
    p.add_argument("--s-max", type=_at_least(float, 0), default=None, help="S_tmax (default: the model's)")
    p.add_argument("--out", default=None,
                   help="output PNG (grid; default kve_fast_samples.png) or folder (--no-grid; default kve_fast_samples)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="one grid image, or one file per image")
    p.add_argument("--scale", type=_at_least(int, 1), default=None,
                   help="nearest-neighbour upscaling of each image (default: to at least 32 pixels)")
    p.add_argument("--trajectory", default=None, metavar="FILE",
                   help="also write a PNG strip of the first samples at several steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def _check_writable_file(path: str, what: str) -> str:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise CliError(f"{what}: {path} is a folder, expected a .png file path")
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


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device: CUDA was asked for but no CUDA GPU is available")
    return device


def _to_uint8(images):
    """BCHW float in [0, 1] to BHWC uint8, rounded as diffusers' numpy_to_pil does."""
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")


def _pil(array, scale: int):
    from PIL import Image

    image = Image.fromarray(array.squeeze(-1), mode="L") if array.shape[-1] == 1 else Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


def make_grid(arrays, ncols: int, scale: int, pad: int = 2):
    """Images (BHWC uint8) tiled into one PIL image, ``ncols`` per row."""
    from PIL import Image

    tiles = [_pil(a, scale) for a in arrays]
    w, h = tiles[0].size
    nrows = math.ceil(len(tiles) / ncols)
    grid = Image.new(tiles[0].mode, (ncols * (w + pad) + pad, nrows * (h + pad) + pad), color=255 if tiles[0].mode == "L" else (255, 255, 255))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def sample_command(args) -> int:
    import torch

    from .loading import load_pipeline
    from .scheduler import KarrasVeScheduler

    if args.grid:
        out = _check_writable_file(args.out or "kve_fast_samples.png", "--out")
    else:
        out = _check_writable_dir(args.out or "kve_fast_samples", "--out")
    trajectory = _check_writable_file(args.trajectory, "--trajectory") if args.trajectory else None
    device = _device(args.device)
    overrides = {k: v for k, v in {"sigma_schedule": args.schedule, "s_churn": args.s_churn, "s_noise": args.s_noise,
                                   "s_min": args.s_min, "s_max": args.s_max}.items() if v is not None}
    try:
        pipe = load_pipeline(args.model, device)
    except ValueError as exc:
        raise CliError(f"--model: {exc}".replace("`name_or_path`: ", "")) from None
    except OSError as exc:
        raise CliError(f"--model: could not load {args.model!r}: {exc}") from None
    if overrides:
        try:
            pipe.scheduler = KarrasVeScheduler.from_config(pipe.scheduler.config, **overrides)
        except (ValueError, TypeError) as exc:
            raise CliError(f"invalid sampler settings: {exc}") from None
    pipe.set_progress_bar_config(disable=args.quiet, desc="sampling")

    snapshots: list[tuple[int, torch.Tensor]] = []
    callback = None
    if trajectory:
        keep = max(1, min(args.batch_size, 8))
        marks = set(int(round(k * (args.steps - 1) / 7)) for k in range(8))

        def callback(p, i, t, kwargs):
            if i in marks:
                snapshots.append((i, kwargs["sample"][:keep].detach().clone()))
            return {}

    start = time.perf_counter()
    try:
        images = pipe(args.batch_size, args.steps, torch.Generator().manual_seed(args.seed), output_type="pt",
                      backend=args.backend, noise=args.noise, solver=args.solver,
                      callback_on_step_end=callback).images
    except ValueError as exc:
        raise CliError(str(exc)) from None
    seconds = time.perf_counter() - start
    arrays = _to_uint8(images)
    size = max(arrays.shape[1], arrays.shape[2])
    scale = args.scale or max(1, math.ceil(32 / size))
    if args.grid:
        make_grid(arrays, math.ceil(math.sqrt(len(arrays))), scale).save(out)
        where = f"{out} ({len(arrays)} images in a grid)"
    else:
        os.makedirs(out, exist_ok=True)
        for k, a in enumerate(arrays):
            _pil(a, scale).save(os.path.join(out, f"sample_{k:04d}.png"))
        where = f"{out}/sample_0000.png ... ({len(arrays)} files)"
    if trajectory:
        from .ops.step_torch import to_image

        columns = [to_image(s) for _, s in snapshots] + [images[: snapshots[0][1].shape[0]]]
        # rows: samples; columns: the sample after the marked steps, then the final image
        cols = len(columns)
        strip = torch.stack(columns, dim=1).reshape(-1, *images.shape[1:])
        make_grid(_to_uint8(strip), cols, scale).save(trajectory)
        where += f"; trajectory ({cols} columns: after steps {', '.join(str(i + 1) for i, _ in snapshots)}, final) in {trajectory}"
    if not args.quiet:
        print(f"kve-fast: wrote {where} in {seconds:.1f} s on {device} "
              f"({args.steps} {args.solver} steps, noise={args.noise})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            return sample_command(args)
    except CliError as exc:
        print(f"kve-fast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kve-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
