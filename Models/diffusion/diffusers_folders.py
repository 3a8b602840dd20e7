"""Diffusers model folders <-> our weight files and checkpoints (`convert_diffusers.py`).

`convert_to_keras` writes our UNet / autoencoder weight files and the preset
they need; `install_unet_checkpoint` writes a diffusers UNet as a fine-tuned-UNet
checkpoint beside an existing class encoder (generate_dataset.py and hyp_opt.py
then use it like a UNet fine-tuned here); `convert_to_diffusers` writes our UNet
as a `UNet2DConditionModel` folder. The tensor mapping itself is in
`Models/diffusion/diffusers_convert.py`. Everything is checked before anything
is written.

Example:
    >>> convert_to_keras(Path("stable-diffusion-v1-5"), Path("converted/sd15"), "sd1")
    >>> install_unet_checkpoint(Path("unet"), "retinamnist", exp="0", enc_epoch=37, dif_epoch=1)
"""

import dataclasses
import json
import warnings
from pathlib import Path

from Models.diffusion import diffusers_convert as dc
from Models.diffusion.presets import PRESETS, DiffusionPreset, get_preset
from Models.errors import CheckpointError, ModelSettingsError
from Utils.io import atomic_path, atomic_write_json, read_json

UNET_WEIGHTS = "unet.weights.h5"
UNET_PRESET = "unet_preset.json"
UNET_CHANNELS = "unet_channels"  # in UNET_PRESET, beside the preset's fields
ENCODER_WEIGHTS = "image_encoder.weights.h5"
DECODER_WEIGHTS = "image_decoder.weights.h5"


def _model_folders(source):
    """{'unet': folder, 'vae': folder} found in `source` (a pipeline or a single model folder)."""
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a folder")
    if (source / "config.json").is_file():
        config = read_json(source / "config.json")
        kinds = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}
        kind = kinds.get(config.get("_class_name"))
        if kind is None:
            raise CheckpointError(f"{source / 'config.json'} is a {config.get('_class_name')!r}, "
                            "expected a UNet2DConditionModel or AutoencoderKL")
        return {kind: source}
    folders = {kind: source / kind for kind in ("unet", "vae") if (source / kind / "config.json").is_file()}
    if not folders:
        raise CheckpointError(f"{source} holds no diffusers UNet or VAE: expected config.json, or unet/ and vae/ "
                        "sub-folders with config.json")
    return folders


def convert_to_keras(source, out, preset_name=None):
    import keras

    from Models.diffusion.unet import build_unet

    folders = _model_folders(source)
    built = {}  # file name -> model, all loaded and checked before anything is written
    preset = None
    if "unet" in folders:
        config, tensors = dc.read_diffusers_model(folders["unet"])
        preset = dc.unet_preset_from_config(config, base=preset_name)
        channels, _ = dc.unet_config_channels(config)
        unet = build_unet(preset, image_size=None, image_channels=channels)
        dc.load_unet_weights(unet, preset, tensors)
        built[UNET_WEIGHTS] = unet
        del tensors
    elif preset_name is not None:
        raise ModelSettingsError(f"--preset checks a UNet, and {source} has none")
    if "vae" in folders:
        config, tensors = dc.read_diffusers_model(folders["vae"])
        dc.check_autoencoder_config(config)
        encoder, decoder = dc.build_diffusers_autoencoder(image_size=None)
        dc.load_autoencoder_weights(encoder, decoder, tensors)
        built[ENCODER_WEIGHTS], built[DECODER_WEIGHTS] = encoder, decoder
        del tensors

    out.mkdir(parents=True, exist_ok=True)
    for filename, model in built.items():
        with atomic_path(out / filename) as tmp:
            model.save_weights(tmp)
    if preset is not None:
        atomic_write_json(out / UNET_PRESET, {"source": str(folders["unet"].resolve()),
                                              UNET_CHANNELS: channels, **preset_to_dict(preset)})
    print(f"wrote {', '.join(sorted(built) + ([UNET_PRESET] if preset else []))} to {out}"
          + (f" (UNet preset: {preset.name})" if preset else ""))
    alike = dc.presets_with_architecture(preset) if preset is not None and preset_name is None else []
    if len(alike) > 1:
        # Their recipes (noise schedule, prediction type) differ, and the UNet config does not record one.
        print(f"note: presets {', '.join(alike)} share this UNet architecture; {preset.name} was chosen, "
              "--preset picks another")
    keras.backend.clear_session()
    return 0


def install_unet_checkpoint(source, dataset, exp, enc_epoch, dif_epoch, preset_name=None, out=None, image_size=None,
                            data_dir=None):
    """Writes the diffusers UNet in `source` as fine-tuned-UNet checkpoint `dif_epoch`.

    The class-encoder checkpoint `enc_epoch` of (exp, dataset) must exist; its preset
    is the one the UNet must have. settings.json of the DiffusionFt folder records the
    source; an existing one must name the same model and class-encoder epoch. `image_size`
    and `data_dir` read `folder:` / `tfds:` datasets as the other scripts' flags do.
    """
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.unet import build_unet
    from Utils.paths import diffusion_checkpoint_dir

    if out is not None:
        raise ModelSettingsError("--out and --dataset are exclusive: run to-keras twice for both")
    if enc_epoch is None:
        raise ModelSettingsError("--dataset needs --enc_epoch: the class-encoder checkpoint the UNet pairs with")
    spec = get_spec(dataset, image_size=image_size, data_dir=data_dir)
    folders = _model_folders(source)
    if "unet" not in folders:
        raise CheckpointError(f"{source} holds no diffusers UNet")
    enc_dir = diffusion_checkpoint_dir(exp, spec.name, "enc")
    ck.require_checkpoint(enc_dir, enc_epoch, "class-encoder")
    enc_settings = ck.read_settings(enc_dir)
    preset = get_preset(enc_settings["preset"])
    if preset_name is not None and preset_name != preset.name:
        raise CheckpointError(f"--preset {preset_name}, but the class encoder in {enc_dir} is for {preset.name}")
    identity = ck.model_identity(preset, spec, enc_settings.get("random_init"), enc_settings.get("init_seed", 0),
                                 ck.schedule_settings(enc_settings))
    ck.check_settings(enc_dir, identity, ck.IDENTITY_KEYS)
    dif_dir = diffusion_checkpoint_dir(exp, spec.name, "dif")
    settings = {**identity, "stage": "dif", "enc_epoch": enc_epoch,
                "source": f"diffusers {folders['unet'].resolve()}"}
    # Only into a folder this converter made from the same UNet (never beside a real fine-tuning).
    ck.check_settings(dif_dir, settings, [*ck.IDENTITY_KEYS, "enc_epoch", "source"])
    target = ck.weights_path(dif_dir, dif_epoch)
    if target.exists():
        raise CheckpointError(f"{target} exists; choose another --dif_epoch or --exp")

    config, tensors = dc.read_diffusers_model(folders["unet"])
    converted = dc.unet_preset_from_config(config, base=preset)
    channels, _ = dc.unet_config_channels(config)
    expected = preset.unet_channels(spec.channels)
    if channels != expected:
        raise CheckpointError(f"the diffusers UNet has {channels} input channels, the {preset.name} UNet for "
                        f"{spec.name} ({spec.channels}-channel images) needs {expected}")
    unet = build_unet(preset, image_size=None, context_length=preset.context_length, image_channels=channels)
    dc.load_unet_weights(unet, preset, tensors)
    if ck.read_settings(dif_dir) is None:
        atomic_write_json(dif_dir / ck.SETTINGS_FILE, settings)
    ck.save_parts(target, {"unet": unet})
    print(f"wrote {target} (the diffusers UNet as fine-tuned UNet epoch {dif_epoch}, "
          f"with class encoder epoch {enc_epoch})")
    if converted.gelu_approximate != preset.gelu_approximate:
        print(f"note: preset {preset.name} uses keras-cv's tanh GELU, diffusers the exact one: "
              "noise predictions differ slightly (BENCHMARKS.md)")
    return 0


def export_lora_checkpoint(dataset, exp, dif_epoch, out):
    """LoRA checkpoint `dif_epoch` of (exp, dataset) (SD_adapting.py --unet_tuning lora) as diffusers'
    `out/pytorch_lora_weights.safetensors`, which `StableDiffusionPipeline.load_lora_weights(out)` loads
    over the base UNet it was fine-tuned from (the pipeline's own, converted from ours with
    to-diffusers for pixel presets). Returns the file's path."""
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion import lora
    from Models.diffusion.unet import build_unet
    from Utils.paths import diffusion_checkpoint_dir

    spec = get_spec(dataset)
    folder = diffusion_checkpoint_dir(exp, spec.name, "dif")
    path = ck.require_checkpoint(folder, dif_epoch, "fine-tuned UNet")
    settings = ck.read_settings(folder)
    if settings.get("unet_tuning") != "lora":
        raise CheckpointError(f"{folder} holds a fully fine-tuned UNet, not LoRA adapters: export it with to-diffusers")
    preset = get_preset(settings["preset"])
    # Only the layers' shapes matter here: the adapters are exported, not the base weights.
    unet = build_unet(preset, settings["image_size"], settings["context_length"],
                      image_channels=None if preset.latent else settings["unet_channels"])
    adapters = lora.add_adapters(unet, settings["lora_rank"], settings["lora_alpha"])
    values = ck.adapter_values(path)
    if [v.shape for v in values] != [tuple(w.shape) for w in adapters.weights]:
        raise CheckpointError(f"the adapters in {path} do not fit its settings.json")
    adapters.set_weights(values)
    return lora.save_diffusers_lora(unet, preset, out)


def convert_to_diffusers(preset_text, unet_weights, out, sample_size=None, image_channels=None):
    preset = resolve_preset(preset_text)
    if not unet_weights.is_file():
        raise CheckpointError(f"--unet_weights {unet_weights} does not exist")
    if image_channels is None:
        image_channels = preset_file_channels(preset_text)
    if preset.latent:
        candidates = [dc.LATENT_CHANNELS]
    else:  # a weights file does not say; the pixel UNets are small enough to try both
        candidates = [image_channels] if image_channels else [3, 1]
    unet = _load_keras_unet(preset, unet_weights, candidates)
    config = dc.save_unet_as_diffusers(unet, preset, out, sample_size)
    print(f"wrote a diffusers UNet2DConditionModel ({preset.name}, {config['in_channels']} channels, "
          f"block_out_channels {config['block_out_channels']}) to {out}")
    return 0


def _load_keras_unet(preset, unet_weights, channel_candidates):
    """Our UNet with `unet_weights` loaded, built with the first channel count they fit."""
    from Models.diffusion.unet import build_unet

    first_error = None
    for channels in channel_candidates:
        unet = build_unet(preset, image_size=None, image_channels=channels)
        try:
            with warnings.catch_warnings():  # Keras warns per skipped group before raising
                warnings.simplefilter("ignore")
                unet.load_weights(unet_weights)
            return unet
        except (ValueError, OSError, KeyError) as e:
            first_error = first_error or e
    first_line = (str(first_error).strip().splitlines() or [type(first_error).__name__])[0]
    tried = " or ".join(map(str, channel_candidates))
    raise CheckpointError(f"{unet_weights} does not fit the {preset.name} UNet ({tried} channels): {first_line}")


def preset_to_dict(preset):
    """A preset as JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(preset)


def preset_file_channels(text):
    """The UNet channels recorded in a unet_preset.json (None: a preset name, or an older file)."""
    if text in PRESETS or not Path(text).is_file():
        return None
    try:
        channels = json.loads(Path(text).read_text(encoding="utf-8")).get(UNET_CHANNELS)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # resolve_preset has already named what is wrong with the file
    return int(channels) if channels is not None else None


def resolve_preset(text):
    """A preset name, or the path of a unet_preset.json written by to-keras."""
    if text in PRESETS:
        return get_preset(text)
    path = Path(text)
    if not path.is_file():
        raise ModelSettingsError(f"--preset {text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        fields = {field.name for field in dataclasses.fields(DiffusionPreset)}
        return DiffusionPreset(**{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in values.items() if key in fields})
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a preset file written by convert_diffusers.py: {e}") from None
