"""classifier_training.py keeps the paper's flags: names, meanings and defaults.

The paper's README runs `python classifier_training.py --dataset bloodmnist
--synthetic True --take 4 --test False`; `--synthetic` defaults to True, `--take`
to 1, the CAS protocol is batch 256 for 100 epochs, `--exp` an identifier.
Nothing here trains.
"""

import pytest

import classifier_training
from Metrics.cas import record_cas
from Pipeline.cas import SCRIPT, CASSettings, is_done
from Utils.cli import UserError


def parse(*words):
    return CASSettings.from_namespace(classifier_training.parser.parse_args(list(words)))


def test_the_papers_readme_command_parses_with_its_meaning():
    s = parse(*"--dataset bloodmnist --synthetic True --take 4 --test False".split())
    assert (s.dataset, s.synthetic, s.take, s.test, s.train) == ("bloodmnist", True, 4, False, True)
    assert s.run_key() == "x4"
    assert CASSettings.from_argv(s.to_argv()) == s


def test_paper_defaults():
    s = parse()
    assert (s.dataset, s.synthetic, s.test, s.train, s.exp, s.batch_size, s.epochs) == (
        "cifar10", True, True, True, "0", 256, 100)
    assert s.resolved().take == 1 and s.run_key() == "x1"


@pytest.mark.parametrize("words, synthetic", [
    (["--synthetic", "False"], False), (["--synthetic", "false"], False), (["--no-synthetic"], False),
    (["--synthetic"], True), (["--synthetic", "True"], True), ([], True)])
def test_synthetic_takes_true_false_and_no_flag(words, synthetic):
    s = parse("--dataset", "bloodmnist", *words)
    assert s.synthetic is synthetic and s.run_key() == ("x1" if synthetic else "real")
    assert s.resolved().take == (1 if synthetic else None)


@pytest.mark.parametrize("words, flag", [(["--test", "False"], "test"), (["--test", "True"], "test"),
                                         (["--no-test"], "test"), (["--train", "False"], "train"),
                                         (["--no-train"], "train")])
def test_test_and_train_are_booleans(words, flag):
    assert getattr(parse(*words), flag) is (words[-1] == "True")


def test_exp_is_kept_as_written(tmp_path, monkeypatch):
    s = parse("--exp", "0001", "--synthetic", "False")
    assert s.exp == "0001" and s.command(SCRIPT) == "python classifier_training.py --synthetic False --exp 0001"
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    assert s.train_folder() is None
    assert parse("--exp", "0001").train_folder().parts[-2:] == ("Exp_0001", "cifar10")


@pytest.mark.parametrize("words, message", [
    (["--synthetic", "False", "--take", "2"], "--take applies to synthetic data"),
    (["--train", "False", "--test", "False"], "nothing to do"),
    (["--run_name", "a/b"], "--run_name")])
def test_contradictions_are_errors(words, message):
    with pytest.raises(UserError, match=message):
        parse(*words)


def test_is_done_when_the_same_protocol_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    s = parse("--dataset", "digits", "--take", "4", "--epochs", "8", "--batch_size", "64")
    assert is_done(s) is None
    record_cas("0", "digits", "x4", {"top1": 0.5, "max_epochs": 8, "batch_size": 64, "seed": 0,
                                     "initial_filters": 64})
    assert "CAS x4 recorded" in is_done(s)
    assert is_done(s.replace(epochs=9)) is None and is_done(s.replace(seed=1)) is None
    assert is_done(s.replace(initial_filters=16)) is None and is_done(s.replace(take=3)) is None
