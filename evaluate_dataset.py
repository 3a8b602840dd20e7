"""Measures a synthetic dataset against the real one: FID, KID, MMD, IS, PRDC, memorisation.

Works on our generated folders and on any folder of class sub-folders (a
PyTorch pipeline's ImageFolder output included: `Data/synthetic.py` says how
folder names map to labels). Every metric is computed overall and per class
from the embeddings of one extractor (`Metrics/features.py`), against the real
TEST split by default; `Metrics/quality.py` documents each metric.

    # our generated images, with the ResNet20 extractor (trained once on the real
    # train split and cached under Checkpoints/Classifiers/Exp_0/<dataset>/feature_extractor/)
    python evaluate_dataset.py --dataset retinamnist --synthetic_dir Data/Synthetic/Exp_0/retinamnist
    # another implementation's folder, with InceptionV3 (ImageNet) features
    python evaluate_dataset.py --dataset cifar10 --synthetic_dir ../torch_run/samples --features inception

Writes: `CAS Results/quality_exp{exp}.json` (merged, keyed by dataset, folder
and extractor) and a PNG of the most copy-like synthetic/training pairs under
`CAS Results/quality_exp{exp}/{dataset}/`.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Metrics.features import FEATURE_EXTRACTORS  # noqa: E402
from Metrics.memorization import MEMORIZATION_THRESHOLD  # noqa: E402
from Metrics.quality import (DEFAULT_NUM_SAMPLES, KID_SUBSET_SIZE, KID_SUBSETS, PRDC_K,  # noqa: E402
                             REFERENCE_SPLITS, evaluate_synthetic)
from Utils.cli import (ArgumentParser, existing_folder, folder, non_negative_float,  # noqa: E402
                       non_negative_int, positive_int, run_cli)

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", required=True, help="a registered dataset (Data/registry.py)")
parser.add_argument("--synthetic_dir", type=existing_folder, required=True, help="a folder of class sub-folders of images")
parser.add_argument("--exp", type=non_negative_int, default=0, help="experiment number: results file and extractor cache (default 0)")
parser.add_argument("--data_dir", type=folder, default=None, help="where the real data lives (default: $SDDG_DATA_DIR or the cache)")
parser.add_argument("--features", choices=FEATURE_EXTRACTORS, default="resnet20",
                    help="embedding network: resnet20 (trained on the real train split; offline; "
                         "MedMNIST) or inception (InceptionV3, ImageNet weights) (default resnet20)")
parser.add_argument("--num_samples", type=positive_int, default=DEFAULT_NUM_SAMPLES,
                    help=f"at most this many synthetic (class-balanced) and reference images "
                         f"(default {DEFAULT_NUM_SAMPLES})")
parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of every random draw and of the extractor (default 0)")
parser.add_argument("--reference", choices=REFERENCE_SPLITS, default="test",
                    help="the real split compared with (default test; memorisation always uses train)")
parser.add_argument("--k", type=positive_int, default=PRDC_K, help=f"neighbours for precision/recall/density/coverage (default {PRDC_K})")
parser.add_argument("--kid_subsets", type=positive_int, default=KID_SUBSETS, help=f"KID rounds (default {KID_SUBSETS})")
parser.add_argument("--kid_subset_size", type=positive_int, default=KID_SUBSET_SIZE,
                    help=f"images per set per KID round (default {KID_SUBSET_SIZE}, capped at the set sizes)")
parser.add_argument("--memorization_threshold", type=non_negative_float, default=MEMORIZATION_THRESHOLD,
                    help="suspected copy when d(syn, nearest train) / d(that train image, its nearest "
                         f"other) is below this (default {MEMORIZATION_THRESHOLD:.3f})")
extractor_group = parser.add_argument_group("the resnet20 extractor's training (default: the fast config of Metrics/features.py)")
extractor_group.add_argument("--extractor_epochs", type=positive_int, default=None, help="at most this many epochs")
extractor_group.add_argument("--extractor_filters", type=positive_int, default=None, help="ResNet20's initial filters")


def main(argv=None):
    args = parser.parse_args(argv)
    config = None
    if args.extractor_epochs is not None or args.extractor_filters is not None:
        import dataclasses

        from Metrics.features import feature_extractor_config

        config = feature_extractor_config()
        config = dataclasses.replace(
            config, epochs=args.extractor_epochs or config.epochs,
            initial_filters=args.extractor_filters or config.initial_filters)
    result = evaluate_synthetic(
        args.dataset, args.synthetic_dir, exp=args.exp, data_dir=args.data_dir, features=args.features,
        num_samples=args.num_samples, seed=args.seed, reference=args.reference, extractor_config=config,
        k=args.k, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        memorization_threshold=args.memorization_threshold)
    print_summary(result)
    return 0


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(result):
    """A short table on stdout: overall and per-class metrics, memorisation, where things were written."""
    from Utils.paths import quality_results_json

    settings = result["settings"]
    columns = ("fid", "kid_mean", "mmd2_gaussian", "precision", "recall", "density", "coverage")
    print(f"\n{settings['dataset']}: {settings['synthetic_dir']} vs real {settings['reference_split']} "
          f"({settings['features']} features)")
    print(f"{'':>24} {'n_syn':>6} {'n_real':>6} " + " ".join(f"{c:>13}" for c in columns))
    rows = [("overall", result["overall"])] + [
        (f"{label} {entry['name']}"[:24], entry) for label, entry in result["per_class"].items()]
    for name, entry in rows:
        print(f"{name:>24} {entry.get('n_synthetic', 0):>6} {entry.get('n_real', 0):>6} "
              + " ".join(f"{_fmt(entry.get(c)):>13}" for c in columns))
    overall = result["overall"]
    if "inception_score_mean" in overall:
        print(f"Inception Score {overall['inception_score_mean']:.3f} ± {overall['inception_score_std']:.3f} "
              f"(real {settings['reference_split']}: {overall['reference_inception_score_mean']:.3f})")
    if "label_agreement" in overall:
        print(f"label agreement {overall['label_agreement']:.3f} "
              f"(real {settings['reference_split']}: {overall['reference_label_agreement']:.3f})")
    memo = result["memorization"]
    print(f"memorisation: {memo['num_suspected']}/{memo['num_synthetic']} suspected copies "
          f"({100 * memo['suspected_share']:.1f} %, ratio < {memo['threshold']:.3f}); "
          f"median ratio {memo['ratio_median']:.3f}")
    if "closest_pairs_png" in memo:
        print(f"closest pairs: {memo['closest_pairs_png']}")
    print(f"results: {quality_results_json(settings['exp'])}")


if __name__ == "__main__":
    run_cli(main)
