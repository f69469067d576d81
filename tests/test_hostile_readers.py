"""Hostile data files: every reader refuses a value a model cannot take, naming the file, the row
and the field, and ``validate=False`` is the one, explicit, way to skip those checks.

Each case writes a small dataset with the package's own writer, then plants one bad value: by
patching the written file in place (h5py ``r+``, ``np.load(mmap_mode="r+")``, the bytes of a
Megatron ``.bin``) or, where the writer does not range-check (it has no config), by writing the
value itself. The expected row, field and value are the planted ones, never read back from the
reader. Then: the HDF5 shards that would read another file of the machine (external storage,
virtual datasets, soft and external links) are refused before any data is read; a FIFO where a
data file is expected is refused at once (each such case runs under a watchdog that ends the
run with a traceback instead of hanging); ids that do not fit int32 are refused, never wrapped;
and the models refuse an out-of-range id with the same error and message in torch, JAX and TF.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.core.batch import BatchError

FIFO_SECONDS = 30  # a reader blocked on a FIFO ends the test process after this, with a traceback


@contextlib.contextmanager
def bounded(seconds: float = FIFO_SECONDS):
    """Run the block under a watchdog: a hang (a read blocked on a FIFO, also inside C code)
    ends the process with every thread's traceback instead of stalling the suite."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def fifo(path):
    os.mkfifo(path)
    return path


def assert_names(message: str, *parts) -> None:
    """The message is one line and names every part (the file, the row, the field, the value)."""
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, (part, message)


# --- BERT: HDF5 shards ---------------------------------------------------------------------------
BERT = workloads.get("bert")
BERT_CFG = BERT.config("tiny")  # S = 32, P = 5, V = 96
S, P, V = BERT_CFG.seq_len, BERT_CFG.max_predictions, BERT_CFG.vocab_size


def bert_shard(directory, rows: int = 4):
    from mlperf_tutor.workloads.bert.data import write_shard

    path = directory / "part_00000_of_00001.hdf5"
    write_shard(path, BERT.synthetic_batch(BERT_CFG, rows, seed=0))
    return path


def read_bert(path, vocab_size=V, **kwargs) -> list[dict[str, np.ndarray]]:
    from mlperf_tutor.workloads.bert.data import HDF5Shards

    shards = HDF5Shards(path, S, P, vocab_size=vocab_size, **kwargs)
    return list(shards.batches(64, shuffle=False, drop_last=False))


# (dataset, row, column or None, planted value): each outside the dataset's range.
BERT_PLANTS = [
    ("input_ids", 2, 7, V),
    ("input_ids", 1, 3, -1),
    ("masked_lm_ids", 3, 0, V + 5),
    ("segment_ids", 0, 5, 2),
    ("input_mask", 2, 1, -1),
    ("masked_lm_positions", 1, 2, S),
    ("next_sentence_labels", 3, None, 2),
]


@pytest.mark.requires("tf")  # h5py
@pytest.mark.parametrize("key, row, column, value", BERT_PLANTS)
def test_bert_refuses_a_planted_value_unless_validate_is_off(tmp_path, key, row, column, value):
    import h5py

    from mlperf_tutor.workloads.bert.data import DataError

    path = bert_shard(tmp_path)
    where = row if column is None else (row, column)
    with h5py.File(path, "r+") as f:
        f[key][where] = value
    with pytest.raises(DataError) as error:
        read_bert(path)
    assert_names(str(error.value), path, repr(key), f"row {row}", value)
    [batch] = read_bert(path, validate=False)
    assert batch[key][where] == value


@pytest.mark.requires("tf")
def test_bert_refuses_ids_that_do_not_fit_int32_even_unvalidated(tmp_path):
    import h5py

    from mlperf_tutor.workloads.bert.data import DataError

    path = bert_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        ids = f["input_ids"][()].astype(np.int64)
        ids[1, 4] = 2**40  # int32 would make it 0
        del f["input_ids"]
        f.create_dataset("input_ids", data=ids)
    for kwargs in ({}, {"validate": False}, {"validate": False, "vocab_size": None}):
        with pytest.raises(DataError) as error:
            read_bert(path, **kwargs)
        assert_names(str(error.value), path, "'input_ids'", "row 1", 2**40)


def _secret(directory, values) -> tuple[str, np.ndarray]:
    """A file outside the shard holding int32 ``values``: what a hostile shard would pull in."""
    values = np.asarray(values, "<i4")
    path = directory / "secret.bin"
    path.write_bytes(values.tobytes())
    return str(path), values


def _external_storage(f, key, shape, directory, on_fifo=False):
    count = int(np.prod(shape))
    name = str(fifo(directory / "pipe")) if on_fifo else _secret(directory, range(count))[0]
    f.create_dataset(key, shape=shape, dtype="<i4", external=[(name, 0, 4 * count)])


def _virtual(f, key, shape, directory, on_fifo=False):
    import h5py

    if on_fifo:
        source = str(fifo(directory / "pipe"))
    else:
        source = str(directory / "other.h5")
        with h5py.File(source, "w") as other:
            other.create_dataset("d", data=np.arange(np.prod(shape), dtype="<i4").reshape(shape))
    layout = h5py.VirtualLayout(shape=shape, dtype="<i4")
    layout[:] = h5py.VirtualSource(source, "d", shape=shape)
    f.create_virtual_dataset(key, layout)


def _soft_link(f, key, shape, directory, on_fifo=False):
    import h5py

    f.create_dataset("elsewhere", data=np.zeros(shape, "<i4"))
    f[key] = h5py.SoftLink("/elsewhere")


def _external_link(f, key, shape, directory, on_fifo=False):
    import h5py

    if on_fifo:
        target = str(fifo(directory / "pipe"))
    else:
        target = str(directory / "other.h5")
        with h5py.File(target, "w") as other:
            other.create_dataset("d", data=np.zeros(shape, "<i4"))
    f[key] = h5py.ExternalLink(target, "/d")


STORAGE = {
    "external storage": (_external_storage, "external files"),
    "virtual dataset": (_virtual, "virtual dataset"),
    "soft link": (_soft_link, "soft link"),
    "external link": (_external_link, "external link"),
}
# Each kind reading a file, and (but the soft link, which stays inside the shard) a FIFO.
STORAGE_CASES = [
    pytest.param(kind, on_fifo, id=f"{kind}-{'fifo' if on_fifo else 'file'}")
    for kind in STORAGE
    for on_fifo in (False, True)
    if not (kind == "soft link" and on_fifo)
]


@pytest.mark.requires("tf")
@pytest.mark.parametrize("kind, on_fifo", STORAGE_CASES)
def test_bert_refuses_data_stored_outside_the_shard_before_reading_it(tmp_path, kind, on_fifo):
    # On a FIFO, any read of the data would block: the refusal comes before one.
    import h5py

    from mlperf_tutor.workloads.bert.data import DataError, HDF5Shards

    make, words = STORAGE[kind]
    path = bert_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        shape = f["input_ids"].shape
        del f["input_ids"]
        make(f, "input_ids", shape, tmp_path, on_fifo)
    with bounded(), pytest.raises(DataError) as error:
        HDF5Shards(path)
    assert_names(str(error.value), path, "'input_ids'", words)


@pytest.mark.requires("tf")
def test_bert_refuses_a_shard_declaring_more_data_than_it_holds(tmp_path):
    # Chunked datasets never written: a few kB on disk that h5py would read back as ~10 GB.
    import h5py

    from mlperf_tutor.workloads.bert.data import _DISK_DTYPES, DataError, HDF5Shards

    path = tmp_path / "huge.hdf5"
    rows = 50_000_000
    widths = {"masked_lm_positions": P, "masked_lm_ids": P, "next_sentence_labels": None}
    with h5py.File(path, "w") as f:
        for key, dtype in _DISK_DTYPES.items():
            width = widths.get(key, S)
            shape = (rows,) if width is None else (rows, width)
            f.create_dataset(key, shape=shape, dtype=dtype, chunks=(1000, *shape[1:]))
    assert path.stat().st_size < 2**20
    with pytest.raises(DataError) as error:
        HDF5Shards(path)
    assert_names(str(error.value), path, "declare", "bytes")


@pytest.mark.requires("tf")
def test_the_planted_external_storage_really_reads_another_file(tmp_path):
    # What the refusal prevents: h5py itself returns the other file's bytes as token ids.
    import h5py

    path = bert_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        shape = f["input_ids"].shape
        del f["input_ids"]
        _external_storage(f, "input_ids", shape, tmp_path)
    secret = np.frombuffer((tmp_path / "secret.bin").read_bytes(), "<i4")
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["input_ids"][()].reshape(-1), secret)


@pytest.mark.requires("tf")
def test_bert_refuses_a_fifo_and_wraps_h5py_errors(tmp_path):
    import h5py

    from mlperf_tutor.workloads.bert.data import DataError, HDF5Shards

    pipe = fifo(tmp_path / "part_00001_of_00002.hdf5")
    with bounded(), pytest.raises(DataError) as error:
        HDF5Shards(pipe)
    assert_names(str(error.value), pipe, "FIFO")
    with bounded(), pytest.raises(DataError, match="FIFO"):
        HDF5Shards(tmp_path)  # the directory's shards include the FIFO
    # A compressed chunk whose bytes are garbage: h5py's OSError comes out as a DataError.
    pipe.unlink()
    path = bert_shard(tmp_path)
    with h5py.File(path, "r+") as f:
        ids = f["input_ids"][()]
        del f["input_ids"]
        f.create_dataset("input_ids", data=ids, chunks=ids.shape, compression="gzip")
        chunk = f["input_ids"].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)
    with pytest.raises(DataError) as error:
        read_bert(path)
    assert_names(str(error.value), path, "cannot be read")
    with h5py.File(path, "r+") as f:  # a group where a dataset belongs
        del f["input_ids"]
        f.create_group("input_ids")
    with pytest.raises(DataError) as error:
        read_bert(path)
    assert_names(str(error.value), path, "'input_ids' is not a dataset")


# --- GPT: Megatron indexed datasets --------------------------------------------------------------
GPT = workloads.get("gpt3")
GPT_V = GPT.config("tiny").vocab_size  # 90
DOCS = [np.arange(10 * d, 10 * d + 12) % GPT_V for d in range(4)]  # 4 documents of 12 tokens
T = 8  # tokens per sample


def gpt_prefix(directory, dtype=np.uint16, plant: tuple[int, int, int] | None = None):
    """Write DOCS with the package's writer; ``plant`` = (document, token, value) patches the
    .bin file's bytes of that token (at (12 * document + token) * itemsize)."""
    from mlperf_tutor.workloads.gpt.data import write_indexed_dataset

    prefix = directory / "c4_text_document"
    write_indexed_dataset(prefix, DOCS, dtype)
    if plant is not None:
        doc, token, value = plant
        itemsize = np.dtype(dtype).itemsize
        with open(prefix.with_suffix(".bin"), "r+b") as f:
            f.seek((12 * doc + token) * itemsize)
            f.write(np.array([value], np.dtype(dtype).newbyteorder("<")).tobytes())
    return prefix


def read_gpt(prefix, vocab_size=GPT_V, **kwargs) -> list[dict[str, np.ndarray]]:
    from mlperf_tutor.workloads.gpt.data import GptSamples, IndexedDataset

    samples = GptSamples(IndexedDataset(prefix), T, vocab_size=vocab_size, **kwargs)
    return list(samples.batches(2))


@pytest.mark.parametrize(
    "dtype, doc, token, value",
    [(np.uint16, 2, 5, GPT_V), (np.uint16, 0, 0, 65535), (np.int32, 3, 2, -1)],
)
def test_gpt_refuses_a_planted_token_unless_validate_is_off(tmp_path, dtype, doc, token, value):
    from mlperf_tutor.workloads.gpt.data import IndexedDatasetError

    prefix = gpt_prefix(tmp_path, dtype, (doc, token, value))
    with pytest.raises(IndexedDatasetError) as error:
        read_gpt(prefix)
    data = prefix.with_suffix(".bin")
    assert_names(str(error.value), data, f"sequence {doc}", f"token {token}", value)
    batches = read_gpt(prefix, validate=False)
    assert any((b[k] == value).any() for b in batches for k in ("input_ids", "labels"))


@pytest.mark.parametrize(
    "kwargs", [{}, {"validate": False}, {"validate": False, "vocab_size": None}]
)
def test_gpt_refuses_tokens_that_do_not_fit_int32_even_unvalidated(tmp_path, kwargs):
    from mlperf_tutor.workloads.gpt.data import IndexedDatasetError

    prefix = gpt_prefix(tmp_path, np.int64, (1, 3, 2**40))  # int32 would make it 0
    with pytest.raises(IndexedDatasetError) as error:
        read_gpt(prefix, **kwargs)
    assert_names(str(error.value), prefix.with_suffix(".bin"), "sequence 1", "token 3", 2**40)


def test_gpt_refuses_float_tokens_and_pointers_past_the_end(tmp_path):
    from mlperf_tutor.workloads.gpt.data import _HEADER, IndexedDatasetError

    (tmp_path / "floats").mkdir()
    with pytest.raises(IndexedDatasetError) as error:
        read_gpt(gpt_prefix(tmp_path / "floats", np.float32))
    assert_names(str(error.value), tmp_path / "floats", "float32", "token ids (integers)")
    prefix = gpt_prefix(tmp_path)
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    pointer = _HEADER.size + 4 * len(DOCS) + 8 * 2  # the third sequence's byte pointer
    raw[pointer : pointer + 8] = (2**63 - 1).to_bytes(8, "little")  # + its size overflows int64
    idx.write_bytes(bytes(raw))
    with pytest.raises(IndexedDatasetError) as error:
        read_gpt(prefix)
    assert_names(str(error.value), idx, "sequence 2", "past the end")


@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_gpt_refuses_a_fifo(tmp_path, suffix):
    from mlperf_tutor.workloads.gpt.data import IndexedDataset, IndexedDatasetError

    prefix = gpt_prefix(tmp_path)
    prefix.with_suffix(suffix).unlink()
    pipe = fifo(prefix.with_suffix(suffix))
    with bounded(), pytest.raises(IndexedDatasetError) as error:
        IndexedDataset(prefix)
    assert_names(str(error.value), pipe, "FIFO")


# --- DLRM: Criteo multi-hot days -----------------------------------------------------------------
DLRM = workloads.get("dlrm_dcnv2")
DLRM_CFG = DLRM.config("tiny")
BAGS = np.concatenate([[0], np.cumsum(DLRM_CFG.multi_hot_sizes)])  # feature f: BAGS[f]:BAGS[f+1]
ROWS = 8


def dlrm_day(directory, change=None):
    """Day 0 of ROWS synthetic samples through the package's writer, after ``change(batch)``."""
    from mlperf_tutor.workloads.dlrm.data import day_paths, write_criteo_multi_hot

    batch = DLRM.synthetic_batch(DLRM_CFG, ROWS, seed=0)
    if change is not None:
        change(batch)
    write_criteo_multi_hot(directory, 0, batch, DLRM_CFG.multi_hot_sizes)
    return day_paths(directory, 0)


def read_dlrm(directory, **kwargs) -> dict[str, np.ndarray]:
    from mlperf_tutor.workloads.dlrm.data import CriteoMultiHot

    return CriteoMultiHot(directory, [0], DLRM_CFG, **kwargs).read(0, ROWS)


def _set(key, where, value):
    def change(batch):
        batch[key][where] = value

    return change


@pytest.mark.parametrize(
    "feature, row, value",
    [(4, 3, DLRM_CFG.table_sizes[4]), (20, 6, -1), (0, 0, 2**31 - 1)],
)
def test_dlrm_refuses_an_index_outside_its_table_unless_validate_is_off(
    tmp_path, feature, row, value
):
    from mlperf_tutor.workloads.dlrm.data import DataError

    column = int(BAGS[feature]) + 1 if DLRM_CFG.multi_hot_sizes[feature] > 1 else int(BAGS[feature])
    paths = dlrm_day(tmp_path, _set("sparse", (row, column), value))
    with pytest.raises(DataError) as error:
        read_dlrm(tmp_path)
    assert_names(str(error.value), paths["sparse"], f"feature '{feature}'", f"row {row}", value)
    assert read_dlrm(tmp_path, validate=False)["sparse"][row, column] == value


@pytest.mark.parametrize(
    "file, plant, named",
    [
        ("labels", (5, 0, 2), "row 5"),
        ("labels", (1, 0, -1), "row 1"),
        ("dense", (2, 7, np.nan), "row 2, dense feature 7"),
        ("dense", (6, 0, -np.inf), "row 6, dense feature 0"),
    ],
)
def test_dlrm_refuses_labels_and_dense_values_unless_validate_is_off(tmp_path, file, plant, named):
    from mlperf_tutor.workloads.dlrm.data import DataError

    paths = dlrm_day(tmp_path)
    row, column, value = plant
    stored = np.load(paths[file], mmap_mode="r+")  # patch the written file in place
    stored[row, column] = value
    stored.flush()
    del stored
    with pytest.raises(DataError) as error:
        read_dlrm(tmp_path)
    assert_names(str(error.value), paths[file], named, value)
    got = read_dlrm(tmp_path, validate=False)[file]
    got = got[row] if file == "labels" else got[row, column]
    assert got == value or (np.isnan(value) and np.isnan(got))


@pytest.mark.parametrize(
    "file, array, named",
    [
        # float64 beyond float32's range: inf once cast for the batch.
        ("dense", lambda n: np.where(np.arange(n * 13).reshape(n, 13) == 30, 1e300, 1.0), "row 2"),
        ("labels", lambda n: np.where(np.arange(n)[:, None] == 4, 2**40, 1), "row 4"),  # int64
    ],
)
def test_dlrm_refuses_values_the_float32_batch_cannot_hold(tmp_path, file, array, named):
    from mlperf_tutor.workloads.dlrm.data import DataError

    paths = dlrm_day(tmp_path)
    np.save(paths[file], array(ROWS))  # the file replaced by one of a wider dtype
    with pytest.raises(DataError) as error:
        read_dlrm(tmp_path)
    assert_names(str(error.value), paths[file], named)


def test_dlrm_refuses_a_fifo(tmp_path):
    from mlperf_tutor.workloads.dlrm.data import DataError

    paths = dlrm_day(tmp_path)
    paths["labels"].unlink()
    fifo(paths["labels"])
    with bounded(), pytest.raises(DataError) as error:
        read_dlrm(tmp_path)
    assert_names(str(error.value), paths["labels"], "FIFO")


# --- Llama: GovReport parquet --------------------------------------------------------------------
LLAMA = workloads.get("llama2_70b_lora")
LLAMA_CFG = LLAMA.config("tiny")  # V = 32, T = 64


def govreport(directory, change=None):
    """``train-00000-of-00001.parquet`` of 6 synthetic rows through the package's writer (which
    does not range-check: it has no config), after ``change(batch)``."""
    from mlperf_tutor.workloads.llama.data import COLUMNS, write_govreport

    batch = LLAMA.synthetic_batch(LLAMA_CFG, 6, seed=0)
    if change is not None:
        change(batch)
    path = directory / "train-00000-of-00001.parquet"
    write_govreport(path, ({c: batch[c][i] for c in COLUMNS} for i in range(6)))
    return path


def read_govreport(directory, **kwargs) -> dict[str, np.ndarray]:
    from mlperf_tutor.workloads.llama.data import GovReport

    split = GovReport(directory, max_seq_len=LLAMA_CFG.seq_len, vocab_size=32, **kwargs)
    return split.batch(range(len(split)))


def _both(where, value):
    """Input id and its label both ``value`` (labels follow the ids, as the reader wants)."""

    def change(batch):
        batch["input_ids"][where] = value
        batch["labels"][where] = value

    return change


@pytest.mark.requires("data")
@pytest.mark.parametrize(
    "change, key, where, value, named",
    [
        (_both((2, 60), 32), "input_ids", (2, 60), 32, "input id"),
        (_both((4, 1), -1), "input_ids", (4, 1), -1, "input id"),
        (_set("attention_mask", (1, 9), 2), "attention_mask", (1, 9), 2, "attention_mask"),
        (_set("labels", (5, 63), 7), "labels", (5, 63), 7, "label"),
    ],
)
def test_govreport_refuses_a_planted_value_unless_validate_is_off(
    tmp_path, change, key, where, value, named
):
    from mlperf_tutor.workloads.llama.data import GovReportError

    if key == "labels":  # a label that is neither -100 nor the input id at its position
        assert LLAMA.synthetic_batch(LLAMA_CFG, 6, seed=0)["input_ids"][where] != value
    path = govreport(tmp_path, change)
    with pytest.raises(GovReportError) as error:
        read_govreport(tmp_path)
    assert_names(str(error.value), path, f"row {where[0]}", named, value)
    assert read_govreport(tmp_path, validate=False)[key][where] == value


@pytest.mark.requires("data")
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("kind, big", [("int64", 2**40), ("uint64", 2**64 - 1)])
def test_govreport_refuses_ids_that_do_not_fit_int32(tmp_path, validate, kind, big):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlperf_tutor.workloads.llama.data import COLUMNS, GovReportError, write_govreport

    with pytest.raises(ValueError, match="do not fit int32"):
        write_govreport(tmp_path / "x.parquet", [{c: [1, 2**40] for c in COLUMNS}])
    rows = [[1, 2, 3], [4, big, 6]]  # wide lists: the package's writer would refuse them
    table = pa.table({c: pa.array(rows, pa.list_(getattr(pa, kind)())) for c in COLUMNS})
    pq.write_table(table, tmp_path / "train-0.parquet")
    with pytest.raises(GovReportError) as error:
        read_govreport(tmp_path, validate=validate)
    assert_names(str(error.value), tmp_path / "train-0.parquet", "row 1", big)


@pytest.mark.requires("data")
def test_govreport_refuses_a_fifo(tmp_path):
    from mlperf_tutor.workloads.llama.data import GovReportError

    govreport(tmp_path)
    pipe = fifo(tmp_path / "train-00001-of-00001.parquet")
    with bounded(), pytest.raises(GovReportError) as error:
        read_govreport(tmp_path)
    assert_names(str(error.value), pipe, "FIFO")


# --- Stable Diffusion: webdataset shards and the captions TSV ------------------------------------
SD = workloads.get("stable_diffusion")
SD_CFG = SD.config("tiny")  # C = 4, latents 8x8


def sd_shard(directory, change=None):
    """A shard of 4 samples as webdataset writes them (``<key>.npy`` and ``<key>.txt`` members of
    a plain tar: the package's writer refuses the non-finite moments planted here);
    ``change(moments)`` edits the list of moment arrays first."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    moments = [rng.standard_normal((8, 8, 8)).astype(np.float32) for _ in range(4)]
    if change is not None:
        change(moments)
    path = directory / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i, m in enumerate(moments):
            npy = io.BytesIO()
            np.save(npy, m, allow_pickle=False)
            for name, data in ((f"{i:09d}.npy", npy.getvalue()), (f"{i:09d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _nan(moments):
    moments[2][5, 1, 3] = np.nan


def _inf(moments):
    moments[1][0, 0, 0] = np.inf


def _too_large(moments):  # float64 beyond float32: inf once cast
    moments[3] = moments[3].astype(np.float64)
    moments[3][7, 7, 7] = 1e300


@pytest.mark.parametrize("change, sample", [(_nan, 2), (_inf, 1), (_too_large, 3)])
def test_sd_refuses_moments_that_are_not_finite_unless_validate_is_off(tmp_path, change, sample):
    from mlperf_tutor.workloads.stable_diffusion.data import ShardError, ShardIndex, read_shards

    path = sd_shard(tmp_path, change)
    streamed = lambda **kw: list(read_shards([path], 4, 8, **kw))  # noqa: E731
    indexed = lambda **kw: ShardIndex([path], 4, 8, **kw).read(range(4))  # noqa: E731
    for read in (streamed, indexed):
        with pytest.raises(ShardError) as error:
            read()
        assert_names(str(error.value), path, f"member {sample:09d}.npy", "NaN or infinite")
        got = read(validate=False)[sample][1]
        assert not np.isfinite(got).all()


def test_sd_refuses_a_header_announcing_a_huge_array_without_allocating_it(tmp_path):
    import io
    import tarfile

    from mlperf_tutor.workloads.stable_diffusion.data import ShardError, read_shards

    path = sd_shard(tmp_path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (8, 2**20, 2**20)}
    )
    member = header.getvalue() + b"\0" * 64  # 2**43 floats announced, 16 present
    with tarfile.open(path, "w") as tar:  # the shard rewritten with one such sample
        for name, data in (("000000000.npy", member), ("000000000.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError) as error:
        list(read_shards([path], 4))
    assert_names(str(error.value), path, "000000000.npy", "truncated")


def test_sd_refuses_a_fifo(tmp_path):
    from mlperf_tutor.workloads.stable_diffusion.data import ShardError, ShardIndex, read_shards

    pipe = fifo(tmp_path / "00001.tar")
    for read in (lambda: list(read_shards([pipe])), lambda: ShardIndex([pipe])):
        with bounded(), pytest.raises(ShardError) as error:
            read()
        assert_names(str(error.value), pipe, "FIFO")


@pytest.mark.parametrize(
    "image_id, sample_id, named",
    [("-3", "1", "image_id '-3'"), ("7", str(2**31), f"id '{2**31}'"), ("7", "9" * 5000, "id '")],
)
def test_captions_refuse_ids_out_of_range(tmp_path, image_id, sample_id, named):
    from mlperf_tutor.workloads.stable_diffusion.data import (
        CaptionsError,
        read_captions_tsv,
        write_captions_tsv,
    )

    path = tmp_path / "val2014_30k.tsv"
    write_captions_tsv(path, [(1, 2, "a dog"), (3, 4, "a cat")])
    lines = path.read_text().splitlines()
    lines[2] = f"{image_id}\t{sample_id}\ta cat"  # the file's line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CaptionsError) as error:
        read_captions_tsv(path)
    assert_names(str(error.value)[:300], path, "line 3", named)
    pipe = fifo(tmp_path / "pipe.tsv")
    with bounded(), pytest.raises(CaptionsError, match="FIFO"):
        read_captions_tsv(pipe)


# --- toy: .npy files -----------------------------------------------------------------------------
TOY = workloads.get("toy")
TOY_CFG = TOY.config("tiny")  # vocab 32, 5 classes


@pytest.mark.parametrize(
    "name, where, value, named",
    [
        ("tokens", (3, 2), TOY_CFG.vocab_size, "row 3, column 2"),
        ("tokens", (0, 5), -1, "row 0, column 5"),
        ("labels", (6,), TOY_CFG.num_classes, "row 6"),
        ("image", (4, 1, 2, 3), np.nan, "row 4"),
    ],
)
def test_toy_refuses_a_planted_value_unless_validate_is_off(tmp_path, name, where, value, named):
    from mlperf_tutor.workloads.toy.data import ToyArrays, ToyDataError, write_arrays

    write_arrays(tmp_path, TOY.synthetic_batch(TOY_CFG, 8, seed=0))
    stored = np.load(tmp_path / f"{name}.npy", mmap_mode="r+")
    stored[where] = value
    stored.flush()
    del stored
    with pytest.raises(ToyDataError) as error:
        ToyArrays(tmp_path, TOY_CFG)
    assert_names(str(error.value), tmp_path / f"{name}.npy", named)
    got = ToyArrays(tmp_path, TOY_CFG, validate=False).batch(range(8))[name][where]
    assert got == value or (np.isnan(value) and np.isnan(got))


def test_toy_refuses_a_fifo_and_writes_no_wrapped_ids(tmp_path):
    from mlperf_tutor.workloads.toy.data import ToyArrays, ToyDataError, write_arrays

    batch = TOY.synthetic_batch(TOY_CFG, 8, seed=0)
    write_arrays(tmp_path, batch)
    (tmp_path / "tokens.npy").unlink()
    pipe = fifo(tmp_path / "tokens.npy")
    with bounded(), pytest.raises(ToyDataError) as error:
        ToyArrays(tmp_path, TOY_CFG)
    assert_names(str(error.value), pipe, "FIFO")
    batch["tokens"] = batch["tokens"].astype(np.int64)
    batch["tokens"][0, 0] = 2**40  # astype(int32) would write 0
    with pytest.raises(ToyDataError, match="do not fit int32"):
        write_arrays(tmp_path / "new", batch)


# --- models: one refusal in every framework ------------------------------------------------------
FRAMEWORKS = ("torch", "jax", "tf")


@pytest.fixture(scope="module")
def models():
    """(workload name, framework) -> a tiny model built by ``Workload.build``."""
    built = {}

    def get(name: str, framework: str):
        if (name, framework) not in built:
            wl = workloads.get(name)
            built[name, framework] = wl.build(framework, wl.config("tiny"))
        return built[name, framework]

    return get


def _limit(name: str, key: str, column: int) -> int:
    """The exclusive bound of ``key``'s entry at ``column``, from the tiny config."""
    cfg = workloads.get(name).config("tiny")
    if name == "dlrm_dcnv2":
        feature = int(np.searchsorted(BAGS, column, side="right")) - 1
        return cfg.table_sizes[feature]
    return cfg.vocab_size


MODEL_IDS = [
    ("bert", "input_ids", (1, 3)),
    ("bert", "masked_lm_ids", (0, 2)),
    ("gpt3", "input_ids", (1, 100)),
    ("gpt3", "labels", (0, 7)),
    ("dlrm_dcnv2", "sparse", (1, int(BAGS[20]) + 4)),
    ("dlrm_dcnv2", "sparse", (0, 0)),
]


@pytest.mark.requires("torch", "jax", "tf")
@pytest.mark.parametrize("value", ["negative", "limit", "2**40"])
@pytest.mark.parametrize("name, key, where", MODEL_IDS)
def test_models_refuse_an_out_of_range_id_alike_in_every_framework(models, name, key, where, value):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    batch = wl.synthetic_batch(cfg, 2, seed=0)
    planted = {"negative": -1, "limit": _limit(name, key, where[-1]), "2**40": 2**40}[value]
    batch[key] = batch[key].astype(np.int64)  # JAX's int32 arrays would wrap 2**40 to 0
    batch[key][where] = planted
    messages = {}
    for framework in FRAMEWORKS:
        with pytest.raises(BatchError) as error:
            wl.forward(framework, models(name, framework), batch)
        messages[framework] = str(error.value)
    assert len(set(messages.values())) == 1, messages
    assert_names(messages["torch"], repr(key), list(where), planted)
    with pytest.raises(BatchError) as error:
        wl.check_batch(cfg, batch)  # the framework-free check: the same sentence
    assert str(error.value) == messages["torch"]


@pytest.mark.requires("torch", "jax", "tf")
def test_every_training_entry_refuses_the_batch_before_the_framework_sees_it():
    wl = workloads.get("toy")
    cfg = wl.config("tiny")
    spec, schedule = wl.optimizer(cfg)
    batch = wl.synthetic_batch(cfg, 4, seed=0)
    batch["labels"][2] = cfg.num_classes
    messages = set()
    for framework in FRAMEWORKS:
        adapter = wl.adapter(framework)
        model = wl.build(framework, cfg)
        before = adapter.to_canonical(model)
        optimizer = adapter.make_optimizer(spec, schedule, model)
        trainer = adapter.Trainer(wl.build(framework, cfg), spec, schedule)
        for entry in ("loss_and_grads", "train_step", "Trainer.step"):
            with pytest.raises(BatchError) as error:
                if entry == "loss_and_grads":
                    adapter.loss_and_grads(model, batch)
                elif entry == "train_step":
                    adapter.train_step(model, optimizer, batch)
                else:
                    trainer.step(batch)
            messages.add(str(error.value))
            assert_names(str(error.value), "'labels'", "[2]", cfg.num_classes)
        after = adapter.to_canonical(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing updated
        assert trainer.steps == 0
    assert len(messages) == 1


@pytest.mark.parametrize(
    "name, change, named",
    [
        ("bert", _set("segment_ids", (0, 4), 2), "'segment_ids'"),
        ("bert", _set("input_mask", (1, 0), 3), "'input_mask'"),
        ("bert", _set("masked_lm_positions", (1, 1), S), "'masked_lm_positions'"),
        ("bert", _set("next_sentence_labels", (0,), -1), "'next_sentence_labels'"),
        ("llama2_70b_lora", _set("attention_mask", (0, 3), 2), "'attention_mask'"),
        ("dlrm_dcnv2", _set("labels", (1,), 0.5), "'labels'"),
        ("stable_diffusion", _set("timesteps", (0,), 1000), "'timesteps'"),
        ("toy", _set("tokens", (1, 1), 32), "'tokens'"),
    ],
)
def test_check_batch_refuses_every_id_field_of_every_workload(name, change, named):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    batch = wl.synthetic_batch(cfg, 2, seed=0)
    wl.check_batch(cfg, batch)  # the synthetic batch itself passes
    change(batch)
    with pytest.raises(BatchError) as error:
        wl.check_batch(cfg, batch)
    assert_names(str(error.value), named)
