"""Numerical parity with diffusers/PyTorch: small random diffusers models, no download.

Each test builds a diffusers model from a config (random weights, every norm and bias
perturbed so that a swapped or untouched tensor shows), converts it with
`Models/diffusion/diffusers_convert.py`, and requires the same outputs, float32, max
abs difference < 1e-4:

- UNet2DConditionModel noise prediction: an SD-1.x-layout config (the same block types
  and structure as SD 1.x, small widths), an SD-2.x-layout config (linear projections,
  per-level heads) and our `tiny` layout (pixel space, attention at the lower level);
- the reverse direction: our UNet written as a diffusers folder and read back by
  diffusers' own `from_pretrained`, then saved by diffusers and read back by us (tiny,
  RGB and grey, `small`, and a three-level layout with attention at the lowest only);
- AutoencoderKL encode / decode: our autoencoder builder is not parameterised by width,
  so this runs at full width (~84M parameters) with random weights at 16 px;
- our DDIM sampler with classifier-free guidance against diffusers' `DDIMScheduler`
  (Stable Diffusion's config) over a few steps;
- a (briefly trained) diffusers UNet installed with `convert_diffusers.py` generates the
  same PNGs through `generate_dataset.py` as a diffusers-side loop (a bound in uint8 levels).

torch and diffusers come from requirements-dev.txt; without them these tests skip
(and fail under CI=true).
"""

import dataclasses
import json

import keras
import numpy as np
import pytest
from conftest import require_module
from keras import ops

torch = require_module("torch")
diffusers = require_module("diffusers")
# One thread: these models are tiny, and PyTorch's worker threads spin-wait (minutes instead
# of seconds) when the CPU is shared with other jobs.
torch.set_num_threads(1)

from Models.diffusion import diffusers_convert as dc  # noqa: E402
from Models.diffusion.presets import get_preset  # noqa: E402
from Models.diffusion.sampler import DDIMSampler  # noqa: E402
from Models.diffusion.schedule import NoiseSchedule  # noqa: E402
from Models.diffusion.unet import build_unet, timestep_embedding  # noqa: E402

TOLERANCE = 1e-4
CONTEXT_LENGTH = 7

# SD 1.x's structure (3 attention levels + one without, 2 ResBlocks per level, 1x1-conv
# projections, the same heads everywhere) at 1/10 of its widths.
SD1_LAYOUT = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8, cross_attention_dim=48, norm_num_groups=8,
)
# SD 2.x's: linear projections, heads per level (64 wide in SD 2.x, 8 wide here).
SD2_LAYOUT = dict(SD1_LAYOUT, attention_head_dim=(4, 8, 16, 16), cross_attention_dim=64,
                  use_linear_projection=True)


def _perturb(module, seed):
    """Random values for every parameter diffusers initialises to constants (norms, biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(base + 0.1 * noise)
    return module.eval()


def _diffusers_unet(config, seed=0):
    torch.manual_seed(seed)
    return _perturb(diffusers.UNet2DConditionModel.from_config({**config, "sample_size": 8}), seed)


def _state(module):
    return {name: value.detach().numpy() for name, value in module.state_dict().items()}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def _compare_unets(diffusers_unet, unet, preset, latent_size, seed=0):
    """Max abs difference of the noise predictions on the same random inputs."""
    rng = np.random.default_rng(seed)
    channels = dc.unet_image_channels(unet)
    x = rng.standard_normal((2, latent_size, latent_size, channels)).astype("float32")
    context = rng.standard_normal((2, CONTEXT_LENGTH, preset.context_dim)).astype("float32")
    timesteps = np.array([999, 1])  # both ends of the sinusoidal embedding's range
    ours = unet([ops.convert_to_tensor(x),
                 timestep_embedding(ops.convert_to_tensor(timesteps), preset.timestep_embedding_dim),
                 ops.convert_to_tensor(context)])
    with torch.no_grad():
        theirs = diffusers_unet(_nchw(x), torch.from_numpy(timesteps), torch.from_numpy(context)).sample
    theirs = _nhwc(theirs)
    assert np.abs(theirs).max() > 0.1  # a real signal, not a vanishing one
    return float(np.abs(np.asarray(ours) - theirs).max())


@pytest.mark.parametrize("layout, base", [(SD1_LAYOUT, "sd1"), (SD2_LAYOUT, "sd2")], ids=["sd1", "sd2"])
def test_unet_matches_diffusers_for_sd_layouts(layout, base):
    model = _diffusers_unet(layout)
    preset = dc.unet_preset_from_config(dict(model.config))
    # The preset the converter derives = the SD preset with the config's widths and heads.
    expected = dataclasses.replace(
        get_preset(base), name="diffusers", pretrained=False, gelu_approximate=False,
        level_channels=layout["block_out_channels"],
        level_heads=tuple(np.broadcast_to(layout["attention_head_dim"], 4).tolist()),
        context_dim=layout["cross_attention_dim"], norm_groups=8, timestep_embedding_dim=32)
    assert preset == expected
    # 16x16 latents: 2x2 at the lowest level, so the middle self-attention has 4 tokens to mix
    unet = build_unet(preset, image_size=128, context_length=CONTEXT_LENGTH)
    dc.load_unet_weights(unet, preset, _state(model))
    assert _compare_unets(model, unet, preset, latent_size=16) < TOLERANCE


@pytest.fixture(scope="module")
def tiny_pair():
    """A random diffusers UNet of our tiny layout and our tiny UNet (any size) converted from it."""
    tiny = get_preset("tiny")
    model = _diffusers_unet(dc.diffusers_unet_config(tiny), seed=2)
    assert dc.unet_preset_from_config(dict(model.config), base="tiny") == tiny
    unet = build_unet(tiny, image_size=None, context_length=CONTEXT_LENGTH)
    dc.load_unet_weights(unet, tiny, _state(model))
    return model, unet


def test_unet_matches_diffusers_for_the_tiny_layout(tiny_pair):
    model, unet = tiny_pair
    assert _compare_unets(model, unet, get_preset("tiny"), latent_size=12) < TOLERANCE


# Three levels, attention at the lowest only (a candidate layout of `small`).
THREE_LEVELS = dict(level_channels=(32, 64, 128), level_attention=(False, False, True), level_heads=(4, 4, 4))


@pytest.mark.parametrize("preset_name, channels, change", [
    ("tiny", 3, dict(linear_attention_projection=True)), ("tiny", 1, {}), ("small", 1, {}), ("small", 1, THREE_LEVELS),
], ids=["tiny-rgb-linear", "tiny-grey", "small-grey", "three-levels-grey"])
def test_our_unet_exported_loads_in_diffusers_with_the_same_output(tmp_path, preset_name, channels, change):
    """The reverse direction: a UNet trained here, sampled by diffusers' own loader, and back."""
    preset = dataclasses.replace(get_preset(preset_name), **change)
    linear = preset.linear_attention_projection
    keras.utils.set_random_seed(3)
    unet = build_unet(preset, image_size=8, context_length=CONTEXT_LENGTH, image_channels=channels)
    rng = np.random.default_rng(3)
    for variable in unet.weights:  # like a trained model: no constant norms or zero biases
        variable.assign(variable.numpy() + 0.05 * rng.standard_normal(variable.shape).astype("float32"))
    dc.save_unet_as_diffusers(unet, preset, tmp_path / "unet")
    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert model.config.use_linear_projection == linear
    assert model.config.in_channels == model.config.out_channels == channels
    assert _compare_unets(model, unet, preset, latent_size=8, seed=3) < TOLERANCE
    # diffusers' own save, read by us: the preset and the channel count come from its config
    model.save_pretrained(tmp_path / "saved")
    config, tensors = dc.read_diffusers_model(tmp_path / "saved")
    back_preset = dc.unet_preset_from_config(config)
    assert all(getattr(back_preset, key) == getattr(preset, key) for key in dc.UNET_ARCHITECTURE_FIELDS)
    back = build_unet(back_preset, image_size=None, context_length=CONTEXT_LENGTH,
                      image_channels=config["in_channels"])
    dc.load_unet_weights(back, back_preset, tensors)
    assert _compare_unets(model, back, back_preset, latent_size=8, seed=4) < TOLERANCE


def test_autoencoder_matches_diffusers_encode_and_decode():
    torch.manual_seed(1)
    vae = _perturb(diffusers.AutoencoderKL(**dc.VAE_CONFIG), seed=1)
    encoder, decoder = dc.build_diffusers_autoencoder(image_size=16)
    dc.load_autoencoder_weights(encoder, decoder, _state(vae))
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    latents = 0.5 * rng.standard_normal((2, 2, 2, 4)).astype("float32")
    with torch.no_grad():
        # keras-cv's (and our) encoder returns the posterior mean x scaling factor, no sampling.
        mean = vae.encode(_nchw(images)).latent_dist.mean
        theirs_latents = _nhwc(mean * vae.config.scaling_factor)
        theirs_images = _nhwc(vae.decode(_nchw(latents) / vae.config.scaling_factor).sample)
    ours_latents = np.asarray(encoder(ops.convert_to_tensor(images)))
    ours_images = np.asarray(decoder(ops.convert_to_tensor(latents)))
    assert np.abs(theirs_images).max() > 0.1 and np.abs(theirs_latents).max() > 0.01
    assert np.abs(ours_latents - theirs_latents).max() < TOLERANCE
    assert np.abs(ours_images - theirs_images).max() < TOLERANCE


def _diffusers_ddim(model, noise, context, uncond, num_steps, guidance):
    """Stable Diffusion's DDIM loop in diffusers: one batched UNet call per step, CFG, eta 0."""
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(num_steps)
    x = _nchw(noise)
    context, uncond = torch.from_numpy(np.array(context)), torch.from_numpy(np.array(uncond))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(torch.cat([x, x]), t, torch.cat([uncond, context])).sample
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return scheduler, _nhwc(x)


def test_ddim_sampler_with_guidance_matches_diffusers_ddim_scheduler(tiny_pair):
    tiny = get_preset("tiny")
    model, unet = tiny_pair
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((3, 8, 8, 3)).astype("float32")
    context = rng.standard_normal((3, CONTEXT_LENGTH, tiny.context_dim)).astype("float32")
    uncond = np.repeat(rng.standard_normal((1, CONTEXT_LENGTH, tiny.context_dim)), 3, 0).astype("float32")
    num_steps, guidance = 5, 3.0

    scheduler, theirs = _diffusers_ddim(model, noise, context, uncond, num_steps, guidance)
    schedule = NoiseSchedule()
    timesteps, alpha_t, alpha_prev, _ = schedule.ddim_coefficients(num_steps)
    np.testing.assert_array_equal(timesteps, scheduler.timesteps.numpy())
    np.testing.assert_allclose(alpha_t, scheduler.alphas_cumprod.numpy()[timesteps], rtol=1e-6)
    assert scheduler.final_alpha_cumprod.item() == pytest.approx(alpha_prev[-1], rel=1e-6)

    ours = DDIMSampler(unet, schedule, tiny.timestep_embedding_dim).sample(
        noise, context, uncond[:1], num_steps=num_steps, guidance_scale=guidance)
    assert np.abs(theirs - noise).max() > 0.5  # the trajectory went somewhere
    assert np.abs(ours - theirs).max() < TOLERANCE


# Pixel-level bound for a converted model generating through generate_dataset.py against
# the same model in a diffusers-side loop (measured: BENCHMARKS.md).
MAX_LEVEL_DIFFERENCE = 1        # uint8 levels
MAX_SHARE_DIFFERENT = 0.01      # of all pixel values


def _train_briefly(model, contexts, uncond, steps=50, seed=0):
    """A few Adam steps of the noise-prediction loss on digits (x0 of a random UNet saturates)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images / 8.0 - 1.0).astype("float32"))[:, None]  # grey: 1 channel
    labels = torch.from_numpy(digits.target)
    contexts, uncond = torch.from_numpy(np.array(contexts)), torch.from_numpy(np.array(uncond))
    alphas_cumprod = torch.from_numpy(NoiseSchedule().alphas_cumprod.astype("float32"))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        chosen = torch.randint(0, len(images), (64,), generator=generator)
        t = torch.randint(0, 1000, (64,), generator=generator)
        noise = torch.randn((64, 1, 8, 8), generator=generator)
        alpha = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = alpha.sqrt() * images[chosen] + (1 - alpha).sqrt() * noise
        # 10% unconditional, so that guidance has a direction to extrapolate from
        drop = (torch.rand(64, generator=generator) < 0.1).view(-1, 1, 1)
        context = torch.where(drop, uncond, contexts[labels[chosen]])
        loss = ((model(x_t, t, context).sample - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_converted_unet_generates_the_same_images_through_generate_dataset(tmp_path, monkeypatch, run_script):
    """digits, tiny: a diffusers UNet -> our checkpoint -> generate_dataset.py PNGs == a diffusers loop.

    digits is grey: the UNets on both sides have 1 channel in and out, our PNGs are mode L.
    """
    from PIL import Image

    import convert_diffusers
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.class_encoder import ClassEncoder
    from Models.diffusion.generator import initial_noise, to_uint8_images
    from Utils.paths import diffusion_checkpoint_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    tiny, spec = get_preset("tiny"), get_spec("digits")
    # A class-encoder checkpoint as SD_adapting.py's enc stage leaves it: random class encoder,
    # and (tiny trains its UNet in that stage) some UNet, which the fine-tuned one replaces.
    enc_dir = diffusion_checkpoint_dir(0, spec.name, "enc")
    enc_dir.mkdir(parents=True)
    (enc_dir / ck.SETTINGS_FILE).write_text(json.dumps(
        {**ck.model_identity(tiny, spec, True, 5), "stage": "enc"}))
    keras.utils.set_random_seed(5)
    encoder = ClassEncoder(10, tiny.context_length, tiny.context_dim, hidden=tiny.class_encoder_hidden)
    encoder.build((None, 10))
    enc_unet = build_unet(tiny, image_size=None, context_length=tiny.context_length, image_channels=spec.channels)
    ck.save_parts(ck.weights_path(enc_dir, 1), {"class_encoder": encoder, "unet": enc_unet})
    contexts = np.asarray(encoder(ops.eye(10)))
    uncond = np.asarray(encoder(ops.zeros((1, 10))))
    # A diffusers UNet trained a little in PyTorch, saved by diffusers, installed as fine-tuned epoch 1.
    config = dc.diffusers_unet_config(tiny, image_channels=spec.channels)
    diffusers_unet = _train_briefly(_diffusers_unet(config, seed=4), contexts, uncond)
    diffusers_unet.save_pretrained(tmp_path / "diffusers_unet")
    assert convert_diffusers.main(["to-keras", str(tmp_path / "diffusers_unet"), "--dataset", "digits",
                                   "--enc_epoch", "1", "--dif_epoch", "1"]) == 0

    steps, ugs, seed, per_class = 10, 3.0, 7, 2
    out = tmp_path / "generated"
    result = run_script("generate_dataset.py", "--dataset", "digits", "--preset", "tiny",
                        "--img_total", 10 * per_class, "--enc_epoch", 1, "--dif_epoch", 1,
                        "--inf_steps", steps, "--ugs", ugs, "--seed", seed, "--out_dir", out,
                        "--grid_per_class", 0)
    assert result.returncode == 0, result.stderr[-2000:]

    labels = np.repeat(np.arange(10), per_class)
    indices = np.tile(np.arange(per_class), 10)
    pngs = [Image.open(out / f"class_{c:02d}" / f"img_{n}.png") for c, n in zip(labels, indices)]
    assert {png.mode for png in pngs} == {"L"}
    ours = np.stack([np.asarray(png.convert("RGB")) for png in pngs])
    # The diffusers side: our class encoder's contexts, the same initial noise, DDIMScheduler;
    # to_uint8_images repeats its single channel to three, as PIL's L -> RGB does.
    noise, _ = initial_noise(seed, labels, indices, (8, 8, 1))
    _, x0 = _diffusers_ddim(diffusers_unet, noise, contexts[labels],
                            np.repeat(uncond, len(labels), 0), steps, ugs)
    theirs = to_uint8_images(x0)

    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    saturated = np.mean((theirs == 0) | (theirs == 255))
    print(f"max {difference.max()} levels, {np.mean(difference > 0):.4%} of values differ, "
          f"{saturated:.1%} saturated, float max diff n/a")
    assert saturated < 0.5  # mostly real values, not clipped noise
    assert difference.max() <= MAX_LEVEL_DIFFERENCE
    assert np.mean(difference > 0) <= MAX_SHARE_DIFFERENT
