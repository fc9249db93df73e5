"""import: pair sets in the official KDM, GET and plain-array layouts round-trip into verified shards; a set whose
x_T is not noise at σ_max is refused before anything is written."""

import itertools

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdm_pipe.config import ConfigError, ImportConfig
from kdm_pipe.integrity import verify
from kdm_pipe.loader import batches
from kdm_pipe.manifest import load_manifest
from kdm_pipe.shards import read_shard
from stages import import_pairs

N, SHAPE, CLASSES = 40, (3, 8, 8), 10


def image_pairs(n=N, seed=0):
    """EDM-like pairs: x_T = 80·z, x_0 in [−1, 1], int class labels."""
    rng = np.random.default_rng(seed)
    return 80 * rng.standard_normal((n, *SHAPE)), rng.uniform(-1, 1, (n, *SHAPE)), rng.integers(0, CLASSES, n)


def read_all(out):
    recs = [r for s in load_manifest(out).shards for r in read_shard(out / s.name)]
    return {k: np.concatenate([r[k] for r in recs]) for k in recs[0]}


def run(tmp_path, name="out", **kw):
    return import_pairs.run(ImportConfig(out=tmp_path / name, pairs_per_shard=16, batch=5, **kw), progress=False)


def check_round_trip(out, x_T, x_0, labels=None, sigma_max=80.0):
    m = load_manifest(out)
    got = read_all(out)
    assert verify(out) == {}
    assert m.num_pairs == len(x_0) and [s.pairs for s in m.shards] == [13, 13, 14]   # balanced, ≤ 16 each
    assert m.teacher["name"] == "imported" and m.sigma_max == sigma_max and m.shape == list(x_0.shape[1:])
    assert got["seed"].tolist() == list(range(len(x_0)))                             # source order, natural sort
    np.testing.assert_array_equal(got["x_T"], x_T.astype(np.float32))
    np.testing.assert_array_equal(got["x_0"], x_0.astype(np.float32))
    if labels is None:
        assert "label" not in got and m.label_dim == 0
    else:
        assert m.label_dim == CLASSES and got["label"].argmax(1).tolist() == labels.tolist()
        assert (got["label"].sum(1) == 1).all()


# The official layouts (docs/METHOD.md): CIFAR uncond `arr_0` = x_T … x_0 (a trajectory); FFHQ/AFHQ `arr_0` =
# [x_0, x_T]; CIFAR cond `endpoints` = [x_0, x_T] + one-hot `label`. float64, one file per pair.
LAYOUTS = {
    "cifar-uncond": lambda x_T, x_0, y: {"arr_0": np.stack([x_T, (x_T + x_0) / 2, x_0])},
    "ffhq": lambda x_T, x_0, y: {"arr_0": np.stack([x_0, x_T])},
    "cifar-cond": lambda x_T, x_0, y: {"endpoints": np.stack([x_0, x_T]), "label": np.eye(CLASSES)[y]},
}


def write_npz_folder(folder, layout, x_T, x_0, y):
    folder.mkdir()
    for i in range(len(x_0)):      # 0.npz … 39.npz: natural order differs from sorted strings
        np.savez(folder / f"{i}.npz", **LAYOUTS[layout](x_T[i], x_0[i], y[i]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kdm_npz_layouts_round_trip(tmp_path, layout):
    x_T, x_0, y = image_pairs()
    write_npz_folder(tmp_path / "src", layout, x_T, x_0, y)
    m = run(tmp_path, format="kdm-npz", src=tmp_path / "src")
    assert m.source["order"] == ("xT-first" if layout == "cifar-uncond" else "x0-first")
    check_round_trip(tmp_path / "out", x_T, x_0, y if layout == "cifar-cond" else None)


def test_wrong_order_is_refused_and_nothing_written(tmp_path):
    x_T, x_0, y = image_pairs()
    write_npz_folder(tmp_path / "src", "ffhq", x_T, x_0, y)
    with pytest.raises(ConfigError, match=r"std\(x_T\)=0\.5.*std\(x_0\)=8.*look swapped; pass --order x0-first"):
        run(tmp_path, format="kdm-npz", src=tmp_path / "src", order="xT-first")
    assert not (tmp_path / "out").exists()
    run(tmp_path, format="kdm-npz", src=tmp_path / "src", order="x0-first")
    check_round_trip(tmp_path / "out", x_T, x_0)


def test_wrong_sigma_max_and_noise_on_both_ends_are_refused(tmp_path):
    x_T, x_0, y = image_pairs()
    write_npz_folder(tmp_path / "src", "ffhq", x_T, x_0, y)
    with pytest.raises(ConfigError, match=r"std\(first end\)=0\.5.*std\(last end\)=80.*sigma_max=40: neither end "
                                          r"looks like N\(0, sigma_max²\) noise.*--sigma-max"):
        run(tmp_path, format="kdm-npz", src=tmp_path / "src", sigma_max=40)
    write_npz_folder(tmp_path / "noise", "ffhq", x_T, x_T[::-1], y)
    with pytest.raises(ConfigError, match="both ends look like N"):
        run(tmp_path, format="kdm-npz", src=tmp_path / "noise")
    assert not (tmp_path / "out").exists()


def write_get(root, z, x_0, y=None, sizes=(25, 15)):
    """GET's layout: latent/ and image/ files named by their last seed, torch.save'd (cond: [z, one-hot])."""
    for d in ("latent", "image"):
        (root / d).mkdir(parents=True)
    start = 0
    for n in sizes:
        sl, name = slice(start, start + n), f"{start + n - 1:09d}.pkl"
        lat = torch.from_numpy(z[sl]).float()
        torch.save(lat if y is None else [lat, torch.eye(CLASSES)[torch.from_numpy(y[sl])]], root / "latent" / name)
        torch.save(torch.from_numpy(x_0[sl]).float(), root / "image" / name)
        start += n


@pytest.mark.parametrize("cond", [False, True])
def test_get_round_trip(tmp_path, cond):
    x_T, x_0, y = image_pairs()
    z = (x_T / 80).astype(np.float32)
    write_get(tmp_path / "src", z, x_0, y if cond else None)
    run(tmp_path, format="get", src=tmp_path / "src")          # records of 5 cross the file boundary at 25
    check_round_trip(tmp_path / "out", 80 * z.astype(np.float64), x_0.astype(np.float32), y if cond else None)


def test_get_exchanged_folders_refused(tmp_path):
    x_T, x_0, y = image_pairs()
    write_get(tmp_path / "src", x_0.astype(np.float32), (x_T / 80).astype(np.float32))
    with pytest.raises(ConfigError, match="look swapped; latent/ and image/ seem exchanged"):
        run(tmp_path, format="get", src=tmp_path / "src")
    assert not (tmp_path / "out").exists()


def test_npy_two_files_with_labels_and_float16(tmp_path):
    x_T, x_0, y = image_pairs()
    for name, a in (("xT", x_T), ("x0", x_0), ("y", y)):
        np.save(tmp_path / f"{name}.npy", a)
    with pytest.raises(ConfigError, match="look swapped; swap the --x-T and --x-0 files"):
        run(tmp_path, format="npy", x_T=tmp_path / "x0.npy", x_0=tmp_path / "xT.npy")
    assert not (tmp_path / "out").exists()
    m = run(tmp_path, format="npy", x_T=tmp_path / "xT.npy", x_0=tmp_path / "x0.npy", labels=tmp_path / "y.npy",
            label_dim=CLASSES, xT_dtype="float16")
    assert m.dtypes["x_T"] == "float16"
    assert read_all(tmp_path / "out")["x_T"].dtype == np.float16
    check_round_trip(tmp_path / "out", x_T.astype(np.float16), x_0, y)


def checkerboard_stack(n=3000, steps=4, seed=0):
    """(T, N, 2) like the official checkerboard: x_T ~ N(0, I) at index 0, a non-Gaussian x_0 at −1."""
    rng = np.random.default_rng(seed)
    x_T, x_0 = rng.standard_normal((n, 2)), rng.uniform(-3, 3, (n, 2))
    w = np.linspace(0, 1, steps)[:, None, None]
    return ((1 - w) * x_T + w * x_0).astype(np.float32)


def test_npy_stack_round_trip_with_its_own_sigma_max(tmp_path):
    stack = checkerboard_stack(n=40)
    np.save(tmp_path / "cb.npy", stack)
    run(tmp_path, format="npy", src=tmp_path / "cb.npy")
    check_round_trip(tmp_path / "out", stack[0], stack[-1], sigma_max=1.0)
    np.save(tmp_path / "rev.npy", stack[::-1])
    with pytest.raises(ConfigError, match="look swapped; pass --order x0-first"):
        run(tmp_path, "rev", format="npy", src=tmp_path / "rev.npy", order="xT-first")
    m = run(tmp_path, "rev", format="npy", src=tmp_path / "rev.npy")      # auto: the noisy end is x_T
    assert m.source["order"] == "x0-first"
    check_round_trip(tmp_path / "rev", stack[0], stack[-1], sigma_max=1.0)


def test_rerun_is_a_no_op_repairs_and_refuses_other_sources(tmp_path):
    np.save(tmp_path / "cb.npy", checkerboard_stack())
    cfg = ImportConfig(format="npy", src=tmp_path / "cb.npy", out=tmp_path / "out", pairs_per_shard=1000)
    m = import_pairs.run(cfg, progress=False)
    shards = sorted((tmp_path / "out").glob("shard-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    import_pairs.run(cfg, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards} == before
    shards[1].unlink()
    shards[2].write_bytes(b"corrupt")
    assert import_pairs.run(cfg, progress=False).shards == m.shards      # rebuilt, the very same bytes
    assert {p.name: p.read_bytes() for p in shards} == {k: v[1] for k, v in before.items()}
    np.save(tmp_path / "other.npy", checkerboard_stack(seed=1))
    with pytest.raises(ConfigError, match="another import"):
        import_pairs.run(cfg.model_copy(update={"src": tmp_path / "other.npy"}), progress=False)


def test_loader_streams_imported_shards(tmp_path):
    stack = checkerboard_stack(n=300)
    y = np.random.default_rng(2).integers(0, CLASSES, 300)
    np.save(tmp_path / "cb.npy", stack)
    np.save(tmp_path / "y.npy", y)
    m = import_pairs.run(ImportConfig(format="npy", src=tmp_path / "cb.npy", labels=tmp_path / "y.npy",
                                      out=tmp_path / "out", pairs_per_shard=100, batch=32), progress=False)
    seen = []
    for b in itertools.islice(batches(tmp_path / "out", [(s.name, s.pairs) for s in m.shards], 25, 50, 0, 0), 12):
        i = b["seed"].numpy()
        np.testing.assert_array_equal(b["x_T"].numpy(), stack[0][i])
        np.testing.assert_array_equal(b["x_0"].numpy(), stack[-1][i])
        assert b["label"].argmax(1).tolist() == y[i].tolist()
        seen += i.tolist()
    assert sorted(seen) == list(range(300))                                # one epoch: every pair once


def test_config_refuses_mixed_inputs():
    with pytest.raises(ValidationError, match="no SRC"):
        ImportConfig(format="npy", src="a.npy", x_T="b.npy", x_0="c.npy")
    with pytest.raises(ValidationError, match="needs SRC"):
        ImportConfig(format="kdm-npz")
    with pytest.raises(ValidationError, match="--order does not apply"):
        ImportConfig(format="get", src="g", order="x0-first")
    with pytest.raises(ValidationError, match="belong to --format npy"):
        ImportConfig(format="get", src="g", labels="y.npy")


def test_non_finite_source_is_refused(tmp_path):
    x_T, x_0, _ = image_pairs()
    x_0[30, 0, 0, 0] = np.nan
    np.save(tmp_path / "xT.npy", x_T)
    np.save(tmp_path / "x0.npy", x_0)
    with pytest.raises(ConfigError, match="non-finite values among source pairs 0..39"):
        run(tmp_path, format="npy", x_T=tmp_path / "xT.npy", x_0=tmp_path / "x0.npy")
