"""The class encoder that replaces Stable Diffusion's text encoder (PAPER.md, stage 1).

    one-hot label (num_classes) -> Dense(500) -> Dense(L * D, no bias) -> reshape (L, D)

L (context length, 100 in the paper) and D (context width, 768 for SD v1) come
from the preset. The "unconditional" context used for classifier-free
guidance is the encoder applied to the all-zero label vector, i.e. the
first layer's bias pushed through the second layer.

Example:
    >>> encoder = ClassEncoder(num_classes=10, context_length=100, context_dim=768)
    >>> context = encoder(keras.ops.one_hot([3, 7], 10))        # (2, 100, 768)
    >>> uncond = encoder(keras.ops.zeros((2, 10)))               # the unconditional context
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="sddg")
class ClassEncoder(keras.layers.Layer):
    """One-hot labels (B, num_classes) -> context (B, context_length, context_dim).

    The first Dense layer has no activation, as in the paper's class encoder.

    Args:
        num_classes: width of the one-hot input.
        context_length: L, the number of context tokens the UNet attends to.
        context_dim: D, the width of each token (the UNet's cross-attention width).
        hidden: width of the hidden Dense layer (500 in the paper).
    """

    def __init__(self, num_classes, context_length, context_dim, hidden=500, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.context_length = int(context_length)
        self.context_dim = int(context_dim)
        self.hidden = int(hidden)
        self.dense1 = keras.layers.Dense(self.hidden, name="dense1")
        self.dense2 = keras.layers.Dense(self.context_length * self.context_dim, use_bias=False,
                                         name="dense2")

    def build(self, input_shape):
        self.dense1.build((None, self.num_classes))
        self.dense2.build((None, self.hidden))
        self.built = True

    def call(self, one_hot):
        x = self.dense2(self.dense1(one_hot))
        return ops.reshape(x, (-1, self.context_length, self.context_dim))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.context_length, self.context_dim)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, context_length=self.context_length,
                      context_dim=self.context_dim, hidden=self.hidden)
        return config


def one_hot_labels(labels, num_classes, dtype="float32"):
    """Integer labels (B,) -> one-hot (B, num_classes)."""
    return ops.one_hot(ops.cast(labels, "int32"), num_classes, dtype=dtype)
