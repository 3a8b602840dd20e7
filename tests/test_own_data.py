"""Your own data as a dataset (folder:PATH, tfds:NAME), mnist / fashion_mnist, content checks.

Real files throughout: image folders made here with Pillow, a TFDS builder
prepared here with the real tfds API, the real RetinaMNIST npz from
../shared/data (read in place) and Debian's Fashion-MNIST files.
"""

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Data.checksums import content_digest, split_digests
from Data.errors import DataError, DatasetNotFoundError
from Data.loaders import load_dataset
from Data.own_datasets import FOLDER_SPLIT_SEED
from Data.registry import get_spec
from Utils.paths import dataset_folder

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FORMATS = (".png", ".jpg", ".bmp", ".gif", ".webp")


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """The data cache in tmp_path: decoded folder: / tfds: arrays are kept there."""
    monkeypatch.setenv("SDDG_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _image(label, size, seed, mode="RGB"):
    """A class-coloured image with noise: the class is visible at any size."""
    rng = np.random.default_rng(seed)
    base = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230]][label % 3], np.float64)
    pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    return image.convert("L") if mode == "L" else image


def _make_folder(root, classes, counts, splits=("train",), sizes=((16, 16),), mode="RGB", formats=(".png",)):
    """root/<split>/<class>/img_<i><ext> (or root/<class>/ when splits is None)."""
    n = 0
    for split in splits or (None,):
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split][label] if isinstance(counts, dict) else counts[label]):
                ext = formats[n % len(formats)]
                _image(label, sizes[n % len(sizes)], n, mode).save(folder / f"img_{i}{ext}")
                n += 1
    return root


# ------------------------------------------------------------- folder: ----

def test_folder_class_order_is_keras_and_formats_sizes_are_brought_to_one(tmp_path):
    import keras

    root = _make_folder(tmp_path / "pets", ["bee", "Cat", "ant"], [4, 4, 4], sizes=((16, 16), (23, 17), (40, 40)),
                        formats=FORMATS)
    keras_names = keras.utils.image_dataset_from_directory(root / "train", image_size=(8, 8), verbose=False).class_names
    with pytest.raises(DataError, match=r"not all one square size .*give --image_size"):
        get_spec(f"folder:{root}")
    splits = load_dataset(f"folder:{root}", image_size=12)
    assert splits.spec.label_names == tuple(keras_names) == ("Cat", "ant", "bee")
    assert splits.spec.channels == 3 and splits.spec.image_size == 12
    assert splits.x_train.shape[1:] == (12, 12, 3) and splits.x_train.dtype == np.uint8
    assert splits.verification.status == "own" and str(root) in splits.verification.detail
    # The class colour survives decoding and the resize: "Cat" (label 0) was made green (class 1's colour).
    greenish = splits.x_train[splits.y_train == 0].mean(axis=(0, 1, 2))
    assert greenish[1] > greenish[0] + 80 and greenish[1] > greenish[2] + 80


def test_folder_with_one_split_gets_a_fixed_stratified_split(tmp_path):
    root = _make_folder(tmp_path / "flat", ["a", "b", "c"], [10, 10, 5], splits=None, sizes=((10, 10),))
    one = load_dataset(f"folder:{root}")
    assert one.spec.image_size == 10  # native: every image is 10x10
    # Per class: round(20 %) (at least 1) to test, as many to val, the rest to train.
    assert one.class_counts("test") == [2, 2, 1] and one.class_counts("val") == [2, 2, 1]
    assert one.class_counts("train") == [6, 6, 3]
    everything = np.concatenate([one.x_train, one.x_val, one.x_test]).reshape(25, -1)
    assert len({row.tobytes() for row in everything}) == 25  # a partition: no image twice
    again = load_dataset(f"folder:{root}")
    assert np.array_equal(again.x_test, one.x_test)  # fixed seed, whatever the run
    assert "seed" in one.verification.detail and str(FOLDER_SPLIT_SEED) in one.verification.detail


def test_folder_with_its_own_splits_keeps_them_and_detects_grey(tmp_path):
    counts = {"train": [5, 3], "validation": [2, 1], "test": [2, 2]}
    root = _make_folder(tmp_path / "xray", ["normal", "pneumonia"], counts, splits=("train", "validation", "test"),
                        sizes=((9, 9),), mode="L")
    splits = load_dataset(f"folder:{root}")
    assert splits.sizes() == {"train": 8, "val": 3, "test": 4}
    assert splits.class_counts("val") == [2, 1]
    assert splits.spec.channels == 1 and splits.x_train.shape[1:] == (9, 9, 3)
    assert (splits.x_train[..., 0] == splits.x_train[..., 2]).all()


def test_folder_problems_are_one_line_naming_the_file(tmp_path):
    root = _make_folder(tmp_path / "bad", ["a", "b"], [2, 2])
    broken = root / "train" / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{root}")
    assert str(broken) in str(e.value) and "\n" not in str(e.value)
    broken.unlink()
    (root / "train" / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="notes.txt .not an image file"):
        get_spec(f"folder:{root}")
    (root / "train" / "a" / "notes.txt").unlink()
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"train/c \(empty class"):
        get_spec(f"folder:{root}")
    (root / "train" / "c").rmdir()
    (root / "test" / "z").mkdir(parents=True)
    with pytest.raises(DataError, match="class 'z' is not in the train folder"):
        get_spec(f"folder:{root}")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        get_spec(f"folder:{tmp_path / 'nowhere'}")


def test_decoded_folder_is_cached_under_its_safe_name_and_refreshed_on_change(tmp_path, data_cache):
    root = _make_folder(tmp_path / "cached", ["a", "b"], [3, 3], sizes=((10, 10),))
    first = load_dataset(f"folder:{root}")
    cached = list((data_cache / dataset_folder(f"folder:{root}")).glob("splits_10px_*.npz"))
    assert len(cached) == 1
    again = load_dataset(f"folder:{root}")
    assert np.array_equal(again.x_train, first.x_train) and again.verification == first.verification
    image = root / "train" / "a" / "img_0.png"
    _image(2, (10, 10), 99).save(image)  # new content: new size or time, a new cache entry
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load_dataset(f"folder:{root}")
    every = lambda splits: np.concatenate([splits.x_train, splits.x_val, splits.x_test])  # noqa: E731
    assert not np.array_equal(every(changed), every(first))
    assert len(list(cached[0].parent.glob("splits_10px_*.npz"))) == 2


def test_folder_names_are_safe_and_distinct(tmp_path):
    a, b = tmp_path / "one" / "my data", tmp_path / "two" / "my data"
    name_a, name_b = dataset_folder(f"folder:{a}"), dataset_folder(f"folder:{b}")
    assert name_a.startswith("folder-my_data-") and name_a != name_b
    assert "/" not in name_a and ":" not in name_a and " " not in name_a
    assert dataset_folder(f"folder:{a}/") == name_a  # one folder, one name
    assert dataset_folder("tfds:cifar10/plain:1.0.0") == "tfds-cifar10-plain-1.0.0"
    assert dataset_folder("retinamnist") == "retinamnist"


def test_image_size_is_for_own_data_only():
    assert get_spec("digits", image_size=8).image_size == 8
    with pytest.raises(DataError, match="--image_size applies to folder: and tfds: datasets; digits is 8x8"):
        get_spec("digits", image_size=32)


# ---------------------------------------------------------------- tfds ----

_BUILDER = None


def _tiny_builder_class():
    """A real TFDS builder (defined once: TFDS registers builder classes by name)."""
    global _BUILDER
    if _BUILDER is None:
        import tensorflow_datasets as tfds

        from etils import epath

        class SddgTinyShapes(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            # TFDS looks for a builder's metadata files beside its package; a test module is no package.
            pkg_dir_path = epath.Path(__file__).parent

            def _info(self):
                return self.dataset_info_from_configs(
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(12, 12, 1)),
                        "label": tfds.features.ClassLabel(names=["circle", "square", "triangle"])}),
                    supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(30, 0), "test": self._generate_examples(9, 100)}

            def _generate_examples(self, n, offset):
                for i in range(n):
                    image = np.full((12, 12, 1), 40 + 80 * (i % 3), np.uint8)
                    image[i % 12, :, 0] = 255
                    yield i, {"image": image, "label": i % 3}

        class SddgTinyPhotos(tfds.core.GeneratorBasedBuilder):
            """RGB photos of varying sizes, a train split only, labels under other feature names."""

            VERSION = tfds.core.Version("2.0.0")
            pkg_dir_path = epath.Path(__file__).parent

            def _info(self):
                return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                    "photo": tfds.features.Image(shape=(None, None, 3)),
                    "kind": tfds.features.ClassLabel(names=["day", "night"])}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(10):
                    side = 6 + i
                    yield i, {"photo": np.full((side, side + 1, 3), 200 if i % 2 == 0 else 20, np.uint8),
                              "kind": i % 2}

        _BUILDER = (SddgTinyShapes, SddgTinyPhotos)
    return _BUILDER


def test_tfds_builder_prepared_here_is_read_back_by_name(tmp_path):
    _tiny_builder_class()[0](data_dir=str(tmp_path)).download_and_prepare()
    splits = load_dataset("tfds:sddg_tiny_shapes", data_dir=tmp_path)
    assert splits.spec.label_names == ("circle", "square", "triangle")
    assert (splits.spec.image_size, splits.spec.channels, splits.spec.source) == (12, 1, "tfds")
    # train 30 (10 per class) → val drawn from it: 2 per class; test is the builder's own.
    assert splits.sizes() == {"train": 24, "val": 6, "test": 9}
    assert splits.x_test.shape == (9, 12, 12, 3)
    grey_of_label = {int(y): int(x[11, 0, 0]) for x, y in zip(splits.x_test, splits.y_test)}
    assert grey_of_label == {0: 40, 1: 120, 2: 200}
    assert dataset_folder(splits.spec.name) == "tfds-sddg_tiny_shapes"
    resized = load_dataset("tfds:sddg_tiny_shapes:1.0.0", data_dir=tmp_path, image_size=20)
    assert resized.x_train.shape[1:] == (20, 20, 3)


def test_tfds_varying_sizes_need_image_size_and_one_split_is_split(tmp_path, monkeypatch):
    _tiny_builder_class()[1](data_dir=str(tmp_path)).download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # found through TFDS's own variable
    with pytest.raises(DataError, match="has images of varying sizes: give --image_size"):
        get_spec("tfds:sddg_tiny_photos")
    splits = load_dataset("tfds:sddg_tiny_photos", image_size=8)
    assert splits.spec.label_names == ("day", "night") and splits.spec.channels == 3
    assert splits.sizes() == {"train": 6, "val": 2, "test": 2}  # 5 per class: 1 to val, 1 to test
    assert splits.x_train.shape[1:] == (8, 8, 3)
    assert {int(y): int(x.mean()) for x, y in zip(splits.x_test, splits.y_test)} == {0: 200, 1: 20}


def test_tfds_missing_is_one_fast_line_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("tfds:beans", data_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert "\n" not in message and "'beans' is not prepared in" in message and str(tmp_path) in message
    assert "tfds build beans" in message
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        get_spec("tfds:beans")
    with pytest.raises(DataError, match="a TFDS name is NAME"):
        get_spec("tfds:../etc")


# ------------------------------------------------- idx: mnist, fashion ----

def test_fashion_mnist_from_debians_package_matches_the_content_digest():
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        message = f"{DEBIAN_FASHION} is missing (apt-get install dataset-fashion-mnist; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    splits = load_dataset("fashion_mnist", data_dir="/nonexistent-cache")
    assert splits.verification.status == "digest"
    assert splits.sizes() == {"train": 48000, "val": 12000, "test": 10000}
    assert splits.x_train.shape[1:] == (28, 28, 3) and splits.spec.label_names[0] == "T-shirt/top"
    assert splits.class_counts("test") == [1000] * 10
    # The registry's digest is of the decoded test split: recompute it independently of the loader.
    import gzip

    raw = gzip.open(DEBIAN_FASHION / "t10k-images-idx3-ubyte.gz").read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(10000, 28, 28)
    assert content_digest(images) == get_spec("fashion_mnist").content_digests["test"]["images"]


def test_idx_files_decompressed_in_data_dir_and_a_changed_one(tmp_path):
    if not (DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} is missing")
    import gzip

    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(gzip.open(DEBIAN_FASHION / f"{name}.gz").read())
    assert load_dataset("fashion_mnist", data_dir=tmp_path).verification.status == "digest"
    labels = bytearray((folder / "t10k-labels-idx1-ubyte").read_bytes())
    labels[8] = (labels[8] + 1) % 10
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(DataError, match="not its official content .test labels differ"):
        load_dataset("fashion_mnist", data_dir=tmp_path)
    accepted = load_dataset("fashion_mnist", data_dir=tmp_path, accept_unverified=True)
    assert accepted.verification.status == "unverified" and "--accept_unverified_data" in accepted.verification.detail
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels[:-100]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("fashion_mnist", data_dir=tmp_path, accept_unverified=True)


def test_mnist_missing_offline_is_one_line_naming_files_and_folder(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SDDG_DATA_MIRROR", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    assert time.monotonic() - start < 15
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "mnist") in message
    assert "train-images-idx3-ubyte.gz" in message and "yann.lecun.com" in message


# ------------------------------------------- MedMNIST: content, not bytes ----

def test_repackaged_medmnist_is_accepted_changed_one_refused(tmp_path, retinamnist_dir):
    with np.load(retinamnist_dir / "retinamnist.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    # Faithful repackaging: labels (N,) instead of (N, 1), int64, compressed. Other bytes, same content.
    np.savez_compressed(tmp_path / "retinamnist.npz",
                        **{k: (v.reshape(-1).astype(np.int64) if k.endswith("labels") else v) for k, v in arrays.items()})
    splits = load_dataset("retinamnist", data_dir=tmp_path)
    assert splits.verification.status == "digest" and splits.sizes() == {"train": 1080, "val": 120, "test": 400}
    changed = dict(arrays)
    changed["test_images"] = arrays["test_images"].copy()
    changed["test_images"][0, 0, 0, 0] ^= 1
    np.savez(tmp_path / "retinamnist.npz", **changed)
    with pytest.raises(DataError) as e:
        load_dataset("retinamnist", data_dir=tmp_path)
    assert "not its official content (test images differ" in str(e.value) and "--accept_unverified_data" in str(e.value)
    accepted = load_dataset("retinamnist", data_dir=tmp_path, accept_unverified=True)
    assert accepted.verification.status == "unverified"
    short = dict(arrays, test_images=arrays["test_images"][:-1], test_labels=arrays["test_labels"][:-1])
    np.savez(tmp_path / "retinamnist.npz", **short)
    with pytest.raises(DataError, match="split sizes"):
        load_dataset("retinamnist", data_dir=tmp_path, accept_unverified=True)  # structure: never accepted


def test_recorded_digests_are_the_real_files(retinamnist_dir):
    with np.load(retinamnist_dir / "retinamnist.npz") as npz:
        got = split_digests({s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in ("train", "val", "test")})
    assert got == get_spec("retinamnist").content_digests


# -------------------------------------------------------- medmnist INFO ----

def test_medmnist_copy_matches_the_medmnist_package():
    from Data.medmnist_info import MEDMNIST, MEDMNIST_COPY, MEDMNIST_VERSION, entry_from_info, package_info

    found = package_info()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the medmnist package is missing (.ci/run installs it)")
        pytest.skip("the medmnist package is not installed")
    info, version = found
    assert version == MEDMNIST_VERSION
    for name, copy in MEDMNIST_COPY.items():
        assert entry_from_info(name, info[name]) == copy, name
    assert MEDMNIST == MEDMNIST_COPY  # used where installed: the same facts


# ----------------------------------------------- through the scripts ----

def _cas(root, key, run, exp=0):
    return json.loads((root / "CAS Results" / f"test_accuracies_exp{exp}.json").read_text())[key][run]


def test_classifier_training_on_an_image_folder(run_script, tmp_path):
    counts = {"train": [6, 6, 6], "val": [2, 2, 2], "test": [3, 3, 3]}
    data = _make_folder(tmp_path / "data" / "shapes", ["red", "green", "blue"], counts,
                        splits=("train", "val", "test"), sizes=((14, 14), (20, 18)), formats=(".png", ".jpg"))
    out = tmp_path / "out"
    out.mkdir()
    bad = run_script("classifier_training.py", "--dataset", f"folder:{data}", "--synthetic", "False", cwd=out)
    assert bad.returncode == 2 and "give --image_size" in bad.stderr and not list(out.iterdir())
    r = run_script("classifier_training.py", "--dataset", f"folder:{data}", "--synthetic", "False",
                   "--image_size", "16", "--epochs", "1", "--batch_size", "9", "--initial_filters", "8", cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    safe = dataset_folder(f"folder:{data}")
    result = _cas(out, f"folder:{data.resolve()}", "real")
    assert result["n"] == 9 and result["n_train"] == 18
    assert list(result["per_class_accuracy"]) == ["blue", "green", "red"]
    assert result["data_verification"]["status"] == "own"
    assert (out / "Checkpoints" / "Classifiers" / "Exp_0" / safe / "real" / "run.json").is_file()
    assert (out / "CAS Results" / f"cas_{safe}_exp0.png").is_file()


def test_generate_dataset_for_an_image_folder(tmp_path, monkeypatch):
    import generate_dataset
    from Models.diffusion import checkpoints as ck
    from Utils.io import atomic_write_json

    data = _make_folder(tmp_path / "tiles", ["x", "y"], [4, 4], sizes=((8, 8),), mode="L")
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path / "out"))
    spec = get_spec(f"folder:{data}")
    model = ck.build_model("tiny", spec, init_seed=0)
    enc_dir = ck.diffusion_checkpoint_dir(0, spec.name, "enc")
    atomic_write_json(enc_dir / ck.SETTINGS_FILE, {**ck.model_identity("tiny", spec, True, 0), "stage": "enc"})
    ck.save_parts(ck.weights_path(enc_dir, 1), ck.enc_parts(model))
    assert generate_dataset.main(["--dataset", f"folder:{data}", "--preset", "tiny", "--enc_epoch", "1",
                                  "--dif_epoch", "0", "--inf_steps", "2", "--img_total", "4",
                                  "--batch_size", "2"]) == 0
    folder = tmp_path / "out" / "Data" / "Synthetic" / "Exp_0" / dataset_folder(spec.name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["label_names"] == ["x", "y"] and manifest["complete"] is True
    with Image.open(folder / "class_01" / "img_1.png") as image:
        assert image.size == (8, 8) and image.mode == "L"


def test_reproduce_passes_the_data_flags_to_every_stage(tmp_path, monkeypatch):
    """Each stage of the chained pipeline on an image folder gets --image_size (and the accept flag)
    on its command line, and the line parses back into the same settings."""
    import importlib

    from Pipeline.stages import BUDGETS, Pipeline

    data = _make_folder(tmp_path / "mixed", ["a", "b"], [5, 5], sizes=((10, 10), (13, 11)))
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path / "out"))
    pipeline = Pipeline(f"folder:{data}", "tiny", BUDGETS["quick"], image_size=12, accept_unverified_data=True)
    winners = {"enc": {"enc_epoch": 1, "inf_steps": 5, "ugs": 2.0}, "dif": {"dif_epoch": 1, "inf_steps": 5, "ugs": 2.0}}
    monkeypatch.setattr(pipeline, "winner", winners.__getitem__)
    assert pipeline.train_size() == 6  # 10 images: 2 to val, 2 to test
    for stage in pipeline.stages():
        settings = stage.settings()
        argv = settings.to_argv()
        assert argv[argv.index("--dataset") + 1] == f"folder:{data}"
        assert argv[argv.index("--image_size") + 1] == "12", (stage.name, argv)
        script = importlib.import_module(Path(stage.script).stem)
        assert type(settings).from_namespace(script.parser.parse_args(argv)) == settings
    assert "--accept_unverified_data" in pipeline.stages()[-1].settings().to_argv()


def test_fashion_files_in_a_bare_data_dir_are_not_taken_for_mnist(tmp_path, monkeypatch):
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{DEBIAN_FASHION} is missing")
    monkeypatch.setenv("SDDG_DATA_MIRROR", "file:///nonexistent-mirror")
    bare = tmp_path / "bare"  # a --data_dir holding the four files themselves, as Debian's folder does
    bare.mkdir()
    for file in DEBIAN_FASHION.glob("*.gz"):
        (bare / file.name).symlink_to(file)
    # Right for fashion_mnist (its digest says so), never read as mnist (same names, same structure).
    assert load_dataset("fashion_mnist", data_dir=bare).verification.status == "digest"
    with pytest.raises(DatasetNotFoundError, match="mnist: the four idx files"):
        load_dataset("mnist", data_dir=bare)


def test_accepting_unverified_data_is_recorded_in_the_results(run_script, tmp_path, retinamnist_dir):
    with np.load(retinamnist_dir / "retinamnist.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["train_images"] = arrays["train_images"].copy()
    arrays["train_images"][0] //= 2  # another release, same structure
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "retinamnist.npz", **arrays)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--dataset", "retinamnist", "--synthetic", "False", "--data_dir", data, "--epochs", "1",
            "--initial_filters", "8"]
    refused = run_script("classifier_training.py", *args, cwd=out)
    assert refused.returncode == 2 and "not its official content (train images differ" in refused.stderr
    assert not list(out.iterdir())
    done = run_script("classifier_training.py", *args, "--accept_unverified_data", cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _cas(out, "retinamnist", "real")
    assert record["data_verification"]["status"] == "unverified"
    run = json.loads((out / "Checkpoints" / "Classifiers" / "Exp_0" / "retinamnist" / "real" / "run.json").read_text())
    assert "--accept_unverified_data" in json.dumps(run)
