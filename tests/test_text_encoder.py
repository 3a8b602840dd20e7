"""Our CLIP text encoder loads keras-cv's TextEncoder weight layout unchanged and gives its output.

keras-cv 0.9's own `TextEncoder` (sd1) / `TextEncoderV2` (sd2) with random weights is saved as a
legacy Keras-2 .h5 file (the layout of keras-cv's published kcv_encoder.h5), loaded into
`build_text_encoder`, and both must agree on the same token ids.
"""

import gc

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

from Models.diffusion import weights as W
from Models.errors import CheckpointError
from Models.text.text_encoder import build_text_encoder


def text_encoder_parity(reference_class, preset, folder):
    """(max |ours - keras-cv|, max |ours before loading - keras-cv|, output scale, parameter counts)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49408, (2, 77)).astype("int32")
    tokens[:, 0], tokens[0, 10:] = 49406, 49407  # a start token, and a padded prompt
    positions = np.tile(np.arange(77, dtype="int32"), (2, 1))
    keras.utils.set_random_seed(0)
    reference = reference_class(77, download_weights=False)
    expected = keras.ops.convert_to_numpy(reference([tokens, positions]))
    reference_params = reference.count_params()
    path = folder / f"{preset}.h5"
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, reference)
    del reference
    gc.collect()
    keras.utils.set_random_seed(1)
    ours = build_text_encoder(preset)
    before = keras.ops.convert_to_numpy(ours(tokens))
    ours.load_weights(path)
    got = keras.ops.convert_to_numpy(ours(tokens))
    print(f"\n{preset}: max |ours - keras-cv| = {np.abs(got - expected).max():.3g} "
          f"(output max {np.abs(expected).max():.3g})")
    return np.abs(got - expected).max(), np.abs(before - expected).max(), np.abs(expected).max(), \
        reference_params, ours.count_params()


def test_sd1_text_encoder_loads_keras_cv_weights(tmp_path):
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoder

    diff, before, scale, reference_params, ours_params = text_encoder_parity(TextEncoder, "clip_vit_l14", tmp_path)
    assert ours_params == reference_params == 123_060_480
    assert before > 1e-2 * scale, "the check must be able to fail: unloaded weights differ"
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"


@pytest.mark.slow
def test_sd2_text_encoder_loads_keras_cv_weights(tmp_path):
    from keras_cv.src.models.stable_diffusion.text_encoder import TextEncoderV2

    diff, before, scale, reference_params, ours_params = text_encoder_parity(TextEncoderV2, "open_clip_vit_h14",
                                                                            tmp_path)
    assert ours_params == reference_params
    assert before > 1e-2 * scale
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"


def test_published_text_encoder_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(W, "DOWNLOAD_TIMEOUT", 2)
    spec = W.WEIGHT_FILES["text_encoder_sd1"]
    monkeypatch.setitem(W.WEIGHT_FILES, "text_encoder_sd1",
                        W.WeightFile(spec.filename, "http://127.0.0.1:9/kcv_encoder.h5", spec.sha256))
    with pytest.raises(CheckpointError) as info:
        build_text_encoder("clip_vit_l14", pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "kcv_encoder.h5" in message and str(tmp_path) in message
    assert spec.sha256 in message
