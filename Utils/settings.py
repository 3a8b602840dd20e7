"""Settings declared once: frozen dataclasses whose fields are also the scripts' flags.

A stage's settings class lists each setting once, with its type check,
default, help and the flag group it belongs to. From that one declaration:
the script's parser is built (`Settings.parser`), the stage function takes
the typed, frozen object, values built in Python are checked by the same type
functions as the flags (`__post_init__`), and `to_argv()` gives back the
command line that reproduces the object, which is what the pipeline prints
and the report shows.

Booleans accept the paper's spelling and argparse's: `--synthetic`,
`--synthetic True`, `--synthetic false`, `--no-synthetic`.

Example:
    >>> from dataclasses import dataclass
    >>> from Utils.cli import positive_int
    >>> @dataclass(frozen=True, kw_only=True)
    ... class CASSettings(Settings):
    ...     dataset: str = setting("cifar10", help="a registered dataset", group=PAPER)
    ...     synthetic: bool = setting(True, help="train on the synthetic set", group=PAPER)
    ...     take: int = setting(1, type=positive_int, help="x1..x10", group=PAPER)
    >>> s = CASSettings.from_argv(["--dataset", "bloodmnist", "--synthetic", "False", "--take", "4"])
    >>> s.synthetic, s.take
    (False, 4)
    >>> s.to_argv()
    ['--dataset', 'bloodmnist', '--synthetic', 'False', '--take', '4']
"""

import argparse
import dataclasses
import shlex
from pathlib import Path

from Utils.cli import ArgumentParser, UserError

PAPER = "the paper's flags"
ADDED = "added flags"
RUNTIME = "GPU flags"
_GROUP_ORDER = {PAPER: 0, ADDED: 1, RUNTIME: 3}  # any other title: 2, in order of appearance

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


def setting(default=REQUIRED, *, help, type=None, choices=None, group=ADDED, flag=None, metavar=None,
            nargs=None, cli=True):
    """A settings field that is also a flag.

    Args:
        default: the value when the flag is not given (REQUIRED: the flag must be given).
        help: the flag's help text.
        type: a checking function from `Utils.cli` (text or value -> value, raising
            argparse.ArgumentTypeError); it also checks values set in Python.
        choices: the allowed values.
        group: the help section (PAPER for the paper's own flags, ADDED, or any title).
        flag: the flag's name if it is not `--{field name}`.
        nargs: "+" or "*" for a list (stored as a tuple).
        cli: False for a field that is not a flag (set by the code that builds the object).
    """
    metadata = dict(help=help, type=type, choices=choices, group=group, flag=flag, metavar=metavar,
                    nargs=nargs, cli=cli)
    return dataclasses.field(default=default, metadata=metadata)


def parse_bool(text):
    """True/False in the paper's spelling (and yes/no, 1/0, on/off)."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class BooleanFlag(argparse.Action):
    """`--flag`, `--flag True|False` and `--no-flag`."""

    def __init__(self, option_strings, dest, default=None, required=False, help=None, **kwargs):
        positive = option_strings[0]
        negative = "--no-" + positive[2:]
        super().__init__([positive, negative], dest, nargs="?", const=None, default=default,
                         required=required, help=help, metavar="True|False")

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if value is None else parse_bool(value))
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {option_string}: {e}")

    def format_usage(self):
        return " | ".join(self.option_strings)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every stage's settings: parsing, checking and the command line back."""

    def __post_init__(self):
        for f in self._flag_fields():
            value = getattr(self, f.name)
            if value is REQUIRED:
                raise UserError(f"{self._flag(f)} is required")
            if value is None:
                continue
            object.__setattr__(self, f.name, self._checked(f, value))

    # ----- declaration ------------------------------------------------------------------
    @classmethod
    def _flag_fields(cls):
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]

    @staticmethod
    def _flag(f):
        return f.metadata.get("flag") or f"--{f.name}"

    @classmethod
    def _is_bool(cls, f):
        return f.type in (bool, "bool")

    @classmethod
    def _checked(cls, f, value):
        meta = f.metadata
        try:
            if cls._is_bool(f):
                value = parse_bool(value)
            elif meta.get("nargs"):
                value = tuple(meta["type"](v) if meta.get("type") else v for v in value)
            elif meta.get("type"):
                value = meta["type"](value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{cls._flag(f)}: {e}") from None
        values = value if meta.get("nargs") else (value,)
        if meta.get("choices") is not None and any(v not in meta["choices"] for v in values):
            raise UserError(f"{cls._flag(f)}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        return value

    # ----- command line -----------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser):
        """Adds one flag per field to `parser`, in help groups."""
        groups = {}
        fields = sorted(cls._flag_fields(), key=lambda f: _GROUP_ORDER.get(f.metadata["group"], 2))
        for f in fields:
            meta = f.metadata
            title = meta["group"]
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            kwargs = {"help": meta["help"], "dest": f.name}
            required = f.default is REQUIRED
            if required:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
                if f.default is not None and "%(default)" not in meta["help"]:
                    shown = f.default if not cls._is_bool(f) else str(f.default)
                    kwargs["help"] = f"{meta['help']} (default {_shown(shown)})"
            if cls._is_bool(f):
                groups[title].add_argument(cls._flag(f), action=BooleanFlag, **kwargs)
                continue
            for key in ("type", "choices", "metavar", "nargs"):
                if meta.get(key) is not None:
                    kwargs[key] = meta[key]
            groups[title].add_argument(cls._flag(f), **kwargs)
        return parser

    @classmethod
    def parser(cls, description=None, epilog=None, **kwargs):
        """An `ArgumentParser` (one-line errors) with this class's flags."""
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return cls.add_arguments(ArgumentParser(description=description, epilog=epilog, **kwargs))

    @classmethod
    def from_namespace(cls, namespace, **extra):
        """The settings from parsed flags (fields without a flag: from `extra` or their defaults)."""
        values = {f.name: getattr(namespace, f.name) for f in cls._flag_fields() if hasattr(namespace, f.name)}
        return cls(**values, **extra)

    @classmethod
    def from_argv(cls, argv, **extra):
        return cls.from_namespace(cls.parser().parse_args(argv), **extra)

    def to_argv(self):
        """The flags that rebuild this object: those whose value differs from the default."""
        argv = []
        for f in self._flag_fields():
            value = getattr(self, f.name)
            if f.default is not REQUIRED and value == f.default:
                continue
            if value is None:
                continue
            flag = self._flag(f)
            if self._is_bool(f):
                argv += [flag] if value else [flag, "False"]  # the paper's spelling
            elif f.metadata.get("nargs"):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv

    def command(self, script):
        """`python {script} {flags}`, quoted for a shell."""
        return " ".join(["python", script, *map(shlex.quote, self.to_argv())])

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _shown(value):
    if isinstance(value, Path):
        return str(value)
    return value


def command_line(settings_class, run, description):
    """(parser, main) of a thin script: parse the flags into `settings_class`, call `run(settings)`.

        parser, main = command_line(CASSettings, run, __doc__)
        if __name__ == "__main__":
            run_cli(main)
    """
    parser = settings_class.parser(description=description)

    def main(argv=None):
        run(settings_class.from_namespace(parser.parse_args(argv)))
        return 0

    return parser, main
