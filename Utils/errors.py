"""The one base type of "your input is wrong" errors, shared by the library and the command line.

The library packages raise their own subclasses (`Data.errors`, `Models.errors`,
`Metrics.errors`); `Utils.cli.UserError` (the scripts' own) is one too. `Utils.cli.run_cli`
prints any of them as one line, `error: <message>`, and exits with status 2, so a library
function never needs to know about the command line.

Example:
    >>> from Data.errors import DataError
    >>> try:
    ...     raise DataError("digits has 10 classes, not 12")
    ... except InputError as e:
    ...     print(f"error: {e}")
    error: digits has 10 classes, not 12
"""


class InputError(ValueError):
    """The user's input, settings or files are wrong; the command line prints it as one line.

    A `ValueError`, so code that validates values can catch it as one; its message is
    a single line naming the problem and, where there is one, the fix.

    Example:
        >>> raise InputError("--take must be a positive integer, got 0")
    """
