"""Real-format training data of every workload: ``write_sample_data`` and ``data_batches``.

For each workload of ``workloads.names()`` (the toy one included), on its tiny preset:

- sample data written by the workload's own writer comes back through its reader as batches of
  ``synthetic_batch``'s keys, dtypes and shapes;
- ``start=k`` yields exactly batches k, k + 1, ... of the stream, and gets there without reading
  the batches before (a start of ten million batches answers at once);
- every epoch is the whole dataset, reshuffled; the stream is a function of the seed;
- a dataset smaller than one batch, a truncated file, and data made for another config each
  give one clear error naming the path or the file;
- a dataset written by hand with the format's plain tools (h5py, struct and numpy, np.save and
  np.savez, pyarrow, tarfile), not the package's writer, reads too, row for row.
"""

from __future__ import annotations

import importlib
import io
import itertools
import shutil
import struct
import tarfile
import time

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.workloads.base import Workload

# The extra holding the reader's library: h5py comes with tf, pyarrow with data.
NEEDS = {"bert": "tf", "llama2_70b_lora": "data"}
WORKLOADS = [
    pytest.param(name, marks=[pytest.mark.requires(NEEDS[name])] if name in NEEDS else [])
    for name in workloads.names()
]
# Each reader's error class ("module:name"), raised for a bad file.
READER_ERRORS = {
    "bert": "mlperf_tutor.workloads.bert.data:DataError",
    "dlrm_dcnv2": "mlperf_tutor.workloads.dlrm.data:DataError",
    "gpt3": "mlperf_tutor.workloads.gpt.data:IndexedDatasetError",
    "gptj": "mlperf_tutor.workloads.gpt.data:IndexedDatasetError",
    "llama2_70b_lora": "mlperf_tutor.workloads.llama.data:GovReportError",
    "stable_diffusion": "mlperf_tutor.workloads.stable_diffusion.data:ShardError",
    "toy": "mlperf_tutor.workloads.toy.data:ToyDataError",
}
# A key whose rows tell the samples apart (fixed per sample, not drawn per batch).
IDENTITY = {
    "bert": "input_ids",
    "dlrm_dcnv2": "dense",
    "gpt3": "input_ids",
    "gptj": "input_ids",
    "llama2_70b_lora": "input_ids",
    "stable_diffusion": "context",
    "toy": "image",
}
SAMPLES, BATCH = 16, 4  # four batches an epoch
PER_EPOCH = SAMPLES // BATCH


def tiny(name: str):
    wl = workloads.get(name)
    return wl, wl.config("tiny")


def first(stream, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(stream, n))


def assert_same_batches(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert list(a) == list(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def rows(batches, key: str) -> list[bytes]:
    """The rows of ``key`` over ``batches``, sorted: the epoch's samples as a multiset."""
    return sorted(np.ascontiguousarray(row).tobytes() for b in batches for row in b[key])


@pytest.fixture(scope="module", params=WORKLOADS)
def sample(request, tmp_path_factory):
    """(workload, tiny config, path) of SAMPLES samples written by the workload's writer."""
    wl, cfg = tiny(request.param)
    directory = tmp_path_factory.mktemp(request.param) / "data"
    path = wl.write_sample_data(cfg, directory, samples=SAMPLES, seed=0)
    assert path == directory or path.parent == directory
    return wl, cfg, path


# --- the stream -------------------------------------------------------------------------------
def test_sample_data_batches_have_synthetic_keys_dtypes_and_shapes(sample):
    wl, cfg, path = sample
    synthetic = wl.synthetic_batch(cfg, BATCH)
    for batch in first(wl.data_batches(cfg, path, BATCH), PER_EPOCH + 1):
        assert list(batch) == list(synthetic)
        for key, value in batch.items():
            assert (value.dtype, value.shape) == (synthetic[key].dtype, synthetic[key].shape), key


def test_start_k_is_batch_k_of_the_stream(sample):
    wl, cfg, path = sample
    stream = first(wl.data_batches(cfg, path, BATCH, seed=3), 2 * PER_EPOCH + 3)
    for k in (0, 1, PER_EPOCH - 1, PER_EPOCH, PER_EPOCH + 1, 2 * PER_EPOCH + 1):
        got = first(wl.data_batches(cfg, path, BATCH, seed=3, start=k), 2)
        assert_same_batches(got, stream[k : k + 2])


def test_start_seeks_without_reading_the_batches_before(sample):
    # Reading ten million batches would take minutes even for the toy model; a seek is instant.
    wl, cfg, path = sample
    began = time.perf_counter()
    next(wl.data_batches(cfg, path, BATCH, start=10_000_000))
    assert time.perf_counter() - began < 5.0


def test_every_epoch_is_the_whole_dataset_reshuffled(sample):
    wl, cfg, path = sample
    name = IDENTITY[wl.name]
    epochs = first(wl.data_batches(cfg, path, BATCH), 3 * PER_EPOCH)
    e0, e1, e2 = (epochs[i * PER_EPOCH : (i + 1) * PER_EPOCH] for i in range(3))
    assert rows(e0, name) == rows(e1, name) == rows(e2, name)
    assert len(set(rows(e0, name))) > 1
    order = [[b[name].tobytes() for b in e] for e in (e0, e1, e2)]
    assert order[0] != order[1] and order[1] != order[2]


def test_the_stream_is_a_function_of_the_seed(sample):
    wl, cfg, path = sample
    a = first(wl.data_batches(cfg, path, BATCH, seed=7), PER_EPOCH)
    assert_same_batches(a, first(wl.data_batches(cfg, path, BATCH, seed=7), PER_EPOCH))
    b = first(wl.data_batches(cfg, path, BATCH, seed=8), PER_EPOCH)
    assert any(not np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


# --- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WORKLOADS)
def test_fewer_samples_than_one_batch_is_an_error_naming_the_path(tmp_path, name):
    wl, cfg = tiny(name)
    path = wl.write_sample_data(cfg, tmp_path / "small", samples=3)
    with pytest.raises(ValueError, match="holds 3 samples, fewer than one batch of 4") as err:
        wl.data_batches(cfg, path, 4)  # raised by the call, before any batch is asked for
    assert str(path) in str(err.value)
    assert len(first(wl.data_batches(cfg, path, 3), 2)) == 2


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_truncated_file_is_the_readers_error_naming_it(tmp_path, name):
    wl, cfg = tiny(name)
    module, error = READER_ERRORS[name].split(":")
    error = getattr(importlib.import_module(module), error)
    good = tmp_path / "good"
    path = wl.write_sample_data(cfg, good, samples=8)
    for file in sorted(good.iterdir()):
        bad = tmp_path / f"bad-{file.name}"
        shutil.copytree(good, bad)
        whole = (bad / file.name).read_bytes()
        (bad / file.name).write_bytes(whole[: len(whole) // 2])
        with pytest.raises(error) as err:
            first(wl.data_batches(cfg, bad / path.relative_to(good), 2), 4)
        message = str(err.value)
        assert str(bad / file.name) in message and "\n" not in message, message


# Each workload's config changes that make its data unfit for the tiny config.
OTHER_CONFIG = {
    "bert": lambda cfg: {"vocab_size": 200},
    "dlrm_dcnv2": lambda cfg: {"multi_hot_sizes": tuple(h + 1 for h in cfg.multi_hot_sizes)},
    "gpt3": lambda cfg: {"vocab_size": 200},
    "gptj": lambda cfg: {"vocab_size": 200},
    "llama2_70b_lora": lambda cfg: {"vocab_size": 64},
    "stable_diffusion": lambda cfg: {"latent_size": 16},
    "toy": lambda cfg: {"vocab_size": 64},
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_data_of_another_config_is_refused_naming_the_file(tmp_path, name):
    wl, cfg = tiny(name)
    other = wl.config("tiny", **OTHER_CONFIG[name](cfg))
    path = wl.write_sample_data(other, tmp_path / "other", samples=8)
    module, error = READER_ERRORS[name].split(":")
    with pytest.raises(getattr(importlib.import_module(module), error)) as err:
        first(wl.data_batches(cfg, path, 4), 2)
    assert str(tmp_path / "other") in str(err.value) and "\n" not in str(err.value)


def test_arguments_and_directories_are_checked(tmp_path):
    wl, cfg = tiny("toy")
    path = wl.write_sample_data(cfg, tmp_path / "d", samples=8)
    with pytest.raises(ValueError, match="is not empty"):
        wl.write_sample_data(cfg, path, samples=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        wl.write_sample_data(cfg, tmp_path / "file")
    with pytest.raises(ValueError, match="samples must be an int of at least 1"):
        wl.write_sample_data(cfg, tmp_path / "e", samples=0)
    for bad, match in (
        ({"batch_size": 0}, "batch_size must be an int of at least 1"),
        ({"seed": -1}, "seed must be an int of at least 0"),
        ({"start": -1}, "start must be an int of at least 0"),
        ({"start": 1.5}, "start must be an int"),
    ):
        with pytest.raises(ValueError, match=match):
            wl.data_batches(cfg, path, **{"batch_size": 2, **bad})
    with pytest.raises(NotImplementedError, match="has no real-data reader"):
        Workload().data_batches(cfg, path, 2)
    with pytest.raises(NotImplementedError, match="has no real-data format"):
        Workload().write_sample_data(cfg, tmp_path / "f")


# --- datasets written by hand, with the format's plain tools ----------------------------------
def bert_by_hand(directory, wl, cfg, n):
    """One shard as the reference's create_pretraining_data.py writes it (h5py, int8 masks)."""
    import h5py

    rows = wl.synthetic_batch(cfg, n, seed=5)
    disk = {"input_mask": "i1", "segment_ids": "i1", "next_sentence_labels": "i1"}
    with h5py.File(directory / "part_00000_of_00001.hdf5", "w") as f:
        for key, value in rows.items():
            f.create_dataset(key, data=value, dtype=disk.get(key, "i4"))
    return directory, rows


def gpt_by_hand(directory, wl, cfg, n):
    """Megatron's MMapIndexedDataset, spelled out: uint16 tokens in .bin, the .idx by struct;
    three documents that samples run across."""
    t = cfg.seq_len
    stream = np.random.default_rng(5).integers(0, cfg.vocab_size, n * t + 1)
    cuts = [0, t // 2, 3 * t + 1, len(stream)]
    sizes = np.diff(cuts)
    np.asarray(stream, "<u2").tofile(directory / "c4.bin")
    index = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 4)  # version 1, uint16 (code 8)
    index += struct.pack("<3i", *sizes) + struct.pack("<3q", *(2 * np.array(cuts[:3])))
    index += struct.pack("<4q", 0, 1, 2, 3)
    (directory / "c4.idx").write_bytes(index)
    windows = np.stack([stream[k * t : (k + 1) * t + 1] for k in range(n)])
    return directory / "c4", {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}


def dlrm_by_hand(directory, wl, cfg, n):
    """Day 0 as torchrec's tsv_to_npys and materialize_synthetic_multihot_dataset.py write it:
    np.save of float32 (N, 13) and int32 (N, 1); np.savez of int32 (N, hot_f) named "0".."25"."""
    rows = wl.synthetic_batch(cfg, n, seed=5)
    edges = np.cumsum([0, *cfg.multi_hot_sizes])
    np.save(directory / "day_0_dense.npy", rows["dense"])
    np.save(directory / "day_0_labels.npy", rows["labels"].astype(np.int32)[:, None])
    sparse = {str(f): rows["sparse"][:, edges[f] : edges[f + 1]] for f in range(len(edges) - 1)}
    np.savez(directory / "day_0_sparse_multi_hot.npz", **sparse)
    return directory, rows


def llama_by_hand(directory, wl, cfg, n):
    """A train split as ``datasets`` leaves it (int64 lists, rows of different lengths), which
    data_batches pads to seq_len."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t, rng = cfg.seq_len, np.random.default_rng(5)
    lengths = [t - 3 * i for i in range(n)]
    ids = [rng.integers(0, cfg.vocab_size, m) for m in lengths]
    labels = [
        np.where(np.arange(m) < m // 3, -100, row) for m, row in zip(lengths, ids, strict=True)
    ]
    table = pa.table(
        {
            "input_ids": [r.tolist() for r in ids],
            "attention_mask": [[1] * m for m in lengths],
            "labels": [r.tolist() for r in labels],
        }
    )
    pq.write_table(table, directory / "train-00000-of-00001.parquet")
    padded = {
        "input_ids": np.zeros((n, t), np.int32),
        "attention_mask": np.zeros((n, t), np.int32),
        "labels": np.full((n, t), -100, np.int32),
    }
    for i, m in enumerate(lengths):
        padded["input_ids"][i, :m], padded["attention_mask"][i, :m] = ids[i], 1
        padded["labels"][i, :m] = labels[i]
    return directory, padded


def sd_by_hand(directory, wl, cfg, n):
    """A webdataset shard as TarWriter leaves it: <key>.npy (float16 moments, (1, 8, h, w)),
    <key>.txt and a <key>.json the reader skips; the log-variance so low that a latent is its
    scaled mean."""
    from mlperf_tutor.workloads.stable_diffusion import standins

    captions = standins.all_captions()[:n]
    size, c = cfg.latent_size, cfg.latent_channels
    mean = np.random.default_rng(5).standard_normal((n, c, size, size)).astype(np.float16)
    with tarfile.open(directory / "00000.tar", "w") as tar:
        for i, caption in enumerate(captions):
            moments = np.concatenate([mean[i], np.full_like(mean[i], -30.0)])[None]
            npy = io.BytesIO()
            np.save(npy, moments)
            for ext, data in (("npy", npy.getvalue()), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    encoder = standins.StandInTextEncoder(cfg.context_len, cfg.context_dim)
    latents = cfg.latent_scale * mean.astype(np.float32)
    return directory, {"context": encoder(captions), "latents": latents}


def toy_by_hand(directory, wl, cfg, n):
    rng = np.random.default_rng(5)
    s = cfg.image_size
    rows = {
        "image": rng.standard_normal((n, cfg.in_channels, s, s)).astype(np.float32),
        "tokens": rng.integers(0, cfg.vocab_size, (n, cfg.seq_len)).astype(np.int32),
        "labels": rng.integers(0, cfg.num_classes, n).astype(np.int32),
    }
    for key, value in rows.items():
        np.save(directory / f"{key}.npy", value)
    return directory, rows


BY_HAND = {
    "bert": bert_by_hand,
    "dlrm_dcnv2": dlrm_by_hand,
    "gpt3": gpt_by_hand,
    "gptj": gpt_by_hand,
    "llama2_70b_lora": llama_by_hand,
    "stable_diffusion": sd_by_hand,
    "toy": toy_by_hand,
}
APPROXIMATE = {"latents"}  # drawn from the moments: equal to the written mean up to 1e-5


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_dataset_written_by_hand_reads_row_for_row(tmp_path, name):
    wl, cfg = tiny(name)
    n = 8
    path, written = BY_HAND[name](tmp_path, wl, cfg, n)
    synthetic = wl.synthetic_batch(cfg, BATCH)
    seen = []
    for batch in first(wl.data_batches(cfg, path, BATCH, seed=1), n // BATCH):
        assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
            k: (v.dtype, v.shape) for k, v in synthetic.items()
        }
        exact = [k for k in written if k not in APPROXIMATE]
        for b in range(BATCH):
            [r] = [
                r
                for r in range(n)
                if all(np.array_equal(batch[k][b], written[k][r]) for k in exact)
            ]
            for key in APPROXIMATE & set(written):
                np.testing.assert_allclose(batch[key][b], written[key][r], atol=1e-5)
            seen.append(r)
    assert sorted(seen) == list(range(n))  # one epoch: every row once
