"""The quality stage (ours): a synthetic data set measured against the real one.

FID, KID, MMD, IS, precision/recall/density/coverage and memorisation, overall
and per class, from one extractor's embeddings (`Metrics/quality.py`,
`Metrics/features.py`), merged into `CAS Results/quality_exp{exp}.json` under
[dataset][folder][extractor], plus a PNG of the most copy-like synthetic/training pairs.

Example:
    >>> settings = EvaluateSettings(dataset="digits", exp="0", seed=0)   # our generated folder
    >>> is_done(settings) or run(settings)
    EvaluateResult(folder_key='Data/Synthetic/Exp_0/digits', features='resnet20', ...)
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from Metrics.features import FEATURE_EXTRACTORS
from Metrics.memorization import MEMORIZATION_THRESHOLD
from Metrics.quality import DEFAULT_NUM_SAMPLES, KID_SUBSET_SIZE, KID_SUBSETS, PRDC_K, REFERENCE_SPLITS
from Utils.cli import folder, non_negative_float, non_negative_int, positive_int
from Pipeline.common_settings import (accept_unverified_setting, data_dir_setting, dataset_setting,
                                      dataset_spec, experiment_setting, image_size_setting, load_real,
                                      train_subset_seed_setting, train_subset_setting)
from Utils.settings import ADDED, REQUIRED, Settings, setting

SCRIPT = "evaluate_dataset.py"
_EXTRACTOR = "the resnet20 extractor's training (default: the fast config of Metrics/features.py)"


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings(Settings):
    """Every flag of evaluate_dataset.py."""

    dataset: str = dataset_setting(REQUIRED, group=ADDED)
    synthetic_dir: str = setting(None, type=folder,
                                 help="a folder of class sub-folders of images (default: ours, "
                                      "Data/Synthetic/Exp_{exp}/{dataset})")
    exp: str = experiment_setting(group=ADDED)
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()
    features: str = setting("resnet20", choices=FEATURE_EXTRACTORS,
                            help="embedding network: resnet20 (trained on the real train split; offline; "
                                 "MedMNIST) or inception (InceptionV3, ImageNet weights)")
    num_samples: int = setting(DEFAULT_NUM_SAMPLES, type=positive_int,
                               help="at most this many synthetic (class-balanced) and reference images")
    seed: int = setting(0, type=non_negative_int, help="seed of every random draw and of the extractor")
    reference: str = setting("test", choices=REFERENCE_SPLITS,
                             help="the real split compared with (memorisation always uses train)")
    k: int = setting(PRDC_K, type=positive_int, help="neighbours for precision/recall/density/coverage")
    kid_subsets: int = setting(KID_SUBSETS, type=positive_int, help="KID rounds")
    kid_subset_size: int = setting(KID_SUBSET_SIZE, type=positive_int,
                                   help="images per set per KID round (capped at the set sizes)")
    memorization_threshold: float = setting(
        MEMORIZATION_THRESHOLD, type=non_negative_float,
        help="suspected copy when d(syn, nearest train) / d(that train image, its nearest other) is below "
             "this (default %(default).3f)")
    extractor_epochs: int = setting(None, type=positive_int, group=_EXTRACTOR, help="at most this many epochs")
    extractor_filters: int = setting(None, type=positive_int, group=_EXTRACTOR, help="ResNet20's initial filters")

    def measured_folder(self):
        """The folder measured: synthetic_dir, else our generated set Data/Synthetic/Exp_{exp}/{dataset}."""
        from Utils.paths import synthetic_dir

        return Path(self.synthetic_dir) if self.synthetic_dir else synthetic_dir(self.exp, dataset_spec(self).name)

    def extractor_config(self):
        """The ResNet20 extractor's ClassifierConfig when a flag changes it, else None (the default)."""
        if self.extractor_epochs is None and self.extractor_filters is None:
            return None
        from Metrics.features import feature_extractor_config

        config = feature_extractor_config()
        return dataclasses.replace(config, epochs=self.extractor_epochs or config.epochs,
                                   initial_filters=self.extractor_filters or config.initial_filters)


@dataclass(frozen=True)
class EvaluateResult:
    """What the quality stage measured.

    Attributes:
        folder_key: the folder's key in the results file.
        features: the extractor.
        results_file: `CAS Results/quality_exp{exp}.json`.
        result: every metric (`Metrics.quality.evaluate_synthetic`'s dict).
    """

    folder_key: str
    features: str
    results_file: Path
    result: dict


_COMPARED = ("num_samples", "seed", "reference_split", "k", "kid_subsets", "kid_subset_size",
             "memorization_threshold")


def is_done(settings):
    """A short reason when this folder's metrics with this extractor and these settings are recorded."""
    from Metrics.quality import folder_key
    from Utils.io import read_json
    from Utils.paths import quality_results_json

    key = folder_key(settings.measured_folder())
    table = read_json(quality_results_json(settings.exp), default={}) or {}
    entry = table.get(dataset_spec(settings).name, {}).get(key, {}).get(settings.features)
    if not isinstance(entry, dict):
        return None
    stored = entry.get("settings", {})
    wanted = {"num_samples": settings.num_samples, "seed": settings.seed, "reference_split": settings.reference,
              "k": settings.k, "kid_subsets": settings.kid_subsets, "kid_subset_size": settings.kid_subset_size,
              "memorization_threshold": settings.memorization_threshold}
    if any(stored.get(name, wanted[name]) != wanted[name] for name in _COMPARED):
        return None
    return f"quality metrics of {key} ({settings.features}) recorded"


def run(settings, log=print):
    """Measures the folder; returns an EvaluateResult. Bad input raises before anything is written."""
    from Metrics.quality import evaluate_synthetic, folder_key
    from Utils.paths import quality_results_json

    result = evaluate_synthetic(
        settings.dataset, settings.measured_folder(), exp=settings.exp, data_dir=settings.data_dir,
        features=settings.features, num_samples=settings.num_samples, seed=settings.seed,
        reference=settings.reference, extractor_config=settings.extractor_config(), k=settings.k,
        kid_subsets=settings.kid_subsets, kid_subset_size=settings.kid_subset_size,
        memorization_threshold=settings.memorization_threshold, splits=load_real(settings))
    for line in summary_lines(result):
        log(line)
    return EvaluateResult(folder_key=folder_key(settings.measured_folder()), features=settings.features,
                          results_file=quality_results_json(settings.exp), result=result)


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def summary_lines(result):
    """A short table: overall and per-class metrics, memorisation, where things were written."""
    from Utils.paths import quality_results_json

    settings = result["settings"]
    columns = ("fid", "kid_mean", "mmd2_gaussian", "precision", "recall", "density", "coverage")
    lines = ["", f"{settings['dataset']}: {settings['synthetic_dir']} vs real {settings['reference_split']} "
                 f"({settings['features']} features)",
             f"{'':>24} {'n_syn':>6} {'n_real':>6} " + " ".join(f"{c:>13}" for c in columns)]
    rows = [("overall", result["overall"])] + [
        (f"{label} {entry['name']}"[:24], entry) for label, entry in result["per_class"].items()]
    for name, entry in rows:
        lines.append(f"{name:>24} {entry.get('n_synthetic', 0):>6} {entry.get('n_real', 0):>6} "
                     + " ".join(f"{_fmt(entry.get(c)):>13}" for c in columns))
    overall = result["overall"]
    if "inception_score_mean" in overall:
        lines.append(f"Inception Score {overall['inception_score_mean']:.3f} ± {overall['inception_score_std']:.3f} "
                     f"(real {settings['reference_split']}: {overall['reference_inception_score_mean']:.3f})")
    if "label_agreement" in overall:
        lines.append(f"label agreement {overall['label_agreement']:.3f} "
                     f"(real {settings['reference_split']}: {overall['reference_label_agreement']:.3f})")
    memo = result["memorization"]
    lines.append(f"memorisation: {memo['num_suspected']}/{memo['num_synthetic']} suspected copies "
                 f"({100 * memo['suspected_share']:.1f} %, ratio < {memo['threshold']:.3f}); "
                 f"median ratio {memo['ratio_median']:.3f}")
    if "closest_pairs_png" in memo:
        lines.append(f"closest pairs: {memo['closest_pairs_png']}")
    lines.append(f"results: {quality_results_json(settings['exp'])}")
    return lines
