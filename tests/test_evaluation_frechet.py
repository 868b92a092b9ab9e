"""Fréchet distance: exact on Gaussians with known parameters, ~0 for a set with itself, and it
separates same-distribution real images from noise on EfficientNet-Lite0 features."""

import numpy as np
import pytest
import scipy.linalg
import torch

from dpdiff.errors import ConfigError, DataError
from dpdiff.evaluation.frechet import (FD_NAME, compute_fd, feature_statistics, frechet_distance, inception_fid, load_statistics,
                                      save_statistics)


def test_diagonal_gaussians_match_closed_form():
    # for diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.25 + 4.0 + 1.0)


def test_invariant_under_a_common_rotation():
    # rotating both Gaussians by the same orthogonal Q must not change the distance
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = np.array([1.0, 2.0, 3.0, 0.5]), np.array([0.5, 0.5, 4.0, 2.0])
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    plain = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(plain, rel=1e-9)


def test_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    d = 40
    x, y = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d)) * 1.5
    s1, s2 = x @ x.T / d, y @ y.T / d
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_rank_deficient_covariances_are_fine():
    # N < dimension (as with a few hundred images and 1280 features): finite, non-negative, and 0 with itself
    rng = np.random.default_rng(2)
    f = rng.normal(size=(10, 50))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    g = rng.normal(size=(10, 50)) + 1.0
    assert np.isfinite(frechet_distance(mu, sigma, g.mean(0), np.cov(g, rowvar=False)))


def test_bad_statistics_are_refused():
    with pytest.raises(DataError, match="same length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DataError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


@pytest.fixture(scope="module")
def extractor():
    from dpdiff.features import load_feature_extractor

    # 64 px input keeps the test fast on one CPU core; the metric is the same function at 224
    return load_feature_extractor("efficientnet_lite0", input_size=64, batch_size=100)


@pytest.fixture(scope="module")
def fashion():
    from dpdiff.data import load_source
    from dpdiff.data.transforms import images_to_tensor

    src = load_source("fashion_mnist", split="train", limit=400, seed=0)
    return images_to_tensor(src.dataset["image"], resolution=28, channels=1)


def test_saved_statistics_round_trip_only_under_their_own_key(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma, key = rng.normal(size=5), np.cov(rng.normal(size=(20, 5)), rowvar=False), {"real": "x", "num_images": 20}
    path = tmp_path / "stats.npz"
    assert load_statistics(path, key) is None
    save_statistics(path, key, mu, sigma)
    loaded = load_statistics(path, dict(reversed(key.items())))  # the order of the keys does not matter
    assert np.array_equal(loaded[0], mu) and np.array_equal(loaded[1], sigma)
    with pytest.raises(ConfigError, match="num_images: saved 20, now 30"):
        load_statistics(path, {**key, "num_images": 30})
    path.write_bytes(b"not an npz")
    with pytest.raises(ConfigError, match="not a feature-statistics file"):
        load_statistics(path, key)


def test_same_set_is_zero_and_same_distribution_beats_noise(extractor, fashion):
    set_a, set_b = fashion[:200], fashion[200:]
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mu_a, sigma_a = feature_statistics(set_a, extractor)
    mu_b, sigma_b = feature_statistics(set_b, extractor)
    mu_n, sigma_n = feature_statistics(noise, extractor)
    self_fd = frechet_distance(mu_a, sigma_a, mu_a, sigma_a)
    real_real = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    real_noise = frechet_distance(mu_a, sigma_a, mu_n, sigma_n)
    assert self_fd < 1e-6 * real_real
    # measured 1074 vs 5704 (N = 200 per side biases real-real upwards)
    assert real_real * 3 < real_noise, (real_real, real_noise)


def test_compute_fd_states_counts_and_preprocessing(extractor, fashion):
    out = compute_fd(fashion[:50], fashion[50:110], extractor, real_split="test")
    assert out["metric"] == FD_NAME and "FID" not in out["description"]
    assert out["description"] == f"{FD_NAME}, 50 real (test) vs 60 synthetic, 28x28 grey -> 64 bilinear"
    assert out["value"] > 0
    with pytest.raises(DataError, match="differ in format"):
        compute_fd(fashion[:10], torch.zeros(10, 3, 28, 28), extractor)


def test_inception_fid_without_torchmetrics_says_what_to_install():
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchmetrics is installed here; the message is for installs without it")
    with pytest.raises(ConfigError, match="pip install torchmetrics torch-fidelity"):
        inception_fid(torch.zeros(4, 1, 28, 28), torch.zeros(4, 1, 28, 28))
