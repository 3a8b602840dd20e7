"""CAS: train a ResNet20 on real or synthetic images, test it on the real test split.

The paper's `classifier_training.py`. What it trains on:
  --synthetic True (default)  --take N x (real training-set size) images from our generated
                              folder Data/Synthetic/Exp_{exp}/{dataset}/, balanced per
                              class (default N = 1)                       → run "xN"
  --synthetic False           the real training split                     → run "real"
  --synthetic_dir DIR         any folder of class sub-folders (another implementation's
                              output, ImageFolder layout); --take N as above, without
                              --take every readable image                → run "<DIR name>_xN" / "_all"
It always validates on the real validation split and tests on the real test split.
Boolean flags take True/False or --flag / --no-flag.

Writes (relative to $SDDG_OUTPUT_ROOT, else the current folder):
  Checkpoints/Classifiers/Exp_{exp}/{dataset}/{run}/   resnet20.weights.h5, history.csv, run.json
                                                       (resume_state.npz while training)
  CAS Results/test_accuracies_exp{exp}.json            top-1, top-5, per-class accuracy, confusion
                                                       matrix, ... merged under a lock
  CAS Results/cas_{dataset}_exp{exp}.png               ours against the paper's curve

A killed run resumes when the same command is run again. `--train` (default)
always trains (a finished run's checkpoint is replaced at the end); `--train
False` reuses the finished run's checkpoint; `--test False` trains without testing.

Examples:
    python classifier_training.py --dataset bloodmnist --synthetic True --take 4 --test False   # the paper's
    python classifier_training.py --dataset retinamnist --synthetic False --data_dir ../shared/data
    python classifier_training.py --dataset cifar10 --exp 0 --take 4
    python classifier_training.py --dataset cifar10 --synthetic_dir ~/other_impl/cifar10 --take 1
    python classifier_training.py --dataset cifar10 --take 4 --train False   # test again
    python classifier_training.py --dataset digits --no-synthetic --epochs 20 --batch_size 64

The stage itself is Pipeline/cas.py (`CASSettings`, `run`, `is_done`).
"""

from Pipeline.cas import CASSettings, run
from Utils.cli import run_cli
from Utils.settings import command_line

parser, main = command_line(CASSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
