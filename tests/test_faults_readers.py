"""Fault injection on the readers of a trained run's pairs (evaluate, analyze, sample) and of its checkpoints: a
held-out shard changed in place, values that decode to NaN, an unreadable checkpoint whose checksum matches, a run
moved with its pairs. Every case checks the exit code, the one `error:` line and that nothing was written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import bless, cli, error_line, flip_byte, tree

from kdm_pipe import run as kdm_run
from kdm_pipe import storage
from kdm_pipe.shards import read_shard, write_shard
from kdm_pipe.trained import latest_checkpoint

QUICK = ["--steps", "4", "--batch", "100", "--ckpt-every", "2", "--probe-every", "2", "--no-tensorboard", "-q",
         "--student", "kdm"]
HELDOUT = "shard-000004.tar"                         # holdout_shards = 1: the last of the 5


@pytest.fixture(scope="module")
def trained(vector_pairs, tmp_path_factory):
    """A run trained 4 steps (checkpoints 2 and 4) beside a copy of the 5 × 1000 board pairs (no weights.json)."""
    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(vector_pairs, root / "pairs")
    r = cli("train", "--data", root / "pairs", "--out", root / "run", *QUICK)
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def setup(trained, tmp_path):
    """A private copy of the pairs and the run, free to damage (the run's config.json pointed at the copy)."""
    root = Path(shutil.copytree(trained, tmp_path / "t"))
    config = root / "run" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "data": str(root / "pairs")}))
    return root


def written(root: Path) -> dict[str, str]:
    """`tree` without the pair set's checksum cache, which forgets a shard found changed."""
    return {k: v for k, v in tree(root).items() if not k.endswith(".kdm-verified.json")}


def fresh(*args):
    kdm_run._warned.clear()          # a process warns about a damaged checkpoint once; these share one
    return cli(*args)


def readers(root: Path):
    run = root / "run"
    return {"evaluate": ["evaluate", run, "--num", "200", "--data", root / "pairs"],
            "analyze": ["analyze", run, "--num", "200"],
            "sample": ["sample", run, "--out", root / "s", "--num", "8"]}


@pytest.mark.parametrize("stage", ["evaluate", "analyze", "sample"])
def test_heldout_shard_changed_in_place_is_refused(setup, stage):
    flip_byte(setup / "pairs" / HELDOUT, 3000)       # same size, mtime put back: only the sha256 tells
    before = written(setup)
    error_line(cli(*readers(setup)[stage]), 1, HELDOUT, "sha256", "rerun")
    assert written(setup) == before                     # no eval.json, weights.json, analysis/ nor samples


def nan_in_x_0(directory: Path, name: str) -> None:
    """Write the shard again with one x_0 value NaN and make the manifest agree (only its values tell)."""
    recs = list(read_shard(directory / name))
    recs[0]["x_0"] = recs[0]["x_0"].copy()
    recs[0]["x_0"][3, 0] = np.nan
    write_shard(directory / name, recs)
    bless(directory)


@pytest.mark.parametrize("stage", ["evaluate", "analyze", "sample"])
def test_heldout_values_that_are_not_finite_are_named(setup, stage):
    nan_in_x_0(setup / "pairs", HELDOUT)
    before = written(setup)
    error_line(cli(*readers(setup)[stage]), 1, HELDOUT, "non-finite", "verify")
    assert written(setup) == before


class Payload:
    """Stands for any object a hostile pickle would carry (loading it would run code)."""


@pytest.mark.parametrize("kind", ["hostile", "truncated"])
def test_unloadable_checkpoint_with_matching_checksum_falls_back(setup, kind):
    run = setup / "run"
    latest = run / "checkpoints" / "ckpt-00000004.pt"
    if kind == "hostile":
        torch.save({"step": 4, "ema": Payload()}, latest)
    else:
        latest.write_bytes(latest.read_bytes()[:5000])
    (run / "checkpoints" / "ckpt-00000004.pt.sha256").write_text(storage.sha256(latest) + "\n")    # it "matches"
    for args in readers(setup).values():
        r = fresh(*args)
        assert r.returncode == 0, r.stderr
        assert "ckpt-00000004.pt is damaged" in r.stderr and "weights_only" not in r.stderr + r.stdout
    r = fresh("train", "--data", setup / "pairs", "--out", run, *QUICK[:1], "6", *QUICK[2:], "--resume")
    assert r.returncode == 0, r.stderr
    assert "falling back" in r.stderr and "weights_only" not in r.stderr
    assert (run / "checkpoints" / "ckpt-00000004.pt.damaged").is_file()
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 6


def test_run_moved_with_its_pairs_resumes_without_data(setup, tmp_path):
    moved = Path(shutil.move(setup, tmp_path / "elsewhere"))      # config.json's --data no longer exists
    run = moved / "run"
    r = fresh("train", "--out", run, *QUICK[:1], "6", *QUICK[2:], "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(latest_checkpoint(run), weights_only=True)["step"] == 6
    assert json.loads((run / "split.json").read_text())["data_from_run"] == "../pairs"
    assert fresh("evaluate", run, "--num", "200").returncode == 0


def test_train_without_data_is_bad_input(tmp_path):
    error_line(cli("train", "--out", tmp_path / "run", *QUICK), 2, "--data")
    error_line(cli("train", "--out", tmp_path / "run", *QUICK, "--resume"), 2, "holds no run", "--data")
    assert not (tmp_path / "run").exists()


def test_latent_run_whose_vae_moved_names_the_field_and_the_override(tmp_path):
    """A run on VAE latents: the VAE gone from where the manifest records it, another VAE passed as --vae, and --vae
    for pixel pairs are each one line (exit 2) and nothing written; --vae with the moved VAE decodes."""
    from diffusers_fixture import tiny_vae
    from handmade import pair_set

    from kdm_pipe.manifest import load_manifest, save_manifest
    from kdm_pipe.teachers.diffusers_folder import vae_folder
    from kdm_pipe.teachers.vae import latent_space

    tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
    rng = np.random.default_rng(0)
    shards = [[{"seed": np.arange(16 * k, 16 * k + 16), "x_T": 80 * rng.standard_normal((16, 4, 8, 8), np.float32),
                "x_0": rng.standard_normal((16, 4, 8, 8), np.float32)}] for k in range(3)]
    pairs = pair_set(tmp_path / "pairs", shards)
    m = load_manifest(pairs)
    m.latent = latent_space(vae_folder(tmp_path / "vae", "test"), (8, 8))
    save_manifest(pairs, m)
    run = tmp_path / "run"
    assert cli("train", "--data", pairs, "--out", run, "--steps", "2", "--batch", "8", "--loader-workers", "0",
               "--no-tensorboard", "-q", "--model-channels", "4", "--channel-mult", "1", "--num-blocks", "1",
               "--attn-resolutions", "", "--w-adv", "0").returncode == 0
    # stats embeds decoded x_0: its feature group is named after the VAE and counts every pair.
    assert cli("stats", pairs, "-q").returncode == 0
    import zarr

    from kdm_pipe.feature_stats import key, space_name
    group = zarr.open_group(pairs / "stats.zarr", mode="r")[f"features/{key(space_name('pixels', m.latent))}"]
    assert group.attrs["dim"] == 3 * 16 * 16 and int(group["merged/count"][...]) == 48
    moved = tmp_path / "moved"
    (tmp_path / "vae").rename(moved)
    tiny_vae(seed=5).save_pretrained(tmp_path / "other", safe_serialization=True)
    sample = lambda *more: cli("sample", run, "--out", tmp_path / "s", "--num", "2", *more)  # noqa: E731
    evaluate = lambda *more: cli("evaluate", run, "--num", "8", "--batch", "8", *more)  # noqa: E731
    before = tree(tmp_path)
    analyze = lambda *more: cli("analyze", run, "--num", "16", *more)  # noqa: E731
    for stage in (sample, evaluate, analyze):
        error_line(stage(), 2, str(tmp_path / "vae"), "latent.vae", "--vae")
        error_line(stage("--vae", tmp_path / "other"), 2, "not the ones the pairs were made with")
    # What does not decode latents refuses them (a diffusers export, the memorisation filter); stats needs the VAE.
    error_line(cli("export", run, "--out", tmp_path / "x"), 2, "VAE latents", "--format safetensors")
    error_line(cli("filter", pairs, "--ref", "sklearn-digits"), 2, "VAE latents")
    error_line(cli("stats", pairs), 2, str(tmp_path / "vae"), "latent.vae", "--vae")
    assert tree(tmp_path) == before
    assert cli("export", run, "--out", tmp_path / "x", "--format", "safetensors").returncode == 0
    assert json.loads((tmp_path / "x" / "config.json").read_text())["_kdm_pipe"]["latent"] == m.latent.model_dump()
    assert sample("--vae", moved).returncode == 0 and analyze("--vae", moved).returncode == 0
    assert cli("stats", pairs, "--vae", moved, "-q").returncode == 0
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)


def test_vae_for_pixel_pairs_is_refused(setup):
    before = written(setup)
    error_line(cli("sample", setup / "run", "--out", setup / "s", "--num", "2", "--vae", setup), 2, "not latents",
               "drop --vae")
    assert written(setup) == before
