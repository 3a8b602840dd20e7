"""The Stable Diffusion UNet, one definition for every preset (sd1, sd2, tiny, small).

For `sd1` the graph is keras-cv's `DiffusionModel` layer for layer and for `sd2` its
`DiffusionModelV2`, so keras-cv's published weight files load unchanged
(`Models/diffusion/weights.py`); `tiny` is the same graph with small widths.

Shape of the graph (L = number of levels, R = num_res_blocks):

    t_emb -> Dense(4C) -> swish -> Dense(4C)                  (C = level_channels[0])
    x -> conv_in -> [R x (ResBlock [+ SpatialTransformer]) , downsample conv]  per level
      -> middle: ResBlock, SpatialTransformer, ResBlock
      -> [(R+1) x (concat skip, ResBlock [+ SpatialTransformer]), Upsample]      per level, reversed
      -> GroupNorm -> swish -> conv_out (latent_channels)

Example:
    >>> from Models.diffusion.presets import get_preset
    >>> preset = get_preset("tiny")
    >>> unet = build_unet(preset, image_size=8)
    >>> x = keras.ops.zeros((2, 8, 8, preset.latent_channels))
    >>> t_emb = timestep_embedding(keras.ops.convert_to_tensor([10, 500]), preset.timestep_embedding_dim)
    >>> context = keras.ops.zeros((2, preset.context_length, preset.context_dim))
    >>> unet([x, t_emb, context]).shape
    (2, 8, 8, 3)
"""

import math

import keras
from keras import ops

from Models.diffusion.layers import PaddedConv2D, SpatialTransformer, UNetResBlock, Upsample, _group_norm
from Models.diffusion.presets import get_preset
from Models.errors import ModelSettingsError


def timestep_embedding(timesteps, dim=320, max_period=10000):
    """Sinusoidal embedding of diffusion timesteps, (B,) -> (B, dim), [cos, sin] as keras-cv.

    Frequencies are exp(-log(max_period) * i / (dim/2)), i = 0 .. dim/2 - 1.

    Example:
        >>> timestep_embedding(keras.ops.convert_to_tensor([0, 999]), dim=320).shape
        (2, 320)
    """
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(0, half, dtype="float32") / half)
    args = ops.cast(ops.reshape(timesteps, (-1, 1)), "float32") * freqs[None, :]
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def build_unet(preset, image_size, context_length=None, name="unet", image_channels=None):
    """The UNet of `preset` for images of `image_size` pixels (None: any size).

    `image_channels` (1 or 3) sets a pixel-space UNet's input and output channels to the
    dataset's (default: 3; latent presets always have 4).

    Inputs `[x, t_emb, context]`:
        x        (B, S, S, C), S = image_size // preset.downsample, C = preset.unet_channels(image_channels)
        t_emb    (B, preset.timestep_embedding_dim), from `timestep_embedding`
        context  (B, context_length, preset.context_dim)
    Output: the predicted noise, shaped as x.
    """
    preset = get_preset(preset)
    context_length = context_length or preset.context_length
    if image_size is None:
        size = None
    else:
        if image_size <= 0 or image_size % preset.min_image_size:
            raise ModelSettingsError(f"image size {image_size} does not fit the {preset.name} UNet: "
                                     f"it must be a positive multiple of {preset.min_image_size}")
        size = image_size // preset.downsample
    groups = preset.norm_groups
    channels_io = preset.unet_channels(image_channels) if image_channels else preset.latent_channels

    def res_block(channels):
        return UNetResBlock(channels, groups=groups)

    def attention(level):
        channels, heads = preset.level_channels[level], preset.level_heads[level]
        return SpatialTransformer(heads, channels // heads, preset.linear_attention_projection,
                                  groups=groups, gelu_approximate=preset.gelu_approximate)

    # The inputs, named as keras-cv's so dict inputs work for both.
    context = keras.layers.Input((context_length, preset.context_dim), name="context")
    t_embed_input = keras.layers.Input((preset.timestep_embedding_dim,), name="timestep_embedding")
    latent = keras.layers.Input((size, size, channels_io), name="latent")

    t_emb = keras.layers.Dense(preset.time_embedding_width)(t_embed_input)
    t_emb = keras.layers.Activation("swish")(t_emb)
    t_emb = keras.layers.Dense(preset.time_embedding_width)(t_emb)

    # Down: every block's output is kept for the skip connections.
    last = len(preset.level_channels) - 1
    skips = []
    x = PaddedConv2D(preset.level_channels[0], 3, padding=1)(latent)
    skips.append(x)
    for level, channels in enumerate(preset.level_channels):
        for _ in range(preset.num_res_blocks):
            x = res_block(channels)([x, t_emb])
            if preset.level_attention[level]:
                x = attention(level)([x, context])
            skips.append(x)
        if level < last:
            x = PaddedConv2D(channels, 3, strides=2, padding=1)(x)  # downsample 2x
            skips.append(x)

    # Middle: always with attention, at the last level's width and heads.
    x = res_block(preset.level_channels[last])([x, t_emb])
    x = attention(last)([x, context])
    x = res_block(preset.level_channels[last])([x, t_emb])

    # Up: one more block per level than going down, each eating one skip.
    for level in reversed(range(len(preset.level_channels))):
        channels = preset.level_channels[level]
        for _ in range(preset.num_res_blocks + 1):
            x = keras.layers.Concatenate()([x, skips.pop()])
            x = res_block(channels)([x, t_emb])
            if preset.level_attention[level]:
                x = attention(level)([x, context])
        if level > 0:
            x = Upsample(channels)(x)
    assert not skips

    x = _group_norm(groups)(x)
    x = keras.layers.Activation("swish")(x)
    x = PaddedConv2D(channels_io, 3, padding=1)(x)
    # The predicted noise in float32 even under a mixed-precision policy (the sampler and
    # the loss need its precision); a weightless layer, so the weight order is unchanged.
    output = keras.layers.Activation("linear", dtype="float32")(x)
    return keras.Model([latent, t_embed_input, context], output, name=name)
