"""What a training stage costs before its first step: building the model, the first `fit`, then steady steps.

A from-scratch preset's trainer (random weights, grey 8-px images as digits), compiled as
`SD_adapting.py` compiles it (the paper's optimiser, the moving average, the optimizer built
before `fit`). The first `fit` of `--first_steps` steps holds TensorFlow's trace of the train step
and its first execution (graph optimisation); the second `fit` of `--steps` steps is the steady
cost. `--profile` prints where the first `fit` spends its time (cProfile, cumulative; the
profiler itself slows tracing down).

    python benchmarks/bench_first_step.py                   # tiny
    python benchmarks/bench_first_step.py --preset small --profile
"""

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--first_steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import numpy as np

    from Models.diffusion.optimizer import make_optimizer
    from Models.diffusion.trainer import DiffusionTrainer, TrainBatches

    rng = np.random.default_rng(0)
    n = args.batch_size * max(args.first_steps, args.steps)
    images = rng.integers(0, 256, (n, 8, 8, 1), dtype="uint8")
    labels = rng.integers(0, 10, n)

    start = time.perf_counter()
    trainer = DiffusionTrainer.from_preset(args.preset, num_classes=10, image_size=8, stage="enc", image_channels=1)
    trainer.compile(optimizer=make_optimizer(1e-3, total_steps=1000, ema_decay=trainer.preset.ema_decay))
    trainer.optimizer.build(trainer.trainable_variables)
    built = time.perf_counter() - start

    first = TrainBatches(images[:args.batch_size * args.first_steps], labels[:args.batch_size * args.first_steps],
                         batch_size=args.batch_size, image_size=8)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    trainer.fit(first, epochs=1, verbose=0)
    if profiler:
        profiler.disable()
    first_fit = time.perf_counter() - start

    steady = TrainBatches(images[:args.batch_size * args.steps], labels[:args.batch_size * args.steps],
                          batch_size=args.batch_size, image_size=8)
    start = time.perf_counter()
    trainer.fit(steady, epochs=1, verbose=0)
    per_step = (time.perf_counter() - start) / args.steps

    print(f"{args.preset}: {len(trainer.trainable_variables)} trained variables; build {built:.1f} s; "
          f"first fit ({args.first_steps} steps) {first_fit:.1f} s; steady {per_step * 1000:.0f} ms per step "
          f"(batch {args.batch_size})")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
