"""The kve-fast command line: outputs, options and clear errors (no tracebacks) for bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import kve_fast
from kve_fast import cli
from kve_fast.cli import main
from kve_fast.options import REFERENCE_SCHEDULE_MIN_STEPS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 1-channel 8x8 UNet folder with a scheduler config beside it (as a user's local model)."""
    torch.manual_seed(0)
    unet = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=1, out_channels=1,
                       norm_num_groups=8, time_embedding_type="fourier",
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    path = tmp_path_factory.mktemp("model")
    unet.save_pretrained(path)
    kve_fast.KarrasVeScheduler(s_churn=40.0).save_config(path)
    return str(path)


def test_grid_matches_the_pipeline_bit_for_bit(model_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", model_dir, "--steps", "3", "--batch-size", "4", "--scale", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2x2 tiles of 8x8, 2-pixel padding
    unet, scheduler = kve_fast.load_model(model_dir)
    assert scheduler.config.s_churn == 40.0, "the folder's scheduler_config.json must be used"
    pipe = kve_fast.KarrasVePipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(4, 3, torch.Generator().manual_seed(0), output_type="pil").images
    tiles = [grid[2 + r * 10: 10 + r * 10, 2 + c * 10: 10 + c * 10] for r in range(2) for c in range(2)]
    for tile, image in zip(tiles, images):
        assert np.array_equal(tile, np.asarray(image))


def test_one_file_per_image_and_trajectory(model_dir, tmp_path):
    folder, strip = tmp_path / "imgs", tmp_path / "traj.png"
    assert main(["sample", "--model", model_dir, "--steps", "4", "--batch-size", "3", "--no-grid", "--scale", "2",
                 "--out", str(folder), "--trajectory", str(strip), "--quiet", "--schedule", "edm",
                 "--solver", "euler"]) == 0
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert Image.open(folder / files[0]).size == (16, 16)
    # rows: the 3 samples; columns: after each of the 4 marked steps, then the final image
    w, h = Image.open(strip).size
    assert (w, h) == (5 * (16 + 2) + 2, 3 * (16 + 2) + 2)


def test_same_seed_same_png_and_progress_summary(model_dir, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for path in (a, b):
        assert main(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", "--out", str(path)]) == 0
    assert a.read_bytes() == b.read_bytes()
    out = capsys.readouterr()
    assert "wrote" in out.out and "2/2" in out.err  # the summary, and a real progress bar


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "1"], "--steps"),
    (["--steps", "many"], "--steps"),
    (["--steps", "99999999999999999999"], "--steps: must be at most"),  # was an OverflowError after the model loaded
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--s-churn", "-1"], "--s-churn"),
    (["--s-noise", "nan"], "--s-noise"),
    (["--threads", "0"], "--threads"),
    (["--backend", "opencl"], "--backend"),  # not a backend ("cuda" is one: tests/test_csrc.py)
])
def test_bad_values_are_one_line_errors_without_the_usage_block(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kve-fast: error: {needle}") and len(err.strip().splitlines()) == 1, err


def test_mistakes_in_the_commands_shape_keep_the_usage_block(capsys):
    for argv in (["sample", "--no-such-option"], ["sampel"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: kve-fast") and "error:" in err


@pytest.mark.parametrize("argv, usage, hint", [
    (["sample", "--stpes", "10"], "usage: kve-fast sample", "unrecognized arguments: --stpes 10; did you mean --steps?"),
    (["sample", "--step", "40"], "usage: kve-fast sample", "unrecognized arguments: --step 40; did you mean --steps?"),
    (["generate", "--seeds", "0", "--outdir", "o", "--batch-size", "2"], "usage: kve-fast generate",
     "did you mean --batch?"),
    (["sample", "--seeed=3", "--qiet"], "usage: kve-fast sample", "did you mean --seed or --quiet?"),
    (["bench", "--repeat", "1"], "usage: kve-fast bench", "did you mean --repeats?"),
])
def test_an_unknown_option_is_told_with_the_option_it_looks_like(argv, usage, hint, capsys, tmp_path, monkeypatch):
    """Against the subcommand's usage, and never taken as an abbreviation (mutations: argparse's abbreviations on ->
    ``--step 40`` and ``--repeat 1`` run as ``--steps 40`` and ``--repeats 1``; no suggestion -> the top-level usage
    alone)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(usage) and err.strip().endswith(hint), err
    assert list(tmp_path.iterdir()) == []


def test_no_parser_takes_abbreviations():
    parser = cli.build_parser()
    subcommands = parser._subcommands()
    assert set(subcommands) == {"sample", "generate", "bench"}
    assert not parser.allow_abbrev and not any(p.allow_abbrev for p in subcommands.values())


def test_threads_are_fixed_for_the_run_and_put_back(model_dir, tmp_path, capsys):
    before = torch.get_num_threads()
    seen = []
    original = kve_fast.KarrasVePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((torch.get_num_threads(), kve_fast.threads.choose("cpu").threads))
        return original(self, *args, **kwargs)

    kve_fast.KarrasVePipeline.__call__ = spy
    try:
        base = ["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", "--device", "cpu"]
        assert main(base + ["--out", str(tmp_path / "a.png"), "--threads", "3"]) == 0
        assert "on cpu, 3 threads" in capsys.readouterr().out
        assert main(base + ["--out", str(tmp_path / "b.png")]) == 0  # default: torch's count, fixed too
        assert f"on cpu, {before} thread" in capsys.readouterr().out
    finally:
        kve_fast.KarrasVePipeline.__call__ = original
    assert seen == [(3, 3), (before, before)]  # the sampler's own policy would keep it (set_threads)
    assert torch.get_num_threads() == before and kve_fast.threads.choose("cpu").why != "set_threads / --threads"


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/no/such/model"], "--model"),
    (["--out", "/no/such/folder/grid.png"], "--out"),
    (["--trajectory", "/no/such/folder/t.png"], "--trajectory"),
    (["--s-min", "10", "--s-max", "1"], "s_min"),
    (["--device", f"cuda:{torch.cuda.device_count() or 7}"], "--device"),  # no GPU, or one beyond the count
])
def test_user_errors_are_one_line_messages(model_dir, tmp_path, argv, needle, capsys):
    args = ["sample", "--steps", "2", "--batch-size", "1", "--out", str(tmp_path / "x.png")]
    if "--model" not in argv:
        args += ["--model", model_dir]
    assert main(args + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kve-fast: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_the_script_exits_fast_with_everything_written(model_dir, tmp_path):
    """python -m kve_fast (the kve-fast script's entry) skips the interpreter's teardown after sample: the image,
    the summary on a pipe and the exit status must all still be there."""
    out = tmp_path / "grid.png"
    base = [sys.executable, "-m", "kve_fast", "sample", "--model", model_dir, "--steps", "2", "--batch-size", "2",
            "--device", "cpu"]
    env = {k: v for k, v in _this_kve_fast().items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered on a pipe
    proc = subprocess.run(base + ["--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("kve-fast: wrote ") and proc.stdout.endswith(")\n")
    assert Image.open(out).size == (2 * (8 * 4 + 2) + 2, 8 * 4 + 4)
    assert not list(tmp_path.glob(".*.tmp"))
    proc = subprocess.run(base + ["--out", str(tmp_path / "x.txt")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("kve-fast: error: --out") and proc.stdout == ""


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "kve_fast", "sample", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--trajectory" in proc.stdout


# ---- every mistake is a usage error naming the option, before any sampling and with nothing written -------

@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling fails the test: a bad argument must be refused before any."""
    def sample(*args, **kwargs):
        raise AssertionError("sampling started despite a bad argument")

    monkeypatch.setattr(kve_fast.KarrasVePipeline, "__call__", sample)


def run_cli(argv, capsys):
    """``(exit status, stderr)`` of ``main(argv)``, argparse's SystemExit included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_usage_error(code, err, option):
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert "error:" in last and option in last, err


@pytest.mark.parametrize("argv, option", [
    (["--out", "samples"], "--out"),  # no extension
    (["--out", "x.txt"], "--out"),
    (["--out", "x.png", "--trajectory", "t"], "--trajectory"),
    (["--out", "x.png", "--trajectory", "t.txt"], "--trajectory"),
    (["--no-grid", "--out", "x.png"], "--out"),  # a folder named like an image: a grid was meant
])
def test_the_output_format_comes_from_the_extension(model_dir, tmp_path, monkeypatch, no_sampling, capsys, argv,
                                                    option):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "1", *argv], capsys)
    assert_usage_error(code, err, option)
    assert ".png" in err  # says which extensions work
    assert list(tmp_path.iterdir()) == []


def test_every_accepted_extension_writes_its_format(model_dir, tmp_path):
    pixels = {}
    for ext, fmt in cli.IMAGE_FORMATS.items():
        out = tmp_path / f"grid{ext.upper() if ext == '.png' else ext}"  # the case of the extension does not matter
        assert main(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "4", "--quiet", "--out", str(out),
                     "--schedule", "edm"]) == 0
        with Image.open(out) as image:
            assert image.format == fmt
            pixels[ext] = np.asarray(image.convert("L"))  # WebP keeps grey as RGB: back exactly
    for ext in (".webp", ".bmp", ".tif", ".tiff"):  # lossless
        assert np.array_equal(pixels[ext], pixels[".png"]), ext


@pytest.mark.parametrize("grid", [True, False])
def test_outputs_that_would_overwrite_each_other(model_dir, tmp_path, monkeypatch, no_sampling, capsys, grid):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    if grid:  # the same file, spelt two ways
        argv = ["--out", "grid.png", "--trajectory", os.path.join("sub", "..", "grid.png")]
    else:  # the strip would replace sample 1's file
        (tmp_path / "imgs").mkdir()
        argv = ["--no-grid", "--out", "imgs", "--trajectory", os.path.join("imgs", "sample_0001.png")]
    code, err = run_cli(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", *argv], capsys)
    assert_usage_error(code, err, "--trajectory")
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["sub"] if grid else ["imgs", "sub"])


def test_a_trajectory_beside_the_sample_files_is_fine(model_dir, tmp_path):
    """Not every file in the --no-grid folder collides: sample_0002.png does not exist with 2 images."""
    argv = ["--no-grid", "--out", str(tmp_path), "--trajectory", str(tmp_path / "sample_0002.png")]
    assert main(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", "--quiet", *argv]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "garbage", "cuda:x", "cuda:-1", "CPU"])
def test_devices_other_than_cpu_and_cuda_are_refused(model_dir, tmp_path, no_sampling, capsys, device):
    out = tmp_path / "x.png"
    code, err = run_cli(["sample", "--model", model_dir, "--out", str(out), "--device", device], capsys)
    assert_usage_error(code, err, "--device")
    assert not out.exists()


def test_a_cuda_index_beyond_the_device_count_is_refused(model_dir, tmp_path, monkeypatch, no_sampling, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "x.png"
    code, err = run_cli(["sample", "--model", model_dir, "--out", str(out), "--device", "cuda:1"], capsys)
    assert_usage_error(code, err, "--device")
    assert "cuda:0" in err and not out.exists()


@pytest.mark.parametrize("seed", [str(2**64), "-1", "1.5"])
def test_seeds_outside_what_the_generator_takes_are_refused(model_dir, tmp_path, no_sampling, capsys, seed):
    out = tmp_path / "x.png"
    code, err = run_cli(["sample", "--model", model_dir, "--out", str(out), "--seed", seed], capsys)
    assert_usage_error(code, err, "--seed")
    assert not out.exists()


def test_the_largest_seed_works(model_dir, tmp_path):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", model_dir, "--out", str(out), "--seed", str(2**64 - 1), "--steps", "2",
                 "--batch-size", "1", "--quiet"]) == 0
    assert out.exists()


def _tweak(model_dir, tmp_path, config=None, text=None):
    """A copy of the tiny model folder with its config.json replaced."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if config is not None:
        text = json.dumps(config(json.loads((folder / "config.json").read_text())))
    (folder / "config.json").write_text(text)
    return str(folder)


@pytest.mark.parametrize("config, text, reason", [
    (lambda c: [c], None, "JSON list"),
    (lambda c: {}, None, "empty JSON object"),
    (None, '{"sample_size": 8,', "not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "sample_size"}, None, "sample_size"),
    (lambda c: {**c, "sample_size": "8"}, None, "sample_size"),
    (lambda c: {**c, "block_out_channels": [32, 64]}, None, "do not match"),  # every shape differs
    (lambda c: {**c, "in_channels": 3, "out_channels": 3}, None, "do not match"),
    (lambda c: {**c, "num_class_embeds": 10}, None, "missing from the weights: class_embedding.weight"),
    (lambda c: {**c, "norm_num_groups": 5}, None, "cannot build"),
])
def test_bad_model_folders_are_refused_with_the_reason(model_dir, tmp_path, no_sampling, capsys, config, text,
                                                       reason):
    folder = _tweak(model_dir, tmp_path, config, text)
    out = tmp_path / "x.png"
    code, err = run_cli(["sample", "--model", folder, "--out", str(out), "--steps", "2"], capsys)
    assert_usage_error(code, err, "--model")
    assert reason in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(ValueError, match=reason.replace(".", r"\.")):  # the library says the same
        kve_fast.load_model(folder)


def test_missing_weights_are_refused(model_dir, tmp_path, no_sampling, capsys):
    folder = _tweak(model_dir, tmp_path, lambda c: c)
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    code, err = run_cli(["sample", "--model", folder, "--out", str(tmp_path / "x.png")], capsys)
    assert_usage_error(code, err, "--model")
    assert "no weights" in err


@pytest.mark.parametrize("argv, option", [
    (["--scale", "100000"], "--scale"),
    (["--scale", "20000", "--no-grid"], "--scale"),  # one file per image, each 160000x160000
    (["--batch-size", str(10**8), "--scale", "1"], "--batch-size"),  # a grid over PIL's limit even unscaled
    (["--batch-size", str(10**8)], "--batch-size"),
    (["--out", "x.jpg", "--scale", "3000", "--batch-size", "4"], "--scale"),  # JPEG: 65535 pixels a side
])
def test_outputs_too_large_to_write_are_refused(model_dir, tmp_path, monkeypatch, no_sampling, capsys, argv, option):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["sample", "--model", model_dir, "--steps", "2", *argv], capsys)
    assert_usage_error(code, err, option)
    assert list(tmp_path.iterdir()) == []


def test_the_default_scale_shrinks_to_fit(model_dir, tmp_path):
    """8x8 images are upscaled 4x by default, less where the grid would then be too large."""
    out = tmp_path / "x.png"
    assert main(["sample", "--model", model_dir, "--out", str(out), "--steps", "2", "--batch-size", "1", "--quiet"]) == 0
    assert Image.open(out).size == (32 + 4, 32 + 4)
    args = cli.build_parser().parse_args(["sample", "--batch-size", str(400**2)])
    # 400 x 400 tiles: 4002 pixels a side at 1x, 7202 at 2x (51.9 M pixels), 10402 at 3x (108 M): too many
    assert cli._check_sizes(args, (1, 8, 8), "PNG", None) == 2


# ---- files are written whole or not at all ---------------------------------------------------------------

def _this_kve_fast() -> dict:
    """The environment for a subprocess that imports the kve_fast under test, wherever it runs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(kve_fast.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _save_half_then(signal_or_interrupt):
    """A stand-in for PIL's save that writes the first half of the real file, then is interrupted."""
    real_save = Image.Image.save

    def save(self, fp, format=None, **params):
        buffer = io.BytesIO()
        real_save(self, buffer, format=format or "PNG", **params)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(half)
        else:
            fp.write(half)
            fp.flush()
        signal_or_interrupt()

    return save


def _interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("grid", [True, False])
def test_an_interrupted_save_leaves_the_old_file_and_no_temporary(model_dir, tmp_path, monkeypatch, capsys, grid):
    old = b"the picture that was here"
    if grid:
        target, argv = tmp_path / "grid.png", ["--out", str(tmp_path / "grid.png")]
    else:
        target, argv = tmp_path / "sample_0000.png", ["--no-grid", "--out", str(tmp_path)]
    target.write_bytes(old)
    monkeypatch.setattr(Image.Image, "save", _save_half_then(_interrupt))
    assert main(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", "--quiet", *argv]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [target.name] and target.read_bytes() == old


def test_sigterm_during_the_save_leaves_the_old_file_and_no_temporary(model_dir, tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from PIL import Image
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_cli import _save_half_then
        from kve_fast.cli import main
        Image.Image.save = _save_half_then(lambda: os.kill(os.getpid(), signal.SIGTERM))
        sys.exit(main(["sample", "--model", {model_dir!r}, "--steps", "2", "--batch-size", "1", "--quiet",
                       "--device", "cpu", "--out", {str(target)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_this_kve_fast())
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "kve-fast: terminated"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"] and target.read_bytes() == b"old"


def test_a_completed_save_replaces_the_file_with_the_usual_permissions(model_dir, tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    assert main(["sample", "--model", model_dir, "--steps", "2", "--batch-size", "1", "--quiet",
                 "--out", str(target)]) == 0
    assert Image.open(target).size == (36, 36) and os.stat(target).st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# ---- the reference schedule with too few steps -----------------------------------------------------------

@pytest.mark.parametrize("model_schedule, argv, warned", [
    (None, [], True),  # no sigma_schedule in the config: the reference's
    (None, ["--schedule", "edm"], False),
    ("edm", [], False),
    ("edm", ["--schedule", "diffusers"], True),  # the override is what counts
    (None, ["--steps", str(REFERENCE_SCHEDULE_MIN_STEPS)], False),
])
def test_a_warning_when_the_reference_schedule_has_too_few_steps(model_dir, tmp_path, capsys, model_schedule, argv,
                                                                 warned):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if model_schedule:
        config = json.loads((folder / "scheduler_config.json").read_text())
        (folder / "scheduler_config.json").write_text(json.dumps({**config, "sigma_schedule": model_schedule}))
    steps = [] if "--steps" in argv else ["--steps", "3"]
    assert main(["sample", "--model", str(folder), "--batch-size", "1", "--out", str(tmp_path / "x.png"), "--quiet",
                 *steps, *argv]) == 0
    err = capsys.readouterr().err
    if warned:
        assert err.startswith("kve-fast: warning:") and "--steps 3" in err and "--schedule edm" in err
        assert len(err.strip().splitlines()) == 1
    else:
        assert "warning" not in err


# ---- a light import graph ----------------------------------------------------------------------------------

def test_the_command_line_and_its_checks_need_neither_torch_nor_diffusers(model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import kve_fast.cli, sys
        print('torch' in sys.modules, 'diffusers' in sys.modules)
        import contextlib, io, kve_fast.loading
        codes = []
        for argv in (["--help"], ["--out", "x.txt"], ["--device", "meta"], ["--seed", "-1"], ["--scale", "100000"],
                     ["--model", {str(tmp_path)!r}], ["--out", "a.png", "--trajectory", "a.png"]):
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    codes.append(kve_fast.cli.main(["sample", "--model", {model_dir!r}, *argv]))
            except SystemExit as exc:
                codes.append(exc.code)
        print(*codes)
        print(*(name in sys.modules for name in ('torch', 'diffusers', 'numpy')))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=_this_kve_fast())
    assert proc.stdout.splitlines() == ["False False", "0 2 2 2 2 2 2", "False False False"], proc.stdout + proc.stderr


def test_cuda_graph_option_and_bench_subcommand(model_dir, tmp_path, capsys):
    # --cuda-graph off gives the same PNG as the default (graphs never change bits; on the CPU there are none)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    base = ["sample", "--model", model_dir, "--steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main(base + ["--out", str(a)]) == 0
    assert main(base + ["--out", str(b), "--cuda-graph", "off"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert main(base + ["--out", str(tmp_path / "c.png"), "--cuda-graph", "on"]) == 2
    assert "--cuda-graph" in capsys.readouterr().err
    # kve-fast bench on the CPU: eager rows timed, graphed rows left out with the reason
    assert main(["bench", "--model", model_dir, "--steps", "2", "--repeats", "1", "--device", "cpu",
                 "--no-reference", "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert "kve_fast eager, exact noise" in out and "Left out: kve_fast graphed" in out
    assert (tmp_path / "bench.json").exists()


def _imports() -> dict[str, set[str]]:
    """``{module: the kve_fast modules it imports}`` for every module of the package, read from its source."""
    import ast

    root = os.path.dirname(kve_fast.__file__)
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = ["kve_fast", *os.path.relpath(path, root)[:-3].split(os.sep)]
            package = parts[:-1]  # (a package's __init__ is in the package it makes)
            module = ".".join(parts if parts[-1] != "__init__" else package)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            edges = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = package[:len(package) - node.level + 1] if node.level else []
                    target = ".".join(base + ([node.module] if node.module else []))
                    edges.update([target] + [f"{target}.{a.name}" for a in node.names])
                elif isinstance(node, ast.Import):
                    edges.update(a.name for a in node.names)
            found[module] = {e for e in edges if e == "kve_fast" or e.startswith("kve_fast.")}
    return found


def test_nothing_imports_back_up_into_the_command_line():
    """The command line sits on top: only the entry point imports it, only the subcommands import what they share,
    and neither the images, the models nor ``generate`` import either (mutation: models/quality.py takes make_grid
    from kve_fast.cli again -> fails)."""
    imports = _imports()
    assert "kve_fast.models.quality" in imports and "kve_fast.generate.job" in imports
    up = {"kve_fast.cli": {"kve_fast.__main__"}, "kve_fast.cli_common": {"kve_fast.cli", "kve_fast.benchmark.cli"}}
    for target, allowed in up.items():
        importers = {m for m, edges in imports.items() if target in edges or any(e.startswith(target + ".") for e in edges)}
        assert importers <= allowed, (target, sorted(importers - allowed))
    below = [m for m in imports if m.startswith("kve_fast.generate") or m in ("kve_fast.images", "kve_fast.models.quality")]
    for module in below:
        assert not {e for e in imports[module] if e.startswith(("kve_fast.cli", "kve_fast.benchmark"))}, module
