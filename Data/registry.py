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
        source: "cifar", "medmnist" or "sklearn".
        in_paper: one of the paper's six datasets.
    """

    name: str
    label_names: tuple
    image_size: int
    channels: int
    source: str
    in_paper: bool

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


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

PAPER_DATASETS = ("cifar10", "cifar100", "pathmnist", "dermamnist", "bloodmnist", "retinamnist")


def _build_registry():
    specs = [
        DatasetSpec("cifar10", CIFAR10_LABELS, 32, 3, "cifar", True),
        DatasetSpec("cifar100", CIFAR100_LABELS, 32, 3, "cifar", True),
    ]
    # The paper's four MedMNIST sets first, then the others in alphabetical order.
    others = sorted(set(MEDMNIST) - set(PAPER_DATASETS))
    for name in [n for n in PAPER_DATASETS if n in MEDMNIST] + others:
        info = MEDMNIST[name]
        specs.append(DatasetSpec(name, info["labels"], info["image_size"], info["channels"],
                                 "medmnist", name in PAPER_DATASETS))
    specs.append(DatasetSpec("digits", tuple(str(d) for d in range(10)), 8, 1, "sklearn", False))
    return {spec.name: spec for spec in specs}


REGISTRY = _build_registry()


def dataset_names():
    """Every registered dataset: the paper's six first, then the others."""
    return list(REGISTRY)


def get_spec(name):
    """The DatasetSpec for `name` (case-insensitive); a DataError for an unknown name."""
    key = str(name).strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    if key in UNSUPPORTED:
        raise DataError(f"dataset '{name}' is not supported: {UNSUPPORTED[key]}")
    raise DataError(f"unknown dataset '{name}'; choose from: {', '.join(dataset_names())}")
