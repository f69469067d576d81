"""MLPerf BERT pre-training data: the HDF5 shards, read as batches; masked-LM accuracy.

Format (the PyTorch reference's ``create_pretraining_data.py`` and ``chop_hdf5_files.py``, from
mlcommons/training ``language_model``; the TF reference writes the same features as TFRecords).
Each file holds one row per sequence, padded with zeros:

=======================  ==========  =======  ==============================================
dataset                  shape       dtype    meaning
=======================  ==========  =======  ==============================================
``input_ids``            (N, S)      int32    token ids ([CLS] A [SEP] B [SEP] [PAD]...)
``input_mask``           (N, S)      int8     1 on real tokens, 0 on padding
``segment_ids``          (N, S)      int8     0 for sentence A, 1 for sentence B
``masked_lm_positions``  (N, P)      int32    masked positions; 0 pads (position 0 is [CLS])
``masked_lm_ids``        (N, P)      int32    the original token at each masked position
``next_sentence_labels`` (N,)        int8     1 when B is a random sentence
=======================  ==========  =======  ==============================================

With the reference's S = 512 and P = 76: training is 2048 shards ``part_XXXXX_of_02048.hdf5``
(``2048_shards_uncompressed/``), evaluation is one ``part_eval_10k.hdf5`` of 10,000 sequences
(``eval_set_uncompressed/``). Both are read by :class:`HDF5Shards`; read the eval set with
``shuffle=False, drop_last=False``. NVIDIA's submissions use two derived variants that this
reader refuses with a clear error: "varlength" files (ragged ``vlen`` rows without padding,
``hdf5_4320_shards_varlength``, ``eval_varlength``) and "packed" files (several sequences per
row, with ``packed_input_len``/``packed_masked_lm_len``).

Batches are dicts of int32 arrays with the keys and dtypes of ``synthetic_batch``. h5py is
imported only when a file is opened.

A shard is a file a user hands over, so it is read as untrusted: only a regular file is opened
(a FIFO would block), a dataset must be stored in the shard itself (an external or soft link,
an external-storage or a virtual dataset would make HDF5 read another file of the machine into
the token ids) and this is checked before any data is read, and every value is checked as a
shard is read (``validate``). Any error of h5py or numpy is one :class:`DataError` naming the
file.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from mlperf_tutor.core.files import regular_file

# MLPerf Training BERT quality target: masked-LM accuracy on the 10k-sequence eval set
# (mlcommons/training language_model/tensorflow/bert/README.md, "Stopping criteria").
TARGET_MLM_ACCURACY = 0.720

# In the order of synthetic_batch's keys.
KEYS = (
    "input_ids",
    "segment_ids",
    "input_mask",
    "masked_lm_positions",
    "masked_lm_ids",
    "next_sentence_labels",
)
_TOKENS = ("input_ids", "input_mask", "segment_ids")  # (N, S)
_MASKED = ("masked_lm_positions", "masked_lm_ids")  # (N, P)
# The reference's on-disk dtypes (create_pretraining_data.py), which write_shard reproduces.
_DISK_DTYPES = {
    "input_ids": "i4",
    "input_mask": "i1",
    "segment_ids": "i1",
    "masked_lm_positions": "i4",
    "masked_lm_ids": "i4",
    "next_sentence_labels": "i1",
}


class DataError(ValueError):
    """A data file that cannot be read as MLPerf BERT shards; the message says what to do."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


# A dataset may declare at most this many bytes per byte of the file (gzip-compressed token
# rows shrink well below this); a shard declaring more is refused before its data is read, so
# that a few hundred bytes cannot make the reader allocate terabytes.
MAX_EXPANSION = 64
_INT32 = (-(2**31), 2**31)


@contextlib.contextmanager
def _h5_errors(path: Path):
    """Turn h5py's and numpy's own exceptions into one DataError naming ``path``."""
    try:
        yield
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise DataError(
            f"{path} cannot be read as an MLPerf BERT shard ({_reason(e)}); the "
            "file is truncated or corrupt, regenerate or copy it again"
        ) from None


def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise DataError(
            "reading MLPerf BERT HDF5 shards needs h5py: pip install 'mlperf-tutor[data]'"
        ) from e
    return h5py


def _check_layout(
    where: str,
    shapes: Mapping[str, tuple[int, ...]],
    seq_len: int | None,
    max_pred: int | None,
    hint: str = "the file is not an MLPerf BERT shard of this sequence length (regenerate it, "
    "or pass the seq_len/max_predictions it was made with)",
) -> tuple[int, int, int]:
    """Rows, S and P of a shard's datasets, or a DataError naming the first bad one."""
    rows = shapes["input_ids"][0] if len(shapes["input_ids"]) == 2 else -1
    dims = {"S": seq_len, "P": max_pred}
    for key in KEYS:
        shape = shapes[key]
        if key == "next_sentence_labels":
            want, ok = "(N,)", len(shape) == 1 and shape[0] == rows
        else:
            dim = "S" if key in _TOKENS else "P"
            if len(shape) == 2 and dims[dim] is None:
                dims[dim] = shape[1]
            want = f"(N, {dim}={dims[dim]})"
            ok = len(shape) == 2 and shape == (rows, dims[dim])
        if not ok:
            raise DataError(
                f"{where}: {key!r} has shape {shape}, expected {want} with N = {rows} rows as "
                f"in input_ids; {hint}"
            )
    return rows, dims["S"], dims["P"]


def _open(path: Path):
    """``path`` opened with h5py, after checking that it is a regular HDF5 file."""
    h5py = _h5py()
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path")
    regular_file(path, DataError, "HDF5 shard")
    with _h5_errors(path):
        if not h5py.is_hdf5(path):
            raise DataError(f"{path} is not an HDF5 file (empty, truncated or another format)")
        return h5py.File(path, "r")


def _has(f, name: str) -> bool:
    """Whether the root group has a link ``name``, without following it (an external link
    would open its file)."""
    return f.id.links.exists(name.encode())


def _datasets(f, path: Path) -> dict:
    """The shard's datasets (h5py objects, nothing read), each checked to be stored in the file
    itself: a hard link to a dataset that is neither virtual nor in external storage."""
    h5py = _h5py()
    missing = [k for k in KEYS if not _has(f, k)]
    if missing:
        raise DataError(
            f"{path} has no dataset(s) {missing}; an MLPerf BERT shard holds {list(KEYS)}"
        )
    datasets = {}
    for key in KEYS:
        link = f.get(key, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise DataError(
                f"{path}: {key!r} is an external link (to {link.filename}:{link.path}); a shard's "
                "datasets must be stored in the shard itself, links to other files are refused"
            )
        if isinstance(link, h5py.SoftLink):
            raise DataError(
                f"{path}: {key!r} is a soft link (to {link.path}); a shard's datasets must be "
                "stored under their own names, links are refused"
            )
        dataset = f.get(key)
        if not isinstance(dataset, h5py.Dataset):
            raise DataError(
                f"{path}: {key!r} is not a dataset; an MLPerf BERT shard holds {list(KEYS)}"
            )
        if dataset.is_virtual:
            raise DataError(
                f"{path}: dataset {key!r} is a virtual dataset (it maps other datasets or "
                "files); a shard's data must be stored in the shard itself"
            )
        if dataset.external:
            files = [name for name, *_ in dataset.external]
            raise DataError(
                f"{path}: dataset {key!r} keeps its data in external files {files}; a shard's "
                "data must be stored in the shard itself, external storage is refused"
            )
        datasets[key] = dataset
    return datasets


def _inspect(path: Path, seq_len: int | None, max_pred: int | None) -> tuple[int, int, int]:
    """Validate one shard's datasets without reading them; returns (rows, S, P)."""
    with _open(path) as f, _h5_errors(path):
        if _has(f, "packed_input_len") or _has(f, "packed_masked_lm_len"):
            raise DataError(
                f"{path} is a packed shard (several sequences per row); this reader takes the "
                "unpacked MLPerf shards (2048_shards_uncompressed, part_eval_10k.hdf5)"
            )
        datasets = _datasets(f, path)
        for key, dataset in datasets.items():
            dtype = dataset.dtype
            if dtype.kind == "O":  # h5py's variable-length (vlen) rows
                raise DataError(
                    f"{path}: dataset {key!r} has variable-length rows (NVIDIA's varlength "
                    "format); this reader takes the fixed-length shards "
                    "(2048_shards_uncompressed, part_eval_10k.hdf5)"
                )
            if dtype.kind not in "iub":
                raise DataError(
                    f"{path}: dataset {key!r} has dtype {dtype}, expected integers; the file "
                    "is not an MLPerf BERT shard"
                )
        shapes = {k: d.shape for k, d in datasets.items()}
        layout = _check_layout(str(path), shapes, seq_len, max_pred)
        declared = sum(math.prod(d.shape) * d.dtype.itemsize for d in datasets.values())
        limit = MAX_EXPANSION * path.stat().st_size + 2**20
        if declared > limit:
            raise DataError(
                f"{path}: its datasets declare {declared} bytes of data, more than "
                f"{MAX_EXPANSION} times the file's {path.stat().st_size} bytes; the file is "
                "corrupt or not an MLPerf BERT shard"
            )
        return layout


def _paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.suffix in (".hdf5", ".h5"))
            if not paths:
                raise DataError(f"{path} holds no .hdf5 or .h5 files; check the path")
            return paths
        return [path]
    paths = [Path(p) for p in source]
    if not paths:
        raise DataError("no shard files given; pass a file, a directory or a list of files")
    return paths


class HDF5Shards:
    """MLPerf BERT HDF5 shards (training or eval), validated on opening, read as batches.

    Every file's datasets are checked when the object is made (names, integer dtypes, shapes,
    equal row counts, one S and P across files), so a bad file fails before training starts.
    Data is read one shard at a time.

    Args:
        source: a shard file, a directory of ``*.hdf5``/``*.h5`` shards, or a list of files.
        seq_len: expected S (default: whatever the first shard has).
        max_predictions: expected P (default: whatever the first shard has).
        vocab_size: the vocabulary V that ``input_ids`` and ``masked_lm_ids`` must be below
            (default: any id that fits int32).
        validate: check every value of a shard as it is read (a few passes over it): token
            ids in [0, V), ``input_mask``, ``segment_ids`` and ``next_sentence_labels`` in
            {0, 1}, ``masked_lm_positions`` in [0, S). ``False`` skips these checks, to read
            trusted data faster; values that do not fit the int32 batches are refused either
            way (never wrapped).

    Raises:
        DataError: a missing, non-regular or non-HDF5 file, a missing dataset, a wrong shape or
            dtype, a packed/varlength file, a dataset stored outside the file (external or
            soft link, external storage, virtual dataset); while reading, a value out of its
            range (the message names the file, the dataset and the row).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        seq_len: int | None = None,
        max_predictions: int | None = None,
        vocab_size: int | None = None,
        *,
        validate: bool = True,
    ):
        self.vocab_size, self.validate = vocab_size, validate
        self.paths = _paths(source)
        self.rows: list[int] = []
        for path in self.paths:
            rows, seq_len, max_predictions = _inspect(path, seq_len, max_predictions)
            self.rows.append(rows)
        self.seq_len, self.max_predictions = seq_len, max_predictions

    @property
    def num_rows(self) -> int:
        """Sequences in all shards."""
        return sum(self.rows)

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches that :meth:`batches` yields for one pass."""
        full, rest = divmod(self.num_rows, batch_size)
        return full + (0 if drop_last or not rest else 1)

    def _read(self, index: int) -> dict[str, np.ndarray]:
        # Kept in the file's dtypes (int8 masks) until a batch is cut: a quarter of the memory.
        path = self.paths[index]
        with _open(path) as f, _h5_errors(path):
            # Checked again: the file may have changed since it was inspected.
            shard = {k: d[()] for k, d in _datasets(f, path).items()}
            _check_layout(
                str(path),
                {k: v.shape for k, v in shard.items()},
                self.seq_len,
                self.max_predictions,
            )
        for key, value in shard.items():
            low, high, what = self._range(key) if self.validate else (*_INT32, "int32")
            _check_range(path, key, value, low, high, what)
        return shard

    def _range(self, key: str) -> tuple[int, int, str]:
        """[low, high) of dataset ``key``'s values, and what sets the bound."""
        if key in ("input_ids", "masked_lm_ids"):
            if self.vocab_size is None:
                return 0, _INT32[1], "token ids that fit int32"
            return 0, self.vocab_size, f"the vocabulary of {self.vocab_size} tokens"
        if key == "masked_lm_positions":
            return 0, self.seq_len, f"positions in sequences of {self.seq_len} tokens"
        return 0, 2, "0 or 1"

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the shards as batches of ``batch_size`` sequences.

        With ``shuffle``, the order of the shards and of the rows within each shard is drawn
        from ``(seed, epoch)``: the same pair gives the same batches, another epoch another
        order. Batches run across shard boundaries, so only the pass's last batch can be short.
        ``start`` skips the pass's first batches without reading the shards they come from
        (their row shuffles are drawn from the row counts alone, keeping the order exact).

        Args:
            batch_size: sequences per batch.
            seed: the run's data seed.
            epoch: the pass number; mixed into the shuffling.
            shuffle: shuffle shards and rows (off for evaluation: the file order).
            drop_last: drop a last batch shorter than ``batch_size`` (keep it for evaluation).
            start: index of the pass's first batch to yield.

        Yields:
            name -> int32 array: (B, S) for input_ids/input_mask/segment_ids, (B, P) for
            masked_lm_positions/masked_lm_ids, (B,) for next_sentence_labels.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be at least 0, got {start}")
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.paths)) if shuffle else range(len(self.paths))
        skip = start * batch_size  # rows of the pass before the first batch wanted
        carry: dict[str, np.ndarray] | None = None  # rows left over from the previous shard
        for index in order:
            if skip >= self.rows[index]:  # no row of this shard is wanted
                if shuffle:
                    rng.permutation(self.rows[index])  # the draw a read would make
                skip -= self.rows[index]
                continue
            shard = self._read(int(index))
            if shuffle:
                rows = rng.permutation(self.rows[index])
                shard = {k: v[rows] for k, v in shard.items()}
            if skip:
                shard = {k: v[skip:] for k, v in shard.items()}
                skip = 0
            if carry is not None:
                shard = {k: np.concatenate([carry[k], v]) for k, v in shard.items()}
            n = len(shard["input_ids"])
            for start in range(0, n - batch_size + 1, batch_size):
                yield {k: v[start : start + batch_size].astype(np.int32) for k, v in shard.items()}
            tail = n - n % batch_size
            carry = {k: v[tail:] for k, v in shard.items()} if n % batch_size else None
        if carry is not None and not drop_last:
            yield {k: v.astype(np.int32) for k, v in carry.items()}


def _check_range(path: Path, key: str, values: np.ndarray, low: int, high: int, what: str) -> None:
    """Raise a DataError naming the first row of dataset ``key`` with a value outside
    ``[low, high)``; a dtype whose every value is inside costs nothing."""
    if values.size == 0:
        return
    info = np.iinfo(values.dtype) if values.dtype.kind in "iu" else np.iinfo(np.uint8)
    if info.min >= low and info.max < high:
        return
    if values.min() >= low and values.max() < high:
        return
    where = np.argwhere((values < low) | (values >= high))[0]
    column = f", column {where[1]}" if len(where) > 1 else ""
    raise DataError(
        f"{path}: dataset {key!r}, row {where[0]}{column} holds {values[tuple(where)]}, outside "
        f"[{low}, {high}) ({what}); the file is corrupt or made for another config"
    )


def write_shard(path: str | os.PathLike, batch: Mapping[str, np.ndarray]) -> None:
    """Write ``batch`` as an MLPerf BERT HDF5 shard, with the reference's on-disk dtypes.

    Written to a temporary name and renamed, so a failed write leaves no partial file.

    Args:
        path: destination ``.hdf5`` file.
        batch: the six arrays of :data:`KEYS` (a ``synthetic_batch`` or a batch read back).

    Raises:
        DataError: a key is missing, the shapes do not fit together, or values do not fit the
            on-disk dtypes (HDF5 would saturate them).
    """
    path = Path(path)
    missing = [k for k in KEYS if k not in batch]
    if missing:
        raise DataError(f"cannot write {path}: the batch has no {missing}; it needs {list(KEYS)}")
    for key in KEYS:
        values = np.asarray(batch[key])
        if not np.array_equal(values.astype(_DISK_DTYPES[key]), values):
            dtype = np.dtype(_DISK_DTYPES[key])
            raise DataError(f"cannot write {path}: {key!r} holds values that do not fit {dtype}")
    shapes = {k: np.shape(batch[k]) for k in KEYS}
    _check_layout(f"cannot write {path}", shapes, None, None, "fix the batch")
    h5py = _h5py()
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with h5py.File(tmp, "w") as f:
            for key in KEYS:
                f.create_dataset(key, data=np.asarray(batch[key]), dtype=_DISK_DTYPES[key])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sample_shards(
    directory: str | os.PathLike, batch: Mapping[str, np.ndarray], shards: int = 2
) -> Path:
    """Write ``batch``'s rows as ``shards`` shards named as the reference's training shards
    (``part_00000_of_00002.hdf5``, ...), split as evenly as the rows allow.

    Args:
        directory: an existing directory.
        batch: the six arrays of :data:`KEYS` (e.g. a ``synthetic_batch``).
        shards: files to write (fewer when there are fewer rows).

    Returns:
        ``directory``, which :class:`HDF5Shards` reads.
    """
    directory = Path(directory)
    rows = len(batch["input_ids"])
    parts = np.array_split(np.arange(rows), max(1, min(shards, rows)))
    for i, part in enumerate(parts):
        name = f"part_{i:05d}_of_{len(parts):05d}.hdf5"
        write_shard(directory / name, {k: np.asarray(batch[k])[part] for k in KEYS})
    return directory


def masked_lm_counts(mlm_logits: np.ndarray, batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(correct, total) real masked positions of a batch; sum these over an eval set.

    A position is real where ``masked_lm_positions != 0`` (0 pads: [CLS] is never masked);
    it is correct where the argmax of its logits is ``masked_lm_ids``.

    Args:
        mlm_logits: (B, P, V) logits at the masked positions, as the models return them.
        batch: the batch the logits came from.
    """
    logits = np.asarray(mlm_logits)
    positions, ids = np.asarray(batch["masked_lm_positions"]), np.asarray(batch["masked_lm_ids"])
    if logits.ndim != 3 or logits.shape[:2] != positions.shape:
        raise ValueError(
            f"mlm_logits has shape {logits.shape}, expected (B, P, V) with (B, P) = "
            f"{positions.shape} as the batch's masked_lm_positions"
        )
    real = positions != 0
    correct = (logits.argmax(-1) == ids) & real
    return int(correct.sum()), int(real.sum())


def masked_lm_accuracy(mlm_logits: np.ndarray, batch: Mapping[str, np.ndarray]) -> float:
    """Fraction of a batch's real masked positions whose argmax is the original token.

    The MLPerf metric (target :data:`TARGET_MLM_ACCURACY` = 0.720) is this fraction over all
    10,000 eval sequences at once, as the reference's weighted ``tf.metrics.accuracy`` computes
    it: sum :func:`masked_lm_counts` over the batches rather than averaging batch accuracies.

    Raises:
        ValueError: logits of the wrong shape, or a batch without any masked position.
    """
    correct, total = masked_lm_counts(mlm_logits, batch)
    if total == 0:
        raise ValueError("the batch has no masked positions (masked_lm_positions are all 0)")
    return correct / total
