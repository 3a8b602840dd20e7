"""How long `Data.synthetic.load_image_folder` takes to decode a generated folder.

Writes `--count` random PNGs (10 classes, `--size` px, our generator's
class_NN/img_n.png layout) into a temporary folder, then loads them for a
dataset at `--target` px, once with the threaded decoder and once with a
single worker, side by side, and prints images/s and the speed-up ratio.

    nice -n 10 .venv/bin/python benchmarks/bench_synthetic_decode.py --count 40000 --size 32 --target 32
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from Data import synthetic  # noqa: E402
from Data.registry import DatasetSpec  # noqa: E402


def write_folder(root, count, size, classes=10):
    rng = np.random.default_rng(0)
    # Smooth random images (noise upsampled) compress like real generated images, unlike pure noise.
    base = rng.integers(0, 256, size=(64, max(2, size // 4), max(2, size // 4), 3), dtype=np.uint8)
    for label in range(classes):
        (root / f"class_{label:02d}").mkdir(parents=True)
    for i in range(count):
        image = Image.fromarray(base[i % 64]).resize((size, size), Image.BICUBIC)
        image.save(root / f"class_{i % classes:02d}" / f"img_{i // classes}.png")


def time_load(root, spec, workers):
    synthetic.DECODE_WORKERS = workers
    start = time.perf_counter()
    x, y, report = synthetic.load_image_folder(root, spec)
    return time.perf_counter() - start, len(y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40000)
    parser.add_argument("--size", type=int, default=32, help="size of the PNGs written")
    parser.add_argument("--target", type=int, default=32, help="the dataset's native size")
    args = parser.parse_args()
    spec = DatasetSpec("bench", tuple(str(i) for i in range(10)), args.target, 3, "cifar", False)
    threaded = synthetic.DECODE_WORKERS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        start = time.perf_counter()
        write_folder(root, args.count, args.size)
        print(f"wrote {args.count} PNGs of {args.size} px in {time.perf_counter() - start:.1f} s")
        time_load(root, spec, threaded)  # warm the page cache so both runs read from memory
        results = {}
        for workers in (1, threaded):
            seconds, n = time_load(root, spec, workers)
            results[workers] = seconds
            print(f"decode {n} images {args.size}->{args.target} px, {workers} worker(s): "
                  f"{seconds:.1f} s ({n / seconds:.0f} images/s)")
        print(f"speed-up {threaded} workers vs 1: {results[1] / results[threaded]:.2f}x")


if __name__ == "__main__":
    main()
