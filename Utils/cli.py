"""Command-line conventions shared by every script.

Bad input is one line on stderr, `error: ...`, and exit status 2; nothing
half-written stays behind (writers use `Utils.io.atomic_path`). Scripts raise
`UserError`; the library raises its own `Utils.errors.InputError` subclasses
(`Data.errors`, `Models.errors`, `Metrics.errors`), and `run_cli` reports all of them.

Example:
    >>> parser = ArgumentParser(description="...")
    >>> def main(argv=None):
    ...     args = parser.parse_args(argv)
    ...     if args.take <= 0:
    ...         raise UserError("--take must be a positive integer")
    >>> if __name__ == "__main__":
    ...     run_cli(main)
"""

import argparse
import math
import sys
from pathlib import Path

from Utils.errors import InputError


class UserError(InputError):
    """A problem with the user's input or files found by a script, reported as one line.

    The library's own errors (`DataError`, `ModelSettingsError`, ...) are `InputError`s
    too: a script catching "any bad input" catches `InputError`.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text):
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def decay_rate(text):
    """A moving-average decay in [0, 1); 0 turns the average off."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a decay in [0, 1), got {text!r}")
    return value


def probability(text):
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def port(text):
    """A TCP port, 0..65535 (0: any free port, chosen by the system)."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}")
    return value


def experiment_id(text):
    """The paper's experiment identifier, kept as written: `--exp 0001` -> folders `Exp_0001`."""
    value = str(text).strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value) or value.startswith("."):
        raise argparse.ArgumentTypeError(f"expected an experiment identifier (letters, digits, - _ .), "
                                         f"got {text!r}")
    return value


def folder(text):
    """A folder that may not exist yet (it is created when written): not a file, nor under one."""
    path = Path(text).expanduser()
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "is a file" if existing == path else f"is under the file {existing}"
                raise argparse.ArgumentTypeError(f"expected a folder, but {text} {where}")
            break
    return str(path)


def _existing(text, kind, is_kind, otherwise):
    path = Path(text).expanduser()
    if not is_kind(path):
        raise argparse.ArgumentTypeError(f"expected an existing {kind}, but {text} "
                                         f"{otherwise if path.exists() else 'does not exist'}")
    return str(path)


def existing_folder(text):
    """A folder that must already exist (an input)."""
    return _existing(text, "folder", Path.is_dir, "is a file")


def existing_file(text):
    """A file that must already exist (an input)."""
    return _existing(text, "file", Path.is_file, "is a folder")


def run_cli(main, argv=None):
    """Runs `main(argv)`, turning any InputError (UserError, the library's errors) into one
    line `error: <message>` on stderr and exit status 2."""
    from Utils.runtime import graph_optimizer_setting, tf_malloc_patch_setting

    try:
        graph_optimizer_setting()  # a bad value stops the script before anything is written
        tf_malloc_patch_setting()
        status = main(argv)
    except InputError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: rerun the same command to resume\n")
        sys.exit(130)
    sys.exit(status or 0)
