"""Atomic writes: a file or a directory appears complete at its destination, or not at all.

A file is written under a hidden temporary name in the destination's directory, flushed and
fsynced, then ``os.replace``-d over the destination; a directory is built in a hidden staging
directory beside the destination and renamed into place once complete. A failure at any point
removes the temporary and leaves the previous destination as it was. Checkpoint formats
(``mlperf_tutor.convert``) and the workloads' data-file writers use these; stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mlperf_tutor.core.checkpoint import CheckpointError


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _parent_of(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {path}: directory {parent} does not exist; create it")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and replace ``path`` with it.

    The temporary name keeps the destination's name as its suffix, because some writers
    (Keras ``save_weights``) insist on the extension.

    Raises:
        CheckpointError: the parent directory does not exist, or writing failed (``path`` is
            left as it was).
    """
    path = Path(path)
    parent = _parent_of(path)
    tmp = parent / f".tmp-{secrets.token_hex(4)}-{path.name}"
    # Not mkstemp: its 0600 mode would stick to the result; this one follows the umask.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e}; nothing was written") from e
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, replaceable: Callable[[Path], bool], kind: str
) -> Iterator[Path]:
    """Yield a not-yet-existing directory path in a staging area; on success move it to ``path``.

    An existing ``path`` is replaced only after the new directory is complete, and only if
    ``replaceable(path)`` says it is absent, empty or a directory of the same ``kind``, so a
    mistyped path never deletes unrelated files.

    Args:
        path: the destination directory.
        replaceable: whether an existing ``path`` may be replaced (each writer knows what its
            own directories hold).
        kind: what is written, for the refusal message ("an Orbax checkpoint").

    Raises:
        CheckpointError: ``path`` holds something else, its parent does not exist, or writing
            failed (``path`` is left as it was).
    """
    path = Path(os.fspath(path).rstrip("/" + os.sep))
    parent = _parent_of(path)
    if not replaceable(path):
        raise CheckpointError(
            f"refusing to write {kind} to {path}: it exists and is not {kind}; choose a new "
            "path or remove it first"
        )
    # Everything the writer leaves (its own temporaries included) lives under one staging
    # directory, so a failure is cleaned up by removing that one directory.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=parent))
    target = staging / path.name
    try:
        yield target
        if not target.is_dir():
            raise CheckpointError(f"could not write {path}: the writer produced no directory")
        _fsync_tree(target)
        old = staging / "previous"
        if path.exists():
            os.rename(path, old)
        try:
            os.rename(target, path)
        except OSError:
            # Put the previous directory back; the two renames are the only window in which
            # ``path`` is briefly absent (POSIX has no portable atomic directory swap).
            if old.exists():
                os.rename(old, path)
            raise
        _fsync_dir(parent)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e}; nothing was written") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
