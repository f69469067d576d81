"""A run's checkpoints: one directory per saved step, written atomically, the newest K kept.

``checkpoint_dir`` holds ``step_00000010/``, ``step_00000020/``, ... Each is complete or absent:
it is built under a hidden staging name beside the others and renamed into place once the
framework has written everything (``core.io.atomic_dir``), so a run killed during a save
leaves the previous checkpoints as they were; the staging directory it leaves is swept when the
next run opens ``checkpoint_dir``. A step directory holds:

- ``run.json``: what the loop needs to continue (workload, config, framework, precision,
  seed, steps taken, the data position) and what the run was (batch size, data path);
- ``state/``: the trainer's own checkpoint, written by the framework's own means (see
  ``Trainer.save`` of each adapter: safetensors for torch, Orbax for JAX, ``tf.train`` for TF):
  weights, optimizer state, step count and every RNG stream.

A run resumes in another framework through the canonical checkpoint: the writing framework
reads its state back and hands over canonical weights and optimizer state (RNG streams do not
cross frameworks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.io import atomic_dir

FORMAT = "mlperf_tutor run checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"step_(\d{8})")
MAX_RUN_JSON_BYTES = 1 << 20  # a run.json is a few hundred bytes


@dataclasses.dataclass(frozen=True)
class RunState:
    """What ``run.json`` holds: the position of a run and what it was.

    Attributes:
        workload: the workload's name.
        config: the config's fields (``dataclasses.asdict``).
        framework: the framework that wrote ``state/``.
        precision: "fp32" or "bf16".
        seed: the run's seed (weights, batches, RNG streams).
        steps: updates taken (the learning-rate position).
        batch_size: examples per step.
        data: the data path the run read (None: synthetic batches).
        data_position: batches consumed from the data stream (or synthetic batches drawn).
    """

    workload: str
    config: dict[str, Any]
    framework: str
    precision: str
    seed: int
    steps: int
    batch_size: int
    data: str | None
    data_position: int

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}, indent=1
        )

    @classmethod
    def from_json(cls, text: str, where: Path) -> RunState:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{where} is not valid JSON ({e}); the checkpoint is corrupt"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not an mlperf_tutor run checkpoint's run.json")
        if raw.get("version") != VERSION:
            raise CheckpointError(
                f"{where} has version {raw.get('version')!r}; this mlperf_tutor reads {VERSION}"
            )
        types = {
            "workload": str,
            "config": dict,
            "framework": str,
            "precision": str,
            "seed": int,
            "steps": int,
            "batch_size": int,
            "data": (str, type(None)),
            "data_position": int,
        }
        wrong = [
            name
            for name, kind in types.items()
            if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool)
        ]
        if wrong:
            raise CheckpointError(f"{where} has missing or mistyped fields {wrong}")
        if raw["steps"] < 0 or raw["data_position"] < 0 or raw["batch_size"] < 1:
            raise CheckpointError(f"{where} has a negative step, data position or batch size")
        return cls(**{name: raw[name] for name in types})


def _is_real_dir(path: Path) -> bool:
    """A directory that is not a symbolic link (only regular files and directories are read)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _read_regular_file(path: Path, limit: int) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file; refusing to read it")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than {limit} bytes; not a run.json")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; the checkpoint is corrupt") from None


class RunCheckpoints:
    """The step directories of one checkpoint directory.

    Opening it creates ``directory`` if needed and removes the staging directories that an
    interrupted save left (hidden ``.tmp-step_*`` entries, and nothing else).

    Args:
        directory: where the step directories live.
        keep: how many of the newest step directories to keep after each save (at least 1).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        if self.directory.exists() and not _is_real_dir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.swept = self._sweep()

    def _sweep(self) -> list[str]:
        swept = []
        for entry in self.directory.iterdir():
            if entry.name.startswith(".tmp-step_") and _is_real_dir(entry):
                shutil.rmtree(entry)
                swept.append(entry.name)
        return swept

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        found = []
        for entry in self.directory.iterdir():
            match = STEP_DIR.fullmatch(entry.name)
            if match and _is_real_dir(entry):
                found.append(int(match.group(1)))
        return sorted(found)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def save(self, state: RunState, write_state) -> Path:
        """Write ``run.json`` and, through ``write_state(directory)``, the trainer's state as
        the step directory of ``state.steps``; then drop the oldest beyond ``keep``."""
        path = self.path(state.steps)

        def replaceable(p: Path) -> bool:  # an earlier save of the same step, or nothing
            return not p.exists() or (_is_real_dir(p) and (p / "run.json").is_file())

        with atomic_dir(path, replaceable, "a run checkpoint") as staging:
            staging.mkdir()
            (staging / "state").mkdir()
            write_state(staging / "state")
            (staging / "run.json").write_text(state.to_json())
        for old in self.steps()[: -self.keep]:
            # Renamed to a staging name first, so a crash during the removal is swept later
            # instead of leaving a half-removed step that looks complete.
            doomed = self.directory / f".tmp-step_removed_{old:08d}"
            os.rename(self.path(old), doomed)
            shutil.rmtree(doomed)
        return path

    def latest(self) -> tuple[RunState, Path] | None:
        """The newest complete checkpoint's run state and its ``state/`` directory, or None."""
        steps = self.steps()
        if not steps:
            return None
        return read(self.path(steps[-1]))


def read(step_dir: str | os.PathLike) -> tuple[RunState, Path]:
    """The run state of one step directory and the path of its ``state/`` directory.

    Raises:
        CheckpointError: naming the file that is missing, not a regular file, or corrupt.
    """
    step_dir = Path(step_dir)
    if not _is_real_dir(step_dir):
        raise CheckpointError(f"{step_dir} is not a checkpoint directory")
    where = step_dir / "run.json"
    state = RunState.from_json(_read_regular_file(where, MAX_RUN_JSON_BYTES), where)
    if not _is_real_dir(step_dir / "state"):
        raise CheckpointError(f"{step_dir / 'state'} is missing; the checkpoint is incomplete")
    return state, step_dir / "state"
