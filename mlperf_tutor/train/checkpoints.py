"""A run's checkpoints: one directory per saved step, written atomically, the newest K kept.

``checkpoint_dir`` holds ``step_00000010/``, ``step_00000020/``, ... Each is complete or absent:
it is built under a hidden staging name beside the others and renamed into place once the
framework has written everything (``core.io.atomic_dir``), so a run killed during a save
leaves the previous checkpoints as they were; the staging directory it leaves is swept when the
next run opens ``checkpoint_dir`` (``core.io.sweep``, as ``mlperf-tutor doctor`` does). A step
directory holds:

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
from mlperf_tutor.core.files import read_json, regular_tree
from mlperf_tutor.core.io import atomic_dir, remove_dir, sweep

FORMAT = "mlperf_tutor run checkpoint"
VERSION = 1
STEP_DIR = re.compile(r"step_(\d{8})")
# What versions before core.io.remove_dir renamed a step to while removing it.
_LEGACY_REMOVAL = re.compile(r"\.tmp-step_removed_\d{8}")
_INT64 = 2**63


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
    def from_dict(cls, raw: dict, where: Path) -> RunState:
        """The run state in ``raw`` (the parsed ``run.json`` at ``where``), every field checked.

        Raises:
            CheckpointError: naming ``where`` and the fields that are missing, mistyped or out
                of range.
        """
        if raw.get("format") != FORMAT:
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
        ranges = {
            "seed": (-_INT64, _INT64),
            "steps": (0, _INT64),
            "batch_size": (1, 2**31),
            "data_position": (0, _INT64),
        }
        out = [
            f"{k} {raw[k]} (not in [{lo}, {hi}))"
            for k, (lo, hi) in ranges.items()
            if not lo <= raw[k] < hi
        ]
        if out:
            raise CheckpointError(f"{where} has fields out of range: {', '.join(out)}")
        return cls(**{name: raw[name] for name in types})


def _is_real_dir(path: Path) -> bool:
    """A directory that is not a symbolic link (only regular files and directories are read)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class RunCheckpoints:
    """The step directories of one checkpoint directory.

    Opening it creates ``directory`` if needed and sweeps what an interrupted save left
    (``core.io.sweep``: staging directories of writers that are gone, nothing else; a previous
    step directory found in one is moved back). :attr:`swept` names them.

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
        done = sweep(self.directory, remove_stranded=True)
        swept = [item.path.name for item, action in done if action != "kept"]
        for entry in self.directory.iterdir():
            # A step that an older version was removing: its files were going anyway.
            if _LEGACY_REMOVAL.fullmatch(entry.name) and _is_real_dir(entry):
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
            remove_dir(self.path(old))
        return path

    def latest(self) -> tuple[RunState, Path] | None:
        """The newest complete checkpoint's run state and its ``state/`` directory, or None."""
        steps = self.steps()
        if not steps:
            return None
        return read(self.path(steps[-1]))


def read(step_dir: str | os.PathLike) -> tuple[RunState, Path]:
    """The run state of one step directory and the path of its ``state/`` directory.

    The state directory is checked before any framework opens it: regular files and
    directories only, symlinks staying inside it.

    Raises:
        CheckpointError: naming the file that is missing, not a regular file (a FIFO, a device,
            a symlink leaving the step directory), or corrupt, and the field where one is wrong.
    """
    step_dir = Path(step_dir)
    if not _is_real_dir(step_dir):
        raise CheckpointError(f"{step_dir} is not a checkpoint directory")
    where = step_dir / "run.json"
    state = RunState.from_dict(
        read_json(where, CheckpointError, "run.json", within=step_dir), where
    )
    if not _is_real_dir(step_dir / "state"):
        raise CheckpointError(f"{step_dir / 'state'} is missing; the checkpoint is incomplete")
    regular_tree(step_dir / "state", CheckpointError, "checkpoint state")
    return state, step_dir / "state"
