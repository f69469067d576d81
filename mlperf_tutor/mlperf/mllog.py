"""MLPerf Training v4.0 result logs of ``mlperf_tutor.train``, through ``mlperf_logging.mllog``.

What ``python -m mlperf_logging.compliance_checker --usage training --ruleset 4.0.0 LOG`` checks
(``compliance_checker/training_4.0.0/*.yaml`` in https://github.com/mlcommons/logging) decides
what a run logs and in which order::

    cache_clear
    init_start
        submission_benchmark, _division, _org, _platform, _status   (before init_stop: the
        division sets the checker's 30 min (closed) or 240 min (open) limit on init)
        seed, global_batch_size, gradient_accumulation_steps, eval_samples, hyperparameters
    init_stop
    run_start
        block_start, epoch_start, ... epoch_stop, block_stop   one block per eval interval
        eval_start, eval_accuracy, eval_stop
        ...
    run_stop   status "success" (the target was reached) or "aborted" (the step limit was)
    train_samples

BERT has no epochs (a run sees a fraction of the data once): MLPerf counts its epochs in
training samples, so every ``epoch_num`` and ``first_epoch_num`` here is the number of samples
trained so far and ``epoch_count`` the samples of a block (the RCP checker reads BERT's
``eval_accuracy`` ``epoch_num`` as samples; its ``train_samples`` is the samples trained).
GPT-3 counts tokens instead (its recipe's ``units_per_sample``), from the checkpoint the run
starts at, as the v4.0 submissions' logs do.

``mlperf_logging`` is imported only when a log is written, so ``import mlperf_tutor`` stays light.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, TextIO

from mlperf_tutor.core.config import Config
from mlperf_tutor.workloads.base import Workload

#: The compliance checker's ruleset these logs follow.
RULESET = "4.0.0"
#: ``submission_org`` and ``submission_status`` (one of cloud, onprem, preview, research).
ORG = "mlperf-tutor"
STATUS = "research"

# mllog strips this prefix (a regular expression) from the file names in its metadata.
_ROOT = re.escape(str(Path(__file__).resolve().parents[2]))


def check_benchmark(wl: Workload, cfg: Config) -> str:
    """The MLPerf benchmark a run of ``cfg`` is logged as (``wl.recipe(cfg).benchmark``); a
    ValueError if the workload is not an MLPerf benchmark."""
    benchmark = wl.recipe(cfg).benchmark
    if benchmark is None:
        from mlperf_tutor import workloads

        benchmarks = [n for n in workloads.names() if _is_benchmark(workloads.get(n))]
        raise ValueError(
            f"workload {wl.name!r} is not an MLPerf Training benchmark, so it has no MLPerf log; "
            f"drop --mllog/--dry-run or train one of {benchmarks}"
        )
    return benchmark


def _is_benchmark(wl: Workload) -> bool:
    # A workload is one benchmark or none, whatever the config: its default preset tells.
    return wl.recipe(wl.config()).benchmark is not None


def division(wl: Workload, cfg: Config, batch_size: int) -> str:
    """``"closed"`` for the workload's ``mlperf`` preset unchanged at its global batch size, else
    ``"open"`` (other presets change the model or the hyperparameters the closed division fixes).

    The training loop's data is synthetic, which no closed result may use: a closed log here
    lets the checker judge the logged configuration, not a result.
    """
    closed = "mlperf" in wl.presets and cfg == wl.config("mlperf")
    return "closed" if closed and batch_size == getattr(cfg, "global_batch_size", None) else "open"


class RunLog:
    """The ``:::MLLOG`` lines of one run, written to a file or a text stream.

    Every method is a no-op when ``dest`` is None, so the training loop calls them without
    checking whether it logs. The ``file``/``lineno`` metadata that mllog adds name the caller
    of these methods (the training loop), relative to the repository root.

    Args:
        dest: a log file (its folder is created; an existing file is replaced), an open text
            stream such as ``sys.stdout``, or None for no log.

    Raises:
        ValueError: ``dest`` is an existing folder.
    """

    def __init__(self, dest: str | os.PathLike | TextIO | None = None):
        self._mllogger = self._handler = None
        if dest is None:
            return
        from mlperf_logging.mllog import mllog

        if isinstance(dest, (str, os.PathLike)):
            path = Path(dest)
            if path.is_dir():
                raise ValueError(
                    f"MLPerf log path {path} is a folder; give a file name such as {path}/log.txt"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handler = logging.FileHandler(path, mode="w", encoding="utf-8")
        else:
            self._handler = logging.StreamHandler(dest)
        # A private logger (not logging.getLogger's registry): runs in one process never share
        # handlers, and nothing propagates to the root logger.
        logger = logging.Logger(f"mlperf_tutor.mllog.{id(self)}", logging.INFO)
        logger.addHandler(self._handler)
        # mllog names the frame stack_offset above its own entry: 3 skips _log and the public
        # method, so the metadata points at the training loop's line.
        self._mllogger = mllog.MLLogger(logger, default_stack_offset=3, root_dir=_ROOT)

    @property
    def enabled(self) -> bool:
        return self._mllogger is not None

    def close(self) -> None:
        """Flush and close the log file (a stream is left open)."""
        if self._handler is not None:
            self._handler.close()
            self._handler = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log(self, kind: str, key: str, value: Any = None, **metadata) -> None:
        # Keys are the values of mlperf_logging.mllog.constants (tests check every one).
        if self._mllogger is not None:
            getattr(self._mllogger, kind)(key=key, value=value, metadata=metadata or None)

    # --- before the clock starts -------------------------------------------------------------
    def init_start(self) -> None:
        """``cache_clear`` and ``init_start``. The data is synthetic and made in memory, so no
        file cache holds it: the cold start that clearing caches ensures holds already."""
        self._log("event", "cache_clear", True)
        self._log("start", "init_start")

    def configuration(
        self,
        wl: Workload,
        cfg: Config,
        *,
        batch_size: int,
        seed: int,
        platform: str,
        org: str = ORG,
        status: str = STATUS,
    ) -> None:
        """The submission keys, the seed, the batch and the recipe's logged hyperparameters.

        Args:
            wl: an MLPerf benchmark workload (its recipe names a benchmark).
            cfg: its config; ``cfg.eval_samples`` is logged as ``eval_samples``.
            batch_size: examples per optimizer step (``global_batch_size``; no accumulation).
            seed: the run's seed.
            platform: ``submission_platform``, the system that runs (e.g. a device summary).
            org: ``submission_org``.
            status: ``submission_status``: cloud, onprem, preview or research.
        """
        if not self.enabled:
            return
        for key, value in (
            ("submission_benchmark", check_benchmark(wl, cfg)),
            ("submission_division", division(wl, cfg, batch_size)),
            ("submission_org", org),
            ("submission_platform", platform),
            ("submission_status", status),
            ("seed", seed),
            ("global_batch_size", batch_size),
            ("gradient_accumulation_steps", 1),
            ("eval_samples", cfg.eval_samples),
            *wl.recipe(cfg).hyperparameters.items(),
        ):
            self._log("event", key, value)

    def init_stop(self) -> None:
        self._log("end", "init_stop")

    # --- the timed run ------------------------------------------------------------------------
    def run_start(self) -> None:
        self._log("start", "run_start")

    def block_start(self, samples: int, count: int) -> None:
        """A block (and its one epoch) of ``count`` samples after ``samples`` trained."""
        self._log("start", "block_start", first_epoch_num=samples, epoch_count=count)
        self._log("start", "epoch_start", epoch_num=samples)

    def block_stop(self, samples: int, count: int) -> None:
        """The end of the block that :meth:`block_start` opened with the same arguments."""
        self._log("end", "epoch_stop", epoch_num=samples)
        self._log("end", "block_stop", first_epoch_num=samples, epoch_count=count)

    def eval_start(self, samples: int) -> None:
        self._log("start", "eval_start", epoch_num=samples)

    def eval_stop(self, samples: int, quality: float | dict[str, float]) -> None:
        """``eval_accuracy`` (the quality after ``samples`` trained), then ``eval_stop``.

        Several metrics (a dict: stable_diffusion's FID and CLIP score) are one
        ``eval_accuracy`` each, told apart by a ``metric`` metadata key, as the v4.0 checker
        aggregates them.
        """
        # samples_count too: the closed llama2_70b_lora rules read it (NVIDIA's v4.0 logs).
        counts = {"epoch_num": samples, "samples_count": samples}
        if isinstance(quality, dict):
            for metric, value in quality.items():
                self._log("event", "eval_accuracy", value, metric=metric, **counts)
        else:
            self._log("event", "eval_accuracy", quality, **counts)
        self._log("end", "eval_stop", epoch_num=samples)

    def run_stop(self, status: str, samples: int) -> None:
        """``run_stop`` with ``status`` ("success" or "aborted"), then ``train_samples``."""
        self._log("end", "run_stop", status=status)
        self._log("event", "train_samples", samples)


__all__ = ["ORG", "RULESET", "STATUS", "RunLog", "check_benchmark", "division"]
