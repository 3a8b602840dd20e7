"""The dataset registry and the MedMNIST facts it is built from."""

import re

import pytest

from Data.medmnist_info import MEDMNIST
from Data.registry import (CIFAR100_LABELS, PAPER_DATASETS, DatasetSpec, dataset_names,
                           get_spec)
from Data.errors import DataError


def test_every_entry_is_consistent():
    names = dataset_names()
    assert len(names) == len(set(names)) == 16
    for name in names:
        spec = get_spec(name)
        assert isinstance(spec, DatasetSpec) and spec.name == name
        assert spec.num_classes == len(spec.label_names) >= 2
        assert len(set(spec.label_names)) == spec.num_classes, f"{name}: duplicate label names"
        assert all(isinstance(n, str) and n for n in spec.label_names)
        assert spec.channels in (1, 3)
        assert spec.source in ("cifar", "medmnist", "sklearn", "idx")
        assert spec.in_paper == (name in PAPER_DATASETS)
        if spec.source == "medmnist":
            info = MEDMNIST[name]
            assert spec.label_names == info["labels"] and spec.channels == info["channels"]
            assert spec.image_size == 28
        elif spec.source == "cifar":
            assert (spec.image_size, spec.channels) == (32, 3)


def test_known_facts():
    assert get_spec("cifar10").num_classes == 10
    assert get_spec("cifar10").label_names[0] == "airplane"
    assert get_spec("cifar100").num_classes == 100
    assert (get_spec("digits").image_size, get_spec("digits").channels) == (8, 1)
    assert [get_spec(n).num_classes for n in ("pathmnist", "dermamnist", "bloodmnist", "retinamnist")] \
        == [9, 7, 8, 5]
    assert get_spec("pneumoniamnist").channels == 1
    assert dataset_names()[:6] == list(PAPER_DATASETS)
    assert sum(get_spec(n).in_paper for n in dataset_names()) == 6


def test_cifar100_fine_names_are_the_official_alphabetical_list():
    # The official meta file lists the 100 fine labels in alphabetical order.
    assert len(CIFAR100_LABELS) == len(set(CIFAR100_LABELS)) == 100
    assert list(CIFAR100_LABELS) == sorted(CIFAR100_LABELS)
    assert {"aquarium_fish", "maple_tree", "sweet_pepper", "willow_tree"} <= set(CIFAR100_LABELS)


def test_medmnist_label_order_follows_medmnist_info():
    # The paper's original had these two in a different order than the file's labels.
    derma = get_spec("dermamnist").label_names
    assert derma[4] == "melanoma" and derma[5] == "melanocytic nevi" and derma[0].startswith("actinic")
    blood = get_spec("bloodmnist").label_names
    assert blood[:3] == ("basophil", "eosinophil", "erythroblast") and blood[-1] == "platelet"


def test_medmnist_metadata():
    assert MEDMNIST["retinamnist"]["md5"] == "bd4c0672f1bba3e3a89f0e4e876791e4"
    assert MEDMNIST["retinamnist"]["n_samples"] == {"train": 1080, "val": 120, "test": 400}
    assert "chestmnist" not in MEDMNIST  # multi-label
    for name, info in MEDMNIST.items():
        assert re.fullmatch(r"[0-9a-f]{32}", info["md5"]), name
        assert info["file"] == f"{name}.npz"
        assert info["url"].startswith("https://zenodo.org/records/10519652/files/" + info["file"])
        assert info["task"] in ("multi-class", "binary-class", "ordinal-regression")
        assert len(info["labels"]) >= 2 and all(v > 0 for v in info["n_samples"].values())


def test_unknown_names_are_one_line_errors():
    with pytest.raises(DataError) as e:
        get_spec("imagenet")
    message = str(e.value)
    assert message.startswith("unknown dataset 'imagenet'; choose from: cifar10, cifar100")
    assert "digits" in message and "\n" not in message
    with pytest.raises(DataError, match="chestmnist.*multi-label"):
        get_spec("chestmnist")


def test_lookup_is_case_insensitive_and_specs_are_frozen():
    assert get_spec(" CIFAR10 ") is get_spec("cifar10")
    with pytest.raises(Exception):
        get_spec("digits").image_size = 32
