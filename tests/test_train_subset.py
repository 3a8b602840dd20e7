"""--train_subset N: a seeded, stratified subset of the real training split, so large sets
(Fashion-MNIST, CIFAR) run end to end on a CPU; x1 then means N images.

The subset rule is checked on made-up labels and on Debian's Fashion-MNIST through the real
loader and classifier_training.py. That a whole (tiny) reproduce.py on digits keeps it (the
generator, the studies, generation and every CAS row see the same N images, and every record
says so) is checked by tests/test_reproduce.py's killed-and-resumed pipeline, which runs on a
subset.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from Data.balance import stratified_subset  # noqa: E402
from Data.errors import DataError  # noqa: E402
from Data.loaders import load_dataset  # noqa: E402

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _require_debian_fashion():
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        message = f"{DEBIAN_FASHION} is missing (apt-get install dataset-fashion-mnist; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


# ------------------------------------------------------------------ the rule ----

@pytest.mark.parametrize("n", [10, 11, 55, 137, 549, 550])
def test_the_subset_keeps_every_class_share(n):
    labels = np.repeat(np.arange(10), [100, 90, 80, 70, 60, 50, 40, 30, 20, 10])
    chosen = stratified_subset(labels, n, seed=3)
    assert len(chosen) == n and len(np.unique(chosen)) == n and np.all(np.diff(chosen) > 0)
    counts = np.bincount(labels[chosen], minlength=10)
    share = n * np.bincount(labels) / len(labels)
    assert np.all(counts >= 1)
    assert np.all(np.abs(counts - share) < 1 + 1e-9), (counts, share)  # largest remainder: within one image


def test_a_rare_class_keeps_one_image_and_the_rest_is_proportional():
    labels = np.repeat(np.arange(3), [1000, 3, 1])
    counts = np.bincount(labels[stratified_subset(labels, 20)], minlength=3)
    assert counts.tolist() == [18, 1, 1]


def test_same_seed_same_subset_another_seed_another():
    labels = np.repeat(np.arange(4), 50)
    first = stratified_subset(labels, 40, seed=0)
    assert np.array_equal(first, stratified_subset(labels, 40, seed=0))
    assert not np.array_equal(first, stratified_subset(labels, 40, seed=1))


@pytest.mark.parametrize("n", [3, 201])
def test_a_subset_smaller_than_the_classes_or_larger_than_the_split_is_refused(n):
    with pytest.raises(ValueError, match=f"needs 4 to 200 images, not {n}"):
        stratified_subset(np.repeat(np.arange(4), 50), n)


def test_the_loader_cuts_only_the_training_split_and_records_it():
    full = load_dataset("digits")
    cut = load_dataset("digits", train_subset=100, train_subset_seed=2)
    assert len(cut.y_train) == 100 and cut.full_train_size == len(full.y_train)
    assert np.array_equal(cut.x_val, full.x_val) and np.array_equal(cut.x_test, full.x_test)
    # The subset's images are training images, with their own labels.
    index = {img.tobytes(): y for img, y in zip(full.x_train, full.y_train)}
    assert all(index[img.tobytes()] == y for img, y in zip(cut.x_train, cut.y_train))
    assert cut.provenance()["train_subset"] == {"images": 100, "seed": 2}
    assert full.provenance()["train_subset"] is None
    with pytest.raises(DataError, match="--train_subset 5 for digits"):
        load_dataset("digits", train_subset=5)


# ------------------------------------------------------- Fashion-MNIST ----

def test_fashion_mnist_subset_from_debians_files_is_balanced():
    _require_debian_fashion()
    splits = load_dataset("fashion_mnist", data_dir="/nonexistent-cache", train_subset=600)
    assert splits.sizes() == {"train": 600, "val": 12000, "test": 10000}
    counts = np.bincount(splits.y_train, minlength=10)
    assert counts.min() >= 59 and counts.max() <= 61, counts  # Fashion-MNIST's classes are (nearly) even


def test_fashion_mnist_cas_real_row_runs_on_a_subset(run_script, tmp_path):
    """classifier_training.py on Fashion-MNIST with --train_subset: trains on N images, records N."""
    _require_debian_fashion()
    done = run_script("classifier_training.py", "--dataset", "fashion_mnist", "--synthetic", "False",
                      "--train_subset", "200", "--epochs", "1", "--batch_size", "100", "--initial_filters", "16")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    entry = json.loads((tmp_path / "CAS Results" / "test_accuracies_exp0.json").read_text())["fashion_mnist"]["real"]
    assert entry["n_train"] == 200 and entry["train_subset"] == {"images": 200, "seed": 0}
    assert entry["n"] == 10000 and entry["data_verification"]["status"] == "digest"

    # The same command is done; with another subset it is not (its record would be another run's).
    again = run_script("classifier_training.py", "--dataset", "fashion_mnist", "--synthetic", "False",
                       "--train_subset", "200", "--epochs", "1", "--batch_size", "100", "--initial_filters", "16")
    assert again.returncode == 0 and "n_train" not in again.stdout
    sys.path.insert(0, str(REPO))
    from Pipeline import cas

    os.environ["SDDG_OUTPUT_ROOT"] = str(tmp_path)
    try:
        same = cas.CASSettings(dataset="fashion_mnist", synthetic=False, train_subset=200, epochs=1,
                               batch_size=100, initial_filters=16)
        other = cas.CASSettings(dataset="fashion_mnist", synthetic=False, train_subset=300, epochs=1,
                                batch_size=100, initial_filters=16)
        assert cas.is_done(same) and cas.is_done(other) is None
    finally:
        del os.environ["SDDG_OUTPUT_ROOT"]
