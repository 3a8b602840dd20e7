"""Converts diffusers Stable Diffusion checkpoints to our Keras weights, and our UNet back.

    # a diffusers pipeline folder (unet/ and vae/ inside), or one model folder
    python convert_diffusers.py to-keras path/to/stable-diffusion-v1-5 --out converted/sd15 --preset sd1
    # the UNet as a fine-tuned-UNet checkpoint beside an existing class encoder, for generate_dataset.py
    python convert_diffusers.py to-keras path/to/unet --dataset retinamnist --exp 0 --enc_epoch 37 --dif_epoch 1
    python generate_dataset.py --dataset retinamnist --img_total 1080 --enc_epoch 37 --dif_epoch 1 --exp 0
    # LoRA adapters (SD_adapting.py --unet_tuning lora) for a PyTorch pipeline's load_lora_weights
    python convert_diffusers.py lora-to-diffusers --dataset retinamnist --exp 0 --dif_epoch 10 --out exported/lora
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
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Models.diffusion.diffusers_folders import (UNET_PRESET, convert_to_diffusers, convert_to_keras,  # noqa: E402
                                                export_lora_checkpoint, install_unet_checkpoint)
from Models.diffusion.presets import PRESETS  # noqa: E402
from Utils.cli import (ArgumentParser, UserError, existing_file, existing_folder, experiment_id,  # noqa: E402
                       folder, positive_int, run_cli)

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
directions = parser.add_subparsers(dest="direction", required=True,
                                   metavar="{to-keras,to-diffusers,lora-to-diffusers}")
to_keras = directions.add_parser("to-keras", help="diffusers folder -> our Keras weights")
to_keras.add_argument("source", type=existing_folder,
                      help="a diffusers pipeline folder (with unet/ and/or vae/) or one model folder")
to_keras.add_argument("--out", type=folder, default=None, help="folder for the Keras weight files")
to_keras.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="check that the UNet has this preset's architecture and take its other "
                           "settings (default: the matching preset, if any)")
install = to_keras.add_argument_group("install the UNet as a fine-tuned-UNet checkpoint")
install.add_argument("--dataset", default=None, help="the dataset whose class encoder it pairs with "
                                                    "(as the other scripts': a registered name, folder:PATH, tfds:NAME)")
install.add_argument("--image_size", type=positive_int, default=None,
                     help="folder: and tfds: datasets: the square size their images are resized to (as given to "
                          "SD_adapting.py; required when their sizes differ)")
install.add_argument("--data_dir", type=folder, default=None, help="tfds: datasets: the TFDS data folder")
install.add_argument("--exp", type=experiment_id, default="0", help="experiment identifier: the Exp_{exp} folders (default 0)")
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

lora_out = directions.add_parser("lora-to-diffusers",
                                 help="LoRA adapters (SD_adapting.py --unet_tuning lora) -> pytorch_lora_weights.safetensors")
lora_out.add_argument("--dataset", required=True, help="the dataset the adapters were fine-tuned on")
lora_out.add_argument("--exp", type=experiment_id, default="0", help="experiment identifier (default 0)")
lora_out.add_argument("--dif_epoch", type=positive_int, required=True, help="the LoRA checkpoint to export")
lora_out.add_argument("--out", type=folder, required=True, help="the folder to write the safetensors file into")


def main(argv=None):
    args = parser.parse_args(argv)
    for name in ("source", "out", "unet_weights"):  # checked as text by the parser; paths below
        if getattr(args, name, None) is not None:
            setattr(args, name, Path(getattr(args, name)))
    if args.direction == "lora-to-diffusers":
        path = export_lora_checkpoint(args.dataset, args.exp, args.dif_epoch, args.out)
        print(f"wrote {path}")
        return 0
    if args.direction == "to-keras":
        if args.dataset is not None:
            return install_unet_checkpoint(args.source, args.dataset, args.exp, args.enc_epoch,
                                           args.dif_epoch, args.preset, args.out, image_size=args.image_size,
                                           data_dir=args.data_dir)
        if args.out is None:
            raise UserError("to-keras needs --out (weight files) or --dataset (a fine-tuned-UNet checkpoint)")
        return convert_to_keras(args.source, args.out, args.preset)
    return convert_to_diffusers(args.preset, args.unet_weights, args.out, args.sample_size,
                                args.image_channels)


if __name__ == "__main__":
    run_cli(main)
