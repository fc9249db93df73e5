"""`teacher train`: image loading, a few EDM training steps, outputs, repeatability, and a loss that falls."""

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdm_pipe.cli import app
from kdm_pipe.config import ConfigError, SamplerConfig
from kdm_pipe.datasets import load_images, sklearn_digits
from kdm_pipe.teachers import build_teacher
from kdm_pipe.teachers.edm import EDMTeacherConfig
from kdm_pipe.teachers.edm_checkpoint import load_state_dict_checkpoint
from kdm_pipe.teachers.training import TeacherTrainConfig, edm_loss, train_teacher
from stages.teacher import run_train

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0, batch=8,
            log_every=1, ckpt_every=3, grid=4, device="cpu")


def pixels(n: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, channels), dtype=np.uint8)


@pytest.fixture
def png_folder(tmp_path):
    root = tmp_path / "pngs"
    (root / "00000").mkdir(parents=True)
    names = []
    for i, p in enumerate(pixels(6)):
        names.append(f"00000/img{i:08d}.png")
        Image.fromarray(p[..., 0]).save(root / names[-1])
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]}))
    return root


def test_png_folder_and_zip_load_alike(png_folder, tmp_path):
    data = load_images(png_folder)
    assert data.images.shape == (6, 1, 8, 8) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0], pixels(6)[..., 0] / 127.5 - 1, atol=1e-6)
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2] and data.num_classes == 3
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in png_folder.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(png_folder).as_posix())
    zipped = load_images(archive)
    np.testing.assert_array_equal(zipped.images, data.images)
    np.testing.assert_array_equal(zipped.labels, data.labels)


def test_npy_layouts(tmp_path):
    rgb = pixels(4, channels=3)
    np.save(tmp_path / "u8.npy", rgb)
    data = load_images(tmp_path / "u8.npy")
    assert data.images.shape == (4, 3, 8, 8) and data.labels is None
    np.testing.assert_allclose(data.images, rgb.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    np.save(tmp_path / "f.npy", data.images)
    np.testing.assert_array_equal(load_images(tmp_path / "f.npy").images, data.images)
    np.save(tmp_path / "bad.npy", data.images * 100)
    with pytest.raises(ConfigError, match=r"\[−1, 1\]"):
        load_images(tmp_path / "bad.npy")


def test_sklearn_digits_grey_levels():
    data = sklearn_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.num_classes == 10
    assert sorted(np.unique(data.images))[:3] == pytest.approx([-1, -0.875, -0.75])
    assert data.images.max() == 1.0


def test_bad_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_images(tmp_path / "nothing")
    (tmp_path / "mixed").mkdir()
    Image.fromarray(pixels(1)[0, ..., 0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ConfigError, match="differ in size"):
        load_images(tmp_path / "mixed")
    np.save(tmp_path / "x.npy", pixels(3))
    with pytest.raises(ConfigError, match="no class labels"):
        train_teacher(TeacherTrainConfig(data=str(tmp_path / "x.npy"), out=tmp_path / "run", cond=True, **TINY))


def test_train_writes_a_usable_teacher(png_folder, tmp_path):
    out = run_train(TeacherTrainConfig(data=str(png_folder), out=tmp_path / "run", steps=6, cond=True, **TINY),
                    progress=False)
    for name in ("config.json", "train.jsonl", "teacher.pt", "teacher.json", "loss.png", "samples.png",
                 "checkpoints/teacher-00000003.pt", "checkpoints/teacher-00000006.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["steps"] == 6 and saved["network"]["init_kwargs"]["label_dim"] == 3
    teacher = build_teacher(EDMTeacherConfig(checkpoint=out / "teacher.pt"))
    assert teacher.shape == (1, 8, 8) and teacher.label_dim == 3
    pairs = teacher.sample(SamplerConfig(steps=3), [0, 1], None, torch.device("cpu"))
    assert pairs["x_0"].shape == (2, 1, 8, 8) and pairs["label"].shape == (2, 3)
    with pytest.raises(ConfigError, match="already holds"):
        train_teacher(TeacherTrainConfig(data=str(png_folder), out=out, steps=1, **TINY))


def test_same_seed_same_weights(tmp_path):
    np.save(tmp_path / "x.npy", pixels(10, channels=3))
    states = []
    for seed, run in ((0, "a"), (0, "b"), (1, "c")):
        cfg = TeacherTrainConfig(data=str(tmp_path / "x.npy"), out=tmp_path / run, steps=4, seed=seed, precond="vp",
                                 **dict(TINY, dropout=0.1, grid=0))
        states.append(load_state_dict_checkpoint(train_teacher(cfg) / "teacher.pt").net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_loss_falls_on_a_trivial_dataset(tmp_path):
    np.save(tmp_path / "one.npy", np.repeat(pixels(1, seed=3), 16, axis=0))   # one image, 16 times
    cfg = TeacherTrainConfig(data=str(tmp_path / "one.npy"), out=tmp_path / "run", steps=40, lr=3e-3, lr_warmup=0,
                             **dict(TINY, batch=16, grid=0))
    losses = [json.loads(line)["loss"] for line in (train_teacher(cfg) / "train.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_edm_loss_weighting_is_unit_at_the_data_std():
    """With D ≡ 0 the loss is λ(σ)·y²; for σ = σ_d, λ = 2/σ_d², so mean loss = 2·mean(y²)/σ_d²."""
    class Zero(torch.nn.Module):
        sigma_data = 0.5

        def forward(self, x, sigma, labels):
            return torch.zeros_like(x)

    y = torch.full((4, 1, 2, 2), 0.3)
    gen = torch.Generator().manual_seed(0)
    loss = edm_loss(Zero(), "edm", y, None, gen, P_mean=float(np.log(0.5)), P_std=0.0)
    assert loss.item() == pytest.approx(2 * 0.09 / 0.25)


@pytest.mark.skipif("teacher" not in {g.name for g in app.registered_groups},
                    reason="the `teacher` sub-app is not mounted in kdm_pipe/cli.py yet")
def test_cli_teacher_train(png_folder, tmp_path):
    result = CliRunner().invoke(app, ["teacher", "train", "--data", str(png_folder), "--out", str(tmp_path / "r"),
                                      "--model-channels", "16", "--channel-mult", "1,2", "--num-blocks", "1",
                                      "--attn-resolutions", "", "--steps", "2", "--batch", "4", "--grid", "0",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "teacher.pt").is_file()
    bad = CliRunner().invoke(app, ["teacher", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "s")])
    assert bad.exit_code == 2 and not (tmp_path / "s").exists()


def test_animal_mnist_arrays_load_and_code_is_refused(tmp_path):
    import gzip
    import os
    import pickle

    from kdm_pipe.datasets import animal_mnist

    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), np.arange(20) % 10
    for name, a in (("animal_data_version_3.gz", pixels), ("animal_label_version_3.gz", labels)):
        with gzip.open(tmp_path / name, "wb") as f:
            pickle.dump(a, f)
    data = animal_mnist(tmp_path)
    assert data.shape == (1, 28, 28) and data.num_classes == 10
    assert np.array_equal(((data.images[:, 0] + 1) * 127.5).round().astype(np.uint8), pixels)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    with gzip.open(tmp_path / "animal_data_version_3.gz", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        animal_mnist(tmp_path)
    assert not marker.exists()
