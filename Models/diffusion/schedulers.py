"""The samplers' update rules, each behind one small interface (diffusers' `set_timesteps` / `step` idea).

A scheduler has two halves:

- host (NumPy, once per call): `tables(num_steps, eta)` gives the timesteps the UNet
  sees, the alpha_bar its output is split with (`split_prediction`) and the per-step
  coefficients of the update, as `StepTables`. The guided loop (sampler.py) pads them
  to a fixed length, so the compiled loop is the same for every step count.
- device (keras.ops, inside the loop): `step(c, x, x0, eps, state, noise)` turns the
  current VP sample x_t, the guided prediction split into (x0, eps), the loop state
  (earlier x0 predictions, the previous sample) and the step's noise into the next
  sample and state. `c` holds this step's coefficients, each (B, 1, 1, 1).

Every scheduler follows diffusers 0.42 (same timesteps, sigmas, orders, final step):

- `ddim`: `DDIMScheduler` (Stable Diffusion's config; the paper's sampler), with eta.
- `dpmsolver++`, `dpmsolver++_karras`: `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
  solver_order=2)`, lower_order_final and final_sigmas_type "zero" as diffusers' defaults,
  the second with `use_karras_sigmas=True` (Karras sigmas map back to timesteps by log-sigma
  interpolation, rounded, except for squaredcos_cap_v2 where diffusers truncates them).
- `euler`, `euler_ancestral`: `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`.
- `unipc`: `UniPCMultistepScheduler` (bh2, order 2, predict_x0, a corrector on every step but the first).

The Euler schedulers work in sigma (VE) space in diffusers: x_ve = x_t * sqrt(1 + sigma^2),
the UNet sees `scale_model_input(x_ve) = x_ve / sqrt(1 + sigma^2)`. The loop here keeps the
VP sample x_t = x_ve / sqrt(1 + sigma^2) throughout, which is the same trajectory; only the
start differs: diffusers starts from noise * init_noise_sigma, which for "linspace" and
"trailing" spacing is sigma_max rather than sqrt(1 + sigma_max^2), so those start from
noise * sigma_max / sqrt(1 + sigma_max^2) (`StepTables.initial_scale`), exactly as diffusers.

The sigma-based schedulers (all but DDIM) build their sigma table in float32 as diffusers
does, and with `rescale_betas_zero_snr` set alpha_bar_T to 2**-24 (sigma finite), as diffusers.

Example:
    >>> scheduler = make_scheduler("dpmsolver++", NoiseSchedule())   # Models.diffusion.schedule
    >>> tables = scheduler.tables(20)
    >>> tables.timesteps[:3], sorted(tables.coefficients)
"""

from dataclasses import dataclass, field

import numpy as np

from Models.errors import ModelSettingsError

# No keras (nor schedule.py, which needs it) at import time: the settings classes read `SAMPLERS`
# for --sampler's choices, and the scripts parse their flags before any backend loads. The
# device-side steps run inside the traced loop, where keras is loaded already.

# diffusers' floor for alpha_bar_T under zero terminal SNR: keeps sigma_T finite.
_ZERO_SNR_ALPHA_BAR = 2.0 ** -24


@dataclass
class StepTables:
    """What the host hands the loop for one call.

    timesteps: (n,) the UNet's timestep per step (may be non-integer: Euler's linspace).
    model_alpha: (n,) alpha_bar the guided output is split into (x0, eps) with.
    coefficients: name -> (n,) per-step coefficients of `Scheduler.step`.
    stochastic: the step reads fresh standard normal noise.
    initial_scale: x_T = noise * initial_scale.
    """
    timesteps: np.ndarray
    model_alpha: np.ndarray
    coefficients: dict = field(default_factory=dict)
    stochastic: bool = False
    initial_scale: float = 1.0


class Scheduler:
    """Base: `coefficient_names` the step reads, `state_size` tensors it carries besides x_t."""
    name = None
    coefficient_names = ()
    state_size = 0

    def __init__(self, schedule):
        self.schedule = schedule

    def tables(self, num_steps, eta=0.0):
        raise NotImplementedError

    def step(self, c, x, x0, eps, state, noise):
        raise NotImplementedError

    def _refuse_eta(self, eta):
        if eta:
            raise ModelSettingsError(f"eta is DDIM's; the {self.name} sampler takes eta 0, got {eta}")

    # The sigma-space tables diffusers' sigma-based schedulers share.
    def _train_sigmas(self):
        """diffusers' float32 sigma table sqrt((1 - a) / a) over the training timesteps."""
        alphas_cumprod = _float32_alphas_cumprod(self.schedule)
        return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5

    def _interpolated_sigmas(self, timesteps):
        """Sigmas at `timesteps` by linear interpolation, then the final sigma 0 (final_sigmas_type "zero")."""
        train = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _check_steps(num_steps):
    from Models.diffusion.schedule import check_inference_steps

    return check_inference_steps(num_steps)


def _float32_linspace(start, end, num):
    """torch.linspace in float32 as its CPU kernel computes it (float32 step, fused multiply-add, from both ends)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    values = np.where(i < num // 2, np.float64(start) + step * i, np.float64(end) - step * (num - 1 - i))
    return values.astype(np.float32)


def _float32_cumprod(values):
    """torch.cumprod of a float32 vector on CPU: accumulated in float64, stored in float32."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def _float32_alphas_cumprod(schedule):
    """alpha_bar as diffusers' schedulers hold it, bit for bit: float32 betas, rescale and cumprod.

    Its roundings matter where 1 - alpha_bar is tiny (sigma_min, so Karras' lower end, and which
    timestep a Karras sigma maps to): there the float64 table of `NoiseSchedule` and diffusers'
    float32 one differ by up to 1e-3 relative.
    """
    total = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = _float32_linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, total) ** 2
    elif schedule.beta_schedule == "linear":
        betas = _float32_linspace(schedule.beta_start, schedule.beta_end, total)
    else:  # diffusers computes the cosine betas in float64 too
        from Models.diffusion.schedule import NoiseSchedule

        betas = NoiseSchedule(schedule.beta_schedule, num_train_timesteps=total).betas.astype(np.float32)
    one = np.float32(1.0)
    if schedule.rescale_betas_zero_snr:  # diffusers' rescale_zero_terminal_snr, in its order of operations
        root = np.sqrt(_float32_cumprod(one - betas))
        first, last = root[0].copy(), root[-1].copy()
        root = (root - last) * (first / (first - last))
        alphas_bar = root ** 2
        betas = one - np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    alphas_cumprod = _float32_cumprod(one - betas)
    if schedule.rescale_betas_zero_snr:
        alphas_cumprod[-1] = _ZERO_SNR_ALPHA_BAR
    return alphas_cumprod


def _model_alpha(sigmas):
    """alpha_bar of each step's own sigma: the UNet input is x_ve / sqrt(1 + sigma^2)."""
    return 1.0 / (1.0 + np.float64(sigmas[:-1]) ** 2)


def _alpha_sigma_lambda(sigma):
    """diffusers' `_sigma_to_alpha_sigma_t` and lambda = log(alpha) - log(sigma), in float64; sigma 0 -> lambda inf."""
    sigma = np.float64(sigma)
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1.0)
    sigma_t = sigma * alpha
    with np.errstate(divide="ignore"):
        return alpha, sigma_t, np.log(alpha) - np.log(sigma_t)


def _multistep_timesteps(schedule, num_steps):
    """DPM-Solver's and UniPC's timesteps: leading and linspace space n + 1 points and drop the last."""
    total, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, total - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = total // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + schedule.steps_offset
    return np.arange(total, 0, -total / num_steps).round().copy().astype(np.int64) - 1


def _euler_timesteps(schedule, num_steps):
    """The Euler schedulers' timesteps: float, linspace not rounded."""
    total, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, total - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = total // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.float32) + schedule.steps_offset
    return np.arange(total, 0, -total / num_steps).round().copy().astype(np.float32) - 1


class DDIM(Scheduler):
    """DDIM (Song et al. eq. 12), eta > 0 adds sigma_t * z; timesteps from `NoiseSchedule.ddim_coefficients`."""
    name = "ddim"
    coefficient_names = ("alpha_prev", "sigma")

    def tables(self, num_steps, eta=0.0):
        timesteps, alpha_t, alpha_prev, sigma = self.schedule.ddim_coefficients(num_steps, eta)
        return StepTables(timesteps, alpha_t, {"alpha_prev": alpha_prev, "sigma": sigma},
                          stochastic=bool(np.any(sigma > 0)))

    def step(self, c, x, x0, eps, state, noise):
        from keras import ops

        alpha_prev, sigma = c["alpha_prev"], c["sigma"]
        direction = ops.sqrt(ops.maximum(1.0 - alpha_prev - sigma ** 2, 0.0)) * eps
        return ops.sqrt(alpha_prev) * x0 + direction + sigma * noise, state


class EulerAncestral(Scheduler):
    """Euler ancestral: the Euler step to sigma_down, plus sigma_up * z (sigma_up^2 + sigma_down^2 = sigma_next^2).

    In VP terms: x_next = (x_ve * down / sigma + x0 * (1 - down / sigma) + up * z) / sqrt(1 + sigma_next^2).
    """
    name = "euler_ancestral"
    coefficient_names = ("sample", "denoised", "noise_scale")
    ancestral = True

    def tables(self, num_steps, eta=0.0):
        self._refuse_eta(eta)
        _check_steps(num_steps)
        timesteps = _euler_timesteps(self.schedule, num_steps)
        sigmas = self._interpolated_sigmas(timesteps)
        s, s_next = np.float64(sigmas[:-1]), np.float64(sigmas[1:])
        if self.ancestral:
            up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
            down = np.sqrt(s_next ** 2 - up ** 2)
        else:
            up, down = np.zeros_like(s), s_next
        to_vp = 1.0 / np.sqrt(1.0 + s_next ** 2)
        coefficients = {"sample": np.sqrt(1.0 + s ** 2) * down / s * to_vp,
                        "denoised": (1.0 - down / s) * to_vp, "noise_scale": up * to_vp}
        if self.schedule.timestep_spacing == "leading":
            initial = 1.0  # init_noise_sigma = sqrt(1 + sigma_max^2): exactly the VP noise
        else:
            top = np.float64(sigmas.max())
            initial = top / np.sqrt(1.0 + top ** 2)
        return StepTables(timesteps, _model_alpha(sigmas), coefficients, stochastic=self.ancestral,
                          initial_scale=float(initial))

    def step(self, c, x, x0, eps, state, noise):
        return c["sample"] * x + c["denoised"] * x0 + c["noise_scale"] * noise, state


class Euler(EulerAncestral):
    """Euler (Karras et al.'s first-order step, no churn): x_ve_next = x_ve + (x_ve - x0) / sigma * (sigma_next - sigma)."""
    name = "euler"
    coefficient_names = ("sample", "denoised")
    ancestral = False

    def step(self, c, x, x0, eps, state, noise):
        return c["sample"] * x + c["denoised"] * x0, state


class DPMSolverPlusPlus2M(Scheduler):
    """DPM-Solver++ 2M (multistep, data prediction, midpoint), first order at the first and last step.

    x_next = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (D0 + D1 / 2), D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r,
    written as x_next = a x + b x0_i + c x0_{i-1}; the state is the previous x0.
    """
    name = "dpmsolver++"
    coefficient_names = ("sample", "denoised", "previous_denoised")
    state_size = 1
    karras = False

    def _timesteps_and_sigmas(self, num_steps):
        timesteps = _multistep_timesteps(self.schedule, num_steps)
        if not self.karras:
            return timesteps, self._interpolated_sigmas(timesteps)
        train = self._train_sigmas()
        log_sigmas = np.log(train)
        rho = 7.0
        low, high = float(train[0]) ** (1 / rho), float(train[-1]) ** (1 / rho)
        sigmas = (high + np.linspace(0, 1, num_steps) * (low - high)) ** rho
        timesteps = np.array([_sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if self.schedule.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        return timesteps.astype(np.int64), np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def tables(self, num_steps, eta=0.0):
        self._refuse_eta(eta)
        _check_steps(num_steps)
        timesteps, sigmas = self._timesteps_and_sigmas(num_steps)
        n = len(timesteps)
        a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
        for i in range(n):
            alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
            _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigmas[i])
            h = lambda_t - lambda_s0
            phi = alpha_t * np.expm1(-h)  # alpha_t (e^-h - 1); at sigma_t = 0: -1
            a[i] = sigma_t / sigma_s0
            # lower_order_final with final_sigmas_type "zero": the last step is always first order.
            if i == 0 or i == n - 1:
                b[i] = -phi
            else:
                _, _, lambda_s1 = _alpha_sigma_lambda(sigmas[i - 1])
                r0 = (lambda_s0 - lambda_s1) / h
                b[i] = -phi * (1.0 + 0.5 / r0)
                c[i] = 0.5 * phi / r0
        return StepTables(timesteps, _model_alpha(sigmas),
                          {"sample": a, "denoised": b, "previous_denoised": c})

    def step(self, c, x, x0, eps, state, noise):
        (previous,) = state
        return c["sample"] * x + c["denoised"] * x0 + c["previous_denoised"] * previous, (x0,)


class DPMSolverPlusPlus2MKarras(DPMSolverPlusPlus2M):
    """DPM-Solver++ 2M on Karras et al.'s sigmas (rho 7) between the schedule's smallest and largest sigma."""
    name = "dpmsolver++_karras"
    karras = True


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t`: the (fractional) timestep of `sigma` by log-sigma interpolation."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def _unipc_bh2(h, order, rks):
    """UniPC's (h_phi_1, B_h, R, b) for bh2 with predict_x0 (hh = -h), as diffusers builds them."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    with np.errstate(invalid="ignore", divide="ignore"):
        h_phi_k = h_phi_1 / hh - 1
    b_h = np.expm1(hh)
    rks = np.asarray(list(rks) + [1.0])
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.stack(rows), np.asarray(b)


class UniPC(Scheduler):
    """UniPC (Zhao et al.): bh2, order 2, data prediction; a corrector (UniC) before every predictor (UniP) but the first.

    Step i: the corrector refines the sample x_i the UNet just saw with its own prediction
    (from the previous corrected sample, the previous two x0s and this one), then the predictor
    steps from the corrected sample. Linear in its inputs, so per step:

        corrected = k_self x_i + k_last x_{i-1} + k_t x0_i + k_1 x0_{i-1} + k_2 x0_{i-2}
        x_{i+1}   = p_x corrected + p_0 x0_i + p_1 x0_{i-1}

    The state is (x_{i-1} corrected, x0_{i-1}, x0_{i-2}). The predictor's order is
    min(2, steps left, steps done + 1) (lower_order_final); the corrector uses the order
    of the predictor it corrects.
    """
    name = "unipc"
    coefficient_names = ("keep", "last_sample", "this_denoised", "denoised_1", "denoised_2",
                         "sample", "denoised", "previous_denoised")
    state_size = 3

    def tables(self, num_steps, eta=0.0):
        self._refuse_eta(eta)
        _check_steps(num_steps)
        timesteps = _multistep_timesteps(self.schedule, num_steps)
        sigmas = self._interpolated_sigmas(timesteps)
        n = len(timesteps)
        lam = [_alpha_sigma_lambda(s) for s in sigmas]
        table = {name: np.zeros(n) for name in self.coefficient_names}
        orders = [min(2, n - i, i + 1) for i in range(n)]
        for i in range(n):
            if i == 0:
                table["keep"][i] = 1.0
            else:  # UniC to sigma_i from sigma_{i-1}, in the order of the predictor that produced x_i
                order = orders[i - 1]
                alpha_t, sigma_t, lambda_t = lam[i]
                _, sigma_s0, lambda_s0 = lam[i - 1]
                h = lambda_t - lambda_s0
                rks = [(lam[i - 2][2] - lambda_s0) / h] if order == 2 else []
                h_phi_1, b_h, rows, b = _unipc_bh2(h, order, rks)
                rhos = np.array([0.5]) if order == 1 else np.linalg.solve(rows, b)
                scale = alpha_t * b_h
                table["last_sample"][i] = sigma_t / sigma_s0
                table["this_denoised"][i] = -scale * rhos[-1]
                d1 = -alpha_t * h_phi_1 + scale * rhos[-1]
                if order == 2:
                    table["denoised_2"][i] = -scale * rhos[0] / rks[0]
                    d1 += scale * rhos[0] / rks[0]
                table["denoised_1"][i] = d1
            order = orders[i]  # UniP from sigma_i to sigma_{i+1}
            alpha_t, sigma_t, lambda_t = lam[i + 1]
            _, sigma_s0, lambda_s0 = lam[i]
            h = lambda_t - lambda_s0
            h_phi_1 = np.expm1(-h)
            table["sample"][i] = sigma_t / sigma_s0
            table["denoised"][i] = -alpha_t * h_phi_1
            if order == 2:
                r1 = (lam[i - 1][2] - lambda_s0) / h
                pred = alpha_t * np.expm1(-h) * 0.5 / r1  # alpha_t B_h rho_p / r1, rho_p = 0.5
                table["denoised"][i] += pred
                table["previous_denoised"][i] = -pred
        return StepTables(timesteps, _model_alpha(sigmas), table)

    def step(self, c, x, x0, eps, state, noise):
        last, previous, before = state
        corrected = (c["keep"] * x + c["last_sample"] * last + c["this_denoised"] * x0
                     + c["denoised_1"] * previous + c["denoised_2"] * before)
        x_next = c["sample"] * corrected + c["denoised"] * x0 + c["previous_denoised"] * previous
        return x_next, (corrected, x0, previous)


SAMPLERS = {cls.name: cls for cls in (DDIM, DPMSolverPlusPlus2M, DPMSolverPlusPlus2MKarras, Euler,
                                      EulerAncestral, UniPC)}
DEFAULT_SAMPLER = "ddim"  # the paper's


def make_scheduler(name, schedule):
    """The scheduler `name` (a key of `SAMPLERS`) over a `NoiseSchedule`."""
    if name not in SAMPLERS:
        raise ModelSettingsError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](schedule)
