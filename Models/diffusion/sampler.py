"""The guided sampling loop: one batched UNet call per step, one compiled loop, any scheduler.

keras-cv's `StableDiffusion.generate_image` calls the UNet twice per step (once
with the unconditional context, once with the conditional one), each through
`predict_on_batch`, and does the DDIM update in eager ops in between. Here one
compiled Keras model, `GuidedSampler`, runs the whole loop (`keras.ops.fori_loop`,
so no round trip to Python between steps). Each step stacks the unconditional
and conditional halves into one batch of 2B, calls the UNet once, combines

    out = out_uncond + guidance_scale * (out_cond - out_uncond)     (keras-cv's convention)

(epsilon or v, whichever the UNet predicts), turns it into (x0, eps)
(`schedule.split_prediction`) and hands them to the scheduler's update
(`schedulers.py`: DDIM, the paper's, by default; DPM-Solver++, Euler, UniPC). For DDIM

    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z.

`predict_on_batch` lets every backend compile the loop once (XLA with
`jit_compile=True`). The timesteps and the scheduler's per-step coefficients are
inputs padded to a fixed length and the first and last step are inputs too, so
changing the steps, the guidance scale or the seed never recompiles (only the
batch size does). A sampler that draws fresh noise every step (DDIM with eta > 0,
Euler ancestral) gets it from the host `NOISE_CHUNK` steps at a time, one loop
call per chunk with x_t carried over: the noise input keeps one shape whatever
the step count, and holds 10 steps' noise instead of all of them.

Example:
    >>> sampler = DiffusionSampler(unet, schedule, preset.timestep_embedding_dim, sampler="dpmsolver++")
    >>> latents = sampler.sample(noise, context, uncond_context, num_steps=25, guidance_scale=3.0)
"""

import keras
import numpy as np
from keras import ops

from Models.diffusion.schedule import MAX_INFERENCE_STEPS, NoiseSchedule, split_prediction
from Models.diffusion.schedulers import DEFAULT_SAMPLER, make_scheduler
from Models.diffusion.unet import timestep_embedding

# Steps of per-step noise handed to the loop per call (stochastic samplers only).
NOISE_CHUNK = 10


class GuidedSampler(keras.Model):
    """The guided loop over one scheduler as a Keras model (compile it, then `predict_on_batch`).

    Inputs (a dict; every entry has the batch size B first, so data-parallel
    strategies can split it):
        latent          (B, S, S, C)  x_T
        context         (B, L, D)     conditional context
        uncond_context  (B, L, D)     unconditional context
        guidance        (B,)          guidance scale per image
        first_step      (B,) int      the step this call starts at (0 for the whole loop)
        num_steps       (B,) int      the step it stops before (the same for every image)
        timestep, model_alpha, and one entry per name in `scheduler.coefficient_names`
                        (B, T)        the scheduler's per-step tables (`Scheduler.tables`),
                                      padded to any T >= num_steps
        noise           (B, N, S, S, C)  z of step i is noise[:, min(i - first_step, N - 1)];
                                      N = 1 of zeros for a deterministic sampler
    Output: x after step num_steps - 1 (x_0 when num_steps is the step count) (B, S, S, C),
    float32. A call from first_step > 0 starts from `latent` = the previous call's output
    with the scheduler's state at zeros, so only a stateless scheduler (`state_size` 0) may
    be run in chunks.

    The loop's own arithmetic stays float32 even under a mixed-precision
    policy; only the UNet runs in the compute dtype.

    Args:
        unet: a `build_unet` model, inputs [x, t_emb, context].
        scheduler: a `schedulers.Scheduler` (its `step` runs inside the loop).
        timestep_embedding_dim: width of the sinusoidal embedding the UNet expects.
        clip_sample: clip the predicted x0 to [-1, 1] before the update (diffusers' DDIM
            `clip_sample=True`, `use_clipped_model_output=False`). Stable Diffusion's config,
            and the default, is False.
        prediction_type: what the UNet outputs, "epsilon" (default) or "v_prediction".
    """

    def __init__(self, unet, scheduler, timestep_embedding_dim=320, clip_sample=False, prediction_type="epsilon",
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.unet = unet
        self.scheduler = scheduler
        self.timestep_embedding_dim = int(timestep_embedding_dim)
        self.clip_sample = bool(clip_sample)
        self.prediction_type = prediction_type

    def guided_prediction(self, latent, timestep, contexts, guidance, model_alpha):
        """(x0, eps) of the guided UNet output at x_t; per-image scalars are (B,); `contexts` is [uncond; cond]."""
        t_emb = timestep_embedding(timestep, self.timestep_embedding_dim)
        # One UNet call on [unconditional half; conditional half].
        output = self.unet([ops.concatenate([latent, latent], axis=0),
                           ops.concatenate([t_emb, t_emb], axis=0), contexts])
        out_uncond, out_cond = ops.split(ops.cast(output, "float32"), 2, axis=0)
        guided = out_uncond + _per_image(guidance) * (out_cond - out_uncond)
        x0, eps = split_prediction(self.prediction_type, guided, latent, _per_image(model_alpha))
        if self.clip_sample:
            x0 = ops.clip(x0, -1.0, 1.0)
        return x0, eps

    def call(self, inputs):
        latent = ops.cast(inputs["latent"], "float32")
        contexts = ops.concatenate([inputs["uncond_context"], inputs["context"]], axis=0)
        noise = inputs["noise"]
        last_noise = ops.shape(noise)[1] - 1
        first_step = ops.cast(inputs["first_step"][0], "int32")

        def body(i, carry):
            x, state = carry[0], tuple(carry[1:])

            def column(name):
                return ops.take(inputs[name], i, axis=1)

            x0, eps = self.guided_prediction(x, column("timestep"), contexts, inputs["guidance"],
                                             column("model_alpha"))
            coefficients = {name: _per_image(column(name)) for name in self.scheduler.coefficient_names}
            z = ops.cast(ops.take(noise, ops.minimum(i - first_step, last_noise), axis=1), "float32")
            # The update's terms that do not read the UNet's output (sample, state, noise times their
            # coefficients) would run beside the UNet, and with that TensorFlow's CPU kernels change
            # the UNet's last bits from call to call at large batches: same seed, other images.
            coefficients, x, state, z = _after((x0, eps), (coefficients, x, state, z))
            x, state = self.scheduler.step(coefficients, x, x0, eps, state, z)
            return (x,) + tuple(state)

        # The state (earlier x0s, the previous sample) starts as zeros; a step reads it only once written.
        carry = (latent,) + tuple(ops.zeros_like(latent) for _ in range(self.scheduler.state_size))
        return ops.fori_loop(first_step, ops.cast(inputs["num_steps"][0], "int32"), body, carry)[0]

    def get_config(self):
        return {"unet": keras.saving.serialize_keras_object(self.unet), "sampler": self.scheduler.name,
                "schedule": self.scheduler.schedule.config(), "timestep_embedding_dim": self.timestep_embedding_dim,
                "clip_sample": self.clip_sample, "prediction_type": self.prediction_type, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        unet = keras.saving.deserialize_keras_object(config.pop("unet"))
        scheduler = make_scheduler(config.pop("sampler"), NoiseSchedule(**config.pop("schedule")))
        return cls(unet, scheduler, **config)


def _per_image(value):  # (B,) -> (B, 1, 1, 1)
    return ops.reshape(ops.cast(value, "float32"), (-1, 1, 1, 1))


def _after(dependencies, values):
    """`values` unchanged, computed only once `dependencies` are (TensorFlow's graph runs independent
    operations concurrently; the other backends' compiled loops are left as they are)."""
    if keras.backend.backend() != "tensorflow":
        return values
    import tensorflow as tf

    with tf.control_dependencies(tf.nest.flatten(dependencies)):
        return tf.nest.map_structure(tf.identity, values)


class DiffusionSampler:
    """Runs `GuidedSampler` with one scheduler's tables (`schedulers.SAMPLERS`).

    Args:
        unet: a `build_unet` model (inputs [x, t_emb, context]).
        schedule: a `NoiseSchedule` (default: SD's scaled_linear, 1000 steps, epsilon); its
            prediction type and timestep spacing apply.
        timestep_embedding_dim: the preset's `timestep_embedding_dim`.
        jit_compile: compile the loop with XLA.
        clip_sample: clip the predicted x0 to [-1, 1] (see GuidedSampler).
        sampler: a name in `schedulers.SAMPLERS` ("ddim", the paper's, by default).

    Example:
        >>> sampler = DiffusionSampler(unet, timestep_embedding_dim=64, sampler="unipc")
        >>> x0 = sampler.sample(np.random.default_rng(0).standard_normal((4, 8, 8, 3)),
        ...                     context, uncond_context, num_steps=20, guidance_scale=2.0)
    """

    def __init__(self, unet, schedule=None, timestep_embedding_dim=320, jit_compile=False, clip_sample=False,
                 sampler=DEFAULT_SAMPLER):
        self.schedule = schedule or NoiseSchedule()
        self.scheduler = make_scheduler(sampler, self.schedule)
        self.model = GuidedSampler(unet, self.scheduler, timestep_embedding_dim, clip_sample=clip_sample,
                                   prediction_type=self.schedule.prediction_type,
                                   name=f"guided_{self.scheduler.name}".replace("+", "p"))
        self.model.compile(jit_compile=bool(jit_compile))

    def inputs(self, noise, context, uncond_context, num_steps, guidance_scale, eta=0.0, step_noise=None,
               timestep_spacing=None):
        """The loop's input dict for `self.model.predict_on_batch`, all steps in one call
        (see `sample` for the arguments)."""
        inputs, tables = self._inputs_without_noise(noise, context, uncond_context, num_steps, guidance_scale, eta,
                                                    timestep_spacing)
        if tables.stochastic:
            steps = len(tables.timesteps)
            inputs["noise"] = _step_noise(step_noise, inputs["latent"].shape, 0, steps, steps)
        return inputs

    def tables(self, num_steps, eta=0.0, timestep_spacing=None):
        """The scheduler's `StepTables` for one call; `timestep_spacing` overrides the schedule's.

        Only these host-side tables depend on the spacing (the compiled loop reads
        them as inputs), so another spacing needs no new loop.
        """
        scheduler = self.scheduler
        schedule = self.schedule.with_timestep_spacing(timestep_spacing)
        if schedule is not self.schedule:
            scheduler = make_scheduler(scheduler.name, schedule)
        return scheduler.tables(num_steps, eta)

    def _inputs_without_noise(self, noise, context, uncond_context, num_steps, guidance_scale, eta,
                              timestep_spacing=None):
        """(inputs with zero noise, the scheduler's tables)."""
        latent = np.asarray(noise, dtype="float32")
        batch = latent.shape[0]
        tables = self.tables(num_steps, eta, timestep_spacing)
        if tables.initial_scale != 1.0:
            latent = latent * np.float32(tables.initial_scale)
        steps = len(tables.timesteps)
        context = ops.convert_to_tensor(context)
        uncond_context = ops.convert_to_tensor(uncond_context)
        if uncond_context.shape[0] != batch:
            uncond_context = ops.repeat(uncond_context[:1], batch, axis=0)

        def table(values, fill):  # (steps,) -> (B, MAX) padded: one shape for every step count
            padded = np.full(MAX_INFERENCE_STEPS, fill, dtype="float32")
            padded[:steps] = values
            return np.broadcast_to(padded, (batch, MAX_INFERENCE_STEPS)).copy()

        inputs = {
            "latent": latent,
            "context": context,
            "uncond_context": uncond_context,
            "guidance": np.broadcast_to(np.asarray(guidance_scale, dtype="float32"), (batch,)).copy(),
            "first_step": np.zeros((batch,), dtype="int32"),
            "num_steps": np.full((batch,), steps, dtype="int32"),
            "timestep": table(tables.timesteps, 0),
            "model_alpha": table(tables.model_alpha, 1),
            "noise": np.zeros((batch, 1) + latent.shape[1:], dtype="float32"),
        }
        for name in self.scheduler.coefficient_names:
            inputs[name] = table(tables.coefficients[name], 0)
        return inputs, tables

    def sample(self, noise, context, uncond_context, num_steps, guidance_scale, eta=0.0, step_noise=None,
               timestep_spacing=None):
        """Denoises `noise` (B, S, S, C) into x_0 (NumPy float32, same shape).

        Args:
            noise: standard normal (B, S, S, C); x_T is noise times the scheduler's initial scale
                (1 but for the Euler schedulers' linspace / trailing spacing, see schedulers.py).
            context: (B, L, D) conditional contexts.
            uncond_context: (B, L, D) or (1, L, D) unconditional context.
            num_steps: number of steps (1..999).
            guidance_scale: a float, or (B,) per image; 1.0 = conditional only, 0 = unconditional.
            eta: DDIM eta; 0 is deterministic (the other samplers take 0 only).
            step_noise: callable(step_index) -> (B, S, S, C) standard normal noise for a sampler
                that draws per-step noise (DDIM with eta > 0, Euler ancestral), called for the
                steps in order (default: NumPy noise seeded by the step index;
                `ClassConditionalGenerator` ties it to each image instead).
            timestep_spacing: "leading", "trailing" or "linspace" (default None: the schedule's,
                i.e. the one the checkpoint records).
        """
        inputs, tables = self._inputs_without_noise(noise, context, uncond_context, num_steps, guidance_scale, eta,
                                                    timestep_spacing)
        steps = len(tables.timesteps)
        # A stateless sampler that draws per-step noise gets it NOISE_CHUNK steps per call; the rest, one call.
        chunk = NOISE_CHUNK if tables.stochastic and not self.scheduler.state_size else steps
        x = inputs["latent"]
        for first in range(0, steps, chunk):
            last = min(first + chunk, steps)
            inputs.update(latent=x, first_step=np.full_like(inputs["first_step"], first),
                          num_steps=np.full_like(inputs["num_steps"], last))
            if tables.stochastic:
                inputs["noise"] = _step_noise(step_noise, x.shape, first, last, chunk)
            x = np.asarray(self.model.predict_on_batch(inputs), dtype="float32")
        return x


def _step_noise(draw, shape, first, last, length):
    """(B, length, S, S, C): draw(i) for steps first..last - 1, zeros after (never read)."""
    draw = draw or (lambda i: np.random.default_rng(i).standard_normal(shape))
    z = np.zeros((shape[0], length) + tuple(shape[1:]), dtype="float32")
    for k, i in enumerate(range(first, last)):
        z[:, k] = np.asarray(draw(i), dtype="float32")
    return z


class DDIMSampler(DiffusionSampler):
    """`DiffusionSampler` with DDIM, the paper's sampler."""

    def __init__(self, unet, schedule=None, timestep_embedding_dim=320, jit_compile=False, clip_sample=False):
        super().__init__(unet, schedule, timestep_embedding_dim, jit_compile, clip_sample, sampler="ddim")
