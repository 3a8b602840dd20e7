"""evaluate_dataset.py end to end, its one-line errors, and the KID tuning objective.

The ResNet20 extractor is trained with a tiny configuration here (2 epochs,
8 filters) on scikit-learn's digits (embedded, 8x8): seconds, not minutes.
"""

import json
import time

import numpy as np
import pytest
from PIL import Image

TINY = ("--extractor_epochs", "2", "--extractor_filters", "8")


def _write_folder(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img_{i}.png")
    return root


@pytest.fixture(scope="module")
def digits():
    from Data.loaders import load_dataset

    return load_dataset("digits")


def _results(tmp_path):
    return json.loads((tmp_path / "CAS Results" / "quality_exp3.json").read_text())


def test_end_to_end_with_resnet20_features(tmp_path, run_script, digits):
    """A folder of 40 copies of training images + 160 test images: every metric, overall and
    per class, into the merged JSON; the copies are flagged; a rerun reuses the cached extractor
    and gives the same numbers."""
    rng = np.random.default_rng(0)
    copied = rng.choice(len(digits.x_train), 40, replace=False)
    fresh = rng.choice(len(digits.x_test), 160, replace=False)
    images = np.concatenate([digits.x_train[copied], digits.x_test[fresh]])
    labels = np.concatenate([digits.y_train[copied], digits.y_test[fresh]])
    folder = _write_folder(tmp_path / "Data" / "Synthetic" / "mixed", images, labels)

    args = ("--dataset", "digits", "--synthetic_dir", folder, "--exp", "3", "--kid_subsets", "20", *TINY)
    done = run_script("evaluate_dataset.py", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training the ResNet20 feature extractor" in done.stdout
    assert "memorisation:" in done.stdout

    entry = _results(tmp_path)["digits"]["Data/Synthetic/mixed"]["resnet20"]
    overall = entry["overall"]
    assert overall["n_synthetic"] == 200 and overall["n_real"] == len(digits.x_test)
    for name in ("fid", "kid_mean", "kid_std", "mmd2_gaussian", "precision", "recall", "density", "coverage",
                 "inception_score_mean", "label_agreement"):
        assert np.isfinite(overall[name]), name
    assert overall["fid"] >= 0 and 0 <= overall["precision"] <= 1 and 1 <= overall["inception_score_mean"] <= 10
    assert sorted(entry["per_class"], key=int) == [str(c) for c in range(10)]
    assert all(np.isfinite(c["fid"]) and c["n_synthetic"] > 0 for c in entry["per_class"].values())
    # Exact copies have ratio 0: all 40 are among the suspected copies, the closest ones are copies.
    memo = entry["memorization"]
    assert memo["num_suspected"] >= 40 and memo["closest_ratio"][:16] == [0.0] * 16
    assert memo["closest_pairs_png"].endswith(".png")
    assert Image.open(memo["closest_pairs_png"]).size[0] > 0
    settings = entry["settings"]
    assert settings["features"] == "resnet20" and settings["reference_split"] == "test"
    assert "antialiased" in settings["resize_method"]
    checkpoint = tmp_path / "Checkpoints" / "Classifiers" / "Exp_3" / "digits" / "feature_extractor" / "seed_0"
    assert (checkpoint / "run.json").exists()

    # A second folder merges beside the first; the extractor comes from the cache.
    fresh_only = _write_folder(tmp_path / "fresh", digits.x_test[fresh], digits.y_test[fresh])
    done = run_script("evaluate_dataset.py", "--dataset", "digits", "--synthetic_dir", fresh_only,
                      "--exp", "3", "--kid_subsets", "20", *TINY, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training the ResNet20 feature extractor" not in done.stdout
    results = _results(tmp_path)["digits"]
    assert set(results) == {"Data/Synthetic/mixed", "fresh"}
    # Test images only: the fresh folder is far less copy-like than the one with copies.
    assert results["fresh"]["resnet20"]["memorization"]["num_suspected"] < memo["num_suspected"] - 30

    # Same seed, same numbers (the extractor now loaded from its cache).
    done = run_script("evaluate_dataset.py", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = _results(tmp_path)["digits"]["Data/Synthetic/mixed"]["resnet20"]
    assert again["overall"] == overall and again["per_class"] == entry["per_class"]


def _assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, run_script, digits):
    done = run_script("evaluate_dataset.py", "--dataset", "digits", "--synthetic_dir", tmp_path / "missing")
    _assert_one_line_error(done, "does not exist")
    (tmp_path / "flat").mkdir()
    Image.fromarray(digits.x_test[0]).save(tmp_path / "flat" / "a.png")
    done = run_script("evaluate_dataset.py", "--dataset", "digits", "--synthetic_dir", tmp_path / "flat")
    _assert_one_line_error(done, "no class sub-folders")
    done = run_script("evaluate_dataset.py", "--dataset", "nosuchset", "--synthetic_dir", tmp_path / "flat")
    _assert_one_line_error(done, "unknown dataset")
    done = run_script("evaluate_dataset.py", "--dataset", "digits", "--synthetic_dir", tmp_path / "flat",
                      "--features", "vgg")
    _assert_one_line_error(done, "--features")
    assert not (tmp_path / "CAS Results").exists() and not (tmp_path / "Checkpoints").exists()


def test_inception_offline_is_one_line_within_seconds(tmp_path, run_script, digits):
    """No cached weights and no network (a proxy that refuses): one line naming the file and the folder."""
    folder = _write_folder(tmp_path / "syn", digits.x_test[:20], digits.y_test[:20])
    keras_home = tmp_path / "keras_home"
    offline = {"KERAS_HOME": str(keras_home), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    started = time.perf_counter()
    done = run_script("evaluate_dataset.py", "--dataset", "digits", "--synthetic_dir", folder,
                      "--features", "inception", env=offline, timeout=120)
    elapsed = time.perf_counter() - started
    _assert_one_line_error(done, "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
                           str(keras_home / "models"), "--features resnet20")
    assert elapsed < 60
    assert not (tmp_path / "CAS Results").exists()


def test_inception_extractor_plumbing_without_weights(digits):
    """Resize to 299, scaling, the two outputs (random weights: the ImageNet file cannot be had offline)."""
    from Metrics.features import InceptionV3Features

    extractor = InceptionV3Features(batch_size=3, weights=None)
    embeddings = extractor.embed(digits.x_test[:5])  # 8x8 digits: upsized with the one method
    assert embeddings.features.shape == (5, 2048) and embeddings.probabilities.shape == (5, 1000)
    np.testing.assert_allclose(embeddings.probabilities.sum(axis=1), 1.0, rtol=1e-4)
    assert np.isfinite(embeddings.features).all()
    assert extractor.describe()["input_size"] == 299


def test_kid_objective_ranks_real_images_above_noise(digits):
    """In memory, no classifier per call: real held-out images score a lower KID than noise or
    one repeated class; the real features are computed once and reused; same seed, same value."""
    from Metrics.features import ResNet20Features, feature_extractor_config
    from Metrics.quality import _REFERENCE_CACHE, kid_objective

    import dataclasses

    config = dataclasses.replace(feature_extractor_config(), epochs=2, initial_filters=8)
    extractor = ResNet20Features.train(digits.x_train, digits.y_train, digits.x_val, digits.y_val, 10,
                                       config=config, seed=0)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=digits.x_test.shape, dtype=np.uint8)
    one_class = np.repeat(digits.x_test[digits.y_test == 3][:1], len(digits.x_test), axis=0)

    def score(images):
        return kid_objective(images, digits.y_test, digits.x_train, digits.y_train, seed=0,
                             extractor=extractor, num_subsets=10, subset_size=300)

    real = score(digits.x_test)
    assert len(_REFERENCE_CACHE) == 1
    assert real < score(noise) and real < score(one_class)
    assert score(digits.x_test) == real
    assert len(_REFERENCE_CACHE) == 1  # the reference set was embedded once


def test_kid_extractor_is_built_once_per_real_set(digits):
    import dataclasses

    from Metrics.features import feature_extractor_config
    from Metrics.quality import kid_extractor, kid_objective

    config = dataclasses.replace(feature_extractor_config(), epochs=1, initial_filters=8)
    first = kid_extractor(digits.x_train, digits.y_train, seed=0, config=config)
    assert kid_extractor(digits.x_train, digits.y_train, seed=0, config=config) is first
    value = kid_objective(digits.x_test, digits.y_test, digits.x_train, digits.y_train, seed=0,
                          extractor_config=config, num_subsets=3, subset_size=200)
    assert np.isfinite(value)


def test_per_class_entries_handle_missing_and_tiny_classes():
    from Metrics.features import Embeddings
    from Metrics.quality import compute_quality

    rng = np.random.default_rng(0)
    ref = Embeddings(rng.normal(size=(60, 4)), np.full((60, 3), 1 / 3))
    ref_labels = np.repeat([0, 1, 2], 20)
    syn = Embeddings(rng.normal(size=(23, 4)), np.full((23, 3), 1 / 3))
    syn_labels = np.array([0] * 20 + [1] * 3)  # class 1 too small for PRDC (k=5), class 2 absent
    result, _ = compute_quality(ref, ref_labels, syn, syn_labels, rng.normal(size=(50, 4)), ["a", "b", "c"],
                                kid_subsets=3)
    per_class = result["per_class"]
    assert np.isfinite(per_class["0"]["precision"])
    assert per_class["1"]["precision"] is None and np.isfinite(per_class["1"]["fid"])
    assert per_class["1"]["skipped"]
    assert per_class["2"]["n_synthetic"] == 0 and per_class["2"]["skipped"]
    json.dumps(result)  # JSON-able as is
