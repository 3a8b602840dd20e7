"""Converts diffusers Stable Diffusion checkpoints to our Keras weights, and our UNet back.

    # a diffusers pipeline folder (unet/ and vae/ inside), or one model folder
    python convert_diffusers.py to-keras path/to/stable-diffusion-v1-5 --out converted/sd15 --preset sd1
    # the UNet as a fine-tuned-UNet checkpoint beside an existing class encoder, for generate_dataset.py
    python convert_diffusers.py to-keras path/to/unet --dataset retinamnist --exp 0 --enc_epoch 37 --dif_epoch 1
    python generate_dataset.py --dataset retinamnist --img_total 1080 --enc_epoch 37 --dif_epoch 1 --exp 0
    # our UNet (e.g. fine-tuned here) as a diffusers UNet2DConditionModel folder
    python convert_diffusers.py to-diffusers --preset sd1 --unet_weights converted/sd15/unet.weights.h5 \\
        --out exported/unet

to-keras reads `config.json` and `diffusion_pytorch_model.safetensors` (or a sharded
index, or a legacy `.bin` with torch installed) of a `UNet2DConditionModel` and/or an
`AutoencoderKL`, derives or checks our preset from the UNet's config, and writes into
--out:

    unet.weights.h5            our UNet (build_unet(preset, ...).load_weights)
    unet_preset.json           the preset those weights need (architecture from the config;
                               `--preset sd1` also checks it is sd1's) and the UNet's channels
                               (`unet_channels`: 4 latent, 1 grey or 3 RGB pixels)
    image_encoder.weights.h5   our autoencoder (build_image_encoder / build_image_decoder with
    image_decoder.weights.h5   norm_epsilon=1e-6, diffusers' GroupNorm epsilon)

With --dataset, the UNet is written as checkpoint --dif_epoch of the fine-tuned
UNet (Checkpoints/DDPM/Exp_{exp}/{dataset}/DiffusionFt/), paired with class-encoder
checkpoint --enc_epoch, whose preset it must have (and, in pixel space, the
dataset's channels: 1 for grey datasets such as digits); generate_dataset.py and
hyp_opt.py then use it like a UNet fine-tuned here. (sd presets keep keras-cv's
tanh GELU and autoencoder epsilon: a converted SD model then differs slightly
from diffusers, see BENCHMARKS.md; tiny matches exactly.)

to-diffusers writes `config.json` + `diffusion_pytorch_model.safetensors` that
`UNet2DConditionModel.from_pretrained(--out)` loads. --preset is a preset name or a
`unet_preset.json` written by to-keras. The UNet's channels are --image_channels, else
the preset file's, else the ones the weights fit (pixel presets: 3 or 1).

Everything is checked before anything is written: missing, unexpected or
mismatched tensors are named in one error line. No torch or diffusers needed
(Models/diffusion/diffusers_convert.py has the details).
"""

import argparse
import dataclasses
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Models.diffusion import diffusers_convert as dc  # noqa: E402
from Models.diffusion.presets import PRESETS, DiffusionPreset, get_preset  # noqa: E402
from Utils.cli import (ArgumentParser, UserError, existing_file, existing_folder, folder,  # noqa: E402
                       non_negative_int, positive_int, run_cli)
from Utils.io import atomic_path, atomic_write_json, read_json  # noqa: E402

UNET_WEIGHTS = "unet.weights.h5"
UNET_PRESET = "unet_preset.json"
UNET_CHANNELS = "unet_channels"  # in UNET_PRESET, beside the preset's fields
ENCODER_WEIGHTS = "image_encoder.weights.h5"
DECODER_WEIGHTS = "image_decoder.weights.h5"

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
directions = parser.add_subparsers(dest="direction", required=True, metavar="{to-keras,to-diffusers}")
to_keras = directions.add_parser("to-keras", help="diffusers folder -> our Keras weights")
to_keras.add_argument("source", type=existing_folder,
                      help="a diffusers pipeline folder (with unet/ and/or vae/) or one model folder")
to_keras.add_argument("--out", type=folder, default=None, help="folder for the Keras weight files")
to_keras.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="check that the UNet has this preset's architecture and take its other "
                           "settings (default: the matching preset, if any)")
install = to_keras.add_argument_group("install the UNet as a fine-tuned-UNet checkpoint")
install.add_argument("--dataset", default=None, help="the dataset whose class encoder it pairs with")
install.add_argument("--exp", type=non_negative_int, default=0, help="experiment number (default 0)")
install.add_argument("--enc_epoch", type=positive_int, default=None, help="the class-encoder checkpoint")
install.add_argument("--dif_epoch", type=positive_int, default=1,
                     help="the checkpoint epoch to write (default 1); an existing one is an error")
to_diffusers = directions.add_parser("to-diffusers", help="our UNet -> diffusers UNet2DConditionModel folder")
to_diffusers.add_argument("--preset", required=True,
                          help=f"the UNet's preset: {', '.join(PRESETS)}, or a {UNET_PRESET} file")
to_diffusers.add_argument("--unet_weights", type=existing_file, required=True,
                          help="our UNet's Keras weights (.weights.h5)")
to_diffusers.add_argument("--out", type=folder, required=True, help="the diffusers model folder to write")
to_diffusers.add_argument("--image_channels", type=int, choices=(1, 3), default=None,
                          help="a pixel-space UNet's channels (1 grey, 3 RGB; default: the preset file's, "
                               "else the ones the weights fit)")
to_diffusers.add_argument("--sample_size", type=positive_int, default=None,
                          help="the config's sample_size: latent (or pixel) size pipelines default to "
                               "(default: the preset's image size / 8, or 32)")


def main(argv=None):
    args = parser.parse_args(argv)
    for name in ("source", "out", "unet_weights"):  # checked as text by the parser; paths below
        if getattr(args, name, None) is not None:
            setattr(args, name, Path(getattr(args, name)))
    if args.direction == "to-keras":
        if args.dataset is not None:
            return install_unet_checkpoint(args.source, args.dataset, args.exp, args.enc_epoch,
                                           args.dif_epoch, args.preset, args.out)
        if args.out is None:
            raise UserError("to-keras needs --out (weight files) or --dataset (a fine-tuned-UNet checkpoint)")
        return convert_to_keras(args.source, args.out, args.preset)
    return convert_to_diffusers(args.preset, args.unet_weights, args.out, args.sample_size,
                                args.image_channels)


def _model_folders(source):
    """{'unet': folder, 'vae': folder} found in `source` (a pipeline or a single model folder)."""
    if not source.is_dir():
        raise UserError(f"{source} is not a folder")
    if (source / "config.json").is_file():
        config = read_json(source / "config.json")
        kinds = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae"}
        kind = kinds.get(config.get("_class_name"))
        if kind is None:
            raise UserError(f"{source / 'config.json'} is a {config.get('_class_name')!r}, "
                            "expected a UNet2DConditionModel or AutoencoderKL")
        return {kind: source}
    folders = {kind: source / kind for kind in ("unet", "vae") if (source / kind / "config.json").is_file()}
    if not folders:
        raise UserError(f"{source} holds no diffusers UNet or VAE: expected config.json, or unet/ and vae/ "
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
        raise UserError(f"--preset checks a UNet, and {source} has none")
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


def install_unet_checkpoint(source, dataset, exp, enc_epoch, dif_epoch, preset_name=None, out=None):
    """Writes the diffusers UNet in `source` as fine-tuned-UNet checkpoint `dif_epoch`.

    The class-encoder checkpoint `enc_epoch` of (exp, dataset) must exist; its preset
    is the one the UNet must have. settings.json of the DiffusionFt folder records the
    source; an existing one must name the same model and class-encoder epoch.
    """
    from Data.registry import get_spec
    from Models.diffusion import checkpoints as ck
    from Models.diffusion.unet import build_unet
    from Utils.paths import diffusion_checkpoint_dir

    if out is not None:
        raise UserError("--out and --dataset are exclusive: run to-keras twice for both")
    if enc_epoch is None:
        raise UserError("--dataset needs --enc_epoch: the class-encoder checkpoint the UNet pairs with")
    spec = get_spec(dataset)
    folders = _model_folders(source)
    if "unet" not in folders:
        raise UserError(f"{source} holds no diffusers UNet")
    enc_dir = diffusion_checkpoint_dir(exp, spec.name, "enc")
    ck.require_checkpoint(enc_dir, enc_epoch, "class-encoder")
    enc_settings = ck.read_settings(enc_dir)
    preset = get_preset(enc_settings["preset"])
    if preset_name is not None and preset_name != preset.name:
        raise UserError(f"--preset {preset_name}, but the class encoder in {enc_dir} is for {preset.name}")
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
        raise UserError(f"{target} exists; choose another --dif_epoch or --exp")

    config, tensors = dc.read_diffusers_model(folders["unet"])
    converted = dc.unet_preset_from_config(config, base=preset)
    channels, _ = dc.unet_config_channels(config)
    expected = preset.unet_channels(spec.channels)
    if channels != expected:
        raise UserError(f"the diffusers UNet has {channels} input channels, the {preset.name} UNet for "
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


def convert_to_diffusers(preset_text, unet_weights, out, sample_size=None, image_channels=None):
    preset = resolve_preset(preset_text)
    if not unet_weights.is_file():
        raise UserError(f"--unet_weights {unet_weights} does not exist")
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
    raise UserError(f"{unet_weights} does not fit the {preset.name} UNet ({tried} channels): {first_line}")


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
        raise UserError(f"--preset {text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        fields = {field.name for field in dataclasses.fields(DiffusionPreset)}
        return DiffusionPreset(**{key: tuple(value) if isinstance(value, list) else value
                                  for key, value in values.items() if key in fields})
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a preset file written by convert_diffusers.py: {e}") from None


if __name__ == "__main__":
    run_cli(main)
