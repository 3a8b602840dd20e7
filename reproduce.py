"""The whole paper in one command: encoder -> tuning #1 -> fine-tuning -> tuning #2 -> generation -> CAS -> report.

With no arguments it runs the embedded default, `digits` with the `tiny`
preset and the `quick` budget, end to end on a CPU in about 10 minutes, and
writes `Experiments/Exp_0/digits/REPORT.md`. Every stage is skipped when its
outputs exist, so a killed run continues where it stopped: run the same
command again. The stages, budgets and what "done" means are in
`Pipeline/stages.py`.

    python reproduce.py                                          # digits, tiny, quick (CPU, < 10 min)
    python reproduce.py --preset small                           # the from-scratch recipe (CPU, ~13 min)
    python reproduce.py --dataset retinamnist --data_dir ../shared/data
    python reproduce.py --dataset cifar10 --preset sd1 --budget paper --mixed_precision bfloat16 --xla
    python reproduce.py --stop_after tune_enc                    # run up to a stage, continue later
"""

import argparse
import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Models.diffusion.presets import preset_help  # noqa: E402
from Pipeline.stages import BUDGETS, DEFAULT_PRESET  # noqa: E402
from Utils.cli import ArgumentParser, folder, non_negative_int, positive_int, run_cli  # noqa: E402
from Utils.runtime import add_runtime_flags  # noqa: E402

parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="digits", help="a registered dataset (default digits, embedded)")
parser.add_argument("--preset", default=DEFAULT_PRESET, help=preset_help(DEFAULT_PRESET))
parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick",
                    help="quick (default: two trials per study, short training, x1..x2) or paper "
                         "(50 + 40 trials of 4,000 images, 100-epoch classifiers, x1..x10)")
parser.add_argument("--exp", type=non_negative_int, default=0, help="experiment number (default 0)")
parser.add_argument("--data_dir", type=folder, default=None, help="folder with the real dataset files")
parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of every stage (default 0)")
parser.add_argument("--storage", default=None,
                    help="Optuna storage URL for both studies (default: sqlite file in the experiment folder)")
parser.add_argument("--stop_after", default=None, help="stop after this stage (names: see Pipeline/stages.py)")
parser.add_argument("--quality", action="store_true",
                    help="also compute the quality metrics of the generated set (evaluate_dataset.py, "
                         "ResNet20 features) for the report")
override = parser.add_argument_group("budget overrides (default: the budget's)")
override.add_argument("--enc_epochs", type=positive_int, help="class-encoder training epochs")
override.add_argument("--dif_epochs", type=positive_int, help="UNet fine-tuning epochs")
override.add_argument("--n_trials_enc", type=positive_int, help="trials of study #1")
override.add_argument("--n_trials_dif", type=positive_int, help="trials of study #2")
override.add_argument("--num_imgs", type=positive_int, help="generated images per trial")
override.add_argument("--tuning_classifier_epochs", type=positive_int, help="ResNet20 epochs per trial")
override.add_argument("--classifier_epochs", type=positive_int, help="ResNet20 epochs per CAS run")
override.add_argument("--classifier_batch_size", type=positive_int, help="ResNet20 batch size")
override.add_argument("--max_multiple", type=positive_int, help="CAS runs x1..xN; N x the training set is generated")
override.add_argument("--generation_batch_size", type=positive_int, help="images per sampler call")
override.add_argument("--max_steps", type=positive_int, help="top of the inference-steps search range")
add_runtime_flags(parser)


def runtime_argv(args):
    """The GPU flags, passed on to the training, generation and classifier scripts."""
    argv = []
    if args.mixed_precision != "float32":
        argv += ["--mixed_precision", args.mixed_precision]
    if args.xla:
        argv.append("--xla")
    if args.multi_gpu:
        argv.append("--multi_gpu")
    return argv


def main(argv=None):
    args = parser.parse_args(argv)
    from Pipeline.stages import Pipeline, budget_with

    budget = budget_with(BUDGETS[args.budget], enc_epochs=args.enc_epochs, dif_epochs=args.dif_epochs,
                         n_trials_enc=args.n_trials_enc, n_trials_dif=args.n_trials_dif,
                         num_imgs=args.num_imgs, tuning_classifier_epochs=args.tuning_classifier_epochs,
                         classifier_epochs=args.classifier_epochs,
                         classifier_batch_size=args.classifier_batch_size, max_multiple=args.max_multiple,
                         generation_batch_size=args.generation_batch_size, max_steps=args.max_steps)
    command = " ".join(["python", "reproduce.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    pipeline = Pipeline(args.dataset, args.preset, budget, exp=args.exp, seed=args.seed,
                        data_dir=args.data_dir, storage=args.storage, runtime_argv=runtime_argv(args),
                        command=command, quality=args.quality)
    # The first stage would find missing real data only after the pipeline started its stage log.
    from Data.loaders import load_dataset

    load_dataset(args.dataset, data_dir=args.data_dir)
    pipeline.run(stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    run_cli(main)
