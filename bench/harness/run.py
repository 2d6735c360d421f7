"""One run of a bench script (``ScriptRun``), what it exits with (``Outcome``), its statistics and its JSON.

Issue 20's rules for the bench scripts, in one place so no script can drift: a record names the code that ran
(``kve_fast.benchmark.provenance``; a missing field is a failed check), timings repeat per
``required_repeats`` and report min / median / max, and the exit status is 1 when any check failed or any stage
failed (also when it timed out), 3 when nothing failed but something was skipped, else 0.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback

from kve_fast._files import atomic_write
from kve_fast.benchmark.provenance import jsonable, missing, provenance, required_repeats

__all__ = ["ScriptRun", "Outcome", "stats", "time_stats", "time_calls", "write_json", "dumps"]


def stats(values) -> dict:
    """``{"min", "median", "max", "n"}`` of measured values, in their own unit."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def time_stats(seconds: list[float]) -> dict:
    """``{"n", "min_ms", "median_ms", "max_ms", "times_ms"}`` of timed calls (seconds in, milliseconds out)."""
    ms = [s * 1e3 for s in seconds]
    if not ms:
        return {"n": 0, "min_ms": None, "median_ms": None, "max_ms": None, "times_ms": []}
    return {"n": len(ms), "min_ms": min(ms), "median_ms": statistics.median(ms), "max_ms": max(ms), "times_ms": ms}


def time_calls(fn, sync=lambda: None) -> tuple[dict, object]:
    """``fn`` once untimed (compilation, a capture), then timed calls until there are as many as the repeat rule
    asks at their median (``required_repeats``); ``(time_stats, the last call's output)``. ``sync`` waits for the
    device before and after each timed call."""
    fn()
    sync()
    seconds, out = [], None
    while len(seconds) < required_repeats(sorted(seconds)[len(seconds) // 2] if seconds else 0.0):
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds.append(time.perf_counter() - t0)
    return time_stats(seconds), out


def dumps(obj) -> str:
    """JSON for a record (non-finite floats as their repr, anything else not JSON as its str)."""
    return json.dumps(jsonable(obj), indent=1)


def write_json(path: str, obj) -> str:
    """Write ``obj`` (``dumps``) to ``path`` whole or not at all, its folder made if needed; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write((dumps(obj) + "\n").encode("utf-8"))
    return path


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


class ScriptRun:
    """One run of a bench script: its provenance (taken first, before the run writes anything), its sections
    (each in its own try: a failure is a failed stage and an entry of ``errors``, the rest still runs), its
    checks, its JSON (written whole after every section, so a run killed later keeps what it had) and the line it
    ends with (``finish``: the ``Outcome`` summary, last; returns the exit status).

    The record: ``result[record]`` is the provenance (``record="env"``: ``kve_fast.benchmark.environment``'s,
    the provenance with the names the benchmark's report reads), beside ``exact`` (bit comparisons), ``notes``,
    ``errors`` (failed parts), ``complete``, ``seconds`` and ``outcome``. It goes to ``path``, else to
    ``<out>/<name>.json``, else nowhere; ``writer(result, final)`` replaces that writing (graph_bench's report)."""

    def __init__(self, name: str, device, out: str | None = None, *, path: str | None = None,
                 argv: list[str] | None = None, log=None, record: str = "provenance", writer=None):
        from kve_fast.benchmark.timing import environment

        self.name = name
        self.path = path or (os.path.join(out, f"{name}.json") if out else None)
        self.log = log or (lambda *parts: print(*parts, flush=True))
        self.writer = writer
        self.outcome = Outcome()
        self.t0 = time.time()
        self.provenance = (environment if record == "env" else provenance)(device, argv)
        self.result: dict = {record: self.provenance, "exact": [], "notes": [], "complete": False}
        gaps = missing(self.provenance)
        self.outcome.check("provenance", not gaps, "missing: " + ", ".join(gaps) if gaps else "")
        self.log({k: self.provenance.get(k) for k in ("card", "driver", "commit", "dirty", "torch", "triton",
                                                      "diffusers", "command")})

    def section(self, name: str, fn, *args, **kwargs):
        """Run ``fn``; an exception is a failed stage (``failed``). Returns ``fn``'s result or None."""
        t0 = time.perf_counter()
        self.log(f"\n== {name}")
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding; the others still run
            self.failed(name, exc, seconds=time.perf_counter() - t0)
            out = None
        else:
            self.outcome.stage(name, "ok", seconds=time.perf_counter() - t0)
        self.log(f"   ({name}: {time.perf_counter() - t0:.1f} s)")
        self.save()
        return out

    def failed(self, part: str, exc: BaseException, **extra) -> None:
        """A part (a section, a case of one) that raised ``exc``: in ``errors`` with its traceback, and a failed
        stage (``extra`` in both, e.g. ``graphed=True``)."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = f"{type(exc).__name__}: {exc}"
        self.log(f"  FAILED {part}: {error}\n{tb}")
        self.result.setdefault("errors", []).append({"part": part, "error": error, "traceback": tb[-3000:], **extra})
        self.outcome.stage(part, "failed", error[:300], **extra)

    def skip(self, name: str, why: str) -> None:
        self.log(f"\n== {name}: skipped ({why})")
        self.outcome.stage(name, "skipped", why)

    def exact(self, name: str, elements: int, mismatches: int, *, table: str = "exact", **extra) -> bool:
        """A bit-for-bit check into ``result[table]``: ``mismatches`` elements of ``elements`` differ (-1: shapes or
        dtypes differ)."""
        self.result.setdefault(table, []).append({"check": name, "elements": elements, "mismatches": mismatches,
                                                  **extra})
        self.log(f"  {'OK ' if mismatches == 0 else 'BAD'} {name}: {mismatches} mismatches of {elements}"
                 + (f" ({extra['note']})" if extra.get("note") else ""))
        return self.outcome.check(name, mismatches == 0, f"{mismatches} of {elements} differ" if mismatches else "")

    def check(self, name: str, ok: bool, detail: str = "", **extra) -> bool:
        self.log(f"  {'OK ' if ok else 'BAD'} {name}" + (f": {detail}" if detail else ""))
        return self.outcome.check(name, ok, detail, **extra)

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.log("  note: " + text)

    def save(self, final: bool = False):
        """Write the record as it stands; returns where (the writer's answer, with ``writer``)."""
        self.result["seconds"] = time.time() - self.t0
        self.result["complete"] = final
        self.result["outcome"] = self.outcome.as_dict()
        if self.writer is not None:
            return self.writer(self.result, final)
        return write_json(self.path, self.result) if self.path else None

    def finish(self, markdown=None) -> int:
        """Save the final record; ``markdown(result)``: a report written beside the JSON (``.md``) and printed;
        then the summary line, last. Returns the exit status (``Outcome.exit_code``)."""
        where = self.save(final=True)
        if markdown is not None:
            text = markdown(self.result)
            if self.path:
                with atomic_write(os.path.splitext(self.path)[0] + ".md", "wb") as f:
                    f.write((text + "\n").encode("utf-8"))
            self.log("\n" + text)
        self.log(f"\nwrote {where or 'nothing (no output file)'}; total {self.result['seconds']:.0f} s")
        self.log(f"{self.name}: {self.outcome.summary()}")
        return self.outcome.exit_code()
