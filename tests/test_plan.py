"""kve_fast.plan: the per-step scalars, for every front.

- Algorithm 2, lines 4-5 (gamma_i, the range test, sigma_hat), computed in one place for every plan (``ChurnRule``):
  the reference's plans against diffusers' own scheduler, at settings where the two conventions' orders of
  operations give different bits (k-diffusion's order is tested against k-diffusion itself in
  tests/test_k_diffusion.py and tests/test_k_diffusion_clients.py).
- S_min <= S_max, one rule in one wording (``check_churn_range``): the scheduler's settings, the sigmas sampler's
  s_tmin/s_tmax, and the command line's --s-min/--s-max, which it checks before it loads the model (each bound the
  model's where the option is not given).
- The plan of a sigma sequence (``VectorPlan``): each step's floats are ``Step``'s 0-d arithmetic, made a chunk at a
  time from the caller's sigmas as they were at the call, in any order of access (graphed runs too).
- Nothing before step 1 grows with the step count (10**9 steps, 10**6 user sigmas: few Python objects, fast), a run
  holds a bounded number of chunks, each step is planned once, the step memo fits its byte estimate
  (``STEP_BYTES``), the plan cache stays within its byte bound and serves concurrent calls their sequential bits;
  fast noise's keys (kve_fast.noise), made ``KEY_CHUNK`` steps at a time, are the run's keys.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import CAN_RUN_TRITON, GaussianScore, RefScheduler, assert_bitwise, needs_triton

import kve_fast
from kve_fast import cli
from kve_fast import noise as noise_module
from kve_fast import plan as plan_module
from kve_fast.cli import main
from kve_fast.plan import sigmas_plan
from kve_fast.sampler import plan_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton needs CUDA tensors outside its interpreter
BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])
SIGMAS = [20.0, 5.0, 1.0, 0.3, 0.0]


# --- the churn rule (gamma, the range test, sigma_hat) ----------------------------------------------------------------

STEPS = 50
# the scheduler's defaults (S_churn 80 over [0.05, 50]): 20 churned steps, gamma at the cap sqrt(2) - 1; and
# gamma = 0.2, below it
CONFIGS = [{}, {"s_churn": 10.0, "s_min": 0.01, "s_max": 20.0}]


def _diffusers_sigma_hat(config: dict, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``add_noise_to_input`` sigma_hat at each of ``sigmas`` (on a 1-element sample)."""
    ref = RefScheduler(**config)
    ref.set_timesteps(STEPS)
    return torch.stack([ref.add_noise_to_input(torch.zeros(1), s, torch.Generator().manual_seed(0))[1] for s in sigmas])


@pytest.mark.parametrize("config", CONFIGS)
def test_every_reference_plan_churns_as_diffusers_does(config):
    """The lazy 0-d plan (``Step``), the elementwise plan over chunks (``VectorPlan``) and the scheduler's own
    ``churn_sigma`` give diffusers' sigma_hat bit for bit. Mutations of ``ChurnRule`` (each fails): the reference's
    sigma_hat as sigma * (gamma + 1), k-diffusion's order (both settings); gamma over N - 1 (below the cap); gamma
    without its cap (the defaults); the range test without S_max (tests/test_k_diffusion.py catches it open at
    S_min)."""
    scheduler = kve_fast.KarrasVeScheduler(**config)
    steps = plan_steps(scheduler, STEPS)
    sigmas = torch.stack([s.sigma for s in steps])
    expected = _diffusers_sigma_hat(config, sigmas)
    assert_bitwise(torch.stack([s.sigma_hat for s in steps]), expected, "Step")
    c = scheduler.config
    vector = sigmas_plan(sigmas.tolist() + [0.0], c.s_churn, c.s_min, c.s_max)
    assert_bitwise(torch.stack([s.sigma_hat for s in vector]), expected, "VectorPlan")
    scheduler.set_timesteps(STEPS)
    assert_bitwise(torch.stack([scheduler.churn_sigma(s)[0] for s in sigmas]), expected, "the scheduler's churn_sigma")
    # these settings tell the orders apart: k-diffusion's sigma * (gamma + 1) differs at some churned steps
    gamma = min(c.s_churn / STEPS, 2**0.5 - 1)
    churned = [s for s in sigmas if c.s_min <= s <= c.s_max]
    assert 0 < len(churned) < STEPS, "churned steps and steps outside the range"
    assert any(s * (gamma + 1) != s + gamma * s for s in churned)


def test_sigma_hat_is_sigma_outside_the_range():
    """Outside [S_min, S_max] gamma is 0: sigma_hat is sigma (0-d and elementwise), and ``Step.gamma`` says 0."""
    steps = plan_steps(kve_fast.KarrasVeScheduler(s_churn=10.0, s_min=0.1, s_max=1.0), 8)
    outside = [s for s in steps if not 0.1 <= float(s.sigma) <= 1.0]
    assert outside and all(s.gamma == 0 and torch.equal(s.sigma_hat, s.sigma) for s in outside)
    vector = sigmas_plan([s.sigma for s in steps] + [0.0], 10.0, 0.1, 1.0)
    assert [s.gamma for s in vector] == [s.gamma for s in steps]


# --- the churn range: S_min <= S_max, one rule in one wording ---------------------------------------------------------

# the bundled digits model's scheduler config: s_min 0.05, s_max 50
COMMANDS = {
    "sample": ["sample", "--model", "digits", "--steps", "2", "--batch-size", "1", "--device", "cpu"],
    "generate": ["generate", "--model", "digits", "--seeds", "0-1", "--steps", "2", "--device", "cpu"],
}


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded despite an empty churn range")

    monkeypatch.setattr(cli, "load_for_command", load)


def _scheduler_words(**settings) -> str:
    with pytest.raises(ValueError) as caught:
        kve_fast.KarrasVeScheduler(**settings)
    return str(caught.value)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("options, settings", [
    (["--s-min", "10", "--s-max", "1"], {"s_min": 10.0, "s_max": 1.0}),
    (["--s-min", "60"], {"s_min": 60.0, "s_max": 50}),  # above the model's s_max
    (["--s-max", "0.01"], {"s_min": 0.05, "s_max": 0.01}),  # below the model's s_min
])
def test_an_empty_churn_range_is_refused_before_the_model_loads(no_loading, tmp_path, capsys, command, options,
                                                                settings):
    """Mutation: the command's early check left out (the model loads: the test's loader fails)."""
    argv = COMMANDS[command] + options + (["--out", str(tmp_path / "x.png")] if command == "sample" else
                                          ["--outdir", str(tmp_path / "out")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    given = ", ".join(o for o in options if o.startswith("--"))
    assert err == f"kve-fast: error: {given}: {_scheduler_words(**settings)}\n"
    assert not list(tmp_path.iterdir())


def test_a_churn_range_the_model_agrees_with_goes_on_to_load(monkeypatch, tmp_path):
    """The check passes a range that is not empty (the loader is reached; it stops the command here)."""
    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(cli, "load_for_command", load)
    with pytest.raises(Loaded):
        main(COMMANDS["sample"] + ["--s-min", "1", "--out", str(tmp_path / "x.png")])


def test_the_sigmas_sampler_words_the_rule_as_the_scheduler():
    """Mutation: sample_karras_ve_sigmas' own wording back ("`s_tmax` must be >= `s_tmin`") -> fails."""
    with pytest.raises(ValueError) as caught:
        kve_fast.sample_karras_ve_sigmas(lambda x, s: x, torch.zeros(1, 1, 2, 2), [1.0, 0.0], s_tmin=2.0, s_tmax=1.0)
    assert str(caught.value).replace("s_tmin", "s_min").replace("s_tmax", "s_max") == \
        _scheduler_words(s_min=2.0, s_max=1.0)


# --- the plan of a sigma sequence, a chunk at a time ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4, 1024])
@pytest.mark.parametrize("churn", [(0.0, 0.0, float("inf")), (1.0, 0.0, float("inf")), (80.0, 0.05, 1.0),
                                   (3.0, 0.3, 0.3)])
def test_sigmas_plan_steps_are_the_reference_0d_arithmetic(churn, chunk, monkeypatch):
    """sample_karras_ve_sigmas' plan computes the steps' floats with elementwise ops over chunks of the sequence
    (``VectorPlan``); each field must be what ``Step`` computes with the reference's 0-d float32 ops (the plan of
    the pipeline, which diffusers' parity tests pin), also where sigmas equal s_tmin and s_tmax, and in any order
    of access (the graph runner's first and last steps, the loop's, backwards: chunks made again). Mutations this
    catches: sigma_hat as ``sigma * (1 + gamma)`` (one rounding fewer), the range test ``>`` for ``>=``, the
    churn coefficient as ``sqrt((sigma_hat - sigma) * (sigma_hat + sigma))``; with chunks of 4: each chunk's last
    step taken as the run's last, a chunk's first step taken as ``i // CHUNK``."""
    from kve_fast.plan import Plan, sigmas_plan

    monkeypatch.setattr(plan_module, "CHUNK", chunk)
    s_churn, s_tmin, s_tmax = churn
    gen = torch.Generator().manual_seed(0)
    fields = ("index", "timestep", "gamma", "last", "_sigma", "_sigma_hat", "_sigma_next", "noise_coef", "at_hat",
              "at_next")
    for n in (1, 2, 7, 33):
        for scale in (1e-2, 1.0, 300.0):
            sig = torch.rand(n, generator=gen, dtype=torch.float64) * scale + 1e-3
            if n > 2 and s_tmax < float("inf"):
                sig[:2] = torch.tensor([s_tmax, s_tmin])  # (the range test's bounds, as float32 values)
            sig = torch.cat([sig.sort(descending=True).values, torch.zeros(1, dtype=torch.float64)]).float()
            fast = sigmas_plan(sig.tolist(), s_churn, s_tmin, s_tmax)
            slow = Plan(n, lambda k: sig[k].clone(), s_churn, s_tmin, s_tmax, memo=False)
            assert len(fast) == len(slow) == n
            for i in [0, n - 1, max(n - 2, 0), 0, 1 % n, *range(n), *reversed(range(n))]:
                a, b = fast[i], slow[i]
                for f in fields:
                    assert getattr(a, f) == getattr(b, f), (n, scale, i, f, getattr(a, f), getattr(b, f))
                    assert type(getattr(a, f)) is type(getattr(b, f)), (i, f)
                assert torch.equal(a.sigma_hat, b.sigma_hat) and a.values[0].scalars == b.values[0].scalars


@needs_triton
def test_graphed_runs_over_chunked_plans_give_the_eager_bits(fake_graphs, monkeypatch):
    """The graph runner asks for the first and last steps before the loop walks forward: with the floats made two
    steps at a time, a graphed run of either front gives the eager torch run's bits (k-diffusion's: the real
    package's, tests/test_k_diffusion.py)."""
    from kve_fast import graphs
    from kve_fast import k_diffusion as kd

    monkeypatch.setattr(plan_module, "CHUNK", 2)
    model = GaussianScore(8).to(DEVICE)
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.6, 0.2, 0.0], device=DEVICE)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 6.0
    run = lambda backend, mode: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
        model, x, sigmas, s_churn=2.0, s_tmin=0.5, s_tmax=4.0, generator=torch.Generator().manual_seed(1),
        backend=backend, cuda_graph=mode)
    assert_bitwise(run("triton", True), run("torch", False), "sample_karras_ve_sigmas")
    denoiser = kd.score_to_denoiser(model)
    outs = []
    for backend, mode in (("triton", True), ("torch", False)):
        torch.manual_seed(2)
        outs.append(kd.sample_heun(denoiser, x, sigmas, disable=True, s_churn=2.0, s_tmin=0.5, s_tmax=4.0,
                                   backend=backend, cuda_graph=mode))
    assert_bitwise(outs[0], outs[1], "k_diffusion.sample_heun")
    assert graphs.graph_info()["captures"] == 2, "both graphed runs were captured"


@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_the_sigmas_are_read_as_the_call_got_them(kind, monkeypatch):
    """The plan makes the steps' floats as the run goes: the caller editing its own sigmas during the run changes
    nothing (mutation: the plan's copy of them left out -> the chunks made after the edit read it)."""
    monkeypatch.setattr(plan_module, "CHUNK", 2)
    model = GaussianScore(8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 6.0
    sigmas = torch.tensor([6.0, 3.0, 1.5, 0.6, 0.2, 0.0])
    given = sigmas if kind == "tensor" else sigmas.numpy()

    def edit(state):
        if state["i"] == 0:
            given[...] *= 0.5

    run = lambda sig, callback: kve_fast.sample_karras_ve_sigmas(  # noqa: E731
        model, x, sig, s_churn=1.0, generator=torch.Generator().manual_seed(1), callback=callback)
    expected = run(sigmas.clone(), lambda state: None)
    assert_bitwise(run(given, edit), expected)
    assert float(sigmas[0]) == 3.0, "the edit was made"


@pytest.mark.parametrize("name", ["s_tmin", "s_tmax"])
def test_an_int_bound_torch_cannot_compare_is_refused_by_name(name):
    """Bounds are compared with the sigmas in torch, which takes ints through int64: a larger int is refused
    naming it, before any work (mutation: the check removed -> an unnamed OverflowError)."""
    from kve_fast.plan import sigmas_plan

    kwargs = {"s_tmin": 0.0, "s_tmax": float("inf"), name: 10**40}
    with pytest.raises(ValueError, match=name):
        sigmas_plan([2.0, 1.0, 0.0], 1.0, **kwargs)


# --- nothing before step 1 grows with the step count; caches bounded in bytes and thread-safe -------------------


def test_a_huge_step_count_starts_at_once(monkeypatch):
    calls = []
    real = plan_module.schedule_value

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "schedule_value", counting)
    seen = []
    tracemalloc.start()
    try:
        out = kve_fast.sample_karras_ve(GaussianScore(8), kve_fast.KarrasVeScheduler(), (1, 3, 8, 8), 10**9,
                                        callback=lambda s: seen.append(s["i"]) or {"stop": s["i"] >= 1})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == [0, 1] and out.shape == (1, 3, 8, 8)
    # 2 for the scheduler's range check at construction, then sigma_i and sigma_{i+1} for each of the 2 steps
    assert len(calls) <= 6, f"{len(calls)} schedule values computed for 2 steps"
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB for a run stopped after 2 of 10**9 steps"


class _FirstModelCall(Exception):
    """Raised by a model: the run stops where its first step's model call would run."""


def _long_run(front: str, sigmas: torch.Tensor, model, callback=None, noise="exact"):
    """One call of ``front`` over ``sigmas`` with a near-free ``model`` (score or denoiser), torch backend, eager."""
    x = torch.ones(1, 3, 4, 4) * float(sigmas[0])
    if front == "k-diffusion":
        from kve_fast import k_diffusion as kd

        return kd.sample_heun(lambda x, s: model(x), x, sigmas, disable=True, s_churn=1.0, backend="torch",
                              callback=callback, noise=noise)
    return kve_fast.sample_karras_ve_sigmas(lambda x, s: model(x), x, sigmas, s_churn=1.0, backend="torch",
                                            cuda_graph=False, callback=callback, noise=noise)


def _first_call(x):
    raise _FirstModelCall


@pytest.mark.parametrize("noise", ["exact", "fast"])
@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_a_long_sigma_sequence_is_planned_in_bounded_memory_and_fast(front, noise):
    """10**6 user sigmas: at the first model call the run holds few Python objects and got there fast. The plans
    computed every step's floats up front (about 650 bytes a step: 0.65 GB and 9 s before step 1 here, 6.7 GB
    and 58 s for 10**7 sigmas). tracemalloc counts Python's allocations (the per-step floats, tuples, steps), not
    tensor storage: the sequence, its float32 copy and the checks' temporaries are O(n) tensors, which is
    allowed. Mutation: ``_Chunks`` making every row at once (CHUNK = n) -> 0.6 GB here; fast noise's keys made for
    every step at once (KEY_CHUNK = n: 8 bytes a step and sample, and their temporaries) -> 40 MB."""
    n = 10**6
    sigmas = torch.cat([torch.linspace(50.0, 0.01, n), torch.zeros(1)])
    with pytest.raises(_FirstModelCall):
        _long_run(front, torch.tensor([3.0, 2.0, 0.0]), _first_call)  # (what the first call imports)
    seen = {}

    def model(x):
        seen["peak"], seen["t"] = tracemalloc.get_traced_memory()[1], time.perf_counter()
        raise _FirstModelCall

    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(_FirstModelCall):
            _long_run(front, sigmas, model, noise=noise)
    finally:
        tracemalloc.stop()
    assert seen["peak"] < 8 * 2**20, f"{seen['peak'] / 2**20:.1f} MiB of Python objects before step 1"
    assert seen["t"] - start < 5.0, f"{seen['t'] - start:.1f} s before step 1 (the plan took ~9 s for 10**6 steps)"


@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_the_plan_of_a_sigma_sequence_keeps_a_bounded_number_of_chunks(front, monkeypatch):
    """Across a run of 3,000 steps whose floats are made 64 steps at a time, what the run holds of Python
    objects does not grow from step 500 to step 2,900 (it shrank by a few KB here; mutation: every chunk kept,
    CHUNKS_KEPT = 10**9 -> 0.5 MB more in k-diffusion's convention, 1.2 MB in the reference's)."""
    monkeypatch.setattr(plan_module, "CHUNK", 64)
    sigmas = torch.cat([torch.linspace(50.0, 0.01, 3000), torch.zeros(1)])
    held = {}

    def callback(state):
        if state["i"] in (500, 2900):
            held[state["i"]] = tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        _long_run(front, sigmas, torch.neg, callback)
    finally:
        tracemalloc.stop()
    assert held[2900] - held[500] < 2**17, f"{(held[2900] - held[500]) / 2**20:.2f} MiB more at step 2,900"


def test_each_step_is_planned_once_on_the_fused_path(monkeypatch):
    made = []

    class CountingStep(plan_module.Step):
        __slots__ = ()

        def __init__(self, *args):
            made.append(args[0])
            super().__init__(*args)

        @classmethod
        def _of(cls, index, *args):  # (a step of a plan whose floats were computed for the whole sequence)
            made.append(index)
            return super()._of(index, *args)

    monkeypatch.setattr(plan_module, "Step", CountingStep)
    for backend in BACKENDS:
        made.clear()
        kve_fast.sample_karras_ve_sigmas(GaussianScore(8), torch.zeros(1, 3, 8, 8) + 20.0, SIGMAS, s_churn=2.0,
                                         backend=backend)
        assert made == [0, 1, 2, 3], f"{backend}: steps made {made}"


def test_step_memo_fits_its_byte_estimate():
    plan = plan_module.Plan(300, lambda k: torch.tensor(100.0 / (k + 1)), 10.0, 0.05, 50.0, memo=True)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for step in plan:
            pass
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert used / 300 <= plan_module.STEP_BYTES, f"{used / 300:.0f} bytes per memoized step"


def test_the_plan_cache_stays_within_its_byte_bound(monkeypatch):
    monkeypatch.setattr(plan_module, "CACHE_BYTES", 2 * 2**20)
    plan_module.clear_plan_cache()
    stop_at_once = lambda s: {"stop": True}  # noqa: E731
    for n in range(300, 1300, 50):  # 20 plans of up to ~1.3 MB each, in a 2 MB cache
        kve_fast.sample_karras_ve(GaussianScore(4), kve_fast.KarrasVeScheduler(), (1, 3, 4, 4), n,
                                  callback=stop_at_once)
        info = plan_module.plan_cache_info()
        assert info["bytes"] <= info["max_bytes"] == 2 * 2**20
    assert info["plans"] >= 1
    plan_module.clear_plan_cache()
    assert plan_module.plan_cache_info()["plans"] == 0


def test_concurrent_calls_agree_with_sequential_ones():
    model = GaussianScore(8)
    jobs = [(n, seed) for n in (3, 4, 5, 6) for seed in (0, 1)]
    run = lambda n, seed: kve_fast.sample_karras_ve(  # noqa: E731
        model, kve_fast.KarrasVeScheduler(s_churn=5.0), (2, 3, 8, 8), n, torch.Generator().manual_seed(seed))
    plan_module.clear_plan_cache()
    results, errors = {}, []

    def worker(job):
        try:
            results[job] = run(*job)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for job in jobs:
        assert_bitwise(results[job], run(*job), f"steps={job[0]} seed={job[1]}")
    assert plan_module.plan_cache_info()["plans"] == 4


@pytest.mark.parametrize("front", ["sigmas", "k-diffusion"])
def test_fast_noise_keys_made_a_chunk_at_a_time_are_the_runs_keys(front, monkeypatch):
    """Fast noise makes its per-step keys KEY_CHUNK steps at a time: the same keys, so the same bits, as made at
    once (mutations: a chunk's first row taken as step 0's, or the chunk not renewed -> the bits move)."""
    sigmas = torch.cat([torch.linspace(8.0, 0.05, 7), torch.zeros(1)])

    def model(x):
        return x * 0.5

    torch.manual_seed(1)
    whole = _long_run(front, sigmas, model, noise="fast")
    monkeypatch.setattr(noise_module, "KEY_CHUNK", 2)
    torch.manual_seed(1)
    assert_bitwise(_long_run(front, sigmas, model, noise="fast"), whole, "keys made 2 steps at a time")
    src = noise_module.DeviceNoise((3, 1, 2, 2), torch.Generator().manual_seed(4), "cpu", 7)
    steps = [src.step().host for _ in range(7)]
    assert np.array_equal(np.stack(steps), src.keys[1:])
    word = noise_module._draw_word(torch.Generator().manual_seed(4))
    assert np.array_equal(src.keys, noise_module.sample_keys([word] * 3, [0, 1, 2], 7))
