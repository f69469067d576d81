"""Checkpoint file formats: every pair round-trips bit-exactly, and every failure is clean.

Clean means one ``CheckpointError`` naming the file, nothing written, no temporary left, and a
previous file or directory at the destination untouched.
"""

from __future__ import annotations

import itertools
import pickle
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from checks import assert_bit_identical, listing

from mlperf_tutor import convert
from mlperf_tutor.convert import orbax_io, safetensors_io
from mlperf_tutor.core.checkpoint import CheckpointError, CheckpointMismatch, tree_specs

pytestmark = pytest.mark.requires("torch", "jax")

EXT = {"safetensors": "m.safetensors", "torch": "m.pt", "orbax": "m_orbax"}


def mixed_tree() -> dict[str, np.ndarray]:
    """Every dtype the brief names, a scalar, and float bit patterns equality would miss."""
    rng = np.random.default_rng(0)
    weird = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)
    weird.view(np.uint32)[0] |= 0x1234  # a NaN with a payload
    return {
        "embed.weight": rng.standard_normal((7, 5), dtype=np.float32),
        "fc.weight": rng.standard_normal((3, 4)).astype(np.float16),
        "fc.bias": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "bn.num_batches": np.array([2**40 + 1, -3], np.int64),
        "ln.eps": np.array(1e-5, np.float32),
        "special": weird,
    }


@pytest.fixture
def small_groups(monkeypatch):
    # One Orbax call per tensor, so the partial-save merge path runs even on a tiny tree.
    monkeypatch.setattr(orbax_io, "MIN_GROUP_BYTES", 1)


@pytest.mark.parametrize("src_fmt, dst_fmt", list(itertools.product(EXT, EXT)), ids=lambda f: f)
def test_convert_roundtrip_every_format_pair(tmp_path, small_groups, src_fmt, dst_fmt):
    tree = mixed_tree()
    src, dst = tmp_path / "src" / EXT[src_fmt], tmp_path / "dst" / EXT[dst_fmt]
    src.parent.mkdir()
    dst.parent.mkdir()
    convert.save(tree, src)
    assert_bit_identical(convert.load(src), tree, ordered=True)
    convert.convert(src, dst)
    assert_bit_identical(convert.load(dst), tree, ordered=True)
    assert not [p for p in listing(tmp_path) if ".tmp-" in p]


def test_convert_roundtrip_keeps_bf16(tmp_path):
    tree = {"w": np.arange(-8, 8).astype(ml_dtypes.bfloat16).reshape(4, 4)}
    convert.save(tree, tmp_path / "a.pt")
    convert.convert(tmp_path / "a.pt", tmp_path / "b.safetensors")
    convert.convert(tmp_path / "b.safetensors", tmp_path / "c")
    out = convert.load(tmp_path / "c")
    assert out["w"].dtype == ml_dtypes.bfloat16
    assert_bit_identical(out, tree, ordered=True)


def test_safetensors_interop_with_reference_library(tmp_path):
    from safetensors import numpy as st_numpy

    tree = mixed_tree()
    convert.save(tree, tmp_path / "ours.safetensors")
    theirs = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    assert_bit_identical({k: theirs[k] for k in tree}, tree, ordered=True)

    st_numpy.save_file(tree, str(tmp_path / "theirs.safetensors"))
    ours = convert.load(tmp_path / "theirs.safetensors")
    assert_bit_identical({k: ours[k] for k in tree}, tree, ordered=True)


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_memory_mapped_load_is_copy_on_write(tmp_path, name):
    path = tmp_path / name
    convert.save(mixed_tree(), path)
    before = path.read_bytes()
    tree = convert.load(path)
    tree["embed.weight"][:] = 0  # writable, but private: the file must not change
    assert path.read_bytes() == before


def test_orbax_output_restores_with_plain_orbax(tmp_path, small_groups):
    from orbax.checkpoint.experimental import v1 as ocp

    tree = mixed_tree()
    convert.save(tree, tmp_path / "ckpt")
    restored = ocp.load(tmp_path / "ckpt")
    assert_bit_identical({k: np.asarray(restored[k]) for k in tree}, tree, ordered=True)


def test_iter_tensors_and_specs_match_load(tmp_path):
    tree = mixed_tree()
    convert.save(tree, tmp_path / "m.safetensors")
    specs = convert.tensor_specs(tmp_path / "m.safetensors")
    assert {k: (s.shape, s.dtype.name) for k, s in specs.items()} == tree_specs(tree)
    assert_bit_identical(dict(convert.iter_tensors(tmp_path / "m.safetensors")), tree, ordered=True)


def test_progress_bar_runs(tmp_path, capsys):
    convert.save(mixed_tree(), tmp_path / "m.safetensors")
    convert.convert(tmp_path / "m.safetensors", tmp_path / "m.pt", progress=True)
    assert "m.safetensors -> m.pt" in capsys.readouterr().err


def test_prefetch_keeps_order_and_budget():
    from mlperf_tutor.convert.tensors import prefetch

    log = []

    def items():
        for i in range(6):
            log.append(f"read {i}")
            yield f"t{i}", np.full(4, i)

    # Item 3 costs more than the budget: it is read only once the consumer asks for it.
    costs = [10, 10, 10, 100, 0, 10]
    got = []
    for name, _ in prefetch(items(), costs, ahead=20):
        log.append(f"use {name}")
        got.append(name)
    assert got == [f"t{i}" for i in range(6)]
    assert log.index("read 3") > log.index("use t2")
    assert log.index("read 1") < log.index("use t0")  # cheap items are read early


def test_prefetch_raises_producer_errors_and_stops():
    from mlperf_tutor.convert.tensors import prefetch

    def items():
        yield "a", np.zeros(1)
        raise CheckpointError("broken file (simulated)")

    with pytest.raises(CheckpointError, match="simulated"):
        list(prefetch(items(), [1, 1], ahead=10))
    stream = prefetch(((f"t{i}", np.zeros(1)) for i in range(100)), [1] * 100, ahead=10)
    next(stream)
    stream.close()  # joins the producer thread; must not hang


# --- detection --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.safetensors", "safetensors"),
        ("a.PT", "torch"),
        ("a.pth", "torch"),
        ("pytorch_model.bin", "torch"),
        ("m.weights.h5", "keras"),
        ("ckpt", "orbax"),
        ("ckpt.v2/", "orbax"),
    ],
)
def test_detect_format(tmp_path, name, fmt):
    assert convert.detect_format(f"{tmp_path}/{name}") == fmt


def test_detect_format_existing_directory_is_orbax(tmp_path):
    (tmp_path / "run.v1").mkdir()
    assert convert.detect_format(tmp_path / "run.v1") == "orbax"


@pytest.mark.parametrize("name", ["model.h5", "model.ckpt", "model.npz", "weights.json"])
def test_detect_format_rejects_unknown(tmp_path, name):
    with pytest.raises(ValueError, match=r"model|weights") as info:
        convert.detect_format(tmp_path / name)
    assert name in str(info.value) and ".safetensors" in str(info.value)
    assert ".weights.h5" in str(info.value) and "directory" in str(info.value)


def test_detect_format_rejects_existing_file_without_extension(tmp_path):
    (tmp_path / "model").write_bytes(b"x")
    with pytest.raises(ValueError, match="model"):
        convert.detect_format(tmp_path / "model")


# --- corrupt, missing, refused ----------------------------------------------------------------
def _good_bytes(tmp_path, fmt: str) -> bytes:
    path = tmp_path / f"good.{fmt}"
    convert.save(mixed_tree(), path)
    return path.read_bytes()


def garbage(size: int = 4096) -> bytes:
    return np.random.default_rng(size).bytes(size)


CORRUPT = {
    "safetensors-empty": ("bad.safetensors", lambda good: b""),
    "safetensors-truncated": ("bad.safetensors", lambda good: good[: len(good) - 10]),
    "safetensors-header-cut": ("bad.safetensors", lambda good: good[:40]),
    "safetensors-garbage": ("bad.safetensors", lambda good: garbage()),
    "safetensors-huge-header": ("bad.safetensors", lambda good: (2**62).to_bytes(8, "little")),
    "safetensors-bad-json": ("bad.safetensors", lambda good: (4).to_bytes(8, "little") + b"{{{{"),
    "torch-empty": ("bad.pt", lambda good: b""),
    "torch-truncated": ("bad.pt", lambda good: good[: len(good) // 2]),
    "torch-garbage": ("bad.pt", lambda good: garbage()),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_raises_checkpoint_error_and_writes_nothing(tmp_path, case):
    name, corrupt = CORRUPT[case]
    fmt = "safetensors" if name.endswith(".safetensors") else "pt"
    bad = tmp_path / name
    bad.write_bytes(corrupt(_good_bytes(tmp_path, fmt)))
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        convert.load(bad)
    for dst in ("out.safetensors", "out.pt", "out_orbax"):
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            convert.convert(bad, tmp_path / dst)
    assert listing(tmp_path) == before


# When a restore fails, Orbax's event loop sometimes closes before a tensorstore callback fires
# ("Event loop is closed", inside orbax); the error we raise is unaffected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["empty-dir", "metadata", "truncated-data", "junk"])
def test_corrupt_orbax_dir_raises_checkpoint_error(tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    # Big enough that the array's bytes sit in a data file of their own.
    convert.save({"w": np.arange(200_000, dtype=np.float32), "b": np.ones(3, np.float16)}, ckpt)
    if damage == "empty-dir":
        for p in sorted(ckpt.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    elif damage == "metadata":
        for p in ckpt.rglob("_METADATA"):
            p.write_text("{not json")
    elif damage == "truncated-data":
        biggest = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    else:
        for p in ckpt.rglob("*"):
            if p.is_file():
                p.write_bytes(b"garbage")
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt))):
        convert.load(ckpt)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt))):
        convert.convert(ckpt, tmp_path / "out.safetensors")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", ["nope.safetensors", "nope.pt", "nope_orbax", "nope.weights.h5"])
def test_missing_file_is_named(tmp_path, name):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / name))):
        convert.load(tmp_path / name, workload=toy, cfg=toy.config("tiny"))


class NotATensor:
    pass


def test_torch_refuses_pickled_objects(tmp_path):
    import torch

    path = tmp_path / "obj.pt"
    torch.save({"w": torch.ones(2), "extra": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="not a plain state_dict") as info:
        convert.load(path)
    assert str(path) in str(info.value) and "torch.save" in str(info.value)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)


def test_torch_reads_legacy_non_zip_files(tmp_path):
    import torch

    path = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert_bit_identical(convert.load(path), {"w": np.arange(4.0, dtype=np.float32)}, ordered=True)


def test_torch_refuses_training_checkpoint(tmp_path):
    import torch

    path = tmp_path / "train.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="not a plain state_dict.*'model'.*'epoch'"):
        convert.load(path)


# --- validation and atomicity -----------------------------------------------------------------
def test_mismatch_lists_every_bad_key_and_writes_nothing(tmp_path):
    tree = mixed_tree()
    expected = tree_specs(tree)
    del expected["ln.eps"]  # -> unexpected
    expected["missing.weight"] = ((2,), "float32")
    expected["fc.weight"] = ((4, 3), "float16")  # wrong shape
    expected["fc.bias"] = ((3,), "float32")  # wrong dtype (bf16 in the tree)
    convert.save(tree, tmp_path / "src.safetensors")
    before = listing(tmp_path)
    for call in (
        lambda dst: convert.save(tree, dst, expected=expected),
        lambda dst: convert.convert(tmp_path / "src.safetensors", dst, expected=expected),
    ):
        for dst in ("out.safetensors", "out.pt", "out_orbax"):
            with pytest.raises(CheckpointMismatch) as info:
                call(tmp_path / dst)
            message = str(info.value)
            for key in ("ln.eps", "missing.weight", "fc.weight", "fc.bias"):
                assert key in message
            assert listing(tmp_path) == before
    with pytest.raises(CheckpointMismatch, match="missing.weight"):
        convert.load(tmp_path / "src.safetensors", expected=expected)


def test_save_rejects_non_arrays(tmp_path):
    with pytest.raises(CheckpointError, match="w: list.*s: dtype object"):
        convert.save({"w": [1.0, 2.0], "s": np.array(["a"], object)}, tmp_path / "m.safetensors")
    assert listing(tmp_path) == set()


def test_orbax_refuses_to_replace_unrelated_directory(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
        convert.save(mixed_tree(), tmp_path / "photos")
    assert listing(tmp_path) == {"photos", "photos/cat.jpg"}


def test_failed_safetensors_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    convert.save({"old": np.zeros(3, np.float32)}, path)
    previous = path.read_bytes()
    calls = []

    def fail_on_second(array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return array

    monkeypatch.setattr(safetensors_io, "native", fail_on_second)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        convert.save(mixed_tree(), path)
    assert len(calls) == 2  # header and a first tensor were already written
    assert path.read_bytes() == previous
    assert listing(tmp_path) == {"m.safetensors"}


def test_failed_torch_write_keeps_previous_file(tmp_path, monkeypatch):
    import torch

    path = tmp_path / "m.pt"
    convert.save({"old": np.zeros(3, np.float32)}, path)
    previous = path.read_bytes()

    def half_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 partial")
        raise OSError("killed mid-write (simulated)")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        convert.save(mixed_tree(), path)
    assert path.read_bytes() == previous
    assert listing(tmp_path) == {"m.pt"}


def test_failed_orbax_write_keeps_previous_checkpoint(tmp_path, monkeypatch, small_groups):
    from orbax.checkpoint.experimental import v1 as ocp

    path = tmp_path / "ckpt"
    old = {"old": np.arange(4, dtype=np.float32)}
    convert.save(old, path)
    before = listing(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("preempted before finalize (simulated)")

    # Every tensor is written by then: the failure comes at the last possible moment.
    monkeypatch.setattr(ocp.partial, "finalize", fail)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        convert.save(mixed_tree(), path)
    assert listing(tmp_path) == before
    assert_bit_identical(convert.load(path), old, ordered=True)


def test_orbax_overwrite_replaces_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    convert.save({"old": np.arange(4, dtype=np.float32)}, path)
    convert.save(mixed_tree(), path)
    assert_bit_identical(convert.load(path), mixed_tree(), ordered=True)
    assert not [p for p in listing(tmp_path) if ".tmp-" in p]


# --- Keras .weights.h5 (needs the workload's TF model) ----------------------------------------
def test_keras_needs_workload_and_preset(tmp_path):
    with pytest.raises(CheckpointError, match="workload and its preset"):
        convert.save(mixed_tree(), tmp_path / "m.weights.h5")
    convert.save(mixed_tree(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="workload and its preset"):
        convert.convert(tmp_path / "m.safetensors", tmp_path / "m.weights.h5")
    assert listing(tmp_path) == {"m.safetensors"}


@pytest.mark.requires("tf")
def test_keras_bad_h5_raises_checkpoint_error(tmp_path):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    bad = tmp_path / "m.weights.h5"
    bad.write_bytes(garbage(2048))
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        convert.load(bad, workload=toy, cfg=toy.config("tiny"))


@pytest.mark.slow
@pytest.mark.requires("tf")
def test_keras_roundtrip_through_every_format(tmp_path):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    cfg = toy.config("tiny")
    tree = toy.init_canonical(cfg, seed=3)
    kw = {"workload": toy, "cfg": cfg}
    convert.save(tree, tmp_path / "a.safetensors")
    convert.convert(tmp_path / "a.safetensors", tmp_path / "b.weights.h5", **kw)
    convert.convert(tmp_path / "b.weights.h5", tmp_path / "c_orbax", **kw)
    convert.convert(tmp_path / "c_orbax", tmp_path / "d.weights.h5", **kw)
    convert.convert(tmp_path / "d.weights.h5", tmp_path / "e.pt", **kw)
    assert_bit_identical(convert.load(tmp_path / "e.pt"), tree, ordered=True)
    other = toy.config("tiny", channels=cfg.channels * 2)
    with pytest.raises(CheckpointError, match="b.weights.h5"):
        convert.load(tmp_path / "b.weights.h5", workload=toy, cfg=other)


@pytest.mark.parametrize("name", ["rel.safetensors", "rel.pt", "rel_ckpt"])
def test_relative_paths_work_in_every_format(tmp_path, monkeypatch, name):
    # Orbax refuses relative paths; the package resolves them (a README example uses "ckpt/").
    monkeypatch.chdir(tmp_path)
    tree = mixed_tree()
    convert.save(tree, name)
    assert_bit_identical(convert.load(name), tree, ordered=True)


# --- the boundary: convert knows no workload, only the CheckpointOwner interface ---------------
def test_convert_checks_the_source_against_the_workload_by_default(tmp_path):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    cfg = toy.config("tiny")
    other = toy.config("tiny", channels=cfg.channels * 2)
    convert.save(toy.init_canonical(other), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointMismatch, match="other.safetensors"):
        convert.convert(tmp_path / "other.safetensors", tmp_path / "out.pt", workload=toy, cfg=cfg)
    assert listing(tmp_path) == {"other.safetensors"}
    # Explicit specs replace the workload's.
    expected = toy.canonical_specs(other)
    convert.convert(tmp_path / "other.safetensors", tmp_path / "out.pt", toy, cfg, expected)
    assert_bit_identical(convert.load(tmp_path / "out.pt"), toy.init_canonical(other))


def test_any_checkpoint_owner_reads_and_writes_hf_directories(tmp_path):
    # Not a Workload: an object with the CheckpointOwner attributes, and Hugging Face "naming"
    # that keeps canonical names, so convert is seen to need nothing more.
    from mlperf_tutor import workloads
    from mlperf_tutor.core.interop import HfInterop

    cfg = workloads.get("toy").config("tiny")
    tree = mixed_tree()

    def save_pretrained(tree, cfg, directory):
        specs = convert.specs_of(tree, str(directory))
        convert.write_hf_directory(directory, {"model_type": "x"}, specs, iter(tree.items()))

    def load_pretrained(directory):
        assert convert.read_hf_config(directory) == {"model_type": "x"}
        return cfg, convert.read_hf_weights(directory)

    class Owner:
        name = "identity"
        hf = HfInterop(
            architecture=("channels",),
            config_from_hf=lambda hf_config, **kwargs: cfg,
            config_to_hf=lambda cfg: {"model_type": "x"},
            load_pretrained=load_pretrained,
            save_pretrained=save_pretrained,
        )

        def canonical_specs(self, cfg):
            return tree_specs(tree)

    convert.save(tree, tmp_path / "a.safetensors")
    convert.convert(tmp_path / "a.safetensors", tmp_path / "b.hf", Owner(), cfg)
    assert convert.detect_format(tmp_path / "b.hf") == "hf"
    assert_bit_identical(convert.load(tmp_path / "b.hf", Owner(), cfg), tree, ordered=True)
    with pytest.raises(CheckpointError, match="channels"):
        convert.load(tmp_path / "b.hf", Owner(), cfg.replace(channels=cfg.channels * 2))


def test_convert_imports_no_workload_and_workloads_use_only_its_public_api():
    package = Path(convert.__file__).parents[1]
    for path in (package / "convert").glob("*.py"):
        assert "mlperf_tutor.workloads" not in path.read_text(), path
    for path in (package / "workloads").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"mlperf_tutor\.convert\.\w", text), f"{path} reaches inside convert"
        names = re.findall(r"\bconvert\.(\w+)", text)
        for group in re.findall(r"from mlperf_tutor\.convert import ([\w, ]+)", text):
            names += [n.strip() for n in group.split(",")]
        assert set(names) <= set(convert.__all__), f"{path}: {set(names) - set(convert.__all__)}"
