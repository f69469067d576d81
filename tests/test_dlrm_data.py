"""DLRM data: the MLPerf Criteo multi-hot reader and writer (the layout pinned by files written
with plain np.save / np.savez, as the reference's scripts write them), the exact ROC AUC against
scikit-learn, and the synthetic click task."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import scipy.sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mlperf_tutor.workloads.dlrm import data
from mlperf_tutor.workloads.dlrm.config import DlrmConfig
from mlperf_tutor.workloads.dlrm.data import CriteoMultiHot, DataError, write_criteo_multi_hot

pytestmark = pytest.mark.requires("dev")

CFG = DlrmConfig.preset("tiny")  # the reference's 26 multi-hot sizes, small tables
OFFSETS = data.bag_offsets(CFG.multi_hot_sizes)
SIZES = (7, 5)  # rows of days 0 and 1: batches of 3 or 5 cross the day boundary


def make_rows(n: int, first_id: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """n synthetic samples; dense[:, 0] holds a row id so that order can be checked."""
    batch = data.synthetic_batch(CFG, n, seed=seed, task_seed=1)
    batch["dense"][:, 0] = np.arange(first_id, first_id + n)
    return batch


def write_like_reference(directory, day: int, batch, sparse=None) -> None:
    """The files as the reference writes them: np.save of float32 (N, 13) dense and int32 (N, 1)
    labels (torchrec BinaryCriteoUtils.tsv_to_npys), np.savez of int32 (N, hot_f) arrays named
    "0" .. "25" (materialize_synthetic_multihot_dataset.py)."""
    if sparse is None:
        sparse = {str(f): feature(batch, f).astype(np.int32) for f in range(CFG.num_tables)}
    np.save(directory / f"day_{day}_dense.npy", batch["dense"].astype(np.float32))
    np.save(directory / f"day_{day}_labels.npy", batch["labels"].astype(np.int32)[:, None])
    np.savez(directory / f"day_{day}_sparse_multi_hot.npz", **sparse)


def feature(batch, f: int) -> np.ndarray:
    return batch["sparse"][:, OFFSETS[f] : OFFSETS[f + 1]]


def ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["dense"][:, 0]]


@pytest.fixture
def two_days(tmp_path):
    """Days 0 and 1 written with our writer; the rows' ids are 0..11."""
    start = 0
    for day, n in enumerate(SIZES):
        write_criteo_multi_hot(tmp_path, day, make_rows(n, start, seed=day), CFG.multi_hot_sizes)
        start += n
    return tmp_path


# --- the file layout -----------------------------------------------------------------------------
def test_reads_files_written_with_plain_numpy(tmp_path):
    rows = make_rows(6)
    write_like_reference(tmp_path, 3, rows)
    ds = CriteoMultiHot(tmp_path, [3], CFG)
    assert len(ds) == 6
    # Memory-mapped in place, the npz members included (np.load would read those into memory).
    assert all(isinstance(ids, np.memmap) for ids in ds._days[0]["sparse"])
    batch = ds.read(0, 6)
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "dense": (np.float32, (6, 13)),
        "sparse": (np.int32, (6, int(OFFSETS[-1]))),
        "labels": (np.float32, (6,)),
    }
    for key in rows:
        np.testing.assert_array_equal(batch[key], rows[key])


def test_writer_produces_the_reference_layout(tmp_path):
    rows = make_rows(6)
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    ref.mkdir()
    write_like_reference(ref, 0, rows)
    paths = write_criteo_multi_hot(ours, 0, rows, CFG.multi_hot_sizes)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in paths.values())
    for part in ("dense", "labels"):  # .npy files: byte for byte what np.save writes
        assert paths[part].read_bytes() == (ref / paths[part].name).read_bytes()
    assert np.load(paths["labels"]).dtype == np.int32 and np.load(paths["labels"]).shape == (6, 1)
    with zipfile.ZipFile(paths["sparse"]) as archive:  # the zip's timestamps differ, not the rest
        assert archive.namelist() == [f"{f}.npy" for f in range(26)]
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    with np.load(paths["sparse"]) as ours_npz, np.load(ref / paths["sparse"].name) as ref_npz:
        for f in range(26):
            assert ours_npz[str(f)].dtype == np.int32
            assert ours_npz[str(f)].shape == (6, CFG.multi_hot_sizes[f])
            np.testing.assert_array_equal(ours_npz[str(f)], ref_npz[str(f)])
    # One array per feature is accepted too, and gives the same arrays.
    per_feature = {**rows, "sparse": [feature(rows, f) for f in range(26)]}
    again = write_criteo_multi_hot(tmp_path / "again", 0, per_feature)
    with np.load(again["sparse"]) as a, np.load(paths["sparse"]) as b:
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_writer_refuses_bad_batches_and_leaves_nothing(tmp_path):
    rows = make_rows(4)
    bad = [
        ({**rows, "dense": rows["dense"].astype(np.int32)}, "floats"),
        ({**rows, "dense": np.where(np.eye(4, 13, 2) > 0, np.nan, rows["dense"])}, r"\[0, 2\]"),
        ({**rows, "dense": np.full_like(rows["dense"], np.inf)}, "must be finite"),
        ({**rows, "labels": rows["labels"] + 2}, "0s/1s"),
        ({**rows, "sparse": rows["sparse"] + np.int64(2**31)}, "does not fit int32"),
        ({k: v for k, v in rows.items() if k != "labels"}, "no \\['labels'\\]"),
        (rows, "needs multi_hot_sizes"),
    ]
    for batch, message in bad:
        sizes = None if message.startswith("needs") else CFG.multi_hot_sizes
        with pytest.raises(DataError, match=message):
            write_criteo_multi_hot(tmp_path, 0, batch, sizes)
    with pytest.raises(DataError, match="add up to"):
        write_criteo_multi_hot(tmp_path, 0, rows, CFG.multi_hot_sizes[:-1])
    assert list(tmp_path.iterdir()) == []


# --- batches ------------------------------------------------------------------------------------
def test_batches_run_across_days_in_order(two_days):
    ds = CriteoMultiHot(two_days, [0, 1], CFG)
    assert len(ds) == 12 and ds.num_batches(5) == 3 and ds.num_batches(5, drop_last=True) == 2
    batches = list(ds.batches(5))
    assert [len(b["labels"]) for b in batches] == [5, 5, 2]
    assert ids(batches) == list(range(12))  # batch 1 holds rows 5, 6 of day 0 and 0..2 of day 1
    assert [len(b["labels"]) for b in ds.batches(5, drop_last=True)] == [5, 5]
    whole = ds.read(0, 12)
    for day, start in ((0, 0), (1, 7)):
        written = make_rows(SIZES[day], start, seed=day)
        for key in written:
            np.testing.assert_array_equal(whole[key][start : start + SIZES[day]], written[key])
    assert ids([CriteoMultiHot(two_days, [1, 0], CFG).read(0, 12)])[:5] == [7, 8, 9, 10, 11]
    assert ids([CriteoMultiHot(two_days, [0, 1], CFG, rows=(6, 9)).read(0, 3)]) == [6, 7, 8]
    with pytest.raises(IndexError):
        ds.read(10, 13)
    with pytest.raises(DataError, match=r"rows \(3, 13\) are outside the 12 rows"):
        CriteoMultiHot(two_days, [0, 1], CFG, rows=(3, 13))
    with pytest.raises(DataError, match="no days given"):
        CriteoMultiHot(two_days, [], CFG)


def test_shuffle_is_seeded_and_a_permutation(two_days):
    ds = CriteoMultiHot(two_days, [0, 1], CFG)
    a, b = ids(ds.batches(3, seed=4)), ids(ds.batches(3, seed=4))
    assert a == b and sorted(a) == list(range(12)) and a != list(range(12))
    assert ids(ds.batches(3, seed=5)) != a
    for batch in ds.batches(3, seed=4):  # rows move with their features and labels
        row = batch["dense"][:, 0].astype(int)
        np.testing.assert_array_equal(batch["sparse"], ds.read(0, 12)["sparse"][row])


def test_stages_are_days_0_to_22_and_the_halves_of_day_23(tmp_path):
    for day in range(data.NUM_DAYS):
        n = 7 if day == data.EVAL_DAY else 2
        write_criteo_multi_hot(tmp_path, day, make_rows(n, 100 * day), CFG.multi_hot_sizes)
    train = CriteoMultiHot.stage(tmp_path, "train", CFG)
    assert train.days == tuple(range(23)) and len(train) == 46
    val, test = (CriteoMultiHot.stage(tmp_path, s, CFG) for s in ("val", "test"))
    assert ids(val.batches(3)) == [2300, 2301, 2302, 2303]  # ceil(7 / 2) rows
    assert ids(test.batches(3)) == [2304, 2305, 2306]
    with pytest.raises(ValueError, match="unknown stage"):
        CriteoMultiHot.stage(tmp_path, "eval", CFG)


# --- bad files ----------------------------------------------------------------------------------
def _break(directory, kind: str) -> None:
    """Write day 0 (6 rows) as the reference does, but with one defect."""
    rows = make_rows(6)
    sparse = {str(f): feature(rows, f).astype(np.int32) for f in range(26)}
    if kind == "missing key":
        del sparse["25"]
    elif kind == "renamed keys":
        sparse = {f"cat_{k}": v for k, v in sparse.items()}
    elif kind == "width":
        sparse["20"] = sparse["20"][:, :99]
    elif kind == "sparse int64":
        sparse["3"] = sparse["3"].astype(np.int64)
    elif kind == "sparse rows":
        sparse["5"] = sparse["5"][:-1]
    write_like_reference(directory, 0, rows, sparse)
    paths = data.day_paths(directory, 0)
    if kind.startswith("no "):
        paths[kind[3:]].unlink()
    elif kind == "dense shape":
        np.save(paths["dense"], rows["dense"][:, :12])
    elif kind == "dense ints":
        np.save(paths["dense"], rows["dense"].astype(np.int32))
    elif kind == "labels shape":
        np.save(paths["labels"], rows["labels"].astype(np.int32))
    elif kind == "labels rows":
        np.save(paths["labels"], rows["labels"][:-1, None].astype(np.int32))
    elif kind == "not npy":
        paths["dense"].write_bytes(b"day 0 dense, as text\n")
    elif kind == "compressed":
        np.savez_compressed(paths["sparse"], **sparse)
    elif kind == "not zip":
        paths["sparse"].write_bytes(b"PK? no")


@pytest.mark.parametrize(
    "kind, named, message",
    [
        ("no dense", "dense", "does not exist"),
        ("no labels", "labels", "does not exist"),
        ("no sparse", "sparse", "does not exist"),
        ("dense shape", "dense", r"float32 \(N, 13\)"),
        ("dense ints", "dense", r"int32 \(6, 13\); the dense file is float32"),
        ("labels shape", "labels", r"int32 \(N, 1\)"),
        ("labels rows", "day", r"different row counts \(day_0_dense.npy: 6, day_0_labels.npy: 5"),
        ("sparse rows", "day", r"different row counts .*npz\['5'\]: 5"),
        ("missing key", "sparse", r"missing \['25'\]"),
        ("renamed keys", "sparse", r"unexpected \['cat_0'"),
        ("width", "sparse", r"multi_hot_sizes\[20\] = 100"),
        ("sparse int64", "sparse", "feature '3' holds int64"),
        ("compressed", "sparse", "not np.savez_compressed"),
        ("not npy", "dense", "not a readable .npy"),
        ("not zip", "sparse", "not an .npz"),
    ],
)
def test_bad_files_are_one_clear_error_naming_the_file(tmp_path, kind, named, message):
    _break(tmp_path, kind)
    with pytest.raises(DataError, match=message) as err:
        CriteoMultiHot(tmp_path, [0], CFG)
    # A row-count mismatch names the day and its folder (and every file's count).
    where = f"day 0 in {tmp_path}" if named == "day" else str(data.day_paths(tmp_path, 0)[named])
    assert where in str(err.value)


@pytest.mark.parametrize("value", [CFG.table_sizes[7], -1])
def test_an_index_out_of_its_table_is_an_error_unless_hashed(tmp_path, value):
    rows = make_rows(6)
    rows["sparse"][4, OFFSETS[7]] = value
    write_criteo_multi_hot(tmp_path, 0, rows, CFG.multi_hot_sizes)
    ds = CriteoMultiHot(tmp_path, [0], CFG)
    assert len(list(ds.batches(4, drop_last=True))) == 1  # rows 0..3 are fine
    with pytest.raises(DataError, match=f"feature '7' has index {value} at row 4") as err:
        list(ds.batches(4))
    assert str(data.day_paths(tmp_path, 0)["sparse"]) in str(err.value)
    hashed = CriteoMultiHot(tmp_path, [0], CFG, hash_indices=True).read(0, 6)["sparse"]
    assert hashed[4, OFFSETS[7]] == value % CFG.table_sizes[7]
    np.testing.assert_array_equal(np.delete(hashed, 4, 0), np.delete(rows["sparse"], 4, 0))


# --- ROC AUC ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "integer ties", "all tied"])
def test_roc_auc_equals_sklearn(kind):
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.3).astype(np.float32)
    scores = {
        "random": rng.normal(size=2000) + labels,
        "integer ties": rng.integers(0, 5, 2000) + labels * rng.integers(0, 2, 2000),
        "all tied": np.full(2000, 0.25),
    }[kind]
    assert abs(data.roc_auc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-12
    if kind == "all tied":
        assert data.roc_auc(scores, labels) == 0.5


def test_roc_auc_needs_both_classes():
    for labels in (np.zeros(5), np.ones(5)):
        with pytest.raises(ValueError, match="both clicks and non-clicks"):
            data.roc_auc(np.arange(5.0), labels)


# --- the synthetic click task -------------------------------------------------------------------
def test_synthetic_batch_shapes_ranges_and_seeds():
    batch = data.synthetic_batch(CFG, 256, seed=3, task_seed=9)
    assert batch["dense"].dtype == np.float32 and batch["dense"].shape == (256, 13)
    assert batch["sparse"].dtype == np.int32 and batch["sparse"].shape == (256, OFFSETS[-1])
    assert batch["labels"].dtype == np.float32 and set(np.unique(batch["labels"])) == {0.0, 1.0}
    assert (batch["dense"] >= 0).all()  # log1p of counts
    for f, size in enumerate(CFG.table_sizes):
        ids_f = feature(batch, f)
        assert ids_f.shape[1] == CFG.multi_hot_sizes[f] and 0 <= ids_f.min() and ids_f.max() < size
    again = data.synthetic_batch(CFG, 256, seed=3, task_seed=9)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    other = data.synthetic_batch(CFG, 256, seed=4, task_seed=9)
    assert not np.array_equal(batch["sparse"], other["sparse"])


def _one_hot(batch) -> scipy.sparse.csr_matrix:
    """Each feature's bag as id frequencies (1 / hot per id), then the dense features."""
    n = len(batch["labels"])
    first_column = np.concatenate([[0], np.cumsum(CFG.table_sizes)])
    rows, cols, vals = [], [], []
    for f, hot in enumerate(CFG.multi_hot_sizes):
        rows.append(np.repeat(np.arange(n), hot))
        cols.append((feature(batch, f) + first_column[f]).reshape(-1))
        vals.append(np.full(n * hot, 1.0 / hot))
    bags = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, first_column[-1]),
    )
    return scipy.sparse.hstack([bags, scipy.sparse.csr_matrix(batch["dense"])]).tocsr()


def test_synthetic_task_is_learnable_past_the_mlperf_target():
    """The click probability is hidden; a logistic regression on one-hot bags must beat the
    target AUC on held-out samples of the same task (and chance on another task's)."""
    train = data.synthetic_batch(CFG, 4000, seed=1, task_seed=7)
    held_out = data.synthetic_batch(CFG, 4000, seed=2, task_seed=7)
    other_task = data.synthetic_batch(CFG, 4000, seed=2, task_seed=8)
    model = LogisticRegression(solver="liblinear").fit(_one_hot(train), train["labels"])
    auc = data.roc_auc(model.decision_function(_one_hot(held_out)), held_out["labels"])
    assert auc > data.TARGET_AUC
    assert data.roc_auc(model.decision_function(_one_hot(other_task)), other_task["labels"]) < auc
