"""The samplers side by side: loop throughput at equal steps, and quality against UNet calls.

speed: images/s of the guided loop per sampler (random weights, one batched UNet call per
step, each loop compiled once and warmed up, then timed alternating: benchmarks/timing.py),
beside the DDIM loop as it was before the scheduler seam (a copy kept here, `OldGuidedDDIM`),
so the seam's cost shows. tiny at 32 px by default; sd1 (Stable Diffusion v1's UNet at 128 px,
16 x 16 latents) with --sd1 (large: keep the batch and steps small on a CPU).

quality: trains `small` (the enc stage's model) from scratch on a dataset once (default digits,
the preset's epochs; bench_recipe.py's functions), then for each sampler and step count generates
x1 (as many images as the real training split) and scores CAS x1 (a ResNet20, the quick budget's
8 epochs; --classifier_runs K: the mean of K classifier seeds, which RetinaMNIST needs, see
bench_classifier.py noise) and KID against the real test split; rows as JSON lines into --out,
after a first row that scores the real training split the same way (the floor). Each classifier's
top-1 and each set's KID/FID also go to --out's `.scores.jsonl` as they are made (bench_recipe.py's
`ScoreLog`); with --resume, rows --out already holds (same settings) are not scored again, and a row
a kill cut short takes the scores it had and makes only the missing ones.

    python benchmarks/bench_samplers.py speed                              # tiny, every sampler
    python benchmarks/bench_samplers.py speed --sd1 --batch 2 --steps 5
    python benchmarks/bench_samplers.py quality --steps 5,10,15,20,50      # tens of CPU minutes
    python benchmarks/bench_samplers.py quality --dataset retinamnist --data_dir ../shared/data \
        --cells ddim:50,dpmsolver++_karras:15 --weights /tmp/retina.weights.h5   # chosen cells; model kept
    python benchmarks/bench_samplers.py pixels --dataset retinamnist --data_dir ../shared/data \
        --weights /tmp/retina.weights.h5         # mean pixel per cell and timestep spacing (too bright?)
    python benchmarks/bench_samplers.py repeat --dataset retinamnist \
        --weights /tmp/retina.weights.h5         # the same inputs through each loop 4 times: one result?
    python benchmarks/bench_samplers.py quality ... --timestep_spacing trailing   # cells with another spacing
    python benchmarks/bench_samplers.py quality ... --resume      # again after a kill: only what is missing
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from Utils.cli import positive_int, run_cli  # noqa: E402

from benchmarks.bench_recipe import check_weights_name  # noqa: E402
from benchmarks.timing import best_of_alternating  # noqa: E402
from Models.diffusion.presets import TIMESTEP_SPACINGS  # noqa: E402
from Models.diffusion.schedule import MAX_INFERENCE_STEPS, split_prediction  # noqa: E402
from Models.diffusion.schedulers import SAMPLERS  # noqa: E402
from Models.diffusion.unet import timestep_embedding  # noqa: E402


class OldGuidedDDIM(keras.Model):
    """The guided DDIM loop before the scheduler seam (its last version, verbatim but for the docstrings)."""

    def __init__(self, unet, timestep_embedding_dim=320, prediction_type="epsilon", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.unet = unet
        self.timestep_embedding_dim = int(timestep_embedding_dim)
        self.prediction_type = prediction_type

    def guided_step(self, latent, timestep, contexts, guidance, alpha_t, alpha_prev, sigma, noise):
        t_emb = timestep_embedding(timestep, self.timestep_embedding_dim)
        output = self.unet([ops.concatenate([latent, latent], axis=0),
                           ops.concatenate([t_emb, t_emb], axis=0), contexts])
        out_uncond, out_cond = ops.split(ops.cast(output, "float32"), 2, axis=0)

        def per_image(value):
            return ops.reshape(ops.cast(value, "float32"), (-1, 1, 1, 1))

        guided = out_uncond + per_image(guidance) * (out_cond - out_uncond)
        alpha_t, alpha_prev, sigma = per_image(alpha_t), per_image(alpha_prev), per_image(sigma)
        x0, eps = split_prediction(self.prediction_type, guided, latent, alpha_t)
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


def old_ddim_sampler(unet, schedule, dim, jit_compile):
    """sample(noise, context, uncond, steps, guidance) through `OldGuidedDDIM`, as the old DDIMSampler."""
    model = OldGuidedDDIM(unet, dim, prediction_type=schedule.prediction_type, name="old_guided_ddim")
    model.compile(jit_compile=jit_compile)

    def sample(noise, context, uncond, num_steps, guidance):
        batch = noise.shape[0]
        timesteps, alpha_t, alpha_prev, sigma = schedule.ddim_coefficients(num_steps)

        def table(values, fill):
            padded = np.full(MAX_INFERENCE_STEPS, fill, dtype="float32")
            padded[:len(values)] = values
            return np.broadcast_to(padded, (batch, MAX_INFERENCE_STEPS)).copy()

        return np.asarray(model.predict_on_batch({
            "latent": noise, "context": context, "uncond_context": ops.repeat(uncond[:1], batch, axis=0),
            "guidance": np.full((batch,), guidance, "float32"), "num_steps": np.full((batch,), num_steps, "int32"),
            "timestep": table(timesteps, 0), "alpha_t": table(alpha_t, 1), "alpha_prev": table(alpha_prev, 1),
            "sigma": table(sigma, 0), "noise": np.zeros((batch, 1) + noise.shape[1:], "float32")}))

    return sample


def bench_speed(preset_name, image_size, batch, steps, guidance, repeats, samplers, xla):
    from Models.diffusion.class_encoder import ClassEncoder
    from Models.diffusion.generator import schedule_for
    from Models.diffusion.presets import get_preset
    from Models.diffusion.sampler import DiffusionSampler
    from Models.diffusion.unet import build_unet

    preset = get_preset(preset_name)
    keras.utils.set_random_seed(0)
    unet = build_unet(preset, image_size)
    latent_size, channels = image_size // preset.downsample, preset.latent_channels
    encoder = ClassEncoder(10, preset.context_length, preset.context_dim, hidden=preset.class_encoder_hidden)
    context = encoder(ops.one_hot(ops.convert_to_tensor(np.arange(batch) % 10), 10))
    uncond = encoder(ops.zeros((1, 10)))
    noise = np.random.default_rng(0).standard_normal((batch, latent_size, latent_size, channels)).astype("float32")
    schedule = schedule_for(preset)
    dim = preset.timestep_embedding_dim
    runners = {"ddim (before the seam)": old_ddim_sampler(unet, schedule, dim, xla)}
    for name in samplers:
        sampler = DiffusionSampler(unet, schedule, dim, jit_compile=xla, sampler=name)
        runners[name] = (lambda s: lambda *a: s.sample(*a))(sampler)
    same = np.max(np.abs(runners["ddim (before the seam)"](noise, context, uncond, steps, guidance)
                         - runners["ddim"](noise, context, uncond, steps, guidance))) if "ddim" in runners else None
    if same is not None:
        print(f"{preset_name}: max |DDIM before - DDIM through the seam| = {same:.1e}")
    seconds = best_of_alternating([lambda r=r: r(noise, context, uncond, steps, guidance)
                                   for r in runners.values()], repeats)
    base = seconds[0]
    rows = [(preset_name, image_size, batch, steps, name, batch / s, base / s) for name, s in zip(runners, seconds)]
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]:.2f} | {row[6]:.2f}x |", flush=True)
    return rows


def _append_row(row, out):
    from Utils.io import append_json_line

    print(json.dumps(row), flush=True)
    append_json_line(out, row)


def quality_cells(args):
    """(sampler, steps) pairs to score: --cells when given, else every --samplers x --steps."""
    if not args.cells:
        return [(name, int(n)) for n in args.steps.split(",") for name in args.samplers]
    cells = []
    for cell in args.cells.split(","):
        name, _, steps = cell.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"error: --cells wants SAMPLER:STEPS items ({', '.join(SAMPLERS)}), not {cell!r}")
        cells.append((name, int(steps)))
    return cells


# What makes two quality rows the same measurement: everything but the results.
ROW_IDENTITY = ("sampler", "steps", "timestep_spacing", "guidance", "dataset", "train_subset", "preset", "epochs",
                "classifier_epochs", "classifier_runs", "seed")


def row_identity(row):
    """The row's ROW_IDENTITY values (rows from before `classifier_runs` was recorded: as many as it has top-1s)."""
    runs = len(row.get("cas_x1_top1_runs", [None]))
    # As JSON text: hashable whatever the value (the training subset is a dict).
    return tuple(json.dumps(row.get(key, runs if key == "classifier_runs" else None), sort_keys=True)
                 for key in ROW_IDENTITY)


def scored_rows(out):
    """The identities of the rows already in `out` (none when it does not exist; a row line a kill cut
    short is not a row, so its cell is scored again from the scores the log kept)."""
    from Utils.io import read_json_lines

    return {row_identity(row) for row in read_json_lines(out)}


def bench_quality(args):
    from benchmarks.bench_recipe import (ScoreLog, cas_scorer, distance_scorer, mean_and_runs, trained_or_read,
                                         x1_counts)
    from Data.loaders import load_dataset, train_subset_record
    from Data.registry import get_spec
    from Models.diffusion.presets import get_preset

    preset, spec = get_preset(args.preset), get_spec(args.dataset)
    epochs = args.epochs or preset.enc_epochs
    guidance = preset.default_guidance_scale if args.guidance is None else args.guidance
    spacing = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {}
    subset = train_subset_record(args.train_subset)
    scoring = {"dataset": spec.name, **({"train_subset": subset} if subset else {}),
               "classifier_epochs": args.classifier_epochs, "classifier_runs": args.classifier_runs, "seed": args.seed}
    floor_identity = {"sampler": "real training split", **scoring}
    cells = [{"sampler": name, "steps": steps, **spacing, "guidance": guidance, "preset": preset.name,
              "epochs": epochs, **scoring} for name, steps in ([] if args.floor_only else quality_cells(args))]
    done = scored_rows(args.out) if args.resume else set()
    cells = [cell for cell in cells if row_identity(cell) not in done]
    score_floor = not args.no_floor and row_identity(floor_identity) not in done
    if args.resume:
        print(f"--resume: {len(done)} rows in {args.out}; to score: {'the floor, ' if score_floor else ''}"
              f"{len(cells)} cells", flush=True)
    if not cells and not score_floor:
        return

    splits = load_dataset(spec.name, data_dir=args.data_dir, train_subset=args.train_subset)
    cas = cas_scorer(spec, splits, args.classifier_epochs, 64, args.seed, runs=args.classifier_runs)
    distances = distance_scorer(splits, args.seed)
    # Each classifier's top-1 and each set's distances, as made: a row cut short by a kill loses one score.
    log = ScoreLog(Path(args.out).with_suffix(".scores.jsonl"), args.resume)
    if score_floor:
        # The floor: the real training split scored like a generated set (same extractor, same classifier).
        real_kid, real_fid = log.distances(distances, floor_identity, "x1", splits.x_train)
        top1 = log.cas(cas, floor_identity, "x1", splits.x_train, splits.y_train)
        _append_row({**floor_identity, **mean_and_runs(top1, "cas_x1_top1"), "kid": real_kid, "fid": real_fid},
                    args.out)
    if not cells:
        return
    model, _ = trained_or_read(args.weights, preset, spec, splits, preset.recipe(), epochs, preset.enc_batch_size,
                               preset.enc_lr, args.seed)
    labels = np.repeat(np.arange(spec.num_classes), x1_counts(spec, splits, "balanced"))
    for cell in cells:
        started = time.perf_counter()
        with model.sampling_weights():
            images = model.generate(labels, num_steps=cell["steps"], guidance_scale=guidance, seed=args.seed,
                                    batch_size=250, sampler=cell["sampler"], timestep_spacing=args.timestep_spacing)
        generate_s = time.perf_counter() - started
        kid, fid = log.distances(distances, cell, "x1", images)
        top1 = log.cas(cas, cell, "x1", images, labels)
        _append_row({**cell, "unet_calls": cell["steps"], **mean_and_runs(top1, "cas_x1_top1"),
                     "kid": kid, "fid": fid, "generate_s": round(generate_s, 1)}, args.out)


def kept_model(preset, spec, weights, seed):
    """The preset's model with the sampling weights `quality --weights` kept."""
    from Models.diffusion import checkpoints as ck

    model = ck.build_model(preset, spec, random_init=True, init_seed=seed, seed=seed)
    model.load_weights(weights)
    return model


def check_kept_weights(weights):
    if not Path(weights).is_file():
        raise SystemExit(f"error: --weights {weights} is not a file (write one with quality --weights)")


def bench_pixels(args):
    """Mean pixel value (0..255) of a few images per cell and timestep spacing, from kept weights,
    beside the real training split's: a cheap check for samplers that come out too bright or dark."""
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Models.diffusion.presets import get_preset

    preset, spec = get_preset(args.preset), get_spec(args.dataset)
    real = load_dataset(spec.name, data_dir=args.data_dir).x_train
    print(f"| real training split | | | {real.mean():.1f} |")
    labels = np.arange(args.images) % spec.num_classes
    guidance = preset.default_guidance_scale if args.guidance is None else args.guidance
    model = kept_model(preset, spec, args.weights, args.seed)
    for spacing in args.spacings.split(","):
        for name, steps in quality_cells(args):
            images = model.generate(labels, num_steps=steps, guidance_scale=guidance, seed=args.seed,
                                    batch_size=args.images, sampler=name, timestep_spacing=spacing)
            print(f"| {name} | {steps} | {spacing} | {images.mean():.1f} |", flush=True)


def bench_repeat(args):
    """Calls each cell's compiled loop `--repeats` times on the same inputs (kept weights, one batch
    of `--images`) and prints how many different results (hashes of the float32 output) came out:
    1 is what "same seed, same images" needs."""
    import hashlib

    from Data.registry import get_spec
    from Models.diffusion.generator import index_within_class, initial_noise
    from Models.diffusion.presets import get_preset

    preset, spec = get_preset(args.preset), get_spec(args.dataset)
    labels = np.arange(args.images) % spec.num_classes
    indices = index_within_class(labels)
    guidance = preset.default_guidance_scale if args.guidance is None else args.guidance
    model = kept_model(preset, spec, args.weights, args.seed)
    noise, _ = initial_noise(args.seed, labels, indices, model.backbone.noise_shape)
    print("| sampler | steps | images | calls | different results |")
    print("| --- | --- | --- | --- | --- |")
    with model.sampling_weights():
        context, uncond = model.contexts(labels, indices, args.seed)
        for name, steps in quality_cells(args):
            loop = model.generator.sampler(False, name)
            hashes = [hashlib.sha256(loop.sample(noise, context, uncond, steps, guidance).tobytes()).hexdigest()
                      for _ in range(args.repeats)]
            print(f"| {name} | {steps} | {args.images} | {args.repeats} | {len(set(hashes))} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="which", required=True)
    speed = sub.add_parser("speed", help="loop throughput per sampler at equal steps")
    speed.add_argument("--tiny_size", type=int, default=32, help="tiny's image size")
    speed.add_argument("--batch", type=int, default=None, help="images per call (tiny: 64, sd1: 2)")
    speed.add_argument("--steps", type=int, default=None, help="steps (tiny: 20, sd1: 5)")
    speed.add_argument("--guidance", type=float, default=3.0)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--sd1", action="store_true", help="also Stable Diffusion v1's UNet at 128 px (large)")
    speed.add_argument("--no_tiny", action="store_true")
    speed.add_argument("--xla", action="store_true")
    quality = sub.add_parser("quality", help="CAS x1 and KID per sampler and step count")
    quality.add_argument("--dataset", default="digits")
    quality.add_argument("--data_dir", default=None)
    quality.add_argument("--train_subset", type=positive_int, default=None, metavar="N",
                         help="train and score on a seeded, stratified N of the real training images")
    quality.add_argument("--preset", default="small")
    quality.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    quality.add_argument("--steps", default="5,10,15,20,50")
    quality.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    quality.add_argument("--classifier_epochs", type=int, default=8)
    quality.add_argument("--classifier_runs", type=int, default=1,
                         help="classifiers (seeds --seed, --seed + 1, ...) per scored set; the row holds their "
                              "mean top-1 and each run's")
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--out", default="bench_samplers.jsonl")
    quality.add_argument("--floor_only", action="store_true", help="only the real training split's row")
    quality.add_argument("--no_floor", action="store_true",
                         help="skip the real training split's row (the scorer is deterministic: the same seeds "
                              "give the figure another run already measured)")
    quality.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                         help="sample with this spacing (default: the preset's)")
    quality.add_argument("--weights", default=None, metavar="FILE.weights.h5",
                         help="the trained model's sampling weights: read when the file exists (no training), "
                              "written after training otherwise")
    quality.add_argument("--resume", action="store_true",
                         help="skip the floor and the cells whose rows --out already holds with the same settings, "
                              "and take the scores --out's .scores.jsonl holds for the rest (a long grid killed, "
                              "or spread over days, goes on where it stopped)")
    quality.add_argument("--cells", default=None, metavar="SAMPLER:STEPS,...",
                         help="score only these sampler/step pairs (e.g. ddim:50,dpmsolver++_karras:15) "
                              "instead of every --samplers x --steps")
    pixels = sub.add_parser("pixels", help="mean pixel of a few images per cell and spacing, from --weights")
    pixels.add_argument("--weights", required=True, metavar="FILE.weights.h5", help="written by quality --weights")
    pixels.add_argument("--dataset", default="digits")
    pixels.add_argument("--data_dir", default=None)
    pixels.add_argument("--preset", default="small")
    pixels.add_argument("--cells", default="ddim:50,unipc:10,dpmsolver++:10,dpmsolver++_karras:10")
    pixels.add_argument("--steps", default=None)  # quality_cells' fallback; --cells is always given here
    pixels.add_argument("--spacings", default="leading,trailing,linspace")
    pixels.add_argument("--images", type=int, default=40)
    pixels.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    pixels.add_argument("--seed", type=int, default=0)
    repeat = sub.add_parser("repeat", help="the same inputs through each cell's loop several times: same result?")
    repeat.add_argument("--weights", required=True, metavar="FILE.weights.h5", help="written by quality --weights")
    repeat.add_argument("--dataset", default="digits")
    repeat.add_argument("--preset", default="small")
    repeat.add_argument("--cells", default="ddim:2,dpmsolver++_karras:2")
    repeat.add_argument("--steps", default=None)  # quality_cells' fallback; --cells is always given here
    repeat.add_argument("--images", type=int, default=250, help="one batch of this many images")
    repeat.add_argument("--repeats", type=int, default=4)
    repeat.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    repeat.add_argument("--seed", type=int, default=0)
    for p in (speed, quality):
        p.add_argument("--samplers", nargs="+", choices=tuple(SAMPLERS), default=list(SAMPLERS))
    args = parser.parse_args(argv)
    if args.which == "pixels":
        quality_cells(args)
        for spacing in args.spacings.split(","):
            if spacing not in TIMESTEP_SPACINGS:
                raise SystemExit(f"error: --spacings: each one of {', '.join(TIMESTEP_SPACINGS)}, not {spacing!r}")
        check_kept_weights(args.weights)
        return bench_pixels(args)
    if args.which == "repeat":
        quality_cells(args)
        if args.images < 1 or args.repeats < 2:
            raise SystemExit("error: --images must be at least 1 and --repeats at least 2")
        check_kept_weights(args.weights)
        return bench_repeat(args)
    if args.which == "quality":
        quality_cells(args)  # bad arguments stop here, before minutes of training
        if args.classifier_runs < 1:
            raise SystemExit(f"error: --classifier_runs must be at least 1, not {args.classifier_runs}")
        if args.floor_only and args.no_floor:
            raise SystemExit("error: --floor_only and --no_floor leave nothing to score")
        check_weights_name(args.weights)
        return bench_quality(args)
    print("| preset | px | batch | steps | sampler | img/s | vs DDIM before the seam |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    if not args.no_tiny:
        bench_speed("tiny", args.tiny_size, args.batch or 64, args.steps or 20, args.guidance, args.repeats,
                    args.samplers, args.xla)
    if args.sd1:
        bench_speed("sd1", 128, args.batch or 2, args.steps or 5, args.guidance, args.repeats, args.samplers,
                    args.xla)


if __name__ == "__main__":
    run_cli(main)  # bad input (e.g. a --train_subset larger than the split): one line, exit 2
