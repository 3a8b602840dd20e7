"""Generates a synthetic data set with the trained class-conditional model (PAPER.md stage 5).

    # the paper's defaults: 50-epoch class encoder, 10-epoch UNet, 50 steps, UGS 7.5 (sd presets)
    python generate_dataset.py --dataset cifar10 --img_class 4000 --exp 0
    python generate_dataset.py --dataset retinamnist --img_total 1080 --enc_epoch 37 --dif_epoch 4 \\
        --inf_steps 31 --ugs 2.3 --exp 0
    # 4 machines writing one data set: run with --shard 0/4 ... --shard 3/4 (same other flags)
    python generate_dataset.py --dataset digits --preset tiny --img_total 1000 --enc_epoch 40 --dif_epoch 0 \\
        --shard 1/4

How many: --img_class N images per class (the paper's flag) or --img_total N in
all (balanced: img_total // C per class, one more for the first img_total % C
classes); with neither, as many as the real training split (x1).
--enc_epoch, --dif_epoch, --inf_steps and --ugs default to the preset's
(Models/diffusion/presets.py; sd1/sd2: 50, 10, 50, 7.5, the paper's; tiny and
small document their own); --dif_epoch 0 uses the UNet without fine-tuning.

Writes Data/Synthetic/Exp_{exp}/{dataset}/class_{NN}/img_{n}.png (or --out_dir)
at the dataset's native resolution (antialiased downsizing,
Data.images.RESIZE_METHOD), each file written atomically, plus manifest.json
(settings, checkpoints used, resize method, counts, versions) and samples.png (a
grid per class); Data/synthetic_writer.py. With --keep_generation_size the
images at the model's size (sd: 128 px) also go to the sibling folder
`{dataset}_{S}px/`.

Image n of class c depends only on (--seed, c, n) and the model settings:
batch sizes, shards and interrupted runs give identical files. Killed and run
again, it skips the images that exist and decode, and writes the rest. Running
with different settings into a folder that holds another data set is an error.

--only_class C generates only class C's images of the data set; --shard K/N
only the images whose index within their class is n % N == K (in an array
job it defaults to the job's task: SLURM_ARRAY_TASK_ID/COUNT, SGE_TASK_*).
Several workers with different --shard (or --only_class) values fill one
folder, or one folder each; `--verify FOLDER...` then proves that the parts
make exactly one complete data set (Data/shards.py), and the CAS stage
(classifier_training.py) refuses a generated folder with images missing.

    python generate_dataset.py --verify Data/Synthetic/Exp_0/retinamnist

The stage itself is Pipeline/generate.py (`GenerateSettings`, `run`, `is_done`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.generate import GenerateSettings, run  # noqa: E402
from Utils.cli import run_cli  # noqa: E402
from Utils.settings import command_line  # noqa: E402

parser, main = command_line(GenerateSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
