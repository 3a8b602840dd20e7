"""DDIM sampling with classifier-free guidance: one batched UNet call per step, one compiled loop.

keras-cv's `StableDiffusion.generate_image` calls the UNet twice per step (once
with the unconditional context, once with the conditional one), each through
`predict_on_batch`, and does the DDIM update in eager ops in between. Here one
compiled Keras model, `GuidedDDIM`, runs the whole loop (`keras.ops.fori_loop`,
so no round trip to Python between steps). Each step stacks the unconditional
and conditional halves into one batch of 2B, calls the UNet once, combines

    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)     (keras-cv's convention)

(for a v-prediction UNet the same combination of its two v outputs), turns it into
(x0, eps) (`schedule.split_prediction`; for epsilon x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t))
and applies the DDIM update (eq. 12 of Song et al., with `eta`)

    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z.

`predict_on_batch` lets every backend compile the loop once (XLA with
`jit_compile=True`). The timesteps and alphas are inputs padded to a fixed
length and the number of steps is an input too, so changing the steps, the
guidance scale or the seed never recompiles (only the batch size and, for
eta > 0, the steps do). Timesteps and alphas follow Stable Diffusion's DDIM
config (`Models/diffusion/schedule.py`).

Example:
    >>> sampler = DDIMSampler(unet, timestep_embedding_dim=preset.timestep_embedding_dim)
    >>> latents = sampler.sample(noise, context, uncond_context, num_steps=25, guidance_scale=3.0)
"""

import keras
import numpy as np
from keras import ops

from Models.diffusion.schedule import MAX_INFERENCE_STEPS, NoiseSchedule, split_prediction
from Models.diffusion.unet import timestep_embedding


class GuidedDDIM(keras.Model):
    """The guided DDIM loop as a Keras model (compile it, then `predict_on_batch`).

    Inputs (a dict; every entry has the batch size B first, so data-parallel
    strategies can split it):
        latent          (B, S, S, C)  x_T
        context         (B, L, D)     conditional context
        uncond_context  (B, L, D)     unconditional context
        guidance        (B,)          guidance scale per image
        num_steps       (B,) int      number of steps (the same for every image)
        timestep, alpha_t, alpha_prev, sigma
                        (B, T)        per-step DDIM coefficients (schedule.ddim_coefficients),
                                      padded to any T >= num_steps
        noise           (B, N, S, S, C)  z of step i is noise[:, min(i, N - 1)]; N = 1 of
                                      zeros when eta = 0
    Output: x_0 (B, S, S, C), float32.

    The loop's own arithmetic stays float32 even under a mixed-precision
    policy; only the UNet runs in the compute dtype.

    Args:
        unet: a `build_unet` model, inputs [x, t_emb, context].
        timestep_embedding_dim: width of the sinusoidal embedding the UNet expects.
        clip_sample: clip the predicted x0 to [-1, 1] (diffusers' `clip_sample=True`,
            `use_clipped_model_output=False`). Stable Diffusion's config, and the default, is False.
        prediction_type: what the UNet outputs, "epsilon" (default) or "v_prediction".
    """

    def __init__(self, unet, timestep_embedding_dim=320, clip_sample=False, prediction_type="epsilon",
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.unet = unet
        self.timestep_embedding_dim = int(timestep_embedding_dim)
        self.clip_sample = bool(clip_sample)
        self.prediction_type = prediction_type

    def guided_step(self, latent, timestep, contexts, guidance, alpha_t, alpha_prev, sigma, noise):
        """One step: x_t -> x_prev. Per-image scalars are (B,); `contexts` is [uncond; cond]."""
        t_emb = timestep_embedding(timestep, self.timestep_embedding_dim)
        # One UNet call on [unconditional half; conditional half].
        output = self.unet([ops.concatenate([latent, latent], axis=0),
                           ops.concatenate([t_emb, t_emb], axis=0), contexts])
        out_uncond, out_cond = ops.split(ops.cast(output, "float32"), 2, axis=0)

        def per_image(value):  # (B,) -> (B, 1, 1, 1)
            return ops.reshape(ops.cast(value, "float32"), (-1, 1, 1, 1))

        guided = out_uncond + per_image(guidance) * (out_cond - out_uncond)
        alpha_t, alpha_prev, sigma = per_image(alpha_t), per_image(alpha_prev), per_image(sigma)
        x0, eps = split_prediction(self.prediction_type, guided, latent, alpha_t)
        if self.clip_sample:
            x0 = ops.clip(x0, -1.0, 1.0)
        direction = ops.sqrt(ops.maximum(1.0 - alpha_prev - sigma ** 2, 0.0)) * eps
        return ops.sqrt(alpha_prev) * x0 + direction + sigma * ops.cast(noise, "float32")

    def call(self, inputs):
        latent = ops.cast(inputs["latent"], "float32")
        contexts = ops.concatenate([inputs["uncond_context"], inputs["context"]], axis=0)
        noise = inputs["noise"]
        last_noise = ops.shape(noise)[1] - 1

        def body(i, x):
            def column(name):
                return ops.take(inputs[name], i, axis=1)

            z = ops.take(noise, ops.minimum(i, last_noise), axis=1)
            return self.guided_step(x, column("timestep"), contexts, inputs["guidance"],
                                    column("alpha_t"), column("alpha_prev"), column("sigma"), z)

        return ops.fori_loop(0, ops.cast(inputs["num_steps"][0], "int32"), body, latent)

    def get_config(self):
        return {"unet": keras.saving.serialize_keras_object(self.unet),
                "timestep_embedding_dim": self.timestep_embedding_dim,
                "clip_sample": self.clip_sample, "prediction_type": self.prediction_type, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["unet"] = keras.saving.deserialize_keras_object(config["unet"])
        return cls(**config)


class DDIMSampler:
    """Runs `GuidedDDIM` over Stable Diffusion's DDIM timesteps.

    Args:
        unet: a `build_unet` model (inputs [x, t_emb, context]).
        schedule: a `NoiseSchedule` (default: SD's scaled_linear, 1000 steps, epsilon); its
            prediction type and timestep spacing apply.
        timestep_embedding_dim: the preset's `timestep_embedding_dim`.
        jit_compile: compile the loop with XLA.
        clip_sample: clip the predicted x0 to [-1, 1] (see GuidedDDIM).

    Example:
        >>> sampler = DDIMSampler(unet, timestep_embedding_dim=64)
        >>> x0 = sampler.sample(np.random.default_rng(0).standard_normal((4, 8, 8, 3)),
        ...                     context, uncond_context, num_steps=20, guidance_scale=2.0)
    """

    def __init__(self, unet, schedule=None, timestep_embedding_dim=320, jit_compile=False, clip_sample=False):
        self.schedule = schedule or NoiseSchedule()
        self.model = GuidedDDIM(unet, timestep_embedding_dim, clip_sample=clip_sample,
                                prediction_type=self.schedule.prediction_type, name="guided_ddim")
        self.model.compile(jit_compile=bool(jit_compile))

    def sample(self, noise, context, uncond_context, num_steps, guidance_scale, eta=0.0, step_noise=None):
        """Denoises `noise` (B, S, S, C) into x_0 (NumPy float32, same shape).

        Args:
            noise: the initial x_T, (B, S, S, C).
            context: (B, L, D) conditional contexts.
            uncond_context: (B, L, D) or (1, L, D) unconditional context.
            num_steps: number of DDIM steps (1..999).
            guidance_scale: a float, or (B,) per image; 1.0 = conditional only, 0 = unconditional.
            eta: DDIM eta; 0 is deterministic.
            step_noise: callable(step_index) -> (B, S, S, C) standard normal noise for eta > 0,
                called for the steps in order (default: NumPy noise seeded by the step index;
                `ClassConditionalGenerator` ties it to each image instead).
        """
        latent = np.asarray(noise, dtype="float32")
        batch = latent.shape[0]
        timesteps, alpha_t, alpha_prev, sigma = self.schedule.ddim_coefficients(num_steps, eta)
        steps = len(timesteps)
        context = ops.convert_to_tensor(context)
        uncond_context = ops.convert_to_tensor(uncond_context)
        if uncond_context.shape[0] != batch:
            uncond_context = ops.repeat(uncond_context[:1], batch, axis=0)

        def table(values, fill):  # (steps,) -> (B, MAX) padded: one shape for every step count
            padded = np.full(MAX_INFERENCE_STEPS, fill, dtype="float32")
            padded[:steps] = values
            return np.broadcast_to(padded, (batch, MAX_INFERENCE_STEPS)).copy()

        if np.any(sigma > 0):
            draw = step_noise or (lambda i: np.random.default_rng(i).standard_normal(latent.shape))
            z = np.stack([np.asarray(draw(i), dtype="float32") for i in range(steps)], axis=1)
        else:
            z = np.zeros((batch, 1) + latent.shape[1:], dtype="float32")
        out = self.model.predict_on_batch({
            "latent": latent,
            "context": context,
            "uncond_context": uncond_context,
            "guidance": np.broadcast_to(np.asarray(guidance_scale, dtype="float32"), (batch,)).copy(),
            "num_steps": np.full((batch,), steps, dtype="int32"),
            "timestep": table(timesteps, 0),
            "alpha_t": table(alpha_t, 1),
            "alpha_prev": table(alpha_prev, 1),
            "sigma": table(sigma, 0),
            "noise": z,
        })
        return np.asarray(out, dtype="float32")
