"""The building blocks of the Stable Diffusion UNet and autoencoder, in `keras.ops`.

The blocks follow keras-cv's Stable Diffusion (`keras_cv.models.stable_diffusion`) so
that its published weight files load unchanged. Those files are legacy Keras-2 `.h5`
weights, which Keras 3 loads by ORDER: the model's layers that own weights, in order,
and inside each layer its weights in the order the sub-layers were created. So every
block below creates its sub-layers in exactly keras-cv's order (the comments say where
that order is not the obvious one); do not reorder attribute assignments.

Every block builds its sub-layers in `build`, in the order its `call` first uses them (so
seeded initial weights are drawn in the same order as a first call would), and gives its
`compute_output_shape`. Without them Keras builds a block by running its `call` on symbolic
inputs, and then runs it again: once more for every level of nesting, so building sd1's UNet
traced the attention layers four times over (BENCHMARKS.md, "Building the UNet").

Layers (all with `get_config`):
    GroupNorm            Keras' GroupNormalization, computed with adjacent-axis reductions
    PaddedConv2D         explicit zero padding + Conv2D (keras-cv's, not padding="same");
                         large kernels on small maps as one matrix product
    UNetResBlock         GroupNorm-swish-conv, + timestep embedding, GroupNorm-swish-conv, residual
    SpatialTransformer   GroupNorm, proj_in, self-attention, cross-attention, GEGLU MLP, proj_out
    TransformerBlock     the transformer inside SpatialTransformer
    CrossAttention       multi-head attention; self-attention when no context is given
    GEGLU                Dense to 2x width, value * gelu(gate)
    Upsample             nearest 2x + 3x3 conv
    VAEResBlock          the autoencoder's residual block (no timestep)
    VAEAttentionBlock    the autoencoder's single-head spatial self-attention
    LatentScale          keep the first 4 channels (the latent mean) and scale by 0.18215
"""

import keras
from keras import ops

# Stable Diffusion's latent scaling factor: latents are divided by it before decoding.
LATENT_SCALE = 0.18215


class GroupNorm(keras.layers.GroupNormalization):
    """Keras' `GroupNormalization` (same weights, config and results), faster on NHWC maps.

    Keras reshapes to (B, H, W, groups, C/groups) and reduces over the non-adjacent
    axes (1, 2, 4), which TensorFlow does slowly (BENCHMARKS.md: 7 to 31x PyTorch's
    fused kernel). Here the spatial axes (1, 2) are reduced first, per channel, and the
    per-channel moments are then averaged per group: the same two-pass mean and
    variance, in float32 (as Keras), with every reduction over adjacent axes. Each group's
    moment goes back to its channels by broadcasting (adding zeros), not `ops.repeat`:
    the same values and gradients, and some 16 graph ops fewer per use, which TensorFlow
    would trace and optimise before a stage's first step.
    Other ranks or axes fall back to Keras' own computation.

    Example:
        >>> norm = GroupNorm(groups=8, epsilon=1e-5)
        >>> norm(keras.ops.ones((2, 16, 16, 32))).shape
        (2, 16, 16, 32)
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        channels = inputs.shape[-1]
        per_group = channels // self.groups

        def per_group_mean(x):  # (B, H, W, C) -> (B, 1, 1, C): the mean of each channel's group
            channel_mean = ops.reshape(ops.mean(x, axis=(1, 2)), (-1, self.groups, per_group))
            group_mean = ops.mean(channel_mean, axis=-1, keepdims=True)
            return ops.reshape(group_mean + ops.zeros_like(channel_mean), (-1, 1, 1, channels))

        x = ops.cast(inputs, "float32")
        centered = x - per_group_mean(x)
        scale = ops.rsqrt(per_group_mean(ops.square(centered)) + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, "float32")
        outputs = centered * scale
        if self.center:
            outputs = outputs + ops.cast(self.beta, "float32")
        return ops.cast(outputs, self.compute_dtype)


def _group_norm(groups, epsilon=1e-5):
    # keras-cv uses epsilon 1e-5 everywhere (PyTorch's default), not Keras' 1e-3.
    return GroupNorm(groups=groups, epsilon=epsilon)


def _with_channels(shape, channels):
    """`shape` with its last axis replaced by `channels`."""
    return (*tuple(shape)[:-1], channels)


# TensorFlow's CPU convolutions (oneDNN) pay a per-call cost above batch 1 that grows with the
# kernel, not the map (most likely a kernel re-layout; it is gone with
# TF_ENABLE_ONEDNN_OPTS=0). For the UNet's largest kernels on its smallest maps (sd1's
# 1280-channel levels at 128 px: 4x4 and 2x2) it costs 3-10x the arithmetic, so inside these
# bounds the convolution is one matrix product over the k*k patches instead: the same weights
# and result (float32 rounding aside). Inside them that was faster for every sd1 shape at batch
# 2 and 8; outside them it is a loss or a gain that depends on the batch (tiny's small
# kernels: up to 6.7x slower; 16x16 maps: 0.74-1.41x) (benchmarks/bench_conv.py, BENCHMARKS.md).
MATMUL_MIN_KERNEL_WEIGHTS = 5_000_000
MATMUL_MAX_POSITIONS = 64  # output height * width: 8x8 maps and smaller


class PaddedConv2D(keras.layers.Layer):
    """Zero padding then an unpadded Conv2D.

    Unlike `padding="same"`, the padding is explicit and symmetric by default, which is
    what the PyTorch-trained Stable Diffusion weights expect (a stride-2 "same"
    convolution would pad only bottom/right). A large kernel on a small map is applied
    as one matrix product over the patches (see MATMUL_MIN_KERNEL_WEIGHTS); the weights
    are the inner Conv2D's either way.

    Example:
        >>> conv = PaddedConv2D(64, 3, padding=1, strides=2)
        >>> conv(keras.ops.zeros((1, 16, 16, 3))).shape
        (1, 8, 8, 64)
    """

    def __init__(self, filters, kernel_size, padding=0, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.kernel_size = kernel_size
        self.padding = padding
        self.strides = strides
        self.padding2d = keras.layers.ZeroPadding2D(padding)
        self.conv2d = keras.layers.Conv2D(filters, kernel_size, strides=strides)
        self.as_matmul = False

    def build(self, input_shape):
        padded_shape = self.padding2d.compute_output_shape(input_shape)
        self.conv2d.build(padded_shape)
        height, width = self.conv2d.compute_output_shape(padded_shape)[1:3]
        kernel_weights = self.kernel_size ** 2 * padded_shape[-1] * self.filters
        self.as_matmul = (self.kernel_size > 1 and height is not None and width is not None
                          and height * width <= MATMUL_MAX_POSITIONS
                          and kernel_weights >= MATMUL_MIN_KERNEL_WEIGHTS)

    def call(self, inputs):
        padded = self.padding2d(inputs)
        if self.as_matmul:
            return self._patches_times_kernel(padded)
        return self.conv2d(padded)

    def _patches_times_kernel(self, padded):
        """The convolution as (B*H*W, k*k*C_in) patches @ (k*k*C_in, filters) kernel + bias."""
        k, s = self.kernel_size, self.strides
        height = (padded.shape[1] - k) // s + 1
        width = (padded.shape[2] - k) // s + 1
        # Patch channels ordered (row, column, channel): the Conv2D kernel's (kh, kw, C_in) order.
        patches = ops.concatenate(
            [padded[:, i:i + s * (height - 1) + 1:s, j:j + s * (width - 1) + 1:s, :]
             for i in range(k) for j in range(k)], axis=-1)
        kernel = ops.cast(ops.reshape(self.conv2d.kernel, (-1, self.filters)), patches.dtype)
        outputs = ops.matmul(ops.reshape(patches, (-1, kernel.shape[0])), kernel)
        outputs = outputs + ops.cast(self.conv2d.bias, outputs.dtype)
        return ops.reshape(outputs, (-1, height, width, self.filters))

    def compute_output_shape(self, input_shape):
        return self.conv2d.compute_output_shape(self.padding2d.compute_output_shape(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      padding=self.padding, strides=self.strides)
        return config


class UNetResBlock(keras.layers.Layer):
    """The UNet's residual block, conditioned on the (projected) timestep embedding.

    x -> GroupNorm -> swish -> conv3x3 -> + Dense(swish(t_emb)) -> GroupNorm -> swish
      -> conv3x3 -> + (x, or a 1x1 conv of x when the width changes)

    Example:
        >>> block = UNetResBlock(64, groups=8)
        >>> x, t_emb = keras.ops.zeros((2, 8, 8, 32)), keras.ops.zeros((2, 128))
        >>> block([x, t_emb]).shape
        (2, 8, 8, 64)
    """

    def __init__(self, output_dim, groups=32, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.groups = groups
        # Weight order = keras-cv's entry_flow, embedding_flow, exit_flow, residual projection.
        self.norm1 = _group_norm(groups)
        self.conv1 = PaddedConv2D(output_dim, 3, padding=1)
        self.embedding_dense = keras.layers.Dense(output_dim)
        self.norm2 = _group_norm(groups)
        self.conv2 = PaddedConv2D(output_dim, 3, padding=1)
        self.residual_projection = None

    def build(self, input_shape):
        x_shape, embedding_shape = input_shape
        out_shape = _with_channels(x_shape, self.output_dim)
        self.norm1.build(x_shape)
        self.conv1.build(x_shape)
        self.embedding_dense.build(embedding_shape)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)
        # Created here, after the other sub-layers, so its weights come last (as keras-cv's).
        if x_shape[-1] != self.output_dim:
            self.residual_projection = PaddedConv2D(self.output_dim, 1)
            self.residual_projection.build(x_shape)

    def compute_output_shape(self, input_shape):
        return _with_channels(input_shape[0], self.output_dim)

    def call(self, inputs):
        inputs, embeddings = inputs
        x = self.conv1(ops.silu(self.norm1(inputs)))
        embeddings = self.embedding_dense(ops.silu(embeddings))
        x = x + embeddings[:, None, None, :]
        x = self.conv2(ops.silu(self.norm2(x)))
        skip = inputs if self.residual_projection is None else self.residual_projection(inputs)
        return x + skip

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, groups=self.groups)
        return config


class GEGLU(keras.layers.Layer):
    """Gated GELU: Dense to twice the width, then value * gelu(gate).

    `approximate=True` is keras-cv's tanh approximation; False is the exact (erf) GELU
    of PyTorch's Stable Diffusion and diffusers (they differ by up to 5e-4).

    Example:
        >>> GEGLU(256)(keras.ops.zeros((2, 16, 64))).shape
        (2, 16, 256)
    """

    def __init__(self, output_dim, approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.approximate = approximate
        self.dense = keras.layers.Dense(output_dim * 2)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def compute_output_shape(self, input_shape):
        return _with_channels(input_shape, self.output_dim)

    def call(self, inputs):
        x = self.dense(inputs)
        value, gate = x[..., : self.output_dim], x[..., self.output_dim:]
        return value * keras.activations.gelu(gate, approximate=self.approximate)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, approximate=self.approximate)
        return config


class CrossAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention from `inputs` (queries) to `context`.

    With `context=None` it is self-attention. q/k/v projections have no bias, the output
    projection has one (as in Stable Diffusion).

    Example:
        >>> attention = CrossAttention(num_heads=4, head_size=16)
        >>> x, context = keras.ops.zeros((2, 64, 64)), keras.ops.zeros((2, 4, 32))
        >>> attention(x, context=context).shape
        (2, 64, 64)
    """

    def __init__(self, num_heads, head_size, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_size = head_size
        width = num_heads * head_size
        self.to_q = keras.layers.Dense(width, use_bias=False)
        self.to_k = keras.layers.Dense(width, use_bias=False)
        self.to_v = keras.layers.Dense(width, use_bias=False)
        self.out_proj = keras.layers.Dense(width)

    def build(self, inputs_shape, context_shape=None):
        context_shape = inputs_shape if context_shape is None else context_shape
        self.to_q.build(inputs_shape)
        self.to_k.build(context_shape)
        self.to_v.build(context_shape)
        self.out_proj.build(_with_channels(inputs_shape, self.num_heads * self.head_size))

    def compute_output_shape(self, inputs_shape, context_shape=None):
        return _with_channels(inputs_shape, self.num_heads * self.head_size)

    def _split_heads(self, x):
        # (batch, tokens, heads * size) -> (batch, heads, tokens, size)
        x = ops.reshape(x, (ops.shape(x)[0], -1, self.num_heads, self.head_size))
        return ops.transpose(x, (0, 2, 1, 3))

    def call(self, inputs, context=None):
        if context is None:
            context = inputs
        q = self._split_heads(self.to_q(inputs))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (self.head_size ** -0.5)
        weights = ops.softmax(scores, axis=-1)
        attended = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        attended = ops.reshape(attended, (ops.shape(inputs)[0], -1, self.num_heads * self.head_size))
        return self.out_proj(attended)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_size=self.head_size)
        return config


class TransformerBlock(keras.layers.Layer):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU MLP.

    Example:
        >>> block = TransformerBlock(64, num_heads=4, head_size=16)
        >>> x, context = keras.ops.zeros((2, 16, 64)), keras.ops.zeros((2, 4, 32))
        >>> block([x, context]).shape
        (2, 16, 64)
    """

    def __init__(self, dim, num_heads, head_size, gelu_approximate=True, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.num_heads = num_heads
        self.head_size = head_size
        self.gelu_approximate = gelu_approximate
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.attn1 = CrossAttention(num_heads, head_size)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.attn2 = CrossAttention(num_heads, head_size)
        self.norm3 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.geglu = GEGLU(dim * 4, approximate=gelu_approximate)
        self.dense = keras.layers.Dense(dim)

    def build(self, input_shape):
        x_shape, context_shape = input_shape
        self.norm1.build(x_shape)
        self.attn1.build(x_shape)
        self.norm2.build(x_shape)
        self.attn2.build(x_shape, context_shape)
        self.norm3.build(x_shape)
        self.geglu.build(x_shape)
        self.dense.build(_with_channels(x_shape, self.dim * 4))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def call(self, inputs):
        x, context = inputs
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.dense(self.geglu(self.norm3(x))) + x

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, num_heads=self.num_heads, head_size=self.head_size,
                      gelu_approximate=self.gelu_approximate)
        return config


class SpatialTransformer(keras.layers.Layer):
    """Attention over the pixels of a feature map, conditioned on a context sequence.

    GroupNorm -> proj_in -> flatten to (batch, h*w, channels) -> TransformerBlock with
    the context -> unflatten -> proj_out -> + input. The projections are 1x1 convolutions
    (sd1) or Dense layers (sd2, `linear_projection=True`); both hold the same numbers but
    their kernels have different shapes in the weight files.

    Example:
        >>> st = SpatialTransformer(num_heads=4, head_size=16, groups=8)
        >>> x, context = keras.ops.zeros((2, 4, 4, 64)), keras.ops.zeros((2, 4, 32))
        >>> st([x, context]).shape
        (2, 4, 4, 64)
    """

    def __init__(self, num_heads, head_size, linear_projection=False, groups=32, gelu_approximate=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_size = head_size
        self.linear_projection = linear_projection
        self.groups = groups
        self.gelu_approximate = gelu_approximate
        channels = num_heads * head_size
        self.norm = _group_norm(groups)
        self.proj_in = self._projection(channels)
        self.transformer_block = TransformerBlock(channels, num_heads, head_size, gelu_approximate)
        self.proj_out = self._projection(channels)

    def _projection(self, channels):
        if self.linear_projection:
            return keras.layers.Dense(channels)
        return PaddedConv2D(channels, 1)

    def build(self, input_shape):
        x_shape, context_shape = input_shape
        batch, height, width, channels = x_shape
        pixels = height * width if height is not None and width is not None else None
        self.norm.build(x_shape)
        self.proj_in.build(x_shape)
        self.transformer_block.build([(batch, pixels, channels), context_shape])
        self.proj_out.build(x_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def call(self, inputs):
        inputs, context = inputs
        shape = ops.shape(inputs)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        x = self.proj_in(self.norm(inputs))
        x = ops.reshape(x, (batch, height * width, channels))
        x = self.transformer_block([x, context])
        x = ops.reshape(x, (batch, height, width, channels))
        return self.proj_out(x) + inputs

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_size=self.head_size,
                      linear_projection=self.linear_projection, groups=self.groups,
                      gelu_approximate=self.gelu_approximate)
        return config


class Upsample(keras.layers.Layer):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution.

    Example:
        >>> Upsample(32)(keras.ops.zeros((1, 4, 4, 64))).shape
        (1, 8, 8, 32)
    """

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.ups = keras.layers.UpSampling2D(2)
        self.conv = PaddedConv2D(channels, 3, padding=1)

    def build(self, input_shape):
        self.ups.build(input_shape)
        self.conv.build(self.ups.compute_output_shape(input_shape))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(self.ups.compute_output_shape(input_shape))

    def call(self, inputs):
        return self.conv(self.ups(inputs))

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels)
        return config


class VAEResBlock(keras.layers.Layer):
    """The autoencoder's residual block: (GroupNorm -> swish -> conv3x3) x 2 + residual.

    `epsilon` of the GroupNorms: keras-cv's 1e-5, or 1e-6 as the PyTorch original and
    diffusers' AutoencoderKL.

    Example:
        >>> VAEResBlock(256)(keras.ops.zeros((1, 8, 8, 128))).shape
        (1, 8, 8, 256)
    """

    def __init__(self, output_dim, groups=32, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.groups = groups
        self.epsilon = epsilon
        self.norm1 = _group_norm(groups, epsilon)
        self.conv1 = PaddedConv2D(output_dim, 3, padding=1)
        self.norm2 = _group_norm(groups, epsilon)
        self.conv2 = PaddedConv2D(output_dim, 3, padding=1)
        self.residual_projection = None

    def build(self, input_shape):
        out_shape = _with_channels(input_shape, self.output_dim)
        self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)
        # Last in the weight order, as keras-cv's ResnetBlock.
        if input_shape[-1] != self.output_dim:
            self.residual_projection = PaddedConv2D(self.output_dim, 1)
            self.residual_projection.build(input_shape)

    def compute_output_shape(self, input_shape):
        return _with_channels(input_shape, self.output_dim)

    def call(self, inputs):
        x = self.conv1(ops.silu(self.norm1(inputs)))
        x = self.conv2(ops.silu(self.norm2(x)))
        skip = inputs if self.residual_projection is None else self.residual_projection(inputs)
        return x + skip

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, groups=self.groups, epsilon=self.epsilon)
        return config


class VAEAttentionBlock(keras.layers.Layer):
    """The autoencoder's single-head self-attention over pixels (1x1-conv q, k, v, out).

    Example:
        >>> VAEAttentionBlock(512)(keras.ops.zeros((1, 4, 4, 512))).shape
        (1, 4, 4, 512)
    """

    def __init__(self, output_dim, groups=32, epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.groups = groups
        self.epsilon = epsilon
        self.norm = _group_norm(groups, epsilon)
        self.q = PaddedConv2D(output_dim, 1)
        self.k = PaddedConv2D(output_dim, 1)
        self.v = PaddedConv2D(output_dim, 1)
        self.proj_out = PaddedConv2D(output_dim, 1)

    def build(self, input_shape):
        for layer in (self.norm, self.q, self.k, self.v, self.proj_out):
            layer.build(input_shape)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def call(self, inputs):
        x = self.norm(inputs)
        shape = ops.shape(x)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        q, k, v = (ops.reshape(conv(x), (batch, height * width, channels))
                   for conv in (self.q, self.k, self.v))
        scores = ops.matmul(q, ops.transpose(k, (0, 2, 1))) * (self.output_dim ** -0.5)
        weights = ops.softmax(scores, axis=-1)  # (batch, query pixel, key pixel)
        x = ops.reshape(ops.matmul(weights, v), (batch, height, width, channels))
        return self.proj_out(x) + inputs

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, groups=self.groups, epsilon=self.epsilon)
        return config


class LatentScale(keras.layers.Layer):
    """Keeps the latent mean (first 4 of the encoder's 8 channels) and scales it by 0.18215.

    The other 4 channels are the log-variance; keras-cv's encoder (and so this one)
    returns the mean, without sampling.

    Example:
        >>> LatentScale()(keras.ops.ones((1, 2, 2, 8))).shape
        (1, 2, 2, 4)
    """

    def call(self, inputs):
        return inputs[..., :4] * LATENT_SCALE

    def compute_output_shape(self, input_shape):
        return _with_channels(input_shape, 4)
