"""DDIM sampling with classifier-free guidance, one batched UNet call per step.

keras-cv's `StableDiffusion.generate_image` calls the UNet twice per step (once
with the unconditional context, once with the conditional one) and does the
DDIM update in eager ops between the calls. Here one compiled Keras model,
`GuidedDDIMStep`, does a whole step: it stacks the unconditional and
conditional halves into one batch of 2B, calls the UNet once, combines

    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)     (keras-cv's convention)

and applies the DDIM update (eq. 12 of Song et al., with `eta`)

    x0     = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z.

`predict_on_batch` lets every backend compile the step once (XLA with
`jit_compile=True`); the timestep, alphas, guidance scale and noise are inputs,
so changing them never recompiles. Timesteps and alphas follow Stable
Diffusion's DDIM config (`Models/diffusion/schedule.py`).

Example:
    >>> sampler = DDIMSampler(unet, timestep_embedding_dim=preset.timestep_embedding_dim)
    >>> latents = sampler.sample(noise, context, uncond_context, num_steps=25, guidance_scale=3.0)
"""

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from Models.diffusion.schedule import NoiseSchedule
from Models.diffusion.unet import timestep_embedding


class GuidedDDIMStep(keras.Model):
    """One guided DDIM step as a Keras model (compile it, then `predict_on_batch`).

    Inputs (a dict, all with the same batch size B):
        latent          (B, S, S, C)  x_t
        timestep        (B,)          t (integer-valued floats)
        context         (B, L, D)     conditional context
        uncond_context  (B, L, D)     unconditional context
        guidance        (B,)          guidance scale per image
        alpha_t, alpha_prev, sigma (B,)   DDIM coefficients (schedule.ddim_coefficients)
        noise           (B, S, S, C)  z, only used where sigma > 0
    Output: x_prev (B, S, S, C), float32.

    The step's own arithmetic stays float32 even under a mixed-precision
    policy; only the UNet runs in the compute dtype.

    Args:
        unet: a `build_unet` model, inputs [x, t_emb, context].
        timestep_embedding_dim: width of the sinusoidal embedding the UNet expects.
        clip_sample: clip the predicted x0 to [-1, 1] (diffusers' `clip_sample=True`,
            `use_clipped_model_output=False`): for pixel-space models; Stable Diffusion's
            latents are not bounded, so its config (and the default here) is False.
    """

    def __init__(self, unet, timestep_embedding_dim=320, clip_sample=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.unet = unet
        self.timestep_embedding_dim = int(timestep_embedding_dim)
        self.clip_sample = bool(clip_sample)

    def call(self, inputs):
        latent = ops.cast(inputs["latent"], "float32")
        t_emb = timestep_embedding(inputs["timestep"], self.timestep_embedding_dim)
        # One UNet call on [unconditional half; conditional half].
        eps = self.unet([
            ops.concatenate([latent, latent], axis=0),
            ops.concatenate([t_emb, t_emb], axis=0),
            ops.concatenate([inputs["uncond_context"], inputs["context"]], axis=0),
        ])
        eps_uncond, eps_cond = ops.split(ops.cast(eps, "float32"), 2, axis=0)

        def per_image(name):  # (B,) -> (B, 1, 1, 1)
            return ops.reshape(ops.cast(inputs[name], "float32"), (-1, 1, 1, 1))

        eps = eps_uncond + per_image("guidance") * (eps_cond - eps_uncond)
        alpha_t, alpha_prev, sigma = per_image("alpha_t"), per_image("alpha_prev"), per_image("sigma")
        x0 = (latent - ops.sqrt(1.0 - alpha_t) * eps) / ops.sqrt(alpha_t)
        if self.clip_sample:
            x0 = ops.clip(x0, -1.0, 1.0)
        direction = ops.sqrt(ops.maximum(1.0 - alpha_prev - sigma ** 2, 0.0)) * eps
        return ops.sqrt(alpha_prev) * x0 + direction + sigma * ops.cast(inputs["noise"], "float32")

    def get_config(self):
        return {"unet": keras.saving.serialize_keras_object(self.unet),
                "timestep_embedding_dim": self.timestep_embedding_dim,
                "clip_sample": self.clip_sample, "name": self.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["unet"] = keras.saving.deserialize_keras_object(config["unet"])
        return cls(**config)


class DDIMSampler:
    """Runs `GuidedDDIMStep` over Stable Diffusion's DDIM timesteps.

    Args:
        unet: a `build_unet` model (inputs [x, t_emb, context]).
        schedule: a `NoiseSchedule` (default: SD's scaled_linear, 1000 steps).
        timestep_embedding_dim: the preset's `timestep_embedding_dim`.
        jit_compile: compile the step with XLA.
        clip_sample: clip the predicted x0 to [-1, 1] (pixel-space models; see GuidedDDIMStep).

    Example:
        >>> sampler = DDIMSampler(unet, timestep_embedding_dim=64)
        >>> x0 = sampler.sample(np.random.default_rng(0).standard_normal((4, 8, 8, 3)),
        ...                     context, uncond_context, num_steps=20, guidance_scale=2.0)
    """

    def __init__(self, unet, schedule=None, timestep_embedding_dim=320, jit_compile=False, clip_sample=False):
        self.schedule = schedule or NoiseSchedule()
        self.step_model = GuidedDDIMStep(unet, timestep_embedding_dim, clip_sample=clip_sample,
                                         name="guided_ddim_step")
        self.step_model.compile(jit_compile=bool(jit_compile))

    def sample(self, noise, context, uncond_context, num_steps, guidance_scale, eta=0.0,
               step_noise=None, progress=False):
        """Denoises `noise` (B, S, S, C) into x_0 (NumPy float32, same shape).

        Args:
            noise: the initial x_T, (B, S, S, C).
            context: (B, L, D) conditional contexts.
            uncond_context: (B, L, D) or (1, L, D) unconditional context.
            num_steps: number of DDIM steps (1..999).
            guidance_scale: a float, or (B,) per image; 1.0 = conditional only, 0 = unconditional.
            eta: DDIM eta; 0 is deterministic.
            step_noise: callable(step_index) -> (B, S, S, C) array of standard normal noise,
                used when eta > 0 (default: NumPy noise seeded by the step index; pass your
                own to tie the noise to each image, as `ClassConditionalDiffusion` does).
            progress: show a tqdm bar over the steps.
        """
        latent = np.asarray(noise, dtype="float32")
        batch = latent.shape[0]
        timesteps, alpha_t, alpha_prev, sigma = self.schedule.ddim_coefficients(num_steps, eta)
        context = ops.convert_to_tensor(context)
        uncond_context = ops.convert_to_tensor(uncond_context)
        if uncond_context.shape[0] != batch:
            uncond_context = ops.repeat(uncond_context[:1], batch, axis=0)
        guidance = np.broadcast_to(np.asarray(guidance_scale, dtype="float32"), (batch,)).copy()
        zeros = np.zeros_like(latent)

        def column(value):
            return np.full((batch,), value, dtype="float32")

        for i in tqdm(range(len(timesteps)), desc="DDIM", leave=False, disable=not progress):
            if sigma[i] > 0:
                z = step_noise(i) if step_noise is not None else (
                    np.random.default_rng(i).standard_normal(latent.shape))
                z = np.asarray(z, dtype="float32")
            else:
                z = zeros
            latent = self.step_model.predict_on_batch({
                "latent": latent,
                "timestep": column(timesteps[i]),
                "context": context,
                "uncond_context": uncond_context,
                "guidance": guidance,
                "alpha_t": column(alpha_t[i]),
                "alpha_prev": column(alpha_prev[i]),
                "sigma": column(sigma[i]),
                "noise": z,
            })
            latent = np.asarray(latent, dtype="float32")
        return latent
