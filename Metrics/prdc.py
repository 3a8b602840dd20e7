"""Precision, recall, density and coverage (Naeem et al., ICML 2020).

Each real sample X_i gets a ball of radius NND_k(X_i), the distance to its k-th
nearest other real sample; each fake Y_j a ball of radius NND_k(Y_j) among the
fakes. With N real and M fake samples:

    precision = 1/M  Σ_j 1[Y_j inside some real ball]                  (realism)
    recall    = 1/N  Σ_i 1[X_i inside some fake ball]                  (variety)
    density   = 1/(kM) Σ_j Σ_i 1[Y_j inside the ball of X_i]           (realism, robust to outliers; can exceed 1)
    coverage  = 1/N  Σ_i 1[the nearest fake to X_i is inside its ball] (representation)

"Inside" is the strict `d < radius`, as in the authors' code (`prdc` package).
Distances are Euclidean in feature space and computed block by block, so memory
stays O(block x N) however many samples there are.

Example:
    >>> scores = precision_recall_density_coverage(real_features, fake_features, k=5)
    >>> scores["precision"], scores["coverage"]
"""

import numpy as np

from Metrics.distribution import BLOCK_ROWS, _as_features, nearest_neighbours, pairwise_distances


def knn_radii(features, k):
    """Distance from each row to its k-th nearest OTHER row of the same set."""
    distances, _ = nearest_neighbours(features, features, k=k, exclude_self=True)
    return distances[:, -1]


def precision_recall_density_coverage(real_features, fake_features, k=5, block_rows=BLOCK_ROWS):
    """Returns {"precision", "recall", "density", "coverage", "k"}; see the module docstring."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall/density/coverage with k={k} need more than {k} "
                         f"samples per set (got {len(real)} real, {len(fake)} fake)")
    real_radii = knn_radii(real, k)
    fake_radii = knn_radii(fake, k)

    in_real_ball_count = np.zeros(len(fake), dtype=np.int64)  # per fake: how many real balls hold it
    real_in_fake_ball = np.zeros(len(real), dtype=bool)       # per real: inside some fake ball
    nearest_fake = np.full(len(real), np.inf)                 # per real: distance to its nearest fake
    for start in range(0, len(fake), block_rows):
        stop = start + block_rows
        d = pairwise_distances(fake[start:stop], real)  # (block, N)
        in_real_ball_count[start:stop] = (d < real_radii[None, :]).sum(axis=1)
        real_in_fake_ball |= (d < fake_radii[start:stop, None]).any(axis=0)
        np.minimum(nearest_fake, d.min(axis=0), out=nearest_fake)

    return {
        "precision": float((in_real_ball_count > 0).mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(in_real_ball_count.sum() / (k * len(fake))),
        "coverage": float((nearest_fake < real_radii).mean()),
        "k": int(k),
    }
