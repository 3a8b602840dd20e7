"""Colour speckle: the share of pixels whose colour channels disagree.

A grey dataset (MedMNIST's grey sets, scikit-learn digits) is loaded as
3-channel images with R = G = B, so every real image scores exactly 0. A
diffusion model that was pretrained on colour images and decodes through an
RGB autoencoder can leave coloured specks in images meant to be grey; those
pixels have channels that disagree, and the classifier trained on the
generated set sees them although no real test image has any. `speckle_share`
counts them: a pixel is a speck when max(R, G, B) - min(R, G, B) exceeds
`threshold` uint8 levels (default 48, i.e. 48/255 of the range), which ignores
the small channel differences that compression or resizing leave behind.

Example:
    >>> grey = np.repeat(np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1), 3, axis=-1)
    >>> speckle_share(grey)
    0.0
    >>> specked = grey.copy(); specked[0, 0, 0] = (200, 0, 0)
    >>> speckle_share(specked)
    0.0625
"""

import numpy as np

DEFAULT_THRESHOLD = 48


def speckle_share(images, threshold=DEFAULT_THRESHOLD):
    """The share (0..1) of pixels whose channel spread max - min is greater than `threshold`.

    Args:
        images: uint8-range images, (N, H, W, 3) colour, or (N, H, W, 1) /
            (N, H, W) grey (one channel cannot disagree with itself: 0.0).
            Any integer dtype is accepted if every value lies in 0..255;
            floats are refused, since [0, 1] and [0, 255] floats cannot be
            told apart (convert with `Data.images.to_uint8` first).
        threshold: uint8 levels, 0..254; the comparison is strict (a spread
            of exactly `threshold` is not a speck).

    Returns:
        A Python float in [0, 1].

    Raises:
        ValueError: a non-integer dtype, values outside 0..255, an unexpected
            shape, no pixels, or a threshold outside 0..254.

    Example:
        >>> x = np.zeros((2, 8, 8, 3), np.uint8); x[0, 0, :4] = (0, 49, 0)
        >>> speckle_share(x)          # 4 of 128 pixels have spread 49 > 48
        0.03125
    """
    x = np.asarray(images)
    if not (np.issubdtype(x.dtype, np.integer) and x.dtype != np.bool_):
        raise ValueError(f"speckle_share expects uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise ValueError(f"speckle_share expects (N, H, W, 3), (N, H, W, 1) or (N, H, W) images, "
                         f"got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"speckle_share got no pixels (shape {x.shape})")
    if not 0 <= int(threshold) <= 254 or int(threshold) != threshold:
        raise ValueError(f"threshold must be an integer in 0..254 uint8 levels, got {threshold}")
    if x.dtype != np.uint8:
        low, high = x.min(), x.max()
        if low < 0 or high > 255:
            raise ValueError(f"speckle_share expects values in 0..255, got {low}..{high}")
    if x.ndim == 3 or x.shape[-1] == 1:
        return 0.0
    # max >= min, so the uint8 subtraction cannot wrap; staying in uint8 keeps
    # a 50 000-image set at one byte per pixel.
    spread = x.max(axis=-1) - x.min(axis=-1)
    return float(np.count_nonzero(spread > int(threshold)) / spread.size)
