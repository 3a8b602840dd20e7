"""Seconds to build each preset's UNet (and the autoencoder), each in a fresh process.

Building a Keras model runs every layer once on symbolic inputs. A layer without `build`
is built by running its `call` on symbolic inputs first, and that again for every layer
nested inside it, so the build time says how much of that work the layers leave to Keras.
Every stage of the pipeline (training, tuning, generation) starts by building its UNet.

With --vs_repo OTHER_CHECKOUT the same builds run alternately from this repository and the
other one (fresh processes, A B A B ...), and the table gives the medians and their ratio;
with --check the builds from both must hold the same seeded weights.

    python benchmarks/bench_build.py --rounds 5
    git worktree add /tmp/before HEAD~1
    python benchmarks/bench_build.py --rounds 5 --vs_repo /tmp/before --check
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (name, preset, image size, image channels): pixel presets at their datasets' sizes, latent ones at 128 px.
MODELS = (("tiny, digits 8 px grey", "tiny", 8, 1), ("small, RetinaMNIST 28 px RGB", "small", 28, 3),
          ("sd1, 128 px", "sd1", 128, None), ("sd2, 128 px", "sd2", 128, None))

# Run in a child process with the checkout to measure first on sys.path: prints one JSON line.
CHILD = """
import hashlib, json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, sys.argv[1])
import keras, numpy as np
from Models.diffusion.presets import get_preset
from Models.diffusion.unet import build_unet
from Models.diffusion.autoencoder import build_image_decoder, build_image_encoder

def fingerprint(model):
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.asarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]

seconds, weights = {}, {}
for label, preset, size, channels in json.loads(sys.argv[2]):
    keras.utils.set_random_seed(0)
    preset = get_preset(preset)
    started = time.perf_counter()
    model = build_unet(preset, size, preset.context_length, image_channels=channels)
    seconds[label] = time.perf_counter() - started
    weights[label] = fingerprint(model)
label = "autoencoder, 128 px (encoder + decoder)"
keras.utils.set_random_seed(0)
started = time.perf_counter()
encoder, decoder = build_image_encoder(128), build_image_decoder(128)
seconds[label] = time.perf_counter() - started
weights[label] = fingerprint(encoder) + fingerprint(decoder)
print(json.dumps({"seconds": seconds, "weights": weights}))
"""


def build_once(repo, models):
    done = subprocess.run([sys.executable, "-c", CHILD, str(repo), json.dumps(models)],
                          capture_output=True, text=True, check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per checkout (median)")
    parser.add_argument("--vs_repo", type=Path, default=None, help="another checkout, built alternately")
    parser.add_argument("--check", action="store_true", help="with --vs_repo: the seeded weights must be equal")
    parser.add_argument("--presets", nargs="+", default=[m[1] for m in MODELS], choices=[m[1] for m in MODELS],
                        help="UNets to build (the autoencoder is always built)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    if args.vs_repo is not None and not (args.vs_repo / "Models/diffusion/unet.py").is_file():
        raise SystemExit(f"error: --vs_repo {args.vs_repo} is not a checkout of this project")
    models = [m for m in MODELS if m[1] in args.presets]
    repos = {"this": REPO} if args.vs_repo is None else {"this": REPO, "other": args.vs_repo.resolve()}
    seconds = {side: {} for side in repos}
    weights = {}
    for round_index in range(args.rounds):
        for side, repo in (repos.items() if round_index % 2 == 0 else reversed(repos.items())):
            result = build_once(repo, models)
            for label, value in result["seconds"].items():
                seconds[side].setdefault(label, []).append(value)
            weights.setdefault(side, result["weights"])
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    header = "| model | build s (this checkout) |" + (" build s (other) | this / other |" if args.vs_repo else "")
    print(header)
    print("| --- | --- |" + (" --- | --- |" if args.vs_repo else ""))
    for label, values in seconds["this"].items():
        row = f"| {label} | {statistics.median(values):.2f} |"
        if args.vs_repo:
            other = statistics.median(seconds["other"][label])
            row += f" {other:.2f} | {statistics.median(values) / other:.2f} |"
        print(row)
    print(f"\nmedians of {args.rounds} fresh processes per checkout; load average {os.getloadavg()[0]:.1f}")
    if args.check and args.vs_repo:
        differing = [label for label in weights["this"] if weights["this"][label] != weights["other"][label]]
        if differing:
            print("seeded weights DIFFER: " + ", ".join(differing))
            return 1
        print("seeded weights: the same in both checkouts for every model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
