"""Memory and time of one UNet fine-tuning step: full fine-tuning against LoRA (`--unet_tuning`).

Each mode runs in its own process (peak RSS is per process and never goes down): the dif
stage's model at the preset's size with random weights (`build_model(..., random_init=True)`:
the same shapes as keras-cv's weights), the paper's optimiser (Adam, weight decay, clipping;
`--ema_decay` adds the moving average), one warm-up step (graph tracing, optimizer variables)
and then `--steps` timed steps on random images. Reported per mode: the median step time,
the process's peak RSS (the whole process: TensorFlow, the autoencoder, the UNet, gradients and
optimizer state), RSS after building the model, and the trained parameter count. The modes run
one after the other, never together.

    python benchmarks/bench_lora.py                       # sd1 at 128 px, batch 4, 3 timed steps
    python benchmarks/bench_lora.py --preset tiny --batch_size 16 --steps 5
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def current_rss_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one_mode(args):
    """Runs in the child: builds, steps, prints one JSON line."""
    import keras
    import numpy as np

    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion import lora
    from Models.diffusion.optimizer import make_optimizer

    spec = get_spec("digits")
    model = ck.build_model(args.preset, spec, stage="dif", random_init=True)
    if args.mode == "lora":
        keras.utils.set_random_seed(0)
        lora.add_adapters(model.unet, args.rank)
        model.set_stage("dif")
    model.compile(optimizer=make_optimizer(1e-5, 1000, args.ema_decay, ema_warmup=False))
    built_rss = current_rss_gib()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, model.image_size, model.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, spec.num_classes, (args.batch_size,))
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        model.train_on_batch(x=(images, labels))
        if step:  # step 0 traces the graph and builds the optimizer's variables
            times.append(time.perf_counter() - started)
    print(json.dumps({"mode": args.mode, "median_step_s": statistics.median(times), "step_s": times,
                      "peak_rss_gib": peak_rss_gib(), "rss_after_build_gib": built_rss,
                      "trained_parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))}))


def run_watched(command, min_available_gib):
    """Runs one mode's child; kills it (returns None) when the machine's available memory falls under
    `min_available_gib`: the machine is shared, and other jobs must not be pushed out of memory."""
    import psutil

    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as child:
        largest = 0
        while child.poll() is None:
            try:
                largest = max(largest, psutil.Process(child.pid).memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            if psutil.virtual_memory().available < min_available_gib * 2**30:
                child.kill()
                child.wait()
                print(f"stopped at {largest / 2**30:.2f} GiB RSS", flush=True)
                return None
            time.sleep(0.2)
        out = child.stdout.read()
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {child.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd1")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--ema_decay", type=float, default=0.0)
    parser.add_argument("--min_available_gib", type=float, default=1.5,
                        help="stop a mode when the machine's available memory falls under this")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args(argv)
    if args.mode:
        return one_mode(args)
    rows = []
    for mode in args.modes:
        child = [sys.executable, __file__, "--mode", mode, "--preset", args.preset, "--batch_size",
                 str(args.batch_size), "--steps", str(args.steps), "--rank", str(args.rank),
                 "--ema_decay", str(args.ema_decay)]
        row = run_watched(child, args.min_available_gib)
        if row is None:
            print(f"{mode}: stopped, the machine's available memory fell under {args.min_available_gib} GiB",
                  flush=True)
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.preset}, one fine-tuning step at batch {args.batch_size} ({args.steps} timed, median)")
    print("| mode | trained parameters | median step (s) | peak RSS (GiB) | RSS after build (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['mode']} | {row['trained_parameters']:,} | {row['median_step_s']:.1f} | "
              f"{row['peak_rss_gib']:.2f} | {row['rss_after_build_gib']:.2f} |")


if __name__ == "__main__":
    main()
