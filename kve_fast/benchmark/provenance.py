"""What every GPU result says about itself, the repeat rule of its timings, and the status a script exits with.

Issue 20's rules for the bench scripts (bench/*.py, ``kve-fast bench``), in one place so no script can drift:

- ``provenance()``: the code that ran (the commit, and ``dirty``: ``git status --porcelain`` printed anything,
  with the first changed paths), the card, its driver, the versions of torch, CUDA, cuDNN, Triton, diffusers,
  k-diffusion and numpy, the exact command (interpreter and arguments, the working folder, the environment
  variables that change what runs), the date in UTC and the host. Where git cannot answer (no ``.git`` on a
  copied tree), ``KVE_FAST_COMMIT`` and ``KVE_FAST_TREE_CLEAN`` (``1``/``0``) given by the caller are used and
  the record says so; before those, ``.whl/tree_stamp.json`` written by ``bench/device_prepare.sh`` (``write_stamp``:
  the commit, the dirty flag, and a hash of every travelling file, so a later edit reads as dirty); otherwise the
  field is None and ``missing()`` names it.
- ``required_repeats(call_s)``: timed calls after the first one: at least 5 where a call takes under 2 s, at
  least 3 otherwise; ``time_stats`` reports min, median and max of them.
- ``Outcome``: the checks and stages of one run; ``exit_code()`` is 1 when any check failed or any stage
  failed (also when it timed out), 3 when nothing failed but something was skipped, else 0, and ``summary()``
  says which.

Import-light: torch loads inside ``provenance`` only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

__all__ = ["provenance", "git_state", "write_stamp", "stamp_state", "missing", "required_repeats", "time_stats", "Outcome", "ScriptRun", "REQUIRED",
           "REQUIRED_CUDA", "SHORT_CALL_S"]

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


def _tree_hash(root: str, paths: list[str]) -> str:
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


def write_stamp(root: str = ROOT, path: str | None = None) -> dict:
    """Record the commit, the dirty flag and a hash of every file that travels (tracked, and untracked files git
    does not ignore) at ``root/.whl/tree_stamp.json``: a copy of the tree without ``.git`` (the device machine's)
    then knows its commit, and whether a file changed after the stamp (``stamp_state``)."""
    git = git_state(root)
    if git["source"] != "git":
        raise RuntimeError("write_stamp needs a git checkout")
    files = _run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], timeout=60)
    if files is None or files.returncode != 0:
        raise RuntimeError("git ls-files failed")
    paths = sorted({p for p in files.stdout.split("\0") if p and os.path.isfile(os.path.join(root, p))})
    stamp = {"commit": git["commit"], "dirty": git["dirty"], "dirty_files": git["dirty_files"], "files": paths,
             "sha256": _tree_hash(root, paths), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    path = path or os.path.join(root, STAMP)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stamp, f)
    return stamp


def stamp_state(root: str = ROOT) -> dict | None:
    """``git_state``'s record from ``root/.whl/tree_stamp.json`` where the tree has no git; ``dirty`` is True
    also when a file differs from the stamp's hash (changed after the stamp was written). None: no stamp."""
    try:
        with open(os.path.join(root, STAMP), encoding="utf-8") as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return None
    same = _tree_hash(root, stamp.get("files", [])) == stamp.get("sha256")
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


def time_stats(seconds: list[float]) -> dict:
    """``{"n", "min_ms", "median_ms", "max_ms", "times_ms"}`` of timed calls (seconds in, milliseconds out)."""
    ms = [s * 1e3 for s in seconds]
    if not ms:
        return {"n": 0, "min_ms": None, "median_ms": None, "max_ms": None, "times_ms": []}
    return {"n": len(ms), "min_ms": min(ms), "median_ms": statistics.median(ms), "max_ms": max(ms), "times_ms": ms}


class Outcome:
    """The checks and the stages of one run, and what it exits with (see the module docstring)."""

    def __init__(self):
        self.checks: list[dict] = []
        self.stages: list[dict] = []

    def check(self, name: str, ok: bool, detail: str = "", **extra) -> bool:
        """Record a check (a bit comparison, a bound, a target the run must meet); returns ``ok``."""
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail, **extra})
        return bool(ok)

    def stage(self, name: str, status: str, detail: str = "", **extra) -> None:
        """Record a stage: ``status`` is ``"ok"``, ``"failed"``, ``"timed out"`` or ``"skipped"``."""
        if status not in ("ok", "failed", "timed out", "skipped"):
            raise ValueError(f"unknown stage status {status!r}")
        self.stages.append({"stage": name, "status": status, "detail": detail, **extra})

    def failed_checks(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]

    def failed_stages(self) -> list[dict]:
        return [s for s in self.stages if s["status"] in ("failed", "timed out")]

    def skipped(self) -> list[dict]:
        return [s for s in self.stages if s["status"] == "skipped"]

    def exit_code(self) -> int:
        if self.failed_checks() or self.failed_stages():
            return 1
        return 3 if self.skipped() else 0

    def summary(self) -> str:
        """One line: PASS / FAIL / INCOMPLETE, and what failed or was skipped."""
        bad, broke, skipped = self.failed_checks(), self.failed_stages(), self.skipped()
        parts = [f"{len(self.checks) - len(bad)} of {len(self.checks)} checks passed"]
        if self.stages:
            ok = sum(s["status"] == "ok" for s in self.stages)
            parts[0] += f", {ok} of {len(self.stages)} stages ok"
        if bad:
            parts.append("FAILED checks: " + "; ".join(c["check"] + (f" ({c['detail']})" if c["detail"] else "")
                                                    for c in bad[:12]) + (" ..." if len(bad) > 12 else ""))
        if broke:
            parts.append("FAILED stages: " + "; ".join(f"{s['stage']} ({s['status']}"
                                                     + (f": {s['detail']}" if s["detail"] else "") + ")" for s in broke))
        if skipped:
            parts.append("skipped: " + "; ".join(f"{s['stage']} ({s['detail']})" for s in skipped))
        word = {0: "PASS", 1: "FAIL", 3: "INCOMPLETE"}[self.exit_code()]
        return f"{word}: " + "; ".join(parts)

    def as_dict(self) -> dict:
        return {"exit_code": self.exit_code(), "summary": self.summary(), "checks": self.checks,
                "stages": self.stages}


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


def dumps(obj) -> str:
    """JSON for a record (non-finite floats as their repr, anything else not JSON as its str)."""
    return json.dumps(jsonable(obj), indent=1)


class ScriptRun:
    """One run of a bench script: its provenance (taken first, before the run writes anything), its sections
    (each in its own try/except: a failure is a failed stage, the rest still runs), its checks, its JSON
    (``<out>/<name>.json``, saved after every section, so a run killed later keeps what it had) and the line
    it ends with (``finish``: the ``Outcome`` summary; returns the exit status)."""

    def __init__(self, name: str, device, out: str, argv: list[str] | None = None, log=None):
        self.name, self.out = name, out
        self.log = log or (lambda *parts: print(*parts, flush=True))
        self.outcome = Outcome()
        self.t0 = time.time()
        prov = provenance(device, argv)
        self.result: dict = {"provenance": prov, "exact": [], "notes": [], "complete": False}
        gaps = missing(prov)
        self.outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
        self.log({k: prov.get(k) for k in ("card", "driver", "commit", "dirty", "torch", "triton", "diffusers",
                                          "command")})

    def section(self, name: str, fn, *args, **kwargs):
        """Run ``fn``; an exception is a failed stage (the traceback in the JSON). Returns ``fn``'s result or None."""
        import traceback

        t0 = time.perf_counter()
        self.log(f"\n== {name}")
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding; the others still run
            tb = traceback.format_exc()
            self.log(tb)
            self.outcome.stage(name, "failed", f"{type(exc).__name__}: {str(exc)[:300]}", traceback=tb[-3000:],
                               seconds=time.perf_counter() - t0)
            out = None
        else:
            self.outcome.stage(name, "ok", seconds=time.perf_counter() - t0)
        self.log(f"   ({name}: {time.perf_counter() - t0:.1f} s)")
        self.save()
        return out

    def skip(self, name: str, why: str) -> None:
        self.log(f"\n== {name}: skipped ({why})")
        self.outcome.stage(name, "skipped", why)

    def exact(self, name: str, elements: int, mismatches: int, **extra) -> bool:
        """A bit-for-bit check: ``mismatches`` elements of ``elements`` differ (-1: shapes or dtypes differ)."""
        self.result["exact"].append({"check": name, "elements": elements, "mismatches": mismatches, **extra})
        self.log(f"  {'OK ' if mismatches == 0 else 'BAD'} {name}: {mismatches} mismatches of {elements}")
        return self.outcome.check(name, mismatches == 0, f"{mismatches} of {elements} differ" if mismatches else "")

    def check(self, name: str, ok: bool, detail: str = "", **extra) -> bool:
        self.log(f"  {'OK ' if ok else 'BAD'} {name}" + (f": {detail}" if detail else ""))
        return self.outcome.check(name, ok, detail, **extra)

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.log("  note: " + text)

    def save(self, final: bool = False) -> str:
        os.makedirs(self.out, exist_ok=True)
        self.result["seconds"] = time.time() - self.t0
        self.result["complete"] = final
        self.result["outcome"] = self.outcome.as_dict()
        path = os.path.join(self.out, f"{self.name}.json")
        from .._files import atomic_write

        with atomic_write(path, "wb") as f:
            f.write(dumps(self.result).encode("utf-8"))
        return path

    def finish(self) -> int:
        """Save the final JSON, print the summary line last, return the exit status (``Outcome.exit_code``)."""
        path = self.save(final=True)
        self.log(f"\nwrote {path}; total {self.result['seconds']:.0f} s")
        self.log(f"{self.name}: {self.outcome.summary()}")
        return self.outcome.exit_code()

