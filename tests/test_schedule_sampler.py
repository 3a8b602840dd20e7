"""The noise schedule, DDIM timesteps, the class encoder and the guided DDIM sampler."""

import keras
import numpy as np
import pytest
from keras import ops

from Models.diffusion.class_encoder import ClassEncoder
from Models.diffusion.presets import get_preset
from Models.diffusion.sampler import DDIMSampler, DiffusionSampler
from Models.diffusion.schedule import NoiseSchedule
from Models.diffusion.unet import build_unet, timestep_embedding
from Models.errors import ModelSettingsError


def test_alphas_cumprod_match_keras_cv_table():
    from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

    schedule = NoiseSchedule()
    assert schedule.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(schedule.alphas_cumprod, np.array(_ALPHAS_CUMPROD), atol=1e-6)
    assert schedule.betas[0] == pytest.approx(0.00085) and schedule.betas[-1] == pytest.approx(0.012)


def test_ddim_timesteps_are_sd_leading_spacing_with_offset_one():
    schedule = NoiseSchedule()
    np.testing.assert_array_equal(schedule.ddim_timesteps(50), np.arange(0, 1000, 20)[::-1] + 1)
    # 1000 // 7 = 142: diffusers gives 7 steps (853 ... 1), not range(1, 1000, 142)'s 8.
    np.testing.assert_array_equal(schedule.ddim_timesteps(7), np.arange(7)[::-1] * 142 + 1)
    timesteps, alpha_t, alpha_prev, sigma = schedule.ddim_coefficients(7)
    ac = schedule.alphas_cumprod
    np.testing.assert_allclose(alpha_t, ac[timesteps])
    np.testing.assert_allclose(alpha_prev[:-1], ac[timesteps[:-1] - 142])
    assert alpha_prev[-1] == ac[0]  # set_alpha_to_one=False: the final alpha is alpha_bar[0]
    assert np.all(sigma == 0)
    _, _, _, sigma = schedule.ddim_coefficients(7, eta=1.0)
    assert np.all(sigma > 0)
    for bad in (0, 1000, 2.5):
        with pytest.raises(ModelSettingsError):
            schedule.ddim_timesteps(bad)


def test_add_noise_formula():
    schedule = NoiseSchedule()
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4, 3))
    t = np.array([0, 500, 999])
    got = ops.convert_to_numpy(schedule.add_noise(ops.convert_to_tensor(x0, "float32"),
                                                  ops.convert_to_tensor(noise, "float32"), t))
    ac = schedule.alphas_cumprod[t][:, None, None, None]
    np.testing.assert_allclose(got, np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise, atol=1e-5)


def test_class_encoder_shapes_config_and_unconditional_context():
    encoder = ClassEncoder(num_classes=5, context_length=3, context_dim=8, hidden=7)
    one_hot = ops.one_hot(ops.convert_to_tensor([0, 4]), 5)
    assert tuple(encoder(one_hot).shape) == (2, 3, 8)
    kernel_shapes = sorted(tuple(w.shape) for w in encoder.weights)
    assert kernel_shapes == [(5, 7), (7,), (7, 24)]  # the second Dense has no bias
    # The unconditional context is the encoder on the zero vector: bias1 @ W2.
    uncond = ops.convert_to_numpy(encoder(ops.zeros((1, 5))))
    expected = ops.convert_to_numpy(encoder.dense1.bias) @ ops.convert_to_numpy(encoder.dense2.kernel)
    np.testing.assert_allclose(uncond.reshape(-1), expected, atol=1e-6)
    clone = ClassEncoder.from_config(encoder.get_config())
    assert clone.context_length == 3 and clone.hidden == 7


class StandInUNet(keras.layers.Layer):
    """eps = 0.3 x + mean(context) + 0.01 * mean(t_emb): cheap, and depends on every input.

    Records the batch sizes it sees (when run eagerly) so the test can count UNet calls.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def call(self, inputs):
        x, t_emb, context = inputs
        self.calls.append(int(x.shape[0]))
        c = ops.mean(context, axis=(1, 2))[:, None, None, None]
        t = ops.mean(t_emb, axis=1)[:, None, None, None]
        return 0.3 * x + c + 0.01 * t


def reference_ddim(noise, context, uncond, num_steps, scale, eta, step_noise, dim):
    """diffusers-style DDIM with CFG in float64 NumPy, the stand-in UNet evaluated twice per step."""
    schedule = NoiseSchedule()
    timesteps = schedule.ddim_timesteps(num_steps)
    ratio = 1000 // num_steps
    ac = schedule.alphas_cumprod
    x = noise.astype(np.float64)

    def unet(x, t, ctx):
        t_emb = ops.convert_to_numpy(timestep_embedding(ops.convert_to_tensor([float(t)]), dim))
        return 0.3 * x + ctx.mean(axis=(1, 2))[:, None, None, None] + 0.01 * t_emb.mean()

    for i, t in enumerate(timesteps):
        eps_u, eps_c = unet(x, t, uncond), unet(x, t, context)
        eps = eps_u + scale * (eps_c - eps_u)
        a_t = ac[t]
        a_prev = ac[t - ratio] if t - ratio >= 0 else ac[0]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * eps
        if eta > 0:
            x = x + sigma * step_noise(i)
    return x


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sampler_matches_reference_ddim_with_one_batched_unet_call_per_step(eta):
    dim = 16
    stand_in = StandInUNet()
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((3, 4, 4, 3)).astype("float32")
    context = rng.standard_normal((3, 2, 5)).astype("float32")
    uncond = rng.standard_normal((1, 2, 5)).astype("float32")
    step_noises = rng.standard_normal((6, 3, 4, 4, 3)).astype("float32")

    sampler = DDIMSampler(stand_in, timestep_embedding_dim=dim)
    sampler.model.compile(run_eagerly=True)  # eager, so the stand-in can count its calls
    sampler.sample(noise, context, uncond, num_steps=1, guidance_scale=2.5)  # builds the step
    stand_in.calls.clear()
    got = sampler.sample(noise, context, uncond, num_steps=6, guidance_scale=2.5, eta=eta,
                         step_noise=lambda i: step_noises[i])
    expected = reference_ddim(noise, context, np.repeat(uncond, 3, axis=0), 6, 2.5, eta,
                              lambda i: step_noises[i], dim)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert stand_in.calls == [6] * 6  # one call per step, both halves batched together


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    stand_in = StandInUNet()
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((2, 4, 4, 3)).astype("float32")
    context = rng.standard_normal((2, 2, 5)).astype("float32")
    uncond = rng.standard_normal((2, 2, 5)).astype("float32")
    sampler = DDIMSampler(stand_in, timestep_embedding_dim=8)
    cond_only = sampler.sample(noise, context, uncond, 4, guidance_scale=1.0)
    np.testing.assert_allclose(cond_only, sampler.sample(noise, context, context, 4, 5.0), atol=1e-5)
    uncond_only = sampler.sample(noise, context, uncond, 4, guidance_scale=0.0)
    np.testing.assert_allclose(uncond_only, sampler.sample(noise, uncond, uncond, 4, 5.0), atol=1e-5)
    assert not np.allclose(cond_only, uncond_only)
    # Per-image guidance scales: each image as if sampled alone with its own scale.
    mixed = sampler.sample(noise, context, uncond, 4, guidance_scale=np.array([1.0, 0.0]))
    np.testing.assert_allclose(mixed[0], cond_only[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], uncond_only[1], atol=1e-5)


def test_sampler_runs_the_tiny_unet_compiled_and_is_deterministic():
    preset = get_preset("tiny")
    keras.utils.set_random_seed(0)
    unet = build_unet(preset, image_size=8)
    encoder = ClassEncoder(3, preset.context_length, preset.context_dim, hidden=8)
    context = encoder(ops.one_hot(ops.convert_to_tensor([0, 1, 2, 1]), 3))
    uncond = encoder(ops.zeros((1, 3)))
    noise = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32")
    sampler = DDIMSampler(unet, timestep_embedding_dim=preset.timestep_embedding_dim)
    first = sampler.sample(noise, context, uncond, num_steps=3, guidance_scale=3.0)
    second = sampler.sample(noise, context, uncond, num_steps=3, guidance_scale=3.0)
    assert first.shape == (4, 8, 8, 3) and np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", ["dpmsolver++_karras", "euler_ancestral"])
def test_samplers_whose_update_reads_the_sample_give_the_same_floats_call_after_call(name):
    """Same seed, same images at a production-like batch: 64 images of 28 px. Before the loop's update
    waited for the UNet's output, TensorFlow ran its terms beside the UNet and the last bits changed
    from call to call; Euler ancestral failed this test in both of two runs (BENCHMARKS.md, "Fixed:
    the update waits for the UNet's output")."""
    preset = get_preset("tiny")
    keras.utils.set_random_seed(0)
    unet = build_unet(preset, image_size=28)
    encoder = ClassEncoder(5, preset.context_length, preset.context_dim, hidden=8)
    labels = np.arange(64) % 5
    context = encoder(ops.one_hot(ops.convert_to_tensor(labels), 5))
    uncond = encoder(ops.zeros((1, 5)))
    noise = np.random.default_rng(0).standard_normal((64, 28, 28, 3)).astype("float32")
    sampler = DiffusionSampler(unet, timestep_embedding_dim=preset.timestep_embedding_dim, sampler=name)
    inputs = sampler.inputs(noise, context, uncond, num_steps=2, guidance_scale=2.0)
    first = np.asarray(sampler.model.predict_on_batch(inputs))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(sampler.model.predict_on_batch(inputs)), first)
