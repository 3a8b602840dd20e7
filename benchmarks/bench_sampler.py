"""Sampler throughput: our guided DDIM (one batched UNet call per step) against keras-cv's loop.

sd1: keras-cv's own `StableDiffusion.generate_image` (two UNet `predict_on_batch`
calls per step, eager DDIM arithmetic between them) with random weights: its
private `_diffusion_model` / `_decoder` are set to random-weight keras-cv models
so nothing downloads, and the same weights are copied into ours. Same image
size, batch, steps, guidance scale, contexts (our class encoder's) and XLA
setting; the images/s of both, measured side by side in one process,
alternating, after a warm-up run of each (compilation excluded).

tiny: the same comparison against a keras-cv-style loop (the loop of
`generate_image`, written out for our UNet: two separate `predict_on_batch`
calls per step), with the same timesteps, so the two must also agree
numerically (printed).

    python benchmarks/bench_sampler.py                       # both, CPU-sized defaults
    python benchmarks/bench_sampler.py --which sd1 --batch 2 --steps 5 --xla
    python benchmarks/bench_sampler.py --which sd1 --conv2d_only   # without the matmul convolutions
"""

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from benchmarks.timing import best_of_alternating  # noqa: E402
from Models.diffusion import layers  # noqa: E402
from Models.diffusion.class_encoder import ClassEncoder  # noqa: E402
from Models.diffusion.trainer import DiffusionTrainer  # noqa: E402
from Models.diffusion.presets import get_preset  # noqa: E402
from Models.diffusion.sampler import DDIMSampler  # noqa: E402
from Models.diffusion.schedule import NoiseSchedule  # noqa: E402
from Models.diffusion.unet import build_unet, timestep_embedding  # noqa: E402


def copy_weights(source, target):
    """Variable by variable (no 3.4 GB intermediate list); the layer order is keras-cv's."""
    if len(source.weights) != len(target.weights):
        raise ValueError(f"{source.name} has {len(source.weights)} weights, {target.name} {len(target.weights)}")
    for theirs, ours in zip(source.weights, target.weights):
        if tuple(theirs.shape) != tuple(ours.shape):
            raise ValueError(f"shape mismatch: {theirs.path} {theirs.shape} vs {ours.path} {ours.shape}")
        ours.assign(theirs.value)


def bench_sd1(batch, steps, guidance, repeats, xla, conv2d_only=False):
    from keras_cv.models import StableDiffusion
    from keras_cv.src.models.stable_diffusion.decoder import Decoder
    from keras_cv.src.models.stable_diffusion.diffusion_model import DiffusionModel

    from Models.diffusion.autoencoder import build_image_decoder

    preset, size, length = get_preset("sd1"), 128, get_preset("sd1").context_length
    keras.utils.set_random_seed(0)
    reference = StableDiffusion(img_height=size, img_width=size, jit_compile=xla)
    kc_unet = DiffusionModel(size, size, length, download_weights=False)
    kc_decoder = Decoder(size, size, download_weights=False)
    kc_unet.compile(jit_compile=xla)
    kc_decoder.compile(jit_compile=xla)
    reference._diffusion_model, reference._decoder = kc_unet, kc_decoder

    unet = build_unet(preset, size, length)
    copy_weights(kc_unet, unet)
    convs = [layer for layer in unet._flatten_layers() if isinstance(layer, layers.PaddedConv2D)]
    if conv2d_only:
        for conv in convs:
            conv.as_matmul = False  # read when the sampler is traced, below
    print(f"sd1: {sum(conv.as_matmul for conv in convs)} of our UNet's {len(convs)} convolutions "
          "run as one matrix product (large kernels on small maps), the others as Conv2D")
    decoder = build_image_decoder(size)
    copy_weights(kc_decoder, decoder)
    encoder = ClassEncoder(10, length, preset.context_dim, name="class_encoder")
    model = DiffusionTrainer.from_preset(preset, 10, size, unet=unet, class_encoder=encoder, image_decoder=decoder)

    labels = np.arange(batch) % 10
    context, uncond = model.contexts(labels)
    # keras-cv's unconditional context is its text encoder's; ours is the class encoder's.
    reference._get_unconditional_context = lambda: uncond
    rng = np.random.default_rng(0)
    check = [rng.standard_normal((1, 16, 16, 4)).astype("float32"),
             timestep_embedding(ops.convert_to_tensor([501.0]), 320), ops.convert_to_numpy(context[:1])]
    parity = float(np.max(np.abs(kc_unet.predict_on_batch(check) - unet.predict_on_batch(check))))
    print(f"sd1: same UNet weights, max |keras-cv - ours| on one call: {parity:.2e}")

    noise = rng.standard_normal((batch, 16, 16, 4)).astype("float32")

    def ours():
        model.generate(labels, num_steps=steps, guidance_scale=guidance, seed=0, batch_size=batch,
                       jit_compile=xla)

    def theirs():
        reference.generate_image(context, batch_size=batch, num_steps=steps,
                                 unconditional_guidance_scale=guidance, diffusion_noise=noise)

    ours_s, theirs_s = best_of_alternating([ours, theirs], repeats)
    latents = rng.standard_normal((batch, 16, 16, 4)).astype("float32")
    (decode_s,) = best_of_alternating([lambda: decoder.predict_on_batch(latents)], repeats)
    print(f"sd1: decoding {batch} images takes {decode_s:.2f} s of both; the DDIM loops alone: ours "
          f"{ours_s - decode_s:.2f} s, keras-cv {theirs_s - decode_s:.2f} s, ratio "
          f"{(theirs_s - decode_s) / (ours_s - decode_s):.2f}x")
    return ours_s, theirs_s


def keras_cv_style_loop(unet, schedule, noise, context, uncond, steps, guidance, dim):
    """keras-cv's `generate_image` loop for our UNet: two predict_on_batch calls per step."""
    latent = noise
    timesteps, alpha_t, alpha_prev, _ = schedule.ddim_coefficients(steps)
    batch = noise.shape[0]
    uncond = ops.repeat(uncond, batch, axis=0)
    for i, t in enumerate(timesteps):
        latent_prev = latent
        t_emb = ops.repeat(timestep_embedding(ops.convert_to_tensor([float(t)]), dim), batch, axis=0)
        eps_uncond = unet.predict_on_batch([latent, t_emb, uncond])
        eps = unet.predict_on_batch([latent, t_emb, context])
        eps = ops.array(eps_uncond + guidance * (eps - eps_uncond))
        pred_x0 = (latent_prev - math.sqrt(1 - alpha_t[i]) * eps) / math.sqrt(alpha_t[i])
        latent = ops.array(eps) * math.sqrt(1.0 - alpha_prev[i]) + math.sqrt(alpha_prev[i]) * pred_x0
    return ops.convert_to_numpy(latent)


def bench_tiny(batch, steps, guidance, repeats, xla, image_size=8):
    preset = get_preset("tiny")
    keras.utils.set_random_seed(0)
    unet = build_unet(preset, image_size)
    unet.compile(jit_compile=xla)
    encoder = ClassEncoder(10, preset.context_length, preset.context_dim, hidden=preset.class_encoder_hidden)
    context = encoder(ops.one_hot(ops.convert_to_tensor(np.arange(batch) % 10), 10))
    uncond = encoder(ops.zeros((1, 10)))
    noise = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3)).astype("float32")
    schedule = NoiseSchedule()
    sampler = DDIMSampler(unet, schedule, preset.timestep_embedding_dim, jit_compile=xla)

    def ours():
        return sampler.sample(noise, context, uncond, steps, guidance)

    def theirs():
        return keras_cv_style_loop(unet, schedule, noise, context, uncond, steps, guidance,
                                   preset.timestep_embedding_dim)

    difference = float(np.max(np.abs(ours() - theirs())))
    print(f"tiny: max |ours - keras-cv-style loop| after {steps} steps: {difference:.2e}")
    return best_of_alternating([ours, theirs], repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=("sd1", "tiny", "both"), default="both")
    parser.add_argument("--batch", type=int, default=None, help="images per call (sd1: 2, tiny: 250)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (sd1: 5, tiny: 25)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best of)")
    parser.add_argument("--xla", action="store_true", help="XLA for both (keras-cv's default is XLA on)")
    parser.add_argument("--conv2d_only", action="store_true",
                        help="ours with every convolution as Keras' Conv2D, none as one matrix product "
                             "(Models/diffusion/layers.py): what the batched, compiled loop alone gives")
    args = parser.parse_args(argv)
    rows = []
    for which in (("sd1", "tiny") if args.which == "both" else (args.which,)):
        batch = args.batch or {"sd1": 2, "tiny": 250}[which]
        steps = args.steps or {"sd1": 5, "tiny": 25}[which]
        if which == "sd1":
            ours_s, theirs_s = bench_sd1(batch, steps, args.guidance, args.repeats, args.xla, args.conv2d_only)
        else:
            ours_s, theirs_s = bench_tiny(batch, steps, args.guidance, args.repeats, args.xla)
        baseline = "keras-cv StableDiffusion.generate_image" if which == "sd1" else "keras-cv-style loop"
        rows.append((which, batch, steps, batch / ours_s, batch / theirs_s, theirs_s / ours_s, baseline))
        print(f"{which}: ours {batch / ours_s:.3f} img/s, {baseline} {batch / theirs_s:.3f} img/s, "
              f"ratio {theirs_s / ours_s:.2f}x", flush=True)
    print("\n| preset | batch | steps | ours (img/s) | baseline (img/s) | ratio | baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for which, batch, steps, ours_ips, theirs_ips, ratio, baseline in rows:
        print(f"| {which} | {batch} | {steps} | {ours_ips:.3f} | {theirs_ips:.3f} | {ratio:.2f}x | {baseline} |")


if __name__ == "__main__":
    main()
