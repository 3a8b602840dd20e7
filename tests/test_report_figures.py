"""The report's figures: colour-speckle share, the real-vs-generated grid, the samples section.

All on tiny arrays or scikit-learn's digits (embedded, 8x8): seconds.
"""

import numpy as np
import pytest
from PIL import Image

from Data.images import COMPARISON_GAP, COMPARISON_SEPARATOR, save_comparison_grid
from Metrics.speckle import speckle_share


def _grey_rgb(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), 3, axis=-1)


# --- speckle_share -----------------------------------------------------------------------

def test_exactly_grey_images_have_no_speckle():
    assert speckle_share(_grey_rgb(5, 16)) == 0.0


def test_spread_of_threshold_plus_one_counts_and_threshold_does_not():
    """Every pixel has a channel spread of 48 (not a speck: the test is strict) except 37
    chosen pixels with spread 49 (specks): the share is exactly 37 / all pixels."""
    n, size = 4, 10
    images = np.zeros((n, size, size, 3), np.uint8)
    images[..., 0] = 100
    images[..., 1] = 148          # spread 48 everywhere
    images[..., 2] = 120
    flat = images.reshape(-1, 3)
    chosen = np.random.default_rng(1).choice(len(flat), 37, replace=False)
    flat[chosen, 1] = 149         # spread 49
    assert speckle_share(images) == 37 / (n * size * size)
    assert speckle_share(images, threshold=49) == 0.0
    assert speckle_share(images, threshold=47) == 1.0
    # The extremes may sit on any channel: a spread from channel 2 down to channel 0 counts too.
    swapped = images[..., ::-1].copy()
    assert speckle_share(swapped) == 37 / (n * size * size)


def test_single_channel_input_is_zero():
    grey = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    assert speckle_share(grey) == 0.0
    assert speckle_share(grey[..., 0]) == 0.0


def test_wider_integers_in_range_are_accepted():
    images = np.zeros((1, 2, 2, 3), np.int64)
    images[0, 0, 0] = (0, 255, 0)
    assert speckle_share(images) == 0.25


@pytest.mark.parametrize("bad", [
    np.zeros((1, 4, 4, 3), np.float32),               # [0, 1] or [0, 255]? refused
    np.full((1, 4, 4, 3), 256, np.int32),             # out of range
    np.full((1, 4, 4, 3), -1, np.int16),
    np.zeros((1, 4, 4, 4), np.uint8),                 # RGBA
    np.zeros((4, 4), np.uint8),                       # not a batch
    np.zeros((0, 4, 4, 3), np.uint8),                 # no pixels
])
def test_bad_input_is_a_value_error(bad):
    with pytest.raises(ValueError):
        speckle_share(bad)


def test_bad_threshold_is_a_value_error():
    with pytest.raises(ValueError):
        speckle_share(_grey_rgb(1, 4), threshold=255)
    with pytest.raises(ValueError):
        speckle_share(_grey_rgb(1, 4), threshold=4.5)


# --- save_comparison_grid ----------------------------------------------------------------

def test_comparison_grid_layout_and_nearest_neighbour_tiles(tmp_path):
    """3 classes, 2 images per half: every tile is found, exactly, where the layout says, as
    the 10x10 source upscaled 10x by repetition; the separator line is dark; a class without
    generated images leaves its generated tiles white."""
    rng = np.random.default_rng(3)
    names = ("zero", "one", "two")
    per_class, size = 2, 10
    real = rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    real_labels = np.array([0, 1, 2, 0, 1, 2])
    generated = rng.integers(0, 256, (4, size, size, 1), dtype=np.uint8)   # grey input too
    generated_labels = np.array([1, 0, 1, 0])                               # class 2: none
    path = save_comparison_grid(real, real_labels, generated, generated_labels, names,
                                tmp_path / "cmp.png", per_class=per_class, min_tile=96,
                                title="a title")
    canvas = np.asarray(Image.open(path).convert("RGB"))
    height, width = canvas.shape[:2]
    cell = 100                                     # ceil(96 / 10) = 10x
    step = cell + COMPARISON_GAP
    gen_x0 = width - per_class * step
    real_x0 = gen_x0 - COMPARISON_SEPARATOR - per_class * step
    assert real_x0 > 40                            # room for the class names
    assert height >= len(names) * step + 20        # rows plus the column headers

    def tile(row, col, x0):
        top = height - (len(names) - row) * step
        left = x0 + col * step
        return canvas[top:top + cell, left:left + cell]

    def upscaled(image):
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return np.repeat(np.repeat(image, 10, axis=0), 10, axis=1)

    for row in range(len(names)):
        for col, index in enumerate(np.flatnonzero(real_labels == row)[:per_class]):
            np.testing.assert_array_equal(tile(row, col, real_x0), upscaled(real[index]))
        for col, index in enumerate(np.flatnonzero(generated_labels == row)[:per_class]):
            np.testing.assert_array_equal(tile(row, col, gen_x0), upscaled(generated[index]))
    assert (tile(2, 1, gen_x0) == 255).all()
    band = canvas[height - step:, real_x0 + per_class * step:gen_x0]
    assert band.shape[1] == COMPARISON_SEPARATOR
    assert (band.max(axis=-1) < 100).all(axis=0).any()   # a dark line runs through the band


def test_comparison_grid_refuses_mismatched_sizes(tmp_path):
    with pytest.raises(ValueError):
        save_comparison_grid(_grey_rgb(2, 8), [0, 1], _grey_rgb(2, 16), [0, 1], ("a", "b"),
                             tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --- the report's samples section --------------------------------------------------------

def _write_generated(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img_{i}.png")


def test_samples_section_of_a_grey_dataset_has_comparison_and_speckle_table(tmp_path, monkeypatch):
    """digits: 20 generated 8x8 images, 10 of them with one coloured pixel each → 10 / 1280 of
    the pixels (0.78 %); the real test images score 0.00 %."""
    from Data.loaders import load_dataset
    from Pipeline.report import samples_section
    from Utils.paths import synthetic_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    splits = load_dataset("digits")
    labels = np.repeat(np.arange(10), 2)
    generated = np.stack([splits.x_test[np.flatnonzero(splits.y_test == c)[k]]
                          for c, k in zip(labels, np.tile([0, 1], 10))]).copy()
    generated[::2, 3, 4] = (200, 30, 90)           # spread 170 in every other image
    _write_generated(synthetic_dir(5, "digits"), generated, labels)

    figures = tmp_path / "figures"
    figures.mkdir()
    text = "\n".join(samples_section("digits", splits, 5, figures))
    assert "![real samples](figures/samples_real.png)" in text
    assert "![generated samples](figures/samples_generated.png)" in text
    assert "(figures/real_vs_generated.png)" in text
    assert "upscaled 12x with nearest neighbour to 96 px" in text
    assert "share of pixels whose channels disagree by more than 48/255" in text
    assert f"| real (test split) | {len(splits.x_test)} | 0.00 % |" in text
    assert "| generated | 20 | 0.78 % |" in text
    with Image.open(figures / "real_vs_generated.png") as image:
        assert image.height >= 10 * 96


def test_samples_section_of_an_rgb_dataset_has_no_speckle_table(tmp_path, monkeypatch):
    from Data.loaders import Splits
    from Data.registry import get_spec
    from Pipeline.report import samples_section
    from Utils.paths import synthetic_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(10), 2)
    splits = Splits(get_spec("cifar10"), x, y, x, y, x, y)
    _write_generated(synthetic_dir(5, "cifar10"), x, y)

    figures = tmp_path / "figures"
    figures.mkdir()
    text = "\n".join(samples_section("cifar10", splits, 5, figures))
    assert "(figures/real_vs_generated.png)" in text
    assert "upscaled 3x with nearest neighbour to 96 px" in text
    assert "channels disagree" not in text


def test_methods_section_compares_conditioning_methods_in_a_table_and_a_figure(tmp_path, monkeypatch):
    """Two experiments of one dataset made with two conditioning methods: one row and one curve each."""
    import json

    from Pipeline.report import methods_section

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    results = tmp_path / "CAS Results"
    results.mkdir()
    for exp, method, cas in (("1", "class_encoder", (0.9, 0.95)), ("2", "text", (0.5, 0.6))):
        entry = {"real": {"top1": 0.99}, **{f"x{i + 1}": {"top1": c, "conditioning": method} for i, c in enumerate(cas)}}
        (results / f"test_accuracies_exp{exp}.json").write_text(json.dumps({"digits": entry}))
    figures = tmp_path / "figures"
    figures.mkdir()
    lines = methods_section("digits", figures)
    assert "| class_encoder | 1 | 99.0 % | x1 90.0 % x2 95.0 % |" in lines
    assert "| text | 2 | 99.0 % | x1 50.0 % x2 60.0 % |" in lines
    assert "![CAS of each conditioning method](figures/methods_cas.png)" in lines
    with Image.open(figures / "methods_cas.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    # One method alone: no comparison.
    (results / "test_accuracies_exp2.json").unlink()
    assert methods_section("digits", figures) == []
