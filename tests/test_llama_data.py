"""Llama 2 LoRA data: the synthetic Markov language and its prompt-masked batches, the shifted
answer-token cross-entropy, and the reader of the reference's GovReport parquet files (files
written by :func:`write_govreport` and by plain pyarrow with int64 lists, as ``datasets`` does)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.workloads.llama import data
from mlperf_tutor.workloads.llama.config import LlamaConfig
from mlperf_tutor.workloads.llama.data import GovReport, GovReportError, write_govreport

IGNORE = data.IGNORE_INDEX


@pytest.fixture
def pa():
    """pyarrow; every test using it is marked ``requires("data")``."""
    import pyarrow

    return pyarrow


@pytest.fixture
def pq(pa):
    import pyarrow.parquet

    return pyarrow.parquet


def _row(length: int, prompt: int, seed: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1, 250, length)
    labels = ids.copy()
    labels[:prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": np.ones(length, np.int64), "labels": labels}


ROWS = [_row(n, p, s) for s, (n, p) in enumerate([(7, 3), (5, 0), (9, 8), (4, 2), (6, 5)])]


# --- synthetic language and batches --------------------------------------------------------------
def test_successor_table_is_stochastic_with_one_likely_successor_per_token():
    table = data.successor_table(16, language_seed=5)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)
    np.testing.assert_allclose(table.sum(axis=0), 1.0)  # doubly stochastic: uniform stationary
    assert table.min() == pytest.approx(0.03 / 16)
    np.testing.assert_allclose(table.max(axis=1), data.SUCCESSOR_PROB + 0.03 / 16)
    successor = table.argmax(axis=1)
    assert np.array_equal(np.sort(successor), np.arange(16))  # a permutation
    assert np.array_equal(successor, data.successor_permutation(16, 5))
    assert not np.array_equal(successor, data.successor_permutation(16, 6))


def test_markov_sequences_are_seeded_and_follow_the_table():
    a = data.markov_sequences(8, 256, 100, seed=3, language_seed=7)
    assert a.shape == (256, 100) and a.dtype == np.int32 and a.min() == 0 and a.max() == 7
    assert np.array_equal(a, data.markov_sequences(8, 256, 100, seed=3, language_seed=7))
    assert not np.array_equal(a, data.markov_sequences(8, 256, 100, seed=4, language_seed=7))
    assert not np.array_equal(a, data.markov_sequences(8, 256, 100, seed=3, language_seed=8))
    counts = np.zeros((8, 8))
    np.add.at(counts, (a[:, :-1], a[:, 1:]), 1)
    empirical = counts / counts.sum(axis=1, keepdims=True)  # ~3200 transitions per row
    np.testing.assert_allclose(empirical, data.successor_table(8, 7), atol=0.015)


def test_markov_sequences_at_the_full_vocabulary_follow_the_successor_097():
    vocab = 32000  # a V x V float64 table would be 8 GB; the sampler never builds it
    tokens = data.markov_sequences(vocab, 64, 200, seed=0, language_seed=1)
    successor = data.successor_permutation(vocab, 1)
    hits = successor[tokens[:, :-1]] == tokens[:, 1:]
    assert hits.mean() == pytest.approx(0.97, abs=0.006)  # 12736 transitions: std 0.0015
    assert len(np.unique(tokens)) > 5000  # the 3% uniform draws and 64 starts spread out


def test_synthetic_batch_masks_the_prompt_and_is_seeded():
    cfg = LlamaConfig.preset("tiny", seq_len=10, prompt_fraction=0.3)
    batch = data.synthetic_batch(cfg, 4, seed=1, language_seed=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for value in batch.values():
        assert value.shape == (4, 10) and value.dtype == np.int32
    assert (batch["attention_mask"] == 1).all()
    assert (batch["labels"][:, :3] == IGNORE).all()
    assert np.array_equal(batch["labels"][:, 3:], batch["input_ids"][:, 3:])
    assert batch["input_ids"].max() < cfg.vocab_size
    again = data.synthetic_batch(cfg, 4, seed=1, language_seed=2)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    other = data.synthetic_batch(cfg, 4, seed=2, language_seed=2)
    assert not np.array_equal(batch["input_ids"], other["input_ids"])


def test_prompt_fraction_zero_labels_every_token():
    cfg = LlamaConfig.preset("tiny", prompt_fraction=0.0)
    batch = data.synthetic_batch(cfg, 2, seed=0, language_seed=0)
    assert np.array_equal(batch["labels"], batch["input_ids"])
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"prompt_fraction must be in \[0, 1\)"):
            LlamaConfig.preset("tiny", prompt_fraction=bad)


def test_answer_cross_entropy_matches_a_per_token_loop():
    rng = np.random.default_rng(0)
    logits = (30 * rng.standard_normal((3, 6, 11))).astype(np.float32)  # large: needs max-shift
    labels = rng.integers(0, 11, (3, 6))
    labels[:, :2] = IGNORE
    labels[1, 4] = IGNORE
    total, count = data.answer_cross_entropy(logits, labels)
    want, n = 0.0, 0
    for b in range(3):
        for t in range(5):  # logits at t predict the label at t + 1
            if labels[b, t + 1] == IGNORE:
                continue
            row = logits[b, t].astype(np.float64)
            want += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[labels[b, t + 1]]
            n += 1
    assert count == n == 11 and abs(total - want) <= 1e-9 * abs(want)


def test_the_true_table_scores_the_entropy_rate_below_the_mlperf_target():
    cfg = LlamaConfig.preset("tiny", seq_len=128)
    batch = data.synthetic_batch(cfg, 32, seed=0, language_seed=3)
    table = data.successor_table(cfg.vocab_size, 3)
    total, count = data.answer_cross_entropy(np.log(table[batch["input_ids"]]), batch["labels"])
    p, v = data.SUCCESSOR_PROB, cfg.vocab_size
    rate = -(p + (1 - p) / v) * math.log(p + (1 - p) / v) - (v - 1) * (1 - p) / v * math.log(
        (1 - p) / v
    )
    assert count == 32 * (128 - 96)
    assert total / count == pytest.approx(rate, abs=0.05)
    wl = workloads.get("llama2_70b_lora")
    assert rate < 0.31 < wl.recipe(wl.config("mlperf")).target


# --- GovReport parquet files ----------------------------------------------------------------------
def _assert_rows(dataset: GovReport, rows: list[dict]) -> None:
    assert len(dataset) == len(rows)
    for i, row in enumerate(rows):
        got = dataset[i]
        for key in data.COLUMNS:
            assert got[key].dtype == np.int32 and np.array_equal(got[key], row[key]), (i, key)


@pytest.mark.requires("data")
def test_write_govreport_round_trip_over_row_groups(tmp_path, pq):
    path = tmp_path / "validation-00000-of-00001.parquet"
    write_govreport(path, ROWS, row_group_size=2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    parquet = pq.ParquetFile(path)
    assert parquet.num_row_groups == 3
    assert str(parquet.schema_arrow.field("labels").type.value_type) == "int32"
    dataset = GovReport(tmp_path, "validation")
    _assert_rows(dataset, ROWS)
    assert dataset[-1]["labels"].tolist() == ROWS[-1]["labels"].tolist()
    assert dataset.num_tokens == 31 and dataset.lengths.tolist() == [7, 5, 9, 4, 6]
    assert not dataset[0]["input_ids"].flags.writeable
    with pytest.raises(IndexError, match="out of range"):
        dataset[5]
    with pytest.raises(ValueError, match="must be 1-D and of one length"):
        write_govreport(tmp_path / "x.parquet", [{**ROWS[0], "labels": np.zeros(3)}])


@pytest.mark.requires("data")
def test_reads_int64_shards_written_by_pyarrow_in_sorted_order(tmp_path, pa, pq):
    def shard(name: str, rows: list[dict]) -> None:
        kind = pa.list_(pa.int64())
        columns = {k: pa.array([r[k].tolist() for r in rows], kind) for k in data.COLUMNS}
        pq.write_table(pa.table(columns), tmp_path / name)

    # Written in reverse name order: the reader sorts by name, not by creation or glob order.
    shard("train-00001-of-00002.parquet", ROWS[3:])
    shard("train-00000-of-00002.parquet", ROWS[:3])
    shard("validation-00000-of-00001.parquet", ROWS[1:2])
    (tmp_path / "notes.txt").write_text("not data")
    train = GovReport(tmp_path, "train")
    assert [p.name for p in train.files] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    _assert_rows(train, ROWS)
    _assert_rows(GovReport(str(tmp_path), split="validation"), ROWS[1:2])


@pytest.mark.requires("data")
def test_batches_pad_to_the_longest_and_shuffle_by_seed(tmp_path, pq):
    write_govreport(tmp_path / "train.parquet", ROWS)
    dataset = GovReport(tmp_path)
    batches = list(dataset.batches(2))
    assert len(batches) == 2  # 5 rows: the last single row is dropped
    first = batches[0]
    for key in data.COLUMNS:
        assert first[key].shape == (2, 7) and first[key].dtype == np.int32
    assert np.array_equal(first["input_ids"][1], np.r_[ROWS[1]["input_ids"], 0, 0])
    assert first["attention_mask"][1].tolist() == [1] * 5 + [0, 0]
    assert first["labels"][1].tolist() == ROWS[1]["labels"].tolist() + [IGNORE, IGNORE]
    assert batches[1]["input_ids"].shape == (2, 9)
    kept = list(dataset.batches(2, drop_last=False))
    assert len(kept) == 3 and kept[-1]["input_ids"].shape == (1, 6)

    def order(batches) -> list[list[int]]:
        return [b["input_ids"][:, 0].tolist() for b in batches]

    shuffled = order(dataset.batches(1, shuffle_seed=4))
    assert shuffled == order(dataset.batches(1, shuffle_seed=4))
    assert shuffled != order(dataset.batches(1)) == [[r["input_ids"][0]] for r in ROWS]
    assert sorted(shuffled) == sorted(order(dataset.batches(1)))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(dataset.batches(0))


def _bad_columns(pa, **replace) -> dict:
    """ROWS as int64 list columns, with some columns replaced by given arrow arrays."""
    columns = {
        k: pa.array([r[k].tolist() for r in ROWS], pa.list_(pa.int64())) for k in data.COLUMNS
    }
    columns.update(replace)
    return {k: v for k, v in columns.items() if v is not None}


def _edit(column: str, row: int, position: int, value: int) -> list[list[int]]:
    lists = [r[column].tolist() for r in ROWS]
    lists[row][position] = value
    return lists


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing column", r"has no 'labels' column \(it has \['input_ids', 'attention_mask'\]\)"),
        ("float labels", r"column 'labels' is list<.*double>, expected lists of integers"),
        ("flat ids", r"column 'input_ids' is int64, expected lists of integers"),
        ("lengths differ", r"row 3 has lists of different lengths"),
        ("too long", r"row 2 has 9 tokens, more than max_seq_len 8"),
        ("bad label", r"row 4 has label 99 where the input id is \d+; labels must be -100"),
        ("mask 2", r"row 1 has attention_mask value 2; only 0 and 1"),
        ("vocab", r"row 0 has input id 300, outside \[0, 256\)"),
        ("negative id", r"row 3 has input id -5, outside"),
        ("null row", r"column 'labels' has null \(missing\) entries"),
        ("empty row", r"row 1 is empty"),
    ],
)
@pytest.mark.requires("data")
def test_bad_rows_raise_one_clear_error(tmp_path, pa, pq, case, match):
    ints = pa.list_(pa.int64())
    labels = [r["labels"].tolist() for r in ROWS]
    columns = {
        "missing column": lambda: _bad_columns(pa, labels=None),
        "float labels": lambda: _bad_columns(pa, labels=pa.array(labels, pa.list_(pa.float64()))),
        "flat ids": lambda: _bad_columns(pa, input_ids=pa.array(range(5), pa.int64())),
        "lengths differ": lambda: _bad_columns(
            pa, labels=pa.array(labels[:3] + [labels[3][:-1]] + labels[4:], ints)
        ),
        "too long": lambda: _bad_columns(pa),
        "bad label": lambda: _bad_columns(pa, labels=pa.array(_edit("labels", 4, 5, 99), ints)),
        "mask 2": lambda: _bad_columns(
            pa, attention_mask=pa.array(_edit("attention_mask", 1, 2, 2), ints)
        ),
        "vocab": lambda: _bad_columns(pa, input_ids=pa.array(_edit("input_ids", 0, 0, 300), ints)),
        "negative id": lambda: _bad_columns(
            pa, input_ids=pa.array(_edit("input_ids", 3, 1, -5), ints)
        ),
        "null row": lambda: _bad_columns(
            pa, labels=pa.array(labels[:2] + [None] + labels[3:], ints)
        ),
        "empty row": lambda: _bad_columns(
            pa,
            **{k: pa.array([[1], [], [2], [3], [4]], ints) for k in ("input_ids", "labels")},
            attention_mask=pa.array([[1], [], [1], [1], [1]], ints),
        ),
    }[case]()
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)  # errors name rows across groups
    max_seq_len = 8 if case == "too long" else 8192
    with pytest.raises(GovReportError, match=match) as error:
        GovReport(tmp_path, max_seq_len=max_seq_len, vocab_size=256)
    assert str(path) in str(error.value)


@pytest.mark.requires("data")
def test_missing_or_unreadable_files_raise_one_clear_error(tmp_path, pq):
    with pytest.raises(GovReportError, match="is not a directory; pass the reference's"):
        GovReport(tmp_path / "absent")
    write_govreport(tmp_path / "train-0.parquet", ROWS)
    with pytest.raises(GovReportError, match=r"has no validation\*\.parquet files; download"):
        GovReport(tmp_path, "validation")
    with pytest.raises(ValueError, match="unknown split 'test'; choose one of train, validation"):
        GovReport(tmp_path, "test")
    (tmp_path / "validation-0.parquet").write_text("input_ids,labels\n1,2\n")
    with pytest.raises(GovReportError, match=r"validation-0\.parquet is not a readable parquet"):
        GovReport(tmp_path, "validation")
    whole = (tmp_path / "train-0.parquet").read_bytes()
    (tmp_path / "train-1.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(GovReportError, match=r"train-1\.parquet is not a readable parquet"):
        GovReport(tmp_path, "train")
