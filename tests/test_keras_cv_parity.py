"""keras-cv's weight files load into our models unchanged, and the weight-file plumbing.

Parity (slow): keras-cv's DiffusionModel / DiffusionModelV2 with random weights are
written as a legacy Keras-2 .h5 file (the layout of keras-cv's published files), loaded
into `build_unet(get_preset("sd1"/"sd2"))` with `load_weights`, and both models must
give the same output on the same inputs. Full-size (~860M parameters) but at 64 px
(8x8 latents): weights do not depend on the image size.

Weight files (fast): download, cache, hash check and one-line offline errors, against
a local HTTP server and unreachable addresses (no internet needed).
"""

import functools
import gc
import hashlib
import http.server
import threading
import time

import h5py
import keras
import numpy as np
import pytest
from keras import ops
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

from Models.diffusion import weights as W
from Models.diffusion.layers import PaddedConv2D
from Models.diffusion.presets import get_preset
from Models.diffusion.unet import build_unet, timestep_embedding
from Models.errors import CheckpointError, ModelSettingsError
from conftest import run_in_fresh_process

SIZE, CONTEXT_LENGTH = 64, 16
# At 64 px the middle block's attention sees one token (1x1): softmax over it is 1, harmlessly.
softmax_over_one = pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")


def save_legacy_h5(model, path):
    """Writes `model`'s weights as a legacy (Keras-2 layout) .h5 file, like keras-cv's published ones."""
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def unet_parity(reference_name, preset_name, folder):
    """(max |ours - keras-cv|, max |ours before loading - keras-cv|, output scale, parameter counts,
    how many 3x3 convolutions ran as Conv2D and as one matrix product), against keras-cv's
    `reference_name` (DiffusionModel or DiffusionModelV2). Runs in a process of its own
    (`run_in_fresh_process`): two full-size UNets, whose memory then goes back to the system."""
    from keras_cv.src.models.stable_diffusion import diffusion_model

    reference_class = getattr(diffusion_model, reference_name)
    preset = get_preset(preset_name)
    rng = np.random.default_rng(0)
    inputs = [
        ops.convert_to_tensor(rng.standard_normal((2, SIZE // 8, SIZE // 8, 4)), "float32"),
        timestep_embedding(ops.convert_to_tensor([10, 700]), 320),
        ops.convert_to_tensor(rng.standard_normal((2, CONTEXT_LENGTH, preset.context_dim)), "float32"),
    ]
    keras.utils.set_random_seed(0)
    reference = reference_class(SIZE, SIZE, CONTEXT_LENGTH, download_weights=False)
    expected = ops.convert_to_numpy(reference(inputs))
    reference_params = reference.count_params()
    path = folder / f"{preset_name}.h5"
    save_legacy_h5(reference, path)
    del reference
    gc.collect()

    keras.utils.set_random_seed(1)
    ours = build_unet(preset, SIZE, context_length=CONTEXT_LENGTH)
    before = ops.convert_to_numpy(ours(inputs))
    ours.load_weights(path)
    got = ops.convert_to_numpy(ours(inputs))
    ours_params = ours.count_params()
    convs = [layer for layer in ours._flatten_layers() if isinstance(layer, PaddedConv2D) and layer.kernel_size == 3]
    paths = (sum(not conv.as_matmul for conv in convs), sum(conv.as_matmul for conv in convs))
    del ours
    path.unlink()
    gc.collect()
    print(f"\n{preset_name}: max |ours - keras-cv| = {np.abs(got - expected).max():.3g} "
          f"(output max {np.abs(expected).max():.3g})")
    return (np.abs(got - expected).max(), np.abs(before - expected).max(),
            np.abs(expected).max(), reference_params, ours_params, paths)


@pytest.fixture(scope="module")
def sd1_parity(tmp_path_factory):
    return run_in_fresh_process(unet_parity, "DiffusionModel", "sd1", tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sd2_parity(tmp_path_factory):
    return run_in_fresh_process(unet_parity, "DiffusionModelV2", "sd2", tmp_path_factory.mktemp("sd2"))


@pytest.mark.slow
@softmax_over_one
def test_sd1_unet_loads_keras_cv_diffusion_model_weights(sd1_parity):
    diff, diff_before, scale, reference_params, ours_params, (as_conv2d, as_matmul) = sd1_parity
    assert ours_params == reference_params == 859_520_964
    assert as_conv2d > 0 and as_matmul > 0, "both convolution paths of PaddedConv2D are compared"
    assert diff_before > 1e-2 * scale, "the check must be able to fail: unloaded weights differ"
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"


@pytest.mark.slow
@softmax_over_one
def test_sd2_unet_loads_keras_cv_diffusion_model_v2_weights(sd2_parity):
    diff, diff_before, scale, reference_params, ours_params, _ = sd2_parity
    assert ours_params == reference_params == 865_910_724
    assert diff_before > 1e-2 * scale
    assert diff < 1e-4, f"max abs difference {diff} (output scale {scale})"


# ---------------------------------------------------------------- weight files (fast)


def _small_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.layers.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5)(inputs)), name="small")


@pytest.fixture
def small_weight_file(tmp_path, monkeypatch):
    """A real legacy .h5 file registered under the key 'test' with its true SHA-256."""
    source = tmp_path / "source" / "small.h5"
    source.parent.mkdir()
    model = _small_model(0)
    save_legacy_h5(model, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setitem(W.WEIGHT_FILES, "test", W.WeightFile("small.h5", "http://unused.invalid/small.h5", digest))
    return source, model


@pytest.fixture
def http_server(small_weight_file):
    """Serves the folder holding small.h5 on localhost."""
    source, _ = small_weight_file
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(source.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_published_files_are_keras_cvs():
    assert set(W.WEIGHT_FILES) == {"unet_sd1", "unet_sd2", "encoder", "decoder",
                                   "text_encoder_sd1", "text_encoder_sd2", "clip_vocabulary"}
    for key, spec in W.WEIGHT_FILES.items():
        if key == "clip_vocabulary":  # CLIP's own repository, as keras-cv's tokenizer fetches it
            assert spec.url.startswith("https://github.com/openai/CLIP/") and spec.filename in spec.url
        else:
            assert spec.url.startswith("https://huggingface.co/") and spec.url.endswith("/" + spec.filename)
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
    assert W.unet_weights_key(get_preset("sd2")) == "unet_sd2"
    with pytest.raises(ModelSettingsError, match="no published weights"):
        W.unet_weights_key(get_preset("tiny"))


def test_weights_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_WEIGHTS_DIR", str(tmp_path))
    assert W.weights_dir() == tmp_path
    monkeypatch.delenv("SDDG_WEIGHTS_DIR")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert W.weights_dir() == tmp_path / "kh" / "datasets"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/kcv_diffusion_model.h5",        # connection refused
])
def test_offline_error_is_one_fast_line(tmp_path, url):
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        W.fetch_weights("unet_sd1", folder=tmp_path / "weights", url=url, timeout=2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "\n" not in message
    spec = W.WEIGHT_FILES["unet_sd1"]
    assert f"place {spec.filename} (sha256 {spec.sha256}) in {tmp_path / 'weights'} (from {url})" in message
    assert elapsed < 10
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())


def test_download_checks_hash_and_caches(tmp_path, http_server, small_weight_file):
    _, model = small_weight_file
    folder = tmp_path / "cache"
    path = W.fetch_weights("test", folder=folder, url=f"{http_server}/small.h5")
    assert path == folder / "small.h5"
    target = _small_model(1)
    W.load_pretrained_weights(target, "test", folder=folder)  # cached now: no URL needed
    for a, b in zip(target.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_download_with_wrong_hash_leaves_nothing(tmp_path, http_server, small_weight_file, monkeypatch):
    monkeypatch.setitem(W.WEIGHT_FILES, "test", W.WeightFile("small.h5", "unused", "0" * 64))
    folder = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="downloaded small.h5 has sha256 .* expected 0{64}"):
        W.fetch_weights("test", folder=folder, url=f"{http_server}/small.h5")
    assert not list(folder.glob("*"))


def test_corrupt_cached_file_is_reported(tmp_path, small_weight_file):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "small.h5").write_bytes(b"not the weights")
    with pytest.raises(CheckpointError, match="small.h5 has sha256 .*expected"):
        W.fetch_weights("test", folder=folder)


def test_file_for_another_model_is_one_line_error(tmp_path, small_weight_file):
    source, _ = small_weight_file
    keras.utils.set_random_seed(0)
    inputs = keras.layers.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs), name="other")
    with pytest.raises(CheckpointError, match="small.h5 does not fit model 'other'"):
        W.load_pretrained_weights(other, "test", folder=source.parent)


def test_unknown_weight_file():
    with pytest.raises(ModelSettingsError, match="unknown weight file 'vae'"):
        W.fetch_weights("vae")
