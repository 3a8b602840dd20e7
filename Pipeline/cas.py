"""The CAS stage (PAPER.md stage 6): a ResNet20 trained on real or synthetic images, tested on real ones.

What it trains on (the run's name is the results key and checkpoint folder):
  synthetic=False             the real training split                          -> "real"
  synthetic=True, take=N      N x (real training-set size) images of our generated folder
                              Data/Synthetic/Exp_{exp}/{dataset}/, balanced per class
                              (default N = 1, the paper's)                      -> "xN"
  synthetic_dir=DIR           any folder of class sub-folders (ImageFolder layout); take N
                              as above, without take every readable image       -> "<DIR name>_xN" / "_all"
It always validates on the real validation split and tests on the real test
split; the record (`Metrics.cas.cas_record`) goes to
`CAS Results/test_accuracies_exp{exp}.json`, the curve to `cas_{dataset}_exp{exp}.png`.
A killed run resumes; `train=False` reuses a finished run's checkpoint.

Example:
    >>> settings = CASSettings(dataset="digits", synthetic=True, take=2, epochs=8, batch_size=64)
    >>> is_done(settings) or run(settings)
    CASResult(run_key='x2', top1=0.91, top5=0.99, ...)
    >>> settings.command(SCRIPT)
    'python classifier_training.py --dataset digits --take 2 --batch_size 64 --epochs 8'
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from Utils.cli import UserError, existing_folder, non_negative_int, positive_int
from Pipeline.common_settings import (accept_unverified_setting, data_dir_setting, dataset_setting,
                                      dataset_spec, experiment_setting, image_size_setting, load_real,
                                      train_subset_seed_setting, train_subset_setting)
from Utils.runtime import RuntimeSettings
from Utils.settings import PAPER, setting

SCRIPT = "classifier_training.py"


@dataclass(frozen=True, kw_only=True)
class CASSettings(RuntimeSettings):
    """Every flag of classifier_training.py."""

    dataset: str = dataset_setting()
    synthetic: bool = setting(True, group=PAPER,
                              help="train on synthetic images (ours: Data/Synthetic/Exp_{exp}/{dataset}/, or "
                                   "--synthetic_dir); False: on the real training split")
    take: int = setting(None, type=positive_int, group=PAPER,
                        help="synthetic training set size in multiples of the real training split "
                             "(default 1; with --synthetic_dir every image)")
    train: bool = setting(True, group=PAPER,
                          help="train (resuming a killed run); False: load the finished run's checkpoint")
    test: bool = setting(True, group=PAPER, help="test on the real test split and record the CAS result")
    exp: str = experiment_setting()
    batch_size: int = setting(256, type=positive_int, group=PAPER, help="classifier batch (the paper's 256)")
    epochs: int = setting(100, type=positive_int, group=PAPER,
                          help="maximum epochs, early stopping may end sooner (the paper's 100)")
    synthetic_dir: str = setting(None, type=existing_folder,
                                 help="train on any folder of class sub-folders instead of ours")
    run_name: str = setting(None, help="results key and checkpoint folder name "
                                       "(default: real, x{take}, <folder>_x{take})")
    classifier: str = setting("resnet20", choices=("resnet20",), help="the classifier")
    initial_filters: int = setting(64, type=positive_int,
                                   help="ResNet20 first-stage width (the paper's 64; the usual ResNet20 has 16)")
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()
    seed: int = setting(0, type=non_negative_int, help="initial weights, batch order and synthetic subset")

    def __post_init__(self):
        super().__post_init__()
        if not self.train and not self.test:
            raise UserError("nothing to do: --train False and --test False")
        if self.synthetic_dir is not None and not self.synthetic:
            raise UserError("--synthetic_dir trains on synthetic images: drop --synthetic False")
        if self.take is not None and not self.synthetic:
            raise UserError("--take applies to synthetic data: drop --synthetic False (or --no-synthetic)")
        if self.run_name is not None and not self.run_name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"--run_name may hold letters, digits, '-', '_' and '.' only, got {self.run_name!r}")

    def resolved(self):
        """The same settings with the registry's dataset name and the default take (1 for our folder)."""
        take = self.take
        if take is None and self.synthetic and self.synthetic_dir is None:
            take = 1
        return self.replace(dataset=dataset_spec(self).name, take=take)

    def run_key(self):
        """The results key and checkpoint folder name of this run."""
        from Metrics.cas import run_key_for

        if self.run_name:
            return self.run_name
        r = self.resolved()
        return run_key_for(r.take, r.synthetic, Path(r.synthetic_dir).name if r.synthetic_dir else None)

    def train_folder(self):
        """The synthetic folder trained on (ours or synthetic_dir), or None for real data."""
        from Utils.paths import synthetic_dir

        if not self.synthetic:
            return None
        if self.synthetic_dir:
            return Path(self.synthetic_dir).expanduser()
        return synthetic_dir(self.exp, self.resolved().dataset)


@dataclass(frozen=True)
class CASResult:
    """What a CAS run gave.

    Attributes:
        run_key: the results key ("real", "x4", "<folder>_all", ...).
        top1, top5: real-test accuracies (None when not tested); top_k: the k of "top5" (min(5, C)).
        n_train: training images.
        checkpoint_dir: the classifier's folder (weights, history.csv, run.json).
        results_file, plot: the CAS table and curve written (None when not tested).
        record: the full CAS entry (None when not tested).
        settings: the resolved settings.
    """

    run_key: str
    top1: float
    top5: float
    top_k: int
    n_train: int
    checkpoint_dir: Path
    results_file: Path
    plot: Path
    record: dict
    settings: CASSettings


def _same_protocol(entry, r):
    from Data.loaders import train_subset_record

    return (entry.get("max_epochs") == r.epochs and entry.get("batch_size") == r.batch_size
            and entry.get("seed") == r.seed and entry.get("initial_filters", r.initial_filters) == r.initial_filters
            and entry.get("train_subset") == train_subset_record(r.train_subset, r.train_subset_seed))


def is_done(settings):
    """A short reason when the run is recorded with the same protocol (max epochs, batch, width, seed).

    With test: its CAS entry; without: the finished classifier's run.json.
    """
    from Metrics.cas import load_cas
    from Utils.io import read_json
    from Utils.paths import classifier_checkpoint_dir

    r = settings.resolved()
    key = r.run_key()
    if r.test:
        entry = load_cas(r.exp, r.dataset).get(key)
        if isinstance(entry, dict) and "top1" in entry and _same_protocol(entry, r):
            return f"CAS {key} recorded (top-1 {entry['top1']:.4f})"
        return None
    run = read_json(classifier_checkpoint_dir(r.exp, r.dataset, key) / "run.json", default=None)
    if run and _same_protocol({"max_epochs": run.get("config", {}).get("epochs"), "seed": run.get("seed"),
                               "batch_size": run.get("config", {}).get("batch_size"),
                               "initial_filters": run.get("config", {}).get("initial_filters"),
                               "train_subset": run.get("train_subset")}, r):
        return f"classifier {key} trained"
    return None


def run(settings, log=print, classifier_pool=None):
    """Trains (or loads) the classifier and tests it; returns a CASResult. Bad input raises before writing.

    classifier_pool: a `Models.classifier.ClassifierPool` to train with (the pipeline's, shared by its
    stages); None compiles a classifier of its own.
    """
    from Data.images import RESIZE_METHOD
    from Data.shards import require_complete
    from Data.synthetic import format_report, load_image_folder
    from Metrics.cas import cas_record, plot_cas, record_cas, short_report
    from Utils.paths import classifier_checkpoint_dir

    r = settings.resolved()
    spec = dataset_spec(r)
    folder = r.train_folder()
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"synthetic data folder {folder} does not exist"
                            + ("" if r.synthetic_dir else " (run generate_dataset.py first)"))
        require_complete(folder)  # a CAS on a half-generated set would score the missing shards too
    run_key = r.run_key()
    checkpoint_dir = classifier_checkpoint_dir(r.exp, spec.name, run_key)

    splits = load_real(r)
    log(f"{spec.name}: real train {len(splits.y_train)}, val {len(splits.y_val)}, "
        f"test {len(splits.y_test)}; run '{run_key}' → {checkpoint_dir}")

    if not r.train and not (checkpoint_dir / "run.json").is_file():
        raise UserError(f"no trained classifier in {checkpoint_dir}: run once with --train first")
    if r.train and folder is not None:
        n_wanted = r.take * len(splits.y_train) if r.take is not None else None
        x_train, y_train, report = load_image_folder(folder, spec, take=n_wanted, seed=r.seed)
        for line in format_report(report):
            log(line)

    # Keras (and TensorFlow) only now: bad input above fails within a second.
    from Models.classifier import ClassifierConfig, evaluate_classifier, load_classifier, train_classifier
    from Utils.runtime import configure_runtime, distribution_scope

    if not r.train:
        model, run_info = load_classifier(checkpoint_dir)
        if tuple(run_info["input_shape"]) != splits.x_test.shape[1:] or run_info["num_classes"] != spec.num_classes:
            raise UserError(f"{checkpoint_dir} holds a classifier for {run_info['input_shape']} images and "
                            f"{run_info['num_classes']} classes, not {spec.name}'s")
    else:
        if folder is not None:
            from Data.synthetic_writer import read_manifest

            metadata = {"source": str(folder), "resize_method": RESIZE_METHOD,
                        "synthetic_report": short_report(report)}
            # Which conditioning method made the images (our generated sets record it; files from
            # before the methods existed: the class encoder).
            manifest = read_manifest(Path(folder))
            if manifest:
                metadata["conditioning"] = (manifest.get("settings") or {}).get("conditioning", "class_encoder")
        else:
            x_train, y_train = splits.x_train, splits.y_train
            metadata = {"source": f"real {spec.name} train split"}
        metadata.update({"dataset": spec.name, "exp": r.exp, "run_key": run_key, "take": r.take,
                         "label_names": list(spec.label_names),
                         **splits.provenance()})
        config = ClassifierConfig(classifier=r.classifier, epochs=r.epochs, batch_size=r.batch_size,
                                  initial_filters=r.initial_filters, jit_compile=True if r.xla else "auto")
        configure_runtime(seed=r.seed, mixed_precision=r.mixed_precision, xla=r.xla)
        with distribution_scope(r.multi_gpu):
            model, history = train_classifier(
                x_train, y_train, splits.x_val, splits.y_val, spec.num_classes, config=config,
                seed=r.seed, checkpoint_dir=checkpoint_dir, metadata=metadata,
                verbose=1 if sys.stdout.isatty() else 2, pool=classifier_pool)
        run_info = {**metadata, "n_train": len(y_train), "epochs_run": history["epochs_run"],
                    "best_epoch": history["best_epoch"], "seed": r.seed, "config": config.to_dict()}
        log(f"trained {history['epochs_run']} epochs, best validation accuracy "
            f"{max(history['val_accuracy']):.4f} at epoch {history['best_epoch']}")

    record = results_file = plot = None
    if r.test:
        record = cas_record(evaluate_classifier(model, splits.x_test, splits.y_test, spec.label_names), run_info)
        results_file = record_cas(r.exp, spec.name, run_key, record)
        plot = plot_cas(r.exp, spec.name)
        log(f"test ({record['n']} real images): top-1 {record['top1']:.4f}, "
            f"top-{record['top_k']} {record['top5']:.4f} → {results_file} [{spec.name}][{run_key}], {plot}")
    tested = record or {}
    return CASResult(run_key=run_key, top1=tested.get("top1"), top5=tested.get("top5"),
                     top_k=tested.get("top_k"), n_train=run_info.get("n_train"),
                     checkpoint_dir=checkpoint_dir, results_file=results_file, plot=plot, record=record,
                     settings=r)
