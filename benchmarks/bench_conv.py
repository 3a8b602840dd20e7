"""PaddedConv2D's two paths: Keras' Conv2D against one matrix product over the 3x3 patches.

For each 3x3 convolution shape of a preset's UNet (input -> output channels), on maps
from 2x2 to 16x16 and at batch 2 and 8 (sd1's guided sampling runs batch 2x the images),
both paths are timed alternately in one process inside one `tf.function` each (best of
the repeats, after a warm-up call), with the same weights; the last column says which
path `PaddedConv2D` takes there (Models/diffusion/layers.py: MATMUL_MIN_KERNEL_WEIGHTS,
MATMUL_MAX_POSITIONS). `--backward` times forward+backward (training) instead.
`--unet` times sd1's whole UNet at 128 px instead: every convolution as Conv2D against
the paths PaddedConv2D chooses, same model and weights.

    python benchmarks/bench_conv.py
    python benchmarks/bench_conv.py --backward --batches 8
    python benchmarks/bench_conv.py --preset tiny --maps 4 8 --batches 8 64 256
    python benchmarks/bench_conv.py --unet --batches 1 2 4 8
"""

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.timing import best_of_alternating  # noqa: E402
from Models.diffusion.layers import PaddedConv2D  # noqa: E402

# (input, output) channels of each preset's 3x3 convolutions, largest kernel first.
CONVS = {
    "sd1": ((2560, 1280), (1920, 1280), (1280, 1280), (640, 1280), (1920, 640), (1280, 640),
            (960, 640), (640, 640), (960, 320), (640, 320), (320, 320)),
    "tiny": ((128, 64), (96, 64), (64, 64), (96, 32), (32, 64), (64, 32), (32, 32)),
}


def compiled(fn, layer, backward):
    if not backward:
        return tf.function(fn, autograph=False)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(fn(x)))
        return tape.gradient(loss, [x, *layer.trainable_weights])
    return tf.function(step, autograph=False)


def whole_unet(batches, repeats):
    """sd1 at 128 px: one UNet, traced once with every convolution as Conv2D, once as chosen."""
    from keras import ops

    from Models.diffusion.presets import get_preset
    from Models.diffusion.unet import build_unet, timestep_embedding

    preset = get_preset("sd1")
    unet = build_unet(preset, 128, preset.context_length)
    convs = [layer for layer in unet._flatten_layers() if isinstance(layer, PaddedConv2D)]
    chosen = [conv.as_matmul for conv in convs]
    print(f"{sum(chosen)} of sd1's {len(convs)} convolutions take the matrix product at 128 px")
    print("| batch | all Conv2D (s) | as PaddedConv2D chooses (s) | ratio | max difference |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for batch in batches:
        inputs = [tf.constant(rng.standard_normal((batch, 16, 16, 4)).astype("float32")),
                  tf.repeat(timestep_embedding(ops.convert_to_tensor([501.0]), 320), batch, axis=0),
                  tf.constant(rng.standard_normal((batch, preset.context_length, 768)).astype("float32"))]
        functions = []
        for as_matmul in ([False] * len(convs), chosen):
            for conv, flag in zip(convs, as_matmul):
                conv.as_matmul = flag
            function = tf.function(lambda x: unet(x, training=False), autograph=False)
            functions.append((function, function(inputs).numpy()))  # traced with these paths
        (conv2d, expected), (chosen_fn, got) = functions
        conv_s, chosen_s = best_of_alternating([lambda: conv2d(inputs), lambda: chosen_fn(inputs)], repeats)
        print(f"| {batch} | {conv_s:.3f} | {chosen_s:.3f} | {conv_s / chosen_s:.2f}x | "
              f"{np.abs(expected - got).max():.1e} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps", type=int, nargs="+", default=[2, 4, 8, 16], help="map sizes (square)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--backward", action="store_true", help="time forward+backward")
    parser.add_argument("--preset", choices=sorted(CONVS), default="sd1", help="whose convolution shapes")
    parser.add_argument("--unet", action="store_true", help="sd1's whole UNet at 128 px instead")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.unet:
        return whole_unet(args.batches, min(args.repeats, 3))
    rng = np.random.default_rng(0)
    print("| channels | map | batch | Conv2D (ms) | matrix product (ms) | ratio | PaddedConv2D uses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for channels_in, channels_out in CONVS[args.preset]:
        for size in args.maps:
            for batch in args.batches:
                layer = PaddedConv2D(channels_out, 3, padding=1)
                layer.build((batch, size, size, channels_in))
                layer.set_weights([w / math.sqrt(9 * channels_in) for w in
                                   (rng.standard_normal((3, 3, channels_in, channels_out)).astype("float32"),
                                    np.zeros(channels_out, "float32"))])
                x = tf.constant(rng.standard_normal((batch, size, size, channels_in)).astype("float32"))
                conv2d = compiled(lambda x: layer.conv2d(layer.padding2d(x)), layer, args.backward)
                matmul = compiled(lambda x: layer._patches_times_kernel(layer.padding2d(x)), layer, args.backward)
                conv_s, matmul_s = best_of_alternating([lambda: conv2d(x), lambda: matmul(x)], args.repeats)
                path = "matrix product" if layer.as_matmul else "Conv2D"
                print(f"| {channels_in}->{channels_out} | {size}x{size} | {batch} | {conv_s * 1e3:.1f} | "
                      f"{matmul_s * 1e3:.1f} | {conv_s / matmul_s:.2f}x | {path} |", flush=True)


if __name__ == "__main__":
    main()
