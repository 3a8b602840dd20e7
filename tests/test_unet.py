"""The diffusion presets, UNet layers and the tiny UNet (fast: no full-size model here)."""

import functools
import math

import keras
import numpy as np
import pytest
from keras import ops

from Models.diffusion import layers as L
from Models.diffusion.presets import PRESETS, get_preset
from Models.diffusion.unet import build_unet, timestep_embedding
from Models.errors import ModelSettingsError

TINY = get_preset("tiny")


def _inputs(preset, size, batch=2, seed=0, timesteps=(10, 700)):
    rng = np.random.default_rng(seed)
    s = size // preset.downsample
    x = ops.convert_to_tensor(rng.standard_normal((batch, s, s, preset.latent_channels)), "float32")
    t_emb = timestep_embedding(ops.convert_to_tensor(timesteps[:batch]), preset.timestep_embedding_dim)
    context = ops.convert_to_tensor(
        rng.standard_normal((batch, preset.context_length, preset.context_dim)), "float32")
    return x, t_emb, context


def assert_same_outputs_and_gradients(ours, reference, x, gradient_atol):
    """Same outputs, and the same gradients for the input and weights (the training path)."""
    np.testing.assert_allclose(ops.convert_to_numpy(ours(x)), ops.convert_to_numpy(reference(x)), atol=2e-5)
    if keras.backend.backend() != "tensorflow":
        return  # the gradients below use TensorFlow's GradientTape
    import tensorflow as tf

    def gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x)))
        return [g.numpy() for g in tape.gradient(loss, [x, *layer.trainable_weights])]

    for got, expected in zip(gradients(ours), gradients(reference)):
        np.testing.assert_allclose(got, expected, atol=gradient_atol, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_unet8():
    keras.utils.set_random_seed(0)
    return build_unet(TINY, 8)


def test_presets_have_the_papers_settings():
    sd1, sd2 = get_preset("sd1"), get_preset("sd2")
    assert sd1.level_channels == (320, 640, 1280, 1280) and sd1.context_dim == 768
    assert sd2.context_dim == 1024 and sd2.linear_attention_projection
    # sd2's heads are 64 wide at every level, sd1's 8 per level.
    assert {c // h for c, h in zip(sd2.level_channels, sd2.level_heads)} == {64}
    for sd in (sd1, sd2):
        assert (sd.context_length, sd.image_size, sd.latent_channels, sd.downsample) == (100, 128, 4, 8)
        assert (sd.enc_batch_size, sd.enc_epochs, sd.enc_lr) == (64, 50, 1e-4)
        assert (sd.dif_batch_size, sd.dif_epochs, sd.dif_lr) == (16, 10, 1e-5)
        assert (sd.default_inference_steps, sd.default_guidance_scale) == (50, 7.5)
        assert sd.class_encoder_hidden == 500 and sd.pretrained
    assert not TINY.latent and TINY.latent_channels == 3 and TINY.downsample == 1
    assert TINY.image_size is None and not TINY.pretrained
    assert get_preset(TINY) is TINY


def test_unknown_preset_is_one_line_user_error():
    with pytest.raises(ModelSettingsError, match="unknown diffusion preset 'sd3'.*sd1, sd2, tiny, small"):
        get_preset("sd3")


def test_every_preset_width_divides_into_groups_and_heads():
    for preset in PRESETS.values():
        for channels, heads in zip(preset.level_channels, preset.level_heads):
            assert channels % heads == 0 and channels % preset.norm_groups == 0


def test_timestep_embedding_is_keras_cv_formula():
    t = np.array([0, 1, 999])
    got = ops.convert_to_numpy(timestep_embedding(ops.convert_to_tensor(t), dim=320))
    half = 160
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    np.testing.assert_allclose(got, np.concatenate([np.cos(args), np.sin(args)], axis=1), atol=1e-4)
    assert got.shape == (3, 320)


def test_tiny_unet_shapes(tiny_unet8):
    x, t_emb, context = _inputs(TINY, 8)
    out = ops.convert_to_numpy(tiny_unet8([x, t_emb, context]))
    assert out.shape == (2, 8, 8, 3)
    assert np.isfinite(out).all()
    # Small enough to train from scratch on a CPU.
    assert tiny_unet8.count_params() < 3_000_000


def test_tiny_unet_28px_any_context_length():
    unet = build_unet(TINY, 28, context_length=7)
    x, t_emb, _ = _inputs(TINY, 28)
    context = ops.ones((2, 7, TINY.context_dim))
    out = ops.convert_to_numpy(unet([x, t_emb, context]))
    assert out.shape == (2, 28, 28, 3) and np.isfinite(out).all()


def test_tiny_unet_depends_on_context_and_timestep(tiny_unet8):
    x, t_emb, context = _inputs(TINY, 8)
    base = ops.convert_to_numpy(tiny_unet8([x, t_emb, context]))
    other_context = ops.convert_to_numpy(tiny_unet8([x, t_emb, context * -1.0 + 1.0]))
    other_t = timestep_embedding(ops.convert_to_tensor([500, 20]), TINY.timestep_embedding_dim)
    other_time = ops.convert_to_numpy(tiny_unet8([x, other_t, context]))
    assert np.abs(base - other_context).max() > 1e-4
    assert np.abs(base - other_time).max() > 1e-4
    # Each sample only sees its own inputs (no mixing across the batch).
    single = ops.convert_to_numpy(tiny_unet8([x[:1], t_emb[:1], context[:1]]))
    np.testing.assert_allclose(single, base[:1], atol=1e-5)


def test_image_size_must_halve_through_every_level():
    with pytest.raises(ModelSettingsError, match="multiple of 2"):
        build_unet(TINY, 7)
    with pytest.raises(ModelSettingsError, match="multiple of 64"):
        build_unet(get_preset("sd1"), 100)


def test_building_the_unet_and_autoencoder_runs_no_block_call(monkeypatch):
    """Every block builds its sub-layers and gives its output shape, so building a model calls no
    block's `call` (Keras would otherwise build a block by running `call` on symbolic inputs, once
    more per level of nesting: 2 to 4 runs of each attention layer)."""
    from Models.diffusion.autoencoder import build_image_decoder, build_image_encoder
    blocks = (L.UNetResBlock, L.SpatialTransformer, L.TransformerBlock, L.CrossAttention, L.GEGLU,
              L.Upsample, L.VAEResBlock, L.VAEAttentionBlock, L.LatentScale)
    calls = {block.__name__: 0 for block in blocks}
    def counting(call, name):
        @functools.wraps(call)  # Keras reads the call's signature
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return call(self, *args, **kwargs)
        return counted

    for block in blocks:
        monkeypatch.setattr(block, "call", counting(block.call, block.__name__))
    unet = build_unet(get_preset("tiny"), 8)
    build_image_encoder(64), build_image_decoder(64)
    assert calls == {name: 0 for name in calls}
    x = ops.zeros((2, 8, 8, 3))
    unet([x, timestep_embedding(ops.convert_to_tensor([1, 2]), 32), ops.zeros((2, 4, 64))])
    assert calls["SpatialTransformer"] == 6 and calls["CrossAttention"] == 12  # counted when called


def test_same_seed_same_weights_and_the_unet_learns(tiny_unet8):
    """Same seed, same weights; then SGD steps on one batch lower the loss: gradients flow.

    (SGD, not Adam: on TensorFlow, Adam's per-variable slots cost ~30 s of graph building.)
    """
    keras.utils.set_random_seed(0)
    unet = build_unet(TINY, 8)
    for a, b in zip(unet.get_weights(), tiny_unet8.get_weights()):
        np.testing.assert_array_equal(a, b)
    x, t_emb, context = _inputs(TINY, 8, batch=2, seed=3)
    target = ops.convert_to_tensor(np.random.default_rng(4).standard_normal((2, 8, 8, 3)), "float32")
    unet.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=False)
    losses = unet.fit([x, t_emb, context], target, epochs=20, batch_size=2, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("layer", [
    L.PaddedConv2D(8, 3, padding=1, strides=2),
    L.UNetResBlock(16, groups=4),
    L.SpatialTransformer(2, 8, linear_projection=True, groups=4),
    L.TransformerBlock(16, 2, 8),
    L.CrossAttention(2, 8),
    L.GEGLU(32),
    L.Upsample(8),
    L.VAEResBlock(16, groups=4),
    L.VAEAttentionBlock(16, groups=4),
    L.LatentScale(),
    L.GroupNorm(groups=4, epsilon=1e-5),
])
def test_layer_config_round_trip(layer):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


def test_spatial_transformer_projections_linear_vs_conv():
    x, context = ops.ones((1, 4, 4, 16)), ops.ones((1, 3, 8))
    conv = L.SpatialTransformer(2, 8, linear_projection=False, groups=4)
    dense = L.SpatialTransformer(2, 8, linear_projection=True, groups=4)
    conv([x, context]), dense([x, context])
    # Same number of weights, different kernel shapes (1x1 conv vs dense), as keras-cv's sd1/sd2.
    assert conv.proj_in.conv2d.kernel.shape == (1, 1, 16, 16)
    assert dense.proj_in.kernel.shape == (16, 16)


def test_cross_attention_attends_to_context():
    keras.utils.set_random_seed(0)
    attention = L.CrossAttention(2, 4)
    x = ops.convert_to_tensor(np.random.default_rng(0).standard_normal((1, 5, 8)), "float32")
    c1 = ops.convert_to_tensor(np.random.default_rng(1).standard_normal((1, 3, 6)), "float32")
    c2 = ops.convert_to_tensor(np.random.default_rng(2).standard_normal((1, 3, 6)), "float32")
    out1, out2 = attention(x, context=c1), attention(x, context=c2)
    assert out1.shape == (1, 5, 8)
    assert np.abs(ops.convert_to_numpy(out1 - out2)).max() > 1e-4
    # Permuting the context tokens does not change attention's output.
    perm = ops.convert_to_tensor(ops.convert_to_numpy(c1)[:, ::-1])
    np.testing.assert_allclose(ops.convert_to_numpy(attention(x, context=perm)),
                               ops.convert_to_numpy(out1), atol=1e-5)


@pytest.mark.parametrize("size, padding, strides", [(4, 1, 1), (4, 1, 2), (5, ((0, 1), (0, 1)), 2)])
def test_large_kernel_on_small_map_is_the_same_convolution(size, padding, strides):
    """The matrix-product path of PaddedConv2D gives Conv2D's outputs and gradients, same weights."""
    channels = 768  # 3*3*768*768 = 5.3M kernel weights: above L.MATMUL_MIN_KERNEL_WEIGHTS
    shape = (2, size, size, channels)
    ours = L.PaddedConv2D(channels, 3, padding=padding, strides=strides)
    ours.build(shape)
    assert ours.as_matmul
    reference = keras.Sequential([keras.layers.ZeroPadding2D(padding),
                                  keras.layers.Conv2D(channels, 3, strides=strides)])
    reference.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((3, 3, channels, channels)) / math.sqrt(9 * channels),
               rng.standard_normal(channels)]
    ours.set_weights(weights)
    reference.set_weights(weights)
    x = ops.convert_to_tensor(rng.standard_normal(shape), "float32")
    assert_same_outputs_and_gradients(ours, reference, x, gradient_atol=2e-4)
    assert ours.compute_output_shape(shape) == tuple(ours(x).shape)


@pytest.mark.parametrize("channels, size, kernel_size", [(768, 16, 3), (64, 4, 3), (1280, 2, 1)])
def test_small_kernels_large_maps_and_1x1_stay_conv2d(channels, size, kernel_size):
    conv = L.PaddedConv2D(channels, kernel_size, padding=kernel_size // 2)
    conv.build((None, size, size, channels))
    assert not conv.as_matmul


def test_matmul_convolution_keeps_the_mixed_precision_dtype():
    # --mixed_precision sets the global policy (Utils/runtime.py), which the inner layers follow too.
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        conv = L.PaddedConv2D(768, 3, padding=1)
        out = conv(ops.ones((2, 2, 2, 768), "bfloat16"))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert conv.as_matmul and keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(conv.conv2d.kernel.dtype) == "float32"


@pytest.mark.parametrize("shape, groups, offset", [((3, 8, 8, 32), 8, 0.0), ((2, 5, 7, 64), 32, 50.0),
                                                   ((2, 4, 4, 12), 3, -3.0)])
def test_group_norm_is_keras_group_normalization(shape, groups, offset):
    """Same weights, same outputs and gradients as Keras' layer (which keras-cv's weights were made for)."""
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.standard_normal(shape) * 3.0 + offset, "float32")
    ours = L.GroupNorm(groups=groups, epsilon=1e-5)
    reference = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5)
    ours.build(shape)
    reference.build(shape)
    assert [w.path.split("/")[-1] for w in ours.weights] == [w.path.split("/")[-1] for w in reference.weights]
    for weight in reference.weights:
        weight.assign(rng.standard_normal(weight.shape))
    ours.set_weights(reference.get_weights())
    assert_same_outputs_and_gradients(ours, reference, x, gradient_atol=1e-4)


def test_group_norm_keeps_the_mixed_precision_dtype():
    x = ops.ones((2, 4, 4, 8), "bfloat16")
    out = L.GroupNorm(groups=2, dtype="mixed_bfloat16")(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
