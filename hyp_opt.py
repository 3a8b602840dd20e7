"""Bayesian optimisation of the generation settings (PAPER.md stages 2 and 4).

Tunes the inference steps, the unconditional guidance scale and the checkpoint
epoch of the class encoder (`--train_model enc`) or of the fine-tuned UNet
(`--train_model dif`) with Optuna (TPE sampler, Hyperband pruner). Each trial
generates `--num_imgs` images, trains a ResNet20 on them (batch `--batch_size`)
and is scored by its accuracy on the REAL VALIDATION split; the real test
accuracy is recorded per trial but never optimised (the original optimised
it: PAPER.md, "Known defects"). The stage is `Pipeline/tune.py`, its machinery
`Pipeline/tuning/` (search space, storage, resume, several workers).

    # the paper's stage 2, then stage 4 (winners of #1 read from the same storage)
    python hyp_opt.py --dataset retinamnist --train_model enc --exp 0001 --save_plots True
    python hyp_opt.py --dataset retinamnist --train_model dif --exp 0001 --save_plots True
    # the stage table's "no optimisation" rows: the preset's default steps/UGS, last checkpoint
    python hyp_opt.py --dataset retinamnist --train_model enc --exp 0001 --optimize False
    # several machines on one study
    python hyp_opt.py ... --storage postgresql://user@host/optuna      # on every machine

Writes: the study (`--storage`, default sqlite file
`Experiments/Exp_{exp}/{dataset}/optuna.db`), the stage table
`CAS Results/pipeline_optimization_exp{exp}.json` and with `--save_plots` the
plots under `optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/`.
Interrupted, the same command resumes; `--n_trials` is the total wanted.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.tune import TuneSettings, run  # noqa: E402
from Utils.cli import run_cli  # noqa: E402
from Utils.settings import command_line  # noqa: E402

parser, main = command_line(TuneSettings, run, __doc__)

if __name__ == "__main__":
    run_cli(main)
