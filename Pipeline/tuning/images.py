"""A trial's images: balanced labels, generated in memory from a checkpoint of the stage tuned.

`DiffusionImageSource` loads the checkpoint a trial asks for (once per epoch),
samples with the trial's steps and guidance scale, and resizes the images
(antialiased, `Data.images.resize_images`) to the dataset's resolution.

Example:
    >>> source = DiffusionImageSource(0, "digits", "tiny", "enc")
    >>> source.checkpoint_epochs()                      # [1, 2, ..., 6]
    >>> x = source({"inf_steps": 20, "ugs": 3.0, "enc_epoch": 6}, trial_labels(500, 10), seed=0)
"""

from Data.balance import balanced_labels
from Pipeline.tuning.space import CHECKPOINT_PARAM, SAMPLER_PARAM, SPACING_PARAM, STEPS_PARAM, UGS_PARAM
from Models.diffusion.presets import GENERATION_BATCH_SIZE
from Models.diffusion.schedulers import DEFAULT_SAMPLER
from Utils.cli import UserError

# The paper's generation batch: images per sampler call (it does not change the images).


def trial_labels(num_images, num_classes):
    """The labels of one trial's images: every class, balanced (Data/balance.py)."""
    if num_images < num_classes:
        raise UserError(f"{num_images} images cannot cover {num_classes} classes; "
                        f"ask for at least {num_classes}")
    return balanced_labels(num_images, num_classes)


class DiffusionImageSource:
    """Generates a trial's images in memory from a checkpoint of the stage being tuned.

    "enc": class-encoder checkpoint `enc_epoch` (for `tiny`, whose "enc" stage also
    trains the UNet from scratch, that checkpoint's UNet too). "dif": fine-tuned UNet
    checkpoint `dif_epoch` with the class-encoder checkpoint its fine-tuning used.
    Images come back at the dataset's native size (antialiased downsizing).

    Args:
        exp, dataset, preset: which checkpoints (Utils.paths.diffusion_checkpoint_dir).
        stage: "enc" or "dif".
        enc_epoch: for "dif", the class-encoder checkpoint (None: the one the
            fine-tuning recorded).
        batch_size: images per sampler call (does not change the images).
        jit_compile: compile the sampling step with XLA.
        sampler: the sampler of a trial whose settings name none (schedulers.SAMPLERS).
        conditioning: the ConditioningSpec the checkpoints must have been trained with (None: theirs).
        timestep_spacing: the sampling timesteps' spacing of a trial whose settings name none
            (None: the checkpoint's).
    """

    def __init__(self, exp, dataset, preset, stage, enc_epoch=None, batch_size=GENERATION_BATCH_SIZE,
                 jit_compile=False, sampler=DEFAULT_SAMPLER, conditioning=None, timestep_spacing=None):
        from Data.registry import get_spec
        from Models.diffusion import checkpoints

        self.exp, self.stage = exp, stage
        self.spec = get_spec(dataset)
        self.preset = preset
        self.enc_epoch = enc_epoch
        self.batch_size = int(batch_size)
        self.jit_compile = bool(jit_compile)
        self.sampler = sampler
        self.conditioning = conditioning
        self.timestep_spacing = timestep_spacing
        self._checkpoints = checkpoints
        self._model = None
        self._loaded = None

    def checkpoint_epochs(self):
        """Epochs with a complete checkpoint of this stage (empty list: none yet)."""
        return self._checkpoints.available_epochs(self.exp, self.spec.name, self.stage)

    def model_for(self, epoch):
        """The generator holding checkpoint `epoch` (loaded once per epoch)."""
        key = (self.stage, int(epoch), self.enc_epoch)
        if self._loaded != key:
            self._model = self._checkpoints.load_for_generation(
                self.exp, self.spec.name, self.preset, self.stage, int(epoch),
                enc_epoch=self.enc_epoch, model=self._model, conditioning=self.conditioning)
            self._loaded = key
        return self._model

    def __call__(self, settings, labels, seed):
        from Data.images import resize_images

        model = self.model_for(settings[CHECKPOINT_PARAM[self.stage]])
        images = model.generate(labels, num_steps=int(settings[STEPS_PARAM]),
                                guidance_scale=float(settings[UGS_PARAM]), seed=seed,
                                batch_size=self.batch_size, jit_compile=self.jit_compile,
                                progress=len(labels) >= 4 * self.batch_size,
                                sampler=settings.get(SAMPLER_PARAM, self.sampler),
                                timestep_spacing=settings.get(SPACING_PARAM, self.timestep_spacing))
        return resize_images(images, self.spec.image_size)
