"""hyp_opt.py keeps the paper's flags: names, meanings and defaults; its example command parses verbatim."""

import shlex

import pytest

import hyp_opt
from Pipeline.tune import SCRIPT, TuneSettings
from Utils.settings import PAPER

PAPER_EXAMPLE = "python hyp_opt.py --dataset retinamnist --train_model enc --exp 0001 --save_plots True"

# The paper's flags of hyp_opt.py and their defaults (None: no default of its own).
PAPER_DEFAULTS = {
    "dataset": "cifar10",
    "train_model": "enc",
    "exp": "0",
    "optimize": True,
    "batch_size": 256,          # the classifier's training batch (the CAS protocol)
    "enc_epoch": None,
    "num_imgs": 4000,
    "is_1": None,
    "ugs_1": None,
    "save_plots": False,
}


def _parse(command):
    words = shlex.split(command)
    assert words[:2] == ["python", SCRIPT]
    return TuneSettings.from_namespace(hyp_opt.parser.parse_args(words[2:]))


def test_the_papers_example_command_parses_with_the_papers_meaning():
    s = _parse(PAPER_EXAMPLE)
    assert (s.dataset, s.train_model, s.exp, s.save_plots) == ("retinamnist", "enc", "0001", True)
    # The identifier is kept as written: the paper's folders are Exp_0001.
    from Utils.paths import experiment_dir, study_name

    assert experiment_dir(s.exp, s.dataset).parts[-2:] == ("Exp_0001", "retinamnist")
    assert study_name(s.dataset, s.exp, s.train_model) == "retinamnist_exp0001_study_enc"
    # Everything not given keeps the paper's default.
    assert {k: getattr(s, k) for k in PAPER_DEFAULTS if k not in ("dataset", "train_model", "exp", "save_plots")} \
        == {k: v for k, v in PAPER_DEFAULTS.items() if k not in ("dataset", "train_model", "exp", "save_plots")}
    assert s.resolved().n_trials == 50  # the paper's study #1
    # The command line given back rebuilds the same settings.
    assert _parse(s.command(SCRIPT)) == s


def test_each_paper_flag_is_in_the_papers_group_with_the_papers_default():
    s = _parse(f"python {SCRIPT}")
    assert {k: getattr(s, k) for k in PAPER_DEFAULTS} == PAPER_DEFAULTS
    groups = {a.title: {x.dest for x in a._group_actions} for a in hyp_opt.parser._action_groups}
    assert groups[PAPER] == set(PAPER_DEFAULTS)
    assert s.resolved().n_trials == 50 and s.replace(train_model="dif").resolved().n_trials == 40
    assert s.generation_batch_size == 250 and s.classifier_epochs == 100  # the generation batch, the CAS epochs


@pytest.mark.parametrize("words, expected", [
    ("--save_plots", True), ("--save_plots True", True), ("--save_plots False", False), ("--no-save_plots", False),
    ("--optimize False", False), ("--optimize True", True), ("--no-optimize", False), ("--optimize", True),
])
def test_boolean_flags_take_true_false_and_no_forms(words, expected):
    s = _parse(f"python {SCRIPT} {words}")
    name = words.split()[0].removeprefix("--no-").removeprefix("--")
    assert getattr(s, name) is expected


def test_batch_size_is_the_classifiers_and_the_generation_batch_has_its_own_flag():
    s = _parse(f"python {SCRIPT} --batch_size 128 --generation_batch_size 50 --train_model dif --enc_epoch 37 "
               "--is_1 30 --ugs_1 2.5 --num_imgs 1000")
    assert (s.batch_size, s.generation_batch_size) == (128, 50)
    assert (s.train_model, s.enc_epoch, s.is_1, s.ugs_1, s.num_imgs) == ("dif", 37, 30, 2.5, 1000)
    with pytest.raises(SystemExit):
        hyp_opt.parser.parse_args(["--classifier_batch_size", "32"])  # the old name is gone
