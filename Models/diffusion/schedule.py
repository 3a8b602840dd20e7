"""The noise schedule of Stable Diffusion and the DDIM timesteps used to sample it.

Training (PAPER.md, Settings): 1,000 steps, "scaled_linear" betas from 0.00085
to 0.012 (linear in sqrt(beta)), noise added as

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise.

Sampling: DDIM timesteps with the spacing Stable Diffusion ships with
(diffusers' `DDIMScheduler` config for SD: `timestep_spacing="leading"`,
`steps_offset=1`, `set_alpha_to_one=False`), so that a sampler here matches
diffusers step for step:

    step_ratio = 1000 // num_steps
    timesteps  = [0, 1, ..., num_steps - 1] * step_ratio + 1, largest first
    previous   = t - step_ratio, or alpha_bar[0] ("final alpha") below zero

Example:
    >>> schedule = NoiseSchedule()
    >>> schedule.alphas_cumprod.shape
    (1000,)
    >>> schedule.ddim_timesteps(5)
    array([801, 601, 401, 201,   1])
    >>> x_t = schedule.add_noise(x0, noise, timesteps)    # keras.ops, any backend
"""

import keras
import numpy as np
from keras import ops

from Utils.cli import UserError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
MAX_INFERENCE_STEPS = NUM_TRAIN_TIMESTEPS - 1  # with steps_offset 1, 1000 steps would index t=1000


class NoiseSchedule:
    """Stable Diffusion's "scaled_linear" schedule: betas, alpha_bar, `add_noise`, DDIM steps.

    `alphas_cumprod` is float64 NumPy (it agrees with keras-cv's published
    `_ALPHAS_CUMPROD` table to 1e-7); `add_noise` works on backend tensors.

    Args:
        num_train_timesteps: number of diffusion steps the UNet is trained on (1000).
        beta_start, beta_end: the first and last beta (0.00085, 0.012).
        steps_offset: added to every DDIM timestep (1, as Stable Diffusion's config).
    """

    def __init__(self, num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START,
                 beta_end=BETA_END, steps_offset=1):
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.steps_offset = int(steps_offset)
        self.betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                 dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        # diffusers' set_alpha_to_one=False: the step past t=0 lands on alpha_bar[0], not 1.
        self.final_alpha_cumprod = float(self.alphas_cumprod[0])

    def add_noise(self, x0, noise, timesteps):
        """x_t for integer `timesteps` (B,), broadcast over the remaining axes of `x0`."""
        table = ops.convert_to_tensor(self.alphas_cumprod.astype("float32"))
        alpha_bar = ops.take(table, ops.cast(timesteps, "int32"))
        alpha_bar = ops.reshape(alpha_bar, (-1,) + (1,) * (len(x0.shape) - 1))
        alpha_bar = ops.cast(alpha_bar, x0.dtype)
        return ops.sqrt(alpha_bar) * x0 + ops.sqrt(1.0 - alpha_bar) * ops.cast(noise, x0.dtype)

    def sample_timesteps(self, batch_size, seed=None):
        """Training timesteps, uniform integers in [0, num_train_timesteps)."""
        return keras.random.randint((batch_size,), 0, self.num_train_timesteps, dtype="int32",
                                    seed=seed)

    def ddim_timesteps(self, num_steps):
        """The `num_steps` DDIM timesteps, largest first ("leading" spacing + steps_offset)."""
        num_steps = check_inference_steps(num_steps)
        step_ratio = self.num_train_timesteps // num_steps
        timesteps = np.round(np.arange(num_steps) * step_ratio).astype(np.int64)[::-1]
        return timesteps + self.steps_offset

    def ddim_coefficients(self, num_steps, eta=0.0):
        """Per-step (timesteps, alpha_bar_t, alpha_bar_prev, sigma_t) for DDIM.

        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        (DDIM eq. 16; eta=0 is deterministic DDIM, eta=1 DDPM-like).
        """
        if not eta >= 0:
            raise UserError(f"eta must be a non-negative number, got {eta}")
        timesteps = self.ddim_timesteps(num_steps)
        step_ratio = self.num_train_timesteps // len(timesteps)
        alpha_t = self.alphas_cumprod[timesteps]
        previous = timesteps - step_ratio
        alpha_prev = np.where(previous >= 0, self.alphas_cumprod[np.clip(previous, 0, None)],
                              self.final_alpha_cumprod)
        sigma = eta * np.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t)) * np.sqrt(1.0 - alpha_t / alpha_prev)
        return timesteps, alpha_t, alpha_prev, sigma


def check_inference_steps(num_steps):
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= MAX_INFERENCE_STEPS:
        raise UserError(f"the number of inference steps must be an integer in [1, {MAX_INFERENCE_STEPS}], "
                        f"got {num_steps}")
    return int(num_steps)
