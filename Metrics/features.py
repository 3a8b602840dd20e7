"""Image embeddings for the quality metrics: InceptionV3 (ImageNet) or a ResNet20 trained on the real data.

Every metric in `Metrics/` compares sets of feature vectors; which network
makes them decides what "close" means. Two extractors (`--features`):

inception
    InceptionV3 from `keras.applications` with ImageNet weights: the 2048-d
    global-average-pool features (layer "avg_pool") and the 1000 ImageNet class
    probabilities (for the Inception Score). The usual choice for natural
    images (CIFAR). Images are resized to 299x299 with the one antialiased
    method (`Data.images.resize_images`, `RESIZE_METHOD`) and scaled to [-1, 1]
    (`keras.applications.inception_v3.preprocess_input`).
    Its weights are keras' own port of the TensorFlow InceptionV3, not the
    2015 graph that pytorch-fid / clean-fid / torch-fidelity use, and our
    resize is PIL bicubic: the FID of this tool compares sets measured by this
    tool (ours, or a PyTorch pipeline's folder), not numbers from papers.
    Weights: downloaded by keras on first use into
    `$KERAS_HOME/models/` (default ~/.keras/models/). Offline, a missing file is
    a one-line error within seconds naming the file, the folder and the URL.

resnet20
    The penultimate layer ("features", global average pooling) of a ResNet20
    trained on the real dataset's TRAIN split, validated on its val split.
    Works offline, for any registered dataset; the right choice for medical
    images (MedMNIST), which look nothing like ImageNet. Its class
    probabilities are the dataset's own classes, so the Inception Score it
    gives is a "domain IS" (at most the number of classes) and it can also say
    how often a synthetic image is classified as the class it was generated
    for. Images are resized (same method) to the dataset's native size. The
    network is trained once per (exp, dataset, seed) and cached in
    `Utils.paths.classifier_checkpoint_dir(exp, dataset, "feature_extractor")/seed_{seed}/`;
    a cached run trained with a different configuration is retrained.
    `FEATURE_EXTRACTOR_CONFIG`: the standard-width ResNet20 (16 initial filters,
    64-d features; the CAS classifier uses the paper's 64), at most 30 epochs,
    batch 128, the CAS protocol otherwise (Adam 1e-3, label smoothing 0.1),
    plateau patience 5 and early-stopping patience 10 on validation accuracy,
    best epoch kept. Fast (about 10 s an epoch for RetinaMNIST on 2 CPU cores)
    and 64 dimensions make the per-class covariances of small classes less
    degenerate.

Example:
    >>> extractor = build_extractor("resnet20", "retinamnist", exp=0, data_dir="../shared/data", seed=0)
    >>> emb = extractor.embed(x_uint8)          # Embeddings(features (N, 64), probabilities (N, 5))
    >>> emb.features.shape, extractor.name
"""

import dataclasses
import os
import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from Data.images import RESIZE_METHOD, resize_images
from Metrics.errors import MetricsError

FEATURE_EXTRACTORS = ("inception", "resnet20")

INCEPTION_WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
INCEPTION_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/"
                         f"inception_v3/{INCEPTION_WEIGHTS_FILE}")
INCEPTION_SIZE = 299
# Seconds the network may take to answer before we say "offline" (covers the name look-up).
NETWORK_PROBE_TIMEOUT_S = 8
# Seconds a started download may stall before it fails.
DOWNLOAD_STALL_TIMEOUT_S = 60

FEATURE_EXTRACTOR_RUN = "feature_extractor"


def feature_extractor_config():
    """The ResNet20 extractor's fast training configuration (see the module docstring)."""
    from Models.classifier import ClassifierConfig

    return ClassifierConfig(epochs=30, batch_size=128, initial_filters=16,
                            lr_patience=5, early_stopping_patience=10)


@dataclasses.dataclass
class Embeddings:
    """What an extractor gives for a set of images.

    Attributes:
        features: float32 (N, d) feature vectors.
        probabilities: float32 (N, classes) class probabilities (softmax), or None.
    """

    features: np.ndarray
    probabilities: np.ndarray = None

    def subset(self, index):
        """The rows `index` (boolean mask or integer indices)."""
        probs = None if self.probabilities is None else self.probabilities[index]
        return Embeddings(self.features[index], probs)

    def __len__(self):
        return len(self.features)


class _KerasExtractor:
    """Runs a two-output keras model (features, probabilities) over uint8 images, batch by batch.

    Images are resized per batch (not all at once: 10,000 CIFAR images at 299 px
    would take 2.7 GB) with the one antialiased method.
    """

    name = None
    classes_are_dataset_labels = False

    def __init__(self, model, input_size, batch_size=128):
        self.model = model
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)

    def preprocess(self, images_uint8):
        """uint8 images at `input_size` → the model's input."""
        return images_uint8

    def embed(self, images_uint8, desc=None):
        """Embeddings of (N, H, W, 1|3) uint8 images, any size (resized to `input_size`)."""
        import keras

        images = np.asarray(images_uint8)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"embed expects (N, H, W, 1|3) uint8 images, got {images.dtype} {images.shape}")
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        features, probs = [], []
        steps = range(0, len(images), self.batch_size)
        for start in tqdm(steps, desc=desc or f"{self.name} features", unit="batch", leave=False,
                          disable=len(steps) < 5):
            batch = resize_images(images[start:start + self.batch_size], self.input_size)
            f, p = self.model(self.preprocess(batch), training=False)
            features.append(keras.ops.convert_to_numpy(f).astype(np.float32))
            probs.append(keras.ops.convert_to_numpy(p).astype(np.float32))
        if not features:
            raise ValueError("embed got no images")
        return Embeddings(np.concatenate(features), np.concatenate(probs))

    def describe(self):
        """Facts recorded beside every result: which network, input size, resize method."""
        return {"features": self.name, "input_size": self.input_size, "resize_method": RESIZE_METHOD}


# ------------------------------------------------------------- InceptionV3
def inception_weights_path():
    """Where keras looks for (and downloads) the InceptionV3 ImageNet weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / INCEPTION_WEIGHTS_FILE


def _network_reachable(url, timeout=NETWORK_PROBE_TIMEOUT_S):
    """True when a HEAD request to `url` answers within `timeout` s (name look-up included).

    The request runs in a daemon thread because a DNS look-up ignores socket
    timeouts and can hang for minutes on a machine without network.
    """
    outcome = {}

    def probe():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome["ok"] = True
        except Exception as e:  # any failure means: cannot download now
            outcome["error"] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome.get("ok"))


class InceptionV3Features(_KerasExtractor):
    """InceptionV3 (ImageNet) pool features and ImageNet class probabilities.

    Example:
        >>> extractor = InceptionV3Features()          # downloads the weights once, or a MetricsError
        >>> emb = extractor.embed(x_uint8)             # features (N, 2048), probabilities (N, 1000)
    """

    name = "inception"

    def __init__(self, batch_size=64, weights="imagenet"):
        """weights: "imagenet" (the real extractor) or None (random weights: tests of the plumbing only)."""
        import keras

        path = inception_weights_path()
        if weights == "imagenet" and not path.exists() and not _network_reachable(INCEPTION_WEIGHTS_URL):
            raise MetricsError(f"InceptionV3 ImageNet weights are missing and cannot be downloaded (offline?): "
                               f"put {INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}) into {path.parent}/ "
                               f"or use --features resnet20")
        previous = socket.getdefaulttimeout()
        # keras' download has no timeout of its own: a stalled transfer must not hang for ever.
        socket.setdefaulttimeout(DOWNLOAD_STALL_TIMEOUT_S)
        try:
            base = keras.applications.InceptionV3(include_top=True, weights=weights)
        except Exception as e:  # a broken download or file: one line, not a traceback
            raise MetricsError(f"cannot load the InceptionV3 weights {path}: {str(e).splitlines()[0]} "
                               f"(delete the file to download it again, or put {INCEPTION_WEIGHTS_FILE} "
                               f"from {INCEPTION_WEIGHTS_URL} there)") from None
        finally:
            socket.setdefaulttimeout(previous)
        model = keras.Model(base.input, [base.get_layer("avg_pool").output, base.output], name="inception_v3_fid")
        super().__init__(model, INCEPTION_SIZE, batch_size)

    def preprocess(self, images_uint8):
        # keras' InceptionV3 preprocessing: pixels to [-1, 1].
        return images_uint8.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- ResNet20
class ResNet20Features(_KerasExtractor):
    """The "features" layer and softmax of a ResNet20 trained on real data.

    Example:
        >>> extractor = ResNet20Features.for_dataset("retinamnist", exp=0, data_dir="../shared/data")
        >>> extractor.embed(x_test).features.shape
        (400, 64)
    """

    name = "resnet20"
    classes_are_dataset_labels = True

    def __init__(self, classifier, run=None, batch_size=256):
        import keras

        from Models.resnet20 import FEATURES_LAYER

        model = keras.Model(classifier.input, [classifier.get_layer(FEATURES_LAYER).output, classifier.output],
                            name="resnet20_features")
        self.run = run or {}
        super().__init__(model, classifier.input_shape[1], batch_size)

    def describe(self):
        config = self.run.get("config", {})
        return {**super().describe(), "initial_filters": config.get("initial_filters"),
                "epochs_run": self.run.get("epochs_run"), "best_epoch": self.run.get("best_epoch"),
                "seed": self.run.get("seed"), "n_train": self.run.get("n_train"),
                "val_accuracy": self.run.get("val_accuracy"), "checkpoint": self.run.get("checkpoint"),
                "trained_now": bool(self.run.get("trained_now"))}

    @classmethod
    def train(cls, x_train, y_train, x_val, y_val, num_classes, config=None, seed=0, checkpoint_dir=None,
              verbose=0):
        """Trains the extractor network (`feature_extractor_config()` by default)."""
        from Models.classifier import train_classifier

        config = config or feature_extractor_config()
        classifier, history = train_classifier(x_train, y_train, x_val, y_val, num_classes, config=config,
                                               seed=seed, checkpoint_dir=checkpoint_dir, verbose=verbose,
                                               metadata={"purpose": "feature extractor for Metrics/"})
        run = {"config": config.to_dict(), "seed": int(seed), "n_train": int(len(x_train)),
               "epochs_run": history["epochs_run"], "best_epoch": history["best_epoch"],
               "val_accuracy": float(max(history["val_accuracy"]))}
        return cls(classifier, run)

    @classmethod
    def for_dataset(cls, dataset, exp=0, data_dir=None, seed=0, config=None, splits=None, verbose=0):
        """The extractor for a registered dataset: loaded from its cache, or trained once and cached.

        splits: the already-loaded `Data.loaders.Splits` (else loaded from `data_dir`).
        """
        from Models.classifier import load_classifier
        from Utils.paths import classifier_checkpoint_dir

        config = config or feature_extractor_config()
        folder = Path(classifier_checkpoint_dir(exp, dataset, FEATURE_EXTRACTOR_RUN)) / f"seed_{seed}"
        cached = _cached_run(folder, config, seed)
        if cached is not None:
            classifier, run = load_classifier(folder)
            run["checkpoint"] = str(folder)
            run["val_accuracy"] = _best_val_accuracy(folder)
            return cls(classifier, run)
        if splits is None:
            from Data.loaders import load_dataset

            splits = load_dataset(dataset, data_dir)
        print(f"training the ResNet20 feature extractor for {dataset} (seed {seed}, at most "
              f"{config.epochs} epochs); cached in {folder}", flush=True)
        extractor = cls.train(splits.x_train, splits.y_train, splits.x_val, splits.y_val,
                              splits.spec.num_classes, config=config, seed=seed, checkpoint_dir=folder,
                              verbose=verbose)
        extractor.run["checkpoint"] = str(folder)
        extractor.run["trained_now"] = True
        return extractor


def _cached_run(folder, config, seed):
    """run.json of a finished extractor run with this configuration and seed, else None."""
    from Models.classifier import RUN_FILE, weights_file
    from Utils.io import read_json

    run = read_json(Path(folder) / RUN_FILE)
    if run is None or not weights_file(folder, config).exists():
        return None
    wanted = {k: v for k, v in config.to_dict().items() if k != "jit_compile"}
    stored = {k: v for k, v in run.get("config", {}).items() if k != "jit_compile"}
    if stored != wanted or run.get("seed") != int(seed):
        print(f"note: the feature extractor cached in {folder} was trained with other settings; retraining")
        return None
    return run


def _best_val_accuracy(folder):
    import csv

    from Models.classifier import HISTORY_FILE

    try:
        with open(Path(folder) / HISTORY_FILE, newline="") as f:
            values = [float(row["val_accuracy"]) for row in csv.DictReader(f) if row.get("val_accuracy")]
        return max(values) if values else None
    except (OSError, KeyError, ValueError):
        return None


def build_extractor(name, dataset=None, exp=0, data_dir=None, seed=0, config=None, splits=None, verbose=0):
    """The extractor named `name` ("inception" or "resnet20"; the latter needs `dataset`)."""
    if name == "inception":
        return InceptionV3Features()
    if name == "resnet20":
        if dataset is None and splits is None:
            raise ValueError("the resnet20 extractor needs the dataset it is trained on")
        return ResNet20Features.for_dataset(dataset or splits.spec.name, exp=exp, data_dir=data_dir,
                                            seed=seed, config=config, splits=splits, verbose=verbose)
    raise MetricsError(f"unknown feature extractor '{name}'; choose from: {', '.join(FEATURE_EXTRACTORS)}")
