"""Trains the class-conditional diffusion model (PAPER.md stages 1 and 3).

    # stage 1: the class encoder (sd presets: UNet and autoencoder frozen;
    #          small, tiny: also trains their UNet from scratch, a stand-in for SD's pretraining)
    python SD_adapting.py --dataset retinamnist --train_model enc --exp 0 --freq 1
    # stage 3: fine-tune the UNet, the class encoder of epoch 37 frozen
    python SD_adapting.py --dataset retinamnist --train_model dif --enc_epoch 37 --exp 0 --freq 1
    # a CPU-sized run of both stages
    python SD_adapting.py --dataset digits --preset small --train_model enc
    python SD_adapting.py --dataset digits --preset small --train_model dif --enc_epoch 25

Checkpoints go to Checkpoints/DDPM/Exp_{exp}/{dataset}/MyEmbedding (enc) or
DiffusionFt (dif). Killed at any moment, the same command resumes from the
newest complete checkpoint; a finished run says so and exits 0. What
--enc_epoch and --dif_epoch mean in each stage, and what is refused, is in
Pipeline/adapt.py, the library this script is the command line of.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.adapt import AdaptSettings, run  # noqa: E402
from Utils.cli import run_cli  # noqa: E402
from Utils.settings import command_line  # noqa: E402

parser, main = command_line(AdaptSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
