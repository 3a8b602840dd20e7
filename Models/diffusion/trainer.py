"""Training class-conditional Stable Diffusion with Keras' `fit`: `DiffusionTrainer`.

The paper's two training stages (PAPER.md, stages 1 and 3) are two settings of
one trainer:

- stage "enc": only the class encoder trains; the pretrained UNet and the
  autoencoder are frozen. For presets without pretrained weights (`tiny`,
  `small`) the "enc" stage trains the UNet from scratch together with the
  class encoder: a documented stand-in for Stable Diffusion's pretraining,
  so that the two-stage pipeline runs end to end on a CPU.
- stage "dif": the UNet is fine-tuned with the (chosen) class encoder frozen; with LoRA
  adapters added to the UNet (lora.py, `--unet_tuning lora`) only the adapters train.

Training objective (both stages): images / 127.5 - 1 (pixel presets keep the
dataset's channels: one for grey data), for latent presets encoded by the frozen
image encoder (latents x 0.18215 inside it), noised at timesteps uniform in
[0, 1000) with the trainer's `NoiseSchedule`; the loss is the MSE between the UNet's
output and its target (the noise for epsilon-prediction, as the paper; v for
v-prediction), each image weighted by min-SNR-gamma when `snr_gamma` > 0. With
`cond_dropout` p > 0 a label is replaced by the all-zero vector with probability
p (classifier-free-guidance training: it trains the unconditional context that
guidance extrapolates from; default 0 for the sd presets, as the paper).

Training runs through Keras' own `fit` on every backend: `call` draws the noise
and timesteps and returns (output, target, weight), `compute_loss` reduces them,
so TensorFlow, JAX and PyTorch each use their own stock train step. An
exponential moving average of the trained weights (`make_optimizer(ema_decay=)`,
optimizer.py) lives in the optimizer; checkpoints hold the average, which is what
samples (`sampling_weights`).

The networks are the trainer's `backbone` (backbone.py); its `generator`
(generator.py) samples with them, so a trainer also `generate`s.

Example:
    >>> trainer = DiffusionTrainer.from_preset("tiny", num_classes=10, image_size=8, stage="enc")
    >>> trainer.compile(optimizer=make_optimizer(1e-3, total_steps=300, ema_decay=0.999))
    >>> trainer.fit(TrainBatches(x_train, y_train, batch_size=64, image_size=8), epochs=10)
    >>> with trainer.sampling_weights():
    ...     images = trainer.generate(labels=[0, 0, 1, 1], num_steps=25, guidance_scale=3.0, seed=0)
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops

from Models.diffusion import lora
from Models.diffusion.backbone import ClassConditionalBackbone
from Models.diffusion.generator import ClassConditionalGenerator, schedule_for
from Models.diffusion.optimizer import ema_optimizer
from Models.diffusion.presets import STAGES
from Utils.runtime import keep_tensor_buffers_on_heap



class DiffusionTrainer(keras.Model):
    """Trains a `ClassConditionalBackbone` with `fit((images, labels))`: what the stage trains, with
    Keras' stock train step on any backend.

    Args:
        backbone: the `ClassConditionalBackbone` to train.
        stage: "enc" (train the class encoder; presets without pretrained weights: + the UNet
            from scratch) or "dif" (fine-tune the UNet, class encoder frozen).
        cond_dropout: probability of training on the all-zero (unconditional) label
            (None: the preset's).
        snr_gamma: min-SNR-gamma loss weighting; 0 is plain MSE (None: the preset's).
        schedule: the `NoiseSchedule` (None: the preset's recipe).
        seed: seed of the training noise, timesteps and label dropout (`seed_generator`).

    Attributes:
        backbone: the networks; `unet`, `class_encoder`, `image_encoder`, `image_decoder`,
            `preset`, `num_classes`, `image_size`, ... read through to it.
        generator: a `ClassConditionalGenerator` over the same backbone and schedule;
            `generate`, `generate_batches`, `sampler`, `contexts` delegate to it.
        stage: the current stage (`set_stage`).
        seed_generator: the `keras.random.SeedGenerator` of the training draws.

    Example:
        >>> backbone = ClassConditionalBackbone("sd1", num_classes=5, image_size=128)
        >>> load_pretrained_weights(backbone.unet, "unet_sd1")           # Models/diffusion/weights.py
        >>> trainer = DiffusionTrainer(backbone, stage="enc")
        >>> trainer.compile(optimizer=make_optimizer(1e-4, total_steps=1000))
        >>> trainer.fit(TrainBatches(x_train, y_train, batch_size=64, image_size=128), epochs=50)
    """

    def __init__(self, backbone, stage="enc", cond_dropout=None, snr_gamma=None, schedule=None, seed=0, **kwargs):
        kwargs.setdefault("name", "diffusion_trainer")
        super().__init__(**kwargs)
        self.backbone = backbone
        preset = backbone.preset
        self.cond_dropout = float(preset.cond_dropout if cond_dropout is None else cond_dropout)
        self.snr_gamma = float(preset.snr_gamma if snr_gamma is None else snr_gamma)
        self.generator = ClassConditionalGenerator(backbone, schedule or schedule_for(preset))
        self.seed_generator = keras.random.SeedGenerator(int(seed), name="training_noise")
        self.squared_error = keras.losses.MeanSquaredError(name="diffusion_mse")
        self.set_stage(stage)
        self.built = True

    @classmethod
    def from_preset(cls, preset, num_classes, image_size, stage="enc", cond_dropout=None, seed=0,
                    unet=None, class_encoder=None, image_encoder=None, image_decoder=None,
                    snr_gamma=None, schedule=None, image_channels=3, **kwargs):
        """A trainer over a new `ClassConditionalBackbone(preset, num_classes, image_size, ...)`
        (prebuilt parts are used as they are; the rest are built, with random weights)."""
        backbone = ClassConditionalBackbone(preset, num_classes, image_size, image_channels=image_channels,
                                            unet=unet, class_encoder=class_encoder,
                                            image_encoder=image_encoder, image_decoder=image_decoder)
        return cls(backbone, stage=stage, cond_dropout=cond_dropout, snr_gamma=snr_gamma,
                   schedule=schedule, seed=seed, **kwargs)

    # ----- the backbone's parts and facts, read through ----------------------------------------
    preset = property(lambda self: self.backbone.preset)
    num_classes = property(lambda self: self.backbone.num_classes)
    image_size = property(lambda self: self.backbone.image_size)
    image_channels = property(lambda self: self.backbone.image_channels)
    latent_size = property(lambda self: self.backbone.latent_size)
    unet_channels = property(lambda self: self.backbone.unet_channels)
    unet = property(lambda self: self.backbone.unet)
    class_encoder = property(lambda self: self.backbone.class_encoder)
    conditioning = property(lambda self: self.backbone.conditioning)
    image_encoder = property(lambda self: self.backbone.image_encoder)
    image_decoder = property(lambda self: self.backbone.image_decoder)

    @property
    def schedule(self):
        """The `NoiseSchedule` trained with (and sampled with, by `generator`)."""
        return self.generator.schedule

    def encode_images(self, images):
        """uint8-valued images (B, S, S, 3) -> the UNet's x_0 (`ClassConditionalBackbone.encode_images`)."""
        return self.backbone.encode_images(images)

    # ----- what trains ---------------------------------------------------------------------
    def set_stage(self, stage):
        """Chooses what trains: see the module docstring. Compile after calling this."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        conditioning = self.backbone.conditioning
        # Only the method's own weights train with it (the CLIP text encoder stays frozen).
        conditioning.trainable = stage == "enc"
        for part in conditioning.trained_parts().values():
            part.trainable = stage == "enc"
        if getattr(conditioning, "text_encoder", None) is not None:
            conditioning.text_encoder.trainable = False
        # tiny/small: no pretrained UNet, so it trains from scratch in the enc stage (stand-in for pretraining).
        self.unet.trainable = stage == "dif" or not self.preset.pretrained
        if stage == "dif" and lora.has_adapters(self.unet):
            lora.freeze_base_weights(self.unet)  # LoRA fine-tuning: only the adapters train
        self.backbone.freeze_autoencoder()

    def trained_parts(self):
        """{name: layer} of the parts this stage trains (what its checkpoints hold): in "dif" with
        LoRA adapters (lora.py), the adapters alone."""
        if self.stage == "dif":
            if lora.has_adapters(self.unet):
                return {lora.ADAPTERS_PART: lora.Adapters(self.unet)}
            return {"unet": self.unet}
        parts = dict(self.backbone.conditioning.trained_parts())
        if not self.preset.pretrained:
            parts["unet"] = self.unet
        return parts

    # ----- the loss ------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """One training draw: (images, labels) -> (UNet output, its target, per-image loss weight).

        Noise, timesteps and label dropout come from `seed_generator`, so Keras' stock train
        step of every backend (JAX's stateless one included) trains this model.
        """
        images, labels = inputs
        schedule = self.schedule
        x0 = ops.stop_gradient(self.backbone.encode_images(images))
        batch = ops.shape(x0)[0]
        noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator)
        timesteps = keras.random.randint((batch,), 0, schedule.num_train_timesteps,
                                         dtype="int32", seed=self.seed_generator)
        x_t = schedule.add_noise(x0, noise, timesteps)
        keep = None
        if self.cond_dropout > 0:
            # Classifier-free-guidance training: some images get the unconditional context.
            keep = keras.random.uniform((batch, 1), seed=self.seed_generator) >= self.cond_dropout
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
        context = self.backbone.conditioning.training_context(labels, keep, self.seed_generator, training=training)
        output = self.backbone.predict(x_t, timesteps, context, training=training)
        target = schedule.training_target(x0, noise, timesteps)
        if self.snr_gamma > 0:
            weight = schedule.snr_weights(timesteps, self.snr_gamma)
        else:
            weight = ops.ones((batch,), "float32")
        return output, target, weight

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The weighted MSE of `call`'s draw (Keras' MSE: averaged, scaled for data parallelism)."""
        output, target, weight = y_pred
        # The MSE reduces the channel axis; the per-image weight broadcasts over the pixels.
        return self.squared_error(target, output, sample_weight=ops.reshape(weight, (-1, 1, 1)))

    def diffusion_loss(self, images, labels, training=True):
        """The training loss of one draw on (images, labels), outside `fit`."""
        return self.compute_loss(y_pred=self((images, labels), training=training))

    # ----- sampling ------------------------------------------------------------------------
    def sampling_weights(self):
        """A context in which the backbone holds the weights it samples with: the moving average
        when the optimizer keeps one, else its own weights (checkpoints and sample grids use it)."""
        ema = self._ema_optimizer()
        return ema.averaged_weights(self.trainable_variables) if ema else contextlib.nullcontext()

    def sampling_values(self, variables):
        """What `variables` hold within `sampling_weights`, as NumPy arrays (one at a time), with
        nothing swapped in.

        A checkpoint's weights file needs these values every epoch; swapping the averages in and out
        copies every trained weight twice more (for sd1, 3.4 GB each way).
        """
        ema = self._ema_optimizer()
        averages = {}
        if ema:
            trainable = self.trainable_variables
            averages = {id(variable): average for variable, average in zip(trainable, ema.moving_averages(trainable))}
        return (keras.ops.convert_to_numpy(averages.get(id(variable), variable)) for variable in variables)

    def _ema_optimizer(self):
        """The optimizer's moving average of the weights, or None (none kept, or not compiled yet)."""
        return ema_optimizer(self.optimizer) if getattr(self, "optimizer", None) is not None else None

    @property
    def clip_sample(self):
        """The generator's `clip_sample` (default False)."""
        return self.generator.clip_sample

    @clip_sample.setter
    def clip_sample(self, value):
        self.generator.clip_sample = bool(value)

    def sampler(self, jit_compile=False):
        """`ClassConditionalGenerator.sampler`."""
        return self.generator.sampler(jit_compile)

    def contexts(self, labels, indices=None, seed=0):
        """`ClassConditionalGenerator.contexts`."""
        return self.generator.contexts(labels, indices, seed)

    def generate(self, *args, **kwargs):
        """`ClassConditionalGenerator.generate` with the weights as they are (see `sampling_weights`)."""
        return self.generator.generate(*args, **kwargs)

    def generate_batches(self, *args, **kwargs):
        """`ClassConditionalGenerator.generate_batches` with the weights as they are."""
        return self.generator.generate_batches(*args, **kwargs)


class TrainBatches(keras.utils.PyDataset):
    """Shuffled (images, labels) batches, resized to the model's image size, for `fit`.

    Each item is `((images, labels),)`: the pair is the model's input (Keras reads a
    one-element tuple as x alone), since `call` draws the noise and the targets itself.

    The order of epoch e is a permutation seeded by (seed, e), so a run resumed
    at epoch e sees the same batches as an uninterrupted one when the epoch is set
    by `callbacks.EpochSeeds` and `fit` does not reshuffle (`shuffle=False`: Keras
    would permute the batches with the process's global random state). With
    `random_flip`, each image is mirrored left-right in epoch e with probability 1/2,
    drawn per image from (seed, e) too, so a resumed run sees the same images. With
    `balanced_sampling`, epoch e is instead N images drawn with replacement from (seed, e),
    each with probability 1 / (C * its class's count): every class equally likely, as
    PyTorch's `WeightedRandomSampler` with weights 1 / class count. Images stay uint8 until
    the model scales them.

    Example:
        >>> batches = TrainBatches(x_train, y_train, batch_size=64, image_size=128, seed=0)
        >>> model.fit(batches, epochs=10, shuffle=False, callbacks=[EpochSeeds(model, 0, batches)])
    """

    def __init__(self, images, labels, batch_size, image_size, seed=0, epoch=0, random_flip=False,
                 balanced_sampling=False, **kwargs):
        super().__init__(**kwargs)
        keep_tensor_buffers_on_heap()
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, np.int64).reshape(-1)
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.sampling_weights = None
        if balanced_sampling:
            _, index, counts = np.unique(self.labels, return_inverse=True, return_counts=True)
            self.sampling_weights = 1.0 / (len(counts) * counts[index])
        self.set_epoch(epoch)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        self.order = (rng.permutation(n) if self.sampling_weights is None
                      else rng.choice(n, size=n, p=self.sampling_weights))
        # Its own stream, so the order is the same with and without flips.
        self.flipped = (np.random.default_rng([self.seed, self.epoch, 1]).random(n) < 0.5
                        if self.random_flip else None)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, i):
        from Data.images import resize_images

        chosen = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.images[chosen]  # a copy: fancy indexing
        if self.flipped is not None:
            mirrored = self.flipped[chosen]
            images[mirrored] = images[mirrored][:, :, ::-1]
        if images.shape[1] != self.image_size:
            images = resize_images(images, self.image_size)
        return ((images, self.labels[chosen]),)

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)
