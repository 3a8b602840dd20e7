"""Class labels -> images: guided sampling (DDIM by default) over a `ClassConditionalBackbone`.

The initial noise of each image is a function of (seed, class, index within class)
only, so shards, batch sizes and resumed runs give identical images
(`initial_noise`); a sampler that draws per-step noise (DDIM with eta > 0, Euler
ancestral) continues each image's own generator. The sampling loop itself is
`DiffusionSampler` (sampler.py), its update rules `schedulers.SAMPLERS`.

Example:
    >>> generator = ClassConditionalGenerator(backbone, schedule_for(backbone.preset))
    >>> images = generator.generate([0, 0, 1, 1], num_steps=25, guidance_scale=3.0, seed=0)
    >>> images.dtype, images.shape
    (dtype('uint8'), (4, 8, 8, 3))
"""

import numpy as np
from tqdm.auto import tqdm

from Models.diffusion.sampler import DiffusionSampler
from Models.diffusion.schedule import NoiseSchedule
from Models.diffusion.schedulers import DEFAULT_SAMPLER


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


class ClassConditionalGenerator:
    """Generates class-conditional uint8 images with a backbone and its noise schedule.

    Args:
        backbone: the `ClassConditionalBackbone` (its weights are used as they are when sampling).
        schedule: the `NoiseSchedule` the UNet was trained with (None: the preset's recipe).
        clip_sample: clip the predicted x0 to [-1, 1] (default False, Stable Diffusion's config;
            measured on digits with tiny, clipping makes the samples worse, BENCHMARKS.md).
        origin: where the backbone's weights came from, for whoever loaded them (public attribute;
            `Models.diffusion.checkpoints` records a `WeightsOrigin` and reloads a generator in place
            when its origin fits); None when not recorded.

    Example:
        >>> generator = ClassConditionalGenerator(backbone)
        >>> for chunk, images in generator.generate_batches(labels, num_steps=25, seed=0, batch_size=64):
        ...     save(images, labels[chunk])
    """

    def __init__(self, backbone, schedule=None, clip_sample=False, origin=None):
        self.backbone = backbone
        self.schedule = schedule or schedule_for(backbone.preset)
        self.clip_sample = bool(clip_sample)
        self.origin = origin
        self._sampler = None
        self._sampler_key = None

    # The backbone's facts, for callers that only hold the generator.
    @property
    def preset(self):
        return self.backbone.preset

    @property
    def num_classes(self):
        return self.backbone.num_classes

    @property
    def image_size(self):
        return self.backbone.image_size

    @property
    def image_channels(self):
        return self.backbone.image_channels

    def sampler(self, jit_compile=False, name=DEFAULT_SAMPLER):
        """The sampler `name` over the backbone's UNet (built once per jit / clip / sampler setting)."""
        clip = bool(self.clip_sample)
        key = (bool(jit_compile), clip, name)
        if self._sampler is None or self._sampler_key != key:
            self._sampler = DiffusionSampler(self.backbone.unet, self.schedule, self.preset.timestep_embedding_dim,
                                             jit_compile=jit_compile, clip_sample=clip, sampler=name)
            self._sampler_key = key
        return self._sampler

    def contexts(self, labels, indices=None, seed=0):
        """Conditional contexts (B, L, D) for integer labels, and the unconditional one (1, L, D)."""
        return self.backbone.contexts(labels, indices=indices, seed=seed)

    def generate(self, labels, num_steps=None, guidance_scale=None, seed=0, eta=0.0, batch_size=64,
                 indices=None, jit_compile=False, progress=False, sampler=DEFAULT_SAMPLER, timestep_spacing=None):
        """Class-conditional images, uint8 (N, image_size, image_size, 3); grey data: three equal channels.

        Args:
            labels: (N,) integer class labels.
            num_steps: sampling steps (default: the preset's `default_inference_steps`).
            guidance_scale: classifier-free guidance scale (default: the preset's).
            seed: with (label, index within class), fixes each image's noise.
            eta: DDIM eta (0 = deterministic DDIM).
            batch_size: images per sampler call (does not change the images).
            indices: (N,) index of each image within its class (default: its rank among the
                same labels in `labels`). Shards of one data set pass their global indices.
            jit_compile: compile the sampling step with XLA.
            progress: a tqdm bar over the images.
            sampler: a name in `schedulers.SAMPLERS` (default "ddim", the paper's).
            timestep_spacing: where the sampling timesteps fall, "leading", "trailing" or "linspace"
                (default None: the schedule's, the one the model was trained with).
        """
        labels = np.asarray(labels, np.int64).reshape(-1)
        out = np.empty((len(labels), self.image_size, self.image_size, 3), np.uint8)
        for chunk, images in self.generate_batches(labels, num_steps, guidance_scale, seed, eta,
                                                   batch_size, indices, jit_compile, progress, sampler,
                                                   timestep_spacing):
            out[chunk] = images
        return out

    def generate_batches(self, labels, num_steps=None, guidance_scale=None, seed=0, eta=0.0,
                         batch_size=64, indices=None, jit_compile=False, progress=False, sampler=DEFAULT_SAMPLER,
                         timestep_spacing=None):
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
        loop = self.sampler(jit_compile, sampler)
        shape = self.backbone.noise_shape
        size = max(1, min(int(batch_size), len(labels)))
        with tqdm(total=len(labels), desc="generating", unit="img", disable=not progress) as bar:
            for start in range(0, len(labels), size):
                chunk = slice(start, min(start + size, len(labels)))
                n = chunk.stop - chunk.start
                noise, generators = initial_noise(seed, labels[chunk], indices[chunk], shape)
                pad = size - n
                batch_labels = np.concatenate([labels[chunk], np.zeros(pad, np.int64)])
                batch_indices = np.concatenate([indices[chunk], np.zeros(pad, np.int64)])
                noise = np.concatenate([noise, np.zeros((pad,) + shape, np.float32)])
                context, uncond = self.contexts(batch_labels, batch_indices, seed)

                def step_noise(_, generators=generators, pad=pad):
                    z = [g.standard_normal(shape, dtype=np.float32) for g in generators]
                    return np.stack(z + [np.zeros(shape, np.float32)] * pad)

                x0 = loop.sample(noise, context, uncond, num_steps, guidance_scale, eta=eta,
                                 step_noise=step_noise, timestep_spacing=timestep_spacing)
                x0 = self.backbone.decode(x0)
                bar.update(n)
                yield chunk, to_uint8_images(np.asarray(x0)[:n])
