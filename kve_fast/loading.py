"""Loading models: the bundled ones by name, or a local diffusers folder. No downloads, ever.

Import-light: diffusers, torch and the scheduler load inside ``load_model``, so ``check_model_folder``
(the JSON and file checks, with a clear ``ValueError`` for each problem) costs next to nothing and the
command line runs it before anything heavy.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

BUNDLED = ("digits",)
# The weights files diffusers' UNet2DModel.from_pretrained reads (no variant): whole or sharded.
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
# config.json fields without which the image shape is unknown (diffusers' defaults: None, 3 and 3).
REQUIRED_UNET_FIELDS = ("sample_size", "in_channels", "out_channels")


def _bundled_dir(name: str) -> str:
    from .models import DIGITS_MODEL_DIR

    return {"digits": DIGITS_MODEL_DIR}[name]


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """The folder for a bundled model's name, or ``name_or_path`` itself if it is a folder."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a model name or a folder path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name in BUNDLED:
        return _bundled_dir(name)
    if os.path.isdir(name):
        return name
    raise ValueError(
        f"`name_or_path`: no bundled model named {name!r} (bundled: {', '.join(BUNDLED)}) and no folder {name!r}"
    )


def _read_json_object(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"`name_or_path`: {file} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise ValueError(f"`name_or_path`: cannot read {file} ({exc.strerror or exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"`name_or_path`: {file} holds a JSON {type(value).__name__}, expected an object")
    return value


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_unet_config(config: dict, file: str) -> None:
    if not config:
        raise ValueError(f"`name_or_path`: {file} is an empty JSON object, expected a UNet2DModel config")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"`name_or_path`: {file} describes a {class_name}, kve_fast samples UNet2DModel score models")
    missing = [k for k in REQUIRED_UNET_FIELDS if config.get(k) is None]
    if missing:
        raise ValueError(f"`name_or_path`: {file} has no {', '.join(repr(k) for k in missing)}")
    size = config["sample_size"]
    if not (_is_positive_int(size) or (isinstance(size, list) and len(size) == 2 and all(map(_is_positive_int, size)))):
        raise ValueError(f"`name_or_path`: {file}: 'sample_size' must be a positive integer or [height, width], got {size!r}")
    for key in ("in_channels", "out_channels", "layers_per_block"):
        if key in config and not _is_positive_int(config[key]):
            raise ValueError(f"`name_or_path`: {file}: {key!r} must be a positive integer, got {config[key]!r}")
    if config["in_channels"] != config["out_channels"]:
        raise ValueError(f"`name_or_path`: {file}: the model maps {config['in_channels']} channels to "
                         f"{config['out_channels']}; a score model's output must match its input")
    blocks = config.get("block_out_channels")
    if blocks is not None and not (isinstance(blocks, list) and blocks and all(map(_is_positive_int, blocks))):
        raise ValueError(f"`name_or_path`: {file}: 'block_out_channels' must be a list of positive integers, got {blocks!r}")


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder: where the UNet and the scheduler config are, and their configs."""

    path: str
    unet_dir: str
    scheduler_dir: str
    unet_config: dict
    scheduler_config: dict | None  # None: no scheduler_config.json, the reference's defaults apply

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the model generates."""
        size = self.unet_config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return self.unet_config["in_channels"], height, width


def check_model_folder(name_or_path: str | os.PathLike = "digits") -> ModelFolder:
    """Check a bundled model name or a local folder without loading anything heavy (see ``load_model``).

    Raises ``ValueError`` naming the problem: no such folder, no or unreadable ``config.json``, a config that is
    not a JSON object or lacks the image shape, no weights file, an unreadable ``scheduler_config.json``.
    """
    path = resolve_model_path(name_or_path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        unet_dir, sched_dir = os.path.join(path, "unet"), os.path.join(path, "scheduler")
    else:
        unet_dir, sched_dir = path, path
    config_file = os.path.join(unet_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"`name_or_path`: {path!r} holds no diffusers model (no {os.path.relpath(config_file, path)})")
    unet_config = _read_json_object(config_file)
    _check_unet_config(unet_config, config_file)
    if not any(os.path.isfile(os.path.join(unet_dir, name)) for name in WEIGHTS_FILES):
        raise ValueError(f"`name_or_path`: {unet_dir!r} holds no weights ({WEIGHTS_FILES[0]} or {WEIGHTS_FILES[1]})")
    sched_file = os.path.join(sched_dir, "scheduler_config.json")
    sched_config = _read_json_object(sched_file) if os.path.isfile(sched_file) else None
    return ModelFolder(path, unet_dir, sched_dir, unet_config, sched_config)


def _mismatch_summary(exc: RuntimeError) -> str:
    """torch's "size mismatch for NAME: copying a param with shape torch.Size([..]) from checkpoint, the shape
    in current model is torch.Size([..])." lines, as one short sentence."""
    found = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                       r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", str(exc))
    if not found:
        return str(exc).strip().splitlines()[0]
    name, have, want = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{name} is {have} in the weights but {want} by the config{more}"


def _key_summary(keys: list[str], what: str) -> str:
    return f"{what}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"


def load_model(name_or_path: str | os.PathLike = "digits", device=None):
    """Return ``(unet, scheduler)`` for a bundled model name or a local folder.

    A folder may be a ``UNet2DModel`` folder (``config.json`` and weights, with an optional
    ``scheduler_config.json`` beside them) or a saved pipeline (``model_index.json`` with ``unet/``
    and ``scheduler/``). Without a scheduler config, the reference's defaults are used. A folder that
    cannot give the model it describes (see ``check_model_folder``; weights whose names or shapes do not
    match ``config.json``; a config diffusers cannot build; scheduler settings out of range) is a ``ValueError``.
    """
    folder = check_model_folder(name_or_path)
    from diffusers import UNet2DModel

    from .scheduler import KarrasVeScheduler

    config_file = os.path.join(folder.unet_dir, "config.json")
    try:
        unet, info = UNet2DModel.from_pretrained(folder.unet_dir, low_cpu_mem_usage=False, output_loading_info=True)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise ValueError(f"`name_or_path`: the weights in {folder.unet_dir!r} do not match its config.json: "
                         f"{_mismatch_summary(exc)}") from None
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"`name_or_path`: diffusers cannot build a UNet2DModel from {config_file} "
                         f"({type(exc).__name__}: {exc})") from None
    problems = []
    if info.get("missing_keys"):
        problems.append(_key_summary(sorted(info["missing_keys"]), "missing from the weights"))
    if info.get("unexpected_keys"):
        problems.append(_key_summary(sorted(info["unexpected_keys"]), "in the weights but not in the model"))
    if info.get("mismatched_keys"):
        problems.append(_key_summary(sorted(str(k[0]) for k in info["mismatched_keys"]), "of the wrong shape"))
    if problems:
        raise ValueError(f"`name_or_path`: the weights in {folder.unet_dir!r} do not match its config.json: "
                         + "; ".join(problems))
    unet = unet.eval()
    if device is not None:
        unet = unet.to(device)
    if folder.scheduler_config is not None:
        try:
            scheduler = KarrasVeScheduler.from_pretrained(folder.scheduler_dir)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"`name_or_path`: {os.path.join(folder.scheduler_dir, 'scheduler_config.json')}: "
                             f"{exc}") from None
    else:
        scheduler = KarrasVeScheduler()
    return unet, scheduler


def load_pipeline(name_or_path: str | os.PathLike = "digits", device=None, **scheduler_overrides):
    """A ``KarrasVePipeline`` for a bundled model name or a local folder (see ``load_model``)."""
    from .pipeline import KarrasVePipeline
    from .scheduler import KarrasVeScheduler

    unet, scheduler = load_model(name_or_path, device)
    if scheduler_overrides:
        scheduler = KarrasVeScheduler.from_config(scheduler.config, **scheduler_overrides)
    return KarrasVePipeline(unet=unet, scheduler=scheduler)
