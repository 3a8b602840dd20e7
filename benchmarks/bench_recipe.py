"""The from-scratch recipe, one element at a time: train, generate x1, score CAS x1, KID and speckle.

One run = one row of BENCHMARKS.md's ablation table ("From-scratch recipe"):

1. trains a pixel-space preset from scratch on the real training split (the enc stage's
   model: class encoder + UNet), with the preset's recipe and the overrides given;
2. generates x1 (as many images as the real training split, balanced over classes) with
   the trained weights' moving average where there is one;
3. CAS x1 (..xN with --multiples): a ResNet20 (default: the `quick` budget's 8 epochs,
   batch 64) trained on the generated set, validated and tested on real data; KID and FID
   of x1 against the real test split (ResNet20 features trained on the real training split,
   as `hyp_opt.py --objective kid`); the speckle figure (share of pixels whose channels
   disagree by more than 48/255). --with_real adds the real row under the same protocol
   and the real training split's KID/FID (the floor). --classifier_runs K trains K classifiers per
   set (seeds --seed .. --seed + K - 1) and records their mean top-1 and each run's: one run of
   this scorer spreads by several points on RetinaMNIST (`bench_classifier.py noise`).

Rows are appended to `--out` (JSON lines); a sample grid goes beside it; `--save_images FILE.npz`
keeps the generated set (images and labels, every multiple) for scoring under other classifier
protocols. Each classifier's top-1 and each set's KID/FID are also appended, as each is made, to
`--out`'s `.scores.jsonl` beside it: a killed run started again with `--resume` (and `--weights`,
so that the model is read, not trained again) scores only what that file lacks; its row holds the
scores an unbroken run would have given, and a run that had finished is not written twice (nor its
images generated again).
`--filter_pool K` generates K candidates for every image of x1..xN and keeps, of each class, those a
ResNet20 trained on the real training split gives the highest probability of their label
(`most_typical`; the filtering classifier has a seed of its own, `--filter_seed`).
`--train_subset N` trains and scores on a seeded, stratified N of the real training images (a
large dataset on a small machine; the rows and scores record it).

    python benchmarks/bench_recipe.py --tag recipe                       # small's defaults
    python benchmarks/bench_recipe.py --tag no_ema --ema_decay 0
    python benchmarks/bench_recipe.py --tag long --multiples 3 --classifier_runs 3 --weights W.weights.h5 \\
        --resume                                                          # again after a kill: what is missing
    python benchmarks/bench_recipe.py --tag paper --preset tiny --beta_schedule scaled_linear \\
        --prediction_type epsilon --timestep_spacing leading --cond_dropout 0 --ema_decay 0 \\
        --snr_gamma 0 --rgb
"""

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from Models.diffusion.presets import (BETA_SCHEDULES, CONDITIONINGS, DEFAULT_CONDITIONING,  # noqa: E402
                                      PREDICTION_TYPES, TEXT_CONDITIONINGS, TIMESTEP_SPACINGS)
from Models.diffusion.schedulers import DEFAULT_SAMPLER, SAMPLERS  # noqa: E402
from Utils.cli import positive_int, run_cli  # noqa: E402

# The filtering classifier's seed: apart from the scoring classifiers' (--seed .. --seed + runs - 1).
FILTER_SEED = 100

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--tag", required=True, help="the row's name")
parser.add_argument("--dataset", default="digits")
parser.add_argument("--data_dir", default=None)
parser.add_argument("--train_subset", type=positive_int, default=None, metavar="N",
                    help="train and score on a seeded, stratified N of the real training images (x1 = N images); "
                         "validation and test splits whole")
parser.add_argument("--preset", default="small")
parser.add_argument("--epochs", type=int, default=None, help="diffusion epochs (default: the preset's enc_epochs)")
parser.add_argument("--batch_size", type=int, default=None)
parser.add_argument("--lr", type=float, default=None)
parser.add_argument("--steps", default=None,
                    help="sampling steps, or several separated by commas: one row each from the same "
                         "trained model (default: the preset's)")
parser.add_argument("--guidance", default=None,
                    help="guidance scale, or several separated by commas: one row each from the same trained "
                         "model (default: the preset's)")
parser.add_argument("--classifier_epochs", type=int, default=8)
parser.add_argument("--classifier_batch_size", type=int, default=64)
parser.add_argument("--classifier_runs", type=int, default=1,
                    help="classifiers (seeds --seed, --seed + 1, ...) per scored set; the row holds their mean "
                         "top-1 and each run's")
parser.add_argument("--multiples", type=int, default=1, help="generate N x the training set; CAS of x1..xN")
parser.add_argument("--with_real", action="store_true",
                    help="also the real row under the same classifier protocol, and the real-train KID/FID floor")
parser.add_argument("--rgb", action="store_true", help="model grey data as three free channels")
parser.add_argument("--level_channels", default=None,
                    help="another UNet size: channels per level, e.g. 32,64,128 (attention at the lowest only)")
parser.add_argument("--class_proportions", default="balanced",
                    help="the generated set's classes: balanced (the paper's), real (the real training split's "
                         "counts), or both separated by a comma: one row each from the same generated images")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--filter_pool", type=positive_int, default=1, metavar="K",
                    help="generate K candidates per image and keep, of each class, those a ResNet20 trained on the "
                         "real training split finds most typical of their label; 1: keep all")
parser.add_argument("--filter_seed", type=int, default=FILTER_SEED,
                    help="the seed of that ResNet20 (default: one apart from the scoring classifiers' seeds)")
parser.add_argument("--save_images", default=None,
                    help="also write each generated set (all multiples; with --filter_pool every candidate and its "
                         "probability under the filter) to this .npz, for other classifier protocols")
parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
parser.add_argument("--weights", default=None, metavar="FILE.weights.h5",
                    help="the trained model's sampling weights: read when the file exists (no training), "
                         "written after training otherwise")
parser.add_argument("--out", default="bench_recipe.jsonl")
parser.add_argument("--resume", action="store_true",
                    help="take the scores already in --out's .scores.jsonl for the same settings instead of "
                         "training those classifiers again (pair it with --weights); a sampling whose rows, "
                         "grid and saved set are all written is not generated again")
parser.add_argument("--cond_dropout", type=float)
parser.add_argument("--ema_decay", type=float)
parser.add_argument("--snr_gamma", type=float)
parser.add_argument("--prediction_type", choices=PREDICTION_TYPES)
parser.add_argument("--beta_schedule", choices=BETA_SCHEDULES)
parser.add_argument("--rescale_betas_zero_snr", action=argparse.BooleanOptionalAction, default=None)
parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS)
parser.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                    help="mirror training images left-right at random (default: the preset's)")
parser.add_argument("--balanced_sampling", action=argparse.BooleanOptionalAction, default=None,
                    help="draw each epoch's training images with replacement, every class equally likely "
                         "(default: the preset's)")
parser.add_argument("--lr_warmup_steps", type=int,
                    help="linear learning-rate warmup from 0 over this many steps (default: the preset's)")
parser.add_argument("--conditioning", default=DEFAULT_CONDITIONING,
                    choices=[m for m in CONDITIONINGS if m not in TEXT_CONDITIONINGS],
                    help="the class code the class encoder reads (README, \"Conditioning methods\")")


def train_from_scratch(preset, model_spec, splits, recipe, epochs, batch_size, lr, seed, conditioning=None):
    """The enc stage's model trained from scratch: (model, Keras history, wall s, CPU s)."""
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.optimizer import make_optimizer
    from Models.diffusion.trainer import TrainBatches

    model = ck.build_model(preset, model_spec, random_init=True, init_seed=seed, seed=seed, recipe=recipe,
                           conditioning=conditioning)
    batches = TrainBatches(splits.x_train, splits.y_train, batch_size, model.image_size, seed=seed,
                           random_flip=recipe["random_flip"], balanced_sampling=recipe["balanced_sampling"])
    model.compile(optimizer=make_optimizer(lr, epochs * len(batches), recipe["ema_decay"],
                                           warmup_steps=recipe["lr_warmup_steps"]))
    started, cpu_started = time.perf_counter(), time.process_time()
    history = model.fit(batches, epochs=epochs, verbose=2)
    # CPU seconds are what the ablation compares: wall time depends on whatever else runs.
    return model, history, time.perf_counter() - started, time.process_time() - cpu_started


def trained_or_read(weights, preset, model_spec, splits, recipe, epochs, batch_size, lr, seed, conditioning=None):
    """`train_from_scratch`, or the sampling weights read from `weights` when that file exists (no
    training); after training they are written there, so more rows can be scored from the same model.
    Returns (model, facts about the training for the row). `conditioning`: a ConditioningSpec (default the
    class encoder)."""
    from Models.diffusion import checkpoints as ck

    if weights and Path(weights).exists():
        model = ck.build_model(preset, model_spec, random_init=True, init_seed=seed, seed=seed, recipe=recipe,
                               conditioning=conditioning)
        model.load_weights(weights)
        print(f"{preset.name} on {model_spec.name}: sampling weights read from {weights}", flush=True)
        return model, {"weights_read_from": str(weights)}
    model, history, train_s, train_cpu_s = train_from_scratch(preset, model_spec, splits, recipe, epochs,
                                                              batch_size, lr, seed, conditioning)
    print(f"trained {preset.name} on {model_spec.name}: {epochs} epochs, {train_s:.0f} s, "
          f"final loss {history.history['loss'][-1]:.4f}", flush=True)
    if weights:
        from Utils.io import atomic_path

        with model.sampling_weights(), atomic_path(weights) as tmp:
            model.save_weights(tmp)
    return model, {"final_loss": float(history.history["loss"][-1]), "train_s": round(train_s, 1),
                   "train_cpu_s": round(train_cpu_s, 1)}


def check_weights_name(weights):
    """Keras writes weights only to a name ending in .weights.h5: stop at once on another."""
    if weights and not str(weights).endswith(".weights.h5"):
        raise SystemExit(f"error: --weights must end in .weights.h5, not {weights!r}")


def x1_counts(spec, splits, proportions):
    """Images per class of x1: the real training split's size, balanced over classes or in its counts."""
    import numpy as np

    if proportions == "real":
        return np.bincount(splits.y_train.reshape(-1), minlength=spec.num_classes)
    if proportions != "balanced":
        raise SystemExit(f"--class_proportions: balanced or real, not {proportions!r}")
    return np.bincount(np.arange(len(splits.y_train)) % spec.num_classes, minlength=spec.num_classes)


def multiple_indices(labels, per_class_x1, k):
    """Indices of x_k in a generated set: the first k x (x1 count) images of each class."""
    import numpy as np

    return np.concatenate([np.flatnonzero(labels == c)[:k * per_class_x1[c]] for c in range(len(per_class_x1))])


def label_probability(classifier, images, labels, batch_size=256):
    """Each image's probability, under `classifier` (a Keras model ending in a softmax), of its own label."""
    import numpy as np

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"label_probability needs one label per image (got {len(images)} images, "
                         f"{len(labels)} labels)")
    probabilities = np.asarray(classifier.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    return probabilities[np.arange(len(labels)), labels]


def most_typical(labels, probability, per_class, pool):
    """Indices of the images to keep: of each class c, the `per_class[c]` images with the highest
    `probability` among that class's first `pool * per_class[c]` images (in their order in `labels`).

    The indices come class by class, each class's most typical first (equal probabilities: the earlier
    image first). With `pool` 1 every candidate is kept: the set without selection, in another order.
    Filtering generated images by a classifier trained on real data is a lever of the literature on
    synthetic training sets; the paper keeps every image. On RetinaMNIST it moved three generators' CAS by
    +3.0, -2.7 and +0.2 points (BENCHMARKS.md, "Keeping the most typical of three candidates").
    """
    import numpy as np

    labels, probability = np.asarray(labels).reshape(-1), np.asarray(probability, dtype=np.float64).reshape(-1)
    if len(labels) != len(probability):
        raise ValueError(f"most_typical needs one probability per image (got {len(probability)} for "
                         f"{len(labels)} images)")
    if int(pool) != pool or pool < 1:
        raise ValueError(f"pool: expected a whole number of candidates per kept image, at least 1, not {pool!r}")
    if not np.all(np.isfinite(probability)):
        raise ValueError("most_typical: the probabilities hold NaN or infinity")
    pool, kept = int(pool), []
    for c, count in enumerate(int(n) for n in per_class):
        candidates = np.flatnonzero(labels == c)[:pool * count]
        if len(candidates) < pool * count:
            raise ValueError(f"class {c}: {len(candidates)} candidates, {pool * count} needed "
                             f"for {count} images from {pool} each")
        best = np.argsort(-probability[candidates], kind="stable")[:count]
        kept.append(candidates[best])
    return np.concatenate(kept) if kept else np.zeros(0, np.int64)


def train_on_real_validation(spec, splits, x, y, config, seed, pool=None):
    """A ResNet20 of `config` trained on (x, y) with `seed`, validated on the real validation split: the
    scoring classifiers' training and the filter's."""
    import keras

    from Models.classifier import train_classifier

    keras.utils.set_random_seed(seed)
    classifier, _ = train_classifier(x, y, splits.x_val, splits.y_val, spec.num_classes, config=config, seed=seed,
                                     verbose=0, pool=pool)
    return classifier


def cas_scorer(spec, splits, classifier_epochs, classifier_batch_size, seed, runs=1):
    """x, y -> the real test top-1 of ResNet20s trained on them (validated on the real split), one per
    classifier seed seed, seed + 1, ..., seed + runs - 1. `cas(x, y, record)` passes each run through
    `record(classifier_seed, train)`, which returns `train()`'s top-1 or one it kept (`ScoreLog.record`).

    The scorer is deterministic but chaotic: inputs that differ below what a PNG stores move it by
    as much as another seed does (BENCHMARKS.md, "The scorer's own spread"), so where sets are
    compared, a set's figure is the mean of several runs (`mean_and_runs`)."""
    from Models.classifier import ClassifierConfig, ClassifierPool, evaluate_classifier

    config = ClassifierConfig(epochs=classifier_epochs, batch_size=classifier_batch_size)
    pool = ClassifierPool()  # every classifier is scored before the next trains: one compiled model for all

    def train(x, y, classifier_seed):
        classifier = train_on_real_validation(spec, splits, x, y, config, classifier_seed, pool=pool)
        return evaluate_classifier(classifier, splits.x_test, splits.y_test, spec.label_names)["top1"]

    def cas(x, y, record=lambda classifier_seed, train: train()):
        return [record(s, lambda: train(x, y, s)) for s in range(seed, seed + runs)]

    return cas


def filter_scorer(spec, splits, classifier_epochs, classifier_batch_size, seed):
    """(images, labels) -> each image's probability of its label under a ResNet20 trained on the real
    training split (the scorer's protocol, validated on the real validation split), trained at the first call.
    Not in the scorers' pool: their trainings would overwrite its weights before a later sampling is filtered."""
    import functools

    from Models.classifier import ClassifierConfig

    @functools.cache
    def classifier():
        config = ClassifierConfig(epochs=classifier_epochs, batch_size=classifier_batch_size)
        return train_on_real_validation(spec, splits, splits.x_train, splits.y_train, config, seed)

    return lambda images, labels: label_probability(classifier(), images, labels)


def mean_and_runs(top1, key):
    """A row's entries for one scored set: `key` the mean top-1; `key`_runs each run's, where there are several."""
    mean = sum(top1) / len(top1)
    return {key: mean, f"{key}_runs": top1} if len(top1) > 1 else {key: mean}


def distance_scorer(splits, seed):
    """x -> (KID, FID) against the real test split, ResNet20 features trained on the real training split
    (at the first call: a resumed run that has every distance already trains no extractor)."""
    import functools

    from Metrics.distribution import frechet_distance_from_features, kernel_inception_distance
    from Metrics.quality import kid_extractor

    @functools.cache
    def extractor_and_test_features():
        extractor = kid_extractor(splits.x_train, splits.y_train, seed=seed)
        return extractor, extractor.embed(splits.x_test).features

    def distances(x):
        extractor, test_features = extractor_and_test_features()
        features = extractor.embed(x).features
        kid, _ = kernel_inception_distance(test_features, features, seed=seed)
        return float(kid), float(frechet_distance_from_features(test_features, features))

    return distances


def as_read_back(value):
    """`value` as JSON gives it back (tuples as lists), so that what is kept compares with what is read."""
    return json.loads(json.dumps(value))


class ScoreLog:
    """Every score of a run, one JSON line each as it is made: {"settings", "set", "score", "value"}.

    A score is a classifier run's top-1 ("top1_seed3") or a set's distances ("kid_fid"); `settings`
    is everything that decides it (the generator's recipe and sampling, the classifier protocol).
    With `resume`, scores the file holds for the same settings are taken instead of made again, so a
    killed run loses at most the score it was making. A line cut short by a kill is skipped."""

    def __init__(self, path, resume):
        from Utils.io import read_json_lines

        self.path, self.kept = Path(path), {}
        for entry in read_json_lines(self.path) if resume else []:
            self.kept[self._key(entry["settings"], entry["set"], entry["score"])] = entry["value"]

    @staticmethod
    def _key(settings, set_name, score):
        return json.dumps([settings, set_name, score], sort_keys=True)

    def record(self, settings, set_name, score, make):
        """The kept value of this score, or `make()`'s, appended to the file first."""
        settings = as_read_back(settings)
        key = self._key(settings, set_name, score)
        if key not in self.kept:
            from Utils.io import append_json_line

            value = make()
            append_json_line(self.path, {"settings": settings, "set": set_name, "score": score, "value": value})
            self.kept[key] = as_read_back(value)
        return self.kept[key]

    def cas(self, cas, settings, set_name, x, y):
        """`cas(x, y)` with each classifier run recorded."""
        return cas(x, y, lambda s, train: self.record(settings, set_name, f"top1_seed{s}", train))

    def distances(self, distances, settings, set_name, x):
        return tuple(self.record(settings, set_name, "kid_fid", lambda: list(distances(x))))


def row_in(out, tag, settings):
    """Whether `out` holds a row of this tag with these settings (a resumed run that had finished)."""
    from Utils.io import read_json_lines

    settings = as_read_back(settings)
    rows = read_json_lines(out)  # a row line a kill cut short is not a row
    return any(row.get("tag") == tag and all(row.get(k) == v for k, v in settings.items()) for row in rows)


def main(argv=None):
    args = parser.parse_args(argv)
    check_weights_name(args.weights)
    if args.classifier_runs < 1:
        raise SystemExit(f"error: --classifier_runs must be at least 1, not {args.classifier_runs}")
    import numpy as np

    from Data.images import save_image_grid
    from Data.loaders import load_dataset
    from Data.registry import get_spec
    from Metrics.speckle import speckle_share
    from Models.diffusion.conditioning import ConditioningSpec
    from Models.diffusion.presets import get_preset
    from Utils.io import append_json_line

    preset = get_preset(args.preset)
    if args.level_channels:
        channels = tuple(int(c) for c in args.level_channels.split(","))
        preset = dataclasses.replace(preset, level_channels=channels, level_heads=(4,) * len(channels),
                                     level_attention=(False,) * (len(channels) - 1) + (True,))
    spec = get_spec(args.dataset)
    model_spec = dataclasses.replace(spec, channels=3) if args.rgb else spec
    splits = load_dataset(spec.name, data_dir=args.data_dir, train_subset=args.train_subset)
    recipe = {**preset.recipe(), **{k: getattr(args, k) for k in preset.recipe() if getattr(args, k) is not None}}
    epochs = args.epochs or preset.enc_epochs
    batch_size = args.batch_size or preset.enc_batch_size
    lr = args.lr or preset.enc_lr
    conditioning = ConditioningSpec(args.conditioning)
    # Recorded only when not the paper's class encoder, so rows and score logs from before the flag still match.
    conditioning_record = {} if args.conditioning == DEFAULT_CONDITIONING else conditioning.record()

    x1_by_proportions = {p: x1_counts(spec, splits, p) for p in args.class_proportions.split(",")}
    # One generated set holds every proportion's x1..xN: the first k images of each class (k x K with a filter).
    most_per_class = np.max(list(x1_by_proportions.values()), axis=0)
    labels = np.repeat(np.arange(spec.num_classes), most_per_class * args.multiples * args.filter_pool)
    guidances = ([preset.default_guidance_scale] if args.guidance is None
                 else [float(g) for g in args.guidance.split(",")])
    step_counts = ([preset.default_inference_steps] if args.steps is None
                   else [int(n) for n in args.steps.split(",")])
    cas = cas_scorer(spec, splits, args.classifier_epochs, args.classifier_batch_size, args.seed,
                     runs=args.classifier_runs)
    distances = distance_scorer(splits, args.seed)
    filter_probability = filter_scorer(spec, splits, args.classifier_epochs, args.classifier_batch_size,
                                       args.filter_seed)
    # Recorded only when there is a filter, so rows and score logs from before the flag still match.
    filter_record = {} if args.filter_pool == 1 else {"filter_pool": args.filter_pool, "filter_seed": args.filter_seed}
    out = Path(args.out)
    log = ScoreLog(out.with_suffix(".scores.jsonl"), args.resume)
    # What decides a score: the classifier protocol and the data (the real split's scores need no more).
    scoring = {"dataset": spec.name, **({"train_subset": splits.train_subset} if splits.train_subset else {}),
               "classifier_epochs": args.classifier_epochs,
               "classifier_batch_size": args.classifier_batch_size, "seed": args.seed}
    generator_settings = {**scoring, "preset": preset.name, "level_channels": list(preset.level_channels),
                          "rgb": bool(args.rgb), **recipe, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                          "sampler": args.sampler, **conditioning_record, **filter_record,
                          # x1 of a larger set is generated in other batches, which can move the last bits.
                          "generated_with": {"multiples": args.multiples, "class_proportions": args.class_proportions}}

    def tag_of(base_tag, proportions):
        return base_tag + ("" if proportions == "balanced" else f"_{proportions}")

    def settings_of(steps, guidance, proportions):
        return {**generator_settings, "steps": steps, "guidance": guidance, "class_proportions": proportions}

    def grid_of(base_tag):
        return out.with_name(f"{out.stem}_{base_tag}.png")

    def saved_set_of(base_tag):
        return Path(args.save_images.format(tag=base_tag)) if args.save_images else None

    def finished(steps, guidance, base_tag):
        """Whether a resumed run has written everything of this sampling: its rows, its grid and its saved
        set. Then there is nothing to generate (minutes at RetinaMNIST's size)."""
        return args.resume and grid_of(base_tag).exists() and \
            (saved_set_of(base_tag) is None or saved_set_of(base_tag).exists()) and \
            all(row_in(out, tag_of(base_tag, p), settings_of(steps, guidance, p)) for p in x1_by_proportions)

    samplings = []
    for steps, guidance in itertools.product(step_counts, guidances):
        base_tag = args.tag + (f"_g{guidance:g}" if len(guidances) > 1 else "") + \
            (f"_s{steps}" if len(step_counts) > 1 else "")
        if finished(steps, guidance, base_tag):
            print(f"{base_tag}: its rows are in {out} already; nothing generated", flush=True)
        else:
            samplings.append((steps, guidance, base_tag))
    if not samplings:
        return
    model, training = trained_or_read(args.weights, preset, model_spec, splits, recipe, epochs, batch_size, lr,
                                      args.seed, conditioning)
    real_row = {}  # the real row's figures, computed once
    for steps, guidance, base_tag in samplings:
        started = time.perf_counter()
        with model.sampling_weights():
            images = model.generate(labels, num_steps=steps, guidance_scale=guidance, seed=args.seed,
                                    batch_size=250, progress=True, sampler=args.sampler)
        generate_s = time.perf_counter() - started
        probability = None if args.filter_pool == 1 else filter_probability(images, labels)
        if args.save_images:
            from Utils.io import atomic_path

            # Every candidate, and with a filter each one's probability of its label under it.
            filter_facts = {} if probability is None else {"filter_probability": probability}
            with atomic_path(saved_set_of(base_tag)) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images, labels=labels, **filter_facts)

        def kept(per_class_x1, k):
            """x_k's images: the first k x1 counts of each class, or the most typical of k x1 x pool."""
            if probability is None:
                return multiple_indices(labels, per_class_x1, k)
            return most_typical(labels, probability, per_class_x1 * k, args.filter_pool)

        for proportions, per_class_x1 in x1_by_proportions.items():
            tag, settings = tag_of(base_tag, proportions), settings_of(steps, guidance, proportions)
            cas_by_multiple, cas_runs, kid_by_multiple, fid_by_multiple = {}, {}, {}, {}
            for k in range(1, args.multiples + 1):
                chosen = kept(per_class_x1, k)
                cas_runs[f"x{k}"] = log.cas(cas, settings, f"x{k}", images[chosen], labels[chosen])
                cas_by_multiple[f"x{k}"] = sum(cas_runs[f"x{k}"]) / len(cas_runs[f"x{k}"])
                kid_by_multiple[f"x{k}"], fid_by_multiple[f"x{k}"] = log.distances(distances, settings, f"x{k}",
                                                                                     images[chosen])
            x1 = kept(per_class_x1, 1)
            kid, fid = kid_by_multiple["x1"], fid_by_multiple["x1"]
            row = {"tag": tag, "dataset": spec.name,
                   **({"train_subset": splits.train_subset} if splits.train_subset else {}),
                   "preset": preset.name, "rgb": bool(args.rgb),
                   "level_channels": list(preset.level_channels),
                   **recipe, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "sampler": args.sampler, **conditioning_record, **filter_record, "steps": steps,
                   "guidance": guidance, "class_proportions": proportions,
                   "generated_with": generator_settings["generated_with"],
                   "classifier_epochs": args.classifier_epochs, "classifier_batch_size": args.classifier_batch_size,
                   **training,
                   "generate_s": round(generate_s, 1), "cas_x1_top1": cas_by_multiple["x1"], "cas": cas_by_multiple,
                   **({"cas_runs": cas_runs, "classifier_runs": args.classifier_runs}
                      if args.classifier_runs > 1 else {}),
                   "kid": kid, "fid": fid, "kid_by_multiple": kid_by_multiple, "fid_by_multiple": fid_by_multiple,
                   "speckle": float(speckle_share(images[x1])), "seed": args.seed,
                   "unet_parameters": int(model.unet.count_params())}
            if args.with_real:
                if "real_top1" not in real_row:
                    real_row.update(mean_and_runs(log.cas(cas, scoring, "real", splits.x_train, splits.y_train),
                                                  "real_top1"))
                    real_row["real_train_kid"], real_row["real_train_fid"] = log.distances(distances, scoring, "real",
                                                                                         splits.x_train)
                row.update(real_row)
            print(json.dumps(row))
            if not (args.resume and row_in(out, tag, settings)):
                append_json_line(out, row)
        x1 = kept(next(iter(x1_by_proportions.values())), 1)
        pick = np.concatenate([x1[labels[x1] == c][:8] for c in range(spec.num_classes)])
        save_image_grid(images[pick], labels[pick], spec.label_names, grid_of(base_tag), per_class=8, title=base_tag)


if __name__ == "__main__":
    run_cli(main)  # bad input (e.g. a --train_subset larger than the split): one line, exit 2
