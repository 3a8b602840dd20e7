"""GroupNorm: ours (`Models.diffusion.layers.GroupNorm`) against Keras' `GroupNormalization`.

Same weights and inputs, both inside one `tf.function`, timed alternately in one
process (best of the repeats, after a warm-up call), forward and forward+backward,
at shapes of `tiny`'s training (batch 32; 32x32 and 8x8 maps) and of sd1's guided
sampling at 128 px (batch 4 of 16x16 latents, 320 and 640 channels). Prints the
largest difference too.

    python benchmarks/bench_group_norm.py
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.timing import best_of_alternating  # noqa: E402
from Models.diffusion.layers import GroupNorm  # noqa: E402

SHAPES = {  # name: (input shape, groups)
    "tiny, 32 x 32x32x32": ((32, 32, 32, 32), 8),
    "tiny, 32 x 8x8x64": ((32, 8, 8, 64), 8),
    "sd1, 4 x 16x16x320": ((4, 16, 16, 320), 32),
    "sd1, 4 x 16x16x640": ((4, 16, 16, 640), 32),
}


def forward_and_backward(layer):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x, *layer.trainable_weights])
    return step


def side_by_side(ours, theirs, x, repeats):
    return best_of_alternating([lambda: ours(x), lambda: theirs(x)], repeats, calls=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| shape | forward: Keras / ours (ms) | ratio | forward+backward: Keras / ours (ms) | ratio | max diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (shape, groups) in SHAPES.items():
        x = tf.constant(rng.standard_normal(shape).astype("float32") * 2.0 + 0.5)
        ours, theirs = GroupNorm(groups=groups, epsilon=1e-5), keras.layers.GroupNormalization(groups, epsilon=1e-5)
        ours.build(shape), theirs.build(shape)
        theirs.set_weights([rng.standard_normal(w.shape).astype("float32") for w in theirs.weights])
        ours.set_weights(theirs.get_weights())
        difference = float(np.max(np.abs(ours(x).numpy() - theirs(x).numpy())))
        ours_fwd, theirs_fwd = side_by_side(tf.function(ours.__call__), tf.function(theirs.__call__), x, args.repeats)
        ours_both, theirs_both = side_by_side(forward_and_backward(ours), forward_and_backward(theirs), x,
                                              args.repeats)
        print(f"| {name} | {theirs_fwd * 1e3:.2f} / {ours_fwd * 1e3:.2f} | {theirs_fwd / ours_fwd:.2f}x "
              f"| {theirs_both * 1e3:.2f} / {ours_both * 1e3:.2f} | {theirs_both / ours_both:.2f}x "
              f"| {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
