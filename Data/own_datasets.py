"""Your own data as a dataset: `folder:PATH` (an image folder) and `tfds:NAME` (TensorFlow Datasets).

Every script takes these names wherever it takes a registered one
(`--dataset folder:/data/flowers`, `--dataset tfds:beans`); outputs go to a
safe folder name (`Utils.paths.dataset_folder`: `folder-flowers-1a2b3c4d`,
`tfds-beans`).

folder:PATH
-----------
The layout of `keras.utils.image_dataset_from_directory` / torchvision's
ImageFolder: `PATH/train/<class>/<images>`, optionally `PATH/val/<class>/...`
(or `validation/`) and `PATH/test/<class>/...`; or `PATH/<class>/...` alone
(one split). Classes are the train folder's sub-folders, sorted as Keras sorts
them (Python's `sorted`, so upper case before lower case); label i is the
i-th. Images may be PNG, JPEG, BMP, GIF (first frame), WebP or TIFF, of any
mode and size, also in sub-sub-folders. Hidden files (`.DS_Store`) are
ignored; any other file that is not a readable image, an empty class, or a
val/test class the train folder lacks is one DataError naming the file or
folder: nothing is dropped silently.

Size and channels: the native size when every image has the same square size,
else `--image_size` (required then; it also resizes uniform folders), with the
one antialiased resize (`Data/images.py`; a non-square image is stretched to
the square, not cropped: nothing of it is lost). Channels: 1 when every image is
grey (modes 1, L, LA, I, I;16, F), else 3; loaders return 3 channels either way.

tfds:NAME
---------
`NAME` is a TFDS builder name, optionally `NAME/CONFIG` and `:VERSION`
(`tfds:mnist`, `tfds:cifar10:3.0.2`), read from a data folder where it has
been prepared (`tfds build NAME` or `builder.download_and_prepare()`):
`--data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets. The prepared
folder is opened with `tfds.builder_from_directory`, which reads only the
files there. The usual `tfds.load(name)` would not stay offline: its
`download_and_prepare` asks GCS whether the dataset is hosted there
(`DownloadConfig.try_download_gcs` defaults to True in tfds 4.9, even with
`try_gcs=False`) and then downloads the source files, each with retries. A
missing dataset is therefore found here, from the folder layout alone: one
line within seconds naming what to prepare and where. The builder's image feature and `ClassLabel` (its supervised keys,
else its only Image and ClassLabel features) give the images and
`ClassLabel.names`; its splits `train`, `validation`/`val`, `test` are used.

Missing splits
--------------
When the data has no validation or no test split, each missing one takes a
stratified FOLDER_SPLIT_FRACTION (20 %) of every class's training images (at
least one image when the class has three or more), drawn with the FIXED seed
FOLDER_SPLIT_SEED (not the run's --seed: every run and method sees the same
split). Train only: 60 / 20 / 20 %.

Example:
    >>> splits = load_dataset("folder:/data/flowers", image_size=64)
    >>> splits.spec.label_names
    ('daisy', 'rose', 'tulip')
"""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from Data.errors import DataError, DatasetNotFoundError

FOLDER_PREFIX = "folder:"
TFDS_PREFIX = "tfds:"
FOLDER_SPLIT_SEED = 20240101  # fixed on purpose: the same split for every run
FOLDER_SPLIT_FRACTION = 0.2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
TFDS_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
_MAX_LISTED = 5  # problems named in one error line


def is_own_dataset(name):
    return isinstance(name, str) and name.strip().lower().startswith((FOLDER_PREFIX, TFDS_PREFIX))


def canonical_name(name):
    """`folder:` with the absolute path (the same folder, one name); `tfds:` as written, stripped."""
    name = name.strip()
    prefix, rest = name.split(":", 1)
    prefix = prefix.lower() + ":"
    if not rest.strip():
        raise DataError(f"--dataset {name!r}: give a path after folder: or a name after tfds:")
    if prefix == FOLDER_PREFIX:
        return FOLDER_PREFIX + str(Path(rest).expanduser().resolve())
    if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?", rest.strip()):
        raise DataError(f"--dataset {name!r}: a TFDS name is NAME, NAME/CONFIG or NAME:X.Y.Z (e.g. tfds:mnist)")
    return TFDS_PREFIX + rest.strip()


def own_spec(name, image_size=None, data_dir=None):
    """The DatasetSpec of a canonical `folder:` / `tfds:` name, read from the data."""
    if name.startswith(FOLDER_PREFIX):
        return _folder_spec(name, image_size)
    return _tfds_spec(name, image_size, data_dir)


def read_own_dataset(spec):
    """({x_train, y_train, x_val, ...} arrays, one-line description) of a folder: / tfds: spec.

    The decoded arrays are kept in the data cache (`Utils.paths.dataset_cache_dir`), under a
    fingerprint of the source (every file's path, size and time; the TFDS folder's
    dataset_info.json) and the size: the next stage reads them back instead of decoding again.
    """
    if spec.source == "folder":
        files = _folder_files(Path(spec.location), spec.label_names)
        stamp = [(str(f), label, *_stat(f)) for items in files.values() for f, label in items]
        what = f"image folder {spec.location}"
    else:
        files = None
        stamp = [spec.location, *_stat(Path(spec.location) / "dataset_info.json")]
        what = f"TFDS {spec.name[len(TFDS_PREFIX):]} from {spec.location}"
    cache = _cache_file(spec, stamp)
    arrays, made = _read_cache(cache)
    if arrays is None:
        if files is not None:
            raw = {split: (_decode_files([f for f, _ in items], spec.image_size),
                           np.array([label for _, label in items], np.int64))
                   for split, items in files.items()}
        else:
            raw = _read_tfds(spec)
        splits, made = _complete_splits(raw, spec.num_classes)
        arrays = {f"{kind}_{split}": value for split, (x, y) in splits.items()
                  for kind, value in (("x", x), ("y", y))}
        _write_cache(cache, arrays, made)
    sizes = ", ".join(f"{s} {len(arrays['y_' + s])}" for s in ("train", "val", "test"))
    note = f"; {' and '.join(made)} drawn from train (stratified, seed {FOLDER_SPLIT_SEED})" if made else ""
    return arrays, f"{what}: {sizes}{note}"


def _stat(path):
    info = Path(path).stat()
    return info.st_size, info.st_mtime_ns


def _cache_file(spec, stamp):
    import hashlib

    from Utils.paths import dataset_cache_dir

    key = json.dumps([spec.name, spec.image_size, spec.label_names, FOLDER_SPLIT_SEED, FOLDER_SPLIT_FRACTION,
                      stamp])
    return dataset_cache_dir(spec.name) / f"splits_{spec.image_size}px_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _read_cache(path):
    """(arrays, drawn splits) from the cache, or (None, None) when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files if key != "drawn"}
            made = [str(s) for s in npz["drawn"]]
        return arrays, made
    except (OSError, ValueError, KeyError, EOFError):
        return None, None


def _write_cache(path, arrays, made):
    """Best effort: a read-only or full data folder costs only the next decode."""
    from Utils.io import atomic_path

    try:
        with atomic_path(path) as tmp:
            np.savez(tmp, drawn=np.array(made, dtype="U8"), **arrays)
    except OSError:
        pass


# ------------------------------------------------------------- folders ----

def _folder_spec(name, image_size):
    from Data.registry import DatasetSpec

    root = Path(name[len(FOLDER_PREFIX):])
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    split_dirs = _split_dirs(root)
    classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dirs['train']} has no class sub-folders (expected {root}/train/<class>/<images> "
                        f"or {root}/<class>/<images>)")
    files = _folder_files(root, classes)
    headers = _read_headers([f for items in files.values() for f, _ in items], root)
    sizes = {size for size, _ in headers}
    if image_size is None:
        width, height = next(iter(sizes)) if len(sizes) == 1 else (None, None)
        if len(sizes) != 1 or width != height:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:_MAX_LISTED])
            raise DataError(f"images in {root} are not all one square size ({shown}{', ...' if len(sizes) > 5 else ''}):"
                            f" give --image_size")
        image_size = width
    channels = 1 if all(mode in GREY_MODES for _, mode in headers) else 3
    return DatasetSpec(name, tuple(classes), int(image_size), channels, "folder", False, location=str(root))


def _split_dirs(root):
    """{split: folder} of the splits present; PATH/<class>/ alone is a train split."""
    children = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [children[n] for n in names if n in children]
        if len(present) > 1:
            raise DataError(f"{root} has both {present[0].name}/ and {present[1].name}/: keep one")
        if present:
            found[split] = present[0]
    if not found:
        return {"train": root}
    if "train" not in found:
        raise DataError(f"{root} has {', '.join(p.name + '/' for p in found.values())} but no train/")
    other = sorted(set(children) - {p.name for p in found.values()})
    if other:
        raise DataError(f"{root} has train/ and also {', '.join(o + '/' for o in other)}: expected only "
                        f"train/, val/ (or validation/) and test/")
    return found


def _folder_files(root, classes):
    """{split: [(file, label), ...]} with every problem (stray or non-image files, empty or unknown classes) raised."""
    problems, files = [], {}
    for split, folder in _split_dirs(root).items():
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        problems += [f"{p} (a file outside the class folders)" for p in entries if not p.is_dir()]
        present = {p.name: p for p in entries if p.is_dir()}
        problems += [f"{present[n]} (class {n!r} is not in the train folder)" for n in sorted(set(present) - set(classes))]
        items = []
        for label, name in enumerate(classes):
            if name not in present:
                if split == "train":
                    problems.append(f"{folder / name} missing")
                continue
            class_files = sorted(p for p in present[name].rglob("*") if p.is_file()
                                 and not any(part.startswith(".") for part in p.relative_to(present[name]).parts))
            bad = [p for p in class_files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            problems += [f"{p} (not an image file: {', '.join(IMAGE_EXTENSIONS)})" for p in bad]
            images = [p for p in class_files if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not images:
                problems.append(f"{present[name]} (empty class: no image files)")
            items += [(p, label) for p in images]
        files[split] = items
    _raise_problems(root, problems)
    return files


def _raise_problems(root, problems):
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"image folder {root}: {len(problems)} problem(s): {shown}{more}")


def _read_headers(paths, root):
    """[(size, mode)] of each image, opened lazily (headers only); unreadable files raised together."""
    def header(path):
        try:
            with Image.open(path) as image:
                return image.size, image.mode
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return None, f"{path} ({type(e).__name__}: {e})".splitlines()[0][:300]

    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        results = list(pool.map(header, paths))
    _raise_problems(root, [why for size, why in results if size is None])
    return results


def _decode_files(paths, size):
    from Data.images import resize_pil
    from Data.synthetic import _to_rgb

    def decode(path):
        try:
            with Image.open(path) as image:
                image.load()  # a GIF's first frame
                return np.asarray(resize_pil(_to_rgb(image), size), np.uint8), None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return None, f"{path} ({type(e).__name__}: {e})".splitlines()[0][:300]

    with ThreadPoolExecutor(DECODE_WORKERS) as pool:
        results = list(pool.map(decode, paths))
    _raise_problems(Path(paths[0]).parent if paths else ".", [why for image, why in results if image is None])
    if not results:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([image for image, _ in results])


# ---------------------------------------------------------------- tfds ----

def tfds_data_dir(data_dir=None):
    """--data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets")).expanduser()


def _version_key(text):
    return tuple(int(part) for part in text.split("."))


def _tfds_folder(name, data_dir):
    """The prepared folder <data_dir>/<name>[/<config>]/<version>/ holding dataset_info.json."""
    rest = name[len(TFDS_PREFIX):]
    rest, _, version = rest.partition(":")
    base = tfds_data_dir(data_dir)
    folder = base / rest
    prepare = (f"prepare it where it has network (`tfds build {rest.split('/')[0]} --data_dir {base}`, or "
               f"tfds.builder(...).download_and_prepare()) and copy {base / rest.split('/')[0]} here, or point "
               f"--data_dir / TFDS_DATA_DIR at a folder that has it")
    if not folder.is_dir():
        raise DatasetNotFoundError(f"TFDS dataset {rest!r} is not prepared in {base} (no {folder}): {prepare}")
    versions = sorted((p.name for p in folder.iterdir()
                       if re.fullmatch(r"\d+\.\d+\.\d+", p.name) and (p / "dataset_info.json").is_file()),
                      key=_version_key)
    if not versions and "/" not in rest:
        configs = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(
            (v / "dataset_info.json").is_file() for v in p.iterdir() if v.is_dir()))
        if configs:
            raise DataError(f"TFDS dataset {rest!r} in {base} has configs {', '.join(configs)}: "
                            f"name one, e.g. tfds:{rest}/{configs[0]}")
    if version:
        if version not in versions:
            raise DatasetNotFoundError(f"TFDS dataset {rest!r} version {version} is not prepared in {folder} "
                                       f"(prepared: {', '.join(versions) or 'none'}): {prepare}")
        return folder / version
    if not versions:
        raise DatasetNotFoundError(f"TFDS dataset {rest!r} has no prepared version in {folder} "
                                   f"(no <version>/dataset_info.json): {prepare}")
    return folder / versions[-1]


def _tfds_builder(location):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_from_directory(str(location))
    except Exception as e:  # tfds raises many types for a damaged folder
        raise DataError(f"TFDS folder {location} cannot be read ({type(e).__name__}: {e})".splitlines()[0]) from None


def _tfds_keys(builder, location):
    """(image key, label key) of an image-classification builder."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
        if len(images) != 1 or len(labels) != 1:
            raise DataError(f"TFDS dataset at {location} is not single-label image classification "
                            f"(image features {images}, ClassLabel features {labels})")
        image_key, label_key = images[0], labels[0]
    if not isinstance(features[image_key], tfds.features.Image) or not isinstance(
            features[label_key], tfds.features.ClassLabel):
        raise DataError(f"TFDS dataset at {location}: {image_key!r} / {label_key!r} are not an Image and a "
                        f"ClassLabel feature")
    return image_key, label_key


def _tfds_spec(name, image_size, data_dir):
    from Data.registry import DatasetSpec

    location = _tfds_folder(name, data_dir)
    builder = _tfds_builder(location)
    image_key, label_key = _tfds_keys(builder, location)
    height, width, channels = builder.info.features[image_key].shape
    if image_size is None:
        if height is None or height != width:
            shown = "varying sizes" if height is None or width is None else f"{height}x{width}"
            raise DataError(f"TFDS dataset {name[len(TFDS_PREFIX):]} has images of {shown}: give --image_size")
        image_size = height
    if "train" not in builder.info.splits:
        raise DataError(f"TFDS dataset at {location} has no train split (splits: {', '.join(builder.info.splits)})")
    names = tuple(builder.info.features[label_key].names)
    return DatasetSpec(name, names, int(image_size), 1 if channels == 1 else 3, "tfds", False,
                       location=str(location))


def _read_tfds(spec):
    import tensorflow_datasets as tfds

    from Data.images import resize_one

    builder = _tfds_builder(spec.location)
    image_key, label_key = _tfds_keys(builder, spec.location)
    raw = {}
    for split, names in TFDS_SPLITS.items():
        present = [n for n in names if n in builder.info.splits]
        if not present:
            continue
        images, labels = [], []
        for example in tfds.as_numpy(builder.as_dataset(split=present[0], shuffle_files=False)):
            image = np.asarray(example[image_key], np.uint8)
            image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
            images.append(resize_one(image, spec.image_size))
            labels.append(int(example[label_key]))
        raw[split] = (np.stack(images) if images else np.zeros((0, spec.image_size, spec.image_size, 3), np.uint8),
                      np.array(labels, np.int64))
    return raw


# --------------------------------------------------------------- splits ----

def _complete_splits(raw, num_classes):
    """Adds the missing val / test splits, each a stratified fraction of train (fixed seed)."""
    missing = [s for s in ("val", "test") if s not in raw]
    if not missing:
        return raw, []
    x, y = raw["train"]
    rng = np.random.default_rng(FOLDER_SPLIT_SEED)
    parts = {s: [] for s in ["train"] + missing}
    for label in range(num_classes):
        index = rng.permutation(np.flatnonzero(y == label))
        take = max(1, int(round(len(index) * FOLDER_SPLIT_FRACTION))) if len(index) >= 3 else 0
        start = 0
        for split in missing:
            parts[split].append(index[start:start + take])
            start += take
        parts["train"].append(index[start:])
    out = dict(raw)
    for split, pieces in parts.items():
        chosen = np.sort(np.concatenate(pieces)) if pieces else np.zeros(0, np.int64)
        out[split] = (x[chosen], y[chosen])
    return out, missing

