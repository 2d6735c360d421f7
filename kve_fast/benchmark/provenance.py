"""What every benchmark record says about itself, and the repeat rule of its timings.

Issue 20's rules, in one place so no measurement can drift (``kve-fast bench`` and the repository's bench
scripts, whose harness, ``bench/harness``, adds their exit status and files):

- ``provenance()``: the code that ran (the commit, and ``dirty``: ``git status --porcelain`` printed anything,
  with the first changed paths), the card, its driver, the versions of torch, CUDA, cuDNN, Triton, diffusers,
  k-diffusion and numpy, TF32 as the kernels see it, the exact command (interpreter and arguments, the working
  folder, the environment variables that change what runs), the date in UTC and the host. Where git cannot answer
  (no ``.git`` on a copied tree), ``KVE_FAST_COMMIT`` and ``KVE_FAST_TREE_CLEAN`` (``1``/``0``) given by the caller
  are used and the record says so; before those, ``.whl/tree_stamp.json`` written by ``bench/device_prepare.sh``
  (the commit, the dirty flag, and a hash of every travelling file, so a later edit reads as dirty:
  ``stamp_state``); otherwise the field is None and ``missing()`` names it.
- ``required_repeats(call_s)``: timed calls after the first one: at least 5 where a call takes under 2 s, at
  least 3 otherwise.

Import-light: torch loads inside ``provenance`` only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

__all__ = ["provenance", "git_state", "stamp_state", "tree_hash", "missing", "required_repeats", "jsonable", "REQUIRED",
           "REQUIRED_CUDA", "SHORT_CALL_S", "STAMP"]

SHORT_CALL_S = 2.0  # calls under this many seconds get at least 5 timed repeats, others at least 3
# what every record must hold (None is "unknown"); on CUDA also the card and its driver
REQUIRED = ("commit", "dirty", "torch", "triton", "diffusers", "command")
REQUIRED_CUDA = REQUIRED + ("card", "driver")
_ENV_KEYS = ("TRITON_INTERPRET", "TRITON_CACHE_DIR", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "TORCH_EXTENSIONS_DIR",
             "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(argv, cwd=None, timeout=20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: str = ROOT) -> dict:
    """``{"commit", "dirty", "dirty_files", "source"}`` of the checkout at ``root`` (see the module docstring)."""
    head = _run(["git", "-C", root, "rev-parse", "HEAD"])
    if head is not None and head.returncode == 0 and head.stdout.strip():
        status = _run(["git", "-C", root, "status", "--porcelain"], timeout=60)
        if status is None or status.returncode != 0:
            why = "git status failed" if status is None else status.stderr.strip()[:200]
            return {"commit": head.stdout.strip(), "dirty": None, "dirty_files": [], "source": "git",
                    "why": why}
        changed = [line for line in status.stdout.splitlines() if line.strip()]
        return {"commit": head.stdout.strip(), "dirty": bool(changed), "dirty_files": changed[:20],
                "source": "git"}
    stamp = stamp_state(root)
    if stamp is not None:
        return stamp
    commit = os.environ.get("KVE_FAST_COMMIT", "").strip() or None
    clean = os.environ.get("KVE_FAST_TREE_CLEAN", "").strip()
    dirty = {"1": False, "0": True}.get(clean)
    why = "git rev-parse failed" + ("" if head is None else f": {head.stderr.strip()[:200]}")
    return {"commit": commit, "dirty": dirty, "dirty_files": [],
            "source": "KVE_FAST_COMMIT / KVE_FAST_TREE_CLEAN (given by the caller)" if commit else None, "why": why}


STAMP = os.path.join(".whl", "tree_stamp.json")  # carried with the wheels (bench/device_prepare.sh)


def tree_hash(root: str, paths: list[str]) -> str:
    """SHA-256 over the files at ``paths`` under ``root``: each relative name and its bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(paths):
        h.update(rel.encode("utf-8") + b"\0")
        try:
            with open(os.path.join(root, rel), "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def stamp_state(root: str = ROOT) -> dict | None:
    """``git_state``'s record from ``root/.whl/tree_stamp.json`` (``bench.harness.write_stamp``) where the tree has
    no git; ``dirty`` is True also when a file differs from the stamp's hash (changed after the stamp was
    written). None: no stamp."""
    try:
        with open(os.path.join(root, STAMP), encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    same = tree_hash(root, stamp.get("files", [])) == stamp.get("sha256")
    rec = {"commit": stamp.get("commit"), "dirty": bool(stamp.get("dirty")) or not same,
           "dirty_files": stamp.get("dirty_files", []), "source": f"{STAMP} (written {stamp.get('date_utc')})"}
    if not same:
        rec["why"] = "the tree differs from the stamp's hash: a file changed after bench/device_prepare.sh"
    return rec


def _version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _module_version(module: str) -> str | None:
    """The version of an importable module that may not be installed as a distribution (a wheel extracted
    onto ``PYTHONPATH`` is both, a folder on ``sys.path`` only the first)."""
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: unknown
        return None
    return getattr(mod, "__version__", None)


def _driver() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip().splitlines()[0].strip()
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        for word in first.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    return None


def provenance(device=None, argv: list[str] | None = None, script: str | None = None) -> dict:
    """The record described in the module docstring, for a run on ``device`` (a torch device or its name)."""
    import torch

    from ..precision import fp32_precision

    device = torch.device(device) if device is not None else torch.device("cpu")
    argv = list(sys.argv if argv is None else argv)
    git = git_state()
    fp32 = fp32_precision()
    rec = {
        "script": script or (os.path.relpath(os.path.abspath(argv[0]), ROOT) if argv and argv[0] else None),
        "command": shlex.join([os.path.basename(sys.executable)] + argv),
        "cwd": os.getcwd(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
        "commit": git["commit"], "dirty": git["dirty"], "dirty_files": git["dirty_files"],
        "commit_source": git["source"],
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton") or _module_version("triton"),
        "diffusers": _version("diffusers") or _module_version("diffusers"),
        "k_diffusion": _version("k-diffusion"), "numpy": _version("numpy"),
        "kve_fast": _version("kve_fast"),
        "device": str(device), "card": None, "driver": None, "capability": None, "memory_gib": None,
        "cudnn": None,
        "tf32": {"matmul": fp32.matmul_tf32, "cudnn": fp32.cudnn_tf32},
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
        | {k: v for k, v in os.environ.items() if k.startswith("KVE_FAST_")},
        "cpu_count": os.cpu_count(),
    }
    if git.get("why"):
        rec["commit_note"] = git["why"]
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        rec.update(card=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), driver=_driver(),
                   cudnn=torch.backends.cudnn.version())
    return rec


def missing(prov: dict) -> list[str]:
    """The required fields ``prov`` lacks (None), for its device."""
    need = REQUIRED_CUDA if str(prov.get("device", "")).startswith("cuda") else REQUIRED
    return [k for k in need if prov.get(k) is None]


def required_repeats(call_s: float) -> int:
    """Timed calls a row needs after its first call: 5 where a call is under ``SHORT_CALL_S``, else 3."""
    return 5 if call_s < SHORT_CALL_S else 3


def jsonable(value, nonfinite=repr):
    """``value`` with only JSON types: a non-finite float as ``nonfinite(value)``, dict keys as str, tuples as
    lists, anything else not JSON as its str."""
    if isinstance(value, float) and not math.isfinite(value):
        return nonfinite(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
