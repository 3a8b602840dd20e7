"""Stable Diffusion's autoencoder (the VAE), as keras-cv's ImageEncoder and Decoder.

The encoder maps images in [-1, 1] to latents 8x smaller with 4 channels, already
multiplied by 0.18215 (the latent mean, no sampling, as keras-cv); the decoder maps
latents back to images in about [-1, 1] (not clipped: the caller clips). The layer
order equals keras-cv's so its published `vae_encoder.h5` / `kcv_decoder.h5` load
unchanged (`Models/diffusion/weights.py`). Only the sd presets use it (`preset.latent`).

Example:
    >>> encoder, decoder = build_image_encoder(128), build_image_decoder(128)
    >>> latents = encoder(keras.ops.zeros((1, 128, 128, 3)))      # (1, 16, 16, 4)
    >>> decoder(latents).shape
    (1, 128, 128, 3)
"""

import keras

from Models.diffusion.layers import (
    LATENT_SCALE, LatentScale, PaddedConv2D, VAEAttentionBlock, VAEResBlock, _group_norm,
)
from Models.errors import ModelSettingsError

DOWNSAMPLE = 8


def _latent_size(image_size):
    if image_size is None:
        return None
    if image_size <= 0 or image_size % DOWNSAMPLE:
        raise ModelSettingsError(f"image size {image_size} does not fit the autoencoder: "
                                 f"it must be a positive multiple of {DOWNSAMPLE}")
    return image_size // DOWNSAMPLE


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def build_image_encoder(image_size=None, name="image_encoder", norm_epsilon=1e-5):
    """(B, S, S, 3) images in [-1, 1] -> (B, S/8, S/8, 4) latents x 0.18215 (S=None: any size).

    `norm_epsilon`: the GroupNorms' epsilon, keras-cv's 1e-5 or 1e-6 as diffusers'
    AutoencoderKL (`Models/diffusion/diffusers_convert.py`).
    """
    _latent_size(image_size)
    eps = norm_epsilon
    images = keras.layers.Input((image_size, image_size, 3), name="images")
    # Three stride-2 convolutions; they pad only bottom/right, as the PyTorch original.
    down_padding = ((0, 1), (0, 1))
    layers = [PaddedConv2D(128, 3, padding=1)]
    for channels in (128, 256, 512):
        layers += [VAEResBlock(channels, epsilon=eps), VAEResBlock(channels, epsilon=eps),
                   PaddedConv2D(channels, 3, padding=down_padding, strides=2)]
    layers += [
        VAEResBlock(512, epsilon=eps), VAEResBlock(512, epsilon=eps), VAEResBlock(512, epsilon=eps),
        VAEAttentionBlock(512, epsilon=eps),
        VAEResBlock(512, epsilon=eps),
        _group_norm(32, eps),
        keras.layers.Activation("swish"),
        PaddedConv2D(8, 3, padding=1),  # 4 mean + 4 log-variance channels
        PaddedConv2D(8, 1),
        LatentScale(dtype="float32"),  # float32 latents under mixed precision too
    ]
    return keras.Model(images, _apply(layers, images), name=name)


def build_image_decoder(image_size=None, name="image_decoder", norm_epsilon=1e-5):
    """(B, S/8, S/8, 4) latents (x 0.18215) -> (B, S, S, 3) images in about [-1, 1].

    `norm_epsilon`: as `build_image_encoder`'s.
    """
    size = _latent_size(image_size)
    eps = norm_epsilon
    latents = keras.layers.Input((size, size, 4), name="latents")
    layers = [
        keras.layers.Rescaling(1.0 / LATENT_SCALE),
        PaddedConv2D(4, 1),
        PaddedConv2D(512, 3, padding=1),
        # middle block
        VAEResBlock(512, epsilon=eps), VAEAttentionBlock(512, epsilon=eps), VAEResBlock(512, epsilon=eps),
    ]
    # Four stages of three ResBlocks; between them nearest 2x upsampling and a 3x3
    # convolution at the previous stage's width.
    widths = (512, 512, 256, 128)
    for stage, channels in enumerate(widths):
        if stage > 0:
            layers += [keras.layers.UpSampling2D(2), PaddedConv2D(widths[stage - 1], 3, padding=1)]
        layers += [VAEResBlock(channels, epsilon=eps) for _ in range(3)]
    layers += [
        _group_norm(32, eps),
        keras.layers.Activation("swish"),
        PaddedConv2D(3, 3, padding=1),
        keras.layers.Activation("linear", dtype="float32"),  # float32 images under mixed precision
    ]
    return keras.Model(latents, _apply(layers, latents), name=name)
