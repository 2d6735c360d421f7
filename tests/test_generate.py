"""``kve-fast generate``: one PNG per seed on one or many processes (torch.distributed, gloo on the CPU).

What is tested, and where it holds:

- torchrun with 2 processes writes byte-identical files (and the same manifest entries) as one process;
- a run killed with SIGKILL mid-file or mid-manifest-line, or stopped by SIGTERM, then rerun, completes the set
  with no duplicate, truncated or temporary file and one manifest line per seed that matches its file;
- a failing rank stops the whole job with a non-zero exit and the reason on stderr;
- an image depends only on its seed: the sampler (noise and step arithmetic) gives the same image at any batch
  size and place in the batch, in exact mode and in fast mode (per-sample Philox keys in the Triton kernels, per-
  sample generators in the torch backend). Checked with a model without batch-coupled kernels (the exact Gaussian
  score): a UNet's own convolutions and matrix products may pick other kernels at another batch size, which
  ``generate`` sidesteps by padding every batch to ``--batch`` (bench/RESULTS.md records what the digits UNet does
  on this CPU at other batch sizes).

Shapes are tiny (the digits model is 8x8 with 1 channel, 3 steps): the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import kve_fast
from kve_fast import generate as gen
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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _run(args, timeout=240, **kwargs):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def _cli(outdir, *extra, wrapper: str = ""):
    """``python -m kve_fast generate`` in a fresh process (``wrapper``: Python run first, e.g. a patch)."""
    argv = ["generate", "--outdir", str(outdir), *ARGS, *extra]
    code = f"import sys\n{wrapper}\nfrom kve_fast.cli import main\nsys.exit(main({argv!r}))"
    return _run([sys.executable, "-c", code])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(outdir, *extra, nproc=2):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kve_fast", "generate",
                 "--outdir", str(outdir), *ARGS, *extra])


def _files(outdir) -> dict[str, bytes]:
    """Every file under ``outdir`` but the manifest (relative path -> bytes)."""
    out = {}
    for folder, _, names in os.walk(outdir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, outdir).replace(os.sep, "/")
            if rel != gen.MANIFEST:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def _manifest_lines(outdir) -> list[dict]:
    with open(os.path.join(outdir, gen.MANIFEST), "rb") as f:
        data = f.read()
    assert data.endswith(b"\n"), "the manifest ends with a whole line"
    return [json.loads(line) for line in data.splitlines()]


def _check_complete(outdir, seeds, reference=None) -> list[dict]:
    """Every seed's file, whole, nothing else (no temporary file); one manifest line per seed, matching its file."""
    files = _files(outdir)
    expected = {gen.seed_file(s, subdirs=True) for s in seeds}
    assert set(files) == expected, sorted(set(files) ^ expected)
    for rel, data in files.items():
        with Image.open(os.path.join(outdir, rel)) as image:
            image.load()
            assert image.format == "PNG" and image.size == (8, 8) and image.mode == "L"
    lines = _manifest_lines(outdir)
    assert sorted(r["seed"] for r in lines) == sorted(seeds), "one manifest line per seed"
    for r in lines:
        assert r["file"] == gen.seed_file(r["seed"], subdirs=True)
        assert r["sha256"] == hashlib.sha256(files[r["file"]]).hexdigest()
        assert r["kve_fast"] == kve_fast.__version__ and r["model"]["name"] == "digits"
        assert r["settings"]["steps"] == 3 and r["settings"]["noise"] == "exact"
    if reference is not None:
        assert files == reference, [k for k in files if files[k] != reference.get(k)]
    return lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole set: the files every other run must reproduce byte for byte."""
    outdir = tmp_path_factory.mktemp("reference") / "out"
    proc = _cli(outdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete(outdir, SEED_LIST)
    return _files(outdir)


# --- seeds and names ----------------------------------------------------------------------------------------

def test_seed_lists_and_file_names():
    assert gen.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert gen.parse_seeds("7, 3,5-6,3") == [3, 5, 6, 7]
    assert gen.parse_seeds(str(2**32 - 1)) == [2**32 - 1]
    for bad, needle in [("", "nothing"), ("a-b", "expected"), ("5-3", "backwards"), ("-3", "expected"),
                        (str(2**32), "low 32 bits"), ("0-99999999", "at most")]:
        with pytest.raises(ValueError, match=needle):
            gen.parse_seeds(bad)
    assert gen.seed_file(123) == "000123.png"
    assert gen.seed_file(123, subdirs=True) == "000000/000123.png"
    assert gen.seed_file(49999, subdirs=True) == "049000/049999.png"
    assert gen.seed_file(1234567) == "1234567.png"


def test_argument_errors_need_neither_torch_nor_diffusers(tmp_path):
    code = ("import sys\nfrom kve_fast.cli import main\n"
            f"rc = main(['generate', '--seeds', '5-1', '--outdir', {str(tmp_path / 'o')!r}])\n"
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    proc = _run([sys.executable, "-c", code])
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "--seeds" in proc.stderr and "backwards" in proc.stderr


def test_the_manifest_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / gen.MANIFEST
    path.write_bytes(b'{"seed": 1, "file": "000001.png"}\nnot json\n{"seed": 2, "file": "000002.png"}\n{"seed": 3, "fi')
    records, end, skipped = gen.read_manifest(str(path))
    assert sorted(records) == [1, 2] and skipped == 1
    assert path.read_bytes()[:end].endswith(b'"000002.png"}\n')


def test_every_rank_must_see_the_folder_rank_0_writes(tmp_path):
    assert not gen._sees_token(str(tmp_path), "token", wait=0)
    (tmp_path / gen.JOB_FILE).write_text("another")
    assert not gen._sees_token(str(tmp_path), "token", wait=0.6)
    (tmp_path / gen.JOB_FILE).write_text("token")
    assert gen._sees_token(str(tmp_path), "token", wait=0)


# --- many processes ---------------------------------------------------------------------------------------

def test_torchrun_two_processes_write_the_files_of_one(tmp_path, reference):
    proc = _torchrun(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = _check_complete(tmp_path / "out", SEED_LIST, reference)
    assert {r["run"]["world"] for r in lines} == {2}


def test_a_failing_rank_stops_the_job_with_the_reason(tmp_path):
    outdir = tmp_path / "out"
    # rank 1 takes every other seed: a folder where its first file goes makes its rename fail
    os.makedirs(outdir / gen.seed_file(SEED_LIST[1], subdirs=True))
    proc = _torchrun(outdir)
    assert proc.returncode != 0
    assert "kve-fast: error: rank 1" in proc.stderr and "IsADirectoryError" in proc.stderr, proc.stderr[-4000:]
    # nothing partial: no temporary file, and every listed file is whole
    files = _files(outdir)
    assert not [k for k in files if k.endswith(".tmp")]
    for r in _manifest_lines(outdir):
        assert r["sha256"] == hashlib.sha256(files[r["file"]]).hexdigest()


# --- killed, stopped, resumed ------------------------------------------------------------------------------

KILL_MID_FILE = """
import os, signal
import kve_fast.generate as g
from kve_fast._files import atomic_write
calls = [0]
real = g._write
def _write(image, outdir, rel):
    calls[0] += 1
    if calls[0] == 5:  # files 1-3 are listed, file 4 landed unlisted, file 5 is half written
        with atomic_write(os.path.join(outdir, rel)) as f:
            f.write(g._encode_png(image)[:20])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(image, outdir, rel)
g._write = _write
"""

KILL_MID_MANIFEST = """
import os, signal
import kve_fast.generate as g
calls = [0]
real = g._Manifest.append
def append(self, records):
    if records:
        calls[0] += 1
        if calls[0] == 2:  # the second batch's lines: half written, then killed
            data = "".join(g.json.dumps(r) + "\\n" for r in records).encode()
            os.write(self.fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, records)
g._Manifest.append = append
"""

TERM_MID_BATCH = """
import os, signal
import kve_fast.generate as g
calls = [0]
real = g._write
def _write(image, outdir, rel):
    calls[0] += 1
    if calls[0] == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, mid-batch
    return real(image, outdir, rel)
g._write = _write
"""


@pytest.mark.parametrize("wrapper, code", [(KILL_MID_FILE, -9), (KILL_MID_MANIFEST, -9), (TERM_MID_BATCH, 143)],
                         ids=["sigkill-mid-file", "sigkill-mid-manifest-line", "sigterm-mid-batch"])
def test_a_killed_run_resumes_to_the_complete_set(tmp_path, reference, wrapper, code):
    outdir = tmp_path / "out"
    proc = _cli(outdir, wrapper=wrapper)
    assert proc.returncode == code, proc.stderr[-3000:]
    left = _files(outdir)
    assert 3 <= len([k for k in left if k.endswith(".png")]) < len(SEED_LIST), sorted(left)
    if code == 143:
        assert "stopped: 3 images written; rerun" in proc.stderr
        assert not [k for k in left if k.endswith(".tmp")], "SIGTERM leaves no temporary file"
    else:
        with open(outdir / gen.MANIFEST, "rb") as f:
            data = f.read()
        assert data.endswith(b"\n") == (wrapper is KILL_MID_FILE)
    for rel, data in left.items():  # what the killed run left under the final names is whole
        if rel.endswith(".png"):
            assert data == reference[rel], rel
    proc = _cli(outdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _check_complete(outdir, SEED_LIST, reference)
    if wrapper is KILL_MID_FILE:
        assert sum(bool(r.get("recovered")) for r in lines) == 1, "the file that landed after the last line is kept"
    if wrapper is KILL_MID_FILE:  # and a third run has nothing to do
        proc = _cli(outdir, "--batch", "2")
        assert proc.returncode == 0 and len(_manifest_lines(outdir)) == len(SEED_LIST)


def test_reruns_check_the_files_and_the_settings(tmp_path, reference, capsys):
    outdir = tmp_path / "out"
    argv = ["generate", "--outdir", str(outdir), *ARGS]
    os.makedirs(outdir)
    for rel, data in reference.items():
        os.makedirs(os.path.dirname(outdir / rel), exist_ok=True)
        (outdir / rel).write_bytes(data)
    # files without a manifest: not ours, refused
    assert main(argv) == 2
    assert "no manifest.jsonl" in capsys.readouterr().err
    # listed files are checked against their hashes: a changed or truncated file is made again
    for rel in list(reference):
        os.remove(outdir / rel)
    assert main(argv) == 0
    first, second = gen.seed_file(SEED_LIST[0], True), gen.seed_file(SEED_LIST[1], True)
    (outdir / first).write_bytes(reference[first][:-10])
    (outdir / second).write_bytes(reference[first])
    assert main(argv) == 0
    assert _files(outdir) == reference
    lines = _manifest_lines(outdir)
    assert len(lines) == len(SEED_LIST) + 2 and {r["seed"] for r in lines[-2:]} == set(SEED_LIST[:2])
    assert gen.read_manifest(str(outdir / gen.MANIFEST))[0][SEED_LIST[0]]["sha256"] == hashlib.sha256(
        reference[first]).hexdigest()
    # other settings into the same folder: refused before any work
    capsys.readouterr()
    assert main(argv + ["--s-churn", "10"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert _files(outdir) == reference


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl

    outdir = tmp_path / "out"
    os.makedirs(outdir)
    with open(outdir / gen.MANIFEST, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert main(["generate", "--outdir", str(outdir), *ARGS]) == 2
    assert "another kve-fast generate" in capsys.readouterr().err


# --- an image depends only on its seed -----------------------------------------------------------------------

def _gaussian_pipe():
    pipe = kve_fast.KarrasVePipeline(GaussianScore(8, channels=1), kve_fast.KarrasVeScheduler(**SMALL_SIGMAS))
    return pipe if DEVICE == "cpu" else pipe.to(DEVICE)


@pytest.mark.parametrize("noise", ["exact", "fast"])
def test_batch_size_does_not_change_the_files(tmp_path, noise):
    """The sampler's part (noise per seed, elementwise arithmetic) at batch sizes 1, 3 and 7, padded or not."""
    pipe, seeds = _gaussian_pipe(), [4, 9, 1, 16, 25, 36, 2]
    runs = {}
    for batch in (1, 3, 7):
        out = tmp_path / f"b{batch}"
        summary = gen.generate_images(pipe, seeds, str(out), steps=4, batch=batch, noise=noise, backend="torch")
        assert summary.written == len(seeds) and summary.skipped == 0
        runs[batch] = _files(out)
    assert runs[1] == runs[3] == runs[7]
    assert len(set(runs[1].values())) == len(seeds), "different seeds, different images"
    arrays = np.stack([np.asarray(Image.open(tmp_path / "b1" / gen.seed_file(s))) for s in seeds])
    assert ((arrays > 0) & (arrays < 255)).mean() > 0.9, "mostly inside (0, 255): equality is about values"


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
