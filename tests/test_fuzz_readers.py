"""Seeded fuzzing of every data reader, on files the package's own writers produced.

Each case mutates one file of a small valid dataset (a few bytes set to random or extreme
values, a run of bytes overwritten, or a truncation), with a generator seeded by the reader and
the case number, then reads the whole dataset. The reader must either refuse it with its own
error class, or return batches that pass the range checks below, written here from the config
(vocabulary, table sizes, sequence length), not taken from the reader. No case may hang: each
runs under a watchdog that ends the run with a traceback after ``CASE_SECONDS``.
"""

from __future__ import annotations

import faulthandler
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mlperf_tutor import workloads

CASE_SECONDS = 30
# A mutated .npy header may name a dtype by a deprecated alias; numpy warns, the reader refuses.
pytestmark = pytest.mark.filterwarnings("ignore:Data type alias:DeprecationWarning")
CASES = 36  # per reader; seven readers


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of ``data``: set a few bytes, overwrite a run, or truncate."""
    raw = bytearray(data)
    kind = rng.integers(4)
    if kind == 0 or not raw:  # a few bytes set to random values
        for _ in range(int(rng.integers(1, 9))):
            if raw:
                raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
    elif kind == 1:  # a run overwritten with an extreme byte (0, 0x7F, 0x80, 0xFF)
        start = int(rng.integers(len(raw)))
        run = int(rng.integers(1, 17))
        raw[start : start + run] = bytes([int(rng.choice([0, 0x7F, 0x80, 0xFF]))]) * run
    elif kind == 2:  # one bit flipped in each of a few bytes
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(len(raw)))
            raw[i] ^= 1 << int(rng.integers(8))
    else:  # truncated
        del raw[int(rng.integers(len(raw))) :]
    return bytes(raw)


def fuzz(
    name: str,
    make: Callable[[Path], list[Path]],
    read: Callable[[Path], object],
    check: Callable[[object], None],
    error: type[Exception],
    tmp_path: Path,
    seed: int,
) -> dict[str, int]:
    """Run CASES mutations; returns how many were refused and how many read (both happen)."""
    clean = tmp_path / "clean"
    clean.mkdir()
    files = make(clean)
    check(read(clean))  # the unmutated data reads and passes the checks
    counts = {"refused": 0, "read": 0}
    for case in range(CASES):
        rng = np.random.default_rng([seed, case])
        work = tmp_path / f"case{case}"
        shutil.copytree(clean, work)
        target = work / files[int(rng.integers(len(files)))].relative_to(clean)
        target.write_bytes(mutate(target.read_bytes(), rng))
        faulthandler.dump_traceback_later(CASE_SECONDS, exit=True)
        try:
            try:
                result = read(work)
            except error as e:
                assert "\n" not in str(e), (name, case, str(e))
                counts["refused"] += 1
            else:
                check(result)
                counts["read"] += 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        shutil.rmtree(work)
    return counts


def in_range(values: np.ndarray, low: int, high, what: str) -> None:
    values = np.asarray(values)
    assert values.dtype.kind in "iu", (what, values.dtype)
    assert ((values >= low) & (values < high)).all(), (
        what,
        values[(values < low) | (values >= high)],
    )


# --- BERT ----------------------------------------------------------------------------------------
BERT = workloads.get("bert")
BERT_CFG = BERT.config("tiny")


def bert_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.bert.data import write_sample_shards

    write_sample_shards(directory, BERT.synthetic_batch(BERT_CFG, 12, seed=0), shards=2)
    return sorted(directory.iterdir())


def bert_read(directory: Path):
    from mlperf_tutor.workloads.bert.data import HDF5Shards

    shards = HDF5Shards(
        directory, BERT_CFG.seq_len, BERT_CFG.max_predictions, vocab_size=BERT_CFG.vocab_size
    )
    return list(shards.batches(4, shuffle=False, drop_last=False))


def bert_check(batches) -> None:
    s, p, v = BERT_CFG.seq_len, BERT_CFG.max_predictions, BERT_CFG.vocab_size
    assert sum(len(b["input_ids"]) for b in batches) == 12
    for b in batches:
        n = len(b["input_ids"])
        shapes = {k: x.shape for k, x in b.items()}
        assert shapes == {
            "input_ids": (n, s),
            "segment_ids": (n, s),
            "input_mask": (n, s),
            "masked_lm_positions": (n, p),
            "masked_lm_ids": (n, p),
            "next_sentence_labels": (n,),
        }
        in_range(b["input_ids"], 0, v, "input_ids")
        in_range(b["masked_lm_ids"], 0, v, "masked_lm_ids")
        in_range(b["masked_lm_positions"], 0, s, "masked_lm_positions")
        for key in ("segment_ids", "input_mask", "next_sentence_labels"):
            in_range(b[key], 0, 2, key)


@pytest.mark.requires("tf")  # h5py
def test_fuzz_bert_hdf5_shards(tmp_path):
    from mlperf_tutor.workloads.bert.data import DataError

    counts = fuzz("bert", bert_files, bert_read, bert_check, DataError, tmp_path, seed=1)
    assert counts["refused"] and counts["read"], counts


# --- GPT -----------------------------------------------------------------------------------------
GPT = workloads.get("gpt3")
GPT_V = GPT.config("tiny").vocab_size
T = 8


def gpt_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.gpt.data import write_sample_documents

    prefix = write_sample_documents(directory / "doc", GPT_V, 12, T, seed=0, language_seed=1)
    return [prefix.with_suffix(".idx"), prefix.with_suffix(".bin")]


def gpt_read(directory: Path):
    from mlperf_tutor.workloads.gpt.data import GptSamples, IndexedDataset

    samples = GptSamples(IndexedDataset(directory / "doc"), T, vocab_size=GPT_V)
    return list(samples.batches(4))


def gpt_check(batches) -> None:
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape and b["input_ids"].shape[1] == T
        in_range(b["input_ids"], 0, GPT_V, "input_ids")
        in_range(b["labels"], 0, GPT_V, "labels")


def test_fuzz_gpt_indexed_dataset(tmp_path):
    from mlperf_tutor.workloads.gpt.data import IndexedDatasetError

    counts = fuzz("gpt", gpt_files, gpt_read, gpt_check, IndexedDatasetError, tmp_path, seed=2)
    assert counts["refused"] and counts["read"], counts


# --- DLRM ----------------------------------------------------------------------------------------
DLRM = workloads.get("dlrm_dcnv2")
DLRM_CFG = DLRM.config("tiny")
BAG_LIMITS = np.repeat(DLRM_CFG.table_sizes, DLRM_CFG.multi_hot_sizes)  # each column's table


def dlrm_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.dlrm.data import write_criteo_multi_hot

    batch = DLRM.synthetic_batch(DLRM_CFG, 12, seed=0)
    return list(write_criteo_multi_hot(directory, 0, batch, DLRM_CFG.multi_hot_sizes).values())


def dlrm_read(directory: Path):
    from mlperf_tutor.workloads.dlrm.data import CriteoMultiHot

    days = CriteoMultiHot(directory, [0], DLRM_CFG)
    return days.read(0, len(days))


def dlrm_check(batch) -> None:
    n = len(batch["labels"])
    assert batch["dense"].shape == (n, DLRM_CFG.num_dense) and batch["dense"].dtype == np.float32
    assert np.isfinite(batch["dense"]).all()
    assert np.isin(batch["labels"], (0.0, 1.0)).all()
    assert batch["sparse"].shape == (n, BAG_LIMITS.size)
    in_range(batch["sparse"], 0, BAG_LIMITS, "sparse")


def test_fuzz_dlrm_criteo_day(tmp_path):
    from mlperf_tutor.workloads.dlrm.data import DataError

    counts = fuzz("dlrm", dlrm_files, dlrm_read, dlrm_check, DataError, tmp_path, seed=3)
    assert counts["refused"] and counts["read"], counts


# --- Llama ---------------------------------------------------------------------------------------
LLAMA = workloads.get("llama2_70b_lora")
LLAMA_CFG = LLAMA.config("tiny")


def llama_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.llama.data import COLUMNS, write_govreport

    batch = LLAMA.synthetic_batch(LLAMA_CFG, 6, seed=0)
    path = directory / "train-00000-of-00001.parquet"
    write_govreport(path, ({c: batch[c][i] for c in COLUMNS} for i in range(6)), row_group_size=3)
    return [path]


def llama_read(directory: Path):
    from mlperf_tutor.workloads.llama.data import GovReport

    split = GovReport(directory, max_seq_len=LLAMA_CFG.seq_len, vocab_size=LLAMA_CFG.vocab_size)
    return split.batch(range(len(split)))


def llama_check(batch) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] <= LLAMA_CFG.seq_len
    in_range(ids, 0, LLAMA_CFG.vocab_size, "input_ids")
    in_range(mask, 0, 2, "attention_mask")
    assert ((labels == -100) | (labels == ids)).all()


@pytest.mark.requires("data")  # pyarrow
def test_fuzz_llama_govreport(tmp_path):
    from mlperf_tutor.workloads.llama.data import GovReportError

    counts = fuzz("llama", llama_files, llama_read, llama_check, GovReportError, tmp_path, seed=4)
    assert counts["refused"] and counts["read"], counts


# --- Stable Diffusion ----------------------------------------------------------------------------
SD = workloads.get("stable_diffusion")
SD_CFG = SD.config("tiny")
CHANNELS, SIZE = 2 * SD_CFG.latent_channels, SD_CFG.latent_size


def sd_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.stable_diffusion.data import write_shard

    rng = np.random.default_rng(0)
    samples = [
        (f"{i:09d}", rng.standard_normal((CHANNELS, SIZE, SIZE)).astype(np.float32), f"cap {i}")
        for i in range(4)
    ]
    write_shard(directory / "00000.tar", samples)
    return [directory / "00000.tar"]


def sd_read(directory: Path):
    from mlperf_tutor.workloads.stable_diffusion.data import ShardIndex, read_shards

    paths = [directory / "00000.tar"]
    index = ShardIndex(paths, SD_CFG.latent_channels, SIZE)
    streamed = list(read_shards(paths, SD_CFG.latent_channels, SIZE))
    return index.read(range(len(index))) + streamed


def sd_check(samples) -> None:
    for key, moments, caption in samples:
        assert isinstance(key, str) and isinstance(caption, str)
        assert moments.shape == (CHANNELS, SIZE, SIZE) and moments.dtype == np.float32
        assert np.isfinite(moments).all()


def test_fuzz_sd_shards(tmp_path):
    from mlperf_tutor.workloads.stable_diffusion.data import ShardError

    counts = fuzz("sd", sd_files, sd_read, sd_check, ShardError, tmp_path, seed=5)
    assert counts["refused"] and counts["read"], counts


def captions_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.stable_diffusion.data import write_captions_tsv

    rows = [(100 + i, 7 * i, f'a "quoted"\tcaption {i}') for i in range(6)]
    write_captions_tsv(directory / "val.tsv", rows)
    return [directory / "val.tsv"]


def captions_read(directory: Path):
    from mlperf_tutor.workloads.stable_diffusion.data import read_captions_tsv

    return read_captions_tsv(directory / "val.tsv")


def captions_check(rows) -> None:
    assert rows
    for image_id, sample_id, caption in rows:
        assert type(image_id) is int and 0 <= image_id < 2**31
        assert type(sample_id) is int and 0 <= sample_id < 2**31
        assert isinstance(caption, str) and caption.strip()


def test_fuzz_sd_captions_tsv(tmp_path):
    from mlperf_tutor.workloads.stable_diffusion.data import CaptionsError

    counts = fuzz(
        "captions", captions_files, captions_read, captions_check, CaptionsError, tmp_path, seed=6
    )
    assert counts["refused"] and counts["read"], counts


# --- toy -----------------------------------------------------------------------------------------
TOY = workloads.get("toy")
TOY_CFG = TOY.config("tiny")


def toy_files(directory: Path) -> list[Path]:
    from mlperf_tutor.workloads.toy.data import write_arrays

    write_arrays(directory, TOY.synthetic_batch(TOY_CFG, 12, seed=0))
    return sorted(directory.iterdir())


def toy_read(directory: Path):
    from mlperf_tutor.workloads.toy.data import ToyArrays

    arrays = ToyArrays(directory, TOY_CFG)
    return arrays.batch(range(len(arrays)))


def toy_check(batch) -> None:
    in_range(batch["tokens"], 0, TOY_CFG.vocab_size, "tokens")
    in_range(batch["labels"], 0, TOY_CFG.num_classes, "labels")
    assert batch["image"].dtype == np.float32 and np.isfinite(batch["image"]).all()
    assert len(batch["tokens"]) == len(batch["labels"]) == len(batch["image"])


def test_fuzz_toy_arrays(tmp_path):
    from mlperf_tutor.workloads.toy.data import ToyDataError

    counts = fuzz("toy", toy_files, toy_read, toy_check, ToyDataError, tmp_path, seed=7)
    assert counts["refused"] and counts["read"], counts
