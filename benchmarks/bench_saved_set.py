"""CAS of a generated set kept by `bench_recipe.py --save_images`, under a chosen classifier protocol.

bench_recipe.py scores its sets with the `quick` budget's 8-epoch classifier (cheap, noisy); the
paper's figures come from its full protocol (batch 256, up to 100 epochs, early stopping on the real
validation split: `Models.classifier.ClassifierConfig`'s defaults). This script trains that
classifier on x1..xN of a saved set (and, with --with_real, on the real training split) and tests
it on the real test split, so the two protocols can be compared on the same images without
generating them again. Each run keeps its resume state under --checkpoint_root: a killed run
started again with the same arguments goes on from its last finished epoch. Rows (JSON lines)
are appended to --out.

    python benchmarks/bench_saved_set.py /tmp/retina/retina_small_s0.npz --dataset retinamnist \\
        --data_dir ../shared/data --multiples 1 --seed 0 --checkpoint_root /tmp/cas_paper
    python benchmarks/bench_saved_set.py SET.npz --dataset retinamnist --data_dir ../shared/data \\
        --protocol quick                 # the 8-epoch, batch-64 classifier bench_recipe.py used
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROTOCOLS = ("paper", "quick")


def classifier_config(protocol):
    """The paper's full protocol, or the `quick` budget's classifier (8 epochs at batch 64, as bench_recipe.py)."""
    from Models.classifier import ClassifierConfig
    from Pipeline.stages import BUDGETS

    if protocol == "paper":
        return ClassifierConfig()
    quick = BUDGETS["quick"]
    return ClassifierConfig(epochs=quick.classifier_epochs, batch_size=quick.classifier_batch_size)


def load_saved_set(path, num_classes):
    """(images, labels) of a `--save_images` file, checked: uint8 images, labels in range, same count."""
    import numpy as np

    try:
        with np.load(path) as saved:
            images, labels = saved["images"], saved["labels"].reshape(-1)
    except (OSError, KeyError, ValueError) as error:
        raise SystemExit(f"error: {path} is not a saved set (an npz with 'images' and 'labels'): {error}")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise SystemExit(f"error: {path}: want uint8 images (N, H, W, C) and N labels, "
                         f"got {images.dtype} {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise SystemExit(f"error: {path}: labels outside 0..{num_classes - 1}")
    return images, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("saved_set", help="an npz written by bench_recipe.py --save_images")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper")
    parser.add_argument("--multiples", default="1", help="which multiples to score, e.g. 1 or 1,3")
    parser.add_argument("--with_real", action="store_true", help="also the real training split, same protocol")
    parser.add_argument("--seed", type=int, default=0, help="the classifier's seed (initial weights, batch order)")
    parser.add_argument("--checkpoint_root", default=None, help="resume state per row (none: not resumable)")
    parser.add_argument("--out", default="bench_saved_set.jsonl")
    args = parser.parse_args(argv)
    try:
        multiples = sorted({int(k) for k in args.multiples.split(",")})
    except ValueError:
        raise SystemExit(f"error: --multiples wants whole numbers like 1,3, not {args.multiples!r}")
    if multiples[0] < 1:
        raise SystemExit("error: --multiples start at 1")

    import numpy as np

    from benchmarks.bench_recipe import multiple_indices, x1_counts
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Models.classifier import evaluate_classifier, train_classifier
    from Utils.io import append_json_line

    spec = get_spec(args.dataset)
    images, labels = load_saved_set(args.saved_set, spec.num_classes)
    splits = load_dataset(spec.name, data_dir=args.data_dir)
    if images.shape[1:] != splits.x_test.shape[1:]:
        raise SystemExit(f"error: {args.saved_set} holds {images.shape[1:]} images, {spec.name} is "
                         f"{splits.x_test.shape[1:]}")
    per_class_x1 = x1_counts(spec, splits, "balanced")
    available = int(np.min(np.bincount(labels, minlength=spec.num_classes) // np.maximum(per_class_x1, 1)))
    if multiples[-1] > available:
        raise SystemExit(f"error: {args.saved_set} holds x1..x{available}, not x{multiples[-1]}")

    config = classifier_config(args.protocol)
    rows = [("real", splits.x_train, splits.y_train)] if args.with_real else []
    for k in multiples:
        chosen = multiple_indices(labels, per_class_x1, k)
        rows.append((f"x{k}", images[chosen], labels[chosen]))
    for name, x, y in rows:
        checkpoint_dir = (Path(args.checkpoint_root) / f"{Path(args.saved_set).stem}_{name}_{args.protocol}"
                          f"_s{args.seed}" if args.checkpoint_root else None)
        started = time.perf_counter()
        model, history = train_classifier(x, y, splits.x_val, splits.y_val, spec.num_classes, config=config,
                                          seed=args.seed, checkpoint_dir=checkpoint_dir, verbose=2)
        scores = evaluate_classifier(model, splits.x_test, splits.y_test, spec.label_names)
        row = {"saved_set": str(args.saved_set), "dataset": spec.name, "set": name, "images": int(len(x)),
               "protocol": args.protocol, "classifier": config.to_dict(), "seed": args.seed,
               "top1": scores["top1"], "balanced_accuracy": scores["balanced_accuracy"],
               "epochs_run": history["epochs_run"], "best_epoch": history["best_epoch"],
               "wall_s": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        append_json_line(args.out, row)


if __name__ == "__main__":
    main()
