"""The main command's classifier trainings with and without a `ClassifierPool`, side by side.

`reproduce.py` trains six ResNet20s on digits with the quick budget: two 4-epoch tuning
classifiers on 250 images in each study, then the 8-epoch CAS classifiers of the real and the x1
sets (1,077 images), batch 64, seed 0, the Keras session cleared between stages. Each new model
traces and optimises its train step in its first epoch; a pool lends the compiled model of the
training before, reset to a fresh model's weights and optimizer state.

Each round runs the whole sequence once per mode in a fresh process (the cost is per process),
alternating; the table gives the medians, and the trained weights' digests, which must agree
between the modes (same seed, same weights).

    python benchmarks/bench_classifier_pool.py                 # 3 rounds
    python benchmarks/bench_classifier_pool.py --rounds 1 --cas_images 300
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("fresh", "pool")
# The main command's trainings in order: (stage, epochs), the first four on a trial's images.
SEQUENCE = (("tune_enc", 4), ("tune_enc", 4), ("tune_dif", 4), ("tune_dif", 4), ("cas_real", 8), ("cas_x1", 8))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--trial_images", type=int, default=250, help="images per tuning classifier (quick: 250)")
parser.add_argument("--cas_images", type=int, default=None, help="images per CAS classifier (default: the "
                                                                   "whole training split)")
parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)


def trainings(args, splits):
    """SEQUENCE with its images: (stage, images, labels, epochs)."""
    n, cas = args.trial_images, args.cas_images or len(splits.y_train)
    x, y = splits.x_train, splits.y_train
    # Each trial trains on other images (slices of the split stand in for generated ones); the two
    # CAS runs on the first and the last `cas` images.
    data = [(x[k * n:][:n], y[k * n:][:n]) for k in range(4)] + [(x[:cas], y[:cas]), (x[-cas:], y[-cas:])]
    return [(stage, *images, epochs) for (stage, epochs), images in zip(SEQUENCE, data)]


def child(args):
    import keras
    import numpy as np

    from Data.loaders import load_dataset
    from Models.classifier import ClassifierConfig, ClassifierPool, train_classifier

    splits = load_dataset("digits")
    pool = ClassifierPool() if args.child == "pool" else None
    seconds, digests, stage_before = [], [], None
    for stage, x, y, epochs in trainings(args, splits):
        if stage_before is not None and stage != stage_before:
            keras.backend.clear_session()  # what the pipeline does between stages
        stage_before = stage
        config = ClassifierConfig(epochs=epochs, batch_size=64)
        started = time.perf_counter()
        model, _ = train_classifier(x, y, splits.x_val, splits.y_val, splits.spec.num_classes, config=config,
                                    seed=0, verbose=0, pool=pool)
        seconds.append(time.perf_counter() - started)
        digest = hashlib.blake2b(digest_size=8)
        for weights in model.get_weights():
            digest.update(np.ascontiguousarray(weights).tobytes())
        digests.append(digest.hexdigest())
    print(json.dumps({"seconds": seconds, "digests": digests}))


def main(argv=None):
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.rounds < 1 or args.trial_images < 1 or (args.cas_images is not None and args.cas_images < 1):
        raise SystemExit("error: --rounds, --trial_images and --cas_images must be at least 1")
    command = [sys.executable, __file__, "--trial_images", str(args.trial_images)]
    if args.cas_images:
        command += ["--cas_images", str(args.cas_images)]
    runs = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            started = time.perf_counter()
            out = subprocess.run([*command, "--child", mode], check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            result["process"] = time.perf_counter() - started
            runs[mode].append(result)
            print(f"round {round_ + 1} {mode}: trainings {sum(result['seconds']):.1f} s, "
                  f"process {result['process']:.1f} s", flush=True)

    digests = {tuple(r["digests"]) for mode in MODES for r in runs[mode]}
    print(f"\n{args.rounds} rounds, medians (s)\n")
    print("| training | " + " | ".join(MODES) + " | pool / fresh |")
    print("| --- | --- | --- | --- |")
    rows = [(f"{k + 1}. {stage}", [statistics.median(r["seconds"][k] for r in runs[m]) for m in MODES])
            for k, (stage, _) in enumerate(SEQUENCE)]
    rows.append(("all six trainings", [statistics.median(sum(r["seconds"]) for r in runs[m]) for m in MODES]))
    rows.append(("whole process", [statistics.median(r["process"] for r in runs[m]) for m in MODES]))
    for name, (fresh, pooled) in rows:
        print(f"| {name} | {fresh:.2f} | {pooled:.2f} | {pooled / fresh:.2f} |")
    print(f"\ntrained weights: {'the same in every run' if len(digests) == 1 else 'DIFFERENT between runs'}")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
