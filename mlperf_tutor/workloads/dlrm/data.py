"""DLRM data: synthetic click batches with a learnable signal, the exact ROC AUC, and the reader
(and writer) of the MLPerf Criteo 1TB multi-hot files.

A batch is a dict of numpy arrays (B samples, F = 26 categorical features, H = the sum of the
multi-hot sizes)::

    dense   (B, 13) float32   the dense features, log-transformed counts: the reference's files
                              hold log(count + 3) (torchrec ``BinaryCriteoUtils.tsv_to_npys``)
    sparse  (B, H)  int32     every feature's multi-hot indices, feature after feature: feature
                              f holds multi_hot_sizes[f] consecutive columns (fixed-size bags,
                              as in the reference's multi-hot dataset)
    labels  (B,)    float32   1.0 for a click
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from mlperf_tutor.core.files import NPY_HEADER_ERRORS, regular_file

# MLPerf Training DLRM-DCNv2 quality target: ROC AUC on the evaluation days (v4.0 rules).
TARGET_AUC = 0.80275


def bag_offsets(multi_hot_sizes) -> np.ndarray:
    """(F + 1,) column where each feature's bag starts in ``sparse``, and the total H last."""
    return np.concatenate([[0], np.cumsum(multi_hot_sizes)]).astype(np.int64)


def synthetic_batch(cfg, batch_size: int, seed: int, task_seed: int) -> dict[str, np.ndarray]:
    """A batch of samples of a seeded click model.

    The logit is a fixed linear function of the dense features plus, per feature, the mean of
    fixed per-row scores over the sample's bag; ids are Zipf-distributed (low ids frequent).
    The same ``task_seed`` gives the same click model, so a DLRM can learn it (the best possible
    AUC is well above the MLPerf target); ``seed`` draws the samples.

    Args:
        cfg: a :class:`DlrmConfig` (``num_dense``, ``table_sizes``, ``multi_hot_sizes``).
        batch_size: B.
        seed: seed of the samples.
        task_seed: seed of the click model (dense weights and per-row scores).

    Returns:
        ``{"dense": (B, num_dense) float32, "sparse": (B, H) int32, "labels": (B,) float32}``.
    """
    task = np.random.default_rng(task_seed)
    dense_weights = task.normal(0.0, 0.5, cfg.num_dense)
    row_scores = [task.normal(0.0, 1.0, size) for size in cfg.table_sizes]
    rng = np.random.default_rng(seed)
    # log(count + 3), as the reference's preprocessing stores the dense features.
    dense = np.log(rng.poisson(3.0, (batch_size, cfg.num_dense)) + 3.0).astype(np.float32)
    columns, logit = [], (dense - np.log(6.0)) @ dense_weights
    for size, hot, scores in zip(cfg.table_sizes, cfg.multi_hot_sizes, row_scores, strict=True):
        # Zipf-like popularity: low ids are frequent, as in Criteo.
        ids = np.minimum(rng.zipf(1.3, (batch_size, hot)) - 1, size - 1)
        columns.append(ids)
        logit = logit + scores[ids].mean(axis=1) * (2.0 / np.sqrt(len(cfg.table_sizes)))
    clicks = rng.random(batch_size) < 1.0 / (1.0 + np.exp(-2.0 * logit))
    return {
        "dense": dense,
        "sparse": np.concatenate(columns, axis=1).astype(np.int32),
        "labels": clicks.astype(np.float32),
    }


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, exactly: the Mann-Whitney statistic with tied scores given
    their average rank (what ``sklearn.metrics.roc_auc_score`` computes, ties included).

    Raises:
        ValueError: the labels hold one class only (the AUC is undefined).
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1) > 0.5
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both clicks and non-clicks among the labels")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # Average 1-based rank within each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


# --- MLPerf Criteo 1TB multi-hot files -----------------------------------------------------------
# The layout the MLPerf reference trains on, three files per day d = 0..23 in one directory.
# Sources: mlcommons/training recommendation_v2/torchrec_dlrm/ (data/multi_hot_criteo.py,
# data/dlrm_dataloader.py, scripts/materialize_synthetic_multihot_dataset.py, multi_hot.py; the
# last three as in facebookresearch/dlrm torchrec_dlrm/, where they come from) and pytorch/torchrec
# torchrec/datasets/criteo.py (BinaryCriteoUtils, InMemoryBinaryCriteoIterDataPipe):
#
#     day_{d}_dense.npy             float32 (N, 13): log(count + 3) of the integer features. The
#                                   log is taken once, when the TSVs become .npy
#                                   (BinaryCriteoUtils.tsv_to_npys); the loaders use the values
#                                   as stored, so reading applies no transform.
#     day_{d}_labels.npy            int32 (N, 1) of 0 and 1 (tsv_to_npys, BinaryCriteoUtils.shuffle;
#                                   the loaders slice [rows, :] and flatten per batch).
#     day_{d}_sparse_multi_hot.npz  np.savez (uncompressed, members "0.npy" .. "25.npy"): array f
#                                   is int32 (N, multi_hot_sizes[f]), column 0 the one-hot id mod
#                                   the table size, the rest the Multihot lookup table's row
#                                   (materialize script; Multihot tables are ``.int()``).
#                                   MultiHotCriteoIterDataPipe memory-maps each member at its zip
#                                   offset, asserts int32, and takes ids modulo the table sizes.
#
# Days 0..22 train (TOTAL_TRAINING_SAMPLES = 4,195,197,692 rows, shuffled across days on disk by
# BinaryCriteoUtils.shuffle); day 23 is split in halves, the first ceil(N / 2) rows for
# validation (89,137,319: MLPerf's eval set), the rest for test (_load_data_for_rank).
NUM_DAYS = 24
TRAIN_DAYS = tuple(range(NUM_DAYS - 1))
EVAL_DAY = NUM_DAYS - 1
_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length
_ZIP_LOCAL_MAGIC = 0x04034B50


class DataError(ValueError):
    """Criteo multi-hot files that cannot be read (the message names the file)."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def day_paths(directory: str | os.PathLike, day: int) -> dict[str, Path]:
    """``{"dense", "labels", "sparse"}`` -> the paths of one day's three files."""
    root = Path(directory)
    return {
        "dense": root / f"day_{day}_dense.npy",
        "labels": root / f"day_{day}_labels.npy",
        "sparse": root / f"day_{day}_sparse_multi_hot.npz",
    }


def _read_npy_header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read is None:
            raise ValueError(f"unknown .npy version {version}")
        return read(f)
    except NPY_HEADER_ERRORS as e:
        raise DataError(
            f"{path} is not a readable .npy array ({_reason(e)}); re-create it"
        ) from None


def _map(path: Path, offset: int, header, room: int | None = None) -> np.ndarray:
    """The array of ``header`` at ``offset`` of ``path``, memory-mapped; ``room``: the bytes
    its data may take there (a zip member's size), by default the rest of the file."""
    shape, fortran, dtype = header
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects, not numbers; re-create it")
    if any(d < 0 for d in shape):
        raise DataError(f"{path} announces the shape {shape}; re-create it")
    nbytes = math.prod(shape) * dtype.itemsize
    room = path.stat().st_size - offset if room is None else room
    if nbytes > room:
        raise DataError(
            f"{path} is truncated: its header announces {dtype} {shape}, {nbytes} bytes, but "
            f"only {max(room, 0)} follow it; re-create it"
        )
    if nbytes == 0:  # np.memmap cannot map zero bytes
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def _present(path: Path) -> Path:
    if not path.exists():
        raise DataError(
            f"{path} does not exist; a day needs day_D_dense.npy, day_D_labels.npy and "
            "day_D_sparse_multi_hot.npz (the reference's materialized multi-hot layout)"
        )
    return regular_file(path, DataError, "Criteo day file")


# What numpy, zipfile and the OS raise on a damaged file; each becomes one DataError.
_FILE_ERRORS = (OSError, ValueError, TypeError, EOFError, NotImplementedError, struct.error)


def _open_npy(path: Path) -> np.ndarray:
    _present(path)
    try:
        with open(path, "rb") as f:
            header = _read_npy_header(f, path)
            offset = f.tell()
        return _map(path, offset, header)
    except DataError:
        raise
    except _FILE_ERRORS as e:
        raise DataError(f"{path} cannot be read ({_reason(e)}); re-create it") from None


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    """The members of an uncompressed .npz, each memory-mapped in place (np.load would read
    them into memory)."""
    _present(path)
    try:
        return _npz_members(path)
    except DataError:
        raise
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not an .npz (zip) archive; write it with np.savez") from None
    except (*_FILE_ERRORS, zipfile.LargeZipFile, UnicodeDecodeError) as e:
        raise DataError(f"{path} is a damaged .npz archive ({_reason(e)}); re-create it") from None


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    arrays = {}
    with open(path, "rb") as f:
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise DataError(f"{path} holds {info.filename!r}, which is not a .npy member")
            if info.filename[: -len(".npy")] in arrays:
                raise DataError(f"{path} holds the member {info.filename!r} twice; re-create it")
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataError(
                    f"{path} is compressed ({info.filename!r}); the reference memory-maps the "
                    "members, so write it with np.savez, not np.savez_compressed"
                )
            f.seek(info.header_offset)
            local = f.read(_ZIP_LOCAL_HEADER.size)
            complete = len(local) == _ZIP_LOCAL_HEADER.size
            fields = _ZIP_LOCAL_HEADER.unpack(local) if complete else None
            if fields is None or fields[0] != _ZIP_LOCAL_MAGIC:
                raise DataError(
                    f"{path} is a damaged zip archive ({info.filename!r}); re-create it"
                )
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
            f.seek(start)
            header = _read_npy_header(f, path)
            # The array stays inside its member: a header cannot map the bytes of another one.
            room = start + info.file_size - f.tell()
            arrays[info.filename[: -len(".npy")]] = _map(path, f.tell(), header, room)
    return arrays


def _open_day(directory: str | os.PathLike, day: int, cfg) -> dict:
    """One day's arrays, memory-mapped, after checking every shape, dtype and key."""
    paths = day_paths(directory, day)
    dense, labels = _open_npy(paths["dense"]), _open_npy(paths["labels"])
    sparse = _open_npz(paths["sparse"])
    if dense.ndim != 2 or dense.shape[1] != cfg.num_dense or dense.dtype.kind != "f":
        raise DataError(
            f"{paths['dense']} holds {dense.dtype} {dense.shape}; the dense file is float32 "
            f"(N, {cfg.num_dense}) of log(count + 3) (torchrec BinaryCriteoUtils.tsv_to_npys)"
        )
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.dtype.kind not in "biuf":
        raise DataError(
            f"{paths['labels']} holds {labels.dtype} {labels.shape}; the labels file is int32 "
            "(N, 1) of 0 and 1"
        )
    keys = [str(f) for f in range(len(cfg.table_sizes))]
    if sorted(sparse) != sorted(keys):
        missing, extra = sorted(set(keys) - set(sparse)), sorted(set(sparse) - set(keys))
        raise DataError(
            f"{paths['sparse']} has arrays {sorted(sparse, key=lambda k: (len(k), k))}: missing "
            f"{missing}, unexpected {extra}; it needs '0' .. '{len(keys) - 1}', one per "
            "categorical feature, as materialize_synthetic_multihot_dataset.py writes them"
        )
    rows = {paths["dense"].name: len(dense), paths["labels"].name: len(labels)}
    for f, hot in enumerate(cfg.multi_hot_sizes):
        ids = sparse[str(f)]
        if ids.dtype != np.int32 or ids.ndim != 2 or ids.shape[1] != hot:
            raise DataError(
                f"{paths['sparse']}: feature '{f}' holds {ids.dtype} {ids.shape}; expected "
                f"int32 (N, {hot}), multi_hot_sizes[{f}] = {hot} indices per sample (is the "
                "config the one the data was made with?)"
            )
        rows[f"{paths['sparse'].name}['{f}']"] = len(ids)
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name}: {n}" for name, n in rows.items())
        raise DataError(
            f"day {day} in {directory} has files of different row counts ({counts}); the three "
            "files of a day must hold the same samples"
        )
    return {"paths": paths, "dense": dense, "labels": labels, "sparse": [sparse[k] for k in keys]}


class CriteoMultiHot:
    """The MLPerf Criteo 1TB multi-hot dataset (or any days of that layout), memory-mapped.

    Opening checks every file's header (shapes, dtypes, npz keys, row counts); reading checks
    each batch's indices against the tables. Samples are the selected days' rows, day after
    day (a batch may span two days, as in the reference's loader).

    Args:
        directory: the folder holding ``day_{d}_dense.npy``, ``day_{d}_labels.npy`` and
            ``day_{d}_sparse_multi_hot.npz``.
        days: which days to read, in order (MLPerf: :data:`TRAIN_DAYS` for training).
        cfg: a :class:`DlrmConfig`; its ``multi_hot_sizes`` must match the files' bag widths
            and every index must be below its ``table_sizes`` entry.
        rows: ``(start, stop)``: only these rows of the concatenated days (default: all).
        hash_indices: take each index modulo its table size instead of refusing one that is
            too large (the reference's ``hashes``: ``--num_embeddings_per_feature`` applied at
            load time); for tables smaller than the data's, e.g. the ``small`` preset.
        validate: check every value read (a few passes over each batch): indices inside
            their tables (unless hashed), labels 0 or 1, dense features finite. ``False``
            skips these checks, to read trusted data faster.

    Raises:
        DataError: a missing or non-regular file, a wrong shape, dtype or npz key, a damaged
            .npy or .npz file, days whose three files disagree on the row count; while
            reading, an index out of its table's range, a label other than 0 and 1, a dense
            feature that is NaN or infinite (the message names the file, the row and the
            feature).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        days: Sequence[int],
        cfg,
        *,
        rows: tuple[int, int] | None = None,
        hash_indices: bool = False,
        validate: bool = True,
    ):
        self.directory, self.days, self.cfg = Path(directory), tuple(days), cfg
        if not self.days:
            raise DataError(f"no days given for {directory}; pass e.g. TRAIN_DAYS or [23]")
        self.hash_indices, self.validate = hash_indices, validate
        self._days = [_open_day(directory, day, cfg) for day in self.days]
        self._starts = np.cumsum([0] + [len(d["dense"]) for d in self._days])
        total = int(self._starts[-1])
        self.start, self.stop = rows if rows is not None else (0, total)
        if not 0 <= self.start <= self.stop <= total:
            raise DataError(f"rows {rows} are outside the {total} rows of days {self.days}")
        self._tables = np.asarray(cfg.table_sizes, np.int64)
        self._offsets = bag_offsets(cfg.multi_hot_sizes)

    @classmethod
    def stage(cls, directory: str | os.PathLike, stage: str, cfg, **kwargs) -> CriteoMultiHot:
        """The reference's split: ``"train"`` is days 0..22; ``"val"`` the first ceil(N / 2)
        rows of day 23 and ``"test"`` the rest (MLPerf evaluates on ``"val"``)."""
        if stage == "train":
            return cls(directory, TRAIN_DAYS, cfg, **kwargs)
        if stage not in ("val", "test"):
            raise ValueError(f"unknown stage {stage!r}; choose 'train', 'val' or 'test'")
        rows = len(cls(directory, (EVAL_DAY,), cfg, **kwargs))  # checks the whole day first
        half = (rows + 1) // 2
        selected = (0, half) if stage == "val" else (half, rows)
        return cls(directory, (EVAL_DAY,), cfg, rows=selected, **kwargs)

    def __len__(self) -> int:
        return self.stop - self.start

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start .. stop - 1`` (of this selection) as a batch in our format."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"rows {start}..{stop} out of range for {len(self)} samples")
        start, stop = start + self.start, stop + self.start
        pieces = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:  # one piece per day the rows touch
            while self._starts[k + 1] <= start:  # skip days with no rows
                k += 1
            lo, hi = start, min(stop, self._starts[k + 1])
            start = hi
            day, a, b = self._days[k], int(lo - self._starts[k]), int(hi - self._starts[k])
            with np.errstate(over="ignore"):  # a float64 too large for float32: inf, refused
                piece = {
                    "dense": np.asarray(day["dense"][a:b], np.float32),
                    "sparse": self._sparse(day, a, b),
                    "labels": np.asarray(day["labels"][a:b, 0], np.float32),
                }
            if self.validate:
                self._check(day, a, piece)
            pieces.append(piece)
        if not pieces:
            return {
                "dense": np.empty((0, self.cfg.num_dense), np.float32),
                "sparse": np.empty((0, int(self._offsets[-1])), np.int32),
                "labels": np.empty(0, np.float32),
            }
        return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}

    @staticmethod
    def _check(day: dict, a: int, piece: dict[str, np.ndarray]) -> None:
        """Labels 0 or 1 and finite dense features, or a DataError naming file, row and
        column (``a``: the day's row of the piece's first)."""
        labels = piece["labels"]
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            row = int(bad[0])
            value = day["labels"][a + row, 0]
            raise DataError(
                f"{day['paths']['labels']}: row {a + row} has label {value}; a label is 0 or 1 "
                "(a click); the file is corrupt"
            )
        dense = piece["dense"]
        if not np.isfinite(dense).all():
            row, col = (int(i) for i in np.argwhere(~np.isfinite(dense))[0])
            value = day["dense"][a + row, col]
            raise DataError(
                f"{day['paths']['dense']}: row {a + row}, dense feature {col} is {value}, not a "
                "finite float32 (the files hold log(count + 3)); the file is corrupt"
            )

    def _sparse(self, day: dict, a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, int(self._offsets[-1])), np.int32)
        for f, ids in enumerate(day["sparse"]):
            block, size = np.asarray(ids[a:b]), int(self._tables[f])
            if self.hash_indices:
                block = block % size  # int32 stays int32; the result is in [0, size)
            elif self.validate and block.size and (block.min() < 0 or block.max() >= size):
                row, col = np.argwhere((block < 0) | (block >= size))[0]
                raise DataError(
                    f"{day['paths']['sparse']}: feature '{f}' has index {block[row, col]} at row "
                    f"{a + row}, outside its table of {size} rows (cfg.table_sizes[{f}]); use the "
                    "config the data was made for, or hash_indices=True to take indices modulo "
                    "the table size as the reference does"
                )
            out[:, self._offsets[f] : self._offsets[f + 1]] = block
        return out

    def batches(
        self,
        batch_size: int,
        seed: int | None = None,
        drop_last: bool = False,
        *,
        epoch: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` consecutive samples (the last may be smaller unless
        ``drop_last``).

        With a ``seed``, the order of the batches (drawn from ``(seed, epoch)``) and the order
        of the rows inside each batch (from ``(seed, epoch, position)``) are seeded
        permutations: every sample still comes exactly once, and reads stay contiguous. (The
        reference's training days are already shuffled on disk; its ``--shuffle_batches``
        permutes rows inside each batch only.) ``start`` skips the pass's first batches
        without reading them.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be at least 0, got {start}")
        count = self.num_batches(batch_size, drop_last)
        shuffle = seed is not None
        order = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else None
        for position in range(start, count):
            k = int(order[position]) if shuffle else position
            batch = self.read(k * batch_size, min((k + 1) * batch_size, len(self)))
            if shuffle:
                rng = np.random.default_rng([seed, epoch, position])
                perm = rng.permutation(len(batch["labels"]))
                batch = {key: value[perm] for key, value in batch.items()}
            yield batch


def training_days(directory: str | os.PathLike) -> tuple[int, ...]:
    """The training days (of :data:`TRAIN_DAYS`) that ``directory`` has a dense file of.

    Raises:
        DataError: ``directory`` is not a directory, or holds no training day.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory} is not a directory; pass the folder of the day_D_*.npy/.npz files"
        )
    days = tuple(d for d in TRAIN_DAYS if day_paths(directory, d)["dense"].exists())
    if not days:
        raise DataError(
            f"{directory} holds no training day (day_D_dense.npy for D in 0..22); write or "
            "copy the reference's multi-hot files there"
        )
    return days


def write_sample_days(
    directory: str | os.PathLike, batch: Mapping[str, np.ndarray], multi_hot_sizes, days: int = 2
) -> Path:
    """Write ``batch``'s rows as training days ``0 .. days - 1`` (split as evenly as the rows
    allow) in the reference's multi-hot layout; returns ``directory``."""
    rows = len(batch["labels"])
    for day, part in enumerate(np.array_split(np.arange(rows), max(1, min(days, rows)))):
        write_criteo_multi_hot(
            directory, day, {k: np.asarray(v)[part] for k, v in batch.items()}, multi_hot_sizes
        )
    return Path(directory)


def _atomic_save(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file renamed to ``path`` once complete."""
    from mlperf_tutor.core.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_criteo_multi_hot(
    directory: str | os.PathLike,
    day: int,
    batch: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    multi_hot_sizes: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Write one day in the reference's multi-hot layout (each file atomically).

    Args:
        directory: the output folder (created if needed).
        day: d in ``day_{d}_...``.
        batch: ``dense`` (N, 13) floats (already log-transformed, as the batch format holds
            them), ``labels`` (N,) or (N, 1) of 0 and 1, and ``sparse``: either our (N, H)
            array, split into features by ``multi_hot_sizes``, or one (N, hot_f) array per
            feature.
        multi_hot_sizes: each feature's bag width; needed when ``sparse`` is (N, H).

    Returns:
        The written paths (:func:`day_paths`).

    Raises:
        DataError: a missing key, integer or non-finite dense values, labels other than 0 and
            1, indices that do not fit int32, or arrays whose shapes do not fit together.
    """
    paths = day_paths(directory, day)
    missing = [key for key in ("dense", "sparse", "labels") if key not in batch]
    if missing:
        raise DataError(f"cannot write day {day}: the batch has no {missing}")
    dense = np.asarray(batch["dense"])
    if dense.ndim != 2 or dense.dtype.kind != "f":
        raise DataError(
            f"cannot write {paths['dense']}: dense is {dense.dtype} {dense.shape}; give (N, 13) "
            "floats, the counts already transformed to log(count + 3)"
        )
    if not np.isfinite(dense).all():  # the reader refuses such a file as corrupt
        row, col = (int(i) for i in np.argwhere(~np.isfinite(dense))[0])
        raise DataError(
            f"cannot write {paths['dense']}: dense[{row}, {col}] is {dense[row, col]}; dense "
            "features must be finite"
        )
    labels = np.asarray(batch["labels"])
    labels = labels[:, None] if labels.ndim == 1 else labels
    if labels.shape != (len(dense), 1) or not np.isin(labels, (0, 1)).all():
        raise DataError(f"cannot write {paths['labels']}: labels must be N = {len(dense)} 0s/1s")
    sparse = batch["sparse"]
    if isinstance(sparse, np.ndarray):
        if multi_hot_sizes is None or sparse.ndim != 2:
            raise DataError(
                f"cannot write {paths['sparse']}: an (N, H) sparse array needs multi_hot_sizes "
                "to be split into features"
            )
        offsets = bag_offsets(multi_hot_sizes)
        if sparse.shape[1] != offsets[-1]:
            raise DataError(
                f"cannot write {paths['sparse']}: sparse has {sparse.shape[1]} columns but the "
                f"multi-hot sizes add up to {offsets[-1]}"
            )
        sparse = [sparse[:, offsets[f] : offsets[f + 1]] for f in range(len(offsets) - 1)]
    features = {}
    for f, ids in enumerate(sparse):
        ids = np.asarray(ids)
        if ids.ndim != 2 or len(ids) != len(dense) or ids.dtype.kind not in "iu":
            raise DataError(
                f"cannot write {paths['sparse']}: feature {f} is {ids.dtype} {ids.shape}; give "
                f"integers of shape ({len(dense)}, multi_hot_sizes[{f}])"
            )
        if not np.array_equal(ids.astype(np.int32), ids):
            raise DataError(f"cannot write {paths['sparse']}: feature {f} does not fit int32")
        features[str(f)] = ids.astype(np.int32)
    paths["dense"].parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(paths["sparse"], lambda f: np.savez(f, **features))
    _atomic_save(paths["dense"], lambda f: np.save(f, dense.astype(np.float32)))
    _atomic_save(paths["labels"], lambda f: np.save(f, labels.astype(np.int32)))
    return paths
