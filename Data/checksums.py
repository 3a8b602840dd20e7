"""Is this the real dataset? Checks of the decoded content, not of the file's bytes.

A file's MD5 changes when the same data is recompressed or re-saved (Debian's
Fashion-MNIST package, a MedMNIST npz saved again with labels shaped (N,)
instead of (N, 1)), so a present file is judged by what it decodes to:

1. the content digest: SHA-256 of each split's images and labels
   (`content_digest`: dtype, shape and bytes of the uint8 images as the file
   stores them, labels as int64 (N,)), compared with the registry's
   `CONTENT_DIGESTS` when the dataset has them;
2. otherwise (and always first) the structure: the splits present, image dtype
   and shape, the official split sizes (`DatasetSpec.file_sizes`) and the label
   range.

A structure mismatch is always refused. A structure match with a different
digest (a modified or different release) is refused unless the user passes
`--accept_unverified_data`, and the acceptance is recorded
(`Verification.status == "unverified"`) in results files, manifests and reports.
Downloads are still checked against the official file MD5 before they are
renamed into place (`Data/loaders.py`).

Example:
    >>> v = verify_content(spec, "retinamnist.npz", {"train": (x, y), "val": (xv, yv), "test": (xt, yt)})
    >>> v.status
    'digest'
"""

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from Data.errors import DataError

ACCEPT_FLAG = "--accept_unverified_data"


@dataclass(frozen=True)
class Verification:
    """How the real data was checked.

    status: "digest" (content digest matches the official one), "structure"
        (no digest recorded: keys, shapes, dtypes, sizes and labels checked),
        "unverified" (structure matches, digest differs, accepted by the user),
        "own" (a folder: or tfds: dataset: the user's own data, no reference),
        "embedded" (shipped inside a package: scikit-learn's digits),
        "off" (checks switched off, hand-made test files).
    detail: one line saying what was compared.
    """

    status: str
    detail: str

    def as_dict(self):
        return asdict(self)


def content_digest(array):
    """SHA-256 of an array's dtype, shape and C-order bytes (labels: pass int64 (N,))."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def split_digests(splits):
    """{split: {"images", "labels"}} digests of {split: (images as stored, labels)}."""
    return {split: {"images": content_digest(images),
                    "labels": content_digest(np.asarray(labels).reshape(-1).astype("<i8"))}
            for split, (images, labels) in splits.items()}


def verify_content(spec, path, splits, accept_unverified=False):
    """Checks decoded `splits` ({split: (images, labels)}, as the file stores them) of `spec`.

    Returns a Verification; raises a one-line DataError naming `path` when the
    structure differs, or when the digest differs and `accept_unverified` is off.
    """
    _check_structure(spec, path, splits)
    expected = spec.content_digests
    sizes = ", ".join(f"{s} {len(labels)}" for s, (_, labels) in splits.items())
    if not expected:
        return Verification("structure", f"{spec.name}: no content digest recorded; structure checked ({sizes})")
    got = split_digests(splits)
    differing = [f"{split} {kind}" for split in expected for kind in ("images", "labels")
                 if got.get(split, {}).get(kind) != expected[split][kind]]
    if not differing:
        return Verification("digest", f"{spec.name}: decoded content matches the official digests ({sizes})")
    what = ", ".join(differing)
    if accept_unverified:
        return Verification("unverified", f"{path}: the structure of {spec.name} but not its official content "
                                          f"({what} differ); accepted with {ACCEPT_FLAG}")
    raise DataError(f"{path} has the structure of {spec.name} but not its official content ({what} differ: "
                    f"a modified or different release); replace it with the official file, or pass "
                    f"{ACCEPT_FLAG} to use it anyway (recorded in the results)")


def _check_structure(spec, path, splits):
    size = spec.image_size
    grey_ok = spec.channels == 1
    for split, (images, labels) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        shape_ok = images.dtype == np.uint8 and images.ndim in (3, 4) and images.shape[1:3] == (size, size) and (
            images.ndim == 3 and grey_ok or images.ndim == 4 and images.shape[-1] in ((1, 3) if grey_ok else (3,)))
        if not shape_ok:
            raise DataError(f"{path}: {split} images are {images.shape} {images.dtype}; {spec.name} has "
                            f"{size}x{size} uint8 images with {spec.channels} channel(s)")
        if labels.size != len(images) or labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
            raise DataError(f"{path}: {split} has {len(images)} images and labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataError(f"{path}: {split} labels {labels.min()}..{labels.max()} do not fit "
                            f"{spec.name}'s {spec.num_classes} classes")
    if spec.file_sizes:
        official = dict(spec.file_sizes)
        got = {split: len(labels) for split, (_, labels) in splits.items()}
        if got != official:
            raise DataError(f"{path}: split sizes {got} differ from {spec.name}'s official {official} "
                            f"(a truncated, partial or different file)")
