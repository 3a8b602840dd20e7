"""The whole paper in one command: encoder -> tuning #1 -> fine-tuning -> tuning #2 -> generation -> CAS -> report.

With no arguments it runs the embedded default, `digits` with the `small`
preset and the `quick` budget, end to end on a 2-core CPU in under 10 minutes
on a typical day (measured: BENCHMARKS.md), and writes
`Experiments/Exp_0/digits/REPORT.md`. Every stage is skipped when its
outputs exist, so a killed run continues where it stopped: run the same
command again. The stages, budgets and what "done" means are in
`Pipeline/stages.py`.

    python reproduce.py                                          # digits, small, quick (CPU, < 10 min)
    python reproduce.py --preset tiny --max_multiple 1           # the test model, faster
    python reproduce.py --dataset retinamnist --data_dir ../shared/data
    python reproduce.py --dataset cifar10 --preset sd1 --budget paper --mixed_precision bfloat16 --xla
    python reproduce.py --stop_after tune_enc                    # run up to a stage, continue later
"""

import os
import shlex
import sys
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from Pipeline.common_settings import (accept_unverified_setting, data_dir_setting, dataset_setting,  # noqa: E402
                                      experiment_setting, image_size_setting, preset_setting, sampler_setting,
                                      conditioning_setting, prompt_template_setting, ti_tokens_setting,
                                      timestep_spacing_setting,
                                      train_subset_seed_setting, train_subset_setting)
from Models.diffusion.schedulers import SAMPLERS  # noqa: E402
from Pipeline.adapt import (check_unet_tuning, lora_alpha_setting, lora_rank_setting,  # noqa: E402
                            unet_tuning_setting)
from Pipeline.stages import BUDGETS, DEFAULT_PRESET  # noqa: E402
from Utils.cli import non_negative_int, positive_int, run_cli  # noqa: E402
from Utils.runtime import RuntimeSettings  # noqa: E402
from Utils.settings import ADDED, setting  # noqa: E402

OVERRIDES = "budget overrides (default: the budget's)"


@dataclass(frozen=True, kw_only=True)
class ReproduceSettings(RuntimeSettings):
    dataset: str = dataset_setting("digits", group=ADDED)
    preset: str = preset_setting(DEFAULT_PRESET)
    budget: str = setting("quick", choices=tuple(sorted(BUDGETS)),
                          help="quick (two trials per study, short training, x1 only) or paper "
                               "(50 + 40 trials of 4,000 images, 100-epoch classifiers, x1..x10)")
    exp: str = experiment_setting(group=ADDED)
    data_dir: str = data_dir_setting()
    image_size: int = image_size_setting()
    accept_unverified_data: bool = accept_unverified_setting()
    train_subset: int = train_subset_setting()
    train_subset_seed: int = train_subset_seed_setting()
    seed: int = setting(0, type=non_negative_int, help="seed of every stage")
    storage: str = setting(None, help="Optuna storage URL for both studies (default: sqlite file in the "
                                      "experiment folder)")
    stop_after: str = setting(None, help="stop after this stage (names: see Pipeline/stages.py)")
    quality: bool = setting(False, help="also compute the quality metrics of the generated set "
                                        "(evaluate_dataset.py, ResNet20 features) for the report")
    sampler: str = sampler_setting()
    timestep_spacing: str = timestep_spacing_setting()
    conditioning: str = conditioning_setting()
    prompt_template: str = prompt_template_setting()
    ti_tokens: int = ti_tokens_setting()
    search_samplers: tuple = setting(None, choices=tuple(SAMPLERS), nargs="+", metavar="SAMPLER",
                                     help="the studies also search the sampler among these (hyp_opt.py's flag; "
                                          "default: not searched); generation uses study #2's winner's")
    unet_tuning: str = unet_tuning_setting()
    lora_rank: int = lora_rank_setting()
    lora_alpha: float = lora_alpha_setting()
    enc_epochs: int = setting(None, type=positive_int, group=OVERRIDES, help="class-encoder training epochs")
    dif_epochs: int = setting(None, type=positive_int, group=OVERRIDES, help="UNet fine-tuning epochs")
    n_trials_enc: int = setting(None, type=positive_int, group=OVERRIDES, help="trials of study #1")
    n_trials_dif: int = setting(None, type=positive_int, group=OVERRIDES, help="trials of study #2")
    num_imgs: int = setting(None, type=positive_int, group=OVERRIDES, help="generated images per trial")
    tuning_classifier_epochs: int = setting(None, type=positive_int, group=OVERRIDES,
                                            help="ResNet20 epochs per trial")
    classifier_epochs: int = setting(None, type=positive_int, group=OVERRIDES, help="ResNet20 epochs per CAS run")
    classifier_batch_size: int = setting(None, type=positive_int, group=OVERRIDES, help="ResNet20 batch size")
    max_multiple: int = setting(None, type=positive_int, group=OVERRIDES,
                                help="CAS runs x1..xN; N x the training set is generated")
    generation_batch_size: int = setting(None, type=positive_int, group=OVERRIDES, help="images per sampler call")
    max_steps: int = setting(None, type=positive_int, group=OVERRIDES, help="top of the inference-steps search range")

    def unet_tuning_flags(self):
        """The dif stage's --unet_tuning / --lora_rank / --lora_alpha as set (checked by that stage)."""
        return {name: getattr(self, name) for name in ("unet_tuning", "lora_rank", "lora_alpha")}

    def budget_overrides(self):
        return {name: getattr(self, name) for name in (
            "enc_epochs", "dif_epochs", "n_trials_enc", "n_trials_dif", "num_imgs", "tuning_classifier_epochs",
            "classifier_epochs", "classifier_batch_size", "max_multiple", "generation_batch_size", "max_steps")}


parser = ReproduceSettings.parser(description=__doc__)


def main(argv=None):
    settings = ReproduceSettings.from_namespace(parser.parse_args(argv))
    from Pipeline.stages import Pipeline, budget_with

    check_unet_tuning(**settings.unet_tuning_flags())
    budget = budget_with(BUDGETS[settings.budget], **settings.budget_overrides())
    command = " ".join(["python", "reproduce.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    pipeline = Pipeline(settings.dataset, settings.preset, budget, exp=settings.exp, seed=settings.seed,
                        data_dir=settings.data_dir, storage=settings.storage, runtime=settings.runtime(),
                        command=command, quality=settings.quality, image_size=settings.image_size,
                        accept_unverified_data=settings.accept_unverified_data, sampler=settings.sampler,
                        search_samplers=settings.search_samplers, timestep_spacing=settings.timestep_spacing,
                        train_subset=settings.train_subset,
                        train_subset_seed=settings.train_subset_seed, conditioning=settings.conditioning,
                        prompt_template=settings.prompt_template, ti_tokens=settings.ti_tokens,
                        unet_tuning=settings.unet_tuning_flags())
    # The first stage would find missing real data only after the pipeline started its stage log.
    pipeline.real_splits()
    pipeline.run(stop_after=settings.stop_after)
    return 0


if __name__ == "__main__":
    run_cli(main)
