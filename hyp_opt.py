"""Bayesian optimisation of the generation settings (PAPER.md stages 2 and 4).

Tunes the inference steps, the unconditional guidance scale and the checkpoint
epoch of the class encoder (`--train_model enc`) or of the fine-tuned UNet
(`--train_model dif`) with Optuna (TPE sampler, Hyperband pruner). Each trial
generates `--num_imgs` images, trains a ResNet20 on them and is scored by its
accuracy on the REAL VALIDATION split; the real test accuracy is recorded per
trial but never optimised (the original optimised it: PAPER.md, "Known
defects"). The library is `Pipeline/tuning.py`; its docstring has the details
(search space, storage, resume, several workers).

    # the paper's stage 2, then stage 4 (winners of #1 read from the same storage)
    python hyp_opt.py --dataset retinamnist --train_model enc --exp 0 --save_plots
    python hyp_opt.py --dataset retinamnist --train_model dif --exp 0 --save_plots
    # the stage table's "no optimisation" rows: the preset's default steps/UGS, last checkpoint
    python hyp_opt.py --dataset retinamnist --train_model enc --exp 0 --no-optimize
    # several machines on one study
    python hyp_opt.py ... --storage postgresql://user@host/optuna      # on every machine

Writes: the study (`--storage`, default sqlite file
`Experiments/Exp_{exp}/{dataset}/optuna.db`), the stage table
`CAS Results/pipeline_optimization_exp{exp}.json` and with `--save_plots` the
plots under `optimization_plots/Exp_{exp}/{dataset}/{enc|dif}/`.
Interrupted, the same command resumes; `--n_trials` is the total wanted.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.tuning import DEFAULT_N_TRIALS, OBJECTIVES, TuningOptions, check_options, run_tuning  # noqa: E402
from Utils.cli import (ArgumentParser, folder, non_negative_float, non_negative_int, positive_int,  # noqa: E402
                       run_cli)
from Utils.runtime import add_runtime_flags  # noqa: E402
from Models.diffusion.presets import preset_help  # noqa: E402

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
paper = parser.add_argument_group("the paper's flags")
paper.add_argument("--dataset", required=True, help="a registered dataset (Data/registry.py)")
paper.add_argument("--exp", type=non_negative_int, default=0, help="experiment number: the Exp_{exp} folders and results files (default 0)")
paper.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="run the study (default); --no-optimize scores the preset's default "
                        "steps and UGS with the last checkpoint (the stage table's no_opt row)")
paper.add_argument("--train_model", required=True, choices=("enc", "dif"),
                   help="tune the class-encoder checkpoints (enc, study #1) or the fine-tuned UNet's (dif, #2)")
paper.add_argument("--batch_size", type=positive_int, default=250,
                   help="generation batch: images per sampler call (default 250, the paper's)")
paper.add_argument("--enc_epoch", type=positive_int, default=None,
                   help="dif only: the class-encoder checkpoint the fine-tuning used "
                        "(default: the one recorded beside the UNet checkpoints)")
paper.add_argument("--num_imgs", type=positive_int, default=4000,
                   help="generated images per trial, balanced over classes (default 4000)")
paper.add_argument("--is_1", type=positive_int, default=None,
                   help="dif only: study #1's winning steps, top of the steps range "
                        "(default: read from the enc study in the same storage)")
paper.add_argument("--ugs_1", type=non_negative_float, default=None,
                   help="dif only: study #1's winning UGS; the range is [0, 2*ugs_1] (default: from the enc study)")
paper.add_argument("--save_plots", action="store_true",
                   help="write the Optuna plots (history, contours, importances, slices, timeline) as PNG")
ours = parser.add_argument_group("added")
ours.add_argument("--preset", default="sd1", help=preset_help("sd1"))
ours.add_argument("--data_dir", type=folder, default=None, help="folder with the real dataset files")
ours.add_argument("--n_trials", type=positive_int, default=None,
                  help=f"TOTAL finished trials wanted, counting earlier runs "
                       f"(default {DEFAULT_N_TRIALS['enc']} enc, {DEFAULT_N_TRIALS['dif']} dif)")
ours.add_argument("--classifier_epochs", type=positive_int, default=100,
                  help="ResNet20 epochs per trial (default 100, the CAS protocol)")
ours.add_argument("--classifier_batch_size", type=positive_int, default=256,
                  help="ResNet20 batch per trial (default 256, the CAS protocol)")
ours.add_argument("--storage", default=None,
                  help="Optuna storage: sqlite:///PATH.db, postgresql://..., mysql://..., or journal:PATH "
                       "(default: sqlite file Experiments/Exp_{exp}/{dataset}/optuna.db)")
ours.add_argument("--seed", type=non_negative_int, default=0, help="sampler, generation and classifier seed (default 0)")
ours.add_argument("--objective", choices=OBJECTIVES, default="cas",
                  help="cas: validation accuracy of a ResNet20 per trial (default); kid: kernel inception "
                       "distance to the real training images (no classifier per trial; the winner's CAS "
                       "is recorded beside the accuracy-tuned one)")
ours.add_argument("--max_steps", type=positive_int, default=None,
                  help="cap the top of the steps range (CPU runs; default: the paper's range)")
ours.add_argument("--prune_after", type=positive_int, default=1,
                  help="Hyperband's minimum resource: classifier epochs before a trial can be pruned "
                       "(default 1, Optuna's default as the paper configured it)")
ours.add_argument("--enqueue_defaults", action="store_true",
                  help="a new study's first trial uses the default settings (last checkpoint, the "
                       "preset's steps and UGS), displaced only by a trial better by more than one "
                       "standard error of the validation accuracy; for short studies (reproduce.py's "
                       "quick budget), off in the paper")
add_runtime_flags(parser)


def main(argv=None):
    args = parser.parse_args(argv)
    from Utils.cli import UserError
    from Utils.runtime import configure_runtime

    if args.multi_gpu:
        raise UserError("--multi_gpu is not used by hyp_opt.py: run one worker per GPU "
                        "(CUDA_VISIBLE_DEVICES) on one shared --storage instead")

    options = TuningOptions(
        dataset=args.dataset, stage=args.train_model, exp=args.exp, preset=args.preset,
        optimize=args.optimize, n_trials=args.n_trials, num_imgs=args.num_imgs,
        classifier_epochs=args.classifier_epochs, classifier_batch_size=args.classifier_batch_size,
        batch_size=args.batch_size, enc_epoch=args.enc_epoch, is_1=args.is_1, ugs_1=args.ugs_1,
        storage=args.storage, seed=args.seed, objective=args.objective, max_steps=args.max_steps,
        save_plots=args.save_plots, data_dir=args.data_dir, jit_compile=args.xla,
        prune_after=args.prune_after, enqueue_defaults=args.enqueue_defaults)
    storage = check_options(options)  # bad input fails here, before TensorFlow starts
    configure_runtime(seed=args.seed, mixed_precision=args.mixed_precision, xla=args.xla)
    run_tuning(options, storage=storage)
    return 0


if __name__ == "__main__":
    run_cli(main)
