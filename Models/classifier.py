"""The CAS training protocol: train a ResNet20, resume it after a kill, evaluate it.

The paper's protocol (PAPER.md, "classifier training"), as the defaults of
`ClassifierConfig`:
  - Adam with Keras' defaults (learning rate 1e-3);
  - categorical cross-entropy with label smoothing 0.1;
  - batch 256, at most 100 epochs, no augmentation, pixels / 255 (inside the model);
  - ReduceLROnPlateau(val_accuracy, factor 0.1, patience 10, min_lr 1e-5);
  - EarlyStopping(val_accuracy, patience 25, restore_best_weights=True).

Under Keras 3, EarlyStopping restores the best epoch's weights at the end of
every run, also when it never stopped early (Keras 2, which the original code
used, restored them only after an early stop); the weights we keep are always
those of the best validation epoch.

Resuming: with a `checkpoint_dir`, the whole training state (weights, Adam's
moments and step, learning rate, the plateau and early-stopping counters and
the best weights so far, the history) is written atomically to one file at the
end of every epoch. Each epoch's order of the training images is drawn from
(seed, epoch), so a run killed and resumed ends with the same weights as one
that never stopped. A finished run leaves `<classifier>.weights.h5`,
`history.csv` and `run.json` in `checkpoint_dir`, and no resume file.

Reuse: a process that trains many classifiers of one shape (a study's trials,
the pipeline's CAS runs) passes a `ClassifierPool`; each training then starts
from the compiled model of the one before, with a fresh model's weights and
optimizer state, and skips the seconds of tracing a new model costs.

Example:
    >>> model, history = train_classifier(x_train, y_train, x_val, y_val, num_classes=10,
    ...                                   config=ClassifierConfig(epochs=100), seed=0,
    ...                                   checkpoint_dir="Checkpoints/Classifiers/Exp_0/cifar10/real")
    >>> result = evaluate_classifier(model, x_test, y_test, spec.label_names)
    >>> result["top1"], result["top5"]
    >>> model = load_classifier("Checkpoints/Classifiers/Exp_0/cifar10/real")   # later, elsewhere
    >>> pool = ClassifierPool()
    >>> for images, labels in trial_sets:       # each model is valid until the next training
    ...     model, history = train_classifier(images, labels, x_val, y_val, 10, pool=pool)
"""

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import keras
import numpy as np

from Models.errors import CheckpointError, ModelSettingsError
from Models.resnet20 import build_resnet20
from Utils.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from Utils.runtime import keep_tensor_buffers_on_heap

CLASSIFIERS = ("resnet20",)
RESUME_FILE = "resume_state.npz"
HISTORY_FILE = "history.csv"
RUN_FILE = "run.json"


@dataclass
class ClassifierConfig:
    """The training protocol; the defaults are the paper's.

    Attributes:
        classifier: architecture name (only "resnet20").
        epochs: maximum number of epochs.
        batch_size: images per training step (also used for validation).
        initial_filters: ResNet20's first-stage width (the paper: 64).
        label_smoothing: of the categorical cross-entropy.
        learning_rate: Adam's initial learning rate (Keras' default, 1e-3).
        monitor: the quantity both callbacks watch.
        lr_factor, lr_patience, min_lr: ReduceLROnPlateau.
        early_stopping_patience: EarlyStopping's patience, in epochs.
        restore_best_weights: keep the best `monitor` epoch's weights.
        jit_compile: passed to `model.compile` ("auto", True or False).
    """

    classifier: str = "resnet20"
    epochs: int = 100
    batch_size: int = 256
    initial_filters: int = 64
    label_smoothing: float = 0.1
    learning_rate: float = 1e-3
    monitor: str = "val_accuracy"
    lr_factor: float = 0.1
    lr_patience: int = 10
    min_lr: float = 1e-5
    early_stopping_patience: int = 25
    restore_best_weights: bool = True
    jit_compile: object = "auto"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Builds a config from a dict, ignoring keys it does not know (older run.json files)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def build_classifier(input_shape, num_classes, config=None):
    """The untrained, uncompiled model named by `config.classifier`."""
    config = config or ClassifierConfig()
    if config.classifier != "resnet20":
        raise ModelSettingsError(f"unknown classifier '{config.classifier}'; choose from: {', '.join(CLASSIFIERS)}")
    return build_resnet20(input_shape, num_classes, initial_filters=config.initial_filters)


# What `build_classifier` and `compile_classifier` read: trainings that agree on these (and on the
# input shape, classes, dtype policy and distribution) can share one compiled model.
COMPILED_FIELDS = ("classifier", "initial_filters", "label_smoothing", "learning_rate", "jit_compile")


class ClassifierPool:
    """Compiled classifiers kept for the next training of the same kind.

    Every new Keras model traces and optimises its train, validation and
    prediction steps when it first runs them: 2.5-3.5 s of a 4-epoch tuning
    classifier's ~6 s on a 2-core CPU (BENCHMARKS.md, "CAS classifier" (d)).
    `train_classifier(..., pool=pool)` instead takes the pool's
    model of that kind, sets the weights a freshly built model of the seed
    holds and the optimizer's state as it was before its first step, and
    trains it; the trained weights are a fresh model's bit for bit
    (tests/test_classifier_training.py), only sooner.

    A model the pool lends is the same object the next training with that pool
    changes: use it before training again (evaluate it, save it), and train
    without a pool what must be kept (a feature extractor).
    """

    def __init__(self):
        self._compiled = {}  # key -> (model, its optimizer's variables before any step)

    def __len__(self):
        return len(self._compiled)

    def lend(self, input_shape, num_classes, config):
        """A compiled model with the weights `build_classifier` gives now: seed first."""
        fresh = build_classifier(input_shape, num_classes, config)
        key = _compiled_kind(input_shape, num_classes, config)
        if key not in self._compiled:
            compile_classifier(fresh, config)
            initial = [keras.ops.convert_to_numpy(v) for v in fresh.optimizer.variables]
            self._compiled[key] = (fresh, initial)
            return fresh
        model, initial_optimizer = self._compiled[key]
        model.set_weights(fresh.get_weights())
        for variable, value in zip(model.optimizer.variables, initial_optimizer):
            variable.assign(value)
        return model


def _compiled_kind(input_shape, num_classes, config):
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        distribution = tf.distribute.get_strategy()
    else:
        distribution = keras.distribution.distribution()
    compiled = tuple(getattr(config, name) for name in COMPILED_FIELDS)
    return (tuple(int(d) for d in input_shape), int(num_classes), compiled,
            keras.config.dtype_policy().name, distribution)


def weights_file(checkpoint_dir, config=None):
    """Where a finished run's weights live: `<checkpoint_dir>/<classifier>.weights.h5`."""
    return Path(checkpoint_dir) / f"{(config or ClassifierConfig()).classifier}.weights.h5"


class EpochShuffledBatches(keras.utils.PyDataset):
    """Training batches in an order drawn from (seed, epoch) alone.

    Keras' own `shuffle=True` draws from process-global generators whose state
    a resumed process cannot recover; here epoch e is always ordered the same
    way, so a resumed run sees exactly the batches the killed one would have.
    Use with `model.fit(..., shuffle=False)`.

    Which epoch a batch belongs to is counted here, batch by batch, rather than
    taken from the `on_epoch_*` hooks: Keras creates (and tf.data may start
    prefetching from) the next epoch's iterator before it calls them. Calls
    before the first `on_epoch_begin` (Keras peeks at a batch or two to learn
    the shapes) read the first epoch and move nothing.

    Example:
        >>> batches = EpochShuffledBatches(x, y_onehot, batch_size=256, seed=0, first_epoch=0)
        >>> model.fit(batches, epochs=100, shuffle=False)
    """

    def __init__(self, x, y, batch_size, seed, first_epoch=0):
        super().__init__()
        keep_tensor_buffers_on_heap()
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = int(first_epoch)  # the epoch the next batches are served from
        self.started = False
        self._orders = {}

    def order(self, epoch):
        """The permutation of the training images used in `epoch` (0-based)."""
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.x))}
        return self._orders[epoch]

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        epoch = self.epoch
        if self.started and index == len(self) - 1:
            self.epoch += 1
        chosen = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[chosen], self.y[chosen]

    def on_epoch_begin(self):
        self.started = True


class ResumeState(keras.callbacks.Callback):
    """Writes the whole training state to one file at every epoch's end; restores the callbacks.

    The weights and optimizer are restored by `train_classifier` before `fit`;
    this callback puts back the early-stopping and plateau counters in
    `on_train_begin`, after those callbacks have reset themselves, so it must
    come after them in the callback list.
    """

    def __init__(self, path, fingerprint, early_stopping, reduce_lr, restored=None):
        super().__init__()
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.early_stopping = early_stopping
        self.reduce_lr = reduce_lr
        self.restored = restored  # the state dict read from disk, or None
        self.history = dict(restored["history"]) if restored else {}

    def on_train_begin(self, logs=None):
        if not self.restored:
            return
        es, lr = self.restored["early_stopping"], self.restored["reduce_lr"]
        self.early_stopping.wait = es["wait"]
        self.early_stopping.best = es["best"]
        self.early_stopping.best_epoch = es["best_epoch"]
        self.early_stopping.best_weights = self.restored.get("best_weights")
        self.reduce_lr.wait = lr["wait"]
        self.reduce_lr.best = lr["best"]
        self.reduce_lr.cooldown_counter = lr["cooldown_counter"]

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        es, lr = self.early_stopping, self.reduce_lr
        state = {
            "fingerprint": self.fingerprint,
            "epoch": epoch + 1,  # epochs completed
            "stopped": bool(self.model.stop_training),
            "history": self.history,
            "early_stopping": {"wait": es.wait, "best": _float_or_none(es.best), "best_epoch": es.best_epoch},
            "reduce_lr": {"wait": lr.wait, "best": _float_or_none(lr.best),
                          "cooldown_counter": lr.cooldown_counter},
        }
        arrays = {"state_json": np.array(json.dumps(state))}
        for i, w in enumerate(self.model.get_weights()):
            arrays[f"model_{i}"] = w
        for i, v in enumerate(self.model.optimizer.variables):
            arrays[f"optimizer_{i}"] = keras.ops.convert_to_numpy(v)
        for i, w in enumerate(es.best_weights or []):
            arrays[f"best_{i}"] = w
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)


def _float_or_none(value):
    return None if value is None else float(value)


def _read_resume_state(path):
    """The saved state as a dict with "model", "optimizer", "best_weights" lists; None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            state = json.loads(str(data["state_json"]))

            def arrays(prefix):
                count = sum(1 for k in data.files if k.startswith(prefix))
                return [data[f"{prefix}{i}"] for i in range(count)]

            state["model"] = arrays("model_")
            state["optimizer"] = arrays("optimizer_")
            state["best_weights"] = arrays("best_") or None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    return state


def _fingerprint(x_train, y_train, x_val, y_val, num_classes, config, seed):
    """A digest of everything that makes a resumed run the same run."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (x_train, y_train, x_val, y_val):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    settings = {k: v for k, v in config.to_dict().items() if k != "jit_compile"}
    digest.update(json.dumps([settings, int(num_classes), int(seed)], sort_keys=True).encode())
    return digest.hexdigest()


def _check_arrays(x, y, num_classes, what):
    x, y = np.asarray(x), np.asarray(y).reshape(-1)
    if x.ndim != 4:
        raise ValueError(f"{what} images must be (N, H, W, C), got shape {x.shape}")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ModelSettingsError(f"no {what} images")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


def train_classifier(x_train, y_train, x_val, y_val, num_classes, config=None, seed=0,
                     checkpoint_dir=None, extra_callbacks=(), verbose=1, metadata=None, pool=None):
    """Trains the classifier with the paper's protocol; returns (model, history).

    Args:
        x_train, x_val: (N, H, W, C) images in 0..255 (uint8 preferred: 4x less memory).
        y_train, y_val: (N,) integer labels in [0, num_classes).
        num_classes: classes of the softmax.
        config: a `ClassifierConfig` (default: the paper's protocol).
        seed: seeds the initial weights and every epoch's batch order.
        checkpoint_dir: where to keep the resume state and, at the end, the
            weights, `history.csv` and `run.json`. An unfinished run of the same
            data, settings and seed found there is resumed; a resume file of a
            different run is ignored (and replaced). None: nothing is written.
        extra_callbacks: more Keras callbacks (e.g. an Optuna pruning
            callback reading `logs["val_accuracy"]` in `on_epoch_end`).
        verbose: `model.fit`'s verbosity (1: progress bar, 2: a line per epoch).
        metadata: extra JSON-able facts stored in `run.json` (source folder, ...).
        pool: a `ClassifierPool` to take the compiled model from (the same
            weights, sooner); None builds and compiles a model of its own.

    Returns:
        The compiled model holding the best validation epoch's weights, and the
        history: a dict of per-epoch lists ("loss", "accuracy", "val_loss",
        "val_accuracy", "learning_rate"), plus "epochs_run" and "best_epoch"
        (1-based) as integers.
    """
    config = config or ClassifierConfig()
    x_train, y_train = _check_arrays(x_train, y_train, num_classes, "training")
    x_val, y_val = _check_arrays(x_val, y_val, num_classes, "validation")
    if x_train.shape[1:] != x_val.shape[1:]:
        raise ValueError(f"training images are {x_train.shape[1:]} but validation images {x_val.shape[1:]}")

    keras.utils.set_random_seed(int(seed))
    if pool is None:
        model = compile_classifier(build_classifier(x_train.shape[1:], num_classes, config), config)
    else:
        model = pool.lend(x_train.shape[1:], num_classes, config)

    fingerprint = _fingerprint(x_train, y_train, x_val, y_val, num_classes, config, seed)
    resume_path = Path(checkpoint_dir) / RESUME_FILE if checkpoint_dir else None
    restored = None
    if resume_path is not None and resume_path.exists():
        restored = _read_resume_state(resume_path)
        if restored is None or restored["fingerprint"] != fingerprint:
            print(f"note: ignoring {resume_path}: it belongs to a different run (data, settings or seed)")
            restored = None
        else:
            model.optimizer.build(model.trainable_variables)
            model.set_weights(restored["model"])
            for variable, value in zip(model.optimizer.variables, restored["optimizer"]):
                variable.assign(value)
            print(f"resuming {resume_path.parent} after epoch {restored['epoch']}")
    initial_epoch = restored["epoch"] if restored else 0

    early_stopping = keras.callbacks.EarlyStopping(
        monitor=config.monitor, mode="max", patience=config.early_stopping_patience,
        restore_best_weights=config.restore_best_weights, verbose=int(verbose > 0))
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor=config.monitor, mode="max", factor=config.lr_factor, patience=config.lr_patience,
        min_lr=config.min_lr, verbose=int(verbose > 0))
    callbacks = [reduce_lr, early_stopping, *extra_callbacks]
    recorder = None
    if resume_path is not None:
        recorder = ResumeState(resume_path, fingerprint, early_stopping, reduce_lr, restored)
        callbacks.append(recorder)  # last: it restores the two above after their own reset

    y_train_hot = keras.utils.to_categorical(y_train, num_classes).astype("float32")
    y_val_hot = keras.utils.to_categorical(y_val, num_classes).astype("float32")
    finished_before = restored is not None and (restored["stopped"] or initial_epoch >= config.epochs)
    if finished_before:
        # Killed after the last epoch but before the final files were written.
        if config.restore_best_weights and restored["best_weights"] is not None:
            model.set_weights(restored["best_weights"])
        history = dict(restored["history"])
    else:
        batches = EpochShuffledBatches(x_train, y_train_hot, config.batch_size, seed, initial_epoch)
        fit = model.fit(batches, validation_data=(x_val, y_val_hot), validation_batch_size=config.batch_size,
                        epochs=config.epochs, initial_epoch=initial_epoch, callbacks=callbacks,
                        shuffle=False, verbose=verbose)
        history = recorder.history if recorder is not None else {
            k: [float(v) for v in vals] for k, vals in fit.history.items()}

    history = dict(history)
    val = history.get(config.monitor, [])
    history["epochs_run"] = len(val)
    # The epoch whose weights we keep: EarlyStopping's first best (1-based).
    history["best_epoch"] = int(np.argmax(val)) + 1 if val and config.restore_best_weights else len(val)

    if checkpoint_dir is not None:
        save_run(model, history, checkpoint_dir, config, input_shape=x_train.shape[1:],
                 num_classes=num_classes, seed=seed, n_train=len(x_train),
                 metadata=metadata)
        resume_path.unlink(missing_ok=True)
    return model, history


def compile_classifier(model, config=None):
    """Compiles with the protocol's optimizer, loss and metric ("accuracy")."""
    config = config or ClassifierConfig()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        jit_compile=config.jit_compile,
    )
    # Built now: Keras would build it inside the first traced step, and TensorFlow traces a
    # step that creates variables twice (about a second per training run on a CPU).
    model.optimizer.build(model.trainable_variables)
    return model


def save_run(model, history, checkpoint_dir, config, input_shape, num_classes, seed, n_train,
             metadata=None):
    """Writes the finished run atomically: weights, history.csv, then run.json (the 'done' mark)."""
    checkpoint_dir = Path(checkpoint_dir)
    with atomic_path(weights_file(checkpoint_dir, config)) as tmp:
        model.save_weights(tmp)
    atomic_write_text(checkpoint_dir / HISTORY_FILE, history_csv(history))
    run = {
        "classifier": config.classifier,
        "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes),
        "seed": int(seed),
        "n_train": int(n_train),
        "epochs_run": history["epochs_run"],
        "best_epoch": history["best_epoch"],
        "config": config.to_dict(),
        **(metadata or {}),
    }
    atomic_write_json(checkpoint_dir / RUN_FILE, run)


def history_csv(history):
    """The per-epoch lists of a history dict as CSV text: epoch, then one column per key."""
    keys = [k for k, v in history.items() if isinstance(v, list)]
    rows = max((len(history[k]) for k in keys), default=0)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", *keys])
    for i in range(rows):
        writer.writerow([i + 1, *[history[k][i] if i < len(history[k]) else "" for k in keys]])
    return out.getvalue()


def load_classifier(checkpoint_dir):
    """Rebuilds a finished run's model from `checkpoint_dir` (run.json + weights); returns (model, run).

    A missing or unreadable checkpoint is a CheckpointError (one line).

    Example:
        >>> model, run = load_classifier(classifier_checkpoint_dir(0, "retinamnist", "real"))
        >>> features = feature_extractor(model).predict(x)
    """
    checkpoint_dir = Path(checkpoint_dir)
    run = read_json(checkpoint_dir / RUN_FILE)
    if run is None:
        raise CheckpointError(f"no trained classifier in {checkpoint_dir} (missing {RUN_FILE}); train it first")
    config = ClassifierConfig.from_dict(run.get("config", {}))
    path = weights_file(checkpoint_dir, config)
    if not path.exists():
        raise CheckpointError(f"no trained classifier in {checkpoint_dir} (missing {path.name}); train it first")
    model = build_classifier(tuple(run["input_shape"]), run["num_classes"], config)
    compile_classifier(model, config)  # built optimizer: the weights file holds Adam's state too
    try:
        model.load_weights(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    return model, run


def evaluate_classifier(model, x, y, label_names, batch_size=256):
    """Top-1 and top-k accuracy, per-class accuracy and the confusion matrix on (x, y).

    k is 5 capped at the number of classes (a 2-class problem has top-2 = 1.0);
    "top5" holds that top-k accuracy and "top_k" the k used. Ties between
    equal probabilities are broken towards the lower class index.

    Returns:
        dict(top1, top5, top_k, balanced_accuracy, per_class_accuracy
        {label name: accuracy or None when the class has no images},
        confusion_matrix [true][predicted] counts, n).

    Example:
        >>> evaluate_classifier(model, x_test, y_test, spec.label_names)["top1"]
        0.4575
    """
    y = np.asarray(y).reshape(-1).astype(np.int64)
    num_classes = len(label_names)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"evaluate_classifier needs as many labels as images (got {len(x)}, {len(y)})")
    probs = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if probs.shape[1] != num_classes:
        raise ValueError(f"the model has {probs.shape[1]} outputs but there are {num_classes} label names")
    k = min(5, num_classes)
    # Stable sort of -p: equal probabilities keep the lower index first.
    ranked = np.argsort(-probs, axis=1, kind="stable")
    top1 = ranked[:, 0]
    in_top_k = (ranked[:, :k] == y[:, None]).any(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, top1), 1)
    per_class = {}
    for c, name in enumerate(label_names):
        count = confusion[c].sum()
        per_class[str(name)] = float(confusion[c, c] / count) if count else None
    present = [v for v in per_class.values() if v is not None]
    return {
        "top1": float(np.mean(top1 == y)),
        "top5": float(np.mean(in_top_k)),
        "top_k": k,
        "balanced_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "n": int(len(y)),
    }
