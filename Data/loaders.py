"""Real train / validation / test splits for every registered dataset.

`load_dataset(name)` returns uint8 images (N, H, W, 3) at the dataset's native
resolution (grey images repeated to 3 channels) and int64 labels (N,).

Splits
------
- cifar10, cifar100: read from the official python tarballs
  (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`; CIFAR-100 uses the 100
  fine labels). train = the FIRST 40,000 images of the official training set,
  validation = the LAST 10,000 (disjoint: the paper's original validated on
  `x_train[10000:]`, which overlaps its training images), test = the official
  10,000. In general: the last fifth of the training set is the validation
  split, the first four fifths the training split.
- MedMNIST (pathmnist, dermamnist, bloodmnist, retinamnist and the other 2D
  single-label sets): the official train / val / test splits of the 28x28
  `<name>.npz` files.
- mnist, fashion_mnist: the official idx files (60,000 training, 10,000 test
  images, 28x28 grey); validation = the last fifth of the training file, as
  for CIFAR: 48,000 / 12,000 / 10,000. Fashion-MNIST is also found where
  Debian's `dataset-fashion-mnist` installs it.
- folder:PATH, tfds:NAME: your own data, `Data/own_datasets.py`.
- digits: scikit-learn's `load_digits` (1,797 images, embedded in
  scikit-learn: no download). Native 8x8 grey, values 0..16 rescaled to
  0..255 (round(v * 255 / 16)), repeated to 3 channels. A stratified split,
  60 / 20 / 20 % = 1,077 train / 360 val / 360 test, drawn with the FIXED seed
  `DIGITS_SPLIT_SEED` (not the run's --seed) so every run and every method is
  compared on the same images.

Files and downloads
-------------------
Real files live in `data_dir` (`--data_dir`, else $SDDG_DATA_DIR, else
~/.cache/sd_dataset_generation). A missing file is downloaded there from its
official URL into a temporary file, checked against its official MD5 and only
then renamed into place. With no network the error comes within seconds
(`DOWNLOAD_TIMEOUT_S` socket timeout, name look-up bounded as well) as one line
naming the file, its MD5, the folder to put it in and the URL it comes from.
A present file is judged by its decoded content (`Data/checksums.py`: the
official content digest where recorded, else keys, shapes, dtypes, split sizes
and label range), so a recompressed or re-saved copy is accepted; a file that
cannot be parsed or holds different data is one line naming the file. $SDDG_DATA_MIRROR, when set, replaces every official URL by
`<mirror>/<file name>` (a local mirror for machines without internet access).

Example:
    >>> splits = load_dataset("retinamnist", data_dir="../shared/data")
    >>> splits.x_train.shape, splits.y_train.dtype
    ((1080, 28, 28, 3), dtype('int64'))
    >>> load_dataset("digits").sizes()
    {'train': 1077, 'val': 360, 'test': 360}
"""

import hashlib
import os
import pickle
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from Data.checksums import Verification, verify_content
from Data.errors import DataError, DatasetNotFoundError
from Data.medmnist_info import MEDMNIST
from Data.registry import DatasetSpec, get_spec
from Utils.io import atomic_path
from Utils.paths import default_data_dir

# Seconds a silent network may stall (connect, each read, the name look-up)
# before the download gives up with the one-line "put the file here" error.
DOWNLOAD_TIMEOUT_S = 10

DIGITS_SPLIT_SEED = 20240101  # fixed on purpose: the same digits split for every run
DIGITS_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

# The validation split of CIFAR: the last fifth of the official training set.
CIFAR_VAL_FRACTION = 0.2

CIFAR_FILES = {
    "cifar10": {
        "file": "cifar-10-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "file": "cifar-100-python.tar.gz",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}


# The official idx files (gzip). Both datasets use the same four file names, so
# each lives in its own sub-folder of the data folder: <data_dir>/<name>/.
IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_FILES = {
    "mnist": {
        "url": "http://yann.lecun.com/exdb/mnist/",
        "md5": {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
                "test_images": "9fb629c4189551a2d022fa330f9573f3", "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion_mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
                "test_images": "bef4ecab320f06d8554ea6380940ec79", "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"},
        # Debian's dataset-fashion-mnist: the same data, recompressed (other .gz MD5s).
        "system_dir": "/usr/share/datasets/fashion-mnist",
        "package": "dataset-fashion-mnist",
    },
}


@dataclass
class Splits:
    """A dataset's three splits: images uint8 (N, H, W, 3), labels int64 (N,)."""

    spec: DatasetSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    verification: Verification = None
    train_subset: dict = None  # {"images": N, "seed": S} when the training split is a subset
    full_train_size: int = None  # the training split's size before the subset

    def sizes(self):
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def class_counts(self, split):
        """Images per class in 'train', 'val' or 'test', a list indexed by label."""
        labels = getattr(self, f"y_{split}")
        return np.bincount(labels, minlength=self.spec.num_classes).tolist()

    def provenance(self):
        """What results record of the real data: how it was verified, and the training subset if any."""
        return {"data_verification": self.verification.as_dict() if self.verification else None,
                "train_subset": self.train_subset}

    def with_train_subset(self, n, seed=0):
        """These splits with the training split cut to a seeded, stratified `n` images (val and test kept)."""
        from Data.balance import stratified_subset

        try:
            chosen = stratified_subset(self.y_train, n, seed)
        except ValueError as e:
            raise DataError(f"--train_subset {n} for {self.spec.name}: {e}") from None
        return replace(self, x_train=self.x_train[chosen], y_train=self.y_train[chosen],
                       train_subset=train_subset_record(n, seed), full_train_size=len(self.y_train))


def train_subset_record(n, seed=0):
    """How results and checkpoints record a training subset: None for the whole split."""
    return {"images": int(n), "seed": int(seed)} if n else None


def load_dataset(name, data_dir=None, verify=True, image_size=None, accept_unverified=False, train_subset=None,
                 train_subset_seed=0):
    """The train / val / test splits of the dataset `name`.

    Args:
        name: a registry name (`Data.registry.dataset_names()`), `folder:PATH` or `tfds:NAME`.
        data_dir: folder holding (or receiving) the real files; None →
            `Utils.paths.default_data_dir()` (tfds: $TFDS_DATA_DIR or ~/tensorflow_datasets).
            Unused for digits and folder:.
        verify: check the decoded content (`Data/checksums.py`: digest, else
            structure) before use (leave on; off only for hand-made test files).
        image_size: folder: / tfds: only: the square size to resize to (needed when sizes differ).
        accept_unverified: use a file whose structure matches but whose content
            digest does not (recorded in `Splits.verification`).
        train_subset, train_subset_seed: train on a seeded, stratified subset of this many
            training images (`Splits.with_train_subset`; recorded in `Splits.train_subset`).

    Raises:
        DataError: unknown dataset, different content, or an unreadable file; its subclass
            DatasetNotFoundError: the file is missing and cannot be downloaded. Always one line.
    """
    splits = _load_splits(name, data_dir, verify, image_size, accept_unverified)
    return splits.with_train_subset(train_subset, train_subset_seed) if train_subset else splits


def _load_splits(name, data_dir, verify, image_size, accept_unverified):
    spec = get_spec(name, image_size=image_size, data_dir=data_dir)
    if spec.source == "sklearn":
        return load_digits_splits(spec)
    if spec.source in ("folder", "tfds"):
        from Data.own_datasets import read_own_dataset

        arrays, detail = read_own_dataset(spec)
        return Splits(spec, **arrays, verification=Verification("own", detail))
    if spec.source == "idx":
        files = idx_files(spec, data_dir)
        raw = read_idx_splits(files, spec)
        path = files["train_images"].parent
    else:
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        source = data_source(spec.name)
        # A present file is judged by its decoded content (below), not its bytes.
        path = fetch_file(source["file"], source["url"], source["md5"], data_dir, check_md5=False)
        raw = read_cifar_archive(path, spec) if spec.source == "cifar" else read_medmnist_npz(path, spec)
    if verify:
        verification = verify_content(spec, path, raw, accept_unverified=accept_unverified)
    else:
        _check_labels(path, spec, *(labels for _, labels in raw.values()))
        verification = Verification("off", f"{path}: content checks switched off")
    return _to_splits(spec, raw, verification)


def _to_splits(spec, raw, verification):
    """Splits from the file's own splits; without a validation split, the last fifth of train."""
    arrays = {split: (_three_channels(np.asarray(x)), np.asarray(y).reshape(-1).astype(np.int64))
              for split, (x, y) in raw.items()}
    if "val" not in arrays:
        x_full, y_full = arrays.pop("train")
        n_train = len(y_full) - int(round(len(y_full) * CIFAR_VAL_FRACTION))
        # Training = first four fifths, validation = last fifth: disjoint.
        arrays["train"] = (x_full[:n_train], y_full[:n_train])
        arrays["val"] = (x_full[n_train:], y_full[n_train:])
    return Splits(spec, *(np.ascontiguousarray(a) for split in ("train", "val", "test") for a in arrays[split]),
                  verification=verification)


def data_source(name):
    """{'file', 'url', 'md5'} of a downloadable dataset (the URL after $SDDG_DATA_MIRROR)."""
    spec = get_spec(name)
    if spec.source == "cifar":
        entry = dict(CIFAR_FILES[spec.name])
    elif spec.source == "medmnist":
        info = MEDMNIST[spec.name]
        entry = {"file": info["file"], "url": info["url"], "md5": info["md5"]}
    else:
        raise DataError(f"dataset '{name}' is embedded and has no file to download")
    mirror = os.environ.get("SDDG_DATA_MIRROR")
    if mirror:
        entry["url"] = f"{mirror.rstrip('/')}/{entry['file']}"
    return entry


def add_data_dir_argument(parser):
    """The `--data_dir` flag every script that reads real data shares."""
    parser.add_argument("--data_dir", default=None,
                        help="folder holding (or receiving) the real dataset files "
                             "(default: $SDDG_DATA_DIR, else ~/.cache/sd_dataset_generation)")


# ---------------------------------------------------------------- files ----

def md5_of(path, chunk=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(filename, url, md5, data_dir, check_md5=True):
    """Path of `data_dir/filename`, downloading it first when missing.

    A present file is checked against `md5` (when `check_md5`); a downloaded
    one always is, before it is renamed into place. Failures are one-line
    DataErrors saying what to put where.
    """
    data_dir = Path(data_dir)
    path = data_dir / filename
    if path.is_file():
        if check_md5:
            got = md5_of(path)
            if got != md5:
                raise DataError(
                    f"{path} has MD5 {got}, expected {md5} (incomplete or a different file): "
                    f"delete it to download it again, or replace it with the file from {url}")
        return path
    if path.exists():
        raise DataError(f"{path} exists but is not a file; expected {filename} (MD5 {md5}) from {url}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetNotFoundError(f"cannot create the data folder {data_dir}: {e.strerror or e}") from None
    try:
        _download(url, path, md5)
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DatasetNotFoundError(
            f"{filename} (MD5 {md5}) is not in {data_dir} and downloading it failed ({reason}); "
            f"put the file from {url} into {data_dir} (or point --data_dir / SDDG_DATA_DIR "
            f"at a folder that has it)") from None
    return path


def _download(url, path, md5):
    """Streams `url` into a temporary file beside `path`; renames it there if the MD5 matches."""
    _check_name_lookup(url)
    request = urllib.request.Request(url, headers={"User-Agent": "sd-dataset-generation"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        digest = hashlib.md5()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                            desc=f"downloading {path.name}") as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
            got = digest.hexdigest()
            if got != md5:
                # Raised inside atomic_path: the partial file is removed.
                raise DatasetNotFoundError(f"the download of {path.name} from {url} has MD5 {got}, expected "
                                           f"{md5}; try again, or put the right file into {path.parent}")


def _check_name_lookup(url):
    """Fails within DOWNLOAD_TIMEOUT_S when the host name cannot be resolved.

    The socket timeout does not cover DNS look-ups, which on a machine without
    network can hang for much longer. Skipped when a proxy resolves for us.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return
    import socket

    outcome = {}

    def look_up():
        try:
            socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = e

    thread = threading.Thread(target=look_up, daemon=True)
    thread.start()
    thread.join(DOWNLOAD_TIMEOUT_S)
    if thread.is_alive():
        raise OSError(f"looking up {parts.hostname} took over {DOWNLOAD_TIMEOUT_S} s")
    if "error" in outcome:
        raise OSError(f"cannot resolve {parts.hostname}: {outcome['error']}")


# -------------------------------------------------------------- parsers ----

def read_cifar_archive(path, spec):
    """Splits from an official CIFAR python tarball (the pickled batches inside it).

    cifar-10: `data_batch_1..5` (training, in that order) and `test_batch`,
    key b"labels". cifar-100: `train` and `test`, key b"fine_labels". Each
    batch's b"data" is (N, 3072) uint8, channel-major 3x32x32.
    """
    path = Path(path)
    if spec.name == "cifar10":
        train_names = [f"data_batch_{i}" for i in range(1, 6)]
        test_names, label_key = ["test_batch"], b"labels"
    else:
        train_names, test_names, label_key = ["train"], ["test"], b"fine_labels"
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            missing = [n for n in train_names + test_names if n not in members]
            if missing:
                raise DataError(f"{path} is not the official {spec.name} archive: "
                                f"{', '.join(missing)} missing inside it")

            def read(names):
                xs, ys = [], []
                for name in names:
                    batch = pickle.load(archive.extractfile(members[name]), encoding="bytes")
                    data = np.asarray(batch[b"data"], dtype=np.uint8)
                    xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    ys.append(np.asarray(batch[label_key], dtype=np.int64))
                return np.concatenate(xs), np.concatenate(ys)

            x_full, y_full = read(train_names)
            x_test, y_test = read(test_names)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError,
            KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a readable {spec.name} archive "
                        f"({type(e).__name__}: {e}); delete it to download it again") from None
    return {"train": (x_full, y_full), "test": (x_test, y_test)}


def idx_files(spec, data_dir=None):
    """{key: path} of a dataset's four idx files (.gz or decompressed), downloading them when missing.

    Looked for in `<data_dir>/<name>/`, then `data_dir` itself (--data_dir
    pointing at a folder of the four files; only for a dataset with recorded
    content digests, since MNIST and Fashion-MNIST share file names and
    structure), then the system folder of a Debian package (fashion_mnist:
    /usr/share/datasets/fashion-mnist); else downloaded into
    `<data_dir>/<name>/`, each file checked against its official MD5.
    """
    entry = IDX_FILES[spec.name]
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    candidates = [base / spec.name] + ([base] if spec.content_digests else [])
    if entry.get("system_dir"):
        candidates.append(Path(entry["system_dir"]))
    for folder in candidates:
        found = {key: _idx_path(folder, name) for key, name in IDX_NAMES.items()}
        if all(found.values()):
            return found
    target = base / spec.name
    url = os.environ.get("SDDG_DATA_MIRROR", "").rstrip("/") or entry["url"].rstrip("/")
    try:
        return {key: fetch_file(f"{name}.gz", f"{url}/{name}.gz", entry["md5"][key], target, check_md5=False)
                for key, name in IDX_NAMES.items()}
    except DatasetNotFoundError:
        package = (f" (or `apt-get install {entry['package']}`, which puts them in {entry['system_dir']})"
                   if entry.get("package") else "")
        raise DatasetNotFoundError(
            f"{spec.name}: the four idx files ({', '.join(n + '.gz' for n in IDX_NAMES.values())}) are not in "
            f"{target} and cannot be downloaded; put them there from {entry['url']}{package}") from None


def _idx_path(folder, name):
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def read_idx_splits(files, spec):
    """{split: (images uint8 (N, H, W), labels uint8 (N,))} from idx files (gzip or plain)."""
    return {split: (read_idx(files[f"{split}_images"], ndim=3), read_idx(files[f"{split}_labels"], ndim=1))
            for split in ("train", "test")}


def read_idx(path, ndim):
    """The uint8 array in an idx file: magic 0x0000 08 <ndim>, big-endian int32 sizes, then the data."""
    import gzip

    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable idx file ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{path} is not a {ndim}-d uint8 idx file (header {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {len(data) - start} bytes (truncated or corrupt)")
    return np.frombuffer(data, np.uint8, offset=start).reshape(shape)


def read_medmnist_npz(path, spec):
    """{split: (images, labels)} of a MedMNIST npz, as stored: `{train,val,test}_images` and `_labels`."""
    path = Path(path)
    raw = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            needed = [f"{s}_{kind}" for s in ("train", "val", "test") for kind in ("images", "labels")]
            missing = [key for key in needed if key not in npz.files]
            if missing:
                raise DataError(f"{path} is not a MedMNIST file: {', '.join(missing)} missing")
            for split in ("train", "val", "test"):
                raw[split] = (np.asarray(npz[f"{split}_images"]), np.asarray(npz[f"{split}_labels"]))
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path} is not a readable MedMNIST npz ({type(e).__name__}: {e}); "
                        f"delete it to download it again") from None
    size = spec.image_size
    for split, (x, y) in raw.items():
        if x.dtype != np.uint8 or x.shape[1:3] != (size, size) or y.size != len(x):
            raise DataError(f"{path}: {split} images have shape {x.shape} ({x.dtype}) for "
                            f"{y.size} labels; expected ({y.size}, {size}, {size}) uint8")
    return raw


def load_digits_splits(spec=None):
    """scikit-learn's digits, 3-channel uint8 8x8, split 60/20/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    spec = spec or get_spec("digits")
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 → 0..255
    x = np.repeat(grey[..., None], 3, axis=-1)
    y = digits.target.astype(np.int64)
    _, val_fraction, test_fraction = DIGITS_SPLIT_FRACTIONS
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=y,
                                  random_state=DIGITS_SPLIT_SEED)
    train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                  stratify=y[rest], random_state=DIGITS_SPLIT_SEED)
    train, val, test = np.sort(train), np.sort(val), np.sort(test)
    import sklearn

    shipped = Verification("embedded", f"digits: scikit-learn {sklearn.__version__} load_digits, shipped "
                                       f"with the package")
    return Splits(spec, x[train], y[train], x[val], y[val], x[test], y[test], verification=shipped)


def _three_channels(images):
    """(N, H, W) or (N, H, W, 1) grey → (N, H, W, 3); RGB is returned as is."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _check_labels(path, spec, *label_arrays):
    for labels in label_arrays:
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataError(f"{path}: labels {labels.min()}..{labels.max()} do not fit "
                            f"{spec.name}'s {spec.num_classes} classes")
