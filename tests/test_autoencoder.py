"""The Stable Diffusion autoencoder: shapes, and keras-cv's ImageEncoder / Decoder weight files load unchanged.

Parity: keras-cv's models with random weights are written as legacy Keras-2 .h5 files
(the layout of keras-cv's published vae_encoder.h5 / kcv_decoder.h5), loaded into ours
with `load_weights`, and both must give the same output. ~84M parameters in all, at
64 px; marked slow (about a minute on a 2-core CPU).
"""

import gc

import h5py
import keras
import numpy as np
import pytest
from keras import ops
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

from Models.diffusion.autoencoder import build_image_decoder, build_image_encoder
from Models.errors import ModelSettingsError

SIZE = 64


def _parity(reference, ours, inputs, path):
    """(max |ours - reference| after loading reference's legacy h5, same before loading, output scale)."""
    expected = ops.convert_to_numpy(reference(inputs))
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, reference)
    before = ops.convert_to_numpy(ours(inputs))
    ours.load_weights(path)
    got = ops.convert_to_numpy(ours(inputs))
    print(f"\n{ours.name}: max |ours - keras-cv| = {np.abs(got - expected).max():.3g} "
          f"(output max {np.abs(expected).max():.3g})")
    return np.abs(got - expected).max(), np.abs(before - expected).max(), np.abs(expected).max()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return ops.convert_to_tensor(rng.uniform(-1, 1, (2, SIZE, SIZE, 3)), "float32")


def test_image_size_must_be_a_multiple_of_8():
    with pytest.raises(ModelSettingsError, match="multiple of 8"):
        build_image_encoder(60)
    with pytest.raises(ModelSettingsError, match="multiple of 8"):
        build_image_decoder(12)


@pytest.mark.slow
def test_encoder_matches_keras_cv_image_encoder(images, tmp_path):
    from keras_cv.src.models.stable_diffusion.image_encoder import ImageEncoder

    keras.utils.set_random_seed(0)
    reference = ImageEncoder(download_weights=False)
    keras.utils.set_random_seed(1)
    ours = build_image_encoder(SIZE)
    assert ours.count_params() == reference.count_params()
    diff, diff_before, scale = _parity(reference, ours, images, tmp_path / "encoder.h5")
    latents = ours(images)
    assert tuple(latents.shape) == (2, SIZE // 8, SIZE // 8, 4)
    assert diff_before > 1e-2 * scale
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"
    del reference, ours
    gc.collect()


@pytest.mark.slow
def test_decoder_matches_keras_cv_decoder(tmp_path):
    from keras_cv.src.models.stable_diffusion.decoder import Decoder

    latents = ops.convert_to_tensor(np.random.default_rng(1).standard_normal((2, SIZE // 8, SIZE // 8, 4)) * 0.18215,
                                    "float32")
    keras.utils.set_random_seed(0)
    reference = Decoder(SIZE, SIZE, download_weights=False)
    keras.utils.set_random_seed(1)
    ours = build_image_decoder(SIZE)
    assert ours.count_params() == reference.count_params()
    diff, diff_before, scale = _parity(reference, ours, latents, tmp_path / "decoder.h5")
    assert tuple(ours(latents).shape) == (2, SIZE, SIZE, 3)
    assert diff_before > 1e-2 * scale
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"
    del reference, ours
    gc.collect()


def test_encoder_any_size_and_latent_mean(images):
    """image_size=None accepts any multiple of 8; the output is the first 4 of 8 channels x 0.18215."""
    keras.utils.set_random_seed(0)
    encoder = build_image_encoder(None)
    assert tuple(encoder(images[:1, :32, :48]).shape) == (1, 4, 6, 4)
    # The layer before LatentScale gives 8 channels; the output is its first 4, scaled.
    pre = keras.Model(encoder.inputs, encoder.layers[-2].output)
    raw = ops.convert_to_numpy(pre(images[:1, :32, :32]))
    np.testing.assert_allclose(ops.convert_to_numpy(encoder(images[:1, :32, :32])),
                               raw[..., :4] * 0.18215, rtol=1e-5, atol=1e-6)
