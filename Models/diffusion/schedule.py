"""The noise schedule (training and sampling) and the DDIM timesteps.

Training adds noise as

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise

over 1,000 steps. The betas follow diffusers' `beta_schedule` names:

- `scaled_linear` (Stable Diffusion, PAPER.md): linear in sqrt(beta), 0.00085 to 0.012.
  Made for SD's latents; in pixel space it leaves sqrt(alpha_bar_T) = 0.068 of the
  image at the last step, which the sampler's pure-noise start never has.
- `linear` (DDPM): linear in beta.
- `squaredcos_cap_v2` (Nichol & Dhariwal's cosine): alpha_bar_t = cos^2(((t/T + s) / (1 + s)) pi/2),
  the usual choice for small pixel-space images.

`rescale_betas_zero_snr` (Lin et al. 2024) shifts any of them so that alpha_bar_T is
exactly 0: the last training step then sees pure noise, as sampling starts from;
it needs `prediction_type="v_prediction"` (epsilon carries no information about x_0
there).

What the UNet predicts (`prediction_type`): the noise (`epsilon`, SD v1's) or the
velocity v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x_0 (`v_prediction`,
SD 2's 768 px models). `split_prediction` turns either into (x_0, noise) for a sampler.

Sampling timesteps follow diffusers' `timestep_spacing` (`leading` with
`steps_offset=1` is Stable Diffusion's config and the default; `trailing` starts at
t = T - 1, needed with zero terminal SNR; `linspace`):

    leading:   [0, 1, ..., n - 1] * (T // n) + steps_offset, largest first
    trailing:  round(T, T - T/n, ..., T/n) - 1
    linspace:  round(linspace(0, T - 1, n)), largest first
    previous   = t - T // n, or alpha_bar[0] ("final alpha", set_alpha_to_one=False) below zero

Example:
    >>> schedule = NoiseSchedule()
    >>> schedule.alphas_cumprod.shape
    (1000,)
    >>> schedule.ddim_timesteps(5)
    array([801, 601, 401, 201,   1])
    >>> x_t = schedule.add_noise(x0, noise, timesteps)    # keras.ops, any backend
    >>> NoiseSchedule("squaredcos_cap_v2", prediction_type="v_prediction").snr([0, 999])
"""

import copy

import keras
import numpy as np
from keras import ops

from Models.diffusion.presets import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS
from Models.errors import ModelSettingsError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
MAX_INFERENCE_STEPS = NUM_TRAIN_TIMESTEPS - 1  # with steps_offset 1, 1000 steps would index t=1000


class ScheduleError(ValueError):
    """A schedule setting that does not exist or does not fit the others."""


def _cosine_betas(num_steps, max_beta=0.999, s=0.008):
    """Nichol & Dhariwal's cosine schedule as diffusers' `squaredcos_cap_v2` builds it."""
    def alpha_bar(t):
        return np.cos((t + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(num_steps, dtype=np.float64)
    return np.minimum(1 - alpha_bar((t + 1) / num_steps) / alpha_bar(t / num_steps), max_beta)


def _rescale_zero_terminal_snr(betas):
    """Lin et al.'s algorithm 1: shift and scale sqrt(alpha_bar) so the last one is 0, the first unchanged."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alphas_cumprod = root ** 2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """Betas, alpha_bar, `add_noise`, training targets, min-SNR weights and DDIM steps.

    `alphas_cumprod` is float64 NumPy (the default agrees with keras-cv's published
    `_ALPHAS_CUMPROD` table to 1e-7); `add_noise`, `training_target`, `snr_weights`
    and `split_prediction` work on backend tensors (keras.ops).

    Args:
        beta_schedule: "scaled_linear" (Stable Diffusion, default), "linear" or "squaredcos_cap_v2".
        prediction_type: what the UNet predicts, "epsilon" (default) or "v_prediction".
        rescale_betas_zero_snr: make alpha_bar at the last step exactly 0 (needs v_prediction).
        timestep_spacing: sampling timesteps, "leading" (default), "trailing" or "linspace".
        num_train_timesteps: number of diffusion steps the UNet is trained on (1000).
        beta_start, beta_end: the first and last beta of the linear schedules (0.00085, 0.012).
        steps_offset: added to every "leading" timestep (1, as Stable Diffusion's config).
    """

    def __init__(self, beta_schedule="scaled_linear", prediction_type="epsilon", rescale_betas_zero_snr=False,
                 timestep_spacing="leading", num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START,
                 beta_end=BETA_END, steps_offset=1):
        for value, allowed, what in ((beta_schedule, BETA_SCHEDULES, "beta schedule"),
                                     (prediction_type, PREDICTION_TYPES, "prediction type"),
                                     (timestep_spacing, TIMESTEP_SPACINGS, "timestep spacing")):
            if value not in allowed:
                raise ScheduleError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if rescale_betas_zero_snr and prediction_type == "epsilon":
            raise ScheduleError("zero terminal SNR needs v_prediction: at alpha_bar_T = 0 the noise "
                                "says nothing about the image")
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.timestep_spacing = timestep_spacing
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.steps_offset = int(steps_offset)
        if beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
        elif beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        else:
            betas = _cosine_betas(num_train_timesteps)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        # diffusers' set_alpha_to_one=False: the step past t=0 lands on alpha_bar[0], not 1.
        self.final_alpha_cumprod = float(self.alphas_cumprod[0])

    def config(self):
        """The settings that make two schedules the same (recorded beside checkpoints)."""
        return {"beta_schedule": self.beta_schedule, "prediction_type": self.prediction_type,
                "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
                "timestep_spacing": self.timestep_spacing}

    def with_timestep_spacing(self, timestep_spacing):
        """The same schedule sampled with another `timestep_spacing` (None: this one).

        The spacing only places the sampling timesteps; the betas and what the UNet
        learnt do not depend on it, so generation may choose it (diffusers:
        `Scheduler.from_config(config, timestep_spacing=...)`).
        """
        if timestep_spacing is None or timestep_spacing == self.timestep_spacing:
            return self
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ScheduleError(f"unknown timestep spacing {timestep_spacing!r}; "
                                f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
        schedule = copy.copy(self)
        schedule.timestep_spacing = timestep_spacing
        return schedule

    def _alpha_bar(self, timesteps, like):
        table = ops.convert_to_tensor(self.alphas_cumprod.astype("float32"))
        alpha_bar = ops.take(table, ops.cast(timesteps, "int32"))
        return ops.cast(ops.reshape(alpha_bar, (-1,) + (1,) * (len(like.shape) - 1)), like.dtype)

    def add_noise(self, x0, noise, timesteps):
        """x_t for integer `timesteps` (B,), broadcast over the remaining axes of `x0`."""
        alpha_bar = self._alpha_bar(timesteps, x0)
        return ops.sqrt(alpha_bar) * x0 + ops.sqrt(1.0 - alpha_bar) * ops.cast(noise, x0.dtype)

    def training_target(self, x0, noise, timesteps):
        """What the UNet learns to output: the noise, or v = sqrt(a) * noise - sqrt(1 - a) * x0."""
        if self.prediction_type == "epsilon":
            return noise
        alpha_bar = self._alpha_bar(timesteps, x0)
        return ops.sqrt(alpha_bar) * ops.cast(noise, x0.dtype) - ops.sqrt(1.0 - alpha_bar) * x0

    def snr(self, timesteps):
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer `timesteps` (NumPy)."""
        alpha_bar = self.alphas_cumprod[np.asarray(timesteps, np.int64)]
        return alpha_bar / (1.0 - alpha_bar)

    def snr_weights(self, timesteps, gamma):
        """Min-SNR-gamma loss weights (Hang et al. 2023) per timestep, as diffusers' training scripts.

        epsilon: min(SNR, gamma) / SNR; v_prediction: min(SNR, gamma) / (SNR + 1). Both equal
        min(SNR, gamma) on the x_0 error, so every timestep's x_0 loss is capped at gamma.
        """
        # The SNR table in float64 first: 1 - alpha_bar in float32 loses digits near t = 0.
        table = ops.convert_to_tensor(self.snr(np.arange(self.num_train_timesteps)).astype("float32"))
        snr = ops.take(table, ops.cast(timesteps, "int32"))
        capped = ops.minimum(snr, float(gamma))
        if self.prediction_type == "epsilon":
            return capped / ops.maximum(snr, 1e-12)
        return capped / (snr + 1.0)

    def split_prediction(self, model_output, x_t, alpha_bar):
        """(x_0, noise) implied by the UNet's output at x_t (see `split_prediction`)."""
        return split_prediction(self.prediction_type, model_output, x_t, alpha_bar)

    def sample_timesteps(self, batch_size, seed=None):
        """Training timesteps, uniform integers in [0, num_train_timesteps)."""
        return keras.random.randint((batch_size,), 0, self.num_train_timesteps, dtype="int32",
                                    seed=seed)

    def ddim_timesteps(self, num_steps):
        """The `num_steps` sampling timesteps, largest first (see the module docstring)."""
        num_steps = check_inference_steps(num_steps)
        total = self.num_train_timesteps
        if self.timestep_spacing == "leading":
            timesteps = np.round(np.arange(num_steps) * (total // num_steps)).astype(np.int64)[::-1]
            return timesteps + self.steps_offset
        if self.timestep_spacing == "trailing":
            return np.round(np.arange(total, 0, -total / num_steps)).astype(np.int64)[:num_steps] - 1
        return np.round(np.linspace(0, total - 1, num_steps)).astype(np.int64)[::-1].copy()

    def ddim_coefficients(self, num_steps, eta=0.0):
        """Per-step (timesteps, alpha_bar_t, alpha_bar_prev, sigma_t) for DDIM.

        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        (DDIM eq. 16; eta=0 is deterministic DDIM, eta=1 DDPM-like).
        """
        if not eta >= 0 or not np.isfinite(eta):
            raise ModelSettingsError(f"eta must be a finite non-negative number, got {eta}")
        timesteps = self.ddim_timesteps(num_steps)
        step_ratio = self.num_train_timesteps // len(timesteps)
        alpha_t = self.alphas_cumprod[timesteps]
        previous = timesteps - step_ratio
        alpha_prev = np.where(previous >= 0, self.alphas_cumprod[np.clip(previous, 0, None)],
                              self.final_alpha_cumprod)
        sigma = eta * np.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t)) * np.sqrt(1.0 - alpha_t / alpha_prev)
        return timesteps, alpha_t, alpha_prev, sigma


def split_prediction(prediction_type, model_output, x_t, alpha_bar):
    """(x_0, noise) implied by a UNet output of `prediction_type` at x_t; alpha_bar broadcasts to x_t."""
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - ops.sqrt(1.0 - alpha_bar) * eps) / ops.sqrt(alpha_bar), eps
    x0 = ops.sqrt(alpha_bar) * x_t - ops.sqrt(1.0 - alpha_bar) * model_output
    eps = ops.sqrt(alpha_bar) * model_output + ops.sqrt(1.0 - alpha_bar) * x_t
    return x0, eps


def check_inference_steps(num_steps):
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or not 1 <= num_steps <= MAX_INFERENCE_STEPS:
        raise ModelSettingsError(f"the number of inference steps must be an integer in [1, {MAX_INFERENCE_STEPS}], "
                                 f"got {num_steps}")
    return int(num_steps)
