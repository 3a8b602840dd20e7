"""CAS: train a ResNet20 on real or synthetic images, test it on the real test split.

The paper's `classifier_training.py`. What it trains on:
  (no --synthetic)           the real training split                     → run "real"
  --synthetic --take N       N x (real training-set size) images from our generated
                             folder Data/Synthetic/Exp_{exp}/{dataset}/, balanced per
                             class (default N = 1)                       → run "xN"
  --synthetic_dir DIR        any folder of class sub-folders (another implementation's
                             output, ImageFolder layout); --take N as above, without
                             --take every readable image                → run "<DIR name>_xN" / "_all"
It always validates on the real validation split and tests on the real test split.

Writes (relative to $SDDG_OUTPUT_ROOT, else the current folder):
  Checkpoints/Classifiers/Exp_{exp}/{dataset}/{run}/   resnet20.weights.h5, history.csv, run.json
                                                       (resume_state.npz while training)
  CAS Results/test_accuracies_exp{exp}.json            top-1, top-5, per-class accuracy, confusion
                                                       matrix, ... merged under a lock
  CAS Results/cas_{dataset}_exp{exp}.png               ours against the paper's curve

A killed run resumes when the same command is run again. `--train` always
trains (a finished run's checkpoint is replaced at the end); `--no-train`
reuses the finished run's checkpoint.

Examples:
    python classifier_training.py --dataset retinamnist --data_dir ../shared/data
    python classifier_training.py --dataset cifar10 --exp 0 --synthetic --take 4
    python classifier_training.py --dataset cifar10 --synthetic_dir ~/other_impl/cifar10 --take 1
    python classifier_training.py --dataset cifar10 --synthetic --take 4 --no-train   # test again
    python classifier_training.py --dataset digits --epochs 20 --batch_size 64
"""

import argparse
import sys

from Utils.cli import (ArgumentParser, UserError, existing_folder, folder, non_negative_int,
                       positive_int, run_cli)
from Utils.runtime import add_runtime_flags, configure_runtime, distribution_scope

parser = ArgumentParser(description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", required=True, help="registry name, e.g. cifar10, retinamnist, digits")
parser.add_argument("--exp", type=non_negative_int, default=0, help="experiment number (output folders, results file)")
parser.add_argument("--synthetic", action="store_true",
                    help="train on our generated images, Data/Synthetic/Exp_{exp}/{dataset}/")
parser.add_argument("--synthetic_dir", type=existing_folder, default=None,
                    help="train on any folder of class sub-folders instead (implies --synthetic)")
parser.add_argument("--take", type=positive_int, default=None,
                    help="synthetic training set size, in multiples of the real training split "
                         "(default 1 for --synthetic; every image for --synthetic_dir)")
parser.add_argument("--run_name", default=None,
                    help="results key and checkpoint folder name (default: real, x{take}, <folder>_x{take})")
parser.add_argument("--batch_size", type=positive_int, default=256, help="default 256 (the paper)")
parser.add_argument("--epochs", type=positive_int, default=100,
                    help="maximum epochs, early stopping may end sooner (default 100, the paper)")
parser.add_argument("--classifier", choices=["resnet20"], default="resnet20")
parser.add_argument("--initial_filters", type=positive_int, default=64,
                    help="ResNet20 first-stage width (default 64, the paper; the usual ResNet20 has 16)")
parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                    help="train (resuming a killed run), or with --no-train load the finished checkpoint")
parser.add_argument("--test", action=argparse.BooleanOptionalAction, default=True,
                    help="test on the real test split and record the CAS result (default on)")
parser.add_argument("--data_dir", type=folder, default=None,
                    help="folder with the real dataset files (default $SDDG_DATA_DIR or the cache)")
parser.add_argument("--seed", type=non_negative_int, default=0, help="initial weights, batch order and synthetic subset")
add_runtime_flags(parser)


def main(argv=None):
    args = parser.parse_args(argv)
    if not args.train and not args.test:
        raise UserError("nothing to do: --no-train and --no-test")
    synthetic = args.synthetic or args.synthetic_dir is not None
    if args.take is not None and not synthetic:
        raise UserError("--take applies to synthetic data: add --synthetic or --synthetic_dir")
    if args.run_name is not None and not args.run_name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--run_name may hold letters, digits, '-', '_' and '.' only, got {args.run_name!r}")

    # Imports after parsing: --help and argument errors stay fast.
    from pathlib import Path

    from Data.images import RESIZE_METHOD
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Data.shards import require_complete
    from Data.synthetic import format_report, load_image_folder
    from Metrics.cas import plot_cas, record_cas, run_key_for
    from Utils.paths import classifier_checkpoint_dir, synthetic_dir

    spec = get_spec(args.dataset)
    take = args.take if args.take is not None or args.synthetic_dir else (1 if synthetic else None)
    folder = None
    if synthetic:
        folder = Path(args.synthetic_dir).expanduser() if args.synthetic_dir else synthetic_dir(args.exp, spec.name)
        if not folder.is_dir():
            raise UserError(f"synthetic data folder {folder} does not exist"
                            + ("" if args.synthetic_dir else " (run generate_dataset.py first)"))
        require_complete(folder)  # a CAS on a half-generated set would score the missing shards too
    run_key = args.run_name or run_key_for(take, synthetic, folder.name if args.synthetic_dir else None)
    checkpoint_dir = classifier_checkpoint_dir(args.exp, spec.name, run_key)

    splits = load_dataset(spec.name, data_dir=args.data_dir)
    print(f"{spec.name}: real train {len(splits.y_train)}, val {len(splits.y_val)}, "
          f"test {len(splits.y_test)}; run '{run_key}' → {checkpoint_dir}")

    if not args.train and not (checkpoint_dir / "run.json").is_file():
        raise UserError(f"no trained classifier in {checkpoint_dir}: run once with --train first")
    if args.train and synthetic:
        n_wanted = take * len(splits.y_train) if take is not None else None
        x_train, y_train, report = load_image_folder(folder, spec, take=n_wanted, seed=args.seed)
        for line in format_report(report):
            print(line)

    # Keras (and TensorFlow) only now: bad input above fails within a second.
    from Models.classifier import ClassifierConfig, evaluate_classifier, load_classifier, train_classifier

    if not args.train:
        model, run = load_classifier(checkpoint_dir)
        if tuple(run["input_shape"]) != splits.x_test.shape[1:] or run["num_classes"] != spec.num_classes:
            raise UserError(f"{checkpoint_dir} holds a classifier for {run['input_shape']} images and "
                            f"{run['num_classes']} classes, not {spec.name}'s")
    else:
        if synthetic:
            metadata = {"source": str(folder), "resize_method": RESIZE_METHOD,
                        "synthetic_report": _short_report(report)}
        else:
            x_train, y_train = splits.x_train, splits.y_train
            metadata = {"source": f"real {spec.name} train split"}
        metadata.update({"dataset": spec.name, "exp": args.exp, "run_key": run_key, "take": take})
        config = ClassifierConfig(classifier=args.classifier, epochs=args.epochs, batch_size=args.batch_size,
                                  initial_filters=args.initial_filters,
                                  jit_compile=True if args.xla else "auto")
        configure_runtime(seed=args.seed, mixed_precision=args.mixed_precision, xla=args.xla)
        with distribution_scope(args.multi_gpu):
            model, history = train_classifier(
                x_train, y_train, splits.x_val, splits.y_val, spec.num_classes, config=config,
                seed=args.seed, checkpoint_dir=checkpoint_dir, metadata=metadata,
                verbose=1 if sys.stdout.isatty() else 2)
        run = {**metadata, "n_train": len(y_train), "epochs_run": history["epochs_run"],
               "best_epoch": history["best_epoch"], "seed": args.seed, "config": config.to_dict()}
        print(f"trained {history['epochs_run']} epochs, best validation accuracy "
              f"{max(history['val_accuracy']):.4f} at epoch {history['best_epoch']}")

    if args.test:
        result = evaluate_classifier(model, splits.x_test, splits.y_test, spec.label_names)
        cfg = run.get("config", {})
        result.update({
            "n_train": run.get("n_train"), "epochs_run": run.get("epochs_run"),
            "best_epoch": run.get("best_epoch"), "seed": run.get("seed"),
            "classifier": cfg.get("classifier"), "initial_filters": cfg.get("initial_filters"),
            "batch_size": cfg.get("batch_size"), "max_epochs": cfg.get("epochs"),
            "source": run.get("source"), "take": run.get("take"),
        })
        if "resize_method" in run:
            result["resize_method"] = run["resize_method"]
            result["synthetic_report"] = run.get("synthetic_report")
        results_file = record_cas(args.exp, spec.name, run_key, result)
        plot = plot_cas(args.exp, spec.name)
        print(f"test ({result['n']} real images): top-1 {result['top1']:.4f}, "
              f"top-{result['top_k']} {result['top5']:.4f} → {results_file} [{spec.name}][{run_key}], {plot}")
    return 0


def _short_report(report, keep=20):
    """The folder report with long file lists cut to `keep` entries (their full length kept as a count)."""
    short = {}
    for key, value in report.items():
        if isinstance(value, list) and len(value) > keep:
            short[key] = value[:keep]
            short[f"{key}_count"] = len(value)
        else:
            short[key] = value
    return short


if __name__ == "__main__":
    run_cli(main)
