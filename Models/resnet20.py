"""ResNet20, the classifier of the Classification Accuracy Score (CAS).

The paper's variant of He et al.'s CIFAR ResNet20: a 3x3 stem convolution,
then 3 stages x 3 basic blocks with `f`, `2f` and `4f` filters (the second and
third stages halve the resolution in their first block), global average
pooling and a softmax. Unlike the usual ResNet20 (f = 16) the paper uses
f = 64 (4.3 M parameters instead of 0.27 M).

    input uint8-range (H, W, C) --Rescaling(1/255)--> stem conv3x3(f) BN ReLU
      stage 1: 3 x BasicBlock(f,  stride 1)          H   x W
      stage 2: 3 x BasicBlock(2f, first stride 2)    H/2 x W/2
      stage 3: 3 x BasicBlock(4f, first stride 2)    H/4 x W/4
      GlobalAveragePooling2D  (layer "features", 4f values)
      Dense(num_classes, softmax)                    (layer "predictions")

Settings from the paper: BatchNorm momentum 0.9, epsilon 1e-5; He-normal
initialisation; where a block changes the shape, its shortcut is a 3x3
max-pool with stride 2 followed by zero padding of the new channels
(parameter-free, "option A" of He et al.).

The model takes images in the 0..255 range (uint8 or float) and divides by 255
itself, so no caller ever scales pixels.

Example:
    >>> model = build_resnet20((32, 32, 3), num_classes=10)
    >>> probs = model.predict(x_uint8)                  # (N, 10), rows sum to 1
    >>> features = feature_extractor(model)(x_uint8)   # (N, 256) GAP features
"""

import keras
from keras import layers, ops

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
BLOCKS_PER_STAGE = 3
STAGES = 3
FEATURES_LAYER = "features"


def _conv3x3(filters, strides=1, name=None):
    # No bias: every convolution is followed by BatchNorm, whose beta is the bias.
    return layers.Conv2D(
        filters, 3, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )


def _batch_norm(name=None):
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


@keras.saving.register_keras_serializable(package="sddg")
class PoolPadShortcut(layers.Layer):
    """The parameter-free shortcut of a block that changes shape.

    3x3 max-pool with stride `strides` ("same" padding, so the output size
    matches the block's strided convolution: ceil(H / strides)), then zeros
    appended on the channel axis up to `filters` channels.

    Example:
        >>> PoolPadShortcut(128)(ops.ones((2, 32, 32, 64))).shape
        (2, 16, 16, 128)
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.pool = layers.MaxPooling2D(pool_size=3, strides=self.strides, padding="same")

    def build(self, input_shape):
        if input_shape[-1] > self.filters:
            raise ValueError(
                f"PoolPadShortcut pads channels up: input has {input_shape[-1]} > {self.filters}"
            )
        self.pool.build(input_shape)

    def call(self, x):
        if self.strides > 1:
            x = self.pool(x)
        extra = self.filters - x.shape[-1]
        if extra:
            x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, extra]])
        return x

    def compute_output_shape(self, input_shape):
        shape = list(self.pool.compute_output_shape(input_shape)) if self.strides > 1 else list(input_shape)
        shape[-1] = self.filters
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


@keras.saving.register_keras_serializable(package="sddg")
class BasicBlock(layers.Layer):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when the shape is unchanged, else a
    `PoolPadShortcut` (no parameters).

    Example:
        >>> block = BasicBlock(128, strides=2)
        >>> block(ops.ones((2, 32, 32, 64))).shape
        (2, 16, 16, 128)
    """

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.conv1 = _conv3x3(self.filters, self.strides, name="conv1")
        self.bn1 = _batch_norm(name="bn1")
        self.conv2 = _conv3x3(self.filters, name="conv2")
        self.bn2 = _batch_norm(name="bn2")
        self.shortcut = None

    def build(self, input_shape):
        if self.strides != 1 or input_shape[-1] != self.filters:
            self.shortcut = PoolPadShortcut(self.filters, self.strides, name="shortcut")
            self.shortcut.build(input_shape)
        self.conv1.build(input_shape)
        shape = self.conv1.compute_output_shape(input_shape)
        self.bn1.build(shape)
        self.conv2.build(shape)
        self.bn2.build(shape)

    def call(self, x, training=None):
        y = ops.relu(self.bn1(self.conv1(x), training=training))
        y = self.bn2(self.conv2(y), training=training)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return ops.relu(y + shortcut)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def build_resnet20(input_shape, num_classes, initial_filters=64, name="resnet20"):
    """The paper's ResNet20 as a functional `keras.Model`.

    Args:
        input_shape: (H, W, C) of the images, channels last.
        num_classes: size of the softmax output.
        initial_filters: filters of the first stage (the paper: 64); the
            second and third stages use 2x and 4x.
        name: model name.

    Returns:
        A model mapping 0..255 images (uint8 or float) to class probabilities
        (float32 even under a mixed-precision policy). Its global average
        pooling layer is named "features" (see `feature_extractor`); blocks are
        named "stage{s}_block{b}" (1-based).

    Example:
        >>> model = build_resnet20((28, 28, 3), num_classes=5, initial_filters=64)
        >>> model.count_params()
        4290245
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    # Pixels arrive as 0..255; the paper trains on images / 255.
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = _conv3x3(initial_filters, name="stem_conv")(x)
    x = _batch_norm(name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    for stage in range(STAGES):
        filters = initial_filters * 2**stage
        for block in range(BLOCKS_PER_STAGE):
            strides = 2 if stage > 0 and block == 0 else 1
            x = BasicBlock(filters, strides, name=f"stage{stage + 1}_block{block + 1}")(x)
    x = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    # float32 softmax: stable probabilities under mixed precision.
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_initializer="he_normal",
        dtype="float32", name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=name)


def feature_extractor(model):
    """A model mapping the same 0..255 images to the "features" layer (GAP output).

    Example:
        >>> feats = feature_extractor(model).predict(x_uint8, batch_size=256)  # (N, 4f)
    """
    return keras.Model(model.input, model.get_layer(FEATURES_LAYER).output,
                       name=f"{model.name}_features")
