"""GPT data: a synthetic bigram language, next-token batches, log perplexity, and the reader of
Megatron-LM's indexed datasets (the MLPerf GPT-3 reference's tokenised C4).

Batches are dicts of int32 arrays: ``input_ids`` and ``labels`` (B, T), where ``labels[:, t]``
is the token after ``input_ids[:, t]`` (a sample of T + 1 tokens split in two, as Megatron's
GPT dataset does) and ``-100`` marks tokens that are not predicted.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.files import regular_file
from mlperf_tutor.layers.spec import IGNORE_INDEX

# Next tokens each token may be followed by in the synthetic language: entropy about
# log(BRANCHING) nats per token at best (~1.95 for 7), below the MLPerf target of 2.69, so a
# tiny model trained on it crosses the target.
BRANCHING = 7


# The mass spread evenly over every token (the rest goes to a token's likely successors), so any
# sequence is possible.
NOISE = 0.02


def bigram_successors(vocab_size: int, language_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bigram language in sparse form: (successors (V, K) int64, probabilities (K,)).

    Each token is followed by one of its ``K = min(BRANCHING, V)`` likely successors (random,
    Zipf-weighted: ``probabilities``, which sum to 1) with probability ``1 - NOISE``, and by a
    uniformly drawn token otherwise. ``successors[:, 0]`` is each token's likeliest successor.
    O(V K) memory: a dense (V, V) table of GPT-3's 50,257 tokens would take 20 GB.
    """
    rng = np.random.default_rng(language_seed)
    k = min(BRANCHING, vocab_size)
    successors = np.stack(
        [rng.choice(vocab_size, size=k, replace=False) for _ in range(vocab_size)]
    )
    weights = 1.0 / np.arange(1, k + 1)
    return successors, weights / weights.sum()


def bigram_table(vocab_size: int, language_seed: int) -> np.ndarray:
    """(V, V) row-stochastic transition matrix of :func:`bigram_successors`'s language, dense:
    for small vocabularies (it takes 8 V^2 bytes)."""
    successors, probabilities = bigram_successors(vocab_size, language_seed)
    table = np.full((vocab_size, vocab_size), NOISE / vocab_size)
    rows = np.arange(vocab_size)[:, None]
    table[rows, successors] += (1.0 - NOISE) * probabilities
    return table


def bigram_sequences(
    vocab_size: int, batch_size: int, length: int, seed: int, language_seed: int
) -> np.ndarray:
    """(batch_size, length) int32 token sequences of :func:`bigram_successors`'s language.

    Each next token inverts the cumulative distribution of its row of :func:`bigram_table` in
    token order at a uniform draw (the token is the number of entries whose cumulative sum is
    below the draw), without building the row: between two successors the cumulative sum grows
    by ``NOISE / V`` per token, so the first token at or above the draw is found per segment.
    """
    successors, probabilities = bigram_successors(vocab_size, language_seed)
    order = np.argsort(successors, axis=1)
    starts = np.take_along_axis(successors, order, axis=1)  # (V, K) successors in token order
    masses = (1.0 - NOISE) * probabilities[order]  # (V, K) their extra mass, same order
    # Segment k of a row: tokens [start_k, end_k) after the first k successors (in token order)
    # have added their mass; segment 0 starts at token 0.
    below = np.concatenate([np.zeros((vocab_size, 1)), np.cumsum(masses, axis=1)], axis=1)
    seg_start = np.concatenate([np.zeros((vocab_size, 1), np.int64), starts], axis=1)
    seg_end = np.concatenate([starts, np.full((vocab_size, 1), vocab_size)], axis=1)
    rng = np.random.default_rng(seed)
    tokens = np.empty((batch_size, length), np.int32)
    tokens[:, 0] = rng.integers(0, vocab_size, batch_size)
    draws = rng.random((batch_size, length))
    for t in range(1, length):
        prev = tokens[:, t - 1]
        u = draws[:, t : t + 1]  # (B, 1)
        # cumulative(j) = NOISE (j + 1) / V + mass below j: the first j with cumulative >= u.
        first = np.ceil((u - below[prev]) * vocab_size / NOISE - 1.0)  # (B, K + 1)
        first = np.maximum(first, seg_start[prev])
        valid = first < seg_end[prev]
        pick = np.take_along_axis(first, valid.argmax(axis=1)[:, None], axis=1)[:, 0]
        tokens[:, t] = np.minimum(pick, vocab_size - 1)
    return tokens


def split_tokens(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of T + 1 tokens (B, T + 1) -> ``{"input_ids", "labels"}``, each (B, T) int32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"samples must be (B, T + 1) with T >= 1, got shape {tokens.shape}")
    return {
        "input_ids": tokens[:, :-1].astype(np.int32),
        "labels": tokens[:, 1:].astype(np.int32),
    }


def token_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of labelled tokens), in float64.

    ``logits`` (B, T, V), ``labels`` (B, T); labels equal to ``-100`` are skipped. The mean,
    sum / count over a whole eval set, is the log perplexity MLPerf's GPT-3 target is set in.
    """
    logits = np.asarray(logits, np.float64)
    keep = labels != IGNORE_INDEX  # (B, T)
    picked = logits[keep]  # (M, V)
    top = picked.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(picked - top).sum(axis=-1)) + top[:, 0]  # (M,)
    target = np.take_along_axis(picked, labels[keep][:, None].astype(np.int64), axis=-1)[:, 0]
    return float((log_z - target).sum()), int(keep.sum())


# --- Megatron-LM indexed datasets ----------------------------------------------------------------
# The MLPerf GPT-3 reference reads C4 tokenised into Megatron-LM's memory-mapped indexed dataset
# (megatron/core/datasets/indexed_dataset.py): ``prefix.bin`` holds the tokens of every sequence
# back to back; ``prefix.idx`` is, little-endian:
#
#     magic b"MMIDIDX\x00\x00" | version <Q (1) | dtype code <B | sequences n <Q | entries m <Q
#     | sizes int32 (n) | byte pointers into .bin int64 (n) | document indices int64 (m)
#
# The document indices are the sequence numbers where documents start, plus n at the end
# (m = documents + 1); GPT data has one sequence per document, so they are 0, 1, ..., n.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron-LM's DType codes (core/datasets/indexed_dataset.py; older forks differ for 6 and 7).
DTYPE_CODES = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document entries


class IndexedDatasetError(ValueError):
    """A Megatron-LM indexed dataset that cannot be read (the message names the file)."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


_INT32_END = 2**31  # token ids are int32 in batches: larger ones are refused, never wrapped


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(``prefix.idx``, ``prefix.bin``); a prefix given with either extension is accepted."""
    text = os.fspath(prefix)
    if text.endswith((".idx", ".bin")):
        text = text[:-4]
    return Path(text + ".idx"), Path(text + ".bin")


class IndexedDataset:
    """A Megatron-LM ``MMapIndexedDataset`` (``prefix.idx`` + ``prefix.bin``), memory-mapped.

    ``dataset[i]`` is sequence ``i``'s tokens (a read-only view of the .bin file, in the
    file's dtype); for GPT data a sequence is a document (ending with the end-of-document
    token when the data was prepared with ``--append-eod``).

    Args:
        prefix: the path without extension (``.../c4_en_6_c4_spm_text_document``).

    Raises:
        IndexedDatasetError: a missing or non-regular file (a FIFO, a directory), a bad magic,
            version or dtype code, a truncated index, sizes or pointers outside the .bin file,
            or a .bin shorter than the index says.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.index_path, self.data_path = _paths(prefix)
        idx = self.index_path
        if not idx.exists():
            raise IndexedDatasetError(
                f"{idx} does not exist; pass the dataset's path prefix (without .idx/.bin)"
            )
        if not self.data_path.exists():
            raise IndexedDatasetError(
                f"{self.data_path} does not exist, but its index {idx} does; both files of "
                "the dataset are needed"
            )
        for path in (idx, self.data_path):
            regular_file(path, IndexedDatasetError, "file of an indexed dataset")
        try:
            self._read_index(idx)
        except (OSError, ValueError) as e:
            if isinstance(e, IndexedDatasetError):
                raise
            raise IndexedDatasetError(
                f"{idx} or {self.data_path} cannot be read ({_reason(e)}); copy the dataset again"
            ) from None

    def _read_index(self, idx: Path) -> None:
        with open(idx, "rb") as f:
            head = f.read(_HEADER.size)
        idx_bytes = idx.stat().st_size
        if len(head) >= 9 and head[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{idx} is not a Megatron-LM indexed dataset index (magic {head[:9]!r}, "
                f"expected {INDEX_MAGIC!r}); prepare the data with Megatron's "
                "preprocess_data.py (mmap format)"
            )
        if len(head) < _HEADER.size:
            raise IndexedDatasetError(f"{idx} is truncated ({len(head)} bytes, no full header)")
        _, version, code, count, doc_count = _HEADER.unpack(head)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx} has index version {version}; only 1 is known")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(
                f"{idx} has dtype code {code}; known codes are {sorted(DTYPE_CODES)}"
            )
        self.dtype = DTYPE_CODES[code]
        need = _HEADER.size + 12 * count + 8 * doc_count
        if idx_bytes < need:
            raise IndexedDatasetError(
                f"{idx} is truncated: {idx_bytes} bytes, but its header announces {count} "
                f"sequences and {doc_count} document entries ({need} bytes); re-create it"
            )
        index = np.memmap(idx, np.uint8, mode="r")
        self.sizes = np.frombuffer(index, np.int32, count, _HEADER.size)
        self.pointers = np.frombuffer(index, np.int64, count, _HEADER.size + 4 * count)
        self.document_indices = np.frombuffer(index, np.int64, doc_count, _HEADER.size + 12 * count)
        if count and (self.sizes.min() < 0 or self.pointers.min() < 0):
            raise IndexedDatasetError(f"{idx} has negative sizes or pointers; re-create it")
        data_bytes = self.data_path.stat().st_size
        if count and self.pointers.max() > data_bytes:
            i = int(self.pointers.argmax())
            raise IndexedDatasetError(
                f"{idx}: sequence {i} starts at byte {self.pointers[i]}, past the end of "
                f"{self.data_path} ({data_bytes} bytes); the index is corrupt, re-create it"
            )
        # No overflow: pointers are at most the file's size, sizes below 2**31 tokens.
        end = (
            int((self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize).max())
            if count
            else 0
        )
        if data_bytes < end:
            raise IndexedDatasetError(
                f"{self.data_path} is shorter than its index says ({data_bytes} bytes, the "
                f"index needs {end}); the file is truncated, copy it again"
            )
        # np.memmap cannot map an empty file; an empty dataset needs no data anyway.
        self._data = np.memmap(self.data_path, np.uint8, mode="r") if end else np.empty(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return np.frombuffer(self._data, self.dtype, int(self.sizes[i]), int(self.pointers[i]))

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


def _atomic_write(path: Path, chunks) -> None:
    """Write byte chunks to ``path`` through a temporary file renamed into place."""
    from mlperf_tutor.core.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def write_indexed_dataset(
    prefix: str | os.PathLike, documents: Iterable[np.ndarray], dtype=np.uint16
) -> None:
    """Write ``documents`` (1-D token arrays) as a Megatron-LM indexed dataset, one sequence per
    document (``prefix.bin``, then ``prefix.idx``; each file atomically).

    Args:
        prefix: the path without extension.
        documents: token arrays; values must fit ``dtype``.
        dtype: one of :data:`DTYPE_CODES`' dtypes (Megatron uses uint16 below 65500 tokens,
            int32 above).

    Raises:
        ValueError: an unknown dtype, a document that is not 1-D or does not fit ``dtype``.
    """
    dtype = np.dtype(dtype)
    codes = {v: k for k, v in DTYPE_CODES.items()}
    if dtype not in codes:
        raise ValueError(f"dtype {dtype} has no Megatron code; use one of {list(codes)}")
    idx, data = _paths(prefix)
    sizes: list[int] = []

    def chunks():
        for i, doc in enumerate(documents):
            doc = np.asarray(doc)
            if doc.ndim != 1:
                raise ValueError(f"document {i} has shape {doc.shape}; documents are 1-D")
            cast = doc.astype(dtype)
            if not np.array_equal(cast, doc):
                raise ValueError(f"document {i} has tokens that do not fit {dtype}")
            sizes.append(len(cast))
            yield cast.astype(dtype.newbyteorder("<")).tobytes()

    _atomic_write(data, chunks())
    size_array = np.array(sizes, "<i4")
    pointers = np.concatenate([[0], np.cumsum(size_array, dtype="<i8")[:-1]]) * dtype.itemsize
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, codes[dtype], len(sizes), len(sizes) + 1)
    doc_idx = np.arange(len(sizes) + 1, dtype="<i8")
    body = [size_array.tobytes(), pointers[: len(sizes)].astype("<i8").tobytes(), doc_idx.tobytes()]
    _atomic_write(idx, [header, *body])


class GptSamples:
    """Training samples of ``seq_len + 1`` tokens cut from a dataset's concatenated documents.

    As Megatron's GPT dataset builds them: the documents, in file order, form one token
    stream; sample ``k`` is ``stream[k * seq_len : (k + 1) * seq_len + 1]``, so consecutive
    samples share one boundary token and a sample may span documents. There are
    ``(tokens - 1) // seq_len`` samples; the tail that does not fill one is dropped. With a
    ``seed`` the sample order is a seeded permutation (Megatron also shuffles documents per
    epoch; here one pass reads them in file order).

    Args:
        dataset: an :class:`IndexedDataset` (or anything with ``sizes`` and ``[i]``) of tokens.
        seq_len: T, the tokens each sample predicts.
        seed: shuffle the sample order with this seed; ``None`` keeps it sequential.
        vocab_size: the vocabulary V every token must be below (default: any token id that
            fits int32).
        validate: check every token of a sample as it is read (one minimum and maximum per
            sample): in [0, V). ``False`` skips the check, to read trusted data faster; tokens
            that do not fit the int32 batches are refused either way (never wrapped).

    Raises:
        IndexedDatasetError: a dataset of float values (tokens are integers); while reading,
            a token out of range (the message names the data file, the sequence and the
            token's position in it).
    """

    def __init__(
        self,
        dataset,
        seq_len: int,
        seed: int | None = None,
        vocab_size: int | None = None,
        *,
        validate: bool = True,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.dataset, self.seq_len, self.vocab_size = dataset, seq_len, vocab_size
        self.validate = validate
        dtype = np.dtype(getattr(dataset, "dtype", np.int64))
        if dtype.kind not in "iu":
            where = getattr(dataset, "data_path", "the dataset")
            raise IndexedDatasetError(
                f"{where} holds {dtype} values; GPT samples are token ids (integers): "
                "tokenise the text with Megatron's preprocess_data.py"
            )
        high = vocab_size if validate and vocab_size is not None else _INT32_END
        # Only a range the dtype can leave is checked (uint16 tokens always fit int32).
        info = np.iinfo(dtype)
        self._range = (
            None if info.min >= 0 and info.max < high else (0 if validate else -high, high)
        )
        # Token offset where each document starts in the stream, plus the total.
        self._starts = np.concatenate([[0], np.cumsum(np.asarray(dataset.sizes, np.int64))])
        total = int(self._starts[-1])
        count = max(0, (total - 1) // seq_len)
        if count == 0:
            where = getattr(dataset, "index_path", "the dataset")
            raise IndexedDatasetError(
                f"{where} has {total} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}"
            )
        order = np.arange(count)
        self.order = order if seed is None else np.random.default_rng(seed).permutation(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` (of the possibly shuffled order): (seq_len + 1,) int64 tokens."""
        start = int(self.order[i]) * self.seq_len
        stop = start + self.seq_len + 1
        doc = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            begin = int(self._starts[doc])
            piece = self.dataset[doc][start - begin : stop - begin]
            if self._range is not None and piece.size:
                self._check(piece, doc, start - begin)
            pieces.append(piece.astype(np.int64))
            start += len(piece)
            doc += 1
        return np.concatenate(pieces)

    def _check(self, piece: np.ndarray, doc: int, first: int) -> None:
        low, high = self._range
        if piece.min() >= low and piece.max() < high:
            return
        k = int(np.flatnonzero((piece < low) | (piece >= high))[0])
        where = getattr(self.dataset, "data_path", "the dataset")
        what = (
            f"the vocabulary of {self.vocab_size} tokens"
            if self.validate and self.vocab_size is not None
            else "token ids that fit int32"
        )
        raise IndexedDatasetError(
            f"{where}: sequence {doc}, token {first + k} holds token id {piece[k]}, outside "
            f"[{low}, {high}) ({what}); the file is corrupt or made for another config"
        )

    def batch(self, rows: Iterable[int]) -> dict[str, np.ndarray]:
        """Samples ``rows`` (positions in the order) as ``{"input_ids", "labels"}``, each
        (len(rows), T) int32 (see :func:`split_tokens`)."""
        return split_tokens(np.stack([self[int(i)] for i in rows]))

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches of consecutive samples as ``{"input_ids", "labels"}`` (B, T) int32 (see
        :func:`split_tokens`); the last may be smaller unless ``drop_last``."""
        for first in range(0, len(self), batch_size):
            rows = range(first, min(first + batch_size, len(self)))
            if drop_last and len(rows) < batch_size:
                return
            yield self.batch(rows)


def write_sample_documents(
    prefix: str | os.PathLike,
    vocab_size: int,
    samples: int,
    seq_len: int,
    seed: int,
    language_seed: int,
) -> Path:
    """Write an indexed dataset of the bigram language holding exactly ``samples`` samples of
    :class:`GptSamples` (``samples * seq_len + 1`` tokens).

    The token stream is a few bigram chains, each one document of about 8 samples' tokens, so
    that every label but one per document follows its input by the language's table, as in
    ``synthetic_batch``. The dtype is Megatron's choice: uint16 below 65,500 tokens, else
    int32.

    Returns:
        ``prefix`` (as a Path), which :class:`IndexedDataset` opens.
    """
    total = samples * seq_len + 1
    chain = 8 * seq_len
    chains = -(-total // chain)
    tokens = bigram_sequences(vocab_size, chains, chain, seed, language_seed).reshape(-1)[:total]
    documents = [tokens[i : i + chain] for i in range(0, total, chain)]
    write_indexed_dataset(prefix, documents, np.uint16 if vocab_size < 65500 else np.int32)
    return Path(prefix)
