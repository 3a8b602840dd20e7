"""Memorisation: is a synthetic image a copy of a real TRAINING image?

For each synthetic image s, find its nearest training image t in feature space,
and compare that distance with how far t is from its own nearest other
training image t':

    ratio(s) = d(s, t) / d(t, t')

The ratio is scale-free: it asks "is s closer to t than the training set's own
spacing around t?". An exact or near copy (after PNG round trip and resizing)
has a ratio of ~0; a new image drawn from the same distribution as the training
set has a ratio around 1 (for held-out real images about half fall below 1,
by symmetry). A synthetic image is a SUSPECTED COPY when

    ratio(s) < MEMORIZATION_THRESHOLD = 1/3

i.e. it is at least three times closer to a training image than that image's
nearest neighbour is. The threshold was checked on real data
(BENCHMARKS.md): none of the 400 held-out real RetinaMNIST
test images falls under it (smallest ratio 0.54 with ResNet20 features, 0.65
in pixel space), while exact copies sit at 0. It is a screening rule in the spirit of the
authenticity test of Alaa et al. (ICML 2022, which uses 1) and of Meehan
et al.'s data-copying test; look at the grid of closest pairs before calling
anything a copy. Duplicates inside the training set (d(t, t') = 0) give ratio 0
for an exact copy and +inf otherwise.

Example:
    >>> report = memorization(train_features, synthetic_features)
    >>> report["suspected_share"], report["closest"][:5]   # indices of the 5 most copy-like
"""

import numpy as np

from Metrics.distribution import _as_features, nearest_neighbours

MEMORIZATION_THRESHOLD = 1.0 / 3.0


def copy_ratios(train_features, synthetic_features):
    """Per synthetic row: (ratio, index of the nearest training row, d(s, t), d(t, t'))."""
    train = _as_features(train_features, "train_features")
    synthetic = _as_features(synthetic_features, "synthetic_features")
    if len(train) < 2:
        raise ValueError("memorisation needs at least 2 training feature vectors")
    d_syn, nearest = nearest_neighbours(synthetic, train, k=1)
    d_train, _ = nearest_neighbours(train, train, k=1, exclude_self=True)
    d_syn, nearest = d_syn[:, 0], nearest[:, 0]
    spacing = d_train[nearest, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(spacing > 0, d_syn / spacing, np.where(d_syn > 0, np.inf, 0.0))
    return ratio, nearest, d_syn, spacing


def memorization(train_features, synthetic_features, threshold=MEMORIZATION_THRESHOLD, num_closest=16):
    """Summary of `copy_ratios`: share of suspected copies and the most copy-like pairs.

    Returns a dict with
        threshold, num_synthetic, num_suspected, suspected_share,
        ratio_min / ratio_p01 / ratio_p05 / ratio_median (quantiles of the ratio),
        closest: the `num_closest` synthetic indices with the smallest ratios,
        closest_train: their nearest training indices, closest_ratio: their ratios,
        ratios, nearest_train: the full per-image arrays (NumPy; drop them before saving JSON).
    """
    ratio, nearest, _, _ = copy_ratios(train_features, synthetic_features)
    suspected = ratio < threshold
    order = np.argsort(ratio, kind="stable")[:num_closest]
    finite = ratio[np.isfinite(ratio)]
    quantile = (lambda q: float(np.quantile(finite, q))) if len(finite) else (lambda q: float("inf"))
    return {
        "threshold": float(threshold),
        "num_synthetic": int(len(ratio)),
        "num_suspected": int(suspected.sum()),
        "suspected_share": float(suspected.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_p01": quantile(0.01),
        "ratio_p05": quantile(0.05),
        "ratio_median": quantile(0.5),
        "closest": order.tolist(),
        "closest_train": nearest[order].tolist(),
        "closest_ratio": ratio[order].tolist(),
        "ratios": ratio,
        "nearest_train": nearest,
    }
