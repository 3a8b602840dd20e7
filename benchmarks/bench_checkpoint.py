"""What a training checkpoint costs at the end of an epoch, written two ways, side by side.

`SD_adapting.py` checkpoints every epoch by default (`--freq 1`): the optimizer state (Adam's
moments, the moving averages, the step, and the trained weights themselves when the weights file
holds averages), then the weights file with the moving averages, what generation samples with.

  swap    the averages swapped into the model for the weights file and out again afterwards
          (two more copies of every trained weight through NumPy)
  direct  the weights file written from the averages themselves (`DiffusionTrainer.sampling_values`),
          what `Models/diffusion/callbacks.Checkpointer` does; the files are the same bit for bit
          (tests/test_recipe.py)

Each round times one whole epoch-end save of each way, alternating; medians. The optimizer state
is written in both (its time is printed on its own too).

    python benchmarks/bench_checkpoint.py                       # small, digits, 15 rounds
    python benchmarks/bench_checkpoint.py --preset tiny --rounds 9
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="small")
parser.add_argument("--dataset", default="digits")
parser.add_argument("--rounds", type=int, default=15)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    import numpy as np

    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.optimizer import make_optimizer

    model = ck.build_model(args.preset, get_spec(args.dataset), random_init=True, seed=0)
    model.compile(optimizer=make_optimizer(1e-3, 100, ema_decay=0.999))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    model.optimizer.apply([rng.standard_normal(v.shape).astype("float32") for v in model.trainable_variables],
                          model.trainable_variables)  # averages and weights differ, as after training
    parts = model.trained_parts()
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
        report(args, model, parts, Path(tmp))


def report(args, model, parts, folder):
    """Times the three saves into `folder` and prints the table."""
    from Models.diffusion import checkpoints as ck

    from benchmarks.timing import median_of_alternating

    def optimizer_state():
        ck.save_optimizer(ck.optimizer_path(folder, 1), model.optimizer, 1, trained_parts=parts)

    def swap():
        optimizer_state()
        with model.sampling_weights():
            ck.save_parts(ck.weights_path(folder, 1), parts)

    def direct():
        optimizer_state()
        ck.save_parts(ck.weights_path(folder, 2), parts, values=model.sampling_values)

    state_s, swap_s, direct_s = median_of_alternating([optimizer_state, swap, direct], args.rounds)
    n_weights = sum(len(layer.weights) for layer in parts.values())
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
    print(f"{args.preset} on {args.dataset}: {n_weights} trained weights, {len(model.optimizer.variables)} "
          f"optimizer variables, files {size_mb:.1f} MB in all; medians of {args.rounds} alternating rounds")
    print("| optimizer state alone | epoch-end save, swap | epoch-end save, direct | direct / swap |")
    print(f"| {state_s * 1000:.0f} ms | {swap_s * 1000:.0f} ms | {direct_s * 1000:.0f} ms | {direct_s / swap_s:.2f} |")


if __name__ == "__main__":
    main()
