"""Trains the class-conditional diffusion model (PAPER.md stages 1 and 3).

    # stage 1: the class encoder (sd presets: UNet and autoencoder frozen;
    #          tiny: also trains its UNet from scratch, a stand-in for SD's pretraining)
    python SD_adapting.py --dataset retinamnist --train_model enc --exp 0 --freq 1
    # stage 3: fine-tune the UNet, the class encoder of epoch 37 frozen
    python SD_adapting.py --dataset retinamnist --train_model dif --enc_epoch 37 --exp 0 --freq 1
    # a CPU-sized run of both stages
    python SD_adapting.py --dataset digits --preset tiny --train_model enc
    python SD_adapting.py --dataset digits --preset tiny --train_model dif --enc_epoch 40

Checkpoints (the trained part's weights, every --freq epochs and at the last
epoch) go to Checkpoints/DDPM/Exp_{exp}/{dataset}/MyEmbedding (enc) or
DiffusionFt (dif), with settings.json, log.csv, TensorBoard logs and a sample
grid per checkpoint; the layout is in Models/diffusion/checkpoints.py.
Killed at any moment, the same command resumes from the newest complete
checkpoint (weights, optimizer state, epoch counter); a finished run says so
and exits 0. Checkpoints made with other settings are an error, never
overwritten.

--enc_epoch / --dif_epoch: the checkpoint of the stage being trained to
continue from. Continuing always starts at the newest complete checkpoint, so
the flag, when given, must name it (0 = none yet: start afresh); anything
else is an error, because continuing from an older one would overwrite the
later checkpoints. In the dif stage, --enc_epoch names the class-encoder
checkpoint to fine-tune with (required), and --dif_epoch plays that role.
"""

import argparse
import csv
import io
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Utils.cli import (ArgumentParser, UserError, decay_rate, folder, non_negative_float,  # noqa: E402
                       non_negative_int, positive_float, positive_int, probability, run_cli)
from Utils.runtime import add_runtime_flags  # noqa: E402
from Models.diffusion.presets import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, preset_help  # noqa: E402

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
paper = parser.add_argument_group("the paper's flags")
paper.add_argument("--dataset", required=True, help="a registered dataset (Data/registry.py)")
paper.add_argument("--train_model", required=True, choices=("enc", "dif"),
                   help="enc: the class encoder (stage 1); dif: fine-tune the UNet (stage 3)")
paper.add_argument("--enc_epoch", type=non_negative_int, default=None,
                   help="dif: the class-encoder checkpoint to fine-tune with (required); "
                        "enc: the checkpoint to continue from (see above)")
paper.add_argument("--dif_epoch", type=non_negative_int, default=None,
                   help="dif: the fine-tuned UNet checkpoint to continue from (see above)")
paper.add_argument("--exp", type=non_negative_int, default=0, help="experiment number: the Exp_{exp} folders (default 0)")
paper.add_argument("--freq", type=positive_int, default=1,
                   help="save a checkpoint every FREQ epochs (and at the last one; default 1)")
ours = parser.add_argument_group("added flags")
ours.add_argument("--preset", default="sd1", help=preset_help("sd1"))
ours.add_argument("--data_dir", type=folder, default=None, help="folder with the real dataset files (default: the data cache)")
ours.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: the preset's for the stage)")
ours.add_argument("--batch_size", type=positive_int, default=None, help="batch size (default: the preset's)")
ours.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
recipe = parser.add_argument_group("training recipe (diffusers' names; default: the preset's, "
                                   "Models/diffusion/presets.py: the paper's for sd1/sd2)")
recipe.add_argument("--cond_dropout", type=probability, default=None,
                    help="probability of training on the zero label, which trains the unconditional "
                         "context classifier-free guidance uses (sd presets: 0, the paper's)")
recipe.add_argument("--ema_decay", type=decay_rate, default=None,
                    help="exponential moving average of the trained weights, warmed up as diffusers' EMAModel; "
                         "checkpoints hold the average (0: off)")
recipe.add_argument("--snr_gamma", type=non_negative_float, default=None,
                    help="min-SNR-gamma loss weighting, e.g. 5 (0: plain MSE)")
recipe.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                    help="what the UNet predicts: epsilon (SD v1) or v_prediction; fixed by the stage that "
                         "trains the UNet first")
recipe.add_argument("--beta_schedule", choices=BETA_SCHEDULES, default=None,
                    help="noise schedule: scaled_linear (SD), linear (DDPM), squaredcos_cap_v2 (cosine)")
recipe.add_argument("--rescale_betas_zero_snr", action=argparse.BooleanOptionalAction, default=None,
                    help="rescale the schedule to zero terminal SNR (needs v_prediction)")
recipe.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                    help="sampling timesteps: leading (SD), trailing, linspace")
ours.add_argument("--seed", type=non_negative_int, default=0, help="seed of initialisation, data order and noise (default 0)")
ours.add_argument("--random_init", action="store_true",
                  help="sd presets: random UNet/autoencoder weights instead of keras-cv's (tests, benchmarks)")
ours.add_argument("--grid_per_class", type=non_negative_int, default=4,
                  help="samples per class in the grid saved with each checkpoint (0: none; default 4)")
ours.add_argument("--grid_freq", type=positive_int, default=1,
                  help="draw the grid every GRID_FREQ epochs (at checkpoints, and at the last; default 1)")
ours.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras fit verbosity (default 2)")
add_runtime_flags(parser)

CSV_FIELDS = ("epoch", "loss", "learning_rate", "seconds")


def resolve(args):
    """Checks every flag and the checkpoint folders; returns the run's plan. Writes nothing."""
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.conditional_diffusion import schedule_for
    from Models.diffusion.presets import get_preset
    from Utils.paths import diffusion_checkpoint_dir

    spec, preset = get_spec(args.dataset), get_preset(args.preset)
    stage = args.train_model
    epochs = args.epochs or getattr(preset, f"{stage}_epochs")
    batch_size = args.batch_size or getattr(preset, f"{stage}_batch_size")
    lr = getattr(preset, f"{stage}_lr") if args.lr is None else args.lr
    if stage == "enc" and args.dif_epoch is not None:
        raise UserError("--dif_epoch is for --train_model dif")
    if stage == "dif" and args.enc_epoch is None:
        raise UserError("--train_model dif needs --enc_epoch: the class-encoder checkpoint to fine-tune with")
    random_init = bool(args.random_init or not preset.pretrained)
    folder = diffusion_checkpoint_dir(args.exp, spec.name, stage)
    asked_recipe = {key: getattr(args, key) for key in preset.recipe() if getattr(args, key) is not None}
    enc_path = None
    if stage == "dif":
        # The UNet keeps the schedule and prediction type it was trained with in the enc stage.
        enc_dir = diffusion_checkpoint_dir(args.exp, spec.name, "enc")
        enc_path = ck.require_checkpoint(enc_dir, args.enc_epoch, "class-encoder")
        trained_with = ck.schedule_settings(ck.read_settings(enc_dir))
        for key, value in trained_with.items():
            if asked_recipe.get(key, value) != value:
                raise UserError(f"--{key} {asked_recipe[key]}: the class-encoder stage in {enc_dir} "
                                f"trained with {key} {value}, and the fine-tuning keeps it")
        asked_recipe.update(trained_with)
    recipe = {**preset.recipe(), **asked_recipe}
    try:
        schedule_for(recipe)
    except ValueError as e:
        raise UserError(str(e)) from None
    identity = ck.model_identity(preset, spec, random_init, args.seed, recipe)
    settings = {**identity, "stage": stage, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "cond_dropout": recipe["cond_dropout"], "ema_decay": recipe["ema_decay"],
                "snr_gamma": recipe["snr_gamma"], "seed": args.seed, "mixed_precision": args.mixed_precision}
    if stage == "dif":
        ck.check_settings(enc_dir, identity, ck.IDENTITY_KEYS)
        settings["enc_epoch"] = args.enc_epoch
    # Reusing the folder: every setting that shaped the checkpoints must match (not --freq).
    ck.check_settings(folder, settings, [k for k in settings if k != "mixed_precision"])

    start = ck.resumable_epoch(folder) if ck.read_settings(folder) is not None else 0
    asked = args.enc_epoch if stage == "enc" else args.dif_epoch
    if asked is not None and asked != start:
        what = f"--{stage}_epoch {asked}"
        if asked and not ck.weights_path(folder, asked).exists():
            ck.require_checkpoint(folder, asked, "class-encoder" if stage == "enc" else "fine-tuned UNet")
        raise UserError(f"{what}: training continues from the newest complete checkpoint in {folder}, "
                        f"epoch {start}; give --{stage}_epoch {start} or leave it out")
    return dict(spec=spec, preset=preset, stage=stage, epochs=epochs, batch_size=batch_size, lr=lr,
                folder=folder, settings=settings, start=start, enc_path=enc_path, random_init=random_init,
                recipe=recipe)


def main(argv=None):
    args = parser.parse_args(argv)
    plan = resolve(args)
    folder, stage, epochs, start = plan["folder"], plan["stage"], plan["epochs"], plan["start"]
    if start >= epochs:
        print(f"{stage} training of {plan['spec'].name} is already complete: {epochs} epochs in {folder}")
        return 0

    import keras

    from Data.loaders import load_dataset
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.conditional_diffusion import TrainBatches, make_optimizer
    from Utils.io import atomic_write_json
    from Utils.runtime import configure_runtime, distribution_scope

    spec, preset = plan["spec"], plan["preset"]
    splits = load_dataset(spec.name, data_dir=args.data_dir)
    jit = configure_runtime(seed=args.seed, mixed_precision=args.mixed_precision, xla=args.xla)

    with distribution_scope(args.multi_gpu):
        model = ck.build_model(preset, spec, stage=stage, random_init=plan["random_init"],
                               init_seed=args.seed, seed=args.seed, recipe=plan["recipe"])
        if stage == "dif":
            # The chosen class encoder (tiny: and the UNet it trained from scratch).
            ck.load_parts(plan["enc_path"], ck.enc_parts(model))
        batches = TrainBatches(splits.x_train, splits.y_train, plan["batch_size"], model.image_size,
                               seed=args.seed, epoch=start)
        # The average warms up over weights that start random; fine-tuning starts from an average.
        model.compile(optimizer=make_optimizer(plan["lr"], epochs * len(batches), plan["recipe"]["ema_decay"],
                                               ema_warmup=stage == "enc"),
                      jit_compile=jit)
        model.optimizer.build(model.trainable_variables)
        if start:
            ck.load_parts(ck.weights_path(folder, start), model.trained_parts())
            ck.load_optimizer(ck.optimizer_path(folder, start), model.optimizer, model.trained_parts())
            print(f"resuming {stage} training from the checkpoint of epoch {start} in {folder}")
    if ck.read_settings(folder) is None:
        atomic_write_json(folder / ck.SETTINGS_FILE, plan["settings"])

    log = EpochLog(folder / "log.csv", keep_through=start)
    callbacks = [
        EpochSeeds(model, args.seed),
        log,
        Checkpointer(model, folder, args.freq, epochs, spec, args.grid_per_class, args.seed, start, jit,
                     grid_freq=args.grid_freq),
        TensorBoardScalars(folder / "logs"),
    ]
    n_params = sum(int(keras.ops.size(v)) for v in model.trainable_variables)
    print(f"{stage} training of {spec.name} with {preset.name}: epochs {start + 1}..{epochs}, "
          f"batch {plan['batch_size']}, lr {plan['lr']:g}, {n_params:,} trainable parameters -> {folder}")
    model.fit(batches, initial_epoch=start, epochs=epochs, callbacks=callbacks, verbose=args.verbose)
    print(f"done: {stage} checkpoints in {folder}")
    return 0


def _keras_callback():
    import keras

    return keras.callbacks.Callback


class EpochSeeds(_keras_callback()):
    """Seeds the training noise of epoch e from (seed, e): resumed runs draw what uninterrupted ones do."""

    def __init__(self, model, seed):
        super().__init__()
        self._diffusion = model
        self._seed = int(seed)

    def on_epoch_begin(self, epoch, logs=None):
        import numpy as np

        state = self._diffusion.seed_generator.state
        value = np.random.default_rng([self._seed, epoch]).integers(0, 2 ** 31 - 1)
        state.assign(np.array([value, 0], dtype=state.dtype))


class EpochLog(_keras_callback()):
    """log.csv: one row per finished epoch, rewritten atomically; rows past a resume point are dropped."""

    def __init__(self, path, keep_through):
        super().__init__()
        self.path = path
        self.rows = []
        if path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_through]
        self._started = None

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        from Utils.io import atomic_write_text

        optimizer = self.model.optimizer
        lr = float(optimizer.learning_rate) if optimizer is not None else float("nan")
        self.rows.append({"epoch": epoch + 1, "loss": f"{float(logs['loss']):.6f}",
                          "learning_rate": f"{lr:.6g}",
                          "seconds": f"{time.perf_counter() - self._started:.1f}"})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue())


class TensorBoardScalars(_keras_callback()):
    """TensorBoard event files with the loss and learning rate per epoch.

    Written with TensorFlow's core summary op, so the `tensorboard` package is
    only needed to look at them, not to write them (keras.callbacks.TensorBoard
    needs it installed). Skipped when TensorFlow is not installed.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        try:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2
        except ImportError:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        metadata = summary_pb2.SummaryMetadata()
        metadata.plugin_data.plugin_name = "scalars"
        values = {"epoch_loss": float(logs["loss"]),
                  "epoch_learning_rate": float(self.model.optimizer.learning_rate)}
        with tf.device("/cpu:0"), self._writer.as_default():
            for tag, value in values.items():
                tf.summary.write(tag, tf.constant(value, tf.float32), step=epoch + 1, metadata=metadata)
        self._writer.flush()


class Checkpointer(_keras_callback()):
    """Every `freq` epochs and at the last: optimizer state, then weights (each atomic), then a sample grid."""

    def __init__(self, model, folder, freq, epochs, spec, grid_per_class, seed, start=0, jit_compile=False,
                 grid_freq=1):
        super().__init__()
        self._diffusion = model
        self.folder, self.freq, self.epochs, self.grid_freq = folder, freq, epochs, grid_freq
        self.spec, self.grid_per_class, self.seed, self.start = spec, grid_per_class, seed, start
        self.jit_compile = jit_compile

    def on_train_begin(self, logs=None):
        # A run killed between a checkpoint and its grid: draw the grid of the resumed checkpoint.
        if self.start and self.wants_grid(self.start) and not self.grid_path(self.start).exists():
            with self._diffusion.sampling_weights():
                self.save_grid(self.start)

    def wants_grid(self, done):
        return bool(self.grid_per_class) and (done % self.grid_freq == 0 or done == self.epochs)

    def grid_path(self, epoch):
        return self.folder / f"samples_epoch_{epoch:03d}.png"

    def on_epoch_end(self, epoch, logs=None):
        from Models.diffusion import checkpoints as ck
        from Models.diffusion.conditional_diffusion import ema_optimizer

        done = epoch + 1
        if done % self.freq and done != self.epochs:
            return
        model = self._diffusion
        ema = ema_optimizer(model.optimizer)
        ck.save_optimizer(ck.optimizer_path(self.folder, done), model.optimizer, done,
                          trained_parts=model.trained_parts() if ema else None)
        # With an EMA, the weights file and the grid get the average: what generation samples with.
        with model.sampling_weights():
            ck.save_parts(ck.weights_path(self.folder, done), model.trained_parts(),
                          attrs={"epoch": done, "stage": model.stage, "preset": model.preset.name,
                                 "dataset": self.spec.name})
            if self.wants_grid(done):
                self.save_grid(done)
        ck.remove_old_optimizer_states(self.folder, done)

    def save_grid(self, done):
        import numpy as np

        from Data.images import save_image_grid

        model = self._diffusion
        labels = np.repeat(np.arange(self.spec.num_classes), self.grid_per_class)
        # One batch of exactly the grid's size: padding it to a round batch would cost samples no one sees.
        images = model.generate(labels, seed=self.seed, batch_size=min(64, len(labels)),
                                jit_compile=self.jit_compile)
        save_image_grid(images, labels, self.spec.label_names,
                        self.grid_path(done), per_class=self.grid_per_class,
                        title=f"{self.spec.name}, {model.preset.name}, {model.stage} epoch {done}: "
                              f"{model.preset.default_inference_steps} steps, "
                              f"guidance {model.preset.default_guidance_scale:g}")


if __name__ == "__main__":
    run_cli(main)
