"""``kve-fast generate``: one PNG per seed on one or many processes (torch.distributed, gloo on the CPU).

What is tested, and where it holds (docs/generate.md says only what is here):

- the files are byte-identical however the work is split: one process with torch's default CPU threads, one process
  with 2 workers, and torchrun with 2 gloo processes (each worker samples with 1 CPU thread);
- ``record.json`` holds everything that can change the bytes and is written before the first image; a rerun that
  differs in any of it is refused with the difference named, whatever the state of the manifest;
- no file is adopted: a PNG the manifest does not vouch for (an emptied manifest, a stray file, a line of another
  record) is refused; a listed file whose bytes changed is made again; a file lands only after its line is durable,
  so a run killed with SIGKILL mid-file or mid-manifest-line, or stopped by SIGTERM, then rerun, completes the set
  with no duplicate, truncated or temporary file and one manifest line per seed that matches its file;
- faults (disk full, permission, a failing rank) end in one line naming the file and the cause, and a rerun
  completes the set; symlinks, FIFOs, devices and folders where generate writes are refused, not replaced;
- seeds are ranges: parsed and walked lazily, overlaps counted once, ASCII digits only;
- the progress bar moves within a batch, in images, and rank 0's covers the whole job;
- no torchrun rank leaves a gloo thread to the interpreter's shutdown (one left then can abort the process);
- an image depends only on its seed: the sampler (noise and step arithmetic) gives the same image at any batch
  size and place in the batch, in exact mode and in fast mode (per-sample Philox keys in the Triton kernels, per-
  sample generators in the torch backend). Checked with a model without batch-coupled kernels (the exact Gaussian
  score): a UNet's own convolutions and matrix products may pick other kernels at another batch size, which
  ``generate`` sidesteps by padding every batch to ``--batch`` (bench/RESULTS.md records what the digits UNet does
  on this CPU at other batch sizes).

Shapes are tiny (the digits model is 8x8 with 1 channel, 3 steps).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import kve_fast
from kve_fast import _files
from kve_fast import generate as gen
from kve_fast.generate import folder as gen_folder, job as gen_job, record as gen_record, workers as gen_workers
from kve_fast.cli import main
from kve_fast.noise import DeviceNoise, StepKeys, sample_keys

from conftest import CAN_RUN_TRITON, SMALL_SIGMAS, GaussianScore, needs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the CLI runs: few steps, small batches, seeds crossing a subfolder boundary (999 | 1000)
SEEDS = "995-1004"
SEED_LIST = list(range(995, 1005))
ARGS = ["--seeds", SEEDS, "--batch", "3", "--steps", "3", "--subdirs", "--quiet"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(args, timeout=240, env=None, **kwargs):
    return subprocess.run(args, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _cli(outdir, *extra, wrapper: str = "", args=ARGS):
    """``python -m kve_fast generate`` in a fresh process (``wrapper``: Python run first, e.g. a patch)."""
    argv = ["generate", "--outdir", str(outdir), *args, *extra]
    code = f"import sys\n{wrapper}\nfrom kve_fast.cli import main\nsys.exit(main({argv!r}))"
    return _run([sys.executable, "-c", code])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(outdir, *extra, nproc=2, args=ARGS, site=None):
    """torchrun with ``nproc`` gloo processes; ``site``: a folder with a sitecustomize.py every process runs first."""
    env = _env(PYTHONPATH=os.pathsep.join([str(site)] * (site is not None) + [ROOT]))
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kve_fast", "generate",
                 "--outdir", str(outdir), *args, *extra], env=env)


def _files_of(outdir) -> dict[str, bytes]:
    """Every file under ``outdir`` but the manifest and the record (relative path -> bytes)."""
    out = {}
    for folder, _, names in os.walk(outdir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, outdir).replace(os.sep, "/")
            if rel not in (gen.MANIFEST, gen.RECORD):
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def _manifest_lines(outdir) -> list[dict]:
    with open(os.path.join(outdir, gen.MANIFEST), "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not data, "the manifest ends with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def _record(outdir) -> dict:
    with open(os.path.join(outdir, gen.RECORD)) as f:
        return json.load(f)


def _check_complete(outdir, seeds, reference=None, subdirs=True) -> list[dict]:
    """Every seed's file, whole, nothing else (no temporary file); one manifest line per seed, matching its file
    and naming the folder's record."""
    files = _files_of(outdir)
    expected = {gen.seed_file(s, subdirs=subdirs) for s in seeds}
    assert set(files) == expected, sorted(set(files) ^ expected)
    for rel, data in files.items():
        with Image.open(os.path.join(outdir, rel)) as image:
            image.load()
            assert image.format == "PNG" and image.size == (8, 8) and image.mode == "L"
    record = _record(outdir)
    assert record["software"]["kve_fast"] == kve_fast.__version__ and record["model"]["name"] == "digits"
    assert record["settings"]["steps"] == 3 and record["settings"]["noise"] == "exact"
    lines = _manifest_lines(outdir)
    assert sorted(r["seed"] for r in lines) == sorted(seeds), "one manifest line per seed"
    for r in lines:
        assert r["file"] == gen.seed_file(r["seed"], subdirs=subdirs)
        assert r["sha256"] == hashlib.sha256(files[r["file"]]).hexdigest()
        assert r["record"] == gen.record_id(record)
    if reference is not None:
        assert files == reference, [k for k in files if files[k] != reference.get(k)]
    return lines


def _vouched(outdir):
    """The write-ahead rule: every PNG under a final name has a manifest line with its hash (whatever was killed)."""
    listed = gen.read_manifest(os.path.join(outdir, gen.MANIFEST))[0]
    for rel, data in _files_of(outdir).items():
        if rel.endswith(".png") and not os.path.basename(rel).startswith("."):
            seed = int(os.path.basename(rel)[:-4])
            assert listed.get(seed) == hashlib.sha256(data).hexdigest(), f"{rel} landed before its manifest line"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """One process, the whole set: the folder every other run must reproduce (its files byte for byte)."""
    outdir = tmp_path_factory.mktemp("reference") / "out"
    proc = _cli(outdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete(outdir, SEED_LIST)
    return outdir


@pytest.fixture(scope="module")
def reference(reference_dir):
    return _files_of(reference_dir)


def _errors(stderr: str) -> list[str]:
    """stderr's lines but the warnings (3 steps make the reference schedule warn)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("kve-fast: warning:")]


def _copy(files: dict, outdir) -> None:
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(outdir, rel)), exist_ok=True)
        with open(os.path.join(outdir, rel), "wb") as f:
            f.write(data)


# --- seeds and names ----------------------------------------------------------------------------------------

def test_seed_lists_and_file_names():
    assert list(gen.parse_seeds("0-4")) == [0, 1, 2, 3, 4]
    assert list(gen.parse_seeds("7, 3,5-6,3")) == [3, 5, 6, 7]
    assert list(gen.parse_seeds(str(2**32 - 1))) == [2**32 - 1]
    for bad, needle in [("", "nothing"), ("a-b", "expected"), ("5-3", "backwards"), ("-3", "expected"),
                        (str(2**32), "low 32 bits"), ("0-99999999", "at most"), ("1" * 5000, "from 0 to")]:
        with pytest.raises(ValueError, match=needle):
            gen.parse_seeds(bad)
    assert gen.seed_file(123) == "000123.png"
    assert gen.seed_file(123, subdirs=True) == "000000/000123.png"
    assert gen.seed_file(49999, subdirs=True) == "049000/049999.png"
    assert gen.seed_file(1234567) == "1234567.png"


def test_seeds_are_ranges_counted_once_in_ascii_digits():
    # overlaps count once against the limit (each part alone is under it, the union exactly at it)
    seeds = gen.parse_seeds(f"0-5999999,4000000-{gen.MAX_SEEDS - 1}")
    assert len(seeds) == gen.MAX_SEEDS and seeds.ranges == ((0, gen.MAX_SEEDS - 1),)
    assert len(gen.parse_seeds("0-9,5-14,20")) == 16
    # ASCII digits only: Python's int() takes Arabic-Indic and full-width digits, a seed must not
    for bad in ["\u0663", "1-\u0665", "\uff17", "1\u00a0-3", "\u20037"]:
        with pytest.raises(ValueError, match="ASCII digits"):
            gen.parse_seeds(bad)
    # a range is not a list: parsing, counting, a place and a share cost nothing like its length
    tracemalloc.start()
    try:
        big = gen.parse_seeds("0-9999999")
        assert len(big) == 10_000_000 and 9_999_999 in big and 10_000_000 not in big
        assert big.index(1234567) == 1234567
        assert list(zip(range(3), big.share(1, 4))) == [(0, 1), (1, 5), (2, 9)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes to parse and walk 0-9999999"
    split = gen.parse_seeds("0-3,10-12")
    assert [list(split.share(r, 2)) for r in (0, 1)] == [[0, 2, 10, 12], [1, 3, 11]]
    assert [split.index(s) for s in (0, 3, 10, 12)] == [0, 3, 4, 6]


def test_generation_is_scheduled_lazily(tmp_path):
    """0-9999999, the most seeds a run takes: the first batch lands with memory independent of the range (no list,
    no upfront check; 25c8ced planned the whole range first: 97 s and 1.2 GB)."""
    calls = [0]

    class Stops(torch.nn.Module):  # the Gaussian score, failing at its 4th call (the second batch)
        def __init__(self):
            super().__init__()
            self.score = GaussianScore(8, channels=1)
            self.config = self.score.config

        def forward(self, x, sigma):
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("stop here")
            return self.score(x, sigma)

    pipe = kve_fast.KarrasVePipeline(Stops(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    tracemalloc.start()
    try:
        with pytest.raises(gen.GenerateError, match="stop here"):
            gen.generate_images(pipe, gen.parse_seeds("0-9999999"), str(tmp_path), steps=2, batch=4, backend="torch",
                                workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(os.listdir(tmp_path)) == sorted([gen.MANIFEST, gen.RECORD, "000000.png", "000001.png", "000002.png",
                                                   "000003.png"])
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB of Python memory for ten million seeds"


def test_argument_errors_need_neither_torch_nor_diffusers(tmp_path):
    code = ("import sys\nfrom kve_fast.cli import main\n"
            f"rc = main(['generate', '--seeds', '5-1', '--outdir', {str(tmp_path / 'o')!r}])\n"
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    proc = _run([sys.executable, "-c", code])
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "--seeds" in proc.stderr and "backwards" in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--outdir", ""], "--outdir: empty; name the output folder"),
    (["--outdir", "o", "--seeds", "\u0661\u0662"], "--seeds"),
    (["--outdir", "o", "--workers", "0"], "--workers"),
])
def test_generate_usage_errors(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--seeds", "0-3", *argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert list(tmp_path.iterdir()) == [], "nothing written, here or anywhere"


def test_api_arguments_are_checked_before_any_work(tmp_path):
    pipe = _gaussian_pipe()
    for kwargs, error, needle in [({"outdir": ""}, ValueError, "outdir"), ({"batch": 0}, ValueError, "batch"),
                                  ({"steps": 2.5}, TypeError, "steps"), ({"subdirs": 1}, TypeError, "subdirs"),
                                  ({"noise": "slow"}, ValueError, "noise"), ({"workers": 0}, ValueError, "workers"),
                                  ({"seeds": [1, True]}, TypeError, "seeds"), ({"seeds": [-1]}, ValueError, "seeds"),
                                  ({"seeds": "1-\u0662"}, ValueError, "seeds"), ({"steps": 1}, ValueError, "steps"),
                                  ({"cuda_graph": "yes"}, ValueError, "cuda_graph"),
                                  ({"model": "abc"}, TypeError, "model"), ({"model": {"x": 1}}, TypeError, "model"),
                                  ({"status": []}, TypeError, "status"), ({"comm": object()}, TypeError, "comm")]:
        args = {"seeds": [1, 2], "outdir": str(tmp_path / "o"), **kwargs}
        with pytest.raises(error, match=needle):
            gen.generate_images(pipe, args.pop("seeds"), args.pop("outdir"), **args)
    assert list(tmp_path.iterdir()) == []


def test_a_job_that_fails_before_its_first_image_leaves_the_folder_as_it_was(tmp_path):
    """A batch too large for the device fails before any image lands: the record it wrote must not refuse the
    corrected command (``--batch`` smaller), and a folder the run made is gone again (mutation: no rollback on
    the job's failure path -> the rerun is refused with "--batch 4 (now 2)")."""

    class TooBig(torch.nn.Module):  # out of memory above batch 2
        def __init__(self):
            super().__init__()
            self.score = GaussianScore(8, channels=1)
            self.config = self.score.config

        def forward(self, x, sigma):
            if x.shape[0] > 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return self.score(x, sigma)

    pipe = kve_fast.KarrasVePipeline(TooBig(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    out = tmp_path / "o"
    (tmp_path / "kept").mkdir()
    kept = tmp_path / "kept"
    for folder in (out, kept):
        with pytest.raises(gen.GenerateError, match="out of memory"):
            gen.generate_images(pipe, "0-3", str(folder), steps=2, batch=4, workers=1)
    assert not out.exists() and list(kept.iterdir()) == []
    summary = gen.generate_images(pipe, "0-3", str(out), steps=2, batch=2, workers=1)
    assert summary.written == 4 and sorted(p.name for p in out.glob("*.png")) == [gen.seed_file(s) for s in range(4)]
    with pytest.raises(gen.GenerateError, match="--batch 2 \\(now 4\\)"):  # once images stand, the record holds
        gen.generate_images(pipe, "4-7", str(out), steps=2, batch=4, workers=1)
    assert (out / gen.RECORD).exists() and len((out / gen.MANIFEST).read_text().splitlines()) == 4


def test_the_manifest_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / gen.MANIFEST
    line = lambda seed, rid="r": json.dumps({"seed": seed, "file": gen.seed_file(seed), "sha256": "ab", "record": rid})  # noqa: E731
    path.write_text(f"{line(1)}\nnot json\n{line(2)}\n{line(4, 'other')}\n{line(3)[:20]}")
    index, end, skipped = gen.read_manifest(str(path), "r", subdirs=False)
    assert sorted(index) == [1, 2] and skipped == 2
    assert path.read_bytes()[:end].endswith(b"}\n") and len(path.read_bytes()) - end == 20


def test_every_rank_must_see_the_folder_rank_0_writes(tmp_path):
    assert not gen_folder.sees_token(str(tmp_path), "token", wait=0)
    (tmp_path / gen.JOB_FILE).write_text("another")
    assert not gen_folder.sees_token(str(tmp_path), "token", wait=0.6)
    (tmp_path / gen.JOB_FILE).write_text("token")
    assert gen_folder.sees_token(str(tmp_path), "token", wait=0)


# --- the same bytes however the work is split ---------------------------------------------------------------

# Seeds 12-17 in batches of 3: on the 2-core CPU these tests were written on, seed 15's image differs between 1 and
# 2 intra-op threads (the digits UNet's convolutions), so a run on torch's default threads and a torchrun run
# (1 thread per process) differed before generate fixed its threads.
THREAD_ARGS = ["--seeds", "12-17", "--batch", "3", "--steps", "3", "--quiet"]


def test_one_process_workers_and_torchrun_write_the_same_files(tmp_path):
    plain = _cli(tmp_path / "plain", "--workers", "1", args=THREAD_ARGS,
                 wrapper="import torch\ntorch.set_num_threads(2)  # a plain run on a 2-core machine")
    assert plain.returncode == 0, plain.stderr[-3000:]
    two = _cli(tmp_path / "workers", "--workers", "2", args=THREAD_ARGS)
    assert two.returncode == 0, two.stderr[-3000:]
    run = _torchrun(tmp_path / "torchrun", args=THREAD_ARGS)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    files = {k: _files_of(tmp_path / k) for k in ("plain", "workers", "torchrun")}
    assert len(files["plain"]) == 6
    for k in ("workers", "torchrun"):
        assert files[k] == files["plain"], (k, [r for r in files[k] if files[k][r] != files["plain"].get(r)])
    records = {k: _record(tmp_path / k) for k in files}
    assert records["plain"] == records["workers"] == records["torchrun"], "nothing of how the work was split"
    assert records["plain"]["device"]["threads"] == gen.THREADS_PER_WORKER == 1


class OneThread(torch.nn.Module):
    """The exact Gaussian score (8x8, 1 channel), refusing to run on more than one intra-op CPU thread;
    ``die_in_workers``: a worker process (any but the one that made it) running it ends with ``os._exit(3)``."""

    def __init__(self, die_in_workers: bool = False):
        super().__init__()
        self.score = GaussianScore(8, channels=1)
        self.config = self.score.config
        self.die_in_workers, self.main_pid = die_in_workers, os.getpid()

    def forward(self, x, sigma):
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"the model runs on {torch.get_num_threads()} threads")
        if self.die_in_workers and os.getpid() != self.main_pid:
            os._exit(3)  # a worker process dies outright
        return self.score(x, sigma)


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "worker-processes"])
def test_the_model_runs_on_one_cpu_thread_per_worker(tmp_path, workers):
    pipe = kve_fast.KarrasVePipeline(OneThread(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's
    try:
        summary = gen.generate_images(pipe, range(8), str(tmp_path), steps=2, batch=2, backend="torch",
                                      workers=workers)
        assert torch.get_num_threads() == 2, "the caller's thread count is put back"
    finally:
        torch.set_num_threads(before)
    assert summary.written == 8 and summary.workers == workers
    assert _record(tmp_path)["device"] == gen.device_identity(torch.device("cpu"))


class _Hung(Exception):
    pass


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGALRM"), reason="needs SIGALRM")
def test_a_worker_process_that_dies_stops_the_job(tmp_path):
    import signal

    def hung(signum, frame):  # a job that waits for a dead worker's batches forever fails here instead
        raise _Hung("generate_images still waiting 60 s after its worker processes died")

    pipe = kve_fast.KarrasVePipeline(OneThread(die_in_workers=True), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with pytest.raises(gen.GenerateError, match=r"worker process \d exited \(exit code 3\)"):
            gen.generate_images(pipe, range(8), str(tmp_path), steps=2, batch=2, backend="torch", workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".png")] == []


def test_worker_processes_take_a_model_that_does_not_pickle(tmp_path):
    """Workers are forked once the model is loaded: nothing is pickled but batches and files."""
    class Local(OneThread):  # a class defined here does not pickle
        pass

    pipe = kve_fast.KarrasVePipeline(Local(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    summary = gen.generate_images(pipe, range(4), str(tmp_path), steps=2, batch=2, backend="torch", workers=2)
    assert summary.workers == 2 and summary.written == 4


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "worker-processes"])
def test_kve_fast_threads_does_not_change_a_workers_threads(tmp_path, monkeypatch, workers):
    """kve_fast's per-call thread policy (kve_fast/threads.py) would set KVE_FAST_THREADS's count inside every
    sampler call: generate fixes it at one thread too, for the run (and puts the policy back)."""
    from kve_fast import threads

    monkeypatch.setenv(threads.ENV, "2")
    pipe = kve_fast.KarrasVePipeline(OneThread(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    summary = gen.generate_images(pipe, range(4), str(tmp_path), steps=2, batch=2, backend="torch", workers=workers)
    assert summary.written == 4 and summary.workers == workers
    assert threads._fixed is None, "the policy is put back"


def test_a_file_that_cannot_be_checked_ends_the_job_in_one_line(tmp_path, monkeypatch):
    """Worker processes get their batches from the main process's walk of the seeds, which hashes listed files:
    an error there (here: permission) is the job's one-line error, not an escaped internal exception."""
    pipe = _gaussian_pipe()
    gen.generate_images(pipe, range(4), str(tmp_path), steps=2, batch=2, backend="torch", workers=1)
    path = str(tmp_path / gen.seed_file(0))

    def unreadable(p):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)

    monkeypatch.setattr(gen_workers, "sha256_file", unreadable)
    with pytest.raises(gen.GenerateError, match=f"^{path}: Permission denied; 0 images written"):
        gen.generate_images(pipe, range(6), str(tmp_path), steps=2, batch=2, backend="torch", workers=2)


KILLED_WITH_BUSY_WORKERS = """
import os, signal, time
import kve_fast.generate.workers as g
real = g._sample
def _sample(*args, **kwargs):  # in the workers: a batch that takes a minute
    time.sleep(60)
    return real(*args, **kwargs)
g._sample = _sample
def get(self, idle=None):  # the main process: hand out a batch each, then die (SIGKILL) while they work
    self.started = True
    for k in range(self.count):
        self._hand_out(k)
    time.sleep(0.5)
    with open({pids!r}, "w") as f:
        f.write(" ".join(map(str, self.pids)))
    os.kill(os.getpid(), signal.SIGKILL)
g.Processes.get = get
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes: Linux")
def test_no_worker_process_outlives_a_killed_job(tmp_path):
    pids_file = tmp_path / "pids"
    argv = ["generate", "--outdir", str(tmp_path / "out"), *ARGS, "--workers", "2"]
    code = f"import sys\n{KILLED_WITH_BUSY_WORKERS.format(pids=str(pids_file))}\nfrom kve_fast.cli import main\nsys.exit(main({argv!r}))"
    with open(tmp_path / "stderr", "w") as err:  # not a pipe: the run returns when the main process dies
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=err, timeout=240)
    assert proc.returncode == -9, (tmp_path / "stderr").read_text()[-3000:]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in pids if _alive(p)]
    for pid in alive:  # the test's own leftovers
        os.kill(pid, 9)
    assert not alive, "worker processes still sampling after their job was killed"


# --- many processes ---------------------------------------------------------------------------------------

# Every rank reports the gloo threads it has just before its group is closed, and those left when the interpreter
# is about to shut down (the last atexit handler: registered first). A gloo thread left then can take the GIL
# during the shutdown, which ends it inside a C++ destructor: SIGABRT (ranks.Distributed's docstring).
GLOO_THREADS_AT_EXIT = """
import atexit, os, sys
import kve_fast.generate.ranks as ranks

def gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(n for n in names if "gloo" in n)

before = []
close = ranks.Distributed.close
def closing(self):
    before[:] = gloo_threads()
    close(self)
ranks.Distributed.close = closing
atexit.register(lambda: print(f"rank {os.environ['RANK']} gloo threads: {before} at close, {gloo_threads()} at exit",
                              file=sys.stderr))
"""


def test_torchrun_two_processes_write_the_files_of_one(tmp_path, reference):
    """Also: no rank leaves a gloo thread to the interpreter's shutdown (mutations: ``Distributed.close`` without
    ``destroy_process_group``, or without ``import torch.distributed.nn`` before ``init_process_group``, whose
    functions' default arguments then hold the default group -> its threads are left, fails)."""
    site = tmp_path / "site"
    site.mkdir()
    linux = os.path.isdir("/proc/self/task")
    if linux:
        (site / "sitecustomize.py").write_text(GLOO_THREADS_AT_EXIT)
    proc = _torchrun(tmp_path / "out", site=site)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _check_complete(tmp_path / "out", SEED_LIST, reference)
    if linux:
        reports = re.findall(r"rank (\d) gloo threads: (\[.*?\]) at close, (\[.*?\]) at exit", proc.stderr)
        assert sorted(r for r, _, _ in reports) == ["0", "1"], proc.stderr[-3000:]
        for rank, at_close, at_exit in reports:
            assert at_close != "[]", "the check sees gloo's threads"
            assert at_exit == "[]", f"rank {rank} left gloo threads to the interpreter's shutdown: {at_exit}"


# One process as a torchrun job of one: the default group held by someone else (as torch.distributed.nn's default
# arguments held it), the group that ran the job's collectives must still be freed by close().
HELD_DEFAULT_GROUP = """
import weakref
import torch.distributed as dist
from kve_fast.generate.ranks import Distributed

used = []
gather = dist.all_gather_object
def recording(out, obj, group=None):
    used.append(group or dist.group.WORLD)
    return gather(out, obj, group=group)
dist.all_gather_object = recording
comm = Distributed("gloo")
held = dist.group.WORLD
assert comm.all_gather({"rank": comm.rank}) == [{"rank": 0}]
group = weakref.ref(used.pop())
comm.close()
print("freed" if group() is None else "alive")
"""


def test_the_group_of_the_collectives_is_freed_whoever_holds_the_default_one():
    """(mutation: the collectives on the default group, ``group=None`` for gloo -> "alive", fails)"""
    env = _env(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = _run([sys.executable, "-c", HELD_DEFAULT_GROUP], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["freed"], proc.stdout + proc.stderr[-3000:]


RANK_1_FAILS = """
import os
if os.environ.get("RANK") == "1":
    import kve_fast.generate.writer as g
    def _write(data, path):
        raise IsADirectoryError(21, "Is a directory", path)
    g._write = _write
"""


def test_a_failing_rank_stops_the_job_with_the_reason(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RANK_1_FAILS)
    outdir = tmp_path / "out"
    proc = _torchrun(outdir, site=site)
    assert proc.returncode != 0
    first = os.path.join(str(outdir), gen.seed_file(SEED_LIST[1], subdirs=True))
    assert f"kve-fast: error: rank 1: {first}: Is a directory" in proc.stderr, proc.stderr[-4000:]
    assert f"error: rank 1 failed: {first}: Is a directory; " in proc.stderr, "rank 0 reports it too"
    files = _files_of(outdir)  # nothing partial: no temporary file, every file listed with its hash
    assert not [k for k in files if k.endswith(".tmp")]
    _vouched(outdir)


def test_rank_0_shows_the_whole_job_in_images(tmp_path):
    proc = _torchrun(tmp_path / "out", args=[a for a in ARGS if a != "--quiet"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "10/10" in proc.stderr and "img/s" in proc.stderr, proc.stderr[-2000:]
    assert "wrote 10 images" in proc.stdout and "2 processes" in proc.stdout


# --- killed, stopped, resumed ------------------------------------------------------------------------------

KILL_MID_FILE = """
import os, signal
import kve_fast.generate.writer as g
from kve_fast._files import atomic_write
calls = [0]
real = g._write
def _write(data, path):
    calls[0] += 1
    if calls[0] == 5:  # files 1-4 landed, file 5 is half written
        with atomic_write(path) as f:
            f.write(data[:20])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(data, path)
g._write = _write
"""

KILL_MID_MANIFEST = """
import os, signal
import kve_fast.generate.manifest as g
calls = [0]
real = g.Manifest.append
def append(self, lines):
    if lines:
        calls[0] += 1
        if calls[0] == 2:  # the second batch's lines: half written, then killed
            data = "".join(g.json.dumps(r) + "\\n" for r in lines).encode()
            os.write(self.fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, lines)
g.Manifest.append = append
"""

TERM_MID_BATCH = """
import os, signal
import kve_fast.generate.writer as g
calls = [0]
real = g._write
def _write(data, path):
    calls[0] += 1
    if calls[0] == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, mid-batch
    return real(data, path)
g._write = _write
"""


@pytest.mark.parametrize("wrapper, code", [(KILL_MID_FILE, -9), (KILL_MID_MANIFEST, -9), (TERM_MID_BATCH, 143)],
                         ids=["sigkill-mid-file", "sigkill-mid-manifest-line", "sigterm-mid-batch"])
def test_a_killed_run_resumes_to_the_complete_set(tmp_path, reference, wrapper, code):
    outdir = tmp_path / "out"
    proc = _cli(outdir, wrapper=wrapper)
    assert proc.returncode == code, proc.stderr[-3000:]
    left = _files_of(outdir)
    pngs = [k for k in left if k.endswith(".png")]
    assert 3 <= len(pngs) < len(SEED_LIST), sorted(left)
    _vouched(outdir)
    if code == 143:
        # (2 workers: the second batch's other files, and what the other worker had sampled of its batch)
        assert re.search(r"stopped: 4 images written; \d+ more were sampled but not written, and are dropped",
                         proc.stderr), proc.stderr[-2000:]
        assert not [k for k in left if k.endswith(".tmp")], "SIGTERM leaves no temporary file"
    else:
        with open(outdir / gen.MANIFEST, "rb") as f:
            data = f.read()
        assert data.endswith(b"\n") == (wrapper is KILL_MID_FILE)
    for rel in pngs:  # what the killed run left under the final names is whole
        assert left[rel] == reference[rel], rel
    proc = _cli(outdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete(outdir, SEED_LIST, reference)
    proc = _cli(outdir)  # and a third run has nothing to do
    assert proc.returncode == 0 and len(_manifest_lines(outdir)) == len(SEED_LIST)


def test_reruns_check_the_files_and_the_settings(tmp_path, reference, capsys):
    outdir = tmp_path / "out"
    argv = ["generate", "--outdir", str(outdir), *ARGS]
    os.makedirs(outdir)
    _copy(reference, outdir)
    # files without a manifest or record: not ours, refused, the folder left as it was
    assert main(argv) == 2
    assert "did not make it" in capsys.readouterr().err
    assert sorted(os.listdir(outdir)) == ["000000", "001000"]
    # listed files are checked against their hashes: a changed or truncated file is made again
    for rel in list(reference):
        os.remove(outdir / rel)
    assert main(argv) == 0
    first, second = gen.seed_file(SEED_LIST[0], True), gen.seed_file(SEED_LIST[1], True)
    (outdir / first).write_bytes(reference[first][:-10])
    (outdir / second).write_bytes(reference[first])
    assert main(argv) == 0
    _check_complete(outdir, SEED_LIST, reference)
    # other settings into the same folder: refused before any work
    capsys.readouterr()
    assert main(argv + ["--s-churn", "10"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert _files_of(outdir) == reference


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl

    outdir = tmp_path / "out"
    os.makedirs(outdir)
    with open(outdir / gen.MANIFEST, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert main(["generate", "--outdir", str(outdir), *ARGS]) == 2
    assert "another kve-fast generate" in capsys.readouterr().err


# --- the record: everything that can change the bytes --------------------------------------------------------

SMALL = ["--seeds", "0-1", "--batch", "2", "--steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A complete 2-image folder (the bytes of each file, the manifest and the record)."""
    outdir = tmp_path_factory.mktemp("small") / "out"
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 0
    return {name: (outdir / name).read_bytes() for name in os.listdir(outdir)}


def _folder(small, path):
    os.makedirs(path)
    for name, data in small.items():
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "4"], "--steps 3 (now 4)"),
    (["--batch", "1"], "--batch 2 (now 1)"),
    (["--subdirs"], "--subdirs False (now True)"),
    (["--channels-last", "--backend", "torch"], "--channels-last 'contiguous' (now 'channels_last')"),
    (["--noise", "fast"], "--noise 'exact' (now 'fast')"),
    (["--solver", "euler"], "--solver 'heun' (now 'euler')"),
    (["--unet-dtype", "bf16"], "--unet-dtype 'float32' (now 'bfloat16')"),
    (["--s-noise", "1.0"], "--s-noise 1.007 (now 1.0)"),
    (["--schedule", "edm"], "--schedule 'diffusers' (now 'edm')"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_option_that_changes_bytes_is_recorded_and_checked(tmp_path, small, capsys, extra, needle):
    outdir = _folder(small, tmp_path / "out")
    assert main(["generate", "--outdir", str(outdir), *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(_errors(err)) == 1, err
    assert {n: (outdir / n).read_bytes() for n in os.listdir(outdir)} == small, "the folder is left as it was"


@pytest.mark.parametrize("empty", ["truncated", "deleted"])
def test_an_emptied_manifest_lets_no_other_settings_adopt_the_images(tmp_path, small, capsys, empty):
    outdir = _folder(small, tmp_path / "out")
    if empty == "truncated":
        (outdir / gen.MANIFEST).write_bytes(b"")
    else:
        os.remove(outdir / gen.MANIFEST)
    assert main(["generate", "--outdir", str(outdir), *SMALL, "--steps", "4"]) == 2
    assert "--steps 3 (now 4)" in capsys.readouterr().err
    # the same settings: the images are not vouched for any more, so they are refused (not adopted)
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 2
    assert "000000.png is not in manifest.jsonl" in capsys.readouterr().err
    assert (outdir / "000000.png").read_bytes() == small["000000.png"]


def test_the_backend_is_recorded_for_fast_noise_only(tmp_path, capsys):
    outdir = tmp_path / "out"
    base = ["generate", "--outdir", str(outdir), *SMALL, "--noise", "fast"]
    assert main(base + ["--backend", "torch"]) == 0
    assert _record(outdir)["noise_stream"] == "philox:torch"
    if CAN_RUN_TRITON:
        assert main(base + ["--backend", "triton"]) == 2
        assert "--backend (fast noise's stream) 'philox:torch' (now 'philox:triton')" in capsys.readouterr().err
    exact = tmp_path / "exact"
    assert main(["generate", "--outdir", str(exact), *SMALL, "--backend", "torch"]) == 0
    assert _record(exact)["noise_stream"] == "reference"
    if CAN_RUN_TRITON:  # the reference's stream on every backend: the same files, nothing to do
        capsys.readouterr()
        assert main(["generate", "--outdir", str(exact), *SMALL[:-1], "--backend", "triton"]) == 0
        assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("field, value, needle", [
    (("device", "threads"), 2, "device.threads 2 (now 1)"),
    (("device", "capability"), "AVX2", "device.capability 'AVX2'"),
    (("software", "torch"), "1.0.0", "software.torch '1.0.0'"),
    (("software", "zlib"), "0.9", "software.zlib '0.9'"),
    (("model", "sha256"), "0" * 64, "--model: other weights"),
])
def test_the_device_threads_and_versions_are_checked_too(tmp_path, small, capsys, field, value, needle):
    outdir = _folder(small, tmp_path / "out")
    record = json.loads(small[gen.RECORD])
    record[field[0]][field[1]] = value
    (outdir / gen.RECORD).write_text(json.dumps(record))
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 2
    assert needle in capsys.readouterr().err


def test_the_record_lands_before_the_first_image(tmp_path, small):
    outdir = tmp_path / "out"
    proc = _cli(outdir, args=SMALL, wrapper=KILL_MID_FILE.replace("calls[0] == 5", "calls[0] == 1"))
    assert proc.returncode == -9
    assert (outdir / gen.RECORD).read_bytes() == small[gen.RECORD]
    assert [n for n in os.listdir(outdir) if n.endswith(".png")] == []


@pytest.mark.parametrize("case, needle", [
    ("no record", "no record.json"),
    ("not json", "not JSON"),
    ("another format", "not a kve-fast generate record of this version"),
    ("line of another record", "000001.png is not in manifest.jsonl"),
])
def test_a_folder_nothing_vouches_for_is_refused(tmp_path, small, capsys, case, needle):
    outdir = _folder(small, tmp_path / "out")
    if case == "no record":
        os.remove(outdir / gen.RECORD)
    elif case == "not json":
        (outdir / gen.RECORD).write_text("{")
    elif case == "another format":
        (outdir / gen.RECORD).write_text(json.dumps({"format": "kve-fast generate record 0"}))
    else:  # seed 1's line, as another record (a copied manifest) would have written it
        lines = small[gen.MANIFEST].decode().splitlines()
        lines[1] = lines[1].replace(gen.record_id(json.loads(small[gen.RECORD])), "0" * 16)
        (outdir / gen.MANIFEST).write_text("\n".join(lines) + "\n")
    before = {n: (outdir / n).read_bytes() for n in os.listdir(outdir)}
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(_errors(err)) == 1, err
    assert {n: (outdir / n).read_bytes() for n in os.listdir(outdir)} == before


@pytest.mark.parametrize("stray", ["000005.png", "000000.png", "extra.jpg", "sub/000001.png"])
def test_a_stray_image_is_refused_not_adopted(tmp_path, small, capsys, stray):
    outdir = _folder(small, tmp_path / "out")
    if stray == "000000.png":  # seed 0's file replaced by a black one and its manifest line dropped
        lines = small[gen.MANIFEST].decode().splitlines()
        (outdir / gen.MANIFEST).write_text(lines[1] + "\n")
    os.makedirs(os.path.dirname(outdir / stray), exist_ok=True)
    Image.new("L", (8, 8)).save(outdir / stray)
    black = (outdir / stray).read_bytes()
    seeds = ["--seeds", "0-5"] + SMALL[2:]
    assert main(["generate", "--outdir", str(outdir), *seeds]) == 2
    err = capsys.readouterr().err
    assert str(outdir / stray) in err and len(_errors(err)) == 1, err
    assert (outdir / stray).read_bytes() == black
    assert b'"seed":5' not in (outdir / gen.MANIFEST).read_bytes()


# --- faults ---------------------------------------------------------------------------------------------------

DISK_FILLS_UP = """
import errno, os
from kve_fast import _files
left = [{budget}]
real = _files.write_all
def write_all(fd, data):  # what fits is written, then the disk is full
    if len(data) > left[0]:
        real(fd, data[:left[0]])
        left[0] = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    left[0] -= len(data)
    return real(fd, data)
_files.write_all = write_all
"""

NO_PERMISSION = """
import errno, os
from kve_fast import _files
real = _files._temporary
calls = [0]
def _temporary(folder, name):
    if name.endswith(".png"):
        calls[0] += 1
        if calls[0] == 4:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(folder, ".tmp"))
    return real(folder, name)
_files._temporary = _temporary
"""


def _budget(reference_dir, pngs: int, extra: int = 0) -> int:
    """Bytes of the record, the first batch's 3 manifest lines and its first ``pngs`` files, plus ``extra``."""
    lines = (reference_dir / gen.MANIFEST).read_bytes().splitlines(keepends=True)
    size = {json.loads(line)["seed"]: len(line) for line in lines}
    first = SEED_LIST[:3]
    return (len((reference_dir / gen.RECORD).read_bytes()) + sum(size[s] for s in first)
            + sum((reference_dir / gen.seed_file(s, True)).stat().st_size for s in first[:pngs]) + extra)


@pytest.mark.parametrize("fault", ["disk full at a file", "disk full at the manifest", "disk full at the record",
                                   "permission"])
def test_a_fault_ends_in_one_line_and_a_rerun_completes_the_set(tmp_path, reference, reference_dir, fault):
    outdir = tmp_path / "out"
    if fault == "disk full at the record":
        wrapper, what, cause = DISK_FILLS_UP.format(budget=100), gen.RECORD, "No space left on device"
    elif fault == "permission":
        wrapper, what, cause = NO_PERMISSION, gen.seed_file(SEED_LIST[3], True), "Permission denied"
    else:
        # enough for the record, the first batch's lines and two of its files: the third file fills the disk; or
        # for its three files and a few bytes more: the second batch's lines fill it
        files = 2 if fault == "disk full at a file" else 3
        wrapper = DISK_FILLS_UP.format(budget=_budget(reference_dir, files, 10))
        what = gen.seed_file(SEED_LIST[2], True) if files == 2 else gen.MANIFEST
        cause = "No space left on device"
    proc = _cli(outdir, wrapper=wrapper, args=[*ARGS, "--workers", "1"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _errors(proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    if what == gen.RECORD:  # before any image: the folder is left as it was (here: not made)
        assert lines == [f"kve-fast: error: {outdir / what}: {cause}"] and not outdir.exists()
        assert _cli(outdir).returncode == 0
        _check_complete(outdir, SEED_LIST, reference)
        return
    assert lines[0].startswith(f"kve-fast: error: {outdir / what}: {cause}; "), lines[0]
    assert "rerun the same command to resume" in lines[0]
    _vouched(outdir)
    lines = _manifest_lines(outdir)  # whole lines only: a failed append is cut back
    assert len(lines) == (6 if fault == "permission" else 3), "the lines of the batches that reached the manifest"
    proc = _cli(outdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete(outdir, SEED_LIST, reference)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "folder", "subfolder symlink", "manifest symlink",
                                  "record symlink"])
def test_what_is_not_a_regular_file_is_refused_not_replaced(tmp_path, capsys, kind):
    outdir = tmp_path / "out"
    os.makedirs(outdir / "000000")
    target = tmp_path / "target.png"
    target.write_bytes(b"not ours")
    path = {"subfolder symlink": outdir / "001000", "manifest symlink": outdir / gen.MANIFEST,
            "record symlink": outdir / gen.RECORD}.get(kind, outdir / "000000" / "000997.png")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":  # a character device (/dev/null's numbers); making one needs CAP_MKNOD
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except (PermissionError, AttributeError) as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
    elif kind == "folder":
        os.makedirs(path)
    else:
        os.symlink(tmp_path if kind == "subfolder symlink" else target, path)
    assert main(["generate", "--outdir", str(outdir), *ARGS]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not" in err and len(_errors(err)) == 1, err
    assert os.path.islink(path) or kind in ("fifo", "device", "folder")
    if kind == "device":
        assert stat.S_ISCHR(os.lstat(path).st_mode), "the device node is left as it was"
    assert target.read_bytes() == b"not ours"
    assert [n for n in os.listdir(outdir / "000000") if n.endswith(".png") and n != "000997.png"] == []


def test_an_atomic_write_never_replaces_what_is_not_a_regular_file(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "out.png"
    os.symlink(target, link)
    with pytest.raises(_files.NotRegularFile, match="symlink"):
        _files.write_file_atomic(link, b"new", regular_only=True)
    # a symlink that shows up while the file is written (after the first check) is refused at the rename
    late = tmp_path / "late.png"
    with pytest.raises(_files.NotRegularFile):
        with _files.atomic_write(late, regular_only=True) as f:
            f.write(b"new")
            os.symlink(target, late)
    assert target.read_bytes() == b"keep" and os.path.islink(link) and os.path.islink(late)
    assert sorted(os.listdir(tmp_path)) == ["late.png", "out.png", "target"], "no temporary file left"
    _files.write_file_atomic(tmp_path / "plain.png", b"ok", regular_only=True)  # a regular file is fine
    _files.write_file_atomic(tmp_path / "plain.png", b"ok2", regular_only=True)
    assert (tmp_path / "plain.png").read_bytes() == b"ok2"


# --- progress -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "worker-processes"])
def test_progress_moves_per_image_within_a_batch(tmp_path, monkeypatch, workers):
    seen = []  # (images on the bar, PNG files written so far)
    pipe = _counting_gaussian_pipe()

    class Bar:
        disable = False

        def __init__(self, total, disable):
            self.total, self.n = total, 0

        def update(self, k):
            self.n += k
            seen.append((self.n, len([n for n in os.listdir(tmp_path) if n.endswith(".png")])))

        def close(self):
            pass

    monkeypatch.setattr(gen_job, "_progress_bar", Bar)
    summary = gen.generate_images(pipe, range(6), str(tmp_path), steps=6, batch=6, backend="torch", workers=workers,
                                  quiet=False)
    assert summary.written == 6 and summary.workers == workers
    if workers == 1:
        assert pipe.unet.calls == 11  # one batch: 6 Heun steps, 11 model calls (here, in this process)
    assert seen[-1][0] == 6 and len(seen) >= 3, seen
    assert any(0 < n < 6 and files == 0 for n, files in seen), f"the bar moved only once the batch was done: {seen}"


# --- an image depends only on its seed -----------------------------------------------------------------------

def _gaussian_pipe():
    pipe = kve_fast.KarrasVePipeline(GaussianScore(8, channels=1), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    return pipe if DEVICE == "cpu" else pipe.to(DEVICE)


class _Counting(torch.nn.Module):
    """The Gaussian score, counting its calls (when the progress bar moves, against the sampler's progress)."""

    def __init__(self):
        super().__init__()
        self.score = GaussianScore(8, channels=1)
        self.config = self.score.config
        self.calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        return self.score(x, sigma)


def _counting_gaussian_pipe():
    return kve_fast.KarrasVePipeline(_Counting(), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))


@pytest.mark.parametrize("noise", ["exact", "fast"])
def test_batch_size_does_not_change_the_files(tmp_path, noise):
    """The sampler's part (noise per seed, elementwise arithmetic) at batch sizes 1, 3 and 7, padded or not."""
    pipe, seeds = _gaussian_pipe(), [4, 9, 1, 16, 25, 36, 2]
    runs = {}
    for batch in (1, 3, 7):
        out = tmp_path / f"b{batch}"
        summary = gen.generate_images(pipe, seeds, str(out), steps=4, batch=batch, noise=noise, backend="torch")
        assert summary.written == len(seeds) and summary.skipped == 0
        runs[batch] = _files_of(out)
    assert runs[1] == runs[3] == runs[7]
    assert len(set(runs[1].values())) == len(seeds), "different seeds, different images"
    arrays = np.stack([np.asarray(Image.open(tmp_path / "b1" / gen.seed_file(s))) for s in seeds])
    assert ((arrays > 0) & (arrays < 255)).mean() > 0.9, "mostly inside (0, 255): equality is about values"


def test_worker_processes_write_the_files_of_one_process(tmp_path):
    """2 worker processes, and 1 worker in this process (also the GPU path): the same files and record."""
    pipe, seeds = _gaussian_pipe(), [4, 9, 1, 16, 25]
    two = gen.generate_images(pipe, seeds, str(tmp_path / "workers"), steps=3, batch=2, backend="torch", workers=2)
    one = gen.generate_images(pipe, seeds, str(tmp_path / "inline"), steps=3, batch=2, backend="torch", workers=1)
    assert (two.workers, one.workers, two.written, one.written) == (2, 1, 5, 5)
    assert _files_of(tmp_path / "inline") == _files_of(tmp_path / "workers")
    assert _record(tmp_path / "inline") == _record(tmp_path / "workers")


def test_exact_mode_files_are_the_pipelines_generator_list_images(tmp_path):
    pipe, seeds = _gaussian_pipe(), [3, 8]
    gen.generate_images(pipe, seeds, str(tmp_path), steps=4, batch=2, backend="torch")
    images = pipe(2, 4, [torch.Generator().manual_seed(s) for s in seeds], output_type="pil", backend="torch").images
    for seed, image in zip(seeds, images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / gen.seed_file(seed))), np.asarray(image))


BACKENDS = ["torch"] + (["triton"] if CAN_RUN_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [3, 4], ids=["per-sample-9-elements", "per-sample-16-elements"])
def test_fast_noise_makes_the_same_sample_at_any_batch_size_and_place(backend, size):
    """Per-sample keys: randn4x groups when a sample's size is a multiple of 4, per-element randn otherwise."""
    model = GaussianScore(size, channels=1).to(DEVICE)
    scheduler = kve_fast.KarrasVeScheduler(**SMALL_SIGMAS)
    shape = lambda b: (b, 1, size, size)  # noqa: E731
    run = lambda seeds: kve_fast.sample_karras_ve(  # noqa: E731
        model, scheduler, shape(len(seeds)), 4, [torch.Generator().manual_seed(s) for s in seeds], DEVICE,
        backend=backend, noise="fast")
    seeds = [5, 6, 7, 8]
    full = run(seeds)
    assert torch.equal(torch.cat([run([s]) for s in seeds]), full), "batch of 1 vs 4"
    assert torch.equal(run(seeds[::-1]).flip(0), full), "another place in the batch"
    assert torch.equal(run(seeds[2:] + [11, 12, 13])[:2], full[2:]), "other neighbours"
    # a single generator keys sample b by its draw and b: sample 0 is the one-element list's
    one = kve_fast.sample_karras_ve(model, scheduler, shape(3), 4, torch.Generator().manual_seed(5), DEVICE,
                                    backend=backend, noise="fast")
    assert torch.equal(one[:1], full[:1]) and not torch.equal(one[1:2], full[1:2])
    assert not torch.equal(full[0], full[1])


def test_noise_keys_depend_on_the_generator_and_the_index_only():
    keys = sample_keys([10, 10, 11], [0, 1, 0], steps=5)
    assert keys.shape == (6, 3) and keys.dtype == np.int64 and (keys >= 0).all()
    assert len(np.unique(keys)) == keys.size
    assert np.array_equal(sample_keys([11], [0], 5)[:, 0], keys[:, 2])
    assert np.array_equal(sample_keys([10, 99], [1, 0], 5)[:, 0], keys[:, 1])
    src = DeviceNoise((3, 1, 2, 2), [torch.Generator().manual_seed(s) for s in (1, 2, 3)], "cpu", 4)
    step = src.step()
    assert isinstance(step, StepKeys) and step.device.dtype == torch.int64 and step.device.shape == (3,)
    assert np.array_equal(step.host, src.keys[1]) and np.array_equal(step.device.cpu().numpy(), src.keys[1])
    alone = DeviceNoise((1, 1, 2, 2), [torch.Generator().manual_seed(3)], "cpu", 4)
    assert np.array_equal(alone.keys[:, 0], src.keys[:, 2])
    # x_0 is drawn per sample too, by the noise source (so the same on every backend)
    src = DeviceNoise((3, 1, 2, 2), [torch.Generator().manual_seed(s) for s in (1, 2, 3)], "cpu", 4)
    alone = DeviceNoise((1, 1, 2, 2), [torch.Generator().manual_seed(3)], "cpu", 4)
    assert torch.equal(src.initial()[2:], alone.initial())


@needs_triton
@pytest.mark.parametrize("per_sample", [1024, 1001], ids=["randn4x", "randn"])
def test_keyed_kernel_noise_is_standard_normal_and_independent(per_sample):
    from scipy import stats

    from kve_fast.ops import step_triton

    keys = torch.tensor(sample_keys([1, 2, 3, 4], [0, 0, 0, 0], 1)[1], device=DEVICE)
    zero = torch.zeros(4 * per_sample, device=DEVICE)
    one, zero_s = torch.tensor(1.0), torch.tensor(0.0)
    z = step_triton.churn(zero, None, 1.0, zero_s, one, seed=keys)[0].cpu().double()
    assert abs(z.mean()) < 5 / (4 * per_sample) ** 0.5 and abs(z.var() - 1) < 5 * (2 / (4 * per_sample)) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    rows = z.view(4, per_sample).numpy()
    corr = np.corrcoef(rows)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 5 / per_sample**0.5, "samples are independent"
    # sample 2 alone, with its key, is the same noise
    alone = step_triton.churn(torch.zeros(per_sample, device=DEVICE), None, 1.0, zero_s, one, seed=keys[2:3])[0]
    assert torch.equal(alone.cpu().double(), z.view(4, per_sample)[2])
    with pytest.raises(ValueError, match="divide"):
        step_triton.churn(torch.zeros(10, device=DEVICE), None, 1.0, zero_s, one, seed=keys[:3])
    with pytest.raises(TypeError, match="int64"):
        step_triton.churn(zero, None, 1.0, zero_s, one, seed=keys.int())


@needs_triton
@pytest.mark.parametrize("per_sample", [1024, 2052, 1101, 60], ids=["block", "straddling", "randn-straddling", "small"])
def test_keyed_kernel_noise_finds_samples_the_same_way_at_any_size(monkeypatch, per_sample):
    """Samples of at least a block: one scalar division per program (BIG_SAMPLES), the same values as one per
    element; and each sample's noise is the same alone."""
    from kve_fast.ops import step_triton

    keys = torch.tensor(sample_keys([7, 8, 9], [0, 0, 0], 1)[1], device=DEVICE)
    zero = torch.zeros(3 * per_sample, device=DEVICE)
    one, zero_s = torch.tensor(1.0), torch.tensor(0.0)
    fast = step_triton.churn(zero, None, 1.0, zero_s, one, seed=keys)[0]
    monkeypatch.setattr(step_triton, "BIG_SAMPLES", False)
    slow = step_triton.churn(zero, None, 1.0, zero_s, one, seed=keys)[0]
    assert torch.equal(fast, slow)
    for b in range(3):
        alone = step_triton.churn(zero[:per_sample], None, 1.0, zero_s, one, seed=keys[b:b + 1])[0]
        assert torch.equal(alone, fast[b * per_sample:(b + 1) * per_sample])


# --- a refused run changes nothing; jobs that meet on one folder -------------------------------------------------

def _snapshot(folder) -> dict:
    """Every file and folder under ``folder`` (itself included): its SHA-256 (files), size, mtime and mode."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for path in [root] + [os.path.join(root, n) for n in dirs + names]:
            st = os.lstat(path)
            sha = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, folder)] = (sha, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.mark.parametrize("case", ["other settings", "no manifest, other settings", "stray image, manifest newline "
                                  "stripped", "stray image, torn manifest line", "manifest but no record"])
def test_a_refused_run_leaves_the_folder_byte_for_byte(tmp_path, small, capsys, case):
    """(mutations: the manifest's tail cut before the checks -> the stripped-newline and torn-line cases change the
    manifest; the manifest created before the checks of a folder without one -> the folder's mtime moves)"""
    outdir = _folder(small, tmp_path / "out")
    extra = []
    if "other settings" in case:
        extra = ["--steps", "4"]
    if "no manifest" in case:
        os.remove(outdir / gen.MANIFEST)
    if "stray image" in case:
        Image.new("L", (8, 8)).save(outdir / "stray.png")
    if "newline stripped" in case:
        (outdir / gen.MANIFEST).write_bytes(small[gen.MANIFEST].rstrip(b"\n"))
    if "torn" in case:
        (outdir / gen.MANIFEST).write_bytes(small[gen.MANIFEST] + b'{"file":"000002.png","rec')
    if "no record" in case:
        os.remove(outdir / gen.RECORD)
    time.sleep(0.05)  # past the file system's timestamp granularity: a change would show in an mtime
    before = _snapshot(tmp_path)
    assert main(["generate", "--outdir", str(outdir), *SMALL, *extra]) == 2
    assert len(_errors(capsys.readouterr().err)) == 1
    assert _snapshot(tmp_path) == before


def test_a_complete_last_line_without_its_newline_still_vouches_for_its_file(tmp_path, small, capsys):
    """An editor that drops the manifest's last newline leaves a whole line: its file is listed, and the run adds the
    newline before its own lines (mutation: such a line read as torn -> cut, and 000001.png refused as unlisted)."""
    outdir = _folder(small, tmp_path / "out")
    (outdir / gen.MANIFEST).write_bytes(small[gen.MANIFEST].rstrip(b"\n"))
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 0, capsys.readouterr().err
    assert (outdir / gen.MANIFEST).read_bytes() == small[gen.MANIFEST]
    assert main(["generate", "--outdir", str(outdir), "--seeds", "0-2", *SMALL[2:]]) == 0
    assert [r["seed"] for r in _manifest_lines(outdir)] == [0, 1, 2]


class _FailsOnCue(torch.nn.Module):
    """The exact Gaussian score (8x8, 1 channel); ``cue()`` runs at its first call and its error is raised."""

    def __init__(self, cue):
        super().__init__()
        self.score = GaussianScore(8, channels=1)
        self.config = self.score.config
        self.cue = cue

    def forward(self, x, sigma):
        self.cue()
        raise RuntimeError("out of memory (simulated)")


def _job_args(outdir):
    return dict(seeds="0-3", outdir=str(outdir), steps=2, batch=2, backend="torch", workers=1,
                model={"name": "the same weights", "sha256": "5" * 64})


def test_a_failed_job_takes_back_what_it_added_before_another_job_can_start(tmp_path, monkeypatch):
    """A job that fails before its first image removes its record and manifest holding the folder's lock, so a job
    started meanwhile is refused (the folder is locked) instead of having its record and manifest deleted under it
    (mutation: the lock released before the take-back -> the job run in that gap completes, the take-back deletes
    its manifest, and its images are refused as unlisted)."""
    out = tmp_path / "out"
    pipe = _gaussian_pipe()
    real, meanwhile = gen_folder._undo_setup, []

    def undo(*args):  # the gap before the take-back: another job (same settings) on the folder
        monkeypatch.setattr(gen_folder, "_undo_setup", real)
        try:
            meanwhile.append(gen.generate_images(pipe, **_job_args(out)))
        except gen.GenerateError as exc:
            meanwhile.append(exc)
        return real(*args)

    monkeypatch.setattr(gen_folder, "_undo_setup", undo)
    failing = kve_fast.KarrasVePipeline(_FailsOnCue(lambda: None), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    with pytest.raises(gen.GenerateError, match="out of memory"):
        gen.generate_images(failing, **_job_args(out))
    summary = gen.generate_images(pipe, **_job_args(out))  # (the mutation: 000000.png is not in manifest.jsonl)
    assert (summary.written, summary.skipped) == (4, 0)
    again = gen.generate_images(pipe, **_job_args(out))
    assert (again.written, again.skipped) == (0, 4)
    assert len(meanwhile) == 1 and "another kve-fast generate" in str(meanwhile[0]), meanwhile


@pytest.mark.parametrize("folder", ["made by the failing job", "there before"])
def test_a_job_that_waited_for_a_manifest_taken_back_opens_it_again(tmp_path, monkeypatch, folder):
    """Job B opens the manifest while job A holds its lock; A fails before its first image and takes back its
    record, manifest (and the folder, if it made it); then B gets the lock, on a file no longer in the folder. B
    must open the path again (mutation: no check that the locked file is still at the path -> B writes its lines
    into the removed file, and its images are refused as unlisted by every later run; or B finds no folder)."""
    import fcntl
    import threading

    out = tmp_path / "out"
    if folder == "there before":
        out.mkdir()
    a_runs, b_opened, failures = threading.Event(), threading.Event(), []

    def cue():  # job A, sampling its first batch with the lock held: wait until B has opened the manifest
        a_runs.set()
        assert b_opened.wait(60)

    def job_a():
        failing = kve_fast.KarrasVePipeline(_FailsOnCue(cue), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
        try:
            gen.generate_images(failing, **_job_args(out))
        except gen.GenerateError as exc:
            failures.append(exc)

    real_flock, first = fcntl.flock, [True]

    def flock(fd, operation):  # job B's first lock: only once A has failed and taken back what it added
        if threading.current_thread() is threading.main_thread() and first[0]:
            first[0] = False
            b_opened.set()
            a.join(60)
        return real_flock(fd, operation)

    a = threading.Thread(target=job_a)
    a.start()
    assert a_runs.wait(60)
    monkeypatch.setattr(fcntl, "flock", flock)
    summary = gen.generate_images(_gaussian_pipe(), **_job_args(out))
    assert not first[0] and not a.is_alive() and "out of memory" in str(failures[0])
    assert summary.written == 4
    again = gen.generate_images(_gaussian_pipe(), **_job_args(out))
    assert (again.written, again.skipped) == (0, 4)
    assert len(_manifest_lines(out)) == 4


# --- the record compares values and weights, and holds what changes bits ----------------------------------------

@pytest.mark.parametrize("first, then", [(["--s-churn", "80"], []), ([], ["--s-max", "50"])],
                         ids=["s-churn 80 then the model's", "the model's then s-max 50"])
def test_a_setting_equal_to_the_models_is_the_same_setting(tmp_path, capsys, first, then):
    """The digits model's config says s_churn 80 and s_max 50 (ints): ``--s-churn 80`` is the same setting
    (mutation: the manifest lines carry this run's record id instead of the folder's -> 80.0 against 80 is another
    id, and the resume refuses 000000.png as unlisted)."""
    outdir = tmp_path / "out"
    assert main(["generate", "--outdir", str(outdir), *SMALL, *first]) == 0
    assert main(["generate", "--outdir", str(outdir), "--seeds", "0-2", *SMALL[2:], *then]) == 0, \
        capsys.readouterr().err
    assert [r["seed"] for r in _manifest_lines(outdir)] == [0, 1, 2]
    assert gen.record_differences({"s": 80}, {"s": 80.0}) == []
    assert gen.record_differences({"s": True}, {"s": 1}) == ["s True (now 1)"]


def test_the_same_model_by_another_path_is_the_same_model(tmp_path, capsys):
    """(mutation: the model compared by name and hash -> 'other weights' with identical hashes)"""
    from kve_fast.loading import check_model_folder

    outdir = tmp_path / "out"
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 0
    path = check_model_folder("digits", False).unet_dir
    assert main(["generate", "--outdir", str(outdir), "--model", path, "--seeds", "0-2", *SMALL[2:]]) == 0, \
        capsys.readouterr().err
    assert [r["seed"] for r in _manifest_lines(outdir)] == [0, 1, 2]
    assert _record(outdir)["model"]["name"] == "digits", "the folder's record stands"
    other = dict(_record(outdir), model={"name": path, "sha256": "0" * 64})
    assert gen.record_differences(_record(outdir), other)[0].startswith("--model: other weights")


@pytest.mark.parametrize("name, value", [("DNNL_MAX_CPU_ISA", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                                         ("ATEN_CPU_CAPABILITY", "default"), ("MKL_CBWR", "COMPATIBLE"),
                                         ("NVIDIA_TF32_OVERRIDE", "0"), ("ONEDNN_DEFAULT_FPMATH_MODE", "BF16")])
def test_a_resume_under_an_environment_that_changes_bits_is_refused(tmp_path, small, capsys, monkeypatch, name,
                                                                      value):
    """oneDNN reads DNNL_MAX_CPU_ISA when it starts (3 of 40 PNGs differed under AVX2 while torch's own capability
    still said AVX512): every such variable is in the record (mutation: BITS_ENVIRONMENT without it -> the resume is
    accepted)."""
    outdir = _folder(small, tmp_path / "out")
    assert name not in json.loads(small[gen.RECORD])["device"]["environment"]
    monkeypatch.setenv(name, value)
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 2
    assert f"{name} in the environment (unset) (now '{value}')" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["generate", "--outdir", str(fresh), *SMALL]) == 0
    assert _record(fresh)["device"]["environment"] == {name: value}


@pytest.fixture
def precision_switches():
    """torch's float32 precision switches, put back as they were after the test."""
    b = torch.backends
    places = [b, b.mkldnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn, b.cudnn, b.cuda.matmul, b.cudnn.conv,
              b.cudnn.rnn]
    matmul, saved = torch.get_float32_matmul_precision(), [p.fp32_precision for p in places]
    yield
    torch.set_float32_matmul_precision(matmul)
    for place, value in zip(places, saved):
        place.fp32_precision = value


@pytest.mark.parametrize("switch", ["mkldnn.conv bf16", "fp32_precision tf32", "float32_matmul_precision medium"])
def test_a_resume_under_other_precision_switches_is_refused(tmp_path, small, capsys, precision_switches, switch):
    """torch's switches that let oneDNN compute float32 convolutions and matmuls in bf16 or TF32 (mutation: the
    record without the fp32_precision switches -> the resume is accepted)."""
    outdir = _folder(small, tmp_path / "out")
    if switch == "mkldnn.conv bf16":
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
    elif switch == "fp32_precision tf32":
        torch.backends.fp32_precision = "tf32"
    else:
        torch.set_float32_matmul_precision("medium")
    assert main(["generate", "--outdir", str(outdir), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "torch's fp32_precision of " in err and len(_errors(err)) == 1, err


def test_the_precision_switches_are_read_after_the_legacy_flags_or_the_new_api(precision_switches):
    """Reading ``cudnn.allow_tf32`` raises once a caller set one cuDNN operator's precision through the new API
    (torch 2.13: "a mix of the legacy and new APIs"); the record reads the new API, which the legacy flags set too."""
    torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flag
    assert gen_record._fp32_precision("cuda")["cuda.matmul"] == "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # the new API, the rnn's left at tf32
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # noqa: B018 (what a legacy reader would do)
    switches = gen_record._fp32_precision("cuda")
    assert switches["cudnn.conv"] == "ieee" and switches["cudnn.rnn"] == "tf32"
    assert set(gen_record._fp32_precision("cpu")) == {"all", "mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"}


def test_a_resume_under_other_thread_counts_makes_the_same_bytes(tmp_path, monkeypatch):
    """torch's count and KVE_FAST_THREADS do not reach the model: one intra-op thread per worker, recorded (seeds
    12-17 at --batch 3: seed 15 differs between 1 and 2 threads on a 2-core CPU; mutation: generate leaves torch's
    count -> the remade file differs there)."""
    outdir = tmp_path / "out"
    argv = ["generate", "--outdir", str(outdir), *THREAD_ARGS, "--workers", "1"]
    assert main(argv) == 0
    made = _files_of(outdir)
    for rel in made:
        os.remove(outdir / rel)
    monkeypatch.setenv("KVE_FAST_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    assert _files_of(outdir) == made and _record(outdir)["device"]["threads"] == 1


# --- interrupted ---------------------------------------------------------------------------------------------------

def test_an_interrupt_says_why_what_the_bar_counted_was_not_kept(tmp_path, monkeypatch, capsys):
    """The bar counts images as they are sampled; Ctrl-C in the first batch keeps none of them, and the message says
    why (mutation: the message says only '0 images written', under a bar that showed 2)."""
    from kve_fast import cli

    real = cli._load

    def load(args, device):  # Ctrl-C at the 5th model call: the last of 3 steps of the first batch of 4
        pipe = real(args, device)
        forward, calls = pipe.unet.forward, [0]

        def interrupted(*a, **k):
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
            return forward(*a, **k)

        pipe.unet.forward = interrupted
        return pipe

    monkeypatch.setattr(cli, "_load", load)
    out = tmp_path / "out"
    assert main(["generate", "--outdir", str(out), "--seeds", "0-3", "--batch", "4", "--steps", "3", "--workers", "1",
                 "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "stopped: 0 images written; 2 more were sampled but not written, and are dropped" in err, err
    assert not out.exists(), "nothing kept: the folder it made is gone again"


# --- one rule, one wording --------------------------------------------------------------------------------------

def test_the_command_and_the_api_word_each_rule_alike(tmp_path, capsys, monkeypatch):
    """The command delegates generate's rules to the functions generate_images calls (kve_fast.generate.checks,
    kve_fast.images): the same text after the argument's name (mutation: the command words one of them its own way
    again, as it did for the channels, the empty folder and the workers -> the texts differ)."""
    from diffusers import UNet2DModel

    from kve_fast.generate import checks

    def command(*argv) -> str:
        assert main(["generate", "--seeds", "1", "--steps", "2", "--quiet", *argv]) == 2
        (line,) = _errors(capsys.readouterr().err)
        return line.removeprefix("kve-fast: error: ")

    def api(error, pipe, outdir, **kwargs) -> str:
        with pytest.raises(error) as info:
            gen.generate_images(pipe, [1], outdir, steps=2, batch=1, backend="torch", **kwargs)
        return str(info.value)

    two = tmp_path / "two-channels"
    UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), norm_num_groups=8,
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(two)
    pipe = kve_fast.KarrasVePipeline(GaussianScore(8, channels=2), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    channels = api(gen.GenerateError, pipe, str(tmp_path / "a"))
    assert command("--model", str(two), "--outdir", str(tmp_path / "b")) == f"--model: {channels}"
    assert command("--outdir", "") == "--outdir: " + api(ValueError, _gaussian_pipe(), "").removeprefix("`outdir`: ")
    monkeypatch.setattr(checks, "FORK_WORKERS", False)  # as off Linux
    workers = api(ValueError, _gaussian_pipe(), str(tmp_path / "c"), workers=2)
    assert workers.startswith("`workers`: worker processes are forked, on Linux only")
    assert command("--workers", "2", "--outdir", str(tmp_path / "d"), "--device", "cpu") == \
        "--workers: " + workers.removeprefix("`workers`: ")
    assert list(tmp_path.iterdir()) == [two]
