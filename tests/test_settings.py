"""Utils/settings.py: one declaration gives the parser, the checks and the command line back."""

import math
from dataclasses import FrozenInstanceError, dataclass

import pytest

from Utils.cli import UserError, experiment_id, finite_float, positive_int
from Utils.runtime import RuntimeSettings
from Utils.settings import PAPER, REQUIRED, setting


@dataclass(frozen=True, kw_only=True)
class Example(RuntimeSettings):
    dataset: str = setting(REQUIRED, help="a dataset", group=PAPER)
    exp: str = setting("0", type=experiment_id, help="experiment", group=PAPER)
    synthetic: bool = setting(True, help="synthetic", group=PAPER)
    take: int = setting(1, type=positive_int, help="multiple")
    ugs: float = setting(7.5, type=finite_float, help="guidance")
    mode: str = setting("a", choices=("a", "b"), help="mode")
    multiples: tuple = setting((1, 2), type=positive_int, nargs="+", help="several")
    internal: int = setting(0, help="not a flag", cli=False)


@pytest.mark.parametrize("words, expected", [
    ([], True), (["--synthetic"], True), (["--synthetic", "True"], True), (["--synthetic", "False"], False),
    (["--synthetic", "false"], False), (["--synthetic", "0"], False), (["--no-synthetic"], False)])
def test_booleans_take_the_papers_spelling_and_argparses(words, expected):
    assert Example.from_argv(["--dataset", "d", *words]).synthetic is expected


@pytest.mark.parametrize("argv", [
    ["--dataset", "d", "--synthetic", "maybe"], ["--dataset", "d", "--no-synthetic", "True"],
    ["--dataset", "d", "--take", "0"], ["--dataset", "d", "--ugs", "nan"], ["--dataset", "d", "--ugs", "inf"],
    ["--dataset", "d", "--mode", "c"], ["--dataset", "d", "--exp", "a/b"], []])
def test_bad_flags_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        Example.from_argv(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_values_set_in_python_are_checked_by_the_same_types():
    with pytest.raises(UserError, match="--take"):
        Example(dataset="d", take=-1)
    with pytest.raises(UserError, match="--ugs"):
        Example(dataset="d", ugs=math.nan)
    with pytest.raises(UserError, match="--mode"):
        Example(dataset="d", mode="c")
    with pytest.raises(UserError, match="--dataset is required"):
        Example()
    with pytest.raises(FrozenInstanceError):
        Example(dataset="d").take = 3


def test_to_argv_rebuilds_the_object_and_only_says_what_differs():
    s = Example(dataset="d", exp="0001", synthetic=False, take=4, ugs=1.25, multiples=(3,), xla=True,
                internal=5)
    argv = s.to_argv()
    assert argv == ["--xla", "--dataset", "d", "--exp", "0001", "--synthetic", "False", "--take", "4",
                    "--ugs", "1.25", "--multiples", "3"]
    assert Example.from_argv(argv, internal=5) == s
    assert Example(dataset="d").to_argv() == ["--dataset", "d"]
    assert s.command("x.py").startswith("python x.py ")
    assert s.runtime() == RuntimeSettings(xla=True)


def test_experiment_identifier_is_kept_as_written():
    assert experiment_id("0001") == "0001"
    assert Example.from_argv(["--dataset", "d", "--exp", "0001"]).exp == "0001"
    assert Example.from_argv(["--dataset", "d", "--exp", "7"]).exp == "7"


def test_help_lists_paper_flags_first_and_gpu_flags_last():
    text = Example.parser().format_help()
    assert text.index("the paper's flags") < text.index("added flags") < text.index("GPU flags")
    assert "--internal" not in text
