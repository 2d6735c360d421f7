"""``kve-fast generate``: one PNG per seed, for evaluation sets (50,000 images for FID), on one process or
many (``torchrun``: NCCL on GPUs, gloo on CPUs, multi-node through torchrun's rendezvous).

    kve-fast generate --model M --seeds 0-49999 --outdir DIR [--batch N] [--subdirs]
    torchrun --nproc_per_node=K -m kve_fast generate --model M --seeds 0-49999 --outdir DIR

The full reference (the folder, the record, the write protocol, resumes, threads, faults) is docs/generate.md.
In short:

- ``DIR/record.json`` holds everything that can change a file's bytes (model hash, sampler settings, noise
  stream, precision, layout, ``--batch``, ``--subdirs``, the device kind and CPU threads, torch's precision switches,
  the environment variables that change kernels, library versions). It is written atomically before the first
  image; every later run into ``DIR`` must match it by value or is refused, leaving the folder as it was.
- ``DIR/manifest.jsonl`` gets a line per file (seed, file, SHA-256, the record's id), fsync'd *before* the file is
  renamed into place (write-ahead): every file under a seed's name that a killed run left is vouched for by a
  line with its hash. A PNG the manifest does not vouch for is refused, never adopted; a listed file whose bytes
  changed is made again.
- On the CPU every worker samples with one intra-op thread (``--workers`` worker processes side by side, on
  batches of their own), so the files are the same however the seeds are split over processes and workers.
- Seeds are ranges, never a list; each process walks its share lazily, checking files as it goes.

Import-light: torch, PIL and diffusers load inside the functions that need them.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import os
import queue
import re
import stat
import sys
import threading
import time
from datetime import timedelta

from . import _files

MANIFEST = "manifest.jsonl"
RECORD = "record.json"
RECORD_FORMAT = "kve-fast generate record 1"
JOB_FILE = ".kve-fast-job"  # rank 0's token for this job: every rank must see it (one shared folder)
SHARED_WAIT = 30.0  # seconds a rank waits for the token to show (network file systems cache lookups)
SEED_LIMIT = 2**32  # torch's CPU generator keeps only the low 32 bits of a seed: larger ones repeat images
MAX_SEEDS = 10_000_000
SUBDIR_SIZE = 1000
THREADS_PER_WORKER = 1  # intra-op CPU threads of each worker: conv results depend on the thread count
FORK_WORKERS = sys.platform.startswith("linux")  # CPU worker processes (forked: tested on Linux only)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # how long a rank waits for the others at the end of a batch
# What FID tools read as images (pytorch-fid's list; clean-fid and EDM read fewer): none may be foreign.
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
_TEMP = re.compile(r"^\.([0-9]{6,}\.png|record\.json|\.kve-fast-job)\..*\.tmp$")  # what atomic_write leaves after a SIGKILL
_FILE = re.compile(r"^([0-9]{6,})\.png$")
_SUBDIR = re.compile(r"^[0-9]{6,}$")
_SEED_PART = re.compile(r"[ \t]*([0-9]+)(?:[ \t]*-[ \t]*([0-9]+))?[ \t]*")  # ASCII digits and blanks only


class GenerateError(Exception):
    """A failure that stops the job; ``code`` is the exit status, ``printed`` whether the reason is already out."""

    def __init__(self, message: str, code: int = 1, printed: bool = False):
        super().__init__(message)
        self.code, self.printed = code, printed


# ---- seeds -------------------------------------------------------------------------------------------------

class Seeds:
    """Seeds as sorted, disjoint, inclusive ranges: counted, tested and walked without a list of them."""

    def __init__(self, ranges):
        merged: list[list[int]] = []
        for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = tuple((lo, hi) for lo, hi in merged)
        self._starts = [lo for lo, _ in self.ranges]
        self._before = list(itertools.accumulate((hi - lo + 1 for lo, hi in self.ranges), initial=0))

    @classmethod
    def from_ints(cls, seeds) -> "Seeds":
        return cls((s, s) for s in seeds)

    def __len__(self) -> int:
        return self._before[-1]

    def __iter__(self):
        return itertools.chain.from_iterable(range(lo, hi + 1) for lo, hi in self.ranges)

    def __contains__(self, seed) -> bool:
        k = bisect.bisect_right(self._starts, seed) - 1
        return k >= 0 and seed <= self.ranges[k][1]

    def index(self, seed: int) -> int:
        """The place of ``seed`` in the sorted seeds (``ValueError`` if it is not one)."""
        k = bisect.bisect_right(self._starts, seed) - 1
        if k < 0 or seed > self.ranges[k][1]:
            raise ValueError(f"{seed} is not one of the seeds")
        return self._before[k] + seed - self.ranges[k][0]

    def share(self, rank: int, world: int):
        """Rank ``rank``'s seeds of ``world``: every ``world``-th from place ``rank`` (an iterator)."""
        return itertools.islice(iter(self), rank, None, world)

    def __eq__(self, other) -> bool:
        return isinstance(other, Seeds) and self.ranges == other.ranges

    def __repr__(self) -> str:
        return "Seeds(" + ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges) + ")"


def parse_seeds(text: str) -> Seeds:
    """``"0-49999"``, ``"7"``, ``"0,5,10-19"``: the seeds (ASCII digits), each counted once. ``ValueError`` naming
    the problem."""
    if not isinstance(text, str):
        raise TypeError(f"seeds must be text such as 0-49999 or 1,5,10-19, got {type(text).__name__}")
    parts = text.split(",")
    if not text.strip(" \t"):
        raise ValueError("expected seeds such as 0-49999 or 1,5,10-19, got nothing")
    ranges = []
    for part in parts:
        match = _SEED_PART.fullmatch(part)
        if match is None:
            raise ValueError(f"expected seeds such as 0-49999 or 1,5,10-19 (ASCII digits), got {part.strip()!r}")
        digits = [g for g in match.groups() if g is not None]
        if any(len(d.lstrip("0")) > len(str(SEED_LIMIT)) for d in digits):
            raise ValueError(f"seeds go from 0 to {SEED_LIMIT - 1}, got {part.strip()!r}")
        lo = int(digits[0])
        hi = int(digits[-1])
        if hi < lo:
            raise ValueError(f"the range {part.strip()!r} runs backwards")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seeds go from 0 to {SEED_LIMIT - 1} (torch's CPU generator keeps only the low 32 bits "
                             f"of a seed, so larger seeds would repeat images), got {hi}")
        ranges.append((lo, hi))
    seeds = Seeds(ranges)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS:,} seeds per run, got {len(seeds):,}")
    return seeds


def _as_seeds(seeds) -> Seeds:
    """``seeds`` of ``generate_images``: a ``Seeds``, a text for ``parse_seeds``, or ints."""
    import numbers

    if isinstance(seeds, Seeds):
        return seeds
    if isinstance(seeds, str):
        try:
            return parse_seeds(seeds)
        except ValueError as exc:
            raise ValueError(f"`seeds`: {exc}") from None
    if isinstance(seeds, range) and seeds.step == 1:
        out = Seeds([(seeds.start, seeds.stop - 1)] if len(seeds) else [])
    else:
        try:
            items = list(seeds)
        except TypeError:
            raise TypeError(f"`seeds` must be a Seeds, a text such as '0-49999' or ints, got {type(seeds).__name__}") from None
        for s in items:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"`seeds` must hold ints, got {type(s).__name__} ({s!r})")
        out = Seeds.from_ints(items)
    if not len(out):
        raise ValueError("`seeds` is empty")
    if out.ranges[0][0] < 0 or out.ranges[-1][1] >= SEED_LIMIT:
        raise ValueError(f"`seeds` go from 0 to {SEED_LIMIT - 1}, got {out.ranges[0][0] if out.ranges[0][0] < 0 else out.ranges[-1][1]}")
    if len(out) > MAX_SEEDS:
        raise ValueError(f"`seeds`: at most {MAX_SEEDS:,} per run, got {len(out):,}")
    return out


def seed_file(seed: int, subdirs: bool = False) -> str:
    """The file of ``seed``, relative to the output folder (``/``-separated), as EDM's generate.py names them."""
    name = f"{seed:06d}.png"
    return f"{seed - seed % SUBDIR_SIZE:06d}/{name}" if subdirs else name


# ---- hashes and the record ---------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
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
        h.update(bytes.fromhex(_sha256_file(os.path.join(folder.unet_dir, file))))
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
    from .precision import model_dtype

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
    """torch's float32 precision switches that reach ``kind``'s kernels ('cpu': oneDNN, 'cuda': cuBLAS and cuDNN), as
    set: read through the ``fp32_precision`` API, which the legacy flags (``allow_tf32``,
    ``set_float32_matmul_precision``) also set, and which, unlike reading ``allow_tf32``, does not raise once a
    caller has set one operator's precision through the new API."""
    import torch

    b = torch.backends
    if kind == "cpu":
        places = {"all": b, "mkldnn": b.mkldnn, "mkldnn.matmul": b.mkldnn.matmul, "mkldnn.conv": b.mkldnn.conv,
                  "mkldnn.rnn": b.mkldnn.rnn}
    elif kind == "cuda":
        places = {"all": b, "cuda": b.cudnn, "cuda.matmul": b.cuda.matmul, "cudnn.conv": b.cudnn.conv,
                  "cudnn.rnn": b.cudnn.rnn}
    else:
        return {}
    try:
        out = {name: str(place.fp32_precision) for name, place in places.items()}
    except AttributeError:  # a torch before the fp32_precision API: its legacy flags
        out = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
        if kind == "cuda":
            out.update(matmul_tf32=b.cuda.matmul.allow_tf32, cudnn_tf32=b.cudnn.allow_tf32)
    if kind == "cuda":
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

    from . import __version__

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


def _read_record(path: str) -> dict | None:
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


# ---- the manifest ------------------------------------------------------------------------------------------

def read_manifest(path: str, rid: str | None = None, subdirs: bool | None = None) -> tuple[dict[int, str], int, int]:
    """``(SHA-256 by seed (the last line for a seed wins), bytes of complete lines, lines skipped)``.

    A line vouches for a file when it is a JSON object with an int ``seed``, a ``file`` (the seed's name for
    ``subdirs`` when given), a ``sha256`` and the record id ``rid`` (when given); others are skipped and counted.
    A last line without its newline is complete when it is a whole JSON object (an editor dropped the newline);
    otherwise it is torn (a kill mid-append) and not read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, 0, 0
    end = _complete_end(data)
    index, skipped = _parse_manifest(data[:end], rid, subdirs, None)
    return index, end, skipped


def _complete_end(data: bytes) -> int:
    """Where the manifest's complete lines end in ``data`` (see ``read_manifest``)."""
    end = data.rfind(b"\n") + 1
    with contextlib.suppress(ValueError):
        if isinstance(json.loads(data[end:]), dict):
            return len(data)
    return end


def _parse_manifest(data: bytes, rid, subdirs, keep) -> tuple[dict[int, str], int]:
    index: dict[int, str] = {}
    skipped = 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            line = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not (isinstance(line, dict) and type(line.get("seed")) is int and isinstance(line.get("file"), str)
                and isinstance(line.get("sha256"), str) and (rid is None or line.get("record") == rid)
                and (subdirs is None or line["file"] == seed_file(line["seed"], subdirs))):
            skipped += 1
            continue
        if keep is None or keep(line["seed"]):
            index[line["seed"]] = line["sha256"]
    return index, skipped


class _Manifest:
    """Rank 0's handle on the manifest: locked against a second job, its tail made whole, appended and fsync'd.

    ``created``, ``made_folder``: this run made the file, its folder. The lock is taken on the file at the path: a
    job that waited for it while another took its additions back (unlinked the file, removed the folder) opens the
    path again, so it never writes to a file that is gone.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = None
        for _ in range(100):
            self.made_folder = not os.path.isdir(os.path.dirname(path))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise GenerateError(f"--outdir: {path} is a {_files.file_kind(st.st_mode)}, not a regular file: "
                                    "refused", code=2)
            self.fd, self.created = _open_manifest(path)
            self._lock()
            if _same_file(self.fd, path):
                break
            self.close()  # unlinked (or replaced) while this process waited for its lock
        else:
            raise GenerateError(f"--outdir: {path} keeps being replaced by another process; refused", code=2)
        self.size = os.fstat(self.fd).st_size

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise GenerateError(f"--outdir: another kve-fast generate is writing to {os.path.dirname(self.path)} "
                                f"({MANIFEST} is locked)", code=2) from None

    def repair(self, end: int) -> None:
        """Once the run is not refused: end the manifest at its last complete line (``end``, from ``read_manifest``),
        cutting a torn line, or giving a complete last line the newline it lacks, so the next line starts clean."""
        if self.size > end:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        elif end and os.pread(self.fd, 1, end - 1) != b"\n":
            _files.write_all(self.fd, b"\n")
            os.fsync(self.fd)
            end += 1
        self.size = end

    def append(self, lines: list[dict]) -> None:
        """Append ``lines`` and fsync; on a failure, cut what was written (so no torn line is left) and raise."""
        if not lines:
            return
        data = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in lines).encode()
        try:
            _files.write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also releases the lock
            self.fd = None


def _open_manifest(path: str) -> tuple[int, bool]:
    """``(descriptor, created)`` of the manifest at ``path``, made if missing (never through a symlink)."""
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            pass
        try:
            return os.open(path, flags), False
        except FileNotFoundError:  # removed between the two calls: make it
            continue


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# ---- the folder --------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system lets a folder be fsync'd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _scan(outdir: str, listed: dict[int, str], subdirs: bool) -> tuple[list[str], list[str]]:
    """``(temporary files a killed run left, problems)``: the whole folder, before any work.

    A problem is an image file the manifest does not list (at its seed's name for this layout), or something
    other than a regular file (a symlink, a device, a folder) where generate writes or FID tools read.
    """
    temporaries, problems = [], []
    for root, dirs, files in os.walk(outdir):
        top = root == outdir
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, outdir).replace(os.sep, "/")
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            kind = _files.file_kind(mode)
            if top and name in (MANIFEST, RECORD, JOB_FILE):
                continue  # checked where they are opened
            if _TEMP.match(name) and stat.S_ISREG(mode):
                temporaries.append(path)
                continue
            match = _FILE.match(name)
            if match is not None:
                seed = int(match.group(1))
                if not stat.S_ISREG(mode):
                    problems.append(f"{path} is a {kind}, not a regular file: refused, not replaced; remove it")
                elif rel != seed_file(seed, subdirs) or seed not in listed:
                    problems.append(f"{path} is not in {MANIFEST}: kve-fast generate did not make it under this "
                                    "record (it adopts no file); move it out of the folder")
                continue
            if top and _SUBDIR.match(name) and not stat.S_ISDIR(mode):
                problems.append(f"{path} is a {kind}, not a folder: refused, not replaced; remove it")
            elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                problems.append(f"{path} is an image kve-fast generate did not make (FID tools would read it); move "
                                "it out of the folder")
    return temporaries, problems


def _sees_token(outdir: str, token: str, wait: float = SHARED_WAIT) -> bool:
    """Whether this process sees rank 0's job token in ``outdir`` (within ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError):
            with open(os.path.join(outdir, JOB_FILE)) as f:
                if f.read() == token:
                    return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _oserror(exc: OSError, path: str) -> str:
    """One line for a failed file operation: the file, then the cause."""
    where = exc.filename if isinstance(exc, _files.NotRegularFile) and exc.filename else path
    return f"{where}: {exc.strerror or exc}"


class _Writer:
    """Puts one process's files in place: whole (temporary name, fsync, rename) and only over regular files."""

    def __init__(self, outdir: str, status: dict):
        self.outdir, self.status = outdir, status
        self.folders: set[str] = set()  # subfolders checked (a real folder, not a link) or made
        self.landed = 0  # files this process put in place
        self.others = 0  # files the other processes had put in place, as of the last round

    def folder(self, rel: str) -> str:
        folder = os.path.dirname(os.path.join(self.outdir, rel))
        if folder not in self.folders:
            try:
                mode = os.lstat(folder).st_mode
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
            else:
                if not stat.S_ISDIR(mode):
                    raise _files.NotRegularFile(0, f"a {_files.file_kind(mode)} stands there, not a folder: refused, "
                                                   "not replaced", folder)
            self.folders.add(folder)
        return folder

    def write(self, files: list[tuple[int, str, bytes]]) -> str | None:
        """Put ``files`` in place; the first failure as one line (the rest are not written), or None."""
        touched = set()
        try:
            for _, rel, data in files:
                path = os.path.join(self.outdir, rel)
                try:
                    touched.add(self.folder(rel))
                    _write(data, path)
                except OSError as exc:
                    return _oserror(exc, path)
                self.landed += 1
                self.status["written"] = self.others + self.landed
        finally:
            for folder in touched:  # the renames, durable
                _fsync_dir(folder)
        return None


def _write(data: bytes, path: str) -> None:
    """``data`` at ``path``, whole or not at all, never over anything but a regular file."""
    _files.write_file_atomic(path, data, regular_only=True)


# ---- processes ---------------------------------------------------------------------------------------------

class _Single:
    """One process: the collectives are the identity."""

    rank, world = 0, 1

    def all_gather(self, obj) -> list:
        return [obj]

    def close(self) -> None:
        pass


class _Distributed:
    """torch.distributed under torchrun; small Python objects go through a gloo group (also next to NCCL)."""

    def __init__(self, backend: str):
        import torch.distributed as dist

        self.dist = dist
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def all_gather(self, obj) -> list:
        out = [None] * self.world
        try:
            self.dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:  # a peer died or timed out (torchrun stops the job when a process exits)
            raise GenerateError(f"rank {self.rank}: lost contact with the other processes ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def env_rank() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    if not launched_by_torchrun():
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def connect(device) -> _Single | _Distributed:
    """The process group for a job on ``device`` (nccl for CUDA, gloo otherwise), or one process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return _Single()
    return _Distributed("nccl" if device.type == "cuda" else "gloo")


def default_workers() -> int:
    """CPU workers per process: the CPUs this process may use, shared among the processes on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    return max(1, cpus // max(1, local))


# ---- sampling ----------------------------------------------------------------------------------------------

class _Progress:
    """What this process has done, for the bar: image-steps sampled (an image is ``steps`` of them), seeds found
    complete."""

    def __init__(self, steps: int):
        self.steps = steps
        self.image_steps = 0
        self.skipped = 0

    def add_steps(self, images: int) -> None:
        self.image_steps += images

    @property
    def images(self) -> float:
        return self.image_steps / self.steps


class _Todo:
    """This process's share of the seeds, walked lazily: batches of seeds whose files are not complete."""

    def __init__(self, stream, listed: dict[int, str], outdir: str, subdirs: bool, batch: int, progress: _Progress):
        self.stream, self.listed, self.outdir, self.subdirs, self.batch = stream, listed, outdir, subdirs, batch
        self.progress = progress

    def _complete(self, seed: int) -> bool:
        sha = self.listed.get(seed)
        if sha is None:
            return False
        path = os.path.join(self.outdir, seed_file(seed, self.subdirs))
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False  # refused when written
            return _sha256_file(path) == sha  # else changed since it was listed: made again
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None

    def next_batch(self) -> list[int]:
        """Up to ``batch`` seeds to sample (empty at the end)."""
        out = []
        for seed in self.stream:
            if self._complete(seed):
                self.progress.skipped += 1
                continue
            out.append(seed)
            if len(out) == self.batch:
                break
        return out


def _padded(seeds: list[int], batch: int) -> list[int]:
    """``seeds`` repeated up to ``batch`` entries: the model always runs at one batch size."""
    return [seeds[i % len(seeds)] for i in range(max(batch, len(seeds)))]


def _sample(pipe, seeds: list[int], batch: int, call: dict, subdirs: bool, on_step) -> list[tuple[int, str, bytes, str]]:
    """``[(seed, file, png bytes, sha256)]`` of one batch, padded to ``batch``; ``on_step()`` after each sampler step."""
    import torch

    def track(steps):  # the pipeline's progress hook: the sampler calls it with its steps
        for step in steps:
            yield step
            on_step()

    pipe.progress_bar = track
    padded = _padded(seeds, batch)
    images = pipe(len(padded), call["steps"], [torch.Generator().manual_seed(s) for s in padded], output_type="pil",
                  **{k: v for k, v in call.items() if k != "steps"}).images
    out = []
    for seed, image in zip(seeds, images):
        data = _encode_png(image)
        out.append((seed, seed_file(seed, subdirs), data, hashlib.sha256(data).hexdigest()))
    return out


def _worker_pipe(pipe):
    """A pipeline of its own (its own scheduler, its progress hook) around ``pipe``'s model."""
    from .pipeline import KarrasVePipeline

    worker = KarrasVePipeline(unet=pipe.unet, scheduler=copy.deepcopy(pipe.scheduler))
    worker.set_progress_bar_config(disable=True)
    return worker


class _Inline:
    """One batch at a time in this process (one worker; a GPU). ``get()``: the next batch's files, None at the end."""

    def __init__(self, pipe, todo: _Todo, progress: _Progress, call: dict, subdirs: bool, on_step):
        self.pipe, self.todo, self.progress, self.call, self.subdirs = _worker_pipe(pipe), todo, progress, call, subdirs
        self.on_step = on_step

    def get(self, idle=None):
        try:
            seeds = self.todo.next_batch()
            if not seeds:
                return None

            def step():
                self.progress.add_steps(len(seeds))
                self.on_step()

            return _sample(self.pipe, seeds, self.todo.batch, self.call, self.subdirs, step)
        except Exception as exc:
            raise _Failed(_describe(exc)) from None

    def close(self) -> None:
        pass


# A worker process and the main process talk through two pipes (batches one way, progress and files the other):
# length-prefixed pickles, between a process and the one it forked.
def _send(f, message) -> None:
    import pickle

    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(len(data).to_bytes(8, "little") + data)
    f.flush()


def _receive(f):
    """The next message, or None at the end of the stream."""
    import pickle

    head = f.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    data = f.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def _worker_loop(pipe, tasks, results, batch: int, call: dict, subdirs: bool) -> None:
    """A worker process: batches from ``tasks``, files and progress to ``results``, on ``THREADS_PER_WORKER``
    intra-op CPU threads. It ends at the end of ``tasks`` (the main process closed it, or died) or when a
    message cannot be sent (the main process is gone)."""
    pipe = _worker_pipe(pipe)
    try:
        while True:
            seeds = _receive(tasks)
            if seeds is None:
                return
            files = _sample(pipe, seeds, batch, call, subdirs, lambda: _send(results, ("steps", len(seeds))))
            _send(results, ("files", files))
    except OSError:  # BrokenPipeError: the main process is gone
        return
    except BaseException as exc:
        with contextlib.suppress(OSError):
            _send(results, ("error", _describe(exc)))


def _death_signal():
    """Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` as a function of no arguments (None where there is none),
    looked up before the fork (no ``dlopen`` in the child)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def _die_with_parent(parent: int, death_signal) -> None:
    """In a forked worker: SIGKILL when the thread that forked it ends (also when its process is killed with
    SIGKILL), so that no worker outlives its job; and the end now if that already happened."""
    if death_signal is not None:
        death_signal()
    if os.getppid() != parent:
        os._exit(1)


def _exit_status(pid: int):
    """``pid``'s exit code (minus the signal that killed it) once it has ended, without reaping it (the pid stays
    ours until ``waitpid``); None if it cannot be told."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class _Processes:
    """``count`` worker processes (Linux, the CPU), forked once the model is loaded: each samples with one intra-op
    thread on the model it inherited (copy-on-write; nothing is pickled but seeds and files); this process hands
    out batches (two in flight per worker), reads their files and progress through pipes, and writes the files.

    Processes, not threads: with threads the GIL, held by the model's Python code between kernels, serialised the
    workers on a busy machine. Forked, not spawned: a spawned worker imports torch and diffusers again before its
    first batch (docs/generate.md). ``close_in_child``: descriptors the workers must not keep (the manifest's lock).
    A worker ignores SIGINT (Ctrl-C is the main process's to handle), ends on SIGTERM, at the end of its input, or
    with the main process (``_die_with_parent``); ``close()`` ends and reaps every worker.
    """

    def __init__(self, pipe, todo: _Todo, progress: _Progress, count: int, call: dict, subdirs: bool,
                 close_in_child=()):
        import warnings

        self.todo, self.progress, self.count = todo, progress, count
        self.pids: list[int] = []
        self.reaped: set[int] = set()
        self.task_files: list = []  # this process's ends of each worker's pipes
        self.results: list[int] = []
        self.queue: queue.Queue = queue.Queue()
        self.in_flight = [0] * count
        self.exhausted = self.started = False
        self.readers: list[threading.Thread] = []
        parent, death_signal = os.getpid(), _death_signal()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for k in range(count):
                task_r, task_w = os.pipe()
                result_r, result_w = os.pipe()
                with warnings.catch_warnings():  # Python 3.12+ warns about fork in a process with threads (gloo,
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch); the child only runs _worker_loop
                    pid = os.fork()
                if pid == 0:  # the worker: never returns into the caller's stack
                    code = 0
                    try:
                        import signal

                        import torch

                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        _die_with_parent(parent, death_signal)
                        for fd in [*close_in_child, task_w, result_r, *self.results,
                                   *(f.fileno() for f in self.task_files)]:
                            with contextlib.suppress(OSError):
                                os.close(fd)
                        torch.set_num_threads(THREADS_PER_WORKER)  # as the parent set it; DataLoader's pattern
                        with os.fdopen(task_r, "rb") as tasks, os.fdopen(result_w, "wb") as results:
                            _worker_loop(pipe, tasks, results, todo.batch, call, subdirs)
                    except BaseException:
                        code = 1
                    finally:
                        os._exit(code)
                self.pids.append(pid)
                os.close(task_r)
                os.close(result_w)
                self.task_files.append(os.fdopen(task_w, "wb"))
                self.results.append(result_r)
            for k in range(count):  # threads only once every worker is forked
                reader = threading.Thread(target=self._read, args=(k,), name=f"kve_fast-generate-{k}", daemon=True)
                reader.start()
                self.readers.append(reader)
        except BaseException:
            self.close()
            raise

    def _read(self, k: int) -> None:
        """Puts worker ``k``'s messages on the queue, then ``("end", exit status)``."""
        try:
            with os.fdopen(self.results[k], "rb") as f:
                while True:
                    message = _receive(f)
                    if message is None:
                        break
                    self.queue.put((k, message))
        except Exception as exc:  # a stream closed under us, or a message that does not unpickle
            self.queue.put((k, ("error", f"worker process {k}: {_describe(exc)}")))
        self.queue.put((k, ("end", _exit_status(self.pids[k]))))

    def _hand_out(self, k: int) -> None:
        if self.exhausted:
            return
        try:
            seeds = self.todo.next_batch()
        except OSError as exc:
            raise _Failed(_describe(exc)) from None
        if not seeds:
            self.exhausted = True
            return
        try:
            _send(self.task_files[k], seeds)
        except OSError:
            raise _Failed(f"worker process {k} exited with batches to do") from None
        self.in_flight[k] += 1

    def get(self, idle=None):
        """The next finished batch, None when all are done; ``idle()`` runs while waiting. ``_Failed`` for a
        failure (a worker's error, a worker that died, a file that cannot be checked)."""
        if not self.started:
            self.started = True
            for _ in range(2):
                for k in range(self.count):
                    self._hand_out(k)
        while any(self.in_flight):
            try:
                k, (kind, value) = self.queue.get(timeout=0.2)
            except queue.Empty:
                if idle is not None:
                    idle()
                continue
            if kind == "steps":
                self.progress.add_steps(value)
                if idle is not None:
                    idle()
            elif kind == "files":
                self.in_flight[k] -= 1
                self._hand_out(k)
                return value
            elif kind == "error":
                raise _Failed(value)
            elif kind == "end" and self.in_flight[k]:
                code = "" if value is None else f" (exit code {value})" if value >= 0 else f" (signal {-value})"
                raise _Failed(f"worker process {k} exited{code} with batches to do")
        return None

    def close(self) -> None:
        """End the workers (SIGTERM; SIGKILL after 10 s) and reap them; the readers end with their pipes."""
        import signal

        for f in self.task_files:
            with contextlib.suppress(OSError):
                f.close()
        for pid in self.pids:  # not reaped yet, so still ours (a zombie at worst): safe to signal
            if pid not in self.reaped:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while pid not in self.reaped:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG if time.monotonic() < deadline else 0)
                except ChildProcessError:
                    done = pid
                if done:
                    self.reaped.add(pid)
                elif time.monotonic() >= deadline:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                else:
                    time.sleep(0.01)
        for reader in self.readers:
            reader.join(timeout=10)


def _workers_for(workers: int | None, cpu: bool) -> int:
    """How many workers: 1 (in this process) on a GPU or where worker processes are not forked (not Linux); else
    ``workers``, by default the CPUs this process may use over the processes on this machine."""
    if not cpu:
        return 1
    if not FORK_WORKERS:
        if workers is not None and workers > 1:
            raise ValueError(f"`workers`: worker processes are forked, on Linux only (this is {sys.platform}); use 1 "
                             "and torchrun for more processes")
        return 1
    return workers or default_workers()


class _Failed(Exception):
    """A worker's failure, as one line."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _progress_bar(total: int, disable: bool):
    """Rank 0's bar over the whole job: images (of every rank), and images per second."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="generating", disable=disable, file=sys.stderr, dynamic_ncols=True)


# ---- the job -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    written: int  # images this run wrote (all ranks)
    skipped: int  # seeds whose files were already complete
    seconds: float  # sampling and writing, from the first batch to the last
    world: int
    workers: int = 1  # sampling workers per process

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _check_args(pipe, outdir, steps, batch, subdirs, backend, noise, solver, workers, quiet, tf32, channels_last,
                cuda_graph, model, comm, status):
    from ._checks import check_int
    from .graphs import check_cuda_graph
    from .options import BACKENDS, NOISE_MODES, SOLVERS

    for name in ("unet", "scheduler", "_image_shape"):
        if not hasattr(pipe, name):
            raise TypeError(f"`pipe` must be a KarrasVePipeline, got {type(pipe).__name__}")
    if not isinstance(outdir, (str, os.PathLike)):
        raise TypeError(f"`outdir` must be a folder path, got {type(outdir).__name__}")
    if not os.fspath(outdir):
        raise ValueError("`outdir` is empty: name a folder")
    check_int("steps", steps, 2)  # (the sampler's minimum: Algorithm 2 needs two noise levels above 0)
    check_int("batch", batch, 1)
    check_cuda_graph(cuda_graph)
    if model is not None and not (isinstance(model, dict) and isinstance(model.get("name"), str)
                                  and isinstance(model.get("sha256"), str)):
        raise TypeError(f"`model` must be None or a dict with str 'name' and 'sha256', got {model!r:.80}")
    if status is not None and not isinstance(status, dict):
        raise TypeError(f"`status` must be None or a dict, got {type(status).__name__}")
    if comm is not None and not all(hasattr(comm, a) for a in ("rank", "world", "all_gather")):
        raise TypeError(f"`comm` must be None or have rank, world and all_gather, got {type(comm).__name__}")
    for name, value in (("subdirs", subdirs), ("quiet", quiet), ("tf32", tf32), ("channels_last", channels_last)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False, got {type(value).__name__}")
    for name, value, choices in (("backend", backend, BACKENDS), ("noise", noise, NOISE_MODES),
                                 ("solver", solver, SOLVERS)):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    if workers is not None:
        check_int("workers", workers, 1)


def generate_images(pipe, seeds, outdir: str, *, steps: int = 50, batch: int = 64, subdirs: bool = False,
                    backend: str = "auto", noise: str = "exact", solver: str = "heun", model: dict | None = None,
                    comm=None, quiet: bool = True, status: dict | None = None, cuda_graph=None, tf32: bool = False,
                    channels_last: bool = False, workers: int | None = None) -> Summary:
    """Write ``outdir/{seed:06d}.png`` for every seed with ``pipe`` (a ``KarrasVePipeline`` on its device).

    ``seeds``: a ``Seeds`` (``parse_seeds("0-49999")``), the same as text, or ints. This process samples its
    share of the seeds that lack a complete file (``comm``: the job's processes, one by default) and rank 0
    keeps the record and the manifest; see docs/generate.md. ``model``: ``{"name", "sha256"}`` for the record
    (default: a hash of the model in memory). ``workers``: CPU only, worker processes sampling side by side
    (1: in this process; default: the CPUs this process may use over the processes on this machine). Raises
    ``GenerateError`` when a rank fails, on every rank, and ``ValueError``/``TypeError`` naming a bad argument before
    any work.
    ``status["written"]`` counts the images written so far by all ranks, ``status["sampled"]`` the images sampled
    so far, what the progress bar shows: ahead of ``written`` by the batches not finished yet (for a report after
    an interrupt).
    """
    _check_args(pipe, outdir, steps, batch, subdirs, backend, noise, solver, workers, quiet, tf32, channels_last,
                cuda_graph, model, comm, status)
    seeds = _as_seeds(seeds)
    import torch

    from . import threads
    from .backends import check_backend

    device = pipe.device
    cpu = device.type == "cpu"
    if workers is not None and workers > 1 and not cpu:
        raise ValueError(f"`workers`: more than one worker is for the CPU; the model is on {device}")
    backend = check_backend(backend, device)
    channels = pipe._image_shape(1)[1]
    if channels not in (1, 3, 4):
        raise GenerateError(f"the model's images have {channels} channels; only 1 (grey), 3 (RGB) or 4 (RGBA) "
                            "make PNG files", code=2)
    workers = _workers_for(workers, cpu)
    comm = comm or _Single()
    status = {} if status is None else status
    status.update(written=0, sampled=0)
    outdir = os.path.abspath(os.fspath(outdir))
    threads_before, fixed_before = torch.get_num_threads(), threads._fixed
    if cpu:  # torch's count, and kve_fast's per-call policy (which KVE_FAST_THREADS would otherwise set)
        torch.set_num_threads(THREADS_PER_WORKER)
        threads.set_threads(THREADS_PER_WORKER)
    try:
        return _job(pipe, seeds, outdir, comm, status, quiet, workers, cpu, device,
                    dict(steps=steps, batch=batch, subdirs=subdirs, backend=backend, noise=noise, solver=solver,
                         model=model, cuda_graph=cuda_graph, tf32=tf32, channels_last=channels_last))
    finally:
        if cpu:
            torch.set_num_threads(threads_before)
            threads.set_threads(fixed_before)


def _setup(outdir: str, world: int, record: dict) -> tuple:
    """Rank 0, before any work: lock the manifest, check the record and the whole folder, then write the record.

    Returns ``(manifest, index, token, rid, undo)``; ``rid`` is the id of the folder's record (the one written
    before, when this run's equals it). Raises ``GenerateError`` leaving the folder as it was, byte for byte: the
    checks change nothing, and a folder without a manifest is checked before the manifest (the lock) is made.
    ``undo()`` puts the folder back as it was before this run while the manifest holds no line of it (``_job``
    calls it, holding the lock, when the job fails before its first image: a failure such as an out-of-memory
    batch must not leave a record that refuses the corrected command).
    """
    manifest = None
    wrote_record = False
    try:
        if os.path.isdir(outdir) and not os.path.lexists(os.path.join(outdir, MANIFEST)):
            _check_folder(outdir, record, None)
        manifest = _Manifest(os.path.join(outdir, MANIFEST))
        old, rid, index, end, temporaries = _check_folder(outdir, record, manifest)
        manifest.repair(end)
        for path in temporaries:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if old is None:  # before the first image
            wrote_record = True
            _write_named(os.path.join(outdir, RECORD), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
            _fsync_dir(outdir)
        token = None
        if world > 1:  # every rank must write into this very folder (one file system on every machine)
            token = f"{os.getpid()}-{time.time_ns()}-{os.urandom(8).hex()}"
            _write_named(os.path.join(outdir, JOB_FILE), token.encode())
        return manifest, index, token, rid, lambda: _undo_setup(manifest, wrote_record)
    except BaseException as exc:
        if manifest is not None:
            _undo_setup(manifest, wrote_record)
            manifest.close()
        if isinstance(exc, OSError):
            raise GenerateError(_oserror(exc, exc.filename or outdir)) from None
        raise


def _check_folder(outdir: str, record: dict, manifest) -> tuple:
    """Rank 0's checks, which change nothing: the folder's record against ``record`` (compared by value), the
    manifest's lines under it, the whole folder. Returns ``(old record or None, rid, index, end, temporaries)``;
    ``GenerateError`` (code 2) for a refusal."""
    old = _read_record(os.path.join(outdir, RECORD))
    if old is not None:
        diff = record_differences(old, record)
        if diff:
            raise GenerateError(f"--outdir: {outdir} holds images made with other settings ({RECORD}): "
                                f"{'; '.join(diff)}; use another folder, or the same settings", code=2)
    if old is None and manifest is not None and manifest.size:
        raise GenerateError(f"--outdir: {outdir} holds a {MANIFEST} but no {RECORD} (an older kve-fast generate, "
                            "or the record was removed): nothing vouches for its files; use another folder", code=2)
    rid = record_id(record if old is None else old)
    index, end, skipped = read_manifest(manifest.path, rid, record["subdirs"]) if manifest else ({}, 0, 0)
    temporaries, problems = _scan(outdir, index, record["subdirs"])
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GenerateError(f"--outdir: {problems[0]}{more}", code=2)
    if skipped:
        print(f"kve-fast: warning: {manifest.path}: {skipped} lines are not file records of this {RECORD}; ignored",
              file=sys.stderr)
    return old, rid, index, end, temporaries


def _undo_setup(manifest, wrote_record: bool) -> None:
    """Rank 0, holding the manifest's lock: while the manifest holds no line, remove what ``_setup`` added (the
    record it wrote, the manifest file it created, the folder it made), so the folder is as it was (no file can have
    landed without a line). Under the lock, so that no other job can have started on the folder meanwhile."""
    if manifest.size or manifest.fd is None:
        return
    outdir = os.path.dirname(manifest.path)
    for undo, path in ((os.unlink, os.path.join(outdir, RECORD) if wrote_record else None),
                       (os.unlink, manifest.path if manifest.created else None),
                       (os.rmdir, outdir if manifest.made_folder else None)):
        if path is not None:
            with contextlib.suppress(OSError):  # (each on its own: a record that was never written is no reason to stop)
                undo(path)


def _write_named(path: str, data: bytes) -> None:
    """``data`` at ``path`` (whole, over a regular file only), failing with a ``GenerateError`` that names ``path``."""
    try:
        _files.write_file_atomic(path, data, regular_only=True)
    except OSError as exc:
        raise GenerateError(_oserror(exc, path)) from None


def _job(pipe, seeds: Seeds, outdir: str, comm, status: dict, quiet: bool, workers: int, cpu: bool, device,
         opts: dict) -> Summary:
    rank, world = comm.rank, comm.world
    steps, batch, subdirs = opts["steps"], opts["batch"], opts["subdirs"]

    # 1. Every rank names its device; rank 0 checks they agree, then locks, checks and records (before any work).
    manifest = setup = undo = None
    identity = device_identity(device)
    identities = comm.all_gather(identity)
    try:
        if rank == 0:
            differ = [i for i, d in enumerate(identities) if d != identities[0]]
            if differ:
                raise GenerateError(f"rank {differ[0]} runs on {identities[differ[0]]}, rank 0 on {identities[0]}: the "
                                    "files would depend on the rank; use one kind of device (and software)", code=2)
            model = opts["model"] or module_identity(pipe.unet)
            record = make_record(pipe, model=model, steps=steps, solver=opts["solver"], noise=opts["noise"],
                                 backend=opts["backend"], tf32=opts["tf32"], channels_last=opts["channels_last"],
                                 batch=batch, subdirs=subdirs, device=identity)
            manifest, index, token, rid, undo = _setup(outdir, world, record)
            setup = ("ok", manifest.size, token, rid)
    except GenerateError as exc:
        setup = ("error", str(exc), exc.code)
    except Exception as exc:
        setup = ("error", f"{outdir}: {_describe(exc)}", 1)
    writer = _Writer(outdir, status)
    producer = bar = None
    failed = True
    try:
        got = comm.all_gather(setup)[0]
        if got[0] == "error":
            raise GenerateError(got[1], code=got[2], printed=rank != 0)
        _, end, token, rid = got

        # 2. Every rank sees the folder and reads the manifest's lines for its share.
        blind = token is not None and not _sees_token(outdir, token)
        gathered = comm.all_gather(blind)
        blind = [i for i, b in enumerate(gathered) if b]
        if blind:
            raise GenerateError(f"--outdir: rank {', '.join(map(str, blind))} cannot see the {JOB_FILE} file rank 0 "
                                f"wrote to {outdir}: with processes on several machines, --outdir must be one folder "
                                "they all share (NFS, Lustre, ...) at the same path", code=2, printed=rank != 0)
        if rank != 0:
            index = _read_share(os.path.join(outdir, MANIFEST), end, rid, subdirs, seeds, rank, world)

        # 3. Batches: workers sample; per round every rank gathers its new files' hashes, rank 0 appends and fsyncs
        #    their lines, then each rank puts its files in place (a file lands only once its line is durable).
        progress = _Progress(steps)
        todo = _Todo(seeds.share(rank, world), index, outdir, subdirs, batch, progress)
        call = {k: opts[k] for k in ("steps", "backend", "noise", "solver", "cuda_graph", "tf32", "channels_last")}
        others = {"images": 0.0, "skipped": 0}

        def refresh():
            status["sampled"] = int(progress.images + others["images"])
            if bar is None or bar.disable:
                return
            total = len(seeds) - progress.skipped - others["skipped"]
            if bar.total != total:
                bar.total = total
            n = int(progress.images + others["images"])
            if n != bar.n:
                bar.update(n - bar.n)

        if workers > 1:  # forked before the bar's thread starts, without the manifest's descriptor
            producer = _Processes(pipe, todo, progress, workers, call, subdirs,
                                  close_in_child=[manifest.fd] if manifest is not None else [])
        else:
            producer = _Inline(pipe, todo, progress, call, subdirs, on_step=refresh)
        bar = _progress_bar(len(seeds), disable=quiet or rank != 0)
        write_error = None
        finished = False
        start = time.perf_counter()
        while True:
            files, error = [], write_error
            if not finished and error is None:
                try:
                    got = producer.get(idle=refresh)
                    if got is None:
                        finished = True
                    else:
                        files = got
                except _Failed as exc:
                    error = str(exc)
            mine = (progress.images, progress.skipped)
            if error is not None and rank != 0:  # rank 0 reports every failure below
                print(f"kve-fast: error: rank {rank}: {error}", file=sys.stderr)
            round_ = comm.all_gather({"lines": [(s, rel, sha) for s, rel, _, sha in files], "error": error,
                                      "finished": finished or error is not None, "images": mine[0],
                                      "skipped": mine[1], "landed": writer.landed})
            writer.others = sum(r["landed"] for i, r in enumerate(round_) if i != rank)
            written = status["written"] = writer.others + writer.landed
            others["images"] = sum(r["images"] for i, r in enumerate(round_) if i != rank)
            others["skipped"] = sum(r["skipped"] for i, r in enumerate(round_) if i != rank)
            refresh()
            failures = [(i, r["error"]) for i, r in enumerate(round_) if r["error"] is not None]
            lines = [line for r in round_ for line in r["lines"]]
            if failures:
                break
            if not lines and all(r["finished"] for r in round_):
                break
            append_error = None
            if rank == 0:  # a file made again with the bytes its line already vouches for needs no second line
                new = [{"seed": s, "file": rel, "sha256": sha, "record": rid} for s, rel, sha in lines
                       if index.get(s) != sha]
                try:
                    manifest.append(new)
                    index.update((r["seed"], r["sha256"]) for r in new)
                except OSError as exc:
                    append_error = _oserror(exc, manifest.path)
            if lines:
                append_error = comm.all_gather(append_error)[0]
                if append_error is not None:
                    failures = [(0, append_error)]
                    break
                write_error = writer.write([(s, rel, data) for s, rel, data, _ in files])
        seconds = time.perf_counter() - start
        if failures:
            where = f"rank {', '.join(str(i) for i, _ in failures)} failed: " if world > 1 else ""
            message = f"{where}{failures[0][1]}; {written} images written, rerun the same command to resume"
            if rank == 0:
                bar.close()
                print(f"kve-fast: error: {message}", file=sys.stderr)
            comm.all_gather(None)  # rank 0 has reported before any process exits (torchrun then stops the rest)
            raise GenerateError(message, code=1, printed=True)
        skipped = progress.skipped + others["skipped"]
        failed = False
        return Summary(written=written, skipped=skipped, seconds=seconds, world=world, workers=workers)
    finally:
        if producer is not None:
            producer.close()
        if bar is not None:
            bar.close()
        if manifest is not None:
            if world > 1:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(outdir, JOB_FILE))
            if failed:  # failed before its first line: the folder as it was (settings may change), under the lock
                undo()
            manifest.close()


def _read_share(path: str, end: int, rid: str, subdirs: bool, seeds: Seeds, rank: int, world: int) -> dict[int, str]:
    """The manifest's lines (up to ``end``, where rank 0 cut it) for this rank's share of ``seeds``."""
    try:
        with open(path, "rb") as f:
            data = f.read(end)
    except OSError as exc:
        raise GenerateError(f"rank {rank}: {_oserror(exc, path)}") from None
    return _parse_manifest(data, rid, subdirs, lambda s: s in seeds and seeds.index(s) % world == rank)[0]
