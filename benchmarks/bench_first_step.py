"""What a training stage costs before its first step: building the model, the first `fit`, then steady steps.

A from-scratch preset's trainer (random weights, grey 8-px images as digits by default), compiled as
`SD_adapting.py` compiles it (the paper's optimiser, the moving average, the optimizer built
before `fit`). The first `fit` of `--first_steps` steps holds TensorFlow's trace of the train step
and its first execution (graph optimisation); the second `fit` of `--steps` steps is the steady
cost. `--profile` prints where the first `fit` spends its time (cProfile, cumulative; the
profiler itself slows tracing down). `--count_ops` adds how many graph operations TensorFlow
created while tracing the first `fit` (each one traced and then optimised before the first step).

`--vs_keras_step` measures the project's optimizer (`PaperAdam`: the step's scalars once per
step) against the same optimizer with Keras' own step (every scalar again for each variable),
each run in a fresh process, alternating, `--rounds` times; medians, the ratio, and whether the
trained weights are equal.

    python benchmarks/bench_first_step.py                   # tiny
    python benchmarks/bench_first_step.py --preset small --profile
    python benchmarks/bench_first_step.py --vs_keras_step --rounds 5
    python benchmarks/bench_first_step.py --count_ops
    python benchmarks/bench_first_step.py --grappler '{"constant_folding": false}' --json

`--grappler` sets TensorFlow's graph optimiser options (`tf.config.optimizer.set_experimental_options`,
e.g. `{"disable_meta_optimizer": true}` or one pass off) before anything is built, to measure what
the optimiser costs the first fit and gives the steady step; the weights' digest says whether the
option changes the trained values.
"""

import argparse
import collections
import contextlib
import cProfile
import hashlib
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=8, help="random images of this size (default: 8 px)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3), help="grey (default) or RGB images")
    parser.add_argument("--first_steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--count_ops", action="store_true",
                        help="count the graph operations traced in the first fit (TensorFlow only)")
    parser.add_argument("--keras_step", action="store_true",
                        help="the optimizer with Keras' own step (every scalar per variable)")
    parser.add_argument("--vs_keras_step", action="store_true",
                        help="ours against --keras_step, fresh processes, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="with --vs_keras_step: runs of each")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --vs_keras_step)")
    parser.add_argument("--save_weights", default=None, help="write the trained weights to this .npz")
    parser.add_argument("--grappler", type=grappler_options, default={},
                        help="JSON object of TensorFlow graph optimiser options to set first (TensorFlow only)")
    args = parser.parse_args()
    if args.image_size < 1:
        raise SystemExit(f"error: --image_size must be at least 1, not {args.image_size}")
    if args.vs_keras_step:
        return side_by_side(args)

    import keras
    import numpy as np

    if args.grappler:
        if keras.backend.backend() != "tensorflow":
            raise SystemExit("error: --grappler is for the TensorFlow backend")
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options(args.grappler)
        unknown = sorted(set(args.grappler) - set(tf.config.optimizer.get_experimental_options()))
        if unknown:  # TensorFlow ignores a name it does not know, which would measure the default
            raise SystemExit(f"error: --grappler: TensorFlow has no graph optimiser option {', '.join(unknown)}")

    from Models.diffusion.optimizer import AdamWithEMA, make_optimizer
    from Models.diffusion.trainer import DiffusionTrainer, TrainBatches

    class KerasOwnStep(AdamWithEMA):
        def _backend_apply_gradients(self, grads, trainable_variables):
            keras.optimizers.Adam._backend_apply_gradients(self, grads, trainable_variables)

    rng = np.random.default_rng(0)
    n = args.batch_size * max(args.first_steps, args.steps)
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, args.channels), dtype="uint8")
    labels = rng.integers(0, 10, n)

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    trainer = DiffusionTrainer.from_preset(args.preset, num_classes=10, image_size=args.image_size, stage="enc",
                                           image_channels=args.channels)
    optimizer = make_optimizer(1e-3, total_steps=1000, ema_decay=trainer.preset.ema_decay)
    if args.keras_step:
        optimizer = KerasOwnStep.from_config(optimizer.get_config())
    trainer.compile(optimizer=optimizer)
    trainer.optimizer.build(trainer.trainable_variables)
    built = time.perf_counter() - start

    first = TrainBatches(images[:args.batch_size * args.first_steps], labels[:args.batch_size * args.first_steps],
                         batch_size=args.batch_size, image_size=args.image_size)
    profiler = cProfile.Profile() if args.profile else None
    traced_ops = count_traced_ops() if args.count_ops else contextlib.nullcontext()
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    with traced_ops as op_counts:
        trainer.fit(first, epochs=1, verbose=0)
    if profiler:
        profiler.disable()
    first_fit = time.perf_counter() - start

    steady = TrainBatches(images[:args.batch_size * args.steps], labels[:args.batch_size * args.steps],
                          batch_size=args.batch_size, image_size=args.image_size)
    start = time.perf_counter()
    trainer.fit(steady, epochs=1, verbose=0)
    per_step = (time.perf_counter() - start) / args.steps

    weights = [keras.ops.convert_to_numpy(v) for v in trainer.trainable_variables]
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    if args.save_weights:
        np.savez(args.save_weights, *weights)
    if args.json:
        print(json.dumps({"build_s": built, "first_fit_s": first_fit, "step_s": per_step, "weights": digest,
                          **({"grappler": args.grappler} if args.grappler else {}),
                          **({"traced_ops": sum(op_counts.values())} if args.count_ops else {})}))
        return
    print(f"{args.preset}: {len(trainer.trainable_variables)} trained variables; build {built:.1f} s; "
          f"first fit ({args.first_steps} steps) {first_fit:.1f} s; steady {per_step * 1000:.0f} ms per step "
          f"(batch {args.batch_size}); weights sha256 {digest[:12]}")
    if args.count_ops:
        print(f"graph operations traced in the first fit: {sum(op_counts.values()):,} "
              f"(most common: {', '.join(f'{k} {v}' for k, v in op_counts.most_common(6))})")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)


def grappler_options(text):
    """`--grappler`: a JSON object of option name -> true/false (or an int, e.g. min_graph_nodes)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, (bool, int)) for k, v in options.items()):
        raise argparse.ArgumentTypeError('expected a JSON object of option -> true/false, e.g. {"constant_folding": false}')
    return options


@contextlib.contextmanager
def count_traced_ops():
    """Counts, by type, every operation TensorFlow adds to a traced graph within the block.

    TensorFlow has no public count of a `tf.function`'s nested graphs, so this wraps the one
    method every traced operation goes through (`FuncGraph._create_op_internal`, private).
    """
    from tensorflow.python.framework import func_graph

    counts = collections.Counter()
    original = func_graph.FuncGraph._create_op_internal

    def counting(graph, op_type, *args, **kwargs):
        counts[op_type] += 1
        return original(graph, op_type, *args, **kwargs)

    func_graph.FuncGraph._create_op_internal = counting
    try:
        yield counts
    finally:
        func_graph.FuncGraph._create_op_internal = original


def side_by_side(args):
    """Fresh processes (a first fit is only first once per process), ours and Keras' step alternating."""
    base = [sys.executable, __file__, "--preset", args.preset, "--batch_size", str(args.batch_size),
            "--first_steps", str(args.first_steps), "--steps", str(args.steps), "--image_size", str(args.image_size),
            "--channels", str(args.channels), "--json",
            *(["--grappler", json.dumps(args.grappler)] if args.grappler else [])]
    runs = {"ours": [], "keras": []}
    for _ in range(args.rounds):
        for name, extra in (("ours", []), ("keras", ["--keras_step"])):
            done = subprocess.run(base + extra, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, batch {args.batch_size}, medians of {args.rounds} fresh processes each, alternating")
    print("| optimizer step | build s | first fit s | steady ms per step |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for name, label in (("keras", "Keras' own (scalars per variable)"), ("ours", "PaperAdam (scalars once per step)")):
        medians[name] = {k: statistics.median(r[k] for r in runs[name]) for k in ("build_s", "first_fit_s", "step_s")}
        m = medians[name]
        print(f"| {label} | {m['build_s']:.1f} | {m['first_fit_s']:.1f} | {m['step_s'] * 1000:.0f} |")
    print(f"first fit: Keras' / ours = {medians['keras']['first_fit_s'] / medians['ours']['first_fit_s']:.2f}; "
          f"steady step: {medians['keras']['step_s'] / medians['ours']['step_s']:.2f}")
    digests = {name: {r["weights"] for r in runs[name]} for name in runs}
    print("trained weights: " + "; ".join(
        f"{name} {'the same in every run' if len(d) == 1 else f'{len(d)} different results'}"
        for name, d in digests.items()) + "; ours against Keras' "
        + ("equal" if digests["ours"] == digests["keras"] else
           "different (TensorFlow's graph optimiser rounds the two graphs differently; equal with it off)"))


if __name__ == "__main__":
    main()
