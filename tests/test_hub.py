"""Hugging Face Hub ids (``ORG/NAME``): read from a local cache built here (never the network), downloaded only
when asked (through a stand-in for huggingface_hub's two calls)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

import kve_fast
from kve_fast import loading
from kve_fast.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, time_embedding_type="fourier",
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def snapshot_dir(cache, repo_id, commit=COMMIT):
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def add_to_cache(cache, repo_id, layout, commit=COMMIT):
    """huggingface_hub's cache layout: refs/main holds the commit, snapshots/COMMIT the files. ``layout``:
    "pipeline" (model_index.json, unet/, scheduler/ with a ScoreSdeVeScheduler config, as google/ncsnpp-* are
    published) or "unet" (a bare UNet folder with our scheduler's config)."""
    snap = snapshot_dir(cache, repo_id, commit)
    refs = snap.parent.parent / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)
    unet = tiny_unet()
    if layout == "pipeline":
        unet.save_pretrained(snap / "unet")
        (snap / "scheduler").mkdir(parents=True)
        (snap / "model_index.json").write_text(json.dumps({"_class_name": "ScoreSdeVePipeline",
                                                           "unet": ["diffusers", "UNet2DModel"],
                                                           "scheduler": ["diffusers", "ScoreSdeVeScheduler"]}))
        (snap / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 348.0, "snr": 0.16,
             "num_train_timesteps": 2000, "sampling_eps": 1e-5, "correct_steps": 1}))
    else:
        unet.save_pretrained(snap)
        kve_fast.KarrasVeScheduler(s_churn=40.0).save_config(snap)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # no local folder named like the ids
    return root


def test_the_cache_folder_is_found_as_huggingface_hub_finds_it(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert loading.hub_cache_dir() == os.path.expanduser(os.path.join("~", ".cache", "huggingface", "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.hub_cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert loading.hub_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert loading.hub_cache_dir() == str(tmp_path / "c")


def test_a_cached_pipeline_loads_by_id_and_another_schedulers_config_is_not_used(cache):
    snap = add_to_cache(cache, "google/ncsnpp-tiny", "pipeline")
    with pytest.warns(loading.ForeignSchedulerWarning, match="ScoreSdeVeScheduler"):
        unet, scheduler = kve_fast.load_model("google/ncsnpp-tiny")
    # ScoreSdeVe's sigma_max=348 would silently change the schedule: the reference's defaults instead
    assert (scheduler.config.sigma_min, scheduler.config.sigma_max) == (0.02, 100)
    again = UNet2DModel.from_pretrained(snap / "unet")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), again.state_dict().values()))
    folder = loading.check_model_folder("google/ncsnpp-tiny")
    assert folder.path == str(snap) and folder.foreign_scheduler == "ScoreSdeVeScheduler"


def test_a_cached_bare_unet_loads_by_id_with_its_scheduler(cache):
    add_to_cache(cache, "someone/digits-like", "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe = kve_fast.load_pipeline("someone/digits-like", s_noise=1.0)
    assert pipe.scheduler.config.s_churn == 40.0 and pipe.scheduler.config.s_noise == 1.0
    with pytest.raises(TypeError, match="sigma_maxx"):
        kve_fast.load_pipeline("someone/digits-like", sigma_maxx=3)


def test_an_id_not_in_the_cache_says_how_to_download_it(cache):
    for call in (lambda: kve_fast.load_model("google/ncsnpp-celebahq-256"),
                 lambda: kve_fast.KarrasVePipeline.from_pretrained("google/ncsnpp-celebahq-256")):
        with pytest.raises(ValueError) as info:
            call()
        text = str(info.value)
        assert "kve-fast sample --model google/ncsnpp-celebahq-256 --download" in text and "download=True" in text
        assert str(cache) in text and "\n" not in text
    # a commit in refs/main whose snapshot is gone counts as absent
    (cache / "models--a--b" / "refs").mkdir(parents=True)
    (cache / "models--a--b" / "refs" / "main").write_text(COMMIT)
    with pytest.raises(ValueError, match="not in the local cache"):
        loading.check_model_folder("a/b")


def test_a_local_folder_wins_over_an_id(cache, tmp_path):
    add_to_cache(cache, "org/name", "pipeline")
    local = tmp_path / "org" / "name"
    tiny_unet().save_pretrained(local)
    assert loading.check_model_folder("org/name").path == "org/name"


class StandInHub:
    """huggingface_hub's list_repo_files and snapshot_download, without a network: the repository's file list is
    given; snapshot_download writes what allow_patterns selects into the cache and records the patterns."""

    def __init__(self, files, fail=None):
        self.files, self.fail, self.patterns = files, fail, None

    def list_repo_files(self, repo_id):
        if self.fail:
            raise self.fail
        return list(self.files)

    def snapshot_download(self, repo_id, cache_dir, allow_patterns):
        self.patterns = list(allow_patterns)
        return str(add_to_cache(Path(cache_dir), repo_id, "pipeline"))


def stand_in(monkeypatch, hub):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)


NCSNPP_FILES = ["README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors", "samples/0.png"]


def test_download_fetches_only_the_configs_and_one_weights_format(cache, monkeypatch):
    hub = StandInHub(NCSNPP_FILES)
    stand_in(monkeypatch, hub)
    with pytest.raises(ValueError, match="--download"):
        kve_fast.load_model("google/ncsnpp-x")  # not without asking
    assert hub.patterns is None
    with pytest.warns(loading.ForeignSchedulerWarning):
        kve_fast.load_model("google/ncsnpp-x", download=True)
    assert sorted(hub.patterns) == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                    "unet/diffusion_pytorch_model.safetensors"]
    assert loading.hub_files_to_fetch(["config.json", "diffusion_pytorch_model.bin"]) == [
        "config.json", "diffusion_pytorch_model.bin"]
    hub.patterns = None
    with pytest.warns(loading.ForeignSchedulerWarning):
        kve_fast.load_model("google/ncsnpp-x", download=True)  # cached now: nothing fetched
    assert hub.patterns is None


def test_download_failures_are_one_line_errors(cache, monkeypatch):
    stand_in(monkeypatch, StandInHub([], fail=ConnectionError("Name or service not known\ndetails")))
    with pytest.raises(ValueError, match="could not download 'org/gone' .*ConnectionError: Name or service not known$"):
        kve_fast.load_model("org/gone", download=True)
    stand_in(monkeypatch, StandInHub(["README.md", "model.ckpt"]))
    with pytest.raises(ValueError, match="neither config.json nor unet/config.json"):
        kve_fast.load_model("org/ckpt-only", download=True)


# ---- the command line -------------------------------------------------------------------------------------

def test_sample_by_id_from_the_cache_equals_the_folder(cache, tmp_path, capsys):
    snap = add_to_cache(cache, "google/ncsnpp-tiny", "pipeline")
    by_id, by_folder = tmp_path / "a.png", tmp_path / "b.png"
    base = ["sample", "--steps", "3", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main(base + ["--model", "google/ncsnpp-tiny", "--out", str(by_id)]) == 0
    err = capsys.readouterr().err
    assert "kve-fast: warning:" in err and "ScoreSdeVeScheduler" in err
    assert main(base + ["--model", str(snap), "--out", str(by_folder)]) == 0
    assert np.array_equal(np.asarray(Image.open(by_id)), np.asarray(Image.open(by_folder)))


def test_sample_with_an_id_not_cached_names_the_download_command(cache, tmp_path, capsys, monkeypatch):
    hub = StandInHub(NCSNPP_FILES)
    stand_in(monkeypatch, hub)
    out = tmp_path / "x.png"
    assert main(["sample", "--model", "google/ncsnpp-celebahq-256", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kve-fast: error: --model:") and len(err.strip().splitlines()) == 1
    assert "kve-fast sample --model google/ncsnpp-celebahq-256 --download" in err
    assert hub.patterns is None and not out.exists()
    assert main(["sample", "--model", "google/ncsnpp-celebahq-256", "--download", "--steps", "2", "--batch-size", "1",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert hub.patterns is not None and out.exists()
