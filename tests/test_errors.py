"""The error types: the library's own `InputError`s, and the command line turning any of them into one line."""

import pytest

from Data.errors import DataError, DatasetNotFoundError
from Metrics.errors import MetricsError
from Models.errors import CheckpointError, ModelError, ModelSettingsError
from Utils import cli
from Utils.errors import InputError


@pytest.mark.parametrize("kind", [DataError, DatasetNotFoundError, MetricsError, ModelError, ModelSettingsError,
                                  CheckpointError, cli.UserError])
def test_every_bad_input_error_is_an_input_error_and_a_value_error(kind):
    assert issubclass(kind, InputError) and issubclass(kind, ValueError)


def test_the_library_does_not_import_the_command_line():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    offenders = [str(path.relative_to(repo)) for package in ("Models", "Data", "Metrics")
                 for path in (repo / package).rglob("*.py")
                 if "Utils.cli" in path.read_text(encoding="utf-8") or "UserError" in path.read_text(encoding="utf-8")]
    assert offenders == []


def _one_error_line(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(main, argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("kind", [DataError, DatasetNotFoundError, MetricsError, ModelSettingsError,
                                  CheckpointError, cli.UserError])
def test_run_cli_prints_any_input_error_as_one_line_and_exits_2(kind, capsys):
    def main(argv=None):
        raise kind(f"bad {argv[0]}")

    assert _one_error_line(capsys, main, ["thing"]) == "error: bad thing"


def test_a_library_error_inside_a_scripts_main_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import generate_dataset

    monkeypatch.setenv("SDDG_OUTPUT_ROOT", str(tmp_path))
    common = ["--enc_epoch", "1", "--img_total", "10", "--out_dir", str(tmp_path / "out")]
    # get_spec: a DataError; get_preset: a ModelSettingsError; both raised by the library, not the script
    line = _one_error_line(capsys, generate_dataset.main, ["--dataset", "nosuch", "--preset", "tiny", *common])
    assert line.startswith("error: unknown dataset 'nosuch'")
    line = _one_error_line(capsys, generate_dataset.main, ["--dataset", "digits", "--preset", "sd9", *common])
    assert line.startswith("error: unknown diffusion preset 'sd9'")
    assert not (tmp_path / "out").exists()


def test_other_errors_are_not_turned_into_one_line():
    def main(argv=None):
        raise RuntimeError("a bug, with its traceback")

    with pytest.raises(RuntimeError):
        cli.run_cli(main, [])
