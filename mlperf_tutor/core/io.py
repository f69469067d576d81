"""Atomic writes: a file or a directory appears complete at its destination, or not at all.

A file is written under a hidden temporary name in the destination's directory, flushed and
fsynced, then ``os.replace``-d over the destination; a directory is built in a hidden staging
directory beside the destination and renamed into place once complete. A failure at any point
removes the temporary and leaves the previous destination as it was. Checkpoint formats
(``mlperf_tutor.convert``) and the workloads' data-file writers use these; stdlib only.

A process killed mid-write cannot clean up: its temporary stays. Every temporary's name carries
the writing process's id (``.tmp-PID-XXXXXXXX-NAME`` for a file, ``.tmp-NAME-PID-XXXXXXXX/`` for
a staging directory), so the next write to the same destination, ``RunCheckpoints`` when a run
starts and ``mlperf-tutor doctor`` can tell a leftover (its writer is gone) from a write in
progress, and sweep it (:func:`leftovers`, :func:`sweep`). A staging directory killed between its
two renames holds the previous directory (``previous``) while the destination is missing: that
one is moved back, never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mlperf_tutor.core.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# Our temporaries, and only these, are ever swept. The pid is absent from the names that
# versions before the sweep wrote (judged by age then).
_FILE_TMP = re.compile(r"\.tmp-(?:(?P<pid>\d+)-)?[0-9a-f]{8}-(?P<name>.+)", re.S)
_DIR_TMP = re.compile(r"\.tmp-(?P<name>.+?)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}", re.S)
# A clock tick and boot time are coarse: a process counts as the writer of a temporary last
# touched up to this many seconds before the process started.
_CLOCK_SLACK = 2.0

# What a leftover is (Leftover.state).
IN_USE = "in use"  # its writer is still running: left alone
STALE = "stale"  # its writer is gone: removed by a sweep
RECOVERABLE = "recoverable"  # holds the previous directory, the destination is missing
STRANDED = "stranded"  # holds a new directory that never reached the missing destination


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


def _aside(name: str, word: str) -> str:
    """The name under which a staging directory keeps a directory set aside (``word``), never
    the name of the destination ``name`` itself."""
    return word if name != word else word + "~"


# --- leftovers of interrupted writes ----------------------------------------------------------
def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_STARTED = _process_start(os.getpid()) or time.time()


def _writer_running(pid: int | None, touched: float) -> bool:
    """Whether the process that wrote a temporary last touched at ``touched`` may still run.

    A temporary without a pid (an older name) counts as running unless it is older than this
    process. A pid that is gone, or taken by a process that started after the temporary was last
    touched, is not its writer. Where that cannot be checked (no POSIX signals, no /proc), the
    writer counts as running: nothing is swept on a guess.
    """
    if pid is None:
        return touched >= _STARTED - _CLOCK_SLACK
    if pid == os.getpid():
        return True  # another thread's write in progress
    if pid <= 0:
        return False  # no process has it (and os.kill would signal a whole process group)
    if os.name != "posix":
        return True  # os.kill would not just ask there
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except (OverflowError, ValueError):
        return False
    start = _process_start(pid)
    return start is None or start <= touched + _CLOCK_SLACK


def _newest_mtime(path: Path) -> float:
    newest = os.lstat(path).st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Leftover:
    """A temporary of :func:`atomic_file` or :func:`atomic_dir` found beside its destination.

    Attributes:
        path: the temporary file or staging directory.
        destination: the file or directory it was written for.
        writer: the id of the process that wrote it (None: a name without one).
        state: :data:`IN_USE`, :data:`STALE`, :data:`RECOVERABLE` or :data:`STRANDED`.
    """

    path: Path
    destination: Path
    writer: int | None
    state: str

    def describe(self) -> str:
        """One sentence: what the temporary is."""
        who = f"process {self.writer}" if self.writer is not None else "an earlier process"
        if self.state == IN_USE:
            return f"a write of {self.destination} in progress ({who} is running)"
        if self.state == RECOVERABLE:
            return (
                f"an interrupted write of {self.destination}, which is missing; the previous "
                f"{self.destination.name} is kept in it"
            )
        if self.state == STRANDED:
            return (
                f"an interrupted write of {self.destination}, which is missing; it holds a new "
                f"{self.destination.name} that never reached its place and may be incomplete"
            )
        return f"a leftover of an interrupted write of {self.destination} ({who} is gone)"


def _leftover(entry: Path) -> Leftover | None:
    """``entry`` as a :class:`Leftover`, or None when it is not one of our temporaries."""
    try:
        mode = os.lstat(entry).st_mode
    except OSError:
        return None
    match = None
    if stat.S_ISREG(mode):
        match = _FILE_TMP.fullmatch(entry.name)
    elif stat.S_ISDIR(mode):
        match = _DIR_TMP.fullmatch(entry.name)
    if match is None:
        return None
    pid = int(match["pid"]) if match["pid"] else None
    destination = entry.parent / match["name"]
    try:
        touched = _newest_mtime(entry) if stat.S_ISDIR(mode) else os.lstat(entry).st_mtime
    except OSError:
        return None
    if _writer_running(pid, touched):
        state = IN_USE
    elif not stat.S_ISDIR(mode) or os.path.lexists(destination):
        state = STALE
    elif _is_real_dir(entry / _aside(destination.name, "previous")):
        state = RECOVERABLE
    elif _is_real_dir(entry / destination.name):
        state = STRANDED
    else:
        state = STALE
    return Leftover(entry, destination, pid, state)


def leftovers(directory: str | os.PathLike, name: str | None = None) -> list[Leftover]:
    """The temporaries in ``directory`` (not below it) that our atomic writes left.

    Args:
        directory: where to look.
        name: only those of this destination's name (default: every destination's).
    """
    found = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(".tmp-"):
            continue
        item = _leftover(Path(entry.path))
        if item is not None and (name is None or item.destination.name == name):
            found.append(item)
    return found


def leftovers_below(path: str | os.PathLike) -> list[Leftover]:
    """The leftovers in the directory ``path`` and every directory below it; for any other
    ``path`` (a file, or nothing yet), those of that destination beside it.

    Neither symlinks nor the leftovers themselves are descended into.
    """
    path = Path(path)
    if not _is_real_dir(path):
        return leftovers(path.parent, path.name)
    found = []
    for top, dirs, _ in os.walk(path):
        here = leftovers(top)
        found += here
        inside = {item.path.name for item in here}
        dirs[:] = sorted(d for d in dirs if d not in inside)
    return found


def fix(item: Leftover, remove_stranded: bool = False) -> str:
    """Sweep one leftover; return what was done, as a few words.

    A stale temporary is removed; a recoverable one has its previous directory moved back to the
    destination, then is removed; a stranded one is kept unless ``remove_stranded`` (a write to
    the same destination is about to replace it); one in use is left alone.

    Raises:
        OSError: the file system refused.
    """
    if item.state == IN_USE or (item.state == STRANDED and not remove_stranded):
        return "kept"
    done = "removed"
    if item.state == RECOVERABLE:
        previous = item.path / _aside(item.destination.name, "previous")
        if not os.path.lexists(item.destination):
            os.rename(previous, item.destination)
            _fsync_dir(item.destination.parent)
            done = f"moved the previous {item.destination.name} back, then removed"
    if _is_real_dir(item.path):
        shutil.rmtree(item.path)
    else:
        item.path.unlink(missing_ok=True)
    return done


def sweep(
    directory: str | os.PathLike, name: str | None = None, remove_stranded: bool = False
) -> list[tuple[Leftover, str]]:
    """Sweep the leftovers of interrupted writes in ``directory`` (see :func:`fix`).

    Best effort: a leftover the file system refuses to remove is logged and kept.

    Args:
        directory: where to look (not below it).
        name: only those of this destination's name (default: every destination's).
        remove_stranded: also remove new directories that never reached their place.

    Returns:
        (leftover, what was done) of each one found.
    """
    done = []
    for item in leftovers(directory, name):
        try:
            action = fix(item, remove_stranded)
        except OSError as e:
            action = f"kept ({e.strerror or e})"
        if item.state != IN_USE:
            log.info("%s: %s: %s", item.path, item.describe(), action)
        done.append((item, action))
    return done


def remove_dir(path: str | os.PathLike) -> None:
    """Remove the directory ``path`` so that no half-removed copy can ever be taken for whole.

    It is first renamed into a staging directory (``.tmp-NAME-PID-XXXXXXXX/removed``), then
    removed; a process killed meanwhile leaves a leftover that a sweep removes.
    """
    path = Path(path)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=path.parent))
    try:
        os.rename(path, staging / _aside(path.name, "removed"))
    finally:
        shutil.rmtree(staging)


# --- the writers ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and replace ``path`` with it.

    The temporary name keeps the destination's name as its suffix, because some writers
    (Keras ``save_weights``) insist on the extension. Leftovers of earlier interrupted writes
    to ``path`` are swept first.

    Raises:
        CheckpointError: the parent directory does not exist, or writing failed (``path`` is
            left as it was).
    """
    path = Path(path)
    parent = _parent_of(path)
    sweep(parent, path.name, remove_stranded=True)
    tmp = parent / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
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
    mistyped path never deletes unrelated files. Leftovers of earlier interrupted writes to
    ``path`` are swept first (a previous directory stranded in one is moved back).

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
    sweep(parent, path.name, remove_stranded=True)
    if not replaceable(path):
        raise CheckpointError(
            f"refusing to write {kind} to {path}: it exists and is not {kind}; choose a new "
            "path or remove it first"
        )
    # Everything the writer leaves (its own temporaries included) lives under one staging
    # directory, so a failure is cleaned up by removing that one directory.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=parent))
    target = staging / path.name
    try:
        yield target
        if not target.is_dir():
            raise CheckpointError(f"could not write {path}: the writer produced no directory")
        _fsync_tree(target)
        old = staging / _aside(path.name, "previous")
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
