"""The tiny preset learns class-conditional digits for real (a short version of the benchmark).

SD_adapting.py's enc stage (tiny: class encoder + UNet from scratch) for a few
epochs, generate_dataset.py, then a classifier trained on REAL digits must
recognise the generated digits' classes well above chance (10 %). The full
pipeline measurement (both stages, ResNet20, >= 80 %) is in
BENCHMARKS.md.
"""

import numpy as np
import pytest
from sklearn.svm import SVC

import generate_dataset
import SD_adapting
from Data.loaders import load_dataset
from Data.registry import get_spec
from Data.synthetic import load_image_folder
from Utils.paths import synthetic_dir

EPOCHS = 12


@pytest.mark.slow
def test_generated_digits_are_recognised_by_a_classifier_trained_on_real_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    assert SD_adapting.main(["--dataset", "digits", "--preset", "tiny", "--train_model", "enc",
                             "--epochs", str(EPOCHS), "--freq", str(EPOCHS),
                             "--grid_per_class", "0", "--verbose", "0"]) == 0
    assert generate_dataset.main(["--dataset", "digits", "--preset", "tiny", "--enc_epoch", str(EPOCHS), "--dif_epoch", "0",
                                  "--img_total", "300", "--inf_steps", "10", "--ugs", "5",
                                  "--batch_size", "300", "--grid_per_class", "0"]) == 0

    spec = get_spec("digits")
    x, y, report = load_image_folder(synthetic_dir(0, "digits"), spec)
    assert len(x) == 300 and np.bincount(y).tolist() == [30] * 10
    real = load_dataset("digits")
    flat = lambda images: images.reshape(len(images), -1) / 255.0  # noqa: E731
    classifier = SVC(gamma="scale").fit(flat(real.x_train), real.y_train)
    assert classifier.score(flat(real.x_test), real.y_test) > 0.95
    accuracy = classifier.score(flat(x), y)
    print(f"\nSVC trained on real digits: {accuracy:.1%} on 300 generated ones after {EPOCHS} epochs")
    assert accuracy > 0.5
