"""Same seed and settings, same images: hashes pinned so that refactors cannot drift.

Two paths are pinned: the model's own `generate` (tiny preset, random weights of
init seed 0, and small, the default preset's recipe: DDIM with guidance, eta 0 and eta 1) and what generate_dataset.py
writes (PNG bytes) from checkpoints saved the way SD_adapting.py saves them.
The expected hashes were computed on this repository's CPU test machine with
the pinned requirements; a change here means images changed for users too.
If a change is intended (a new sampler default, a fixed bug), say so where
it lands and update the hashes in the same change.
"""

import hashlib

import numpy as np
import pytest

import generate_dataset
from Data.registry import get_spec
from Models.diffusion import checkpoints as ck

LABELS = np.array([0, 1, 2, 3, 9, 9])


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("preset, eta, expected", [("tiny", 0.0, "dc33a3f837040906"),
                                                    ("tiny", 1.0, "89eebebf3c7e55b8"),
                                                    ("small", 0.0, "f9a187093640d717")])
def test_generate_is_pinned(preset, eta, expected):
    """small: the default preset's recipe (cosine schedule, v-prediction, leading spacing)."""
    model = ck.build_model(preset, get_spec("digits"), init_seed=0)
    images = model.generate(LABELS, num_steps=6, guidance_scale=2.0, seed=5, eta=eta, batch_size=4)
    assert images.dtype == np.uint8 and images.shape[0] == len(LABELS)
    assert digest(images) == expected


def test_generate_dataset_pngs_are_pinned(tiny_checkpoints, tmp_path, monkeypatch):
    """From conftest's tiny class-encoder checkpoint (random weights of init seed 0, as SD_adapting.py saves)."""
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    out = tmp_path / "out"
    assert generate_dataset.main(["--dataset", "digits", "--preset", "tiny", "--enc_epoch", "1", "--dif_epoch", "0",
                                  "--inf_steps", "5", "--ugs", "1.5", "--batch_size", "4", "--seed", "2",
                                  "--img_total", "20", "--out_dir", str(out)]) == 0
    pngs = sorted(out.glob("class_*/*.png"))
    assert len(pngs) == 20
    combined = hashlib.sha256()
    for path in pngs:
        combined.update(path.relative_to(out).as_posix().encode())
        combined.update(path.read_bytes())
    assert combined.hexdigest()[:16] == "14e80ee857b8acea"
