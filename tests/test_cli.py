"""The kve-fast command line: outputs, options and clear errors (no tracebacks) for bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import kve_fast
from kve_fast.cli import main


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
    (["--batch-size", "0"], "--batch-size"),
    (["--s-churn", "-1"], "--s-churn"),
    (["--s-noise", "nan"], "--s-noise"),
    (["--backend", "cuda"], "--backend"),
])
def test_bad_numbers_and_choices_are_usage_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/no/such/model"], "--model"),
    (["--out", "/no/such/folder/grid.png"], "--out"),
    (["--trajectory", "/no/such/folder/t.png"], "--trajectory"),
    (["--s-min", "10", "--s-max", "1"], "s_min"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "tpu"], "--device"),
])
def test_user_errors_are_one_line_messages(model_dir, tmp_path, argv, needle, capsys):
    args = ["sample", "--steps", "2", "--batch-size", "1", "--out", str(tmp_path / "x.png")]
    if "--model" not in argv:
        args += ["--model", model_dir]
    assert main(args + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kve-fast: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "kve_fast", "sample", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--trajectory" in proc.stdout
