"""Llama 2 70B LoRA data: a synthetic low-entropy Markov language, prompt-masked batches, the
answer-token cross-entropy, and the reader of the MLPerf reference's tokenised SCROLLS GovReport.

Batches are dicts of (B, T) int32 arrays in Hugging Face's convention: ``input_ids``,
``attention_mask`` and ``labels``, where ``labels`` is aligned with ``input_ids`` (the model
shifts it: position t predicts ``labels[:, t + 1]``) and ``-100`` marks tokens that are not
predicted, the prompt. The reference (mlcommons/training ``llama2_70b_lora/scripts/train.py``)
loads ``{dataset_path}/train*.parquet`` and ``validation*.parquet`` with ``datasets``; each row is
one sequence packed to at most 8192 tokens, with those three columns as lists of ints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from mlperf_tutor.core.files import regular_file
from mlperf_tutor.layers.spec import IGNORE_INDEX

# Probability that a token is followed by its one fixed successor; the other 1 - p is spread
# uniformly over the vocabulary (so every sequence is possible). The transition matrix is
# doubly stochastic, the stationary distribution uniform, and the entropy rate roughly
# -p ln p - (1 - p) ln((1 - p) / V), about 0.30 nats per token for V = 256 and 0.45 for
# V = 32000: below the MLPerf target eval loss of 0.925, so a tiny model can reach it.
SUCCESSOR_PROB = 0.97
SPLITS = ("train", "validation")
COLUMNS = ("input_ids", "attention_mask", "labels")


# --- synthetic language and batches --------------------------------------------------------------
def successor_permutation(vocab_size: int, language_seed: int) -> np.ndarray:
    """(V,) int64: the likely successor of each token, a seeded random permutation."""
    return np.random.default_rng(language_seed).permutation(vocab_size)


def successor_table(vocab_size: int, language_seed: int) -> np.ndarray:
    """(V, V) row-stochastic transition matrix of the synthetic language: row ``a`` puts
    ``SUCCESSOR_PROB`` on ``successor_permutation(...)[a]`` and ``1 - SUCCESSOR_PROB`` uniformly
    on every token. V^2 float64 entries: for inspection at small V; sampling does not build it.
    """
    table = np.full((vocab_size, vocab_size), (1.0 - SUCCESSOR_PROB) / vocab_size)
    table[np.arange(vocab_size), successor_permutation(vocab_size, language_seed)] += SUCCESSOR_PROB
    return table


def markov_sequences(
    vocab_size: int, batch_size: int, length: int, seed: int, language_seed: int
) -> np.ndarray:
    """(batch_size, length) int32 token sequences of the :func:`successor_table` language.

    The first token is uniform; each next one is the current token's successor with
    probability ``SUCCESSOR_PROB``, else a uniform token (possibly the successor too), which is
    exactly the table's row. Vectorised over the batch, so V = 32000 needs no V x V table.
    """
    successor = successor_permutation(vocab_size, language_seed)
    rng = np.random.default_rng(seed)
    follow = rng.random((batch_size, length)) < SUCCESSOR_PROB  # (B, T)
    uniform = rng.integers(0, vocab_size, (batch_size, length))  # (B, T)
    tokens = np.empty((batch_size, length), np.int32)
    tokens[:, 0] = uniform[:, 0]
    for t in range(1, length):
        tokens[:, t] = np.where(follow[:, t], successor[tokens[:, t - 1]], uniform[:, t])
    return tokens


def synthetic_batch(cfg, batch_size: int, seed: int, language_seed: int) -> dict[str, np.ndarray]:
    """A batch of ``cfg.seq_len`` Markov tokens whose first ``round(cfg.prompt_fraction * T)``
    positions are the prompt (label -100); ``prompt_fraction`` 0 labels every token.

    Args:
        cfg: a ``LlamaConfig`` (uses ``vocab_size``, ``seq_len``, ``prompt_fraction``).
        batch_size: B.
        seed: the sequences' seed.
        language_seed: the language's seed; keep it fixed between training and evaluation.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each (B, T) int32; the mask is all ones.
    """
    tokens = markov_sequences(cfg.vocab_size, batch_size, cfg.seq_len, seed, language_seed)
    labels = tokens.copy()
    labels[:, : round(cfg.prompt_fraction * cfg.seq_len)] = IGNORE_INDEX
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens), "labels": labels}


def answer_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(sum of next-token cross-entropy in nats, number of predicted tokens), in float64.

    Hugging Face's causal-LM loss without the mean: ``logits[:, t]`` (B, T, V) predicts
    ``labels[:, t + 1]`` (B, T), and labels equal to ``-100`` are skipped. Summing both over
    the validation batches and dividing gives the token-weighted eval loss.
    """
    logits = np.asarray(logits, np.float64)[:, :-1]  # (B, T - 1, V)
    targets = np.asarray(labels)[:, 1:]  # (B, T - 1)
    keep = targets != IGNORE_INDEX
    picked = logits[keep]  # (M, V)
    top = picked.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(picked - top).sum(axis=-1)) + top[:, 0]  # (M,)
    target = np.take_along_axis(picked, targets[keep][:, None].astype(np.int64), axis=-1)[:, 0]
    return float((log_z - target).sum()), int(keep.sum())


# --- the reference's GovReport parquet files ------------------------------------------------------
class GovReportError(ValueError):
    """A GovReport parquet directory or file that cannot be read (the message names it)."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise GovReportError(
            "reading GovReport parquet files needs pyarrow; run `pip install 'mlperf-tutor[data]'`"
        ) from e
    return pa, pq


def _row_of(offsets: np.ndarray, position: int) -> int:
    """Row holding flat ``position``, given the rows' (n + 1,) start offsets."""
    return int(np.searchsorted(offsets, position, side="right")) - 1


class GovReport:
    """One split of the reference's tokenised GovReport, read whole into int32 arrays.

    The files ``{directory}/{split}*.parquet`` are read in sorted name order, one row group
    and one column at a time (lists flattened to numpy, no Python lists); 8192-token packed
    sequences take 12 bytes per token, about 400 MB for the training split (twice that while
    loading).

    Args:
        directory: the reference's ``dataset_path``.
        split: ``"train"`` or ``"validation"``.
        max_seq_len: longest sequence accepted (the reference packs to 8192).
        vocab_size: the vocabulary V that input ids must be below (default: any id that fits
            int32).
        validate: check every value as it is loaded (a few passes over each row group):
            input ids in [0, V), attention mask 0 or 1, labels -100 or the input id at their
            position. ``False`` skips these checks, to load trusted data faster; values that do
            not fit the int32 arrays are refused either way (never wrapped).

    Raises:
        ValueError: an unknown split.
        GovReportError: a missing directory, no files of the split, a file that is not a
            regular file or not parquet, a missing or non-integer column, nulls, an empty row,
            a row whose three lists differ in length or that is longer than ``max_seq_len``,
            attention-mask values other than 0 and 1, negative or too large input ids, or a
            label that is neither -100 nor the input id at its position (the message names the
            file, the row and the column).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str = "train",
        max_seq_len: int = 8192,
        vocab_size: int | None = None,
        *,
        validate: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        directory = Path(directory)
        if not directory.is_dir():
            raise GovReportError(
                f"{directory} is not a directory; pass the reference's dataset_path, the "
                "folder holding train*.parquet and validation*.parquet"
            )
        self.files = sorted(directory.glob(f"{split}*.parquet"))
        if not self.files:
            raise GovReportError(
                f"{directory} has no {split}*.parquet files; download the MLPerf llama2_70b_lora "
                "dataset into it (see the reference's README)"
            )
        for path in self.files:
            regular_file(path, GovReportError, "parquet file of the split")
        self.split, self.max_seq_len, self.vocab_size = split, max_seq_len, vocab_size
        self.validate = validate
        parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
        lengths: list[np.ndarray] = []
        for path in self.files:
            for chunk in self._read_file(path):
                lengths.append(chunk.pop("lengths"))
                for column in COLUMNS:
                    parts[column].append(chunk[column])
        if not sum(len(x) for x in lengths):
            raise GovReportError(
                f"the {split}*.parquet files in {directory} hold no sequences; download them again"
            )
        self.lengths = np.concatenate(lengths)  # (n,) tokens per sequence
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])  # (n + 1,)
        self._flat = {}
        for column in COLUMNS:
            self._flat[column] = np.concatenate(parts.pop(column))  # (tokens,) int32
            self._flat[column].flags.writeable = False

    def _read_file(self, path: Path) -> Iterator[dict[str, np.ndarray]]:
        """Validated ``{column: flat int32 values, "lengths": (rows,)}`` per row group."""
        pa, _ = _pyarrow()
        try:
            yield from self._row_groups(path)
        except GovReportError:
            raise
        except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as e:
            raise GovReportError(
                f"{path} is corrupt ({_reason(e)}); download or write it again"
            ) from None

    def _row_groups(self, path: Path) -> Iterator[dict[str, np.ndarray]]:
        pa, pq = _pyarrow()
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise GovReportError(
                f"{path} is not a readable parquet file ({_reason(e)}); download or write it again"
            ) from None
        schema = parquet.schema_arrow
        for column in COLUMNS:
            if column not in schema.names:
                raise GovReportError(
                    f"{path} has no {column!r} column (it has {schema.names}); GovReport rows "
                    f"need {', '.join(COLUMNS)}, as the reference's dataset has"
                )
            kind = schema.field(column).type
            is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
            if not (is_list and pa.types.is_integer(kind.value_type)):
                raise GovReportError(
                    f"{path}: column {column!r} is {kind}, expected lists of integers "
                    "(token ids); re-create the file"
                )
        first_row = 0
        for group in range(parquet.num_row_groups):
            chunk: dict[str, np.ndarray] = {}
            for column in COLUMNS:  # one column at a time: one arrow column in memory
                try:
                    array = parquet.read_row_group(group, columns=[column]).column(column)
                except (pa.ArrowException, OSError) as e:
                    raise GovReportError(
                        f"{path} is corrupt: row group {group} of column {column!r} cannot be "
                        f"read ({_reason(e)}); download it again"
                    ) from None
                values, lengths = self._flatten(array, path, column, first_row)
                if "lengths" in chunk and not np.array_equal(lengths, chunk["lengths"]):
                    row = first_row + int(np.flatnonzero(lengths != chunk["lengths"])[0])
                    raise GovReportError(
                        f"{path}: row {row} has lists of different lengths in its columns; "
                        f"{', '.join(COLUMNS)} must have one entry per token"
                    )
                chunk["lengths"], chunk[column] = lengths, values
            self._check(chunk, path, first_row)
            yield {k: v if k == "lengths" else v.astype(np.int32) for k, v in chunk.items()}
            first_row += len(chunk["lengths"])

    @staticmethod
    def _flatten(array, path: Path, column: str, first_row: int) -> tuple[np.ndarray, np.ndarray]:
        """A chunked arrow list column -> (flat int64 values, (rows,) int64 lengths)."""
        values, lengths = [], []
        row = first_row
        for chunk in array.chunks:
            if chunk.null_count or chunk.flatten().null_count:
                raise GovReportError(
                    f"{path}: column {column!r} has null (missing) entries near row {row}; "
                    "every row needs a full list of ints"
                )
            lengths.append(chunk.value_lengths().to_numpy().astype(np.int64))
            flat = chunk.flatten().to_numpy()
            if flat.dtype == np.uint64 and flat.size and flat.max() >= 2**63:  # int64 would wrap
                position = int(np.argmax(flat >= 2**63))
                bad = row + _row_of(np.concatenate([[0], np.cumsum(lengths[-1])]), position)
                raise GovReportError(
                    f"{path}: row {bad} has {column} value {flat[position]}, which does not fit "
                    "int32"
                )
            values.append(flat.astype(np.int64, copy=False))
            row += len(chunk)
        return (
            np.concatenate(values) if values else np.empty(0, np.int64),
            np.concatenate(lengths) if lengths else np.empty(0, np.int64),
        )

    def _check(self, chunk: dict[str, np.ndarray], path: Path, first_row: int) -> None:
        lengths = chunk["lengths"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])

        def fail(position: int, problem: str) -> None:
            row = first_row + _row_of(offsets, position)
            raise GovReportError(f"{path}: row {row} {problem}")

        if (lengths == 0).any():
            row = first_row + int(np.flatnonzero(lengths == 0)[0])
            raise GovReportError(f"{path}: row {row} is empty; every sequence needs tokens")
        if (lengths > self.max_seq_len).any():
            index = int(np.flatnonzero(lengths > self.max_seq_len)[0])
            raise GovReportError(
                f"{path}: row {first_row + index} has {lengths[index]} tokens, more than "
                f"max_seq_len {self.max_seq_len}; pass a larger max_seq_len or re-pack the data"
            )
        ids, mask, labels = chunk["input_ids"], chunk["attention_mask"], chunk["labels"]
        if not self.validate:  # only what the int32 arrays cannot hold
            for column in COLUMNS:
                values = chunk[column]
                if values.size and (values.min() < -(2**31) or values.max() >= 2**31):
                    bad = np.flatnonzero((values < -(2**31)) | (values >= 2**31))
                    fail(bad[0], f"has {column} value {values[bad[0]]}, which does not fit int32")
            return
        high = min(self.vocab_size or 2**31, 2**31)
        bad = np.flatnonzero((ids < 0) | (ids >= high))
        if bad.size:
            fail(bad[0], f"has input id {ids[bad[0]]}, outside [0, {high})")
        bad = np.flatnonzero((mask != 0) & (mask != 1))
        if bad.size:
            fail(bad[0], f"has attention_mask value {mask[bad[0]]}; only 0 and 1 are allowed")
        bad = np.flatnonzero((labels != IGNORE_INDEX) & (labels != ids))
        if bad.size:
            fail(
                bad[0],
                f"has label {labels[bad[0]]} where the input id is {ids[bad[0]]}; labels must be "
                f"{IGNORE_INDEX} (prompt) or equal to input_ids (the model shifts them)",
            )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i``: ``{"input_ids", "attention_mask", "labels"}``, each (length,) int32
        (read-only views)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        i %= len(self)
        start, stop = self.offsets[i], self.offsets[i + 1]
        return {column: self._flat[column][start:stop] for column in COLUMNS}

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def batches(
        self, batch_size: int, shuffle_seed: int | None = None, drop_last: bool = True
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of (B, T) int32 arrays, T the longest sequence of the batch; shorter ones are
        right-padded with input id 0, attention mask 0 and label -100.

        Args:
            batch_size: B.
            shuffle_seed: order the sequences by a permutation with this seed; ``None`` keeps
                the file order.
            drop_last: skip a last batch smaller than ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        order = np.arange(len(self))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(order)
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            if drop_last and len(rows) < batch_size:
                return
            yield self.batch(rows)

    def batch(self, rows: Sequence[int], width: int | None = None) -> dict[str, np.ndarray]:
        """Sequences ``rows`` as (len(rows), width) int32 arrays, right-padded with input id 0,
        attention mask 0 and label -100.

        Args:
            rows: sequence indices.
            width: T; by default the longest of these sequences. Must hold each of them.
        """
        longest = int(self.lengths[np.asarray(rows, np.int64)].max())
        width = longest if width is None else width
        if longest > width:
            raise ValueError(f"a sequence of {longest} tokens does not fit width {width}")
        pad = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {c: np.full((len(rows), width), pad[c], np.int32) for c in COLUMNS}
        for b, i in enumerate(rows):
            for column, values in self[int(i)].items():
                batch[column][b, : len(values)] = values
        return batch


def write_govreport(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, np.ndarray]],
    row_group_size: int | None = None,
) -> None:
    """Write ``rows`` as a GovReport-style parquet file (atomically: a temporary file beside
    ``path``, then renamed), with ``input_ids``, ``attention_mask`` and ``labels`` as
    ``list<int32>`` columns.

    Args:
        path: the file to write, e.g. ``dir/train-00000-of-00001.parquet``.
        rows: mappings with the three keys, each a 1-D sequence of ints of one length.
        row_group_size: rows per parquet row group (pyarrow's default when ``None``).

    Raises:
        ValueError: a row missing a key, or whose three lists are not 1-D of one length or hold
            values that do not fit int32.
    """
    pa, pq = _pyarrow()
    from mlperf_tutor.core.io import atomic_file

    values: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    lengths = []
    for r, row in enumerate(rows):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"row {r} has no {', '.join(missing)}; rows need {COLUMNS}")
        arrays = [np.asarray(row[c]) for c in COLUMNS]
        if any(a.ndim != 1 or len(a) != len(arrays[0]) for a in arrays):
            raise ValueError(f"row {r}: {COLUMNS} must be 1-D and of one length")
        for column, array in zip(COLUMNS, arrays, strict=True):
            if not np.array_equal(array.astype(np.int32), array):
                raise ValueError(f"row {r}: {column} holds values that do not fit int32")
        for column, array in zip(COLUMNS, arrays, strict=True):
            values[column].append(array.astype(np.int32))
        lengths.append(len(arrays[0]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))
    columns = {}
    for column in COLUMNS:
        flat = np.concatenate(values[column]) if lengths else np.empty(0, np.int32)
        columns[column] = pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int32()))
    with atomic_file(path) as tmp:
        pq.write_table(pa.table(columns), tmp, row_group_size=row_group_size)
