import numpy as np
import pytest
import torch

from kdm_pipe.metrics import (
    checkerboard_mask,
    feature_stats,
    frechet_distance,
    frechet_distance_between,
    mmd_rbf,
    off_support_fraction,
    paired_errors,
    precision_recall,
    sliced_wasserstein,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --- Fréchet ----------------------------------------------------------------------------------------------------


def test_feature_stats_matches_unbiased_moments():
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    mu, sigma = feature_stats(x)
    xd = x.astype(np.float64)
    centred = xd - xd.mean(0)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, xd.mean(0))
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_full_covariance_against_symmetric_sqrt():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # tr (Σ1Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½: a symmetric route that never calls sqrtm.
    r1 = _psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_on_features_against_torch_eigvals():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    y = 0.7 * rng.standard_normal((300, 16)) + 0.3
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    eig = torch.linalg.eigvals(torch.from_numpy(s1 @ s2))
    tr_sqrt = eig.sqrt().real.sum().item()
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance_between(x, y) == pytest.approx(expected, rel=1e-8)


def test_frechet_self_is_zero_and_shift_adds_squared_norm():
    x = np.random.default_rng(3).standard_normal((500, 8))
    assert abs(frechet_distance_between(x, x)) < 1e-8
    shift = np.arange(8, dtype=np.float64) / 4
    assert frechet_distance_between(x, x + shift) == pytest.approx(shift @ shift, abs=1e-8)


def test_frechet_survives_rank_deficient_covariances():
    x = np.random.default_rng(4).standard_normal((5, 20))  # fewer samples than dimensions
    fd = frechet_distance_between(x, x[::-1] + 1.0)
    assert np.isfinite(fd) and fd == pytest.approx(20.0, abs=1e-3)


def test_frechet_falls_back_to_ridge_when_sqrtm_is_not_finite(monkeypatch):
    import scipy.linalg

    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    a, b = np.array([1.0, 4.0]), np.array([4.0, 1.0])
    fd = frechet_distance(np.zeros(2), np.diag(a), np.ones(2), np.diag(b))
    assert len(calls) == 2
    assert fd == pytest.approx(2.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-5)


# --- sliced Wasserstein -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_1d_shift_equals_mean_gap(p):
    x = np.random.default_rng(5).standard_normal((300, 1))
    assert sliced_wasserstein(x, x + 1.5, n_projections=16, p=p) == pytest.approx(1.5, rel=1e-12)
    assert sliced_wasserstein(np.zeros((1, 1)), np.full((1, 1), -3.0), n_projections=4, p=p) == pytest.approx(3.0)


def test_sliced_wasserstein_zero_for_identical_and_grows_with_shift():
    x = np.random.default_rng(6).standard_normal((400, 5))
    assert sliced_wasserstein(x, x.copy()) == 0.0
    direction = np.ones(5) / np.sqrt(5)
    values = [sliced_wasserstein(x, x + s * direction) for s in (0.5, 1.0, 2.0)]
    assert values[0] < values[1] < values[2]
    # Every projection of a pure shift moves by θ·Δ, and E[(θ·u)²] = 1/d for a random unit θ.
    assert values[2] == pytest.approx(2.0 / np.sqrt(5), rel=0.15)


def test_sliced_wasserstein_unequal_sizes_is_exact_in_1d():
    # Two empirical laws whose W_1 is easy by hand: {0, 1} against {0, 0, 1, 2}.
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [0.0], [1.0], [2.0]])
    # Quantiles: x = 0 on (0, ½], 1 on (½, 1]; y = 0, 0, 1, 2 on quarters → W_1 = ¼·|0−0|+¼·|0−0|+¼·0+¼·1.
    assert sliced_wasserstein(x, y, n_projections=8, p=1) == pytest.approx(0.25)
    assert sliced_wasserstein(x, y, n_projections=8, p=2) == pytest.approx(0.5)
    big = np.random.default_rng(7).standard_normal((1000, 2))
    assert sliced_wasserstein(big, big[:333]) < 0.15


def test_sliced_wasserstein_is_seeded():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((100, 4)), rng.standard_normal((80, 4)) + 1
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    assert sliced_wasserstein(x, y, seed=3) != sliced_wasserstein(x, y, seed=4)


# --- MMD --------------------------------------------------------------------------------------------------------


def test_mmd_near_zero_for_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((600, 3)), rng.standard_normal((500, 3))
    same = mmd_rbf(x, y)
    different = mmd_rbf(x, rng.standard_normal((500, 3)) * 1.5 + 0.5)
    assert abs(same) < 5e-3
    assert different > 0.05
    assert different > 20 * abs(same)


def test_mmd_matches_direct_formula_with_fixed_bandwidth():
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((7, 2)), rng.standard_normal((5, 2)) + 1

    def k(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return np.exp(-d2 / 2.0) + np.exp(-d2 / 8.0)

    kxx, kyy = k(x, x), k(y, y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / 42 + (kyy.sum() - np.trace(kyy)) / 20 - 2 * k(x, y).mean()
    )
    assert mmd_rbf(x, y, bandwidths=[1.0, 2.0]) == pytest.approx(expected, rel=1e-10)


def test_mmd_subsampling_is_seeded():
    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 0.3
    assert mmd_rbf(x, y, max_samples=100, seed=1) == mmd_rbf(x, y, max_samples=100, seed=1)
    assert mmd_rbf(x, y, max_samples=100, seed=1) != mmd_rbf(x, y, max_samples=100, seed=2)


# --- precision / recall -----------------------------------------------------------------------------------------


def _blobs(rng: np.random.Generator, centres: np.ndarray, per_blob: int) -> np.ndarray:
    return np.concatenate([c + 0.1 * rng.standard_normal((per_blob, centres.shape[1])) for c in centres])


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(12).standard_normal((300, 4))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(x, x + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_mode_dropping():
    rng = np.random.default_rng(13)
    centres = 10.0 * np.eye(4)
    real = _blobs(rng, centres, 200)
    fake = real[:400]  # only the first two of four modes
    pr = precision_recall(real, fake)
    assert pr["precision"] == 1.0
    assert pr["recall"] == pytest.approx(0.5, abs=0.02)


def test_precision_recall_subsamples_large_sets():
    rng = np.random.default_rng(14)
    real, fake = rng.standard_normal((1500, 3)), rng.standard_normal((1200, 3))
    pr = precision_recall(real, fake, max_samples=500, seed=0)
    assert pr == precision_recall(real, fake, max_samples=500, seed=0)
    assert pr["precision"] > 0.8 and pr["recall"] > 0.8


# --- paired errors ----------------------------------------------------------------------------------------------


def test_paired_errors_hand_computed():
    teacher = np.zeros((2, 4))
    student = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    # per-sample MSE: 1 and 1; MAE over all entries: 6/8.
    out = paired_errors(student, teacher)
    assert out["mse"] == pytest.approx(1.0)
    assert out["rmse"] == pytest.approx(1.0)
    assert out["mae"] == pytest.approx(0.75)
    assert out["psnr"] == pytest.approx(10 * np.log10(4.0))

    student = np.array([[0.1, 0.1], [0.0, 0.0]])
    out = paired_errors(student, np.zeros((2, 2)), data_range=1.0)
    # sample 0: mse 0.01 → 20 dB; sample 1: exact → clipped at 1e-12 → 120 dB.
    assert out["mse"] == pytest.approx(0.005)
    assert out["rmse"] == pytest.approx(np.sqrt(0.005))
    assert out["psnr"] == pytest.approx(70.0)


def test_paired_errors_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        paired_errors(np.zeros((3, 2)), np.zeros((2, 3)))


# --- checkerboard -----------------------------------------------------------------------------------------------


def test_checkerboard_square_centres():
    size, extent = 4, 2.0
    w = 2 * extent / size
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    centres = np.stack([-extent + (i.ravel() + 0.5) * w, -extent + (j.ravel() + 0.5) * w], axis=1)
    mask = checkerboard_mask(centres, size=size, extent=extent)
    np.testing.assert_array_equal(mask, (i.ravel() + j.ravel()) % 2 == 0)
    assert mask.sum() == 8
    # The lower-left square is black, its right neighbour is white.
    assert checkerboard_mask(np.array([[-1.5, -1.5], [-0.5, -1.5], [0.5, 0.5], [1.5, -0.5]])).tolist() == [
        True,
        False,
        True,
        True,
    ]


def test_checkerboard_outside_and_other_sizes():
    outside = np.array([[-2.5, -1.5], [2.5, 0.5], [0.5, 3.0], [-1.5, -2.01], [2.0, -1.5]])
    assert not checkerboard_mask(outside).any()
    assert checkerboard_mask(np.array([[-2.0, -2.0]])).tolist() == [True]
    # 2×2 board on [−1, 1)²: black squares are lower-left and upper-right.
    pts = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    assert checkerboard_mask(pts, size=2, extent=1.0).tolist() == [True, False, False, True]


def test_off_support_fraction():
    pts = np.array([[-1.5, -1.5], [-0.5, -1.5], [5.0, 5.0], [0.5, 0.5]])
    assert off_support_fraction(pts) == pytest.approx(0.5)
    assert off_support_fraction(pts, size=2, extent=1.0) == pytest.approx(0.75)
