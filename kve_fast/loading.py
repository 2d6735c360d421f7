"""Loading models: the bundled ones by name, or a local diffusers folder. No downloads, ever."""

from __future__ import annotations

import json
import os

from .scheduler import KarrasVeScheduler

BUNDLED = ("digits",)


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


def load_model(name_or_path: str | os.PathLike = "digits", device=None):
    """Return ``(unet, scheduler)`` for a bundled model name or a local folder.

    A folder may be a ``UNet2DModel`` folder (``config.json`` and weights, with an optional
    ``scheduler_config.json`` beside them) or a saved pipeline (``model_index.json`` with ``unet/``
    and ``scheduler/``). Without a scheduler config, the reference's defaults are used.
    """
    from diffusers import UNet2DModel

    path = resolve_model_path(name_or_path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        unet_dir, sched_dir = os.path.join(path, "unet"), os.path.join(path, "scheduler")
    else:
        unet_dir, sched_dir = path, path
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"`name_or_path`: {path!r} holds no diffusers model (no config.json)")
    with open(os.path.join(unet_dir, "config.json")) as f:
        class_name = json.load(f).get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"`name_or_path`: {path!r} holds a {class_name}, kve_fast samples UNet2DModel score models")
    unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False).eval()
    if device is not None:
        unet = unet.to(device)
    if os.path.isfile(os.path.join(sched_dir, "scheduler_config.json")):
        scheduler = KarrasVeScheduler.from_pretrained(sched_dir)
    else:
        scheduler = KarrasVeScheduler()
    return unet, scheduler


def load_pipeline(name_or_path: str | os.PathLike = "digits", device=None, **scheduler_overrides):
    """A ``KarrasVePipeline`` for a bundled model name or a local folder (see ``load_model``)."""
    from .pipeline import KarrasVePipeline

    unet, scheduler = load_model(name_or_path, device)
    if scheduler_overrides:
        scheduler = KarrasVeScheduler.from_config(scheduler.config, **scheduler_overrides)
    return KarrasVePipeline(unet=unet, scheduler=scheduler)
