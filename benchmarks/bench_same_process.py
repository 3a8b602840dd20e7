"""Same seed, same weights, within one process: train the same model several times and hash the weights.

Each run builds a from-scratch preset's trainer as `bench_recipe.py` does (random weights from
`--seed`, the preset's recipe) and trains it for `--epochs` on digits; the weights' SHA-256 is
printed per run. Equal hashes: the process's earlier models did not change what training makes.

`--no_fresh_names` builds as the code did before `Utils.runtime.fresh_layer_names` (Keras' name
counters not reset: each model's layers get the next free names); `--no_grappler` turns
TensorFlow's graph optimiser off. Together they show where a difference comes from.

    python benchmarks/bench_same_process.py                          # tiny, three runs
    python benchmarks/bench_same_process.py --no_fresh_names         # the code before the reset
    python benchmarks/bench_same_process.py --no_fresh_names --no_grappler
"""

import argparse
import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--preset", default="tiny")
parser.add_argument("--runs", type=int, default=3)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--no_fresh_names", action="store_true", help="do not reset Keras' layer name counters")
parser.add_argument("--no_grappler", action="store_true", help="turn TensorFlow's graph optimiser off")


def weights_hash(model):
    import numpy as np

    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:12]


def main(argv=None):
    args = parser.parse_args(argv)
    if args.runs < 1 or args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("error: --runs, --epochs and --batch_size must be at least 1")
    import keras

    from benchmarks.bench_recipe import train_from_scratch
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Models.diffusion import checkpoints
    from Models.diffusion.presets import get_preset

    if args.no_grappler:
        from Utils.runtime import use_graph_optimizer

        use_graph_optimizer(False)
    if args.no_fresh_names:
        checkpoints.fresh_layer_names = lambda: None
    preset = get_preset(args.preset)
    spec = get_spec("digits")
    splits = load_dataset("digits")
    hashes = []
    for run in range(args.runs):
        model, history, *_ = train_from_scratch(preset, spec, splits, preset.recipe(), args.epochs,
                                                args.batch_size, preset.enc_lr, args.seed)
        hashes.append(weights_hash(model))
        print(f"run {run}: final loss {history.history['loss'][-1]!r}, weights {hashes[-1]}, "
              f"first layer {model.unet.layers[1].name}", flush=True)
    print(f"{len(set(hashes))} distinct weight hash(es) in {args.runs} runs "
          f"(fresh names {'off' if args.no_fresh_names else 'on'}, "
          f"Grappler {'off' if args.no_grappler else 'on'}, backend {keras.backend.backend()})")


if __name__ == "__main__":
    main()
