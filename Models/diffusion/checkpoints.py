"""Checkpoints of the two training stages, and the model `generate_dataset.py` / tuning load.

Layout of one stage's folder (`Utils.paths.diffusion_checkpoint_dir(exp, dataset, stage)`:
`MyEmbedding/` for "enc", `DiffusionFt/` for "dif"):

    settings.json                 what the checkpoints were trained with (checked on every reuse)
    epoch_{E:03d}.weights.h5      weights of the trained part after epoch E (1-based), every --freq
                                  epochs and at the last one; kept for model selection
    epoch_{E:03d}.optimizer.h5    training state, only for the newest checkpoint: optimizer variables
                                  (with the weight averages), epoch counter and, with an EMA, the
                                  trained (not averaged) weights
    log.csv, logs/                loss per epoch (CSV), TensorBoard events
    samples_epoch_{E:03d}.png     a grid of generated samples per class

The trained part is the class encoder in "enc" (plus the UNet for presets without
pretrained weights: `tiny` and `small` train it from scratch in that stage) and the UNet
in "dif". With an EMA (`--ema_decay`) the weights files hold the moving averages, which
are what generation uses. A checkpoint E is resumable when both of its files exist; the optimizer
file is written first and the weights file last, each atomically, so a run
killed at any moment leaves the previous checkpoint complete.

The weight files are plain HDF5: one group per part, one dataset per variable in
the order of `layer.weights` (attribute `path` = the Keras variable path), so
they can be read without this code.

Example:
    >>> generator, used = load_generation_model("tiny", get_spec("digits"), exp=0, enc_epoch=20, dif_epoch=10)
    >>> images = generator.generate(labels, num_steps=25, guidance_scale=3.0, seed=0)
    >>> trainer = build_model("tiny", get_spec("digits"), stage="enc")     # a DiffusionTrainer, for fit
"""

import dataclasses
import re
from pathlib import Path

import h5py
import keras

from Models.diffusion.backbone import ClassConditionalBackbone
from Models.diffusion.conditioning import ConditioningSpec, context_length
from Models.diffusion.generator import ClassConditionalGenerator, schedule_for
from Models.diffusion.optimizer import load_optimizer_state, optimizer_state
from Models.diffusion.presets import get_preset
from Models.diffusion.trainer import DiffusionTrainer
from Models.errors import CheckpointError, ModelSettingsError
from Utils.io import atomic_path, read_json
from Utils.paths import diffusion_checkpoint_dir
from Utils.runtime import fresh_layer_names

SETTINGS_FILE = "settings.json"
# Settings that make checkpoints incompatible with a model: checked on every load.
# The noise schedule and what the UNet predicts are fixed by the stage that first trains the
# UNet (sd: its pretraining) and read back by every later stage and by generation.
SCHEDULE_KEYS = ("beta_schedule", "prediction_type", "rescale_betas_zero_snr", "timestep_spacing")
# How labels become contexts (Models/diffusion/conditioning.py); files without them: the class encoder's.
CONDITIONING_KEYS = ("conditioning", "prompt_templates", "ti_tokens")
IDENTITY_KEYS = ("preset", "dataset", "num_classes", "image_size", "context_length", "context_dim",
                 "unet_channels", "random_init", "init_seed", *SCHEDULE_KEYS, *CONDITIONING_KEYS)
# Keys added to settings.json after checkpoints existed: what their absence meant.
ABSENT_MEANS = {"unet_tuning": "full", "random_flip": False, "balanced_sampling": False, "lr_warmup_steps": 0}
TRAINED_GROUP = "trained_weights"  # in the optimizer file: the weights themselves when the weights file holds averages
_WEIGHTS_RE = re.compile(r"^epoch_(\d+)\.weights\.h5$")


def weights_path(folder, epoch):
    return folder / f"epoch_{int(epoch):03d}.weights.h5"


def optimizer_path(folder, epoch):
    return folder / f"epoch_{int(epoch):03d}.optimizer.h5"


def image_size_for(preset, spec):
    """The size the diffusion model works at: the preset's (sd: 128), or the dataset's native size."""
    preset = get_preset(preset)
    return int(preset.image_size or spec.image_size)


def model_identity(preset, spec, random_init, init_seed, recipe=None, conditioning=None):
    """The identity part of settings.json (see IDENTITY_KEYS); `recipe` overrides the preset's schedule;
    `conditioning`: a ConditioningSpec (default the class encoder)."""
    preset = get_preset(preset)
    recipe = {**preset.recipe(), **(recipe or {})}
    conditioning = conditioning or ConditioningSpec()
    return {"preset": preset.name, "dataset": spec.name, "num_classes": spec.num_classes,
            "image_size": image_size_for(preset, spec), "context_length": context_length(conditioning, preset),
            "context_dim": preset.context_dim, "unet_channels": preset.unet_channels(spec.channels),
            "random_init": bool(random_init or not preset.pretrained), "init_seed": int(init_seed),
            **{key: recipe[key] for key in SCHEDULE_KEYS}, **conditioning.record()}


def schedule_settings(settings):
    """The SCHEDULE_KEYS of a settings.json (older files without them: the paper's schedule)."""
    defaults = {"beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "rescale_betas_zero_snr": False, "timestep_spacing": "leading"}
    return {key: settings.get(key, defaults[key]) for key in SCHEDULE_KEYS}


# ----- weight files ------------------------------------------------------------------------
def _write_variables(group, variables, values=None):
    """One dataset per variable, in order, named by index; the variable's path kept as an attribute.
    `values`: the arrays to store for them, when not their own values (e.g. their moving averages).
    Read one at a time, so no more than one variable's copy is held (sd1's state is ~10 GB)."""
    if values is None:
        values = (keras.ops.convert_to_numpy(variable) for variable in variables)
    _write_named(group, ((variable.path, value) for variable, value in zip(variables, values, strict=True)))


def _write_named(group, items):
    """`_write_variables`' layout from (path, array) pairs."""
    for i, (path, value) in enumerate(items):
        group.create_dataset(f"{i:05d}", data=value).attrs["path"] = path


def _read_values(group):
    """`_write_variables`' values, in order (sub-groups are not variables of this group)."""
    return [group[key][()] for key in sorted(group.keys()) if isinstance(group[key], h5py.Dataset)]


def save_parts(path, parts, attrs=None, values=None):
    """Writes the weights of `parts` ({name: layer}) to one HDF5 file, atomically.

    values: a function from a part's weights to the arrays to store for them (default: their own
    values), e.g. `DiffusionTrainer.sampling_values`: the moving averages, without swapping them in.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            for name, layer in parts.items():
                _write_variables(f.create_group(name), layer.weights, values(layer.weights) if values else None)


def load_parts(path, parts):
    """Loads `parts` ({name: layer}) from a `save_parts` file; a mismatch is a CheckpointError."""
    try:
        with h5py.File(path, "r") as f:
            for name, layer in parts.items():
                if name not in f:
                    raise CheckpointError(f"{path} holds no weights for the {name} "
                                          f"(it has: {', '.join(f.keys()) or 'nothing'})")
                values = _read_values(f[name])
                expected = [tuple(v.shape) for v in layer.weights]
                if [v.shape for v in values] != expected:
                    raise CheckpointError(f"the {name} weights in {path} do not fit this model "
                                          f"(different preset, dataset or image size?)")
                layer.set_weights(values)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def save_optimizer(path, optimizer, epoch, trained_parts=None):
    """The training state: the optimizer's variables (iterations, moments, weight averages, loss
    scale), the epoch counter and, when the weights file holds averages, the trained weights
    themselves (`trained_parts`, {name: layer}) so that a resumed run continues both exactly."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["epoch"] = int(epoch)
            _write_named(f, optimizer_state(optimizer))
            for name, layer in (trained_parts or {}).items():
                _write_variables(f.create_group(f"{TRAINED_GROUP}/{name}"), layer.weights)


def load_optimizer(path, optimizer, trained_parts=None):
    """Restores `save_optimizer`'s state into a built optimizer (and the trained weights into
    `trained_parts` where the file has them); returns the stored epoch."""
    try:
        with h5py.File(path, "r") as f:
            if not load_optimizer_state(optimizer, _read_values(f)):
                raise CheckpointError(f"optimizer state {path} does not fit this model")
            epoch = int(f.attrs["epoch"])
    except OSError as e:
        raise CheckpointError(f"cannot read optimizer state {path}: {e}") from None
    if trained_parts:
        with h5py.File(path, "r") as f:
            has_trained = TRAINED_GROUP in f
        if has_trained:
            load_parts(path, {f"{TRAINED_GROUP}/{name}": layer for name, layer in trained_parts.items()})
    return epoch


def saved_epochs(folder):
    """Epochs with a weights file in `folder`, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _WEIGHTS_RE.match(p.name)))


def resumable_epoch(folder):
    """The newest epoch whose weights and optimizer state both exist (0 if none)."""
    complete = [e for e in saved_epochs(folder) if optimizer_path(folder, e).exists()]
    return max(complete, default=0)


def remove_old_optimizer_states(folder, keep_epoch):
    for epoch in saved_epochs(folder):
        if epoch != keep_epoch and optimizer_path(folder, epoch).exists():
            optimizer_path(folder, epoch).unlink()


# ----- settings.json -----------------------------------------------------------------------
def read_settings(folder):
    return read_json(folder / SETTINGS_FILE)


def check_settings(folder, expected, keys=None):
    """Compares settings.json in `folder` with `expected` on `keys`; a difference is a CheckpointError."""
    stored = read_settings(folder)
    if stored is None:
        return None
    # Files written before the conditioning methods existed were made with the class encoder.
    stored_conditioning = ConditioningSpec.from_record(stored).record()
    for key in keys or expected.keys():
        have = stored.get(key, stored_conditioning.get(key, ABSENT_MEANS.get(key)))
        if have != expected.get(key):
            raise CheckpointError(f"{folder} holds checkpoints made with {key}={have!r}, not "
                                  f"{expected.get(key)!r}; use another --exp or the same settings")
    return stored


def unet_tuning_record(unet_tuning, rank, alpha):
    """settings.json's record of how the dif stage tuned the UNet: every weight ("full", the paper's),
    or LoRA adapters (lora.py) of `rank` and `alpha` (None: the rank), which its checkpoints then hold."""
    if unet_tuning == "lora":
        return {"unet_tuning": "lora", "lora_rank": int(rank), "lora_alpha": float(rank if alpha is None else alpha)}
    return {"unet_tuning": "full"}


def require_checkpoint(folder, epoch, what):
    """The weights file of `epoch` in `folder`; a missing one is a CheckpointError listing what exists."""
    path = weights_path(folder, epoch)
    if not path.exists() or read_settings(folder) is None:
        have = saved_epochs(folder) if read_settings(folder) is not None else []
        listing = ", ".join(map(str, have)) if have else "none"
        raise CheckpointError(f"no {what} checkpoint for epoch {epoch} in {folder} (epochs there: {listing})")
    return path


# ----- building and loading models ---------------------------------------------------------
def build_backbone(preset, spec, random_init=False, init_seed=0, with_autoencoder=True, conditioning=None):
    """A ClassConditionalBackbone for `spec`, initialised as the pipeline does.

    The parts are built in a fixed order right after seeding with `init_seed`, with the layer names
    of a fresh process (`Utils.runtime.fresh_layer_names`), so random weights (pixel presets, or
    `random_init`) and what training makes of them are the same in every script, whatever was built
    before in the process.
    For sd presets without `random_init`, keras-cv's published UNet and
    autoencoder weights are loaded (Models/diffusion/weights.py; offline and
    missing: a one-line CheckpointError). `conditioning`: a ConditioningSpec (default: the
    class encoder); the text methods' CLIP text encoder is keras-cv's for sd presets.
    """
    from Models.diffusion.conditioning import build_conditioning
    from Models.diffusion.unet import build_unet

    preset = get_preset(preset)
    conditioning = conditioning or ConditioningSpec()
    size = image_size_for(preset, spec)
    keras.utils.set_random_seed(int(init_seed))
    fresh_layer_names()
    unet = build_unet(preset, size, context_length(conditioning, preset), image_channels=spec.channels)
    text_encoder = None
    if conditioning.uses_text and preset.pretrained and not random_init:
        from Models.text.text_encoder import build_text_encoder

        text_encoder = build_text_encoder(preset.text, pretrained=True)
    encoder = build_conditioning(conditioning, preset, spec.label_names, text_encoder=text_encoder)
    image_encoder = image_decoder = None
    if preset.latent and with_autoencoder:
        from Models.diffusion.autoencoder import build_image_decoder, build_image_encoder

        image_encoder = build_image_encoder(size)
        image_decoder = build_image_decoder(size)
    if preset.pretrained and not random_init:
        from Models.diffusion.weights import load_pretrained_weights

        load_pretrained_weights(unet, f"unet_{preset.name}")
        if image_encoder is not None:
            load_pretrained_weights(image_encoder, "encoder")
            load_pretrained_weights(image_decoder, "decoder")
    return ClassConditionalBackbone(preset, spec.num_classes, size, image_channels=spec.channels, unet=unet,
                                    conditioning=encoder, image_encoder=image_encoder,
                                    image_decoder=image_decoder)


def build_model(preset, spec, stage="enc", random_init=False, init_seed=0, seed=0, with_autoencoder=True,
                recipe=None, conditioning=None):
    """A DiffusionTrainer of `stage` over `build_backbone(preset, spec, random_init, init_seed)`.

    `seed` seeds the training draws (noise, timesteps, label dropout) and, afterwards, Keras'
    global generator. `recipe` overrides the preset's training recipe (`DiffusionPreset.recipe()`
    keys: schedule, prediction type, cond_dropout, snr_gamma). The trainer also generates
    (`trainer.generate`, through its `generator`).
    """
    preset = get_preset(preset)
    recipe = {**preset.recipe(), **(recipe or {})}
    backbone = build_backbone(preset, spec, random_init=random_init, init_seed=init_seed,
                              with_autoencoder=with_autoencoder, conditioning=conditioning)
    keras.utils.set_random_seed(int(seed))
    return DiffusionTrainer(backbone, stage=stage, cond_dropout=recipe["cond_dropout"],
                            snr_gamma=recipe["snr_gamma"], schedule=schedule_for(recipe), seed=seed)


def enc_parts(model):
    """What an "enc" checkpoint holds: the conditioning's trained weights (the class encoder, textual
    inversion's embeddings, nothing for text), + the UNet when it trained from scratch.

    `model`: a ClassConditionalBackbone, or anything holding one as `.backbone` (trainer, generator).
    """
    backbone = getattr(model, "backbone", model)
    parts = dict(backbone.conditioning.trained_parts())
    if not backbone.preset.pretrained:
        parts["unet"] = backbone.unet
    return parts


@dataclasses.dataclass(frozen=True)
class WeightsOrigin:
    """Where a generator's weights came from: `ClassConditionalGenerator.origin`, set by the loaders here.

    init: the enc stage's (random_init, init_seed, schedule settings), which fix the UNet's
        initialisation and the noise schedule.
    unet: the checkpoint file the UNet was loaded from, or "init" (sd presets' un-fine-tuned,
        pretrained UNet, in no checkpoint file).
    """

    init: tuple
    unet: str


def needs_enc_checkpoint(preset, conditioning):
    """Whether generation needs an enc-stage checkpoint: not for the text method on a pretrained
    preset, whose enc stage trains nothing (the model is keras-cv's text encoder and UNet)."""
    return conditioning is None or conditioning.trains() or not get_preset(preset).pretrained


def resolve_generation_checkpoints(preset, spec, exp, enc_epoch, dif_epoch, conditioning=None):
    """Checks the enc (and dif) checkpoints exist and fit (and were made with `conditioning`, a
    ConditioningSpec, when given); returns their settings and paths ("enc": None where the method
    needs no enc checkpoint, `needs_enc_checkpoint`)."""
    preset = get_preset(preset)
    if not needs_enc_checkpoint(preset, conditioning):
        # The pretrained model as published: its identity stands in for an enc stage's settings.json.
        enc_settings = identity = model_identity(preset, spec, False, 0, None, conditioning)
        used = {"enc": None, "dif": None}
    else:
        enc_dir = diffusion_checkpoint_dir(exp, spec.name, "enc")
        enc_path = require_checkpoint(enc_dir, enc_epoch, "class-encoder")
        enc_settings = read_settings(enc_dir)
        identity = model_identity(preset, spec, enc_settings.get("random_init"), enc_settings.get("init_seed", 0),
                                  schedule_settings(enc_settings),
                                  conditioning or ConditioningSpec.from_record(enc_settings))
        check_settings(enc_dir, identity, IDENTITY_KEYS)
        used = {"enc": str(enc_path), "dif": None}
    if dif_epoch:
        dif_dir = diffusion_checkpoint_dir(exp, spec.name, "dif")
        dif_path = require_checkpoint(dif_dir, dif_epoch, "fine-tuned UNet")
        check_settings(dif_dir, identity, IDENTITY_KEYS)
        trained_with = read_settings(dif_dir).get("enc_epoch")
        if used["enc"] and trained_with != enc_epoch:
            raise CheckpointError(f"the UNet in {dif_dir} was fine-tuned with the class encoder of epoch "
                                  f"{trained_with}, not --enc_epoch {enc_epoch}")
        used["dif"] = str(dif_path)
    return enc_settings, used


def load_generation_model(preset, spec, exp, enc_epoch, dif_epoch=0, conditioning=None):
    """The model that generates for (enc_epoch, dif_epoch): in memory, for scripts and tuning.

    dif_epoch 0 = the UNet without fine-tuning (sd: keras-cv's pretrained one;
    tiny: the one trained in the enc stage). The UNet's initialisation
    (pretrained or random, and its seed) follows the enc stage's settings.json.
    Returns (ClassConditionalGenerator, {"enc": path, "dif": path or None}).
    """
    enc_settings, used = resolve_generation_checkpoints(preset, spec, exp, enc_epoch, dif_epoch, conditioning)
    backbone = build_backbone(preset, spec, random_init=enc_settings["random_init"],
                              init_seed=enc_settings.get("init_seed", 0),
                              conditioning=ConditioningSpec.from_record(enc_settings))
    _load_generation_parts(backbone, used)
    generator = ClassConditionalGenerator(backbone, schedule_for(schedule_settings(enc_settings)),
                                          origin=_origin(backbone.preset, enc_settings, used))
    return generator, used


def _load_generation_parts(backbone, used):
    if used["enc"]:
        load_parts(used["enc"], enc_parts(backbone))
    if used["dif"]:
        dif_settings = read_settings(Path(used["dif"]).parent)
        if dif_settings.get("unet_tuning") == "lora":
            merge_adapter_checkpoint(used["dif"], backbone.unet, dif_settings["lora_alpha"])
        else:
            load_parts(used["dif"], {"unet": backbone.unet})


def adapter_values(path):
    """The adapter weights (A, B, ...) of a LoRA checkpoint, in `lora.Adapters` order."""
    from Models.diffusion.lora import ADAPTERS_PART

    try:
        with h5py.File(path, "r") as f:
            if ADAPTERS_PART not in f:
                raise CheckpointError(f"{path} holds no LoRA adapters (it has: {', '.join(f.keys()) or 'nothing'})")
            return _read_values(f[ADAPTERS_PART])
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def merge_adapter_checkpoint(path, unet, alpha):
    """A LoRA checkpoint merged into the base `unet` (without adapters): what generation samples with."""
    from Models.diffusion.lora import merge_adapters

    merge_adapters(unet, adapter_values(path), alpha)


def is_lora_checkpoint(path):
    return path is not None and (read_settings(Path(path).parent) or {}).get("unet_tuning") == "lora"


def _origin(preset, enc_settings, used):
    init = (bool(enc_settings.get("random_init")), int(enc_settings.get("init_seed", 0)),
            tuple(schedule_settings(enc_settings).items()),
            repr(ConditioningSpec.from_record(enc_settings)))
    return WeightsOrigin(init, used["dif"] or ("init" if preset.pretrained else used["enc"]))


# ----- the tuning stage's entry points ------------------------------------------------------
def available_epochs(exp, dataset, stage):
    """Epochs with a weights checkpoint of `stage` ("enc" or "dif") for (exp, dataset), ascending."""
    folder = diffusion_checkpoint_dir(exp, dataset, stage)
    return saved_epochs(folder) if read_settings(folder) is not None else []


def recorded_enc_epoch(exp, dataset):
    """The class-encoder epoch the UNet fine-tuning of (exp, dataset) used (settings.json), or None."""
    settings = read_settings(diffusion_checkpoint_dir(exp, dataset, "dif")) or {}
    return settings.get("enc_epoch")


def load_for_generation(exp, dataset, preset, stage, epoch, enc_epoch=None, model=None, conditioning=None):
    """The model of one checkpoint of `stage`, for in-memory generation (hyp_opt.py's trials).

    stage "enc": class-encoder checkpoint `epoch`, UNet without fine-tuning.
    stage "dif": fine-tuned UNet checkpoint `epoch` with the class encoder of `enc_epoch`
    (None: the one recorded beside the UNet checkpoints).
    `model`: a generator returned by an earlier call; its parts are reloaded in place
    when they can be (no rebuild, no recompilation of the sampler). Returns a ClassConditionalGenerator.
    """
    from Data.registry import get_spec

    spec = get_spec(dataset)
    if stage == "enc":
        # epoch 0: no enc checkpoint (the text method on a pretrained preset)
        enc, dif = int(epoch), 0
    elif stage == "dif":
        enc = recorded_enc_epoch(exp, spec.name) if enc_epoch is None else int(enc_epoch)
        if enc is None:
            raise CheckpointError(f"no fine-tuned UNet checkpoints in {diffusion_checkpoint_dir(exp, spec.name, 'dif')}")
        dif = int(epoch)
    else:
        raise ModelSettingsError(f"stage must be enc or dif, got {stage!r}")
    enc_settings, used = resolve_generation_checkpoints(preset, spec, exp, enc, dif, conditioning)
    origin = _origin(get_preset(preset), enc_settings, used)
    previous = getattr(model, "origin", None)
    reusable = (isinstance(model, ClassConditionalGenerator) and previous is not None
                and model.preset.name == get_preset(preset).name and model.num_classes == spec.num_classes
                and previous.init == origin.init
                # a LoRA checkpoint merges into the base UNet, which only the enc file holds (tiny, small)
                and not (is_lora_checkpoint(used["dif"]) and model.preset.pretrained)
                # the un-fine-tuned UNet of sd presets is not in any checkpoint file
                and (used["dif"] or not model.preset.pretrained or previous.unet == "init"))
    if not reusable:
        model, used = load_generation_model(preset, spec, exp, enc, dif, conditioning)
    else:
        _load_generation_parts(model.backbone, used)
        model.origin = origin
    return model
