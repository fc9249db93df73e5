import json

import numpy as np
import pytest
from PIL import Image

from kdm_pipe.image_files import class_indices, image_grid, sample_path, write_samples


def _images(rng: np.random.Generator, n: int, c: int, h: int = 5, w: int = 4) -> np.ndarray:
    return rng.uniform(-1.1, 1.1, size=(n, c, h, w)).astype(np.float32)


def _edm_uint8(x: np.ndarray) -> np.ndarray:
    """EDM generate.py's quantisation, written out independently: NCHW float → NHWC uint8."""
    return np.floor(np.clip(x * 127.5 + 128, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)


def test_rgb_samples_load_back_with_edm_names_shapes_and_seeds(tmp_path):
    x = _images(np.random.default_rng(0), 5, 3)
    seeds = np.array([0, 7, 999, 1000, 1234])
    paths = write_samples(tmp_path / "out", x, seeds, settings={"weights": "ema"})
    out = tmp_path / "out"
    expected_files = ["000000/000000.png", "000000/000007.png", "000000/000999.png", "001000/001000.png",
                      "001000/001234.png"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("0*/*.png")) == expected_files
    want = _edm_uint8(x)
    for i, seed in enumerate(seeds):
        with Image.open(sample_path(out, int(seed))) as im:
            assert im.mode == "RGB" and im.size == (4, 5)
            np.testing.assert_array_equal(np.asarray(im), want[i])
    with np.load(paths["npz"]) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 5, 4, 3)
        np.testing.assert_array_equal(f["arr_0"], want)
        np.testing.assert_array_equal(f["seeds"], seeds)
        assert "labels" not in f
    record = json.loads(paths["json"].read_text())
    assert record["seeds"] == seeds.tolist() and record["labels"] is None
    assert record["shape"] == [3, 5, 4] and record["settings"] == {"weights": "ema"}
    with Image.open(paths["grid"]) as g:          # 5 images → 3 columns × 2 rows, enlarged 32 // 5 = 6×, 6 px gaps
        assert g.size == (3 * 4 * 6 + 2 * 6, 2 * 5 * 6 + 6)
        grid = np.asarray(g)
        np.testing.assert_array_equal(grid[:30:6, :24:6], want[0])               # tile 0, pixel for pixel
        assert (grid[:, 24:30] == 255).all() and (grid[30:36] == 255).all()     # the gaps between tiles: white


def test_grey_samples_are_mode_l_and_one_hot_labels_become_indices(tmp_path):
    x = _images(np.random.default_rng(1), 3, 1)
    one_hot = np.eye(10, dtype=np.float32)[[4, 0, 9]]
    paths = write_samples(tmp_path, x, np.array([10, 11, 12]), one_hot)
    with Image.open(sample_path(tmp_path, 11)) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), _edm_uint8(x)[1, ..., 0])
    with np.load(paths["npz"]) as f:
        assert f["arr_0"].shape == (3, 5, 4, 1)
        np.testing.assert_array_equal(f["labels"], [4, 0, 9])
    assert json.loads(paths["json"].read_text())["labels"] == [4, 0, 9]
    with Image.open(paths["grid"]) as g:
        assert g.mode == "L"


def test_quantisation_matches_edm_at_the_ends_and_middle(tmp_path):
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 1, 5)
    write_samples(tmp_path, x, np.array([3]))
    with Image.open(sample_path(tmp_path, 3)) as im:
        np.testing.assert_array_equal(np.asarray(im)[0], [0, 0, 128, 255, 255])


def test_image_grid_layout_and_gap():
    x = np.stack([np.full((3, 2, 2), v, np.float32) for v in (-1.0, 0.0, 0.5)])
    grid = image_grid(x, ncol=2, gap=1)
    assert grid.shape == (2 * 2 + 1, 2 * 2 + 1, 3) and grid.dtype == np.uint8
    assert (grid[:2, :2] == 0).all() and (grid[:2, 3:] == 128).all() and (grid[3:, :2] == 191).all()
    assert (grid[2] == 255).all() and (grid[3:, 3:] == 255).all()  # gap row and the empty cell: the page's white
    assert image_grid(x).shape == (4, 4, 3)       # near-square default: 2 columns for 3 images


def test_write_samples_rejects_mismatched_inputs(tmp_path):
    x = _images(np.random.default_rng(2), 3, 3)
    with pytest.raises(ValueError, match="3 images but 2 seeds"):
        write_samples(tmp_path, x, np.array([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        write_samples(tmp_path, x, np.arange(3), np.array([1, 2]))
    with pytest.raises(ValueError, match=r"\(N, 1\|3, H, W\)"):
        write_samples(tmp_path, x[:, :2], np.arange(3))
    assert not any(tmp_path.iterdir())


def test_class_indices_accepts_indices_and_none():
    assert class_indices(None) is None
    np.testing.assert_array_equal(class_indices(np.array([2, 0])), [2, 0])
