"""GPT data: the synthetic bigram language, next-token batches, token cross-entropy, and the
reader of Megatron-LM indexed datasets (byte format pinned by a file written by hand)."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from mlperf_tutor.workloads.gpt import data
from mlperf_tutor.workloads.gpt.data import (
    GptSamples,
    IndexedDataset,
    IndexedDatasetError,
    write_indexed_dataset,
)

DOCS = [np.array([5, 6, 7]), np.array([], np.int64), np.array([8, 9]), np.arange(10, 17)]


# --- synthetic language and batches --------------------------------------------------------------
def test_bigram_sequences_are_seeded_and_follow_the_table():
    a = data.bigram_sequences(50, 64, 40, seed=3, language_seed=7)
    assert a.shape == (64, 40) and a.dtype == np.int32 and 0 <= a.min() and a.max() < 50
    assert np.array_equal(a, data.bigram_sequences(50, 64, 40, seed=3, language_seed=7))
    assert not np.array_equal(a, data.bigram_sequences(50, 64, 40, seed=4, language_seed=7))
    table = data.bigram_table(50, 7)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    # Most transitions go to one of the BRANCHING likely successors of each token.
    likely = np.argsort(table, axis=1)[:, -data.BRANCHING :]
    hits = (likely[a[:, :-1]] == a[:, 1:, None]).any(-1)
    assert hits.mean() > 0.95


def test_bigram_sequences_draw_from_the_dense_table():
    # Transition frequencies over many draws match the dense table's probabilities.
    vocab = 12
    tokens = data.bigram_sequences(vocab, 400, 200, seed=0, language_seed=5)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens[:, :-1].ravel(), tokens[:, 1:].ravel()), 1)
    frequencies = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(frequencies, data.bigram_table(vocab, 5), atol=0.02)
    successors, probabilities = data.bigram_successors(vocab, 5)
    assert np.array_equal(data.bigram_table(vocab, 5).argmax(axis=1), successors[:, 0])
    np.testing.assert_allclose(probabilities.sum(), 1.0)


def test_bigram_sequences_of_a_large_vocabulary_need_no_dense_table():
    # A dense (V, V) table of GPT-3's vocabulary is 20 GB; 4,000 tokens would take 128 MB.
    tracemalloc.start()
    try:
        tokens = data.bigram_sequences(4000, 4, 64, seed=0, language_seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens.shape == (4, 64) and tokens.max() < 4000
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_split_tokens_shifts_by_one():
    tokens = np.arange(12, dtype=np.int64).reshape(2, 6)
    batch = data.split_tokens(tokens)
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32
    assert np.array_equal(batch["input_ids"], tokens[:, :-1])
    assert np.array_equal(batch["labels"], tokens[:, 1:])
    for bad in (np.arange(5), np.zeros((2, 1))):
        with pytest.raises(ValueError, match="samples must be"):
            data.split_tokens(bad)


def test_token_cross_entropy_is_float64_and_skips_ignored_labels():
    rng = np.random.default_rng(0)
    logits = (30 * rng.standard_normal((3, 5, 11))).astype(np.float32)  # large: needs max-shift
    labels = rng.integers(0, 11, (3, 5))
    labels[0, 1] = labels[2, 4] = data.IGNORE_INDEX
    total, count = data.token_cross_entropy(logits, labels)
    want = 0.0
    for b, t in zip(*np.nonzero(labels != data.IGNORE_INDEX), strict=True):
        row = logits[b, t].astype(np.float64)
        want += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[labels[b, t]]
    assert count == 13 and abs(total - want) <= 1e-9 * abs(want)


# --- Megatron-LM indexed datasets -----------------------------------------------------------------
def test_reads_a_file_written_by_hand(tmp_path):
    """The byte layout of Megatron's MMapIndexedDataset, spelled out with struct."""
    docs = [[1, 2, 3], [40000, 5], [6]]
    (tmp_path / "c4.bin").write_bytes(struct.pack("<6H", 1, 2, 3, 40000, 5, 6))
    index = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 4)  # version 1, uint16
    index += (
        struct.pack("<3i", 3, 2, 1) + struct.pack("<3q", 0, 6, 10) + struct.pack("<4q", 0, 1, 2, 3)
    )
    (tmp_path / "c4.idx").write_bytes(index)
    ds = IndexedDataset(tmp_path / "c4")
    assert len(ds) == 3 and ds.dtype == np.uint16 and ds.num_tokens == 6
    assert [ds[i].tolist() for i in range(3)] == docs and ds[-1].tolist() == [6]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]
    # Our writer produces exactly those bytes.
    write_indexed_dataset(tmp_path / "ours", docs, np.uint16)
    assert (tmp_path / "ours.idx").read_bytes() == index
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "c4.bin").read_bytes()


@pytest.mark.parametrize("dtype", sorted(set(data.DTYPE_CODES.values()), key=str))
def test_writer_roundtrips_every_dtype(tmp_path, dtype):
    write_indexed_dataset(tmp_path / "d", DOCS, dtype)
    ds = IndexedDataset(str(tmp_path / "d.idx"))  # a prefix with an extension works too
    code = struct.unpack("<B", (tmp_path / "d.idx").read_bytes()[17:18])[0]
    assert data.DTYPE_CODES[code] == dtype and ds.dtype == dtype
    assert [ds[i].tolist() for i in range(len(ds))] == [d.tolist() for d in DOCS]
    assert not ds[0].flags.writeable  # a view of the mapped file
    with pytest.raises(IndexError):
        ds[4]


def test_writer_refuses_what_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit uint8"):
        write_indexed_dataset(tmp_path / "d", [np.array([1, 300])], np.uint8)
    with pytest.raises(ValueError, match="no Megatron code"):
        write_indexed_dataset(tmp_path / "d", DOCS, np.uint32)
    with pytest.raises(ValueError, match="1-D"):
        write_indexed_dataset(tmp_path / "d", [np.zeros((2, 2))], np.int32)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_an_empty_dataset_reads(tmp_path):
    write_indexed_dataset(tmp_path / "e", [], np.int32)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_tokens == 0
    with pytest.raises(ValueError, match="fewer than one sample"):
        GptSamples(ds, 4)


def _corrupt(path, kind):
    idx, bin_ = path.with_suffix(".idx"), path.with_suffix(".bin")
    raw = bytearray(idx.read_bytes())
    if kind == "magic":
        raw[:9] = b"TNTIDX\x00\x00\x00"  # Megatron's older "lazy" format
    elif kind == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif kind == "dtype":
        raw[17] = 9
    elif kind == "short index":
        raw = raw[:-5]
    elif kind == "header":
        raw = raw[:20]
    elif kind == "short bin":
        bin_.write_bytes(bin_.read_bytes()[:-1])
    elif kind == "no bin":
        bin_.unlink()
    elif kind == "no idx":
        idx.unlink()
    if kind not in ("short bin", "no bin", "no idx"):
        idx.write_bytes(bytes(raw))
    return bin_ if kind in ("short bin", "no bin") else idx


@pytest.mark.parametrize(
    "kind, message",
    [
        ("magic", "not a Megatron-LM indexed dataset"),
        ("version", "index version 2"),
        ("dtype", "dtype code 9"),
        ("short index", "is truncated"),
        ("header", "no full header"),
        ("short bin", "shorter than its index says"),
        ("no bin", "does not exist, but its index"),
        ("no idx", "does not exist; pass"),
    ],
)
def test_corrupt_files_are_one_clear_error_naming_the_file(tmp_path, kind, message):
    write_indexed_dataset(tmp_path / "d", DOCS, np.int32)
    bad = _corrupt(tmp_path / "d", kind)
    with pytest.raises(IndexedDatasetError, match=message) as err:
        IndexedDataset(tmp_path / "d")
    assert str(bad) in str(err.value)


# --- GPT samples --------------------------------------------------------------------------------
def test_samples_are_megatrons_overlapping_windows(tmp_path):
    write_indexed_dataset(tmp_path / "d", DOCS, np.uint16)
    stream = np.concatenate(DOCS)  # 5..16, 12 tokens
    samples = GptSamples(IndexedDataset(tmp_path / "d"), seq_len=3)
    assert len(samples) == (12 - 1) // 3 == 3
    for k in range(3):  # consecutive samples share one boundary token; documents are crossed
        assert samples[k].tolist() == stream[3 * k : 3 * k + 4].tolist()
    assert samples[0][-1] == samples[1][0]
    batches = list(samples.batches(2))
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 3)]
    assert batches[0]["input_ids"].dtype == batches[0]["labels"].dtype == np.int32
    assert batches[0]["labels"].tolist() == [[6, 7, 8], [9, 10, 11]]
    assert len(list(samples.batches(2, drop_last=True))) == 1


def test_shuffle_is_seeded_and_a_permutation(tmp_path):
    docs = [np.arange(i * 100, i * 100 + 37) for i in range(5)]
    write_indexed_dataset(tmp_path / "d", docs, np.int32)
    ds = IndexedDataset(tmp_path / "d")
    plain, a, b = GptSamples(ds, 8), GptSamples(ds, 8, seed=1), GptSamples(ds, 8, seed=1)
    assert len(plain) == (5 * 37 - 1) // 8
    assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]
    assert sorted(a[i].tolist() for i in range(len(a))) == sorted(
        plain[i].tolist() for i in range(len(plain))
    )
    assert a.order.tolist() != plain.order.tolist()
    assert GptSamples(ds, 8, seed=2).order.tolist() != a.order.tolist()
