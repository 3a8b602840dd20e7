"""The paper's command lines run verbatim: each script's paper flags keep name, meaning and default.

One example command per script, in the paper's spelling (`True`/`False`
booleans, `--exp 0001`, `--img_class` as images per class), and every flag of
the paper's usage lists with the paper's default. The flags and defaults are
the ones PAPER.md and the paper's README state; the per-stage files
tests/test_paper_flags_*.py check the finer points. Nothing here trains.
"""

import shlex

import pytest

import classifier_training
import generate_dataset
import hyp_opt
import SD_adapting
from Pipeline.adapt import AdaptSettings
from Pipeline.cas import CASSettings
from Pipeline.generate import GenerateSettings
from Pipeline.tune import TuneSettings
from Utils.settings import PAPER

SCRIPTS = {"SD_adapting.py": (SD_adapting, AdaptSettings), "hyp_opt.py": (hyp_opt, TuneSettings),
           "generate_dataset.py": (generate_dataset, GenerateSettings),
           "classifier_training.py": (classifier_training, CASSettings)}

# (command, the settings it must mean)
README_COMMANDS = [
    ("python SD_adapting.py --dataset bloodmnist --train_model enc --exp 0001 --freq 5",
     dict(dataset="bloodmnist", train_model="enc", exp="0001", freq=5, enc_epoch=None)),
    ("python hyp_opt.py --dataset bloodmnist --train_model dif --exp 0001 --optimize True --save_plots True",
     dict(dataset="bloodmnist", train_model="dif", exp="0001", optimize=True, save_plots=True, batch_size=256,
          num_imgs=4000)),
    ("python generate_dataset.py --dataset bloodmnist --img_class 1000 --exp 0001",
     dict(dataset="bloodmnist", img_class=1000, img_total=None, exp="0001", batch_size=250)),
    ("python classifier_training.py --dataset bloodmnist --synthetic True --take 4 --test False",
     dict(dataset="bloodmnist", synthetic=True, take=4, test=False, train=True, exp="0")),
]

# Every flag of the paper's usage lists, with its default (None: no default, optional).
PAPER_DEFAULTS = {
    "SD_adapting.py": dict(dataset="cifar10", train_model="enc", enc_epoch=None, dif_epoch=None, exp="0", freq=1),
    "hyp_opt.py": dict(dataset="cifar10", exp="0", optimize=True, train_model="enc", batch_size=256, enc_epoch=None,
                       num_imgs=4000, is_1=None, ugs_1=None, save_plots=False),
    "generate_dataset.py": dict(dataset="cifar10", img_class=None, img_total=None, batch_size=250, enc_epoch=None,
                                dif_epoch=None, inf_steps=None, ugs=None, exp="0"),
    "classifier_training.py": dict(dataset="cifar10", synthetic=True, take=None, test=True, exp="0",
                                   batch_size=256, epochs=100),
}


def settings_of(command):
    words = shlex.split(command)
    module, settings_class = SCRIPTS[words[1]]
    return settings_class.from_namespace(module.parser.parse_args(words[2:]))


@pytest.mark.parametrize("command, meaning", README_COMMANDS, ids=[c.split()[1] for c, _ in README_COMMANDS])
def test_the_papers_readme_commands_parse_with_the_papers_meaning(command, meaning):
    settings = settings_of(command)
    assert {key: getattr(settings, key) for key in meaning} == meaning
    # What the pipeline prints for it is a command that means the same.
    assert settings_of(settings.command(command.split()[1])) == settings


@pytest.mark.parametrize("script", PAPER_DEFAULTS)
def test_every_paper_flag_has_the_papers_default_and_sits_in_the_papers_group(script):
    module, settings_class = SCRIPTS[script]
    settings = settings_class.from_namespace(module.parser.parse_args([]))
    defaults = PAPER_DEFAULTS[script]
    assert {key: getattr(settings, key) for key in defaults} == defaults
    paper_group = next(g for g in module.parser._action_groups if g.title == PAPER)
    assert {a.dest for a in paper_group._group_actions} >= set(defaults)


def test_the_sd_presets_resolve_to_the_papers_generation_defaults():
    """--enc_epoch 50, --dif_epoch 10, --inf_steps 50, --ugs 7.5: what the sd presets fill in."""
    for preset in ("sd1", "sd2"):
        s = GenerateSettings(dataset="cifar10", preset=preset, img_class=4000).resolved()
        assert (s.enc_epoch, s.dif_epoch, s.inf_steps, s.ugs, s.img_total) == (50, 10, 50, 7.5, 40000)


def test_the_experiment_identifier_names_the_folders_as_written(tmp_path, monkeypatch):
    from Utils.paths import diffusion_checkpoint_dir, synthetic_dir

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    s = settings_of("python generate_dataset.py --dataset bloodmnist --img_class 10 --exp 0001")
    assert s.output_folder() == synthetic_dir("0001", "bloodmnist")
    assert synthetic_dir("0001", "bloodmnist").parent.name == "Exp_0001"
    assert diffusion_checkpoint_dir(s.exp, "bloodmnist", "enc").parts[-3] == "Exp_0001"
