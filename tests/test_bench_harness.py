"""bench/harness, the measuring tools, and ``kve_fast.benchmark.provenance`` beneath them: they cannot mislead.
Provenance (git state, the tree stamp a copy without .git reads, the required fields), exit status and summary
(``Outcome``), a session's stages (the time budget, crashes and timeouts named, background stages, a must-run test
stage that skipped) and the device sessions' stage lists, timing stats and the repeat rule, a script's run
(``ScriptRun``), the load around a child; none of it in the installed package.

CPU only and cheap: the stages here are tiny Python one-liners, not the bench scripts.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's bench package (not installed)
harness = importlib.import_module("bench.harness")
from bench.harness import Stage, describe_exit, run_session  # noqa: E402

pv = importlib.import_module("kve_fast.benchmark.provenance")  # the package exports a function of that name

PY = sys.executable


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@t"))


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / ".gitignore").write_text("/.whl/\n")
    (root / "a.py").write_text("x = 1\n")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "one")
    return root


def test_git_state_records_the_dirty_flag(repo):
    clean = pv.git_state(str(repo))
    assert clean["source"] == "git" and len(clean["commit"]) == 40
    assert clean["dirty"] is False and clean["dirty_files"] == []
    (repo / "a.py").write_text("x = 2\n")  # an edit not committed
    dirty = pv.git_state(str(repo))
    assert dirty["dirty"] is True and dirty["commit"] == clean["commit"]
    assert any("a.py" in line for line in dirty["dirty_files"])
    (repo / "a.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")  # an untracked file is dirty too (git status --porcelain prints it)
    assert pv.git_state(str(repo))["dirty"] is True


def test_stamp_names_the_commit_without_git_and_sees_later_edits(repo, tmp_path, monkeypatch):
    stamp = harness.write_stamp(str(repo))
    assert stamp["dirty"] is False and "a.py" in stamp["files"] and ".whl/tree_stamp.json" not in stamp["files"]
    copy = tmp_path / "copy"  # the device machine's copy: the files and the carried .whl/, no .git
    copy.mkdir()
    (copy / "a.py").write_text((repo / "a.py").read_text())
    (copy / ".gitignore").write_text((repo / ".gitignore").read_text())
    (copy / ".whl").mkdir()
    (copy / ".whl" / "tree_stamp.json").write_text((repo / ".whl" / "tree_stamp.json").read_text())
    monkeypatch.delenv("KVE_FAST_COMMIT", raising=False)
    got = pv.git_state(str(copy))
    assert got["commit"] == stamp["commit"] and got["dirty"] is False and "tree_stamp" in got["source"]
    (copy / "a.py").write_text("x = 3\n")  # changed after the stamp: dirty, and the record says why
    got = pv.git_state(str(copy))
    assert got["dirty"] is True and "changed after" in got["why"]


def test_provenance_fields_and_missing():
    rec = pv.provenance("cpu", argv=["bench/x.py", "--a", "b c"])
    for k in ("commit", "dirty", "torch", "triton", "diffusers", "command", "card", "driver", "date_utc"):
        assert k in rec
    assert rec["command"].endswith("bench/x.py --a 'b c'")
    assert pv.missing(rec) == [k for k in pv.REQUIRED if rec[k] is None]
    cuda = dict(rec, device="cuda:0", card=None, driver="580")
    assert "card" in pv.missing(cuda) and "driver" not in pv.missing(cuda)
    assert "dirty" in pv.missing(dict(rec, dirty=None))


def test_time_stats_and_repeat_rule():
    s = harness.time_stats([0.003, 0.001, 0.002, 0.010, 0.004])  # mean 4 ms, median 3
    assert (s["n"], s["min_ms"], s["median_ms"], s["max_ms"]) == (5, 1.0, 3.0, 10.0)
    assert harness.time_stats([0.001, 0.003])["median_ms"] == 2.0
    assert harness.stats([3, 1, 2, 10]) == {"min": 1, "median": 2.5, "max": 10, "n": 4}
    assert pv.required_repeats(1.99) == 5 and pv.required_repeats(2.0) == 3
    from kve_fast.benchmark.timing import RepeatPolicy

    assert RepeatPolicy(row_seconds=1.0, min_repeats=1, max_repeats=2).repeats(0.5) == 5  # the rule wins
    assert RepeatPolicy(row_seconds=1.0, min_repeats=1, max_repeats=2).repeats(10.0) == 3


def test_outcome_exit_codes_and_summary():
    o = harness.Outcome()
    o.check("bits", True)
    assert o.exit_code() == 0 and o.summary().startswith("PASS")
    o.stage("later", "skipped", "no time")
    assert o.exit_code() == 3 and "skipped: later (no time)" in o.summary()
    o.check("pipeline eager", False, "3 of 10 differ")
    assert o.exit_code() == 1 and "FAILED checks: pipeline eager (3 of 10 differ)" in o.summary()
    o2 = harness.Outcome()
    o2.stage("tests", "timed out", "killed")
    assert o2.exit_code() == 1 and "FAILED stages: tests (timed out: killed)" in o2.summary()


def _session(tmp_path, stages, budget=60.0):
    out = tmp_path / "out"
    lines = []
    rc = run_session("s", stages, budget, str(out), workroot=str(tmp_path / "work"), log=lines.append)
    return rc, json.loads((out / "s.json").read_text()), lines


def test_session_a_failing_stage_exits_nonzero_and_is_named(tmp_path):
    rc, rec, lines = _session(tmp_path, [
        Stage("good", [PY, "-c", "print('x: PASS: 1 of 1 checks passed')"], 0, 30),
        Stage("bad", [PY, "-c", "import sys; print('x: FAIL: 0 of 1 checks passed'); sys.exit(1)"], 0, 30),
        Stage("after", [PY, "-c", "print('still ran')"], 0, 30)])
    assert rc == 1
    status = {s["stage"]: s["status"] for s in rec["outcome"]["stages"]}
    assert status == {"good": "ok", "bad": "failed", "after": "ok"}  # the stage after a failure still runs
    assert "FAILED stages: bad (failed: exit 1: x: FAIL: 0 of 1 checks passed)" in lines[-1]
    assert rec["complete"] and rec["provenance"]["dirty"] is not None


def test_session_names_a_crash_and_a_timeout(tmp_path):
    rc, rec, lines = _session(tmp_path, [
        Stage("segv", [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], 0, 30),
        Stage("slow", [PY, "-c", "import time; time.sleep(30)"], 0, 1.5)])
    assert rc == 1
    by = {s["stage"]: s for s in rec["stages"]}
    assert by["segv"]["exit"] == "crashed (SIGSEGV)" and by["slow"]["status"] == "timed out"
    assert "segv (failed: crashed (SIGSEGV)" in lines[-1] and "slow (timed out" in lines[-1]
    assert describe_exit(-11) == "crashed (SIGSEGV)" and describe_exit(139).startswith("exit 139 (probably SIGSEGV")


def test_session_budget_skips_what_does_not_fit_and_says_so(tmp_path):
    rc, rec, lines = _session(tmp_path, [
        Stage("fits", [PY, "-c", "import sys; print(sys.argv[1])", "{budget}"], 1, 30),
        Stage("too big", [PY, "-c", "print('must not run')"], 100, 300)], budget=20)
    assert rc == 3
    by = {s["stage"]: s for s in rec["stages"]}
    from bench.harness.session import MARGIN_S

    assert by["fits"]["status"] == "ok" and int(by["fits"]["tail"][-1]) <= 20 - MARGIN_S  # {budget}: under its timeout
    assert by["too big"]["status"] == "skipped" and "needs about 100 s" in by["too big"]["why"]
    assert "INCOMPLETE" in lines[-1] and "skipped: too big (needs about 100 s" in lines[-1]
    assert "must not run" not in (tmp_path / "out" / "s.log").read_text()


def test_session_collects_stage_json_and_waits_for_background(tmp_path):
    write = "import json, sys, os; json.dump({'v': 7}, open(os.path.join(sys.argv[1], 'r.json'), 'w'))"
    rc, rec, _ = _session(tmp_path, [
        Stage("bg", [PY, "-c", "import time; time.sleep(1); open('{out}/done', 'w')"], 0, 30, background=True),
        Stage("needs bg", [PY, "-c", "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)",
                           str(tmp_path / "work" / "bg" / "done")], 0, 30, after=("bg",)),
        Stage("writes", [PY, "-c", write, "{out}"], 0, 30)])
    assert rc == 0, rec["outcome"]["summary"]
    by = {s["stage"]: s for s in rec["stages"]}
    assert by["writes"]["json"] == {"r.json": {"v": 7}}
    assert [s["stage"] for s in rec["outcome"]["stages"]] == ["bg", "needs bg", "writes"]


def test_session_a_must_run_test_stage_that_skipped_is_not_ok(tmp_path):
    """The once-crashing CUDA test must run: a pytest stage marked ``must_run`` whose summary says its tests were
    skipped is a skip (exit 3), not a pass (mutation: the must_run check removed -> exit 0)."""
    rc, rec, lines = _session(tmp_path, [
        Stage("crash test", [PY, "-c", "print('=== 1 skipped in 0.01s ===')"], 1, 30, must_run=True),
        Stage("plain", [PY, "-c", "print('=== 1 skipped in 0.01s ===')"], 1, 30)])
    by = {s["stage"]: s for s in rec["outcome"]["stages"]}
    assert rc == 3 and by["crash test"]["status"] == "skipped" and by["plain"]["status"] == "ok"
    assert "must run, not be skipped" in lines[-1] or "crash test" in lines[-1]


def test_device_session_lists_both_scripts_stages():
    root = ROOT
    for name, must in (("correctness", ("crashed-once test", "cuda tests", "kdiffusion_check")),
                       ("speed", ("graph_bench", "cold_start"))):
        out = subprocess.run([PY, os.path.join(root, "bench", "device_session.py"), name, "--list"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for stage in must:
            assert stage in out.stdout
    text = open(os.path.join(root, "bench", "device_session.py")).read()
    assert "--deselect" in text and "test_operators_check_their_arguments" in text


def test_a_script_run_records_its_sections_checks_and_ends_with_the_summary(tmp_path):
    """A failed section is a failed stage and an entry of ``errors`` (the next section still runs); the JSON is on
    disk after every section; ``finish`` writes the markdown beside it and prints the summary last (mutations: the
    failure not recorded -> exit 0; ``save`` not called by ``section`` -> no JSON before ``finish``)."""
    lines = []
    run = harness.ScriptRun("demo", "cpu", str(tmp_path), log=lambda *a: lines.append(" ".join(map(str, a))))
    run.section("one", lambda: run.exact("bits", 10, 0))
    assert json.loads((tmp_path / "demo.json").read_text())["exact"][0]["check"] == "bits"
    run.section("two", lambda: 1 / 0)
    run.section("three", lambda: run.exact("more bits", 4, 1, table="scalars", note="why"))
    rc = run.finish(markdown=lambda result: f"# {len(result['errors'])} error(s)")
    rec = json.loads((tmp_path / "demo.json").read_text())
    assert rc == 1 and rec["complete"] and rec["provenance"]["dirty"] is not None
    assert [e["part"] for e in rec["errors"]] == ["two"] and "ZeroDivisionError" in rec["errors"][0]["traceback"]
    assert {s["stage"]: s["status"] for s in rec["outcome"]["stages"]} == {"one": "ok", "two": "failed", "three": "ok"}
    assert rec["scalars"] == [{"check": "more bits", "elements": 4, "mismatches": 1, "note": "why"}]
    assert (tmp_path / "demo.md").read_text() == "# 1 error(s)\n"
    assert lines[-1].startswith("demo: FAIL:") and "more bits (1 of 4 differ)" in lines[-1]


def test_time_calls_repeats_until_the_rule_holds_at_the_median():
    """One untimed call, then 5 timed calls where a call is under 2 s (``required_repeats``); the last output."""
    calls = []
    st, out = harness.time_calls(lambda: calls.append(len(calls)) or len(calls))
    assert len(calls) == 6 and st["n"] == 5 and out == 6 and len(st["times_ms"]) == 5


def test_the_load_around_a_child_counts_its_cpu_and_the_neighbour_ends():
    """``measure_load`` charges a child's CPU time to it, not to the others; ``busy_neighbour`` ends its process
    (mutation: the children's CPU time not read -> own_cpu_s 0)."""
    with harness.measure_load() as load:
        subprocess.run([PY, "-c", "import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass"],
                       check=True)
    assert load.own_cpu_s >= 0.25 and load.wall_s >= load.own_cpu_s * 0.9 and load.others_busy_cores >= 0
    with harness.busy_neighbour() as neighbour:
        assert neighbour.poll() is None
    assert neighbour.poll() is not None
    with harness.busy_neighbour(False) as none:
        assert none is None


def test_the_installed_package_ships_no_harness():
    """Repo-only tooling (a script's run, the device sessions, the stamp writer) lives under bench/, not in the
    wheel's ``kve_fast.benchmark`` (mutation: kve_fast.benchmark exporting ScriptRun again)."""
    import importlib.util

    import kve_fast.benchmark as kb

    assert importlib.util.find_spec("kve_fast.benchmark.session") is None
    assert not {"Outcome", "ScriptRun", "run_session", "write_stamp", "time_stats"} & set(dir(kb))
    assert {"Outcome", "ScriptRun", "run_session", "write_stamp", "time_stats"} <= set(harness.__all__)
