"""Loading models: the bundled ones by name, a local diffusers folder, or a Hugging Face Hub id.

A Hub id (``ORG/NAME``, when no local folder has that name) is read from the local Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``): offline, never a download unless
asked for (``download=True``, ``kve-fast sample --download``), which fetches only the files a
``UNet2DModel`` and its scheduler need.

Import-light: diffusers, torch, huggingface_hub and the scheduler load inside the functions that need them,
so ``check_model_folder`` (the JSON and file checks, with a clear ``ValueError`` for each problem) costs next
to nothing and the command line runs it before anything heavy.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass

BUNDLED = ("digits",)
# A Hugging Face Hub model id: ORG/NAME (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What --download fetches: the pipeline's index, the UNet's config and weights (one format), the scheduler's config,
# at the top level (a bare UNet) or in unet/ and scheduler/ (a saved pipeline).
_HUB_CONFIGS = ("model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
                "scheduler/scheduler_config.json")
SCHEDULER_CLASS = "KarrasVeScheduler"


class ForeignSchedulerWarning(UserWarning):
    """The model's scheduler config is another scheduler's (a ScoreSdeVeScheduler's, say): not used."""
# The weights files diffusers' UNet2DModel.from_pretrained reads (no variant): whole or sharded.
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
# config.json fields without which the image shape is unknown (diffusers' defaults: None, 3 and 3).
REQUIRED_UNET_FIELDS = ("sample_size", "in_channels", "out_channels")


def _bundled_dir(name: str) -> str:
    from .models import DIGITS_MODEL_DIR

    return {"digits": DIGITS_MODEL_DIR}[name]


def hub_cache_dir() -> str:
    """The Hugging Face cache folder, as huggingface_hub finds it (``HF_HUB_CACHE``, ``HF_HOME/hub``,
    ``XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def looks_like_hub_id(name: str) -> bool:
    """``ORG/NAME`` that is not a local path."""
    return HUB_ID.fullmatch(name) is not None and not os.path.exists(name)


def _cached_snapshot(repo_id: str, cache: str) -> str | None:
    """The cached snapshot folder of ``repo_id``'s main branch, or None (huggingface_hub's cache layout:
    ``models--ORG--NAME/refs/main`` holds the commit, ``snapshots/COMMIT`` its files)."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    try:
        with open(os.path.join(repo, "refs", "main"), encoding="utf-8") as f:
            commit = f.read().strip()
    except OSError:
        return None
    snapshot = os.path.join(repo, "snapshots", commit)
    return snapshot if commit and os.path.isdir(snapshot) else None


def download_command(repo_id: str) -> str:
    return f"kve-fast sample --model {repo_id} --download"


def hub_snapshot(repo_id: str, download: bool = False) -> str:
    """The local folder of Hub model ``repo_id`` (its cached snapshot); with ``download``, fetched first if it is
    not cached (only the files a UNet2DModel and its scheduler need). A ``ValueError`` says how to get it."""
    cache = hub_cache_dir()
    found = _cached_snapshot(repo_id, cache)
    if found is not None or not download:
        if found is None:
            raise ValueError(f"`name_or_path`: {repo_id!r} looks like a Hugging Face Hub id but is not in the local "
                             f"cache ({cache}) and no folder has that name; download it with: "
                             f"{download_command(repo_id)} (in Python: download=True)")
        return found
    return _download(repo_id, cache)


def _download(repo_id: str, cache: str) -> str:
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError as exc:  # diffusers depends on it, so this is a broken install
        raise ValueError(f"`name_or_path`: downloading {repo_id!r} needs huggingface_hub ({exc})") from None

    def failed(exc: Exception) -> ValueError:  # network, authentication, a repository that does not exist
        text = str(exc).strip()
        return ValueError(f"`name_or_path`: could not download {repo_id!r} from the Hugging Face Hub: "
                          f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")

    try:
        files = list_repo_files(repo_id)
    except Exception as exc:
        raise failed(exc) from None
    wanted = hub_files_to_fetch(files)
    if not any(f.endswith("config.json") and "scheduler" not in f for f in wanted):
        raise ValueError(f"`name_or_path`: the Hub model {repo_id!r} has neither config.json nor unet/config.json: "
                         "not a diffusers UNet2DModel or pipeline")
    try:
        return snapshot_download(repo_id, cache_dir=cache, allow_patterns=wanted)
    except Exception as exc:
        raise failed(exc) from None


def hub_files_to_fetch(files: list[str]) -> list[str]:
    """Of a Hub repository's files, those a UNet2DModel and its scheduler need: the configs, and the weights in
    one format (safetensors if there are any, else .bin; never the fp16 or other variants)."""
    wanted = [f for f in files if f in _HUB_CONFIGS]
    for folder in ("", "unet/"):
        names = [f[len(folder):] for f in files if f.startswith(folder) and "/" not in f[len(folder):]]
        for fmt in ("safetensors", "bin"):  # one format: both would double the download
            weights = [n for n in names
                       if re.fullmatch(rf"diffusion_pytorch_model(-\d+-of-\d+)?\.{fmt}(\.index\.json)?", n)]
            if weights:
                wanted += [folder + n for n in sorted(weights)]
                break
    return wanted


def resolve_model_path(name_or_path: str | os.PathLike, download: bool = False) -> str:
    """The folder for a bundled model's name, ``name_or_path`` itself if it is a folder, or the cached snapshot
    of a Hugging Face Hub id (fetched first with ``download``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a model name or a folder path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if name in BUNDLED:
        return _bundled_dir(name)
    if os.path.isdir(name):
        return name
    if looks_like_hub_id(name):
        return hub_snapshot(name, download)
    raise ValueError(
        f"`name_or_path`: no bundled model named {name!r} (bundled: {', '.join(BUNDLED)}), no folder {name!r}, "
        "and not a Hugging Face Hub id (ORG/NAME)"
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
    scheduler_config: dict | None  # None: no (or another scheduler's) scheduler_config.json: the reference's defaults
    foreign_scheduler: str | None = None  # the class of another scheduler's config found there (not used)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the model generates."""
        size = self.unet_config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return self.unet_config["in_channels"], height, width


def check_model_folder(name_or_path: str | os.PathLike = "digits", download: bool = False) -> ModelFolder:
    """Check a bundled model name, a local folder or a cached Hub id without loading anything heavy (see
    ``load_model``).

    Raises ``ValueError`` naming the problem: no such folder, a Hub id not in the cache, no or unreadable
    ``config.json``, a config that is not a JSON object or lacks the image shape, no weights file, an unreadable
    ``scheduler_config.json``.
    """
    path = resolve_model_path(name_or_path, download)
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
    foreign = None
    if sched_config is not None and sched_config.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        # Another scheduler's settings (ScoreSdeVeScheduler's sigma_max=348, say) mean something else there:
        # the reference's defaults apply, as in diffusers' own KarrasVePipeline test of such a checkpoint.
        foreign, sched_config = str(sched_config["_class_name"]), None
    return ModelFolder(path, unet_dir, sched_dir, unet_config, sched_config, foreign)


def foreign_scheduler_message(folder: ModelFolder) -> str:
    return (f"{os.path.join(folder.scheduler_dir, 'scheduler_config.json')} is a {folder.foreign_scheduler}'s config, "
            f"not a {SCHEDULER_CLASS}'s: not used; the reference's defaults apply (sigma_min=0.02, sigma_max=100; "
            "change them with the scheduler's settings)")


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


def load_model(name_or_path: str | os.PathLike = "digits", device=None, *, download: bool = False):
    """Return ``(unet, scheduler)`` for a bundled model name, a local folder or a Hugging Face Hub id.

    A folder may be a ``UNet2DModel`` folder (``config.json`` and weights, with an optional
    ``scheduler_config.json`` beside them) or a saved pipeline (``model_index.json`` with ``unet/``
    and ``scheduler/``). A Hub id (``ORG/NAME``) is read from the local Hugging Face cache; ``download=True``
    fetches it first when it is not there. Without a scheduler config (or with another scheduler's, which
    warns), the reference's defaults are used. A folder that cannot give the model it describes (see
    ``check_model_folder``; weights whose names or shapes do not match ``config.json``; a config diffusers
    cannot build; scheduler settings out of range) is a ``ValueError``.
    """
    folder = check_model_folder(name_or_path, download)
    if folder.foreign_scheduler is not None:
        warnings.warn(foreign_scheduler_message(folder), ForeignSchedulerWarning, stacklevel=2)
    from diffusers import UNet2DModel

    from .karras_ve_scheduler import KarrasVeScheduler

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
