"""Opening files a user hands us: only regular files, JSON that cannot crash the reader.

Every reader of the package (checkpoint formats, configs, data files, result logs) opens what it
was given through these, so a FIFO (which would block forever), a device, a directory, a symlink
leaving a checkpoint directory, deeply nested or non-UTF-8 JSON, or JSON of the wrong type gets
one error of the caller's own class naming the file, never an unrelated traceback. Stdlib only.
"""

from __future__ import annotations

import json
import os
import stat
import tokenize
from pathlib import Path

# A JSON file we read (configs, indexes, adapter configs, result metadata) is small; a larger one
# is refused before it is read, so a hostile file cannot make the reader allocate gigabytes.
MAX_JSON_BYTES = 64 * 2**20

# What numpy's .npy header parser raises on damaged bytes (it tokenizes the header, then
# literal_evals it): the readers of .npy files catch these and raise their own error.
NPY_HEADER_ERRORS = (
    ValueError,
    TypeError,
    SyntaxError,
    OverflowError,
    UnicodeError,
    RecursionError,
    tokenize.TokenError,
)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _mode(path: Path, error: type[Exception], what: str) -> int:
    """``path``'s mode (through symlinks), or ``error`` saying it is missing or unreadable."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}; check the path") from None
    except OSError as e:
        raise error(f"{path}: cannot open the {what} ({e.strerror or e})") from None


def regular_file(
    path: str | os.PathLike, error: type[Exception], what: str = "file", within=None
) -> Path:
    """``path`` as a Path, after checking that it is a regular file (through symlinks).

    Args:
        path: the file to open.
        error: the exception class to raise (the caller's own: ``CheckpointError``, a reader's
            error class).
        what: what the file is, for the message ("safetensors file", "config").
        within: a directory the file must resolve inside (a checkpoint directory), or None.

    Raises:
        error: ``path`` does not exist, is not a regular file (a FIFO, a device, a directory,
            a socket), or resolves outside ``within``.
    """
    path = Path(path)
    mode = _mode(path, error, what)
    if not stat.S_ISREG(mode):
        raise error(f"{path} is {_kind(mode)}, not a regular {what}; only regular files are read")
    if within is not None:
        inside(path, within, error, what)
    return path


def inside(path: str | os.PathLike, root: str | os.PathLike, error: type[Exception], what: str):
    """Raise ``error`` when ``path`` (symlinks resolved) lies outside the directory ``root``."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise error(
            f"{path}: the {what} resolves to {real}, outside {root}; a symlink leaving the "
            "directory is refused"
        )


def read_json(
    path: str | os.PathLike,
    error: type[Exception],
    what: str = "JSON file",
    expect: type = dict,
    within=None,
):
    """The parsed JSON of a regular file, of type ``expect``, or one ``error`` naming the file.

    Refused: a file that is not regular (see :func:`regular_file`), larger than
    ``MAX_JSON_BYTES``, not UTF-8, not JSON, nested too deeply for the parser, holding an integer
    too long to convert, ``NaN``/``Infinity`` (not JSON), or a top-level value of another type.

    Raises:
        error: the file cannot be read as described.
    """
    path = regular_file(path, error, what, within)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(f"{path}: the {what} is {size} bytes; over {MAX_JSON_BYTES} is refused")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_JSON_BYTES + 1).decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {e.start}"
        raise error(f"{path}: the {what} is not UTF-8 text ({where})") from None
    except RecursionError:
        raise error(f"{path}: the {what} is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, an over-long integer, NaN/Infinity
        raise error(f"{path}: the {what} is not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if not isinstance(value, expect):
        raise error(
            f"{path}: the {what} holds a JSON {_json_type(value)}, expected a JSON "
            f"{_json_type_name(expect)}"
        )
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}


def _json_type_name(kind: type) -> str:
    return _NAMES.get(kind, kind.__name__)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return _json_type_name(type(value))


def regular_tree(
    root: str | os.PathLike, error: type[Exception], what: str = "directory"
) -> list[Path]:
    """Every regular file under the directory ``root``, after checking every entry below it.

    A checkpoint directory (an Orbax tree, a training step) is handed whole to a library that
    opens whatever it finds; this checks first that it holds only regular files and
    directories, and that a symlink in it resolves inside ``root`` to one of those.

    Raises:
        error: ``root`` is not a directory, or an entry below it is a FIFO, a device, a socket,
            a dangling symlink or a symlink leaving ``root`` (the message names the entry).
    """
    root = Path(root)
    mode = _mode(root, error, what)
    if not stat.S_ISDIR(mode):
        raise error(f"{root} is {_kind(mode)}, not a {what}")

    def refuse(e: OSError):
        raise error(f"{e.filename}: cannot read the {what} ({e.strerror or e})")

    files = []
    for top, dirs, names in os.walk(root, onerror=refuse):
        for name in dirs + names:
            path = Path(top) / name
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    inside(path, root, error, what)
                    mode = os.stat(path).st_mode
            except FileNotFoundError:
                raise error(f"{path}: a dangling symlink in the {what}") from None
            except OSError as e:
                raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                raise error(
                    f"{path} is {_kind(mode)} inside the {what}; only regular files and "
                    "directories are read"
                )
    return files
