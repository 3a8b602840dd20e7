"""ResNet20 as the paper describes it: layout, shortcuts, settings, parameter count, serialisation."""

import keras
import numpy as np
import pytest

from Models.resnet20 import (BasicBlock, PoolPadShortcut, build_resnet20,
                             feature_extractor)


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, BasicBlock)]


def test_stage_and_block_layout_at_28px():
    model = build_resnet20((28, 28, 3), num_classes=5)
    blocks = _blocks(model)
    assert [b.name for b in blocks] == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    assert [b.filters for b in blocks] == [64] * 3 + [128] * 3 + [256] * 3
    assert [b.strides for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert [tuple(b.output.shape[1:]) for b in blocks] == (
        [(28, 28, 64)] * 3 + [(14, 14, 128)] * 3 + [(7, 7, 256)] * 3)
    # Only the two blocks that change the shape have a (pool + pad) shortcut.
    assert [type(b.shortcut).__name__ for b in blocks] == (
        ["NoneType"] * 3 + ["PoolPadShortcut", "NoneType", "NoneType"] * 2)
    assert model.get_layer("features").output.shape[1:] == (256,)
    assert model.output.shape[1:] == (5,)


def test_odd_resolution_shortcut_matches_the_strided_convolution():
    # 7x7 → 4x4 → 2x2: the max-pool shortcut must round up like the 'same' conv.
    model = build_resnet20((7, 7, 3), num_classes=3, initial_filters=4)
    shapes = [tuple(b.output.shape[1:]) for b in _blocks(model)]
    assert shapes[3] == (4, 4, 8) and shapes[6] == (2, 2, 16)
    for block in _blocks(model):
        if block.shortcut is not None:
            in_shape = block.input.shape
            assert block.shortcut.compute_output_shape(in_shape) == block.output.shape


def test_parameter_count_by_hand():
    # input 8x8x3, f = 4, 3 classes; convolutions have no bias (BatchNorm follows).
    f, c, k = 4, 3, 3
    bn = lambda ch: 4 * ch  # gamma, beta (trainable) + moving mean, variance
    conv = lambda cin, cout: 9 * cin * cout
    stem = conv(c, f) + bn(f)                                          # 108 + 16
    block = lambda cin, cout: conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout)
    stage1 = 3 * block(f, f)                                           # 3 * 320
    stage2 = block(f, 2 * f) + 2 * block(2 * f, 2 * f)                 # 928 + 2 * 1216
    stage3 = block(2 * f, 4 * f) + 2 * block(4 * f, 4 * f)             # 3584 + 2 * 4736
    dense = 4 * f * k + k                                              # 51
    expected = stem + stage1 + stage2 + stage3 + dense
    assert expected == 17551
    model = build_resnet20((8, 8, 3), num_classes=k, initial_filters=f)
    assert model.count_params() == expected
    # Non-trainable: the BatchNorm moving statistics (2 per channel).
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert non_trainable == 2 * (f + 6 * f + 6 * 2 * f + 6 * 4 * f)


def test_paper_width_has_4_29_million_parameters():
    assert build_resnet20((32, 32, 3), num_classes=10).count_params() == 4_291_530


def test_paper_settings():
    model = build_resnet20((16, 16, 3), num_classes=4, initial_filters=8)
    convs, norms = [], []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            convs.append(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            norms.append(layer)
    assert len(convs) == 19 and len(norms) == 19  # stem + 9 blocks x 2
    assert all(not conv.use_bias for conv in convs)
    assert all(isinstance(conv.kernel_initializer, keras.initializers.HeNormal) for conv in convs)
    assert all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in norms)
    dense = model.get_layer("predictions")
    assert isinstance(dense.kernel_initializer, keras.initializers.HeNormal)
    assert dense.activation is keras.activations.softmax
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)


def test_pool_pad_shortcut_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(PoolPadShortcut(7, strides=2)(x))
    assert y.shape == (2, 3, 3, 7)
    # 3x3 max-pool, stride 2, 'same' padding (ignores the outside) on a 5x5 map.
    for i in range(3):
        for j in range(3):
            window = x[:, max(0, 2 * i - 1):2 * i + 2, max(0, 2 * j - 1):2 * j + 2, :]
            np.testing.assert_allclose(y[:, i, j, :3], window.max(axis=(1, 2)), rtol=1e-6)
    assert np.all(y[..., 3:] == 0)


def test_takes_0_255_images_and_outputs_probabilities():
    model = build_resnet20((8, 8, 3), num_classes=3, initial_filters=4)
    x = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    p_uint8 = model.predict(x, verbose=0)
    p_float = model.predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(p_uint8, p_float, rtol=1e-6)
    np.testing.assert_allclose(p_uint8.sum(axis=1), 1.0, rtol=1e-5)
    # Scaling happens inside: feeding x / 255 gives a different answer than x.
    p_scaled = model.predict(x.astype("float32") / 255, verbose=0)
    assert not np.allclose(p_uint8, p_scaled)


def test_feature_extractor_reads_the_features_layer():
    model = build_resnet20((8, 8, 3), num_classes=3, initial_filters=4)
    x = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    features = keras.ops.convert_to_numpy(feature_extractor(model)(x))
    assert features.shape == (5, 16)
    # The softmax of the dense layer applied to these features is the model's output.
    kernel, bias = model.get_layer("predictions").get_weights()
    logits = features @ kernel + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-6)


def test_config_round_trip_and_weights():
    block = BasicBlock(8, strides=2, name="b")
    assert BasicBlock.from_config(block.get_config()).get_config() == block.get_config()
    shortcut = PoolPadShortcut(8, 2)
    assert PoolPadShortcut.from_config(shortcut.get_config()).get_config() == shortcut.get_config()
    model = build_resnet20((8, 8, 3), num_classes=3, initial_filters=4)
    clone = keras.models.clone_model(model)  # rebuilds every layer from its config
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(3).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(x, verbose=0), clone.predict(x, verbose=0), rtol=1e-6)


def test_float32_output_under_mixed_precision():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_resnet20((8, 8, 3), num_classes=3, initial_filters=4)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert model.output.dtype == "float32"


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        build_resnet20((8, 8), num_classes=3)
    with pytest.raises(ValueError):
        build_resnet20((8, 8, 3), num_classes=1)
