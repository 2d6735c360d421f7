"""kve_fast.threads: the CPU thread count of a call, and OpenMP threads that sleep while they wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from kve_fast import _warn, threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def policy(monkeypatch):
    """A clean policy: torch's count 2 (as on a 2-core machine), no setting anywhere, nothing measured yet."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(threads.ENV, "auto")  # the load-adaptive policy (the default leaves torch's count alone)
    monkeypatch.setattr(threads, "_torch_default", 2)
    monkeypatch.setattr(threads, "_fixed", None)
    monkeypatch.setattr(threads, "_cache", None)
    _warn.forget(("threads", "reduced"))
    yield
    torch.set_num_threads(before)


def idle(monkeypatch, value, cores=2):
    calls = []

    def measure(seconds=threads.MEASURE_S):
        calls.append(seconds)
        return value, cores

    monkeypatch.setattr(threads, "idle_cores", measure)
    return calls


def test_a_busy_core_means_fewer_threads_for_the_call_only(policy, monkeypatch):
    idle(monkeypatch, 1.0)  # one of two cores busy
    with pytest.warns(RuntimeWarning, match="1 thread"):
        with threads.for_call("cpu") as choice:
            assert torch.get_num_threads() == 1 and choice.threads == 1 and "1.0 of 2 cores idle" in choice.why
    assert torch.get_num_threads() == 2
    with warnings.catch_warnings():  # warned once per process
        warnings.simplefilter("error")
        with threads.for_call("cpu"):
            assert torch.get_num_threads() == 1


@pytest.mark.parametrize("idle_value, expected", [(2.0, 2), (1.75, 2), (1.6, 1), (0.2, 1), (0.0, 1)])
def test_idle_cores_round_down_with_a_margin(policy, monkeypatch, idle_value, expected):
    idle(monkeypatch, idle_value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with threads.for_call("cpu"):
            assert torch.get_num_threads() == expected


def test_a_quiet_machine_keeps_torchs_count_and_the_answer_is_reused(policy, monkeypatch):
    calls = idle(monkeypatch, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reduced: no warning
        for _ in range(3):
            with threads.for_call(torch.device("cpu")):
                assert torch.get_num_threads() == 2
    assert len(calls) == 1  # measured once, reused within REUSE_S
    monkeypatch.setattr(threads, "REUSE_S", 0.0)
    with threads.for_call("cpu"):
        pass
    assert len(calls) == 2


@pytest.mark.parametrize("setting", ["explicit", "env_n", "omp", "off", "torch_set"])
def test_an_explicit_count_wins(policy, monkeypatch, setting):
    calls = idle(monkeypatch, 0.0)  # fully busy: auto would pick 1
    expected = {"explicit": 3, "env_n": 3, "omp": 2, "off": 2, "torch_set": 4}[setting]
    if setting == "explicit":
        threads.set_threads(3)
    elif setting == "env_n":
        monkeypatch.setenv(threads.ENV, "3")
    elif setting == "omp":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    elif setting == "off":
        monkeypatch.setenv(threads.ENV, "off")
    else:
        torch.set_num_threads(4)
    with threads.for_call("cpu"):
        assert torch.get_num_threads() == expected
    assert calls == []  # nothing measured
    assert torch.get_num_threads() == (4 if setting == "torch_set" else 2)


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_a_bad_environment_setting_is_named(policy, monkeypatch, value):
    monkeypatch.setenv(threads.ENV, value)
    with pytest.raises(ValueError, match=threads.ENV):
        with threads.for_call("cpu"):
            pass
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="`n`"):
        threads.set_threads(0)


def test_other_devices_are_left_alone(policy, monkeypatch):
    calls = idle(monkeypatch, 0.0)
    with threads.for_call("meta") as choice:
        assert torch.get_num_threads() == 2 and choice.threads is None
    assert calls == []


def test_nested_and_concurrent_calls_share_the_first_count(policy, monkeypatch):
    idle(monkeypatch, 1.0)
    inside, go = threading.Event(), threading.Event()
    seen = []

    def other():
        inside.wait()
        with threads.for_call("cpu") as choice:  # overlaps the main thread's call
            seen.append((torch.get_num_threads(), choice.threads))
        go.set()

    worker = threading.Thread(target=other)
    worker.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with threads.for_call("cpu"):
            with threads.for_call("cpu") as nested:
                assert nested.threads is None and torch.get_num_threads() == 1
            inside.set()
            go.wait(10)
            assert torch.get_num_threads() == 1  # the other call's end did not put 2 back under us
    worker.join(10)
    assert seen == [(1, None)]
    assert torch.get_num_threads() == 2


def test_idle_cores_reads_proc_stat(monkeypatch):
    snapshots = iter([{0: (100, 200), 1: (50, 200)}, {0: (110, 210), 1: (50, 210)}])  # cpu0 idle, cpu1 busy
    monkeypatch.setattr(threads, "_our_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "_read_stat", lambda cpus: next(snapshots))
    assert threads.idle_cores(0.0) == (1.0, 2)
    if os.path.exists("/proc/stat") and hasattr(os, "sched_getaffinity"):
        monkeypatch.undo()
        found, cores = threads.idle_cores(0.05)
        assert cores == len(os.sched_getaffinity(0)) and -0.01 <= found <= cores + 0.01


def _python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", threads.ENV)}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_passive_wait_before_torch_only():
    code = ("import os, sys; from kve_fast.threads import passive_wait; a = passive_wait(); "
            "print(a, os.environ.get('OMP_WAIT_POLICY'), passive_wait())")
    assert _python(code) == "True PASSIVE False"
    assert _python(code, OMP_WAIT_POLICY="active") == "False active False"
    assert _python(code, GOMP_SPINCOUNT="1000") == "False None False"
    assert _python(code, KVE_FAST_THREADS="off") == "False None False"
    assert _python("import torch, os; from kve_fast.threads import passive_wait; "
                   "print(passive_wait(), os.environ.get('OMP_WAIT_POLICY'))") == "False None"


@pytest.mark.parametrize("device, idle_value, env, expected", [
    ("cpu", 1.0, {}, "PASSIVE"),  # a core busy: threads sleep while they wait
    ("auto", 0.5, {}, "PASSIVE"),
    ("cpu", 1.8, {}, None),  # quiet: OpenMP's spinning, faster there
    ("cuda", 0.0, {}, None),  # a GPU run: left alone, nothing measured
    ("cpu", 0.0, {"OMP_WAIT_POLICY": "active"}, "active"),  # the environment decides
    ("cpu", 0.0, {"GOMP_SPINCOUNT": "10"}, None),
    ("cpu", 0.0, {threads.ENV: "off"}, None),
])
def test_the_commands_wait_policy(monkeypatch, device, idle_value, env, expected):
    calls = idle(monkeypatch, idle_value)
    monkeypatch.delitem(sys.modules, "torch")  # as in the command, before torch loads (put back afterwards)
    environ = dict(env)
    said = threads.wait_policy_for(device, environ)
    assert environ.get("OMP_WAIT_POLICY") == expected
    assert (said is not None) == (expected == "PASSIVE")
    assert said is None or said == f"passive wait: {2 - idle_value:.1f} of 2 cores busy at the start"
    assert len(calls) == (1 if device in ("cpu", "auto") and not env else 0)
    monkeypatch.undo()
    assert threads.wait_policy_for("cpu", {}) is None  # torch already loaded: too late, nothing done


def test_the_command_decides_before_it_imports_torch():
    code = ("import os, sys\nfrom kve_fast import threads\nthreads.idle_cores = lambda seconds=0: (0.9, 2)\n"
            "from kve_fast.cli import main\nprint(main(['sample', '--out', 'x.txt']), os.environ.get('OMP_WAIT_POLICY'), "
            "'torch' in sys.modules)")
    assert _python(code).splitlines()[-1] == "2 PASSIVE False"


def test_by_default_a_call_keeps_torchs_count_and_diffusers_bits(policy, monkeypatch):
    """The default leaves the thread count alone, so a pipeline call gives the bits diffusers gives in the same
    process however busy the machine is (mutation: the load-adaptive count by default: the graph bench's CPU
    smoke run lost parity with diffusers when a core was busy)."""
    from conftest import kve_pipe, reference_test_unet, run_reference

    monkeypatch.delenv(threads.ENV)
    calls = idle(monkeypatch, 0.0)  # every core busy
    assert threads.choose("cpu").threads is None
    unet = reference_test_unet(8)
    before = torch.get_num_threads()
    seen = []
    out = kve_pipe(unet)(1, 3, torch.Generator().manual_seed(0), output_type="latent",
                         callback_on_step_end=lambda p, i, t, kw: seen.append(torch.get_num_threads()) or {}).images
    assert seen == [before] * 3 and not calls
    _, ref = run_reference(unet, {}, 1, 3, torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)
