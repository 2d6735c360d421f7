"""The record (``DIR/record.json``): everything that can change a file's bytes, compared by value on every run.

What it holds and why: docs/generate.md, "The record". The model's hash, the sampler's settings, the noise stream,
the layout, ``--batch``, ``--subdirs``, the device (its kind, ISA, threads per worker, torch's float32 precision
switches, the environment variables that change its kernels) and the libraries' versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat

from .. import _files
from .errors import GenerateError

RECORD = "record.json"
RECORD_FORMAT = "kve-fast generate record 1"
THREADS_PER_WORKER = 1  # intra-op CPU threads of each worker: conv results depend on the thread count


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(name: str, folder) -> dict:
    """``{"name", "sha256"}``: the model as given, and a hash of its config.json and weights files."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(folder.unet_dir)
                   if f == "config.json" or f.startswith("diffusion_pytorch_model"))
    for file in files:
        h.update(file.encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(os.path.join(folder.unet_dir, file))))
    return {"name": str(name), "sha256": h.hexdigest()}


def module_identity(module) -> dict:
    """``{"name", "sha256"}`` of a model in memory: its class, config (if any) and every parameter and buffer."""
    import torch

    h = hashlib.sha256()
    name = type(module).__name__
    h.update(name.encode() + b"\0")
    config = getattr(module, "config", None)
    if config is not None:
        with contextlib.suppress(TypeError, ValueError):
            h.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    state = module.state_dict() if isinstance(module, torch.nn.Module) else {}
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"name": name, "sha256": h.hexdigest()}


def sampler_settings(pipe, steps: int, solver: str, noise: str, tf32: bool = False) -> dict:
    """The sampler's part of the record: steps, solver, noise mode, scheduler settings, image shape, precision."""
    from ..precision import model_dtype

    config = pipe.scheduler.config
    keys = ("sigma_schedule", "sigma_min", "sigma_max", "s_churn", "s_noise", "s_min", "s_max", "rho")
    scheduler = {k: config[k] for k in keys if k in config}
    scheduler.setdefault("sigma_schedule", "diffusers")
    channels, height, width = pipe._image_shape(1)[1:]
    return {"steps": steps, "solver": solver, "noise": noise, "scheduler": scheduler,
            "image": [channels, height, width],
            "precision": {"unet_dtype": str(model_dtype(pipe.unet)).replace("torch.", ""), "tf32": tf32}}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    import platform

    return platform.processor() or platform.machine()


# Environment variables that change which kernels run, or their arithmetic, once torch's libraries read them:
# oneDNN's and ATen's ISA ceilings, oneDNN's implicit bf16 math, MKL's reproducibility branch and ISA ceiling,
# the CUDA driver's and torch's TF32 overrides, cuBLAS's workspace (deterministic algorithms). Recorded when set.
BITS_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_DEFAULT_FPMATH_MODE",
                    "ONEDNN_DEFAULT_FPMATH_MODE", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "NVIDIA_TF32_OVERRIDE",
                    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG")


def _fp32_precision(kind: str) -> dict:
    """torch's float32 precision switches that reach ``kind``'s kernels (``kve_fast.precision.fp32_nodes``: read
    through the ``fp32_precision`` tree, which the legacy flags also set, and which never raises torch's "mix of
    the legacy and new APIs" error), and on CUDA the reduced-precision reductions."""
    import torch

    from ..precision import fp32_nodes

    out = fp32_nodes(kind)
    if kind == "cuda":
        b = torch.backends
        out["fp16_reduced_precision_reduction"] = bool(b.cuda.matmul.allow_fp16_reduced_precision_reduction)
        out["bf16_reduced_precision_reduction"] = bool(b.cuda.matmul.allow_bf16_reduced_precision_reduction)
    return out


def device_identity(device) -> dict:
    """What of the device can change the bytes: the CPU (model, ISA, threads per worker) or the GPU and its
    libraries; torch's float32 precision switches for it, and the environment variables that change its kernels."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        out = {"kind": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    elif device.type == "cpu":
        out = {"kind": "cpu", "cpu": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
               "threads": THREADS_PER_WORKER}
    else:
        out = {"kind": device.type}
    out["fp32_precision"] = _fp32_precision(device.type)
    out["environment"] = {name: os.environ[name] for name in BITS_ENVIRONMENT if name in os.environ}
    return out


def software_versions() -> dict:
    """The libraries whose versions can change the bytes (the model's kernels, the sampler, the PNG encoder)."""
    import diffusers
    import PIL
    import torch
    from PIL import features

    from .. import __version__

    return {"kve_fast": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "pillow": PIL.__version__, "zlib": features.version("zlib")}


def make_record(pipe, *, model: dict, steps: int, solver: str, noise: str, backend: str, tf32: bool,
                channels_last: bool, batch: int, subdirs: bool, device: dict) -> dict:
    """The record of everything that can change a file's bytes (``DIR/record.json``)."""
    return {
        "format": RECORD_FORMAT,
        "model": model,
        "settings": sampler_settings(pipe, steps, solver, noise, tf32),
        # exact noise is the reference's stream on every backend; fast noise is each backend's own Philox stream
        "noise_stream": "reference" if noise == "exact" else f"philox:{backend}",
        "layout": "channels_last" if channels_last else "contiguous",
        "batch": batch,
        "subdirs": subdirs,
        "device": device,
        "software": software_versions(),
    }


def record_id(record: dict) -> str:
    """A short hash of ``record``: every manifest line carries the id of the record it was written under."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# The option behind each recorded field (the rest are named by their place in the record).
_OPTIONS = {
    "model": "--model", "settings.steps": "--steps", "settings.solver": "--solver", "settings.noise": "--noise",
    "settings.scheduler.sigma_schedule": "--schedule", "settings.scheduler.s_churn": "--s-churn",
    "settings.scheduler.s_noise": "--s-noise", "settings.scheduler.s_min": "--s-min",
    "settings.scheduler.s_max": "--s-max", "settings.image": "--model (image shape)",
    "settings.precision.unet_dtype": "--unet-dtype", "settings.precision.tf32": "--tf32",
    "noise_stream": "--backend (fast noise's stream)", "layout": "--channels-last", "batch": "--batch",
    "subdirs": "--subdirs",
}
_PLACES = {"device.environment.": "{} in the environment", "device.fp32_precision.": "torch's fp32_precision of {}"}


class _Missing:
    def __repr__(self) -> str:
        return "(unset)"


_MISSING = _Missing()


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and prefix != "model":
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _same(before, after, key: str) -> bool:
    """Equal as values (80 and 80.0 are one setting; True and 1 are not); a model by its weights' hash, whatever
    name or path it was given by."""
    if key == "model":
        return isinstance(before, dict) and isinstance(after, dict) and before.get("sha256") == after.get("sha256")
    if isinstance(before, bool) or isinstance(after, bool):
        return type(before) is type(after) and before == after
    return before == after


def _label(key: str) -> str:
    for place, label in _PLACES.items():
        if key.startswith(place):
            return label.format(key[len(place):])
    return _OPTIONS.get(key, key)


def record_differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, each as ``"--steps 30 (now 50)"`` (the option, or the field's place)."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in list(b) + [k for k in a if k not in b]:
        before, after = a.get(key, _MISSING), b.get(key, _MISSING)
        if _same(before, after, key):
            continue
        if key == "model":
            old_model = before if isinstance(before, dict) else {}
            new_model = after if isinstance(after, dict) else {}
            out.append(f"--model: other weights ({old_model.get('name')!r} {str(old_model.get('sha256'))[:12]}, "
                       f"now {new_model.get('name')!r} {str(new_model.get('sha256'))[:12]})")
        else:
            out.append(f"{_label(key)} {before!r} (now {after!r})")
    return out


def read_record(path: str) -> dict | None:
    """The record at ``path`` (None if there is none); ``GenerateError`` for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise GenerateError(f"--outdir: {path} is a {_files.file_kind(st.st_mode)}, not the regular file of a "
                            "kve-fast generate record: refused", code=2)
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise GenerateError(f"--outdir: {path} is not a kve-fast generate record (not JSON: {exc}); nothing vouches "
                            "for the folder's files: use another folder", code=2) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise GenerateError(f"--outdir: {path} is not a kve-fast generate record of this version (format "
                            f"{record.get('format') if isinstance(record, dict) else None!r}, expected "
                            f"{RECORD_FORMAT!r}): use another folder", code=2)
    return record
