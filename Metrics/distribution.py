"""Distances between two sets of image embeddings: FID, KID and Gaussian-kernel MMD².

All functions take feature matrices (n, d) as NumPy arrays and compute in
float64: the Fréchet distance subtracts large, nearly equal traces, and float32
loses the answer for sets that are close.

Example:
    >>> real, fake = extractor(real_images).features, extractor(fake_images).features
    >>> fid = frechet_distance_from_features(real, fake)
    >>> kid_mean, kid_std = kernel_inception_distance(real, fake, num_subsets=100, subset_size=1000)
    >>> mmd2, bandwidth = gaussian_mmd2(real, fake)

The pairwise-distance helpers at the end (`pairwise_distances`,
`nearest_neighbours`) are shared with the k-nearest-neighbour metrics
(`Metrics.prdc`, `Metrics.memorization`).
"""

import warnings

import numpy as np
import scipy.linalg

# Rows per block when a kernel or distance matrix would not fit in memory at once.
BLOCK_ROWS = 2048


def _as_features(x, name="features"):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


# --------------------------------------------------------------------------- FID
def feature_statistics(features):
    """Mean vector and covariance matrix (unbiased, n - 1) of a (n, d) feature matrix."""
    features = _as_features(features)
    if len(features) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

        d² = |mu1 - mu2|² + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))

    The matrix square root is scipy's `sqrtm`. Two numerical cares, as in the
    reference FID implementations: when the product is singular or
    ill-conditioned (fewer samples than dimensions, as in small per-class
    sets) `sqrtm` can return non-finite values or a wrong root, so we retry
    with `eps` added to both diagonals; and round-off gives the root small
    imaginary parts, which we drop (a warning says so if they are not small).
    Cost: on 2048-d (InceptionV3) features one `sqrtm` takes about a minute on
    a 2-core CPU; the retry, when needed, another.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched shapes: {mu1.shape} / {mu2.shape}, {sigma1.shape} / {sigma2.shape}")

    diff = mu1 - mu2
    product = sigma1 @ sigma2
    covmean = _sqrtm(product)
    if not np.isfinite(covmean).all() or _sqrtm_error(covmean, product) > 1e-3:
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > 1e-3:
            warnings.warn(f"Fréchet distance: sqrtm left imaginary parts up to {largest:.3g}; "
                          "using the real part (too few samples for the feature dimension?)")
        covmean = covmean.real
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    # Round-off can take a true 0 slightly below zero.
    return float(max(distance, 0.0))


def _sqrtm_error(root, matrix):
    """|root² - matrix|_F / |matrix|_F: sqrtm's own error estimate (a return value before SciPy 1.16)."""
    return np.linalg.norm(root @ root - matrix) / max(np.linalg.norm(matrix), 1e-300)


def _sqrtm(matrix):
    """scipy's sqrtm without its singular-matrix warning: the caller checks the result itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def frechet_distance_from_features(features1, features2, eps=1e-6):
    """FID when the features are InceptionV3 pool features; the same formula for any extractor."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2), eps=eps)


# --------------------------------------------------------------------------- KID
def polynomial_kernel(x, y, degree=3, coef0=1.0):
    """k(x, y) = (x·y / d + coef0) ** degree, the kernel of the kernel inception distance."""
    base = x @ y.T / x.shape[1] + coef0
    if int(degree) != degree or degree < 1:
        return base ** degree
    out = base.copy()
    for _ in range(int(degree) - 1):  # repeated products: several times faster than a float power
        out *= base
    return out


def mmd2_unbiased(k_xx, k_yy, k_xy):
    """Unbiased MMD² from the three kernel matrices (Gretton et al. 2012, eq. 3).

    The diagonals of k_xx and k_yy (a sample compared with itself) are left out.
    """
    m, n = len(k_xx), len(k_yy)
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD² needs at least 2 samples per set")
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(features1, features2, num_subsets=100, subset_size=1000, seed=0):
    """KID (Bińkowski et al. 2018): unbiased MMD² with the cubic kernel, over random subsets.

    Each of `num_subsets` rounds draws `subset_size` rows from each set (without
    replacement; fewer when a set is smaller) and computes the unbiased MMD².
    Returns (mean, standard deviation) over the rounds. Same seed, same subsets.
    """
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    size = min(int(subset_size), len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    rng = np.random.default_rng(seed)
    values = np.empty(int(num_subsets))
    for i in range(int(num_subsets)):
        xs = x[rng.choice(len(x), size, replace=False)]
        ys = y[rng.choice(len(y), size, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys))
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------- Gaussian MMD²
def median_bandwidth(features1, features2, max_points=1000, seed=0):
    """The median heuristic: median Euclidean distance between distinct points of the pooled sets.

    Computed on at most `max_points` pooled rows drawn at random (seeded): the
    median of ~500,000 distances is stable, and the full set would cost O(n²).
    """
    pooled = np.concatenate([_as_features(features1), _as_features(features2)])
    if len(pooled) > max_points:
        pooled = pooled[np.random.default_rng(seed).choice(len(pooled), max_points, replace=False)]
    distances = pairwise_distances(pooled, pooled)
    upper = distances[np.triu_indices(len(pooled), k=1)]
    return float(np.median(upper))


def _kernel_sum(x, y, kernel, exclude_diagonal=False):
    """Sum of kernel(x, y) over all pairs, block by block (bounded memory)."""
    total = 0.0
    for start in range(0, len(x), BLOCK_ROWS):
        block = kernel(x[start:start + BLOCK_ROWS], y)
        if exclude_diagonal:
            rows = np.arange(block.shape[0])
            block[rows, start + rows] = 0.0
        total += block.sum()
    return total


def gaussian_mmd2(features1, features2, bandwidth=None, seed=0):
    """Unbiased MMD² with the Gaussian kernel k(x, y) = exp(-|x - y|² / (2 bandwidth²)).

    bandwidth: None takes the median heuristic (`median_bandwidth`). Every pair
    of the two full sets is used (blockwise, O(n²) time, bounded memory).
    Returns (mmd2, bandwidth).
    """
    x, y = _as_features(features1, "features1"), _as_features(features2, "features2")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("the unbiased MMD² needs at least 2 samples per set")
    if bandwidth is None:
        bandwidth = median_bandwidth(x, y, seed=seed)
    # Identical points everywhere: every distance (and so the kernel's scale) is 0.
    bandwidth = float(bandwidth) if bandwidth > 0 else 1.0
    scale = -1.0 / (2.0 * bandwidth ** 2)

    def kernel(a, b):
        return np.exp(scale * pairwise_distances(a, b, squared=True))

    m, n = len(x), len(y)
    term_xx = _kernel_sum(x, x, kernel, exclude_diagonal=True) / (m * (m - 1))
    term_yy = _kernel_sum(y, y, kernel, exclude_diagonal=True) / (n * (n - 1))
    term_xy = _kernel_sum(x, y, kernel) / (m * n)
    return float(term_xx + term_yy - 2.0 * term_xy), bandwidth


# ------------------------------------------------------ shared distance helpers
def pairwise_distances(a, b, squared=False):
    """Euclidean distances between the rows of a (m, d) and b (n, d): an (m, n) float64 matrix."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    np.maximum(sq, 0.0, out=sq)  # round-off can go slightly negative
    return sq if squared else np.sqrt(sq)


def nearest_neighbours(queries, reference, k=1, exclude_self=False, block_rows=BLOCK_ROWS):
    """The k nearest rows of `reference` for every row of `queries`, block by block.

    exclude_self: `queries` IS `reference`, and row i must not count itself
    (by index: an exact duplicate elsewhere in the set still counts, at distance 0).
    Returns (distances (n, k) ascending, indices (n, k)). The returned distances
    are recomputed from the differences, so an exact copy is at exactly 0.
    """
    queries, reference = _as_features(queries, "queries"), _as_features(reference, "reference")
    available = len(reference) - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"asked for {k} nearest neighbours among {available} points")
    all_idx = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block_rows):
        block = pairwise_distances(queries[start:start + block_rows], reference, squared=True)
        if exclude_self:
            rows = np.arange(block.shape[0])
            block[rows, start + rows] = np.inf
        idx = np.argpartition(block, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(block, idx, axis=1), axis=1, kind="stable")
        all_idx[start:start + block_rows] = np.take_along_axis(idx, order, axis=1)
    # Exact distances for the k chosen neighbours (the |a|²+|b|²-2ab form loses precision near 0).
    dists = np.stack([np.linalg.norm(queries - reference[all_idx[:, j]], axis=1) for j in range(k)], axis=1)
    order = np.argsort(dists, axis=1, kind="stable")
    return np.take_along_axis(dists, order, axis=1), np.take_along_axis(all_idx, order, axis=1)
