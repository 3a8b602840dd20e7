"""Former home of the class-conditional model, kept so that existing imports keep working.

The model is now three parts (see each file):

- `backbone.py`   `ClassConditionalBackbone`: the networks and how they are called
- `generator.py`  `ClassConditionalGenerator`: class labels -> uint8 images (DDIM, guidance, seeded noise)
- `trainer.py`    `DiffusionTrainer`: `fit` with the diffusion loss, the stages, the weight average
- `optimizer.py`  `make_optimizer`, `AdamWithEMA`, `ema_optimizer`

New code imports from those modules. `ClassConditionalDiffusion(preset, num_classes, image_size, ...)`
is `DiffusionTrainer.from_preset(...)`.
"""

from Models.diffusion.backbone import ClassConditionalBackbone  # noqa: F401
from Models.diffusion.generator import (  # noqa: F401
    ClassConditionalGenerator,
    index_within_class,
    initial_noise,
    schedule_for,
    to_uint8_images,
)
from Models.diffusion.optimizer import AdamWithEMA, ema_optimizer, make_optimizer  # noqa: F401
from Models.diffusion.trainer import STAGES, DiffusionTrainer, TrainBatches  # noqa: F401

__all__ = ["AdamWithEMA", "ClassConditionalBackbone", "ClassConditionalDiffusion", "ClassConditionalGenerator",
           "DiffusionTrainer", "STAGES", "TrainBatches", "ema_optimizer", "index_within_class", "initial_noise",
           "make_optimizer", "schedule_for", "to_uint8_images"]


def ClassConditionalDiffusion(preset, num_classes, image_size, **kwargs):  # noqa: N802 (the former class)
    """`DiffusionTrainer.from_preset(preset, num_classes, image_size, **kwargs)`."""
    return DiffusionTrainer.from_preset(preset, num_classes, image_size, **kwargs)
