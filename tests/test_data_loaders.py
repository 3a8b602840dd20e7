"""Real-data loaders (RetinaMNIST file, digits, CIFAR tarballs), downloads, errors, images."""

import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Data import loaders
from Data.images import RESIZE_METHOD, resize_images, save_image_grid, to_uint8, to_unit_float
from Data.loaders import fetch_file, load_dataset, md5_of
from Data.errors import DataError, DatasetNotFoundError

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ real data ----

def test_retinamnist_real_file(retinamnist_dir):
    splits = load_dataset("retinamnist", data_dir=retinamnist_dir)  # content digest checked
    assert splits.verification.status == "digest"
    assert splits.spec.name == "retinamnist"
    for split, n in (("train", 1080), ("val", 120), ("test", 400)):
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
        assert x.shape == (n, 28, 28, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
    assert splits.class_counts("train") == [486, 128, 206, 194, 66]
    assert splits.class_counts("val") == [54, 12, 28, 20, 6]
    assert splits.class_counts("test") == [174, 46, 92, 68, 20]
    assert 0 < splits.x_test.mean() < 255 and splits.x_test.std() > 10  # real pixels, not zeros


def _digits_split():
    return load_dataset("digits")


def test_digits_split_sizes_channels_and_values():
    splits = _digits_split()
    assert splits.sizes() == {"train": 1077, "val": 360, "test": 360}
    for x in (splits.x_train, splits.x_val, splits.x_test):
        assert x.shape[1:] == (8, 8, 3) and x.dtype == np.uint8
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()
    full = np.concatenate([splits.x_train, splits.x_val, splits.x_test])
    assert full.min() == 0 and full.max() == 255  # 0..16 rescaled to the full range


def test_digits_split_is_a_stratified_partition():
    from sklearn.datasets import load_digits

    splits = _digits_split()
    digits = load_digits()
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    # The three splits together are exactly the 1,797 images (a partition, as multisets).
    whole = Counter((img.tobytes(), int(t)) for img, t in zip(expected, digits.target))
    parts = Counter()
    for x, y in ((splits.x_train, splits.y_train), (splits.x_val, splits.y_val),
                 (splits.x_test, splits.y_test)):
        parts.update((img[..., 0].tobytes(), int(t)) for img, t in zip(x, y))
    assert parts == whole
    # Stratified: every class's share matches its share of the whole within one image.
    totals = np.bincount(digits.target)
    for split, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.array(splits.class_counts(split))
        assert np.all(np.abs(counts - totals * fraction) <= 1.0), (split, counts)


def test_digits_split_is_fixed_whatever_the_global_seed():
    np.random.seed(1)
    a = _digits_split()
    np.random.seed(2)
    b = _digits_split()
    for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


# --------------------------------------------------------- CIFAR tarball ----

def _pickle_bytes(obj):
    return pickle.dumps(obj, protocol=2)


def _fake_cifar(path, name, per_batch=20, n_test=10):
    """A small tar.gz in the official layout; pixel values encode (image index, channel)."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    def batch(start, n):
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        images[:, :, 0, 0] = (np.arange(start, start + n) % 256)[:, None]  # the index, per channel
        images[:, 1, 0, 1] = 7  # green channel marker
        labels = [int(v) for v in rng.integers(0, classes, n)]
        return {b"data": images.reshape(n, 3072), label_key: labels}, images, labels

    if name == "cifar10":
        folder, train_names, test_name = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
    else:
        folder, train_names, test_name = "cifar-100-python", ["train"], "test"
        per_batch *= 5
    train_images, train_labels, entries = [], [], {}
    for i, member in enumerate(train_names):
        content, images, labels = batch(i * per_batch, per_batch)
        entries[member] = content
        train_images.append(images)
        train_labels += labels
    content, test_images, test_labels = batch(1000, n_test)
    entries[test_name] = content
    entries["batches.meta" if name == "cifar10" else "meta"] = {b"note": b"fake"}
    with tarfile.open(path, "w:gz") as archive:
        for member, content in entries.items():
            data = _pickle_bytes(content)
            info = tarfile.TarInfo(f"{folder}/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return np.concatenate(train_images), np.array(train_labels), test_images, np.array(test_labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_tarball_is_parsed_and_split(tmp_path, name):
    file = loaders.CIFAR_FILES[name]["file"]
    x_full, y_full, x_test, y_test = _fake_cifar(tmp_path / file, name)
    splits = load_dataset(name, data_dir=tmp_path, verify=False)
    n = len(y_full)  # 100 images: train = first 80, val = last 20 (40,000 / 10,000 for the real one)
    assert splits.sizes() == {"train": n * 4 // 5, "val": n // 5, "test": len(y_test)}
    hwc = x_full.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(splits.x_train, hwc[: n * 4 // 5])
    np.testing.assert_array_equal(splits.x_val, hwc[n * 4 // 5:])
    np.testing.assert_array_equal(splits.x_test, x_test.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(splits.y_train, y_full[: n * 4 // 5])
    np.testing.assert_array_equal(splits.y_val, y_full[n * 4 // 5:])
    np.testing.assert_array_equal(splits.y_test, y_test)
    assert splits.x_train.dtype == np.uint8 and splits.y_train.dtype == np.int64
    assert (splits.x_train[:, 0, 1, 1] == 7).all()  # channel order: green stays green
    # train and val are disjoint: the first-pixel index differs everywhere
    assert not set(splits.x_train[:, 0, 0, 0]) & set(splits.x_val[:, 0, 0, 0])


def test_a_hand_made_cifar_is_refused_by_its_structure(tmp_path):
    # A present file is judged by what it decodes to: a small hand-made archive has the wrong split sizes.
    _fake_cifar(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path)  # verify defaults to on
    message = str(e.value)
    assert "cifar-10-python.tar.gz" in message and "split sizes" in message and "'train': 50000" in message
    assert "\n" not in message


def test_truncated_tarball_is_one_line(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    _fake_cifar(path, "cifar100")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", data_dir=tmp_path, verify=False)
    assert str(path) in str(e.value) and "not a readable cifar100 archive" in str(e.value)
    assert "\n" not in str(e.value)


def test_fetch_file_accepts_the_right_md5(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"hello")
    assert fetch_file("file.bin", "http://unused/", hashlib.md5(b"hello").hexdigest(), tmp_path) == path
    with pytest.raises(DataError, match="has MD5 5d41402abc4b2a76b9719d911017c592, expected 0+"):
        fetch_file("file.bin", "http://unused/", "0" * 32, tmp_path)


# ------------------------------------------------------------ MedMNIST ----

def test_corrupt_npz_is_one_line(tmp_path):
    (tmp_path / "bloodmnist.npz").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(DataError) as e:
        load_dataset("bloodmnist", data_dir=tmp_path)
    assert "bloodmnist.npz is not a readable MedMNIST npz" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        load_dataset("bloodmnist", data_dir=tmp_path, verify=False)
    assert "bloodmnist.npz is not a readable MedMNIST npz" in str(e.value) and "\n" not in str(e.value)


def test_truncated_real_npz_is_one_line(tmp_path, retinamnist_dir):
    real = (retinamnist_dir / "retinamnist.npz").read_bytes()
    (tmp_path / "retinamnist.npz").write_bytes(real[: len(real) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("retinamnist", data_dir=tmp_path, verify=False)
    assert "retinamnist.npz" in str(e.value) and "\n" not in str(e.value)


def test_npz_with_wrong_keys_or_labels(tmp_path):
    spec_x = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "breastmnist.npz", train_images=spec_x, train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match="not a MedMNIST file: val_images, val_labels, test_images, test_labels missing"):
        load_dataset("breastmnist", data_dir=tmp_path, verify=False)
    arrays = {f"{s}_images": spec_x for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.full((4, 1), 5, np.uint8) for s in ("train", "val", "test")}
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(DataError, match="labels 5..5 do not fit breastmnist's 2 classes"):
        load_dataset("breastmnist", data_dir=tmp_path, verify=False)


def test_grey_medmnist_becomes_three_channels(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)
    splits = load_dataset("pneumoniamnist", data_dir=tmp_path, verify=False)
    assert splits.x_train.shape == (6, 28, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(splits.x_train[..., c], arrays["train_images"])
    np.testing.assert_array_equal(splits.y_test, arrays["test_labels"][:, 0])


# ----------------------------------------------------------- downloads ----

def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_missing_file_offline_is_fast_and_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_DATA_MIRROR", f"http://127.0.0.1:{_closed_port()}/medmnist")
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        load_dataset("bloodmnist", data_dir=tmp_path / "data")
    assert time.monotonic() - start < 15
    message = str(e.value)
    assert "\n" not in message
    assert "bloodmnist.npz" in message and "7053d0359d879ad8a5505303e11de1dc" in message
    assert str(tmp_path / "data") in message and "/medmnist/bloodmnist.npz" in message
    assert not list((tmp_path / "data").iterdir())  # nothing half-written


def test_stalled_server_times_out(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers: the socket timeout ends it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("SDDG_DATA_MIRROR", f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(DatasetNotFoundError, match="breastmnist.npz .*downloading it failed"):
            load_dataset("breastmnist", data_dir=tmp_path)
        assert time.monotonic() - start < loaders.DOWNLOAD_TIMEOUT_S + 5
    finally:
        server.close()
    assert not list(tmp_path.iterdir())


def test_default_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDDG_DATA_MIRROR", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(DatasetNotFoundError, match=f"is not in {tmp_path / 'cache'}"):
        load_dataset("octmnist")


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over tmp_path/'served' (a stand-in for the official host)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_md5_then_renames(tmp_path, monkeypatch, file_server, retinamnist_dir):
    served, url = file_server
    (served / "retinamnist.npz").write_bytes((retinamnist_dir / "retinamnist.npz").read_bytes())
    monkeypatch.setenv("SDDG_DATA_MIRROR", url)
    data_dir = tmp_path / "data"
    splits = load_dataset("retinamnist", data_dir=data_dir)
    assert splits.class_counts("test") == [174, 46, 92, 68, 20]
    assert [p.name for p in data_dir.iterdir()] == ["retinamnist.npz"]  # no temporary left
    assert md5_of(data_dir / "retinamnist.npz") == "bd4c0672f1bba3e3a89f0e4e876791e4"


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch, file_server):
    served, url = file_server
    (served / "dermamnist.npz").write_bytes(b"not the real file")
    monkeypatch.setenv("SDDG_DATA_MIRROR", url)
    with pytest.raises(DatasetNotFoundError, match="download of dermamnist.npz .* has MD5 .* expected "
                                                   "0744692d530f8e62ec473284d019b0c7"):
        load_dataset("dermamnist", data_dir=tmp_path / "data")
    assert not list((tmp_path / "data").iterdir())


def test_command_line_error_is_one_line_exit_2(tmp_path):
    code = ("from Utils.cli import run_cli; from Data.loaders import load_dataset; "
            "run_cli(lambda argv: load_dataset('pathmnist', data_dir=%r))" % str(tmp_path))
    env = dict(os.environ, SDDG_DATA_MIRROR=f"http://127.0.0.1:{_closed_port()}")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: pathmnist.npz (MD5 ")


# -------------------------------------------------------------- images ----

def test_resize_is_antialiased():
    # A 1-pixel checkerboard averages to mid-grey when downsized with a low-pass
    # filter; point/bilinear sampling without antialiasing keeps extreme values.
    board = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    images = np.repeat(board[None, ..., None], 3, axis=-1)
    small = resize_images(images, 32)
    assert small.shape == (1, 32, 32, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - 127.5) < 3 and small.std() < 4
    assert "antialiased" in RESIZE_METHOD


def test_resize_shapes_and_values():
    grey = np.full((2, 8, 8, 1), 100, np.uint8)
    up = resize_images(grey, 128)
    assert up.shape == (2, 128, 128, 1) and (up == 100).all()
    same = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = resize_images(same, 4)
    np.testing.assert_array_equal(out, same)
    assert out is not same
    with pytest.raises(ValueError):
        resize_images(same.astype(np.float32), 8)


def test_pixel_scaling_round_trips():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(to_uint8(to_unit_float(x)), x)
    np.testing.assert_array_equal(to_uint8(to_unit_float(x) * 2 - 1, value_range=(-1, 1)), x)


def test_save_image_grid(tmp_path):
    splits = _digits_split()
    path = tmp_path / "grids" / "digits.png"
    labels = splits.y_test.copy()
    labels[labels == 3] = 4  # class 3 has no image: an empty, labelled row
    save_image_grid(splits.x_test, labels, splits.spec.label_names, path, per_class=6, title="test")
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    # 8 px images are upscaled 8x to 64 px cells: 10 rows of 64 (+2 gap), 6 columns.
    assert height == 24 + 10 * 66 + 2
    assert width > 6 * 66
    assert sorted(p.name for p in path.parent.iterdir()) == ["digits.png"]
    row3 = pixels[24 + 2 + 3 * 66: 24 + 2 + 3 * 66 + 64, -6 * 66:]
    row4 = pixels[24 + 2 + 4 * 66: 24 + 2 + 4 * 66 + 64, -6 * 66:]
    assert row4.std() > 50  # digit images
    assert (row3 > 200).mean() > 0.95  # the empty row is (almost) all white


def test_data_dir_flag():
    from Data.loaders import add_data_dir_argument
    from Utils.cli import ArgumentParser

    parser = ArgumentParser()
    add_data_dir_argument(parser)
    assert parser.parse_args([]).data_dir is None
    assert parser.parse_args(["--data_dir", "/x"]).data_dir == "/x"
