"""Inception Score (Salimans et al. 2016) from an extractor's class probabilities.

    IS = exp( E_x [ KL( p(y|x) || p(y) ) ] ),  p(y) = mean of p(y|x) over the split

High when each image gets a confident class and the classes are varied. With
InceptionV3 the classes are ImageNet's (the usual IS); with the ResNet20
extractor they are the dataset's own classes (a "domain IS": its maximum is the
number of classes). The probabilities are split into `splits` consecutive parts
and the score is averaged over them, as in the original code; shuffle beforehand
if the rows are sorted by class.

Example:
    >>> probs = extractor(images).probabilities        # (n, num_classes), rows sum to 1
    >>> mean, std = inception_score(probs, splits=10)
"""

import numpy as np

# log(0) guard: a class with probability 0 contributes 0 * log(0) = 0.
EPS = 1e-12


def inception_score(probabilities, splits=10):
    """Returns (mean, standard deviation) of the Inception Score over `splits` parts."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probabilities must be a non-empty (n, classes) matrix, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probabilities must be non-negative rows summing to 1 (softmax outputs)")
    splits = max(1, min(int(splits), len(p)))
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + EPS) - np.log(marginal + EPS))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
