"""Fault injection for `export` and `teacher convert`: bad input exits 2 with one error line and writes nothing; a
failure while writing (a full disk) exits 1 and leaves neither OUT nor a temporary directory behind."""

from __future__ import annotations

import errno
import io
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
from edm_pickle_fixture import write_edm_pickle
from faults import cli, error_line, flip_byte, tree

from kdm_pipe.config import EDMTeacherConfig, TrainConfig
from kdm_pipe.errors import ConfigError
from kdm_pipe.networks import build_network
from kdm_pipe.teachers.edm import build_edm
from kdm_pipe.training import train

UNET = dict(img_resolution=8, img_channels=1, model_type="SongUNet", model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step run of a small MLP on 256 imported 2-D pairs (no Ray: quick)."""
    root = tmp_path_factory.mktemp("export-faults")
    rng = np.random.default_rng(0)
    np.save(root / "xT.npy", 80 * rng.standard_normal((256, 2)))
    np.save(root / "x0.npy", rng.uniform(-1, 1, (256, 2)))
    assert cli("import", "--format", "npy", "--x-T", root / "xT.npy", "--x-0", root / "x0.npy", "--out",
               root / "pairs", "--pairs-per-shard", "64", "-q").returncode == 0
    train(TrainConfig.model_validate({"data": root / "pairs", "out": root / "run", "steps": 2, "batch": 32,
                                      "loader_workers": 0, "tensorboard": False,
                                      "student": {"hidden": 8, "depth": 1, "latent_dim": 4}}), progress=False)
    return root / "run"


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_export_into_an_empty_directory_works(run, tmp_path):
    (tmp_path / "out").mkdir()
    assert cli("export", run, "--out", tmp_path / "out", "--format", "safetensors").returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_not_a_run(tmp_path):
    (tmp_path / "pairs").mkdir()
    before = tree(tmp_path)
    error_line(cli("export", tmp_path / "pairs", "--out", tmp_path / "out"), 2, "not a training run", "--out")
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_run_without_checkpoints(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "split.json"):
        shutil.copy(run / name, bare / name)
    error_line(cli("export", bare, "--out", tmp_path / "out", "--weights", "ema"), 2, "no checkpoints", "train")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_damaged_only_checkpoint(run, tmp_path):
    damaged = shutil.copytree(run, tmp_path / "run")
    (ckpt,) = sorted((damaged / "checkpoints").glob("*.pt"))
    flip_byte(ckpt, ckpt.stat().st_size // 2)
    error_line(cli("export", damaged, "--out", tmp_path / "out", "--weights", "ema"), 2, "none is intact")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["non-empty", "file"])
def test_out_exists(run, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    before = tree(tmp_path)
    error_line(cli("export", run, "--out", out), 2, str(out), "not an empty directory")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flags, fragment", [(["--format", "onnx"], "format"), (["--weights", "best"], "weights")])
def test_bad_settings(run, tmp_path, flags, fragment):
    error_line(cli("export", run, "--out", tmp_path / "out", *flags), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_missing_parent_of_out(run, tmp_path):
    error_line(cli("export", run, "--out", tmp_path / "no" / "out"), 2, "parent directory does not exist")
    assert not (tmp_path / "no").exists()


def test_disk_full_while_copying_leaves_nothing(run, tmp_path, monkeypatch):
    copies, real_copy = [], shutil.copyfile

    def copy_then_fail(src, dst):                              # the second file finds the disk full
        if copies:
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        copies.append(real_copy(src, dst))

    monkeypatch.setattr("kdm_pipe.export.shutil.copyfile", copy_then_fail)
    error_line(cli("export", run, "--out", tmp_path / "out"), 1, "No space left on device")
    assert copies and not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_missing_diffusers_says_how_to_install(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)          # import diffusers → ImportError
    error_line(cli("export", run, "--out", tmp_path / "out"), 2, "pip install 'kdm-pipe[diffusers]'")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---- teacher convert ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pickle_file(tmp_path_factory):
    torch.manual_seed(0)
    return write_edm_pickle(tmp_path_factory.mktemp("pkl") / "network.pkl", build_network("EDMPrecond", **UNET), UNET)


def test_convert_refuses_what_is_not_a_pickle(tmp_path, pickle_file):
    error_line(cli("teacher", "convert", tmp_path / "missing.pkl", "--out", tmp_path / "out"), 2, "missing.pkl",
               ".pkl")
    pt = tmp_path / "teacher.pt"
    pt.write_bytes(b"not a pickle")
    error_line(cli("teacher", "convert", pt, "--out", tmp_path / "out"), 2, "teacher.pt", "not an EDM network pickle")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_hostile_pickle(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    error_line(cli("teacher", "convert", bad, "--out", tmp_path / "out"), 2, "refusing global os.system")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_convert_unknown_key_and_existing_out(tmp_path, pickle_file):
    error_line(cli("teacher", "convert", pickle_file, "--out", tmp_path / "out", "--key", "nope"), 2, "'nope'")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.json").write_text("{}")
    before = tree(tmp_path)
    error_line(cli("teacher", "convert", pickle_file, "--out", tmp_path / "out"), 2, "not an empty directory")
    assert tree(tmp_path) == before


def test_converted_weights_changed_after_conversion_are_refused(tmp_path, pickle_file):
    assert cli("teacher", "convert", pickle_file, "--out", tmp_path / "out").returncode == 0
    weights = tmp_path / "out" / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 10)
    with pytest.raises(ConfigError, match="sha256"):
        build_edm(EDMTeacherConfig(checkpoint=weights))
    (tmp_path / "out" / "model.json").unlink()
    with pytest.raises(ConfigError, match="model.json"):
        build_edm(EDMTeacherConfig(checkpoint=weights))


# ---- pair formats ------------------------------------------------------------------------------------------------

def test_pair_format_of_a_run_and_student_format_of_a_pair_set(run, tmp_path):
    error_line(cli("export", run, "--out", tmp_path / "out", "--format", "kdm-npz"), 2, "not a pair directory",
               "manifest.json")
    pairs = run.parent / "pairs"
    error_line(cli("export", pairs, "--out", tmp_path / "out", "--format", "safetensors"), 2, "not a training run")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_corrupt_shard_exits_1_and_leaves_nothing(run, tmp_path):
    pairs = shutil.copytree(run.parent / "pairs", tmp_path / "pairs")
    shard = pairs / "shard-000001.tar"
    flip_byte(shard, 700)
    error_line(cli("export", pairs, "--out", tmp_path / "out", "--format", "rectified-flow"), 1, "shard-000001.tar")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_import_rectified_flow_needs_both_files(tmp_path):
    (tmp_path / "rf").mkdir()
    np.save(tmp_path / "rf" / "z0.npy", np.zeros((4, 2)))
    error_line(cli("import", tmp_path / "rf", "--format", "rectified-flow", "--out", tmp_path / "out", "-q"), 2,
               "z1.npy")
    assert not (tmp_path / "out").exists()


def test_import_fastgen_refuses_what_is_not_kd_pairs(tmp_path):
    (tmp_path / "fg").mkdir()
    (tmp_path / "fg" / "shard-000000.tar").write_bytes(b"not a tar" * 100)
    error_line(cli("import", tmp_path / "fg", "--format", "fastgen", "--out", tmp_path / "out", "-q"), 2,
               "shard-000000.tar", "not a readable tar")
    with tarfile.open(tmp_path / "fg" / "shard-000000.tar", "w") as tar:      # real.npy without its noise.npy
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 2), np.float32))
        info = tarfile.TarInfo("000000000000.real.npy")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    error_line(cli("import", tmp_path / "fg", "--format", "fastgen", "--out", tmp_path / "out", "-q"), 2,
               "without noise.npy")
    assert not (tmp_path / "out").exists()
