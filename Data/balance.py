"""Class balance: how many images of each class a set of N images holds.

The one rule, used by generation (generate_dataset.py), tuning trials and
synthetic subsets (classifier_training.py --take): N // C images per class,
one more for each of the first N % C classes. Because the counts never fall
when N grows, any subset of a balanced set of N images asked for with
n <= N finds enough images in every class.

Example:
    >>> per_class_counts(7, 3)
    [3, 2, 2]
    >>> balanced_labels(7, 3).tolist()
    [0, 0, 0, 1, 1, 2, 2]
"""

import numpy as np


def per_class_counts(total, num_classes):
    """[total // C + (c < total % C) for each class c]."""
    base, extra = divmod(int(total), int(num_classes))
    return [base + (c < extra) for c in range(num_classes)]


def balanced_labels(total, num_classes):
    """`total` integer labels, sorted, with `per_class_counts` of each class."""
    return np.repeat(np.arange(num_classes), per_class_counts(total, num_classes)).astype(np.int64)


def stratified_subset(labels, n, seed=0):
    """Indices (sorted) of `n` of `labels`, every class kept in its share, drawn with `seed`.

    Class c gets round-down n * share_c images, the leftover ones going to the classes with
    the largest remainders (ties: the lower label); at least one image per class present.
    The same (labels, n, seed) always gives the same indices.

    Example:
        >>> stratified_subset(np.array([0, 0, 0, 0, 1, 1]), 3).size
        3
    """
    labels = np.asarray(labels).reshape(-1)
    classes, sizes = np.unique(labels, return_counts=True)
    n = int(n)
    if not len(classes) <= n <= len(labels):
        raise ValueError(f"a stratified subset of {len(labels)} images in {len(classes)} classes needs "
                         f"{len(classes)} to {len(labels)} images, not {n}")
    exact = n * sizes / len(labels)
    counts = np.maximum(np.floor(exact).astype(np.int64), 1)
    order = np.lexsort((classes, -(exact - np.floor(exact))))  # largest remainder first
    for i in _cycle(order, lambda i: counts.sum() < n and counts[i] < sizes[i], lambda: counts.sum() < n):
        counts[i] += 1
    for i in _cycle(order[::-1], lambda i: counts[i] > 1, lambda: counts.sum() > n):  # the one-per-class floor
        counts[i] -= 1
    rng = np.random.default_rng(int(seed))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, counts)]
    return np.sort(np.concatenate(chosen))


def _cycle(order, eligible, more):
    """The eligible entries of `order`, round and round, while `more()` holds."""
    while more():
        for i in order:
            if not more():
                return
            if eligible(i):
                yield i
