"""Known answers for the quality metrics: FID, KID, Gaussian MMD², IS, PRDC, memorisation.

Each metric is checked against a closed form, a hand computation or a direct
O(n²) loop written independently of the implementation.
"""

import itertools

import numpy as np
import pytest

from Metrics.distribution import (feature_statistics, frechet_distance, frechet_distance_from_features,
                                  gaussian_mmd2, kernel_inception_distance, median_bandwidth, mmd2_unbiased,
                                  nearest_neighbours, pairwise_distances, polynomial_kernel)
from Metrics.inception_score import inception_score
from Metrics.memorization import MEMORIZATION_THRESHOLD, copy_ratios, memorization
from Metrics.prdc import knn_radii, precision_recall_density_coverage
from tests.conftest import require_shared_file


def _psd_sqrt(matrix):
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, s1, mu2, s2):
    """The Fréchet distance by the symmetric form Tr((S1^½ S2 S1^½)^½), eigen-decompositions only."""
    root = _psd_sqrt(s1)
    middle = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def _random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------- FID
def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 32))
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance_from_features(x, x + 0.5) == pytest.approx(32 * 0.25, rel=1e-6)  # a pure shift


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    # Diagonal covariances: |mu1 - mu2|² + Σ (√a - √b)².
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # General (non-commuting) covariances against the symmetric eigen form.
    s1, s2 = _random_covariance(rng, 8), _random_covariance(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_reference(mu1, s1, mu2, s2), rel=1e-7)


def test_fid_of_two_gaussian_samples_approaches_the_analytic_distance():
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=100_000)
    y = rng.multivariate_normal(mu2, s2, size=100_000)
    analytic = _frechet_reference(mu1, s1, mu2, s2)
    assert frechet_distance_from_features(x, y) == pytest.approx(analytic, rel=0.02)


def test_fid_with_fewer_samples_than_dimensions_stays_finite():
    """Small per-class sets: singular covariances go through the eps retry, not NaN."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 40)), rng.normal(size=(15, 40))
    value = frechet_distance_from_features(x, y)
    assert np.isfinite(value) and value > 0
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    assert value == pytest.approx(_frechet_reference(mu1, s1, mu2, s2), rel=1e-4)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------- KID
def _direct_unbiased_mmd2(x, y, kernel):
    """Gretton et al.'s unbiased estimator as a plain double loop."""
    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(25, 5)), rng.normal(0.3, 1.2, size=(31, 5))
    d = x.shape[1]
    cubic = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    # The estimator itself, sets of different sizes.
    expected = _direct_unbiased_mmd2(x, y, cubic)
    got = mmd2_unbiased(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))
    assert got == pytest.approx(expected, rel=1e-10)
    # KID: one round whose subsets are the whole (equal-size) sets; the estimator ignores row order.
    expected = _direct_unbiased_mmd2(x, y[:25], cubic)
    mean, std = kernel_inception_distance(x, y[:25], num_subsets=1, subset_size=1000)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == 0.0
    # Subsets are capped at the smaller set: 25 rows of each here.
    mean, _ = kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert np.isfinite(mean)


def test_kid_of_identical_sets_is_near_zero_and_of_different_sets_is_not():
    """Two large identical sets: ~0. (Not exactly: a row drawn into both subsets of a round is
    compared with itself, which the unbiased estimator expects never to happen: a bias of
    -O(overlap / subset_size²), negative.)"""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20000, 16))
    same_mean, same_std = kernel_inception_distance(x, x, num_subsets=20, subset_size=500, seed=0)
    shifted_mean, _ = kernel_inception_distance(x, x + 0.3, num_subsets=20, subset_size=500, seed=0)
    assert abs(same_mean) < 0.01 * shifted_mean
    assert shifted_mean > 10 * same_std
    # Same seed, same subsets.
    assert kernel_inception_distance(x, x + 0.3, num_subsets=5, subset_size=100, seed=7) == \
        kernel_inception_distance(x, x + 0.3, num_subsets=5, subset_size=100, seed=7)


# ------------------------------------------------------- Gaussian MMD²
def test_gaussian_mmd2_matches_a_direct_computation():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(24, 3))
    bandwidth = 1.7
    expected = _direct_unbiased_mmd2(x, y, lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * bandwidth ** 2)))
    value, used = gaussian_mmd2(x, y, bandwidth=bandwidth)
    assert used == bandwidth
    assert value == pytest.approx(expected, rel=1e-10)


def test_median_bandwidth_is_the_median_pairwise_distance():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(20, 4))
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(pooled[i] - pooled[j]) for i, j in itertools.combinations(range(50), 2)]
    assert median_bandwidth(x, y) == pytest.approx(np.median(distances), rel=1e-9)
    # Identical sets score ~0, a shifted set clearly more.
    big = rng.normal(size=(2000, 8))
    same, _ = gaussian_mmd2(big[:1000], big[1000:])
    shifted, _ = gaussian_mmd2(big[:1000], big[1000:] + 0.5)
    assert abs(same) < 2e-3 and shifted > 20 * abs(same)


# -------------------------------------------------------------------- IS
def test_inception_score_known_values():
    one_hot = np.eye(4)[np.arange(400) % 4]
    assert inception_score(one_hot, splits=10)[0] == pytest.approx(4.0, rel=1e-6)   # confident and varied
    assert inception_score(np.eye(4)[np.zeros(400, int)], splits=10)[0] == pytest.approx(1.0)  # one class
    assert inception_score(np.full((400, 4), 0.25), splits=10)[0] == pytest.approx(1.0)   # no confidence
    # Two classes, p(y|x) = (0.9, 0.1) or (0.1, 0.9) half each: exp(KL to (0.5, 0.5)).
    p = np.where(np.arange(200)[:, None] % 2 == 0, [0.9, 0.1], [0.1, 0.9])
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    assert inception_score(p, splits=1) == pytest.approx((np.exp(kl), 0.0), rel=1e-9)
    with pytest.raises(ValueError):
        inception_score(np.ones((3, 4)))  # rows do not sum to 1


# ------------------------------------------------------------------ PRDC
def test_prdc_matches_a_hand_computation():
    """1-D points, k = 1 (worked by hand):

    real  0, 1, 3, 7   radii (to the nearest other real) 1, 1, 2, 4
    fake  0.5, 2.9, 12, 20   radii 2.4, 2.4, 8, 8
    precision: 0.5 (in the balls of 0 and 1) and 2.9 (ball of 3) -> 2/4
    recall: 0, 1 (ball of 0.5), 3 (ball of 2.9), 7 (ball of 12: 5 < 8) -> 4/4
    density: 0.5 is in 2 real balls, 2.9 in 1, 12 and 20 in none -> 3 / (1 * 4)
    coverage: nearest fakes 0.5, 0.5, 2.9, 2.9 at 0.5 < 1, 0.5 < 1, 0.1 < 2, 4.1 > 4 -> 3/4
    """
    real = np.array([0.0, 1.0, 3.0, 7.0])[:, None]
    fake = np.array([0.5, 2.9, 12.0, 20.0])[:, None]
    np.testing.assert_allclose(knn_radii(real, 1), [1, 1, 2, 4])
    np.testing.assert_allclose(knn_radii(fake, 1), [2.4, 2.4, 8, 8])
    scores = precision_recall_density_coverage(real, fake, k=1)
    assert scores == {"precision": 0.5, "recall": 1.0, "density": 0.75, "coverage": 0.75, "k": 1}


def _prdc_by_loops(real, fake, k):
    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    d = [[np.linalg.norm(real[i] - fake[j]) for j in range(len(fake))] for i in range(len(real))]
    n, m = len(real), len(fake)
    return {
        "precision": sum(any(d[i][j] < r_real[i] for i in range(n)) for j in range(m)) / m,
        "recall": sum(any(d[i][j] < r_fake[j] for j in range(m)) for i in range(n)) / n,
        "density": sum(d[i][j] < r_real[i] for i in range(n) for j in range(m)) / (k * m),
        "coverage": sum(min(d[i]) < r_real[i] for i in range(n)) / n,
    }


def test_prdc_matches_the_definitions_block_by_block():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(37, 3)), rng.normal(0.4, 1.3, size=(29, 3))
    expected = _prdc_by_loops(real, fake, k=3)
    got = precision_recall_density_coverage(real, fake, k=3, block_rows=7)  # several blocks
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    # Too few samples for k is an error, not a silent number.
    with pytest.raises(ValueError):
        precision_recall_density_coverage(real[:3], fake, k=3)


def test_nearest_neighbours_excludes_self_by_index_not_by_distance():
    points = np.array([[0.0], [0.0], [5.0], [7.0]])  # rows 0 and 1 are duplicates
    d, idx = nearest_neighbours(points, points, k=1, exclude_self=True, block_rows=3)
    np.testing.assert_array_equal(idx[:, 0], [1, 0, 3, 2])
    np.testing.assert_array_equal(d[:, 0], [0.0, 0.0, 2.0, 2.0])
    np.testing.assert_allclose(pairwise_distances(points, points)[2], [5, 5, 0, 2])


# ----------------------------------------------------------- memorisation
def test_memorization_ratios_by_hand():
    """train 0, 1, 10 (spacings 1, 1, 9); synthetic 0.1 -> 0.1/1, 9 -> 1/9, 10 -> 0, 5 -> 4/1."""
    train = np.array([0.0, 1.0, 10.0])[:, None]
    synthetic = np.array([0.1, 9.0, 10.0, 5.0])[:, None]
    ratio, nearest, d_syn, spacing = copy_ratios(train, synthetic)
    np.testing.assert_allclose(ratio, [0.1, 1 / 9, 0.0, 4.0])
    np.testing.assert_array_equal(nearest, [0, 2, 2, 1])
    report = memorization(train, synthetic, threshold=MEMORIZATION_THRESHOLD)
    assert report["num_suspected"] == 3 and report["suspected_share"] == 0.75
    assert report["closest"][0] == 2 and report["closest_train"][0] == 2


def test_memorization_with_duplicated_training_images():
    train = np.array([0.0, 0.0, 4.0])[:, None]  # a duplicate pair: spacing 0
    ratio, *_ = copy_ratios(train, np.array([0.0, 0.5, 3.0])[:, None])
    assert ratio[0] == 0.0            # an exact copy of the duplicated image
    assert ratio[1] == np.inf         # near it, but the training set itself is denser there
    assert ratio[2] == pytest.approx(1 / 4)


def _write_folder(root, images, labels):
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return root


def test_memorization_flags_copied_retinamnist_images_and_not_fresh_ones(tmp_path):
    """Real images through a PNG folder: 60 copies of TRAIN images are flagged, 60 TEST images are not.

    Pixels are the embedding here (the memorisation rule takes any features);
    the ResNet20 case is in tests/test_evaluate_dataset.py.
    """
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Data.synthetic import load_image_folder

    splits = load_dataset("retinamnist", require_shared_file("retinamnist.npz").parent)
    spec = get_spec("retinamnist")
    rng = np.random.default_rng(0)
    copied = rng.choice(len(splits.x_train), 60, replace=False)
    fresh = rng.choice(len(splits.x_test), 60, replace=False)
    train_pixels = splits.x_train.reshape(len(splits.x_train), -1).astype(np.float64)

    x_copy, _, _ = load_image_folder(_write_folder(tmp_path / "copies", splits.x_train[copied],
                                                   splits.y_train[copied]), spec)
    report = memorization(train_pixels, x_copy.reshape(len(x_copy), -1).astype(np.float64))
    assert report["num_suspected"] == 60
    assert report["ratio_min"] == 0.0 and report["closest_ratio"] == [0.0] * 16
    assert set(report["closest_train"]) <= set(copied.tolist())

    x_fresh, _, _ = load_image_folder(_write_folder(tmp_path / "fresh", splits.x_test[fresh],
                                                    splits.y_test[fresh]), spec)
    report = memorization(train_pixels, x_fresh.reshape(len(x_fresh), -1).astype(np.float64))
    assert report["suspected_share"] <= 0.05
    assert report["ratio_median"] > 0.5
