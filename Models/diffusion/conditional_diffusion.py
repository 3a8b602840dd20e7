"""Class-conditional Stable Diffusion: UNet + class encoder (+ frozen autoencoder), trainable with `fit`.

The paper's two training stages (PAPER.md, stages 1 and 3) are two settings of
one model:

- stage "enc": only the class encoder trains; the pretrained UNet and the
  autoencoder are frozen. For the `tiny` preset there are no pretrained
  weights, so its "enc" stage trains the UNet from scratch together with the
  class encoder: a documented stand-in for Stable Diffusion's pretraining,
  so that the two-stage pipeline runs end to end on a CPU.
- stage "dif": the UNet is fine-tuned with the (chosen) class encoder frozen.

Training objective (both stages): images / 127.5 - 1 (pixel presets keep the
dataset's channels: one for grey data), for latent presets encoded by the frozen
image encoder (latents x 0.18215 inside it), noised at timesteps uniform in
[0, 1000) with the model's `NoiseSchedule`; the loss is the MSE between the UNet's
output and its target (the noise for epsilon-prediction, as the paper; v for
v-prediction), each image weighted by min-SNR-gamma when `snr_gamma` > 0. With
`cond_dropout` p > 0 a label is replaced by the all-zero vector with probability
p (classifier-free-guidance training: it trains the unconditional context that
guidance extrapolates from; default 0 for the sd presets, as the paper).

Training runs through Keras' own `fit` on every backend: `call` draws the noise
and timesteps and returns (output, target, weight), `compute_loss` reduces them,
so TensorFlow, JAX and PyTorch each use their own stock train step. An
exponential moving average of the trained weights (`make_optimizer(ema_decay=)`)
lives in the optimizer; checkpoints hold the average, which is what samples.

Generation: DDIM with classifier-free guidance (`Models/diffusion/sampler.py`).
The initial noise of each image is a function of (seed, class, index within
class) only, so shards, batch sizes and resumed runs give identical images.

Example:
    >>> model = ClassConditionalDiffusion("tiny", num_classes=10, image_size=8, stage="enc")
    >>> model.compile(optimizer=make_optimizer(1e-3, total_steps=300, ema_decay=0.999))
    >>> model.fit(TrainBatches(x_train, y_train, batch_size=64, image_size=8), epochs=10)
    >>> images = model.generate(labels=[0, 0, 1, 1], num_steps=25, guidance_scale=3.0, seed=0)
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from Models.diffusion.class_encoder import ClassEncoder
from Models.diffusion.presets import get_preset
from Models.diffusion.sampler import DDIMSampler
from Models.diffusion.schedule import NoiseSchedule
from Models.diffusion.unet import build_unet, timestep_embedding

STAGES = ("enc", "dif")


def make_optimizer(learning_rate, total_steps, ema_decay=0.0, ema_warmup=True):
    """The paper's optimiser for both stages, with an optional moving average of the weights.

    Adam(weight_decay 0.004, epsilon 1e-8, global_clipnorm 10) with the
    learning rate cosine-decayed to 0 over all `total_steps`. Keras' Adam with
    `weight_decay` decays the weights decoupled from the gradient (AdamW-style).
    `ema_decay` > 0 keeps an exponential moving average of the trained weights
    (`AdamWithEMA`); `ema_warmup` for weights that start random (see there).
    """
    schedule = keras.optimizers.schedules.CosineDecay(float(learning_rate), max(1, int(total_steps)))
    if ema_decay:
        return AdamWithEMA(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8, global_clipnorm=10.0,
                           use_ema=True, ema_momentum=float(ema_decay), ema_warmup=bool(ema_warmup))
    return keras.optimizers.Adam(learning_rate=schedule, weight_decay=0.004, epsilon=1e-8,
                                 global_clipnorm=10.0)


@keras.saving.register_keras_serializable(package="sddg")
class AdamWithEMA(keras.optimizers.Adam):
    """Adam with Keras' moving average of the weights, warmed up as diffusers' `EMAModel`.

    The average starts as the weights. With `ema_warmup` its decay at update t is
    min(ema_momentum, (1 + t) / (10 + t)): Keras' own uses ema_momentum from the first
    step, so after a short from-scratch run its average would still hold much of the
    random initialisation. Without (`ema_warmup=False`, for weights loaded from a
    checkpoint that already holds an average, as the fine-tuning stage's) the decay is
    ema_momentum throughout: a warm-up there would forget the good starting point within
    a few steps (digits, `small`'s one fine-tuning epoch: CAS x2 92.8 % with the warm-up,
    95.0 % without, x1 92.2 % both; BENCHMARKS.md). The averages are optimizer variables, so optimizer checkpoints carry them
    and a resumed run continues them exactly.

    Example:
        >>> optimizer = AdamWithEMA(learning_rate=1e-3, use_ema=True, ema_momentum=0.999)
        >>> with optimizer.averaged_weights(model.trainable_variables):
        ...     images = model.generate(labels)      # samples with the average
    """

    def __init__(self, *args, ema_warmup=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_warmup = bool(ema_warmup)

    def get_config(self):
        return {**super().get_config(), "ema_warmup": self.ema_warmup}

    def _update_model_variables_moving_average(self, trainable_variables):
        step = ops.cast(self.iterations, "float32")
        decay = ops.convert_to_tensor(float(self.ema_momentum), "float32")
        if self.ema_warmup:
            decay = ops.minimum(decay, (1.0 + step) / (10.0 + step))
        decay = decay * ops.cast(ops.not_equal(self.iterations, 0), "float32")  # step 0: the average = the weights
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                d = ops.cast(decay, variable.dtype)
                average.assign(d * average + (1.0 - d) * variable)

    def finalize_variable_values(self, var_list):
        # Keras would copy the averages into the weights at the end of `fit`; here the weights
        # stay the trained ones (a later `fit` continues them) and the averages are used
        # explicitly, through `averaged_weights`.
        pass

    def moving_averages(self, variables):
        """The average of each of `variables` (trained by this optimizer), in order."""
        return [self._model_variables_moving_average[self._get_variable_index(v)] for v in variables]

    @contextlib.contextmanager
    def averaged_weights(self, variables):
        """Within the block, `variables` hold their moving averages; afterwards their own values again."""
        variables = list(variables)
        saved = [keras.ops.convert_to_numpy(v) for v in variables]
        for variable, average in zip(variables, self.moving_averages(variables)):
            variable.assign(keras.ops.convert_to_numpy(average))  # a copy: JAX must not alias the two
        try:
            yield
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)


def ema_optimizer(optimizer):
    """The `AdamWithEMA` inside `optimizer` (mixed precision wraps it), or None without an average."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if isinstance(inner, AdamWithEMA) and inner.use_ema else None


def schedule_for(recipe):
    """The `NoiseSchedule` of a recipe (a preset, or a dict with the preset's recipe keys)."""
    recipe = recipe.recipe() if hasattr(recipe, "recipe") else recipe
    return NoiseSchedule(recipe["beta_schedule"], recipe["prediction_type"],
                         recipe["rescale_betas_zero_snr"], recipe["timestep_spacing"])


def initial_noise(seed, labels, indices, shape):
    """The starting noise x_T of each image: a function of (seed, class, index within class).

    Returns the noise (N, *shape) float32 and one NumPy Generator per image
    (already advanced past x_T) for the per-step noise of eta > 0.
    """
    generators = [np.random.default_rng([int(seed), int(label), int(index)])
                  for label, index in zip(labels, indices)]
    noise = np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators]) \
        if generators else np.zeros((0,) + tuple(shape), np.float32)
    return noise, generators


def index_within_class(labels):
    """For each label, how many earlier entries share it: [3, 3, 5, 3] -> [0, 1, 0, 2]."""
    counts = {}
    indices = np.empty(len(labels), np.int64)
    for i, label in enumerate(np.asarray(labels).tolist()):
        indices[i] = counts.get(label, 0)
        counts[label] = indices[i] + 1
    return indices


def to_uint8_images(x):
    """[-1, 1] floats -> uint8 [0, 255], rounded and clipped; one channel becomes three equal ones."""
    images = np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


class ClassConditionalDiffusion(keras.Model):
    """UNet + class encoder (+ frozen image encoder/decoder for latent presets).

    `fit((images, labels))` trains what the stage trains, with Keras' stock train step on
    any backend; `generate` samples class-conditional images.

    Args:
        preset: a preset name or `DiffusionPreset` ("sd1", "sd2", "tiny", "small").
        num_classes: number of classes (width of the one-hot label).
        image_size: image size in pixels (sd presets: 128; pixel presets: the dataset's native size).
        stage: "enc" (train the class encoder; presets without pretrained weights: + the UNet
            from scratch) or "dif" (fine-tune the UNet, class encoder frozen).
        cond_dropout: probability of training on the all-zero (unconditional) label
            (None: the preset's).
        snr_gamma: min-SNR-gamma loss weighting; 0 is plain MSE (None: the preset's).
        schedule: the `NoiseSchedule` (None: the preset's recipe).
        image_channels: the dataset's channels (1 or 3); pixel presets model them.
        seed: seed of the training noise, timesteps and label dropout.
        unet, class_encoder, image_encoder, image_decoder: prebuilt parts (default: built here;
            the autoencoder of latent presets is built on first use).

    Example:
        >>> model = ClassConditionalDiffusion("sd1", num_classes=5, image_size=128)
        >>> load_pretrained_weights(model.unet, "unet_sd1")           # Models/diffusion/weights.py
        >>> model.compile(optimizer=make_optimizer(1e-4, total_steps=1000))
        >>> model.fit(TrainBatches(x_train, y_train, batch_size=64, image_size=128), epochs=50)
    """

    def __init__(self, preset, num_classes, image_size, stage="enc", cond_dropout=None, seed=0,
                 unet=None, class_encoder=None, image_encoder=None, image_decoder=None,
                 snr_gamma=None, schedule=None, image_channels=3, **kwargs):
        kwargs.setdefault("name", "class_conditional_diffusion")
        super().__init__(**kwargs)
        self.preset = get_preset(preset)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.image_channels = int(image_channels)
        self.cond_dropout = float(self.preset.cond_dropout if cond_dropout is None else cond_dropout)
        self.snr_gamma = float(self.preset.snr_gamma if snr_gamma is None else snr_gamma)
        self.schedule = schedule or schedule_for(self.preset)
        self.unet = unet or build_unet(self.preset, self.image_size, self.preset.context_length,
                                       image_channels=self.image_channels)
        self.class_encoder = class_encoder or ClassEncoder(
            self.num_classes, self.preset.context_length, self.preset.context_dim,
            hidden=self.preset.class_encoder_hidden, name="class_encoder")
        if not self.class_encoder.built:
            self.class_encoder.build((None, self.num_classes))
        self._image_encoder = image_encoder
        self._image_decoder = image_decoder
        self.seed_generator = keras.random.SeedGenerator(int(seed), name="training_noise")
        self.squared_error = keras.losses.MeanSquaredError(name="diffusion_mse")
        self._sampler = None
        self._sampler_key = None
        self.clip_sample = False  # see `sampler`
        self.set_stage(stage)
        self.built = True

    # ----- parts -------------------------------------------------------------------------
    @property
    def latent_size(self):
        """Spatial size of the UNet's input: image_size / 8 for latent presets."""
        return self.image_size // self.preset.downsample

    @property
    def image_encoder(self):
        """The frozen autoencoder encoder (latent presets only), built on first use."""
        if not self.preset.latent:
            return None
        if self._image_encoder is None:
            from Models.diffusion.autoencoder import build_image_encoder

            self._image_encoder = build_image_encoder(self.image_size)
        self._image_encoder.trainable = False
        return self._image_encoder

    @property
    def image_decoder(self):
        """The frozen autoencoder decoder (latent presets only), built on first use."""
        if not self.preset.latent:
            return None
        if self._image_decoder is None:
            from Models.diffusion.autoencoder import build_image_decoder

            self._image_decoder = build_image_decoder(self.image_size)
        self._image_decoder.trainable = False
        return self._image_decoder

    def set_stage(self, stage):
        """Chooses what trains: see the module docstring. Compile after calling this."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        if stage == "enc":
            self.class_encoder.trainable = True
            # tiny: no pretrained UNet, so it trains from scratch here (stand-in for pretraining).
            self.unet.trainable = not self.preset.pretrained
        else:
            self.class_encoder.trainable = False
            self.unet.trainable = True
        for part in (self._image_encoder, self._image_decoder):
            if part is not None:
                part.trainable = False

    def trained_parts(self):
        """{name: layer} of the parts this stage trains (what its checkpoints hold)."""
        if self.stage == "dif":
            return {"unet": self.unet}
        parts = {"class_encoder": self.class_encoder}
        if not self.preset.pretrained:
            parts["unet"] = self.unet
        return parts

    # ----- training ----------------------------------------------------------------------
    @property
    def unet_channels(self):
        """Channels the UNet sees: the latents' 4, or the dataset's own (1 grey, 3 RGB)."""
        return self.preset.unet_channels(self.image_channels)

    def call(self, inputs, training=False):
        """One training draw: (images, labels) -> (UNet output, its target, per-image loss weight).

        Noise, timesteps and label dropout come from `seed_generator`, so Keras' stock train
        step of every backend (JAX's stateless one included) trains this model.
        """
        images, labels = inputs
        x0 = ops.stop_gradient(self.encode_images(images))
        batch = ops.shape(x0)[0]
        noise = keras.random.normal(ops.shape(x0), seed=self.seed_generator)
        timesteps = keras.random.randint((batch,), 0, self.schedule.num_train_timesteps,
                                         dtype="int32", seed=self.seed_generator)
        x_t = self.schedule.add_noise(x0, noise, timesteps)
        one_hot = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), self.num_classes)
        if self.cond_dropout > 0:
            # Classifier-free-guidance training: some labels become the all-zero vector.
            keep = keras.random.uniform((batch, 1), seed=self.seed_generator) >= self.cond_dropout
            one_hot = one_hot * ops.cast(keep, one_hot.dtype)
        context = self.class_encoder(one_hot, training=training)
        t_emb = timestep_embedding(timesteps, self.preset.timestep_embedding_dim)
        output = ops.cast(self.unet([x_t, t_emb, context], training=training), "float32")
        target = self.schedule.training_target(x0, noise, timesteps)
        if self.snr_gamma > 0:
            weight = self.schedule.snr_weights(timesteps, self.snr_gamma)
        else:
            weight = ops.ones((batch,), "float32")
        return output, target, weight

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The weighted MSE of `call`'s draw (Keras' MSE: averaged, scaled for data parallelism)."""
        output, target, weight = y_pred
        # The MSE reduces the channel axis; the per-image weight broadcasts over the pixels.
        return self.squared_error(target, output, sample_weight=ops.reshape(weight, (-1, 1, 1)))

    def encode_images(self, images):
        """uint8-valued images (B, S, S, 3) -> the UNet's x_0: pixels in [-1, 1], or latents."""
        x = ops.cast(images, "float32") / 127.5 - 1.0
        if self.preset.latent:
            return ops.cast(self.image_encoder(x, training=False), "float32")
        return x[..., :self.unet_channels]  # grey data arrives as three equal channels

    def sampling_weights(self):
        """A context in which the model holds the weights it samples with: the moving average
        when its optimizer keeps one, else its own weights (checkpoints and sample grids use it)."""
        ema = ema_optimizer(self.optimizer) if getattr(self, "optimizer", None) is not None else None
        return ema.averaged_weights(self.trainable_variables) if ema else contextlib.nullcontext()

    def diffusion_loss(self, images, labels, training=True):
        """The training loss of one draw on (images, labels), outside `fit`."""
        return self.compute_loss(y_pred=self((images, labels), training=training))

    # ----- generation --------------------------------------------------------------------
    def sampler(self, jit_compile=False):
        """The DDIM sampler over this model's UNet (built once per jit setting).

        `self.clip_sample` (default False, Stable Diffusion's config) clips the
        predicted x0 to [-1, 1]. Measured on digits with tiny, clipping makes the
        samples worse (BENCHMARKS.md), so it stays off for tiny too.
        """
        clip = bool(self.clip_sample)
        key = (bool(jit_compile), clip)
        if self._sampler is None or self._sampler_key != key:
            self._sampler = DDIMSampler(self.unet, self.schedule, self.preset.timestep_embedding_dim,
                                        jit_compile=jit_compile, clip_sample=clip)
            self._sampler_key = key
        return self._sampler

    def contexts(self, labels):
        """Conditional contexts (B, L, D) for integer labels, and the unconditional one (1, L, D)."""
        one_hot = ops.one_hot(ops.convert_to_tensor(np.asarray(labels), "int32"), self.num_classes)
        return self.class_encoder(one_hot), self.class_encoder(ops.zeros((1, self.num_classes)))

    def generate(self, labels, num_steps=None, guidance_scale=None, seed=0, eta=0.0, batch_size=64,
                 indices=None, jit_compile=False, progress=False):
        """Class-conditional images, uint8 (N, image_size, image_size, 3); grey data: three equal channels.

        Args:
            labels: (N,) integer class labels.
            num_steps: DDIM steps (default: the preset's `default_inference_steps`).
            guidance_scale: classifier-free guidance scale (default: the preset's).
            seed: with (label, index within class), fixes each image's noise.
            eta: DDIM eta (0 = deterministic DDIM).
            batch_size: images per sampler call (does not change the images).
            indices: (N,) index of each image within its class (default: its rank among the
                same labels in `labels`). Shards of one data set pass their global indices.
            jit_compile: compile the sampling step with XLA.
            progress: a tqdm bar over the images.
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        out = np.empty((len(labels), self.image_size, self.image_size, 3), np.uint8)
        for chunk, images in self.generate_batches(labels, num_steps, guidance_scale, seed, eta,
                                                   batch_size, indices, jit_compile, progress):
            out[chunk] = images
        return out

    def generate_batches(self, labels, num_steps=None, guidance_scale=None, seed=0, eta=0.0,
                         batch_size=64, indices=None, jit_compile=False, progress=False):
        """`generate`, one batch at a time: yields (slice into labels, uint8 images).

        Every sampler call has the same batch size (the last batch is padded and
        the padding dropped), so the step is compiled once and each image is
        computed by the same kernels whichever batch it falls in.
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        indices = index_within_class(labels) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        if len(indices) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(indices)} indices")
        num_steps = self.preset.default_inference_steps if num_steps is None else num_steps
        guidance_scale = self.preset.default_guidance_scale if guidance_scale is None else guidance_scale
        sampler = self.sampler(jit_compile)
        shape = (self.latent_size, self.latent_size, self.unet_channels)
        size = max(1, min(int(batch_size), len(labels)))
        with tqdm(total=len(labels), desc="generating", unit="img", disable=not progress) as bar:
            for start in range(0, len(labels), size):
                chunk = slice(start, min(start + size, len(labels)))
                n = chunk.stop - chunk.start
                noise, generators = initial_noise(seed, labels[chunk], indices[chunk], shape)
                pad = size - n
                batch_labels = np.concatenate([labels[chunk], np.zeros(pad, np.int64)])
                noise = np.concatenate([noise, np.zeros((pad,) + shape, np.float32)])
                context, uncond = self.contexts(batch_labels)

                def step_noise(_, generators=generators, pad=pad):
                    z = [g.standard_normal(shape, dtype=np.float32) for g in generators]
                    return np.stack(z + [np.zeros(shape, np.float32)] * pad)

                x0 = sampler.sample(noise, context, uncond, num_steps, guidance_scale, eta=eta,
                                    step_noise=step_noise)
                if self.preset.latent:
                    x0 = self.image_decoder.predict_on_batch(x0)
                bar.update(n)
                yield chunk, to_uint8_images(np.asarray(x0)[:n])


class TrainBatches(keras.utils.PyDataset):
    """Shuffled (images, labels) batches, resized to the model's image size, for `fit`.

    Each item is `((images, labels),)`: the pair is the model's input (Keras reads a
    one-element tuple as x alone), since `call` draws the noise and the targets itself.

    The order of epoch e is a permutation seeded by (seed, e), so a run resumed
    at epoch e sees the same batches as an uninterrupted one. Images stay uint8
    until the model scales them.

    Example:
        >>> batches = TrainBatches(x_train, y_train, batch_size=64, image_size=128, seed=0)
        >>> model.fit(batches, epochs=10)
    """

    def __init__(self, images, labels, batch_size, image_size, seed=0, epoch=0, **kwargs):
        super().__init__(**kwargs)
        self.images = np.asarray(images)
        self.labels = np.asarray(labels, np.int64).reshape(-1)
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.set_epoch(epoch)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.labels))

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, i):
        from Data.images import resize_images

        chosen = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.images[chosen]
        if images.shape[1] != self.image_size:
            images = resize_images(images, self.image_size)
        return ((images, self.labels[chosen]),)

    def on_epoch_end(self):
        self.set_epoch(self.epoch + 1)
