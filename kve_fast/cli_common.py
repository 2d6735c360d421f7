"""What the ``kve-fast`` subcommands share: the user-error type, argument types, the device, the model, the CPU
threads. ``kve_fast.cli`` (sample, generate) and ``kve_fast.benchmark.cli`` (bench) both import it; it imports
neither.

Import-light: torch and diffusers load inside the functions that need them, after the cheap checks.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

__all__ = ["CliError", "at_least", "device_name", "resolve_device", "check_model", "load_for_command", "model_error",
           "pin_threads", "unpin_threads", "MODEL_HELP"]

MODEL_HELP = ("bundled model name ('digits'), a local diffusers folder (a UNet2DModel or a saved pipeline), or a "
              "Hugging Face Hub id ORG/NAME read from the local cache")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def at_least(kind, minimum, maximum=None):
    """An argparse type: a finite ``kind`` (int or float) >= ``minimum`` (and <= ``maximum``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a finite number'} >= {minimum}, "
                                             f"got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse type: 'auto', 'cpu', 'cuda' or 'cuda:N' (whether that GPU exists is checked later)."""
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (N a GPU index), got {text!r}")
    return text if match.group(1) is None else f"cuda:{int(match.group(1))}"


def resolve_device(name: str):
    """--device as a ``torch.device``: 'auto' is CUDA when there is a GPU; a GPU that is not there is a CliError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError("--device: CUDA was asked for but no CUDA GPU is available")
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise CliError(f"--device: {name} asked for, but this machine has {count} CUDA GPU(s): "
                           f"{', '.join(f'cuda:{i}' for i in range(count))}")
    return torch.device(name)


def model_error(exc: Exception) -> CliError:
    """A loading error as --model's one line."""
    return CliError(re.sub(r"`(pretrained_model_)?name_or_path`: ", "", f"--model: {exc}"))


def check_model(name: str, download: bool = False):
    """--model's folder, checked without torch (a Hub id resolved from the cache, or downloaded with
    ``download``), with a warning where its scheduler config is another scheduler's."""
    from .loading import check_model_folder, foreign_scheduler_message

    try:
        folder = check_model_folder(name, download)
    except (ValueError, TypeError) as exc:
        raise model_error(exc) from None
    if folder.foreign_scheduler is not None:
        print(f"kve-fast: warning: {foreign_scheduler_message(folder)}", file=sys.stderr)
    return folder


def load_for_command(model: str, device):
    """The pipeline of --model on ``device``; diffusers' own loading warnings muted (a mismatch is our one-line
    error, not also diffusers' warning), and the scheduler warning already given by ``check_model``."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from .loading import ForeignSchedulerWarning
    from .pipeline import KarrasVePipeline

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ForeignSchedulerWarning)
            return KarrasVePipeline.from_pretrained(model, device=device)
    except ValueError as exc:
        raise model_error(exc) from None
    except OSError as exc:
        raise CliError(f"--model: could not load {model!r}: {str(exc).strip()}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


_PINNED: list[int] = []  # the thread count pin_threads replaced, put back by unpin_threads


def pin_threads(requested: int | None, device) -> int | None:
    """--threads: on the CPU, the command's thread count, fixed for the whole run (so that results never depend
    on how busy the machine is: the count can change the last bits of some models); None elsewhere."""
    if device.type != "cpu":
        return None
    import torch

    from . import threads

    count = requested or torch.get_num_threads()
    if not _PINNED:
        _PINNED.append(torch.get_num_threads())
    torch.set_num_threads(count)
    threads.set_threads(count)
    return count


def unpin_threads() -> None:
    """Undo ``pin_threads`` (``kve_fast.cli.main`` may run inside a longer process: tests, scripts)."""
    if _PINNED:
        import torch

        from . import threads

        torch.set_num_threads(_PINNED[0])
        threads.set_threads(None)
        _PINNED.clear()
