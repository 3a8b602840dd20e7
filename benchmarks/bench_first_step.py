"""What a training stage costs before its first step: building the model, the first `fit`, then steady steps.

A from-scratch preset's trainer (random weights, grey 8-px images as digits by default), compiled as
`SD_adapting.py` compiles it (the paper's optimiser, the moving average, the optimizer built
before `fit`). The first `fit` of `--first_steps` steps holds TensorFlow's trace of the train step
and its first execution (graph optimisation); the second `fit` of `--steps` steps is the steady
cost. `--profile` prints where the first `fit` spends its time (cProfile, cumulative; the
profiler itself slows tracing down). `--count_ops` adds how many graph operations TensorFlow
created while tracing the first `fit` (each one traced and then optimised before the first step).

`--step` picks the optimizer's step: `flat` (`PaperAdam`'s scalars once per step, its state in flat
vectors updated at once: what `make_optimizer` gives a short run), `per_variable` (the same scalars
once, Keras' one state slot per variable, each updated on its own: what a training run gets) or
`keras` (Keras' own step: every scalar again for each variable). `--vs_keras_step` runs the three,
each in a fresh process, alternating, `--rounds` times; medians, the ratios, and whether the
trained weights are equal. Steady steps drift on a shared VM by more than the steps differ, so
`--steady_interleaved` builds a `flat` and a `per_variable` trainer in one process and alternates
epochs of `--steps` steps between them, `--rounds` times: the medians and their ratio.

`--vs_malloc_patch` runs the `--step` given in fresh processes, alternating, `--rounds` times each,
with TensorFlow's 128 KB mmap threshold kept (`SDDG_TF_MALLOC_PATCH=keep`) and undone (the default,
`Utils.runtime.keep_tensor_buffers_on_heap`): medians of the first fit, the steady step, the minor
page faults and the peak RSS of each process, and whether the trained weights are equal.

    python benchmarks/bench_first_step.py                   # tiny
    python benchmarks/bench_first_step.py --preset small --profile
    python benchmarks/bench_first_step.py --vs_keras_step --rounds 5
    python benchmarks/bench_first_step.py --preset small --steady_interleaved --steps 20 --rounds 15
    python benchmarks/bench_first_step.py --preset small --step per_variable --vs_malloc_patch --rounds 3 --steps 160
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

import numpy as np

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
    parser.add_argument("--step", choices=STEPS, default="flat",
                        help="the optimizer's step: flat (default), per_variable, keras")
    parser.add_argument("--vs_keras_step", action="store_true",
                        help="the three --step choices side by side, fresh processes, alternating")
    parser.add_argument("--steady_interleaved", action="store_true",
                        help="flat against per_variable steady steps, one process, epochs alternating")
    parser.add_argument("--vs_malloc_patch", action="store_true",
                        help="TensorFlow's mmap threshold kept against undone, fresh processes, alternating")
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --vs_keras_step or --vs_malloc_patch: runs of each; "
                             "with --steady_interleaved: epochs of each")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --vs_keras_step)")
    parser.add_argument("--save_weights", default=None, help="write the trained weights to this .npz")
    parser.add_argument("--grappler", type=grappler_options, default={},
                        help="JSON object of TensorFlow graph optimiser options to set first (TensorFlow only)")
    args = parser.parse_args()
    if args.image_size < 1:
        raise SystemExit(f"error: --image_size must be at least 1, not {args.image_size}")
    if args.vs_keras_step:
        return side_by_side(args)
    if args.vs_malloc_patch:
        return malloc_patch_side_by_side(args)
    if args.steady_interleaved:
        return steady_interleaved(args)

    import keras

    if args.grappler:
        if keras.backend.backend() != "tensorflow":
            raise SystemExit("error: --grappler is for the TensorFlow backend")
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options(args.grappler)
        unknown = sorted(set(args.grappler) - set(tf.config.optimizer.get_experimental_options()))
        if unknown:  # TensorFlow ignores a name it does not know, which would measure the default
            raise SystemExit(f"error: --grappler: TensorFlow has no graph optimiser option {', '.join(unknown)}")

    from Models.diffusion.trainer import TrainBatches

    images, labels = random_images(args)
    start = time.perf_counter()
    trainer = compiled_trainer(args, args.step)
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


STEPS = ("flat", "per_variable", "keras")
STEP_LABELS = {"flat": "PaperAdam, flat state (short runs)",
               "per_variable": "PaperAdam, one state slot per variable (training runs)",
               "keras": "Keras' own (scalars per variable)"}


def random_images(args):
    rng = np.random.default_rng(0)
    n = args.batch_size * max(args.first_steps, args.steps)
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, args.channels), dtype="uint8")
    return images, rng.integers(0, 10, n)


def compiled_trainer(args, step):
    """The preset's trainer, seed 0, compiled as `SD_adapting.py` compiles it, with `step`'s optimizer."""
    import keras

    from Models.diffusion.optimizer import AdamWithEMA, make_optimizer
    from Models.diffusion.trainer import DiffusionTrainer

    class KerasOwnStep(AdamWithEMA):
        def _backend_apply_gradients(self, grads, trainable_variables):
            keras.optimizers.Adam._backend_apply_gradients(self, grads, trainable_variables)

    keras.utils.set_random_seed(0)
    trainer = DiffusionTrainer.from_preset(args.preset, num_classes=10, image_size=args.image_size, stage="enc",
                                           image_channels=args.channels)
    optimizer = make_optimizer(1e-3, total_steps=100_000, ema_decay=trainer.preset.ema_decay,
                               flat_state=step == "flat")
    if step == "keras":
        optimizer = KerasOwnStep.from_config(optimizer.get_config())  # per-variable slots, as in its config
    trainer.compile(optimizer=optimizer)
    trainer.optimizer.build(trainer.trainable_variables)
    return trainer


def steady_interleaved(args):
    """Steady steps of the flat and the per-variable state in one process, epochs alternating."""
    from Models.diffusion.trainer import TrainBatches

    images, labels = random_images(args)
    batches = TrainBatches(images[:args.batch_size * args.steps], labels[:args.batch_size * args.steps],
                           batch_size=args.batch_size, image_size=args.image_size)
    trainers = {step: compiled_trainer(args, step) for step in ("flat", "per_variable")}
    for trainer in trainers.values():
        trainer.fit(batches, epochs=1, verbose=0)  # the trace and the graph optimisation
    per_step = {step: [] for step in trainers}
    for _ in range(args.rounds):
        for step, trainer in trainers.items():
            start = time.perf_counter()
            trainer.fit(batches, epochs=1, verbose=0)
            per_step[step].append((time.perf_counter() - start) / len(batches))
    medians = {step: statistics.median(times) for step, times in per_step.items()}
    print(f"{args.preset}, {args.image_size} px, {args.channels} channel(s), batch {args.batch_size}: "
          f"medians of {args.rounds} alternating epochs of {len(batches)} steps in one process")
    for step, times in per_step.items():
        print(f"  {STEP_LABELS[step]}: {medians[step] * 1000:.1f} ms per step "
              f"(epochs {min(times) * 1000:.0f}-{max(times) * 1000:.0f})")
    print(f"  flat / per_variable: {medians['flat'] / medians['per_variable']:.3f}")


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


def fresh_process_command(args):
    """This script's command line for one measured run of `args`' model and images, printing JSON."""
    return [sys.executable, __file__, "--preset", args.preset, "--batch_size", str(args.batch_size),
            "--first_steps", str(args.first_steps), "--steps", str(args.steps), "--image_size", str(args.image_size),
            "--channels", str(args.channels), "--json",
            *(["--grappler", json.dumps(args.grappler)] if args.grappler else [])]


def malloc_patch_side_by_side(args):
    """Fresh processes with TensorFlow's 128 KB mmap threshold kept and undone, alternating."""
    from Utils.runtime import TF_MALLOC_PATCH_CHOICES, TF_MALLOC_PATCH_ENV

    command = fresh_process_command(args) + ["--step", args.step]
    runs = {choice: [] for choice in TF_MALLOC_PATCH_CHOICES}
    for _ in range(args.rounds):
        for choice in ("keep", "undo"):
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, TF_MALLOC_PATCH_ENV: choice})
            output = child.stdout.read()
            _, status, usage = os.wait4(child.pid, 0)
            if status:
                raise SystemExit(f"error: the {choice} run failed (wait status {status})")
            run = json.loads(output.strip().splitlines()[-1])
            runs[choice].append({**run, "minor_faults": usage.ru_minflt, "peak_rss_mb": usage.ru_maxrss / 1024})
    print(f"{args.preset}, {args.image_size} px, {args.channels} channel(s), batch {args.batch_size}, "
          f"step {args.step}: medians of {args.rounds} fresh processes each, alternating; "
          f"{args.first_steps} + {args.steps} steps per process")
    print("| TensorFlow's mmap threshold | first fit s | steady ms per step | minor page faults | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    medians = {choice: {k: statistics.median(r[k] for r in runs[choice])
                        for k in ("first_fit_s", "step_s", "minor_faults", "peak_rss_mb")} for choice in runs}
    labels = {"keep": "kept (128 KB)", "undo": "undone (32 MB, the default)"}
    for choice in ("keep", "undo"):
        m = medians[choice]
        print(f"| {labels[choice]} | {m['first_fit_s']:.1f} | {m['step_s'] * 1000:.1f} | {m['minor_faults']:,.0f} | "
              f"{m['peak_rss_mb']:,.0f} |")
    every_run = {choice: ", ".join(f"{r['step_s'] * 1000:.0f}" for r in runs[choice]) for choice in runs}
    print(f"steady step undone / kept: {medians['undo']['step_s'] / medians['keep']['step_s']:.3f}; "
          f"every run's steady ms: kept {every_run['keep']}, undone {every_run['undo']}")
    digests = {r["weights"] for choice in runs for r in runs[choice]}
    print("trained weights: " + ("the same in every run" if len(digests) == 1 else f"{len(digests)} different results"))


def side_by_side(args):
    """Fresh processes (a first fit is only first once per process), ours and Keras' step alternating."""
    base = fresh_process_command(args)
    runs = {name: [] for name in STEPS}
    for _ in range(args.rounds):
        for name in STEPS:
            done = subprocess.run(base + ["--step", name], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.preset}, batch {args.batch_size}, medians of {args.rounds} fresh processes each, alternating")
    print("| optimizer step | build s | first fit s | steady ms per step | first fit / flat's |")
    print("| --- | --- | --- | --- | --- |")
    medians = {name: {k: statistics.median(r[k] for r in runs[name]) for k in ("build_s", "first_fit_s", "step_s")}
               for name in STEPS}
    for name in reversed(STEPS):
        m = medians[name]
        print(f"| {STEP_LABELS[name]} | {m['build_s']:.1f} | {m['first_fit_s']:.1f} | {m['step_s'] * 1000:.0f} | "
              f"{m['first_fit_s'] / medians['flat']['first_fit_s']:.2f} |")
    digests = {name: {r["weights"] for r in runs[name]} for name in runs}
    print("trained weights: " + "; ".join(
        f"{name} {'the same in every run' if len(d) == 1 else f'{len(d)} different results'}"
        for name, d in digests.items()) + "; the three steps "
        + ("equal" if len(set.union(*digests.values())) == 1 else
           "not all equal (TensorFlow's graph optimiser rounds different graphs differently; equal with it off)"))


if __name__ == "__main__":
    main()
