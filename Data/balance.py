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
