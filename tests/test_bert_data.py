"""The MLPerf BERT HDF5 reader, on small shards the tests write; masked-LM accuracy."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.requires("tf")  # h5py

import h5py  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor.workloads.bert import data  # noqa: E402
from mlperf_tutor.workloads.bert.data import DataError, HDF5Shards  # noqa: E402

wl = mt.workloads.get("bert")
CFG = wl.config("tiny")  # S = 32, P = 5
SIZES = (5, 7, 4)  # rows per shard: batches of 3 must cross shard boundaries


@pytest.fixture
def shards(tmp_path):
    """Three shards of synthetic rows; next_sentence_labels is replaced by a row id (0..15)."""
    start = 0
    for i, n in enumerate(SIZES):
        batch = wl.synthetic_batch(CFG, batch_size=n, seed=i)
        batch["next_sentence_labels"] = np.arange(start, start + n, dtype=np.int32)
        data.write_shard(tmp_path / f"part_{i:05d}_of_{len(SIZES):05d}.hdf5", batch)
        start += n
    return tmp_path


def tagged(source, **kwargs) -> HDF5Shards:
    """The fixture's shards, whose next_sentence_labels (row ids) are outside {0, 1}: read
    with the value checks off."""
    return HDF5Shards(source, validate=False, **kwargs)


def row_ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["next_sentence_labels"]]


def test_write_and_read_back_with_reference_dtypes(tmp_path):
    batch = wl.synthetic_batch(CFG, batch_size=4, seed=0)
    data.write_shard(tmp_path / "s.hdf5", batch)
    assert [p.name for p in tmp_path.iterdir()] == ["s.hdf5"]  # no temporary left
    with h5py.File(tmp_path / "s.hdf5") as f:
        assert {k: f[k].dtype.str[1:] for k in f} == {
            "input_ids": "i4",
            "input_mask": "i1",
            "segment_ids": "i1",
            "masked_lm_positions": "i4",
            "masked_lm_ids": "i4",
            "next_sentence_labels": "i1",
        }
    [got] = HDF5Shards(tmp_path / "s.hdf5").batches(4, shuffle=False)
    for key, value in batch.items():
        assert got[key].dtype == value.dtype == np.int32 and np.array_equal(got[key], value), key


def test_batches_match_synthetic_batch_keys_shapes_and_dtypes(shards):
    reader = tagged(shards, seq_len=CFG.seq_len, max_predictions=CFG.max_predictions)
    assert (reader.num_rows, reader.seq_len, reader.max_predictions) == (16, 32, 5)
    synthetic = wl.synthetic_batch(CFG, batch_size=3)
    batches = list(reader.batches(3))
    assert len(batches) == reader.num_batches(3) == 5  # 16 rows: the last one is dropped
    for batch in batches:
        assert list(batch) == list(synthetic)
        for key, value in batch.items():
            assert value.shape == synthetic[key].shape and value.dtype == synthetic[key].dtype


def test_keep_last_yields_every_row_once(shards):
    batches = list(tagged(shards).batches(3, drop_last=False))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 3, 3, 3, 1]
    assert sorted(row_ids(batches)) == list(range(16))
    assert tagged(shards).num_batches(3, drop_last=False) == 6


def test_shuffling_is_determined_by_seed_and_epoch(shards):
    reader = tagged(shards)
    order = row_ids(reader.batches(2, seed=7))
    assert order == row_ids(reader.batches(2, seed=7))
    assert order != row_ids(reader.batches(2, seed=8))
    assert order != row_ids(reader.batches(2, seed=7, epoch=1))
    assert order != list(range(16)) and sorted(order) == list(range(16))
    # Rows travel whole: each row's tokens still belong to its id.
    [everything] = reader.batches(16, shuffle=False)
    for batch in reader.batches(2, seed=7):
        assert np.array_equal(
            everything["input_ids"][batch["next_sentence_labels"]], batch["input_ids"]
        )


def test_no_shuffle_reads_the_files_in_order(shards):
    # Evaluation: every row, in file order; a directory is read in sorted name order.
    in_order = tagged(shards).batches(4, shuffle=False, drop_last=False)
    assert row_ids(in_order) == list(range(16))
    paths = sorted(shards.iterdir())[::-1]  # a list is read in the order given
    got = row_ids(tagged(paths).batches(16, shuffle=False, drop_last=False))
    assert got == [*range(12, 16), *range(5, 12), *range(5)]


def _rewrite(path, **changes):
    """Rewrite an HDF5 shard with some datasets replaced (None: removed)."""
    with h5py.File(path, "r") as f:
        content = {k: f[k][()] for k in f}
    path.unlink()
    with h5py.File(path, "w") as f:
        for key, value in {**content, **changes}.items():
            if isinstance(value, tuple):  # (dtype, rows): variable-length rows
                rows = np.empty(len(value[1]), object)
                rows[:] = value[1]
                f.create_dataset(key, data=rows, dtype=h5py.vlen_dtype(value[0]))
            elif value is not None:
                f.create_dataset(key, data=value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"masked_lm_ids": None}, r"has no dataset\(s\) \['masked_lm_ids'\]"),
        ({"masked_lm_ids": np.zeros((4, 6), np.int32)}, r"'masked_lm_ids' has shape \(4, 6\)"),
        ({"next_sentence_labels": np.zeros((4, 1), np.int8)}, r"'next_sentence_labels' has shape"),
        ({"input_mask": np.zeros((3, 32), np.int8)}, r"'input_mask' has shape \(3, 32\)"),
        ({"input_ids": np.zeros((4, 32), np.float32)}, r"'input_ids' has dtype float32"),
        (
            {"input_ids": (np.int16, [np.arange(n, dtype=np.int16) for n in (3, 5, 2, 4)])},
            "variable-length rows",
        ),
        ({"packed_input_len": np.zeros(4, np.int16)}, "packed shard"),
    ],
    ids=["missing", "P", "labels-2d", "rows", "float", "varlength", "packed"],
)
def test_bad_shard_is_one_clear_error_naming_file_and_key(tmp_path, changes, message):
    path = tmp_path / "bad.hdf5"
    data.write_shard(path, wl.synthetic_batch(CFG, batch_size=4))
    _rewrite(path, **changes)
    with pytest.raises(DataError, match=message) as info:
        HDF5Shards(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_files_that_are_not_shards(tmp_path):
    (tmp_path / "garbage.hdf5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match="garbage.hdf5 is not an HDF5 file"):
        HDF5Shards(tmp_path / "garbage.hdf5")
    data.write_shard(tmp_path / "cut.hdf5", wl.synthetic_batch(CFG, batch_size=8))
    whole = (tmp_path / "cut.hdf5").read_bytes()
    (tmp_path / "cut.hdf5").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cut.hdf5 cannot be read .* truncated or corrupt"):
        HDF5Shards(tmp_path / "cut.hdf5")
    with pytest.raises(DataError, match="nope.hdf5 does not exist"):
        HDF5Shards(tmp_path / "nope.hdf5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .hdf5 or .h5 files"):
        HDF5Shards(tmp_path / "empty")


def test_sequence_length_must_agree(shards, tmp_path):
    with pytest.raises(DataError, match=r"'input_ids' has shape \(5, 32\), expected \(N, S=128\)"):
        HDF5Shards(shards, seq_len=128)
    longer = wl.config("tiny", seq_len=48, max_positions=64)
    data.write_shard(shards / "part_00009.hdf5", wl.synthetic_batch(longer, batch_size=2))
    with pytest.raises(DataError, match=r"part_00009.hdf5: 'input_ids' has shape \(2, 48\)"):
        HDF5Shards(shards)


def test_write_shard_refuses_an_incomplete_batch(tmp_path):
    batch = wl.synthetic_batch(CFG, batch_size=2)
    del batch["segment_ids"]
    with pytest.raises(DataError, match=r"has no \['segment_ids'\]"):
        data.write_shard(tmp_path / "s.hdf5", batch)
    batch = wl.synthetic_batch(CFG, batch_size=2)
    batch["next_sentence_labels"] = np.zeros(3, np.int32)
    with pytest.raises(DataError, match="'next_sentence_labels' has shape"):
        data.write_shard(tmp_path / "s.hdf5", batch)
    assert list(tmp_path.iterdir()) == []


def test_masked_lm_accuracy_counts_only_real_positions():
    batch = {
        "masked_lm_positions": np.array([[3, 7, 0], [2, 0, 0]], np.int32),
        "masked_lm_ids": np.array([[1, 4, 0], [2, 0, 0]], np.int32),
    }
    logits = np.zeros((2, 3, 5), np.float32)
    logits[0, 0, 1] = logits[0, 1, 0] = logits[1, 0, 2] = 1.0  # right, wrong, right
    logits[:, :, 0] += np.array([[0, 0, 9], [0, 9, 9]])  # padding "predicts" its id 0
    assert data.masked_lm_counts(logits, batch) == (2, 3)
    assert data.masked_lm_accuracy(logits, batch) == pytest.approx(2 / 3)
    assert data.TARGET_MLM_ACCURACY == 0.720


def test_masked_lm_accuracy_refuses_bad_input():
    batch = {"masked_lm_positions": np.zeros((2, 3), np.int32), "masked_lm_ids": np.zeros((2, 3))}
    with pytest.raises(ValueError, match="no masked positions"):
        data.masked_lm_accuracy(np.zeros((2, 3, 5)), batch)
    with pytest.raises(ValueError, match=r"mlm_logits has shape \(2, 5\)"):
        data.masked_lm_accuracy(np.zeros((2, 5)), batch)


@pytest.mark.requires("torch")
def test_accuracy_of_a_model_on_shards(shards):
    # The pieces fit: reader batches into a model, its logits into the metric.
    model = wl.build("torch", CFG)
    correct = total = 0
    for batch in tagged(shards).batches(4, shuffle=False, drop_last=False):
        batch["next_sentence_labels"] %= 2  # the fixture put row ids there
        c, t = data.masked_lm_counts(wl.forward("torch", model, batch)["mlm_logits"], batch)
        correct, total = correct + c, total + t
    assert 0 <= correct <= total and total > 16
