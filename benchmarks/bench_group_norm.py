"""GroupNorm: ours (`Models.diffusion.layers.GroupNorm`) against Keras' `GroupNormalization`.

Same weights and inputs, both inside one `tf.function`, timed alternately in one
process (best of the repeats, after a warm-up call), forward and forward+backward,
at shapes of `tiny`'s training (batch 32; 32x32 and 8x8 maps), of `small`'s on digits
(batch 32 of 8x8 and 4x4 maps) and of sd1's guided sampling at 128 px (batch 4 of 16x16
latents, 320 and 640 channels). Prints the largest difference too. `--torch` adds
PyTorch's fused `group_norm` (NCHW, autograd on for forward+backward) to the rounds.

    python benchmarks/bench_group_norm.py
    python benchmarks/bench_group_norm.py --torch --threads 2
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
    "small on digits, 32 x 8x8x32": ((32, 8, 8, 32), 8),
    "small on digits, 32 x 4x4x64": ((32, 4, 4, 64), 8),
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


def side_by_side(ours, theirs, x, repeats, torch_call=None):
    calls = [lambda: ours(x), lambda: theirs(x)] + ([torch_call] if torch_call else [])
    return best_of_alternating(calls, repeats, calls=10)


def torch_group_norm(x, layer, groups, backward):
    """PyTorch's fused group_norm on the same values (NCHW), forward or forward+backward."""
    import torch

    xt = torch.tensor(x.numpy()).permute(0, 3, 1, 2).contiguous().requires_grad_(backward)
    gamma, beta = (torch.tensor(w, requires_grad=backward) for w in layer.get_weights())

    def forward():
        with torch.no_grad():
            return torch.nn.functional.group_norm(xt, groups, gamma, beta, 1e-5)

    def forward_backward():
        y = torch.nn.functional.group_norm(xt, groups, gamma, beta, 1e-5)
        return torch.autograd.grad((y * y).sum(), [xt, gamma, beta])
    return forward_backward if backward else forward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="PyTorch's group_norm in the rounds as well")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of both frameworks")
    args = parser.parse_args(argv)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        if args.torch:
            import torch

            torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    torch_columns = " | PyTorch forward / forward+backward (ms)" if args.torch else ""
    print(f"| shape | forward: Keras / ours (ms) | ratio | forward+backward: Keras / ours (ms) | ratio | max diff"
          f"{torch_columns} |")
    print("| --- " * (7 if args.torch else 6) + "|")
    for name, (shape, groups) in SHAPES.items():
        x = tf.constant(rng.standard_normal(shape).astype("float32") * 2.0 + 0.5)
        ours, theirs = GroupNorm(groups=groups, epsilon=1e-5), keras.layers.GroupNormalization(groups, epsilon=1e-5)
        ours.build(shape), theirs.build(shape)
        theirs.set_weights([rng.standard_normal(w.shape).astype("float32") for w in theirs.weights])
        ours.set_weights(theirs.get_weights())
        difference = float(np.max(np.abs(ours(x).numpy() - theirs(x).numpy())))
        ours_fwd, theirs_fwd, *torch_fwd = side_by_side(
            tf.function(ours.__call__), tf.function(theirs.__call__), x, args.repeats,
            torch_group_norm(x, theirs, groups, backward=False) if args.torch else None)
        ours_both, theirs_both, *torch_both = side_by_side(
            forward_and_backward(ours), forward_and_backward(theirs), x, args.repeats,
            torch_group_norm(x, theirs, groups, backward=True) if args.torch else None)
        torch_cells = f" | {torch_fwd[0] * 1e3:.3f} / {torch_both[0] * 1e3:.3f}" if args.torch else ""
        print(f"| {name} | {theirs_fwd * 1e3:.2f} / {ours_fwd * 1e3:.2f} | {theirs_fwd / ours_fwd:.2f}x "
              f"| {theirs_both * 1e3:.2f} / {ours_both * 1e3:.2f} | {theirs_both / ours_both:.2f}x "
              f"| {difference:.1e}{torch_cells} |", flush=True)


if __name__ == "__main__":
    main()
