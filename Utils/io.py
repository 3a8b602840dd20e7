"""Atomic file writes, a locked JSON merge, and JSON-lines logs that survive a kill.

Every file the pipeline writes goes through here, so a job killed at any moment
leaves either the old file or the new one, never half of one, and two jobs
finishing together both keep their results. A JSON-lines log is appended to,
not rewritten: a kill can cut its last line short, and readers skip that line.

Example:
    >>> with atomic_path("out/weights.weights.h5") as tmp:
    ...     model.save_weights(tmp)          # written under a temporary name
    >>> merge_json("CAS Results/test_accuracies_exp0.json", {"digits": {"real": r}})
"""

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path

from Utils.cli import UserError


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    The temporary name keeps the final suffix (Keras and PIL choose the format
    from it). On any exception the temporary file is removed and `path` is left
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as h5py want to create the file themselves
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=_to_builtin) + "\n")


def read_json(path, default=None):
    """Reads a JSON file; a missing file gives `default`, a corrupt one a UserError."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt JSON file {path}: {e}") from None


def append_json_line(path, obj):
    """Appends `obj` to the JSON-lines file `path` as one line, on disk before this returns.

    A line that a kill cut short stays where it is and this one starts on a line of its own,
    so `read_json_lines` loses only the cut line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, default=_to_builtin) + "\n"
    with open(path, "ab+") as f:  # appends go to the end whatever the position read from
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_json_lines(path):
    """The whole JSON values of a JSON-lines file, in order ([] when it does not exist); lines a
    kill cut short, and blank lines, are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return values


@contextlib.contextmanager
def file_lock(path):
    """An exclusive advisory lock on `path` + '.lock' (POSIX), held for the block."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def deep_merge(base, update):
    """Returns `base` with `update` merged in: nested dicts merge, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merge_json(path, update):
    """Merges the dict `update` into the JSON file at `path`, under a lock, atomically.

    Two processes merging into the same file at once both keep their keys.
    Returns the merged content.
    """
    with file_lock(path):
        merged = deep_merge(read_json(path, default={}), update)
        atomic_write_json(path, merged)
    return merged


def _to_builtin(value):
    """json.dumps fallback for numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
