"""The adapt stage (PAPER.md stages 1 and 3): train the class encoder, or fine-tune the UNet.

`SD_adapting.py` is its command line; `reproduce.py` calls `run` directly.

    settings = AdaptSettings(dataset="digits", preset="small", train_model="enc", epochs=25)
    if not is_done(settings):
        result = run(settings)          # checkpoints under result.folder, resumable

Checkpoints (the trained part's weights, every `freq` epochs and at the last)
go to Checkpoints/DDPM/Exp_{exp}/{dataset}/MyEmbedding (enc) or DiffusionFt
(dif), with settings.json, log.csv, TensorBoard logs and a sample grid; the
layout is in Models/diffusion/checkpoints.py. Killed at any moment, the same
settings resume from the newest complete checkpoint (weights, optimizer
state, epoch counter). Checkpoints made with other settings are an error,
never overwritten.

enc_epoch / dif_epoch: the checkpoint of the stage being trained to continue
from. Continuing always starts at the newest complete checkpoint, so the
value, when given, must name it (0 = none yet: start afresh); anything else
is an error, because continuing from an older one would overwrite the later
checkpoints. In the dif stage, enc_epoch names the class-encoder checkpoint
to fine-tune with (default: the preset's last encoder epoch, 50 for the sd
presets as in the paper), and dif_epoch plays the continuing role.
"""

from dataclasses import dataclass
from pathlib import Path

from Models.diffusion.presets import BETA_SCHEDULES, PREDICTION_TYPES, STAGES, TIMESTEP_SPACINGS
from Utils.cli import (UserError, decay_rate, non_negative_float, non_negative_int, positive_float, positive_int,
                       probability)
from Pipeline.common_settings import (accept_unverified_setting, conditioning_setting, conditioning_spec,
                                      data_dir_setting, dataset_setting, dataset_spec, experiment_setting,
                                      image_size_setting, load_real, preset_setting, prompt_template_setting,
                                      ti_tokens_setting, train_subset_seed_setting, train_subset_setting)
from Utils.runtime import RuntimeSettings
from Utils.settings import ADDED, PAPER, setting

SCRIPT = "SD_adapting.py"
UNET_TUNINGS = ("full", "lora")  # full: the paper's; lora: Models/diffusion/lora.py
DEFAULT_LORA_RANK = 4             # diffusers' train_text_to_image_lora.py (its alpha defaults to the rank)


def unet_tuning_setting():
    """--unet_tuning, shared with reproduce.py."""
    return setting("full", choices=UNET_TUNINGS, group=ADDED,
                   help="dif: fine-tune every UNet weight (full, the paper's) or train LoRA adapters on the "
                        "attention projections, the rest frozen (lora; Models/diffusion/lora.py)")


def lora_rank_setting():
    return setting(DEFAULT_LORA_RANK, type=positive_int, group=ADDED,
                   help=f"--unet_tuning lora: the adapters' rank (default {DEFAULT_LORA_RANK}, diffusers')")


def lora_alpha_setting():
    return setting(None, type=positive_float, group=ADDED,
                   help="--unet_tuning lora: the adapters' alpha, scale alpha / rank (default: the rank)")
RECIPE = "training recipe (diffusers' names; default: the preset's, Models/diffusion/presets.py: the paper's for sd1/sd2)"


@dataclass(frozen=True, kw_only=True)
class AdaptSettings(RuntimeSettings):
    """Every flag of SD_adapting.py, declared once."""

    dataset: str = dataset_setting()
    train_model: str = setting("enc", choices=STAGES, group=PAPER,
                               help="enc: the class encoder (stage 1); dif: fine-tune the UNet (stage 3)")
    enc_epoch: int = setting(None, type=non_negative_int, group=PAPER,
                             help="dif: the class-encoder checkpoint to fine-tune with (default: the preset's "
                                  "last encoder epoch, 50 for sd1/sd2); enc: the checkpoint to continue from")
    dif_epoch: int = setting(None, type=non_negative_int, group=PAPER,
                             help="dif: the fine-tuned UNet checkpoint to continue from")
    exp: str = experiment_setting()
    freq: int = setting(1, type=positive_int, group=PAPER,
                        help="save a checkpoint every FREQ epochs (and at the last one)")
    preset: str = preset_setting()
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()
    conditioning: str = conditioning_setting()
    prompt_template: str = prompt_template_setting()
    ti_tokens: int = ti_tokens_setting()
    epochs: int = setting(None, type=positive_int, group=ADDED, help="epochs (default: the preset's for the stage)")
    batch_size: int = setting(None, type=positive_int, group=ADDED, help="batch size (default: the preset's)")
    lr: float = setting(None, type=positive_float, group=ADDED, help="peak learning rate (default: the preset's)")
    cond_dropout: float = setting(None, type=probability, group=RECIPE,
                                  help="probability of training on the zero label, which trains the unconditional "
                                       "context classifier-free guidance uses (sd presets: 0, the paper's)")
    ema_decay: float = setting(None, type=decay_rate, group=RECIPE,
                               help="exponential moving average of the trained weights; checkpoints hold the "
                                    "average (0: off)")
    snr_gamma: float = setting(None, type=non_negative_float, group=RECIPE,
                               help="min-SNR-gamma loss weighting, e.g. 5 (0: plain MSE)")
    prediction_type: str = setting(None, choices=PREDICTION_TYPES, group=RECIPE,
                                   help="what the UNet predicts: epsilon (SD v1) or v_prediction; fixed by the "
                                        "stage that trains the UNet first")
    beta_schedule: str = setting(None, choices=BETA_SCHEDULES, group=RECIPE,
                                 help="noise schedule: scaled_linear (SD), linear (DDPM), squaredcos_cap_v2 (cosine)")
    rescale_betas_zero_snr: bool = setting(None, group=RECIPE,
                                           help="rescale the schedule to zero terminal SNR (needs v_prediction)")
    timestep_spacing: str = setting(None, choices=TIMESTEP_SPACINGS, group=RECIPE,
                                    help="sampling timesteps: leading (SD), trailing, linspace")
    random_flip: bool = setting(None, group=RECIPE,
                                help="mirror each training image left-right with probability 1/2 (for data "
                                     "whose classes do not depend on the side; not digits)")
    balanced_sampling: bool = setting(None, group=RECIPE,
                                      help="each epoch draws as many images as the training split has, with "
                                           "replacement, every class equally likely (for imbalanced data)")
    lr_warmup_steps: int = setting(None, type=non_negative_int, group=RECIPE,
                                   help="steps over which the learning rate rises linearly from 0 to --lr before "
                                        "its cosine decay (0: decay from the first step, the paper's)")
    seed: int = setting(0, type=non_negative_int, group=ADDED,
                        help="seed of initialisation, data order and noise")
    random_init: bool = setting(False, group=ADDED,
                                help="sd presets: random UNet/autoencoder weights instead of keras-cv's "
                                     "(tests, benchmarks)")
    grid_per_class: int = setting(4, type=non_negative_int, group=ADDED,
                                  help="samples per class in the grid saved with each checkpoint (0: none)")
    grid_freq: int = setting(1, type=positive_int, group=ADDED,
                             help="draw the grid every GRID_FREQ epochs (at checkpoints, and at the last)")
    verbose: int = setting(2, type=int, choices=(0, 1, 2), group=ADDED, help="Keras fit verbosity")
    unet_tuning: str = unet_tuning_setting()
    lora_rank: int = lora_rank_setting()
    lora_alpha: float = lora_alpha_setting()


def check_unet_tuning(unet_tuning, lora_rank, lora_alpha):
    """--lora_rank / --lora_alpha only with --unet_tuning lora (else they would be silently ignored)."""
    if unet_tuning != "lora" and (lora_rank != DEFAULT_LORA_RANK or lora_alpha is not None):
        raise UserError("--lora_rank and --lora_alpha are for --unet_tuning lora")


@dataclass(frozen=True)
class AdaptPlan:
    """The settings checked against the registry, the preset and the checkpoint folders."""

    spec: object
    preset: object
    stage: str
    epochs: int
    batch_size: int
    lr: float
    folder: Path
    record: dict          # settings.json of the folder: every setting that shaped the checkpoints
    start: int            # the epoch training continues from (0: afresh)
    enc_path: object      # dif: the class-encoder checkpoint fine-tuned with
    random_init: bool
    recipe: dict
    conditioning: object  # the ConditioningSpec

    @property
    def nothing_to_train(self):
        """The text method on a pretrained preset: its enc stage has no weights to train."""
        return self.stage == "enc" and not self.conditioning.trains() and self.preset.pretrained


@dataclass(frozen=True)
class AdaptResult:
    folder: Path
    epochs: int
    trained: bool         # False: the checkpoints were already complete


def plan(settings):
    """Checks every setting and the checkpoint folders; returns the run's plan. Writes nothing."""
    from Data.loaders import train_subset_record
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.generator import schedule_for
    from Models.errors import CheckpointError
    from Models.diffusion.presets import get_preset
    from Utils.paths import diffusion_checkpoint_dir

    s = settings
    spec, preset = dataset_spec(s), get_preset(s.preset)
    conditioning = conditioning_spec(s)
    stage = s.train_model
    epochs = s.epochs or getattr(preset, f"{stage}_epochs")
    batch_size = s.batch_size or getattr(preset, f"{stage}_batch_size")
    lr = getattr(preset, f"{stage}_lr") if s.lr is None else s.lr
    if stage == "enc" and s.dif_epoch is not None:
        raise UserError("--dif_epoch is for --train_model dif")
    if stage == "enc" and s.unet_tuning != "full":
        raise UserError(f"--unet_tuning {s.unet_tuning} is for --train_model dif")
    check_unet_tuning(s.unet_tuning, s.lora_rank, s.lora_alpha)
    random_init = bool(s.random_init or not preset.pretrained)
    folder = diffusion_checkpoint_dir(s.exp, spec.name, stage)
    asked_recipe = {key: getattr(s, key) for key in preset.recipe() if getattr(s, key) is not None}
    enc_path, enc_epoch = None, None
    if stage == "dif" and not ck.needs_enc_checkpoint(preset, conditioning):
        enc_epoch = 0  # the text method on a pretrained preset: nothing was trained before
    elif stage == "dif":
        # The UNet keeps the schedule and prediction type it was trained with in the enc stage.
        enc_epoch = preset.enc_epochs if s.enc_epoch is None else s.enc_epoch
        enc_dir = diffusion_checkpoint_dir(s.exp, spec.name, "enc")
        try:
            enc_path = ck.require_checkpoint(enc_dir, enc_epoch, "class-encoder")
        except CheckpointError as e:
            if s.enc_epoch is not None:
                raise
            raise CheckpointError(f"{e}; --enc_epoch defaults to the {preset.name} preset's last encoder "
                                  f"epoch, {enc_epoch}: give the one to fine-tune with") from None
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
    identity = ck.model_identity(preset, spec, random_init, s.seed, recipe, conditioning)
    # The recipe's schedule keys are in the identity; the rest shape this stage's training only.
    training_recipe = {key: value for key, value in recipe.items() if key not in ck.SCHEDULE_KEYS}
    record = {**identity, "stage": stage, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              **training_recipe, "seed": s.seed,
              "mixed_precision": s.mixed_precision,
              "train_subset": train_subset_record(s.train_subset, s.train_subset_seed)}
    if stage == "dif":
        if enc_path is not None:
            ck.check_settings(enc_dir, identity, ck.IDENTITY_KEYS)
        record["enc_epoch"] = enc_epoch
        record |= ck.unet_tuning_record(s.unet_tuning, s.lora_rank, s.lora_alpha)
    # Reusing the folder: every setting that shaped the checkpoints must match (not freq).
    ck.check_settings(folder, record, [k for k in record if k != "mixed_precision"])

    start = ck.resumable_epoch(folder) if ck.read_settings(folder) is not None else 0
    asked = s.enc_epoch if stage == "enc" else s.dif_epoch
    if asked is not None and asked != start:
        if asked and not ck.weights_path(folder, asked).exists():
            ck.require_checkpoint(folder, asked, "class-encoder" if stage == "enc" else "fine-tuned UNet")
        raise UserError(f"--{stage}_epoch {asked}: training continues from the newest complete checkpoint in "
                        f"{folder}, epoch {start}; give --{stage}_epoch {start} or leave it out")
    return AdaptPlan(spec=spec, preset=preset, stage=stage, epochs=epochs, batch_size=batch_size, lr=lr,
                     folder=folder, record=record, start=start, enc_path=enc_path, random_init=random_init,
                     recipe=recipe, conditioning=conditioning)


def is_done(settings):
    """A reason when the checkpoint of the last epoch exists with these settings, else None."""
    p = plan(settings)
    if p.nothing_to_train:
        return f"--conditioning {p.conditioning.method} has nothing to train in the enc stage of {p.preset.name}"
    return f"checkpoint of epoch {p.epochs} exists" if p.start >= p.epochs else None


def run(settings, log=print):
    """Trains (or continues training) the stage's part; returns where the checkpoints are."""
    p = plan(settings)
    s = settings
    if p.nothing_to_train:
        log(f"--conditioning {p.conditioning.method} trains nothing in the enc stage of {p.preset.name} "
            f"(pretrained text encoder and UNet); nothing written")
        return AdaptResult(p.folder, 0, trained=False)
    if p.start >= p.epochs:
        log(f"{p.stage} training of {p.spec.name} is already complete: {p.epochs} epochs in {p.folder}")
        return AdaptResult(p.folder, p.epochs, trained=False)

    import keras

    from Models.diffusion import checkpoints as ck
    from Models.diffusion.callbacks import Checkpointer, EpochLog, EpochSeeds, TensorBoardScalars
    from Models.diffusion.optimizer import make_optimizer
    from Models.diffusion.trainer import TrainBatches
    from Utils.io import atomic_write_json
    from Utils.runtime import configure_runtime, distribution_scope

    splits = load_real(s)
    jit = configure_runtime(seed=s.seed, mixed_precision=s.mixed_precision, xla=s.xla)

    with distribution_scope(s.multi_gpu):
        model = ck.build_model(p.preset, p.spec, stage=p.stage, random_init=p.random_init,
                               init_seed=s.seed, seed=s.seed, recipe=p.recipe, conditioning=p.conditioning)
        if p.stage == "dif" and p.enc_path is not None:
            # The chosen class encoder (from-scratch presets: and the UNet it trained).
            ck.load_parts(p.enc_path, ck.enc_parts(model))
            if p.record["unet_tuning"] == "lora":
                from Models.diffusion import lora

                # After the base weights are in place; seeded so A is the same in every run.
                keras.utils.set_random_seed(s.seed)
                lora.add_adapters(model.unet, p.record["lora_rank"], p.record["lora_alpha"])
                model.set_stage("dif")
        batches = TrainBatches(splits.x_train, splits.y_train, p.batch_size, model.image_size,
                               seed=s.seed, epoch=p.start, random_flip=p.recipe["random_flip"],
                               balanced_sampling=p.recipe["balanced_sampling"])
        total_steps = p.epochs * len(batches)
        if p.recipe["lr_warmup_steps"] >= total_steps:
            raise UserError(f"--lr_warmup_steps {p.recipe['lr_warmup_steps']}: the run has {total_steps} steps "
                            f"({p.epochs} epochs of {len(batches)} batches); warm up over fewer")
        # The average warms up over weights that start random; fine-tuning starts from an average.
        model.compile(optimizer=make_optimizer(p.lr, total_steps, p.recipe["ema_decay"],
                                               ema_warmup=p.stage == "enc",
                                               warmup_steps=p.recipe["lr_warmup_steps"]),
                      jit_compile=jit)
        model.optimizer.build(model.trainable_variables)
        if p.start:
            ck.load_parts(ck.weights_path(p.folder, p.start), model.trained_parts())
            ck.load_optimizer(ck.optimizer_path(p.folder, p.start), model.optimizer, model.trained_parts())
            log(f"resuming {p.stage} training from the checkpoint of epoch {p.start} in {p.folder}")
    if ck.read_settings(p.folder) is None:
        # How the real data was verified (or accepted unverified), and the training subset if any, go
        # with the checkpoints it trained (and from there into the manifests of the sets they generate).
        atomic_write_json(p.folder / ck.SETTINGS_FILE, {**p.record, **splits.provenance()})

    callbacks = [
        EpochSeeds(model, s.seed, batches),
        EpochLog(p.folder / "log.csv", keep_through=p.start),
        Checkpointer(model, p.folder, s.freq, p.epochs, p.spec, s.grid_per_class, s.seed, p.start, jit,
                     grid_freq=s.grid_freq),
        TensorBoardScalars(p.folder / "logs"),
    ]
    n_params = sum(int(keras.ops.size(v)) for v in model.trainable_variables)
    log(f"{p.stage} training of {p.spec.name} with {p.preset.name}: epochs {p.start + 1}..{p.epochs}, "
        f"batch {p.batch_size}, lr {p.lr:g}, {n_params:,} trainable parameters -> {p.folder}")
    # shuffle=False: the batches are shuffled by (seed, epoch) already (EpochSeeds).
    model.fit(batches, initial_epoch=p.start, epochs=p.epochs, shuffle=False, callbacks=callbacks,
              verbose=s.verbose)
    log(f"done: {p.stage} checkpoints in {p.folder}")
    return AdaptResult(p.folder, p.epochs, trained=True)
