"""The one dataset registry: every script asks here for a dataset's facts.

Each entry gives the official label names (in label order), the native square
resolution, the native channel count and where the real data comes from. The
loaders (`Data/loaders.py`) always return 3-channel uint8 images at the native
resolution, whatever the native channel count.

| name | source | size | channels | classes | in the paper |
| --- | --- | --- | --- | --- | --- |
| cifar10, cifar100 | official python tarballs | 32 | 3 | 10, 100 (fine labels) | yes |
| pathmnist, dermamnist, bloodmnist, retinamnist | MedMNIST npz | 28 | 3 | 9, 7, 8, 5 | yes |
| breastmnist, pneumoniamnist, octmnist, organ{a,c,s}mnist, tissuemnist | MedMNIST npz | 28 | 1 | 2..11 | no |
| digits | scikit-learn `load_digits` (embedded, no download) | 8 | 1 | 10 | no |
| mnist, fashion_mnist | official idx files (Debian's `dataset-fashion-mnist` too) | 28 | 1 | 10 | no |
| folder:PATH | your image folder (`Data/own_datasets.py`) | native or --image_size | detected | folder names | no |
| tfds:NAME | a prepared TensorFlow Datasets builder (`Data/own_datasets.py`) | native or --image_size | the builder's | `ClassLabel.names` | no |

`folder:` and `tfds:` specs are read from the data itself the first time a
name is asked for with its options (`get_spec(name, image_size=..., data_dir=...)`,
done by every stage's settings); later name-only look-ups in the same process
get that spec back.

`CONTENT_DIGESTS` records, per dataset and split, the SHA-256 of the decoded
images and labels (`Data/checksums.py`): a file is accepted when its content
matches, whatever its compression or packaging.

Example:
    >>> spec = get_spec("bloodmnist")
    >>> spec.num_classes, spec.image_size, spec.label_names[0]
    (8, 28, 'basophil')
"""

from dataclasses import dataclass

from Data.errors import DataError
from Data.medmnist_info import MEDMNIST, UNSUPPORTED


@dataclass(frozen=True)
class DatasetSpec:
    """The facts about one dataset.

    Attributes:
        name: registry name, e.g. "cifar10".
        label_names: official class names, index i is label i.
        image_size: native square resolution in pixels.
        channels: native channels (1 grey or 3 RGB); loaders always return 3.
        source: "cifar", "medmnist", "sklearn", "idx", "folder" or "tfds".
        in_paper: one of the paper's six datasets.
        location: the image folder (folder:) or the prepared builder folder (tfds:).
        file_sizes: the split sizes of the official files, e.g. (("train", 50000), ("test", 10000)),
            checked when no content digest is recorded.
    """

    name: str
    label_names: tuple
    image_size: int
    channels: int
    source: str
    in_paper: bool
    location: str = None
    file_sizes: tuple = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def content_digests(self):
        """{split: {"images": sha256, "labels": sha256}} of the official decoded content, or None."""
        return CONTENT_DIGESTS.get(self.name)


CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer",
                  "dog", "frog", "horse", "ship", "truck")

# CIFAR-100 fine label names, in label order (the `fine_label_names` of the
# official `meta` file, which are in alphabetical order).
CIFAR100_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# SHA-256 of the decoded content (Data/checksums.py: content_digest), computed
# from the official files: retinamnist.npz (MD5 bd4c0672f1bba3e3a89f0e4e876791e4)
# and Fashion-MNIST's four idx files (decompressed bytes identical to the
# official ones). Splits as the files hold them, before any validation split.
CONTENT_DIGESTS = {
    "retinamnist": {
        "train": {"images": "2787702b43c96f5d5d26e2c2daf0dfe3a94d9fa99c9ebe43ae34060cb32b9870",
                  "labels": "7e158f07786a0be4e4c9f62e327c8bf9c7807dd5b8de28a3eb2d6f8e2c1909a2"},
        "val": {"images": "19610c1f4ba41bc1983fad84fd2ee17368e8da59391689afe6893639386b1ac5",
                "labels": "e9abdae818d04e4c86b4e3363e5fcfea30347ef96fdccd32c7647a18764cc2b3"},
        "test": {"images": "ea4bde67dd440a19883e381642b67e321433fe56387b35445f63b7e8202c9447",
                 "labels": "6be3fb3c7e298f7384a87c0fa072bc5b915ca515cfdd864c1dd69d53be12b42b"},
    },
    "fashion_mnist": {
        "train": {"images": "cbe6416bec66fcd6e18cd79f48adfb704f76af0a870bfe2c25ac8a96a8ff046e",
                  "labels": "88995d042facf70155ca62b7a88dd4014d224cd706334779814e1776a30f60f3"},
        "test": {"images": "a9703089c071d4fdd831c845477e814d4a8f137df1f1b963746f40afb12d5bb8",
                 "labels": "33177131bc427da42cf335c3e428fe9353fa2ed1a70f539380e18ac1faa5b3a9"},
    },
}

PAPER_DATASETS = ("cifar10", "cifar100", "pathmnist", "dermamnist", "bloodmnist", "retinamnist")


def _build_registry():
    specs = [
        DatasetSpec("cifar10", CIFAR10_LABELS, 32, 3, "cifar", True,
                    file_sizes=(("train", 50000), ("test", 10000))),
        DatasetSpec("cifar100", CIFAR100_LABELS, 32, 3, "cifar", True,
                    file_sizes=(("train", 50000), ("test", 10000))),
    ]
    # The paper's four MedMNIST sets first, then the others in alphabetical order.
    others = sorted(set(MEDMNIST) - set(PAPER_DATASETS))
    for name in [n for n in PAPER_DATASETS if n in MEDMNIST] + others:
        info = MEDMNIST[name]
        specs.append(DatasetSpec(name, info["labels"], info["image_size"], info["channels"],
                                 "medmnist", name in PAPER_DATASETS,
                                 file_sizes=tuple(info["n_samples"].items())))
    specs.append(DatasetSpec("digits", tuple(str(d) for d in range(10)), 8, 1, "sklearn", False))
    idx_sizes = (("train", 60000), ("test", 10000))
    specs.append(DatasetSpec("fashion_mnist", FASHION_MNIST_LABELS, 28, 1, "idx", False, file_sizes=idx_sizes))
    specs.append(DatasetSpec("mnist", tuple(str(d) for d in range(10)), 28, 1, "idx", False, file_sizes=idx_sizes))
    return {spec.name: spec for spec in specs}


REGISTRY = _build_registry()


def dataset_names():
    """Every registered dataset: the paper's six first, then the others."""
    return list(REGISTRY)


# folder: / tfds: specs already read in this process: canonical name -> (spec, tfds data_dir).
_OWN_SPECS = {}


def get_spec(name, image_size=None, data_dir=None):
    """The DatasetSpec for `name` (case-insensitive); a DataError for an unknown name.

    `folder:PATH` and `tfds:NAME` are read from the data (Data/own_datasets.py):
    `image_size` resizes them (needed when their images differ in size),
    `data_dir` is the TFDS data folder. A registered name takes no other size and ignores `data_dir`.
    """
    from Data.own_datasets import canonical_name, is_own_dataset, own_spec

    if is_own_dataset(name):
        key = canonical_name(name)
        # data_dir only locates tfds: builders; a folder: name holds its path.
        where = str(data_dir) if data_dir is not None and key.startswith("tfds:") else None
        if key in _OWN_SPECS:
            spec, spec_where = _OWN_SPECS[key]
            if image_size in (None, spec.image_size) and where in (None, spec_where):
                return spec
        spec = own_spec(key, image_size=image_size, data_dir=data_dir)
        _OWN_SPECS[key] = (spec, where)
        return spec
    key = str(name).strip().lower()
    if key in REGISTRY:
        spec = REGISTRY[key]
        if image_size is not None and int(image_size) != spec.image_size:
            raise DataError(f"--image_size applies to folder: and tfds: datasets; {spec.name} is "
                            f"{spec.image_size}x{spec.image_size} (drop --image_size)")
        return spec
    if key in UNSUPPORTED:
        raise DataError(f"dataset '{name}' is not supported: {UNSUPPORTED[key]}")
    raise DataError(f"unknown dataset '{name}'; choose from: {', '.join(dataset_names())}, "
                    f"folder:PATH (an image folder) or tfds:NAME (a prepared TensorFlow Datasets builder)")
