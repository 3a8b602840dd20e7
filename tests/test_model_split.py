"""The three parts of the model: backbone (networks), generator (labels -> images), trainer (fit)."""

import keras
import numpy as np

from Data.registry import get_spec
from Models.diffusion import checkpoints as ck
from Models.diffusion.backbone import ClassConditionalBackbone
from Models.diffusion.generator import ClassConditionalGenerator
from Models.diffusion.trainer import DiffusionTrainer

DIGITS = get_spec("digits")


def test_the_trainer_generates_what_a_generator_over_its_backbone_does():
    trainer = ck.build_model("tiny", DIGITS, init_seed=0)
    assert isinstance(trainer, DiffusionTrainer) and isinstance(trainer.backbone, ClassConditionalBackbone)
    assert trainer.unet is trainer.backbone.unet and trainer.generator.backbone is trainer.backbone
    own = trainer.generate([0, 3, 3], num_steps=3, seed=1, batch_size=2)
    alone = ClassConditionalGenerator(trainer.backbone, trainer.schedule).generate([0, 3, 3], num_steps=3, seed=1)
    np.testing.assert_array_equal(own, alone)
    # the trainer trains exactly the backbone's parts of its stage
    assert [v.path for v in trainer.trainable_variables] == \
        [v.path for part in (trainer.unet, trainer.class_encoder) for v in part.trainable_variables]


def test_backbone_calls():
    backbone = ClassConditionalBackbone("tiny", num_classes=10, image_size=8, image_channels=1)
    images = np.full((2, 8, 8, 3), 255, np.uint8)
    x0 = backbone.encode_images(images)
    assert tuple(x0.shape) == (2, 8, 8, 1) == (2, *backbone.noise_shape) and float(np.min(x0)) == 1.0
    context, uncond = backbone.contexts([1, 2])
    assert context.shape[0] == 2 and uncond.shape[0] == 1
    output = backbone.predict(x0, np.array([10, 500], np.int32), context)
    assert tuple(output.shape) == (2, 8, 8, 1) and keras.backend.standardize_dtype(output.dtype) == "float32"
    assert backbone.decode(x0) is x0  # pixel presets: x_0 is the image


def test_generation_loaders_return_a_generator_and_reload_it_in_place(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tiny_checkpoints))
    generator, used = ck.load_generation_model("tiny", DIGITS, 0, enc_epoch=1)
    assert isinstance(generator, ClassConditionalGenerator) and used["dif"] is None
    assert isinstance(generator.origin, ck.WeightsOrigin) and generator.origin.unet == used["enc"]
    first = ck.load_for_generation(0, "digits", "tiny", "enc", 1)
    again = ck.load_for_generation(0, "digits", "tiny", "enc", 2, model=first)
    assert again is first and again.origin.unet.endswith("epoch_002.weights.h5")
    np.testing.assert_array_equal(first.generate([5], num_steps=2), generator.generate([5], num_steps=2))
