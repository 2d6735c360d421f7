"""The rules of ``generate``'s arguments, in one place: ``generate_images`` and the ``kve-fast generate`` command both
call them and name the argument their way (`` `workers` `` in Python, ``--workers`` on the command line), so each
rule has one wording. Import-light: the command checks before torch loads."""

from __future__ import annotations

import os
import sys

from ..images import check_channels
from .workers import FORK_WORKERS

__all__ = ["check_outdir", "check_workers", "check_channels", "check_args", "named"]


def check_outdir(outdir) -> str:
    """``outdir`` as a path (``TypeError``, ``ValueError`` for an empty one)."""
    if not isinstance(outdir, (str, os.PathLike)):
        raise TypeError(f"must be a folder path, got {type(outdir).__name__}")
    if not os.fspath(outdir):
        raise ValueError("empty; name the output folder (. for this one)")
    return os.fspath(outdir)


def check_workers(workers: int | None, device) -> None:
    """More than one worker samples on the CPU only (``device``: where the model runs), in forked processes: on Linux
    only. ``ValueError`` otherwise (None, 1: the default, one in this process)."""
    if workers is None or workers <= 1:
        return
    if getattr(device, "type", device) != "cpu":
        raise ValueError(f"more than one worker is for the CPU; the device is {device}")
    if not FORK_WORKERS:
        raise ValueError(f"worker processes are forked, on Linux only (this is {sys.platform}); use one worker, and "
                         "torchrun for more processes")


def named(name: str, check, *args):
    """``check(*args)`` for ``generate_images``: its error names the argument, `` `name`: ... ``."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"`{name}`: {exc}") from None


def check_args(pipe, outdir, settings: dict, *, model, comm, status, quiet) -> None:
    """``generate_images``' arguments, before any work (``settings``: its sampler settings, by name)."""
    from .._checks import check_int
    from ..graphs import check_cuda_graph
    from ..options import BACKENDS, NOISE_MODES, SOLVERS

    for attribute in ("unet", "scheduler", "_image_shape", "device"):
        if not hasattr(pipe, attribute):
            raise TypeError(f"`pipe` must be a KarrasVePipeline, got {type(pipe).__name__}")
    named("outdir", check_outdir, outdir)
    check_int("steps", settings["steps"], 2)  # (the sampler's minimum: Algorithm 2 needs two noise levels above 0)
    check_int("batch", settings["batch"], 1)
    check_cuda_graph(settings["cuda_graph"])
    if model is not None and not (isinstance(model, dict) and isinstance(model.get("name"), str)
                                  and isinstance(model.get("sha256"), str)):
        raise TypeError(f"`model` must be None or a dict with str 'name' and 'sha256', got {model!r:.80}")
    if status is not None and not isinstance(status, dict):
        raise TypeError(f"`status` must be None or a dict, got {type(status).__name__}")
    if comm is not None and not all(hasattr(comm, a) for a in ("rank", "world", "all_gather")):
        raise TypeError(f"`comm` must be None or have rank, world and all_gather, got {type(comm).__name__}")
    flags = {"quiet": quiet, **{k: settings[k] for k in ("subdirs", "tf32", "channels_last")}}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False, got {type(value).__name__}")
    for name, choices in (("backend", BACKENDS), ("noise", NOISE_MODES), ("solver", SOLVERS)):
        if not isinstance(settings[name], str) or settings[name] not in choices:
            raise ValueError(f"`{name}` must be one of {choices}, got {settings[name]!r}")
    if settings["workers"] is not None:
        check_int("workers", settings["workers"], 1)
        named("workers", check_workers, settings["workers"], pipe.device)
