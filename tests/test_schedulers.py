"""Every sampler against its diffusers scheduler, through our real compiled loop.

Both sides denoise with the same deterministic "UNet" (a fixed formula of x, the
timestep embedding and the context), with classifier-free guidance; ours runs the
Keras `GuidedSampler` (one `fori_loop`), diffusers runs its scheduler's `set_timesteps`
/ `scale_model_input` / `step` loop in PyTorch. After every checked step k our loop
(stopped after k steps) and diffusers' sample (in VP terms: the Euler schedulers'
x_ve / sqrt(1 + sigma^2)) agree to 1e-4. Ancestral samplers get the same noise on
both sides (one torch generator sequence). Also: changing steps, guidance or the
noise does not retrace the compiled loop, and the sampler a generator uses gives the
same images for the same seed whatever the batch size.
"""


import keras
import numpy as np
import pytest
from keras import ops

from Models.diffusion.sampler import DiffusionSampler
from Models.diffusion.schedule import NoiseSchedule
from Models.diffusion.schedulers import SAMPLERS, make_scheduler
from Models.diffusion.unet import timestep_embedding
from Models.errors import ModelSettingsError
from conftest import require_module


TOLERANCE = 1e-4
DIM = 16
SHAPE = (3, 4, 4, 2)
GUIDANCE = 2.5


class FormulaUNet(keras.layers.Layer):
    """out = 0.8 tanh(x) + 0.3 mean(context) + 0.2 mean(t_emb); counts its traces (graph mode runs call once per trace)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.traces = 0

    def call(self, inputs):
        x, t_emb, context = inputs
        self.traces += 1
        c = ops.mean(context, axis=(1, 2))[:, None, None, None]
        t = ops.mean(t_emb, axis=1)[:, None, None, None]
        return 0.8 * ops.tanh(x) + 0.3 * c + 0.2 * t


def formula(x, t, context):
    """The same formula in float64 NumPy, for diffusers' side."""
    t_emb = ops.convert_to_numpy(timestep_embedding(ops.convert_to_tensor([float(t)], "float32"), DIM))
    return 0.8 * np.tanh(x) + 0.3 * context.mean(axis=(1, 2))[:, None, None, None] + 0.2 * t_emb.mean()


def diffusers_scheduler(name, schedule):
    diffusers = require_module("diffusers")
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule=schedule.beta_schedule, prediction_type=schedule.prediction_type,
                  timestep_spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                  rescale_betas_zero_snr=schedule.rescale_betas_zero_snr)
    if name == "ddim":
        return diffusers.DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if name.startswith("dpmsolver++"):
        return diffusers.DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2,
                                                     use_karras_sigmas=name.endswith("karras"))
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**config)
    if name == "euler_ancestral":
        return diffusers.EulerAncestralDiscreteScheduler(**config)
    assert name == "unipc"
    return diffusers.UniPCMultistepScheduler(**config)


def diffusers_trajectory(name, schedule, noise, context, uncond, num_steps, eta, seed):
    """diffusers' samples after each step as VP samples, (N, *SHAPE) float64, and its own rounding after each step.

    The rounding: diffusers' Euler schedulers keep x_ve = x_t * sqrt(1 + sigma^2) in float32,
    so each step's result carries about one float32 ulp of the largest x_ve so far (at zero
    terminal SNR sigma_max is 4096: ~3e-4 once scaled back). The other schedulers work on x_t
    itself: 0.
    """
    torch = require_module("torch")
    torch.set_num_threads(1)
    scheduler = diffusers_scheduler(name, schedule)
    scheduler.set_timesteps(num_steps)
    # Pipelines' own call: start at step index 0 even when the first timestep repeats (Karras
    # sigmas on the cosine schedule truncate to 998, 998, ...; diffusers would otherwise start at 1).
    if hasattr(type(scheduler), "set_begin_index"):
        scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.from_numpy(noise) * scheduler.init_noise_sigma
    euler = name.startswith("euler")
    trajectory, rounding, largest = [], [], 0.0
    for k, t in enumerate(scheduler.timesteps):
        largest = max(largest, float(sample.abs().max()))
        x = scheduler.scale_model_input(sample, t).numpy().astype(np.float64)
        out_u, out_c = formula(x, t.item(), uncond), formula(x, t.item(), context)
        guided = torch.from_numpy((out_u + GUIDANCE * (out_c - out_u)).astype(np.float32))
        extra = {"eta": eta, "generator": generator} if name == "ddim" else {}
        if name == "euler_ancestral":
            extra = {"generator": generator}
        sample = scheduler.step(guided, t, sample, **extra).prev_sample
        vp = sample.numpy().astype(np.float64)
        if euler:
            vp = vp / np.sqrt(1.0 + float(scheduler.sigmas[k + 1]) ** 2)
        trajectory.append(vp)
        rounding.append(np.finfo(np.float32).eps * largest / np.sqrt(1.0 + float(scheduler.sigmas[k + 1]) ** 2)
                        if euler else 0.0)
    return np.stack(trajectory), rounding


def torch_noises(seed, num_steps):
    """The per-step noise diffusers' schedulers draw from a generator seeded `seed`, in order."""
    torch = require_module("torch")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator, dtype=torch.float32).numpy() for _ in range(num_steps)]


_SAMPLERS = {}


def our_sampler(name, schedule):
    """One compiled loop per (sampler, schedule): traced once for all the step counts."""
    key = (name, tuple(sorted(schedule.config().items())))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = DiffusionSampler(FormulaUNet(), schedule, DIM, sampler=name)
    return _SAMPLERS[key]


def inputs_for(rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    context = rng.standard_normal((SHAPE[0], 2, 5)).astype(np.float32)
    uncond = rng.standard_normal((1, 2, 5)).astype(np.float32)
    return noise, context, uncond


def check_parity(name, schedule, num_steps, eta=0.0):
    noise, context, uncond = inputs_for()
    seed = 7
    expected, rounding = diffusers_trajectory(name, schedule, noise, context, np.repeat(uncond, SHAPE[0], axis=0),
                                    num_steps, eta, seed)
    sampler = our_sampler(name, schedule)
    noises = torch_noises(seed, num_steps)
    inputs = sampler.inputs(noise, context, uncond, num_steps, GUIDANCE, eta=eta, step_noise=lambda i: noises[i])
    assert int(inputs["num_steps"][0]) == len(expected) == num_steps
    checked = sorted({1, 2, 3, num_steps // 2, num_steps - 1, num_steps} & set(range(1, num_steps + 1)))
    for k in checked:  # the real loop, stopped after k steps
        inputs["num_steps"][:] = k
        got = np.asarray(sampler.model.predict_on_batch(inputs), np.float64)
        error = np.abs(got - expected[k - 1]).max()
        assert error < TOLERANCE + rounding[k - 1], f"{name}: step {k} of {num_steps} differs by {error:.2e}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_matches_diffusers_on_stable_diffusions_schedule(name, prediction_type, spacing):
    schedule = NoiseSchedule("scaled_linear", prediction_type, timestep_spacing=spacing)
    for num_steps in (1, 5, 20, 50):
        check_parity(name, schedule, num_steps)


# Karras sigmas at zero terminal SNR are left out: their lower end is sigma_min = sqrt((1 - a_0) / a_0)
# with a_0 within 1e-4 of 1 after the float32 rescale, where torch's float32 sqrt (not correctly
# rounded: 1 ulp off on a fifth of the table) moves diffusers' own sigma_min by 1e-3 and its
# rounded timesteps by one; every other table here is bit for bit diffusers'.
@pytest.mark.parametrize("name, zero_snr, spacing",
                         [(name, False, "leading") for name in SAMPLERS]
                         + [(name, True, "trailing") for name in SAMPLERS if name != "dpmsolver++_karras"])
def test_every_sampler_matches_diffusers_on_cosine_v_prediction(name, zero_snr, spacing):
    """The small-image presets' recipe (cosine, v-prediction), and zero terminal SNR with trailing spacing."""
    schedule = NoiseSchedule("squaredcos_cap_v2", "v_prediction", rescale_betas_zero_snr=zero_snr,
                             timestep_spacing=spacing)
    for num_steps in (3, 15):
        check_parity(name, schedule, num_steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_eta_matches_diffusers_given_the_same_noise(prediction_type):
    schedule = NoiseSchedule("scaled_linear", prediction_type)
    for num_steps in (1, 5, 20):
        check_parity("ddim", schedule, num_steps, eta=0.7)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_steps_guidance_and_noise_changes_reuse_the_compiled_loop(name):
    """Stochastic samplers too: their per-step noise comes in fixed-size chunks."""
    unet = FormulaUNet()
    sampler = DiffusionSampler(unet, NoiseSchedule(), DIM, sampler=name)
    first = sampler.sample(*inputs_for(0), num_steps=5, guidance_scale=2.0)
    traces = unet.traces
    assert traces >= 1
    second = sampler.sample(*inputs_for(1), num_steps=23, guidance_scale=4.0)
    sampler.sample(*inputs_for(2), num_steps=1, guidance_scale=0.0)
    sampler.sample(*inputs_for(2), num_steps=15, guidance_scale=1.0)
    assert unet.traces == traces, f"{name} retraced"
    assert not np.allclose(first, second)


def test_ddim_with_eta_reuses_the_compiled_loop_across_step_counts():
    unet = FormulaUNet()
    sampler = DiffusionSampler(unet, NoiseSchedule(), DIM, sampler="ddim")
    sampler.sample(*inputs_for(0), num_steps=5, guidance_scale=2.0, eta=0.5)
    traces = unet.traces
    sampler.sample(*inputs_for(1), num_steps=37, guidance_scale=3.0, eta=1.0)
    assert unet.traces == traces


@pytest.mark.parametrize("name, eta", [("euler_ancestral", 0.0), ("ddim", 0.7)])
@pytest.mark.parametrize("num_steps", [7, 10, 23])
def test_chunked_noise_gives_the_whole_loops_images(name, eta, num_steps):
    """`sample` runs a stochastic sampler NOISE_CHUNK steps per call; one call over all steps is the same."""
    sampler = our_sampler(name, NoiseSchedule("squaredcos_cap_v2", "v_prediction"))
    noises = torch_noises(3, num_steps)
    noise, context, uncond = inputs_for(4)
    whole = sampler.model.predict_on_batch(
        sampler.inputs(noise, context, uncond, num_steps, GUIDANCE, eta=eta, step_noise=lambda i: noises[i]))
    drawn = []

    def in_order(i):  # the generator's draw ignores i: the chunks must ask for the steps in order
        drawn.append(i)
        return noises[i]

    chunked = sampler.sample(noise, context, uncond, num_steps, GUIDANCE, eta=eta, step_noise=in_order)
    assert drawn == list(range(num_steps))
    np.testing.assert_allclose(chunked, np.asarray(whole), rtol=0, atol=1e-6)


def test_unknown_sampler_and_eta_off_ddim_are_refused():
    with pytest.raises(ModelSettingsError, match="unknown sampler 'heun'"):
        make_scheduler("heun", NoiseSchedule())
    with pytest.raises(ModelSettingsError, match="eta"):
        make_scheduler("unipc", NoiseSchedule()).tables(10, eta=0.5)


def test_generator_ancestral_same_seed_same_images_whatever_the_batch_size():
    """Euler ancestral's per-step noise comes from each image's own generator, as DDIM's with eta > 0."""
    name = "euler_ancestral"
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck

    model = ck.build_model("tiny", get_spec("digits"), init_seed=0)
    labels = np.array([0, 1, 2, 2, 9])
    one = model.generate(labels, num_steps=4, guidance_scale=2.0, seed=3, batch_size=2, sampler=name)
    two = model.generate(labels, num_steps=4, guidance_scale=2.0, seed=3, batch_size=5, sampler=name)
    np.testing.assert_array_equal(one, two)
    other_seed = model.generate(labels, num_steps=4, guidance_scale=2.0, seed=4, batch_size=5, sampler=name)
    assert not np.array_equal(one, other_seed)


def test_the_loop_model_round_trips_its_config():
    from Models.diffusion.sampler import GuidedSampler

    x, t_emb, context = keras.Input((4, 4, 3)), keras.Input((32,)), keras.Input((2, 5))
    unet = keras.Model([x, t_emb, context], keras.layers.Conv2D(3, 1)(x))  # built-in layers only: serialisable
    schedule = NoiseSchedule("squaredcos_cap_v2", "v_prediction", timestep_spacing="trailing")
    model = DiffusionSampler(unet, schedule, 32, clip_sample=True, sampler="unipc").model
    clone = GuidedSampler.from_config(model.get_config())
    assert clone.scheduler.name == "unipc" and clone.scheduler.schedule.config() == schedule.config()
    assert (clone.clip_sample, clone.prediction_type, clone.timestep_embedding_dim) == (True, "v_prediction", 32)
