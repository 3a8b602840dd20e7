"""Synthetic image folders: layouts, formats, modes, sizes, junk, balanced take."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from Data.registry import get_spec
from Data.synthetic import format_report, load_image_folder
from Data.errors import DataError, DatasetNotFoundError

DIGITS = get_spec("digits")  # 8 px, 10 classes
CIFAR10 = get_spec("cifar10")  # 32 px, 10 classes


def _solid(colour, size=(20, 20), mode="RGB"):
    return Image.new(mode, size, colour)


def _write_class_folders(root, counts, size=(20, 20), name="class_{:02d}", fmt="png"):
    """counts[label] solid images per class; pixel value encodes (label, index)."""
    for label, n in enumerate(counts):
        folder = root / name.format(label)
        folder.mkdir(parents=True)
        for i in range(n):
            _solid((label * 20, i, 200), size).save(folder / f"img_{i}.{fmt}")


def test_mixed_formats_modes_sizes_and_junk_are_read_or_reported(tmp_path):
    root = tmp_path / "synthetic"
    folders = {label: root / f"class_{label:02d}" for label in range(9)}  # no class_09
    for folder in folders.values():
        folder.mkdir(parents=True)
    _solid((10, 200, 30)).save(folders[0] / "rgb.png")
    _solid((10, 200, 30, 255), (64, 64), "RGBA").save(folders[0] / "rgba.png")
    _solid(100, (8, 8), "L").save(folders[1] / "grey.bmp")
    _solid((100, 128), (50, 30), "LA").save(folders[1] / "grey_alpha_non_square.png")
    palette = _solid((250, 0, 0)).convert("P", palette=Image.ADAPTIVE)
    palette.save(folders[2] / "palette.png")
    _solid((0, 0, 250), (128, 128)).save(folders[2] / "big.jpg", quality=95)
    _solid((0, 250, 0), (32, 32)).save(folders[3] / "g.webp", lossless=True)
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(folders[3] / "deep.tif")
    (folders[3] / "nested").mkdir()
    _solid((1, 2, 3), (8, 8)).save(folders[3] / "nested" / "inner.jpeg", quality=100)
    (folders[4] / "junk.png").write_bytes(b"\x00garbage" * 50)
    good = folders[4] / "good.PNG"
    _solid((50, 60, 70), (40, 40)).save(good, format="PNG")
    truncated = folders[5] / "truncated.png"
    _solid((5, 5, 5), (64, 64)).save(folders[6] / "full.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    (folders[5] / "notes.txt").write_text("not an image")
    (folders[6] / ".DS_Store").write_bytes(b"hidden")
    _solid((9, 9, 9)).save(folders[8] / "a.png")
    # class_07 stays empty; class_09 does not exist

    x, y, report = load_image_folder(root, DIGITS)
    assert x.shape == (len(y), 8, 8, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert Counter(y.tolist()) == {0: 2, 1: 2, 2: 2, 3: 3, 4: 1, 6: 1, 8: 1}
    # nothing silently dropped: every image file is either read or listed as unreadable
    found = sum(report["files_found"].values())
    assert found == len(y) + len(report["unreadable_files"]) == 14
    assert sorted(f for f, _ in report["unreadable_files"]) == ["class_04/junk.png", "class_05/truncated.png"]
    assert report["non_image_files"] == ["class_05/notes.txt"]
    assert report["missing_classes"] == ["9 (9)"]
    assert report["empty_classes"] == ["5 (5)", "7 (7)"]
    assert report["label_rule"] == "class_<N> folder names"
    assert report["resized_from"]["50x30"] == 1 and report["modes"]["RGBA"] == 1
    # pixel values survive mode conversion and resizing
    by_label = {label: x[y == label] for label in set(y.tolist())}
    assert (np.abs(by_label[0].astype(int) - (10, 200, 30)) <= 1).all()  # RGB and RGBA
    assert (by_label[1][0] == 100).all()  # grey bmp → 3 equal channels
    assert (by_label[3][0] == 255).all()  # 16-bit white → 255, not clipped garbage
    # class_02 in sorted file order: big.jpg (blue, 128 px jpeg), palette.png (red)
    assert (np.abs(by_label[2][0].astype(int) - (0, 0, 250)) <= 3).all()
    assert (np.abs(by_label[2][1].astype(int) - (250, 0, 0)) <= 2).all()
    lines = format_report(report)
    assert lines[0].startswith(f"{root}: 12 images for digits")
    text = "\n".join(lines)
    assert "2 unreadable image file(s)" in text and "class_04/junk.png" in text
    assert "no folder for class(es): 9 (9)" in text and "no readable image for class(es): 5 (5), 7 (7)" in text


def test_integer_and_label_name_folders(tmp_path):
    ints = tmp_path / "ints"
    for label in (0, 3, 10 - 1):
        (ints / str(label)).mkdir(parents=True)
        _solid((label, 0, 0)).save(ints / str(label) / "a.png")
    x, y, report = load_image_folder(ints, CIFAR10)
    assert report["label_rule"] == "integer folder names" and y.tolist() == [0, 3, 9]
    assert x.shape == (3, 32, 32, 3)

    names = tmp_path / "names"
    for folder, label in (("airplane", 0), ("Automobile", 1), ("TRUCK", 9)):
        (names / folder).mkdir(parents=True)
        _solid((label, 0, 0)).save(names / folder / "a.jpg")
    _, y, report = load_image_folder(names, CIFAR10)
    assert report["label_rule"] == "label-name folder names" and y.tolist() == [0, 1, 9]
    assert report["class_folders"] == {"0": "airplane", "1": "Automobile", "9": "TRUCK"}

    # Multi-word MedMNIST names: spaces, underscores and hyphens are interchangeable.
    derma = tmp_path / "derma"
    (derma / "basal_cell_carcinoma").mkdir(parents=True)
    _solid((1, 1, 1)).save(derma / "basal_cell_carcinoma" / "a.png")
    _, y, _ = load_image_folder(derma, get_spec("dermamnist"))
    assert y.tolist() == [1]


def test_other_names_fall_back_to_sorted_order_with_a_warning(tmp_path):
    for folder in ("b_second", "a_first", "c_third"):
        (tmp_path / folder).mkdir()
        _solid((0, 0, 0)).save(tmp_path / folder / "x.png")
    _, y, report = load_image_folder(tmp_path, DIGITS)
    assert report["class_folders"] == {"0": "a_first", "1": "b_second", "2": "c_third"}
    assert report["label_rule"] == "sorted folder order" and sorted(y.tolist()) == [0, 1, 2]
    assert "sorted folder order (a_first=0, b_second=1, c_third=2)" in report["warnings"][0]


def test_bad_layouts_are_user_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", DIGITS)
    (tmp_path / "flat.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path, DIGITS)
    (tmp_path / "class_00").mkdir()
    (tmp_path / "class_00" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_image_folder(tmp_path, DIGITS)
    (tmp_path / "class_00" / "junk.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable image .*1 unreadable"):
        load_image_folder(tmp_path, DIGITS)
    (tmp_path / "class_12").mkdir()
    with pytest.raises(DataError, match="class_12 out of range for digits's 10 classes"):
        load_image_folder(tmp_path, DIGITS)
    many = tmp_path / "many"
    for i in range(11):
        (many / f"folder{i:02d}").mkdir(parents=True)
    with pytest.raises(DataError, match="11 class folders but digits has 10 classes"):
        load_image_folder(many, DIGITS)


def test_take_is_balanced_seeded_and_random(tmp_path):
    _write_class_folders(tmp_path, [7] * 10)
    x, y, report = load_image_folder(tmp_path, DIGITS, take=25, seed=3)
    counts = np.bincount(y, minlength=10)
    assert len(y) == 25 and sorted(counts.tolist()) == [2] * 5 + [3] * 5
    assert report["counts"] == {str(c): int(n) for c, n in enumerate(counts)}
    # same seed → same images; another seed → another subset or remainder
    x2, y2, _ = load_image_folder(tmp_path, DIGITS, take=25, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, y3, _ = load_image_folder(tmp_path, DIGITS, take=25, seed=4)
    assert not (np.array_equal(x, x3) and np.array_equal(y, y3))
    # a random subset, not the first files: the green channel holds the file index
    picked = set(x[:, 0, 0, 1].tolist())
    assert picked != {0, 1} and picked != {0, 1, 2}
    x_all, y_all, _ = load_image_folder(tmp_path, DIGITS, take=70, seed=0)
    assert np.bincount(y_all).tolist() == [7] * 10


def test_take_more_than_a_class_has(tmp_path):
    _write_class_folders(tmp_path, [5, 5, 5, 2, 5, 5, 5, 5, 5, 5])
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path, DIGITS, take=40)
    assert str(e.value).startswith("class 3 (3) has 2 readable images in")
    assert "take=40 needs 4 of this class" in str(e.value)
    missing = tmp_path / "missing"
    _write_class_folders(missing, [3] * 9)
    with pytest.raises(DataError, match=r"class 9 \(9\) has no folder in .* needs 2"):
        load_image_folder(missing, DIGITS, take=20)


def test_take_replaces_unreadable_picks_and_reports_them(tmp_path):
    _write_class_folders(tmp_path, [4] * 10)
    for i in range(3):
        (tmp_path / "class_00" / f"junk_{i}.png").write_bytes(b"junk")
    x, y, report = load_image_folder(tmp_path, DIGITS, take=40, seed=0)
    assert np.bincount(y).tolist() == [4] * 10  # class 0 still gets 4 readable images
    assert len(report["unreadable_files"]) == 3  # all junk had to be tried to find 4 good
    with pytest.raises(DataError, match=r"class 0 \(0\) has 4 readable images"):
        load_image_folder(tmp_path, DIGITS, take=50)
