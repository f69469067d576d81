"""Hostile checkpoint files: one clear error naming the file, nothing lost, nothing left behind.

Issue 19's "Files" part, for every checkpoint format (safetensors, ``.pt``, Orbax directories,
``.weights.h5``, Hugging Face directories with an index, the training loop's run checkpoints):
only regular files are opened (a FIFO never hangs a reader), every JSON file is read with guards,
safetensors byte counts cannot overflow, ``.pt`` checksums are verified, HDF5 weights cannot pull
bytes from elsewhere, and what an interrupted write leaves is swept or recovered.

Every refusal is checked the same way (:func:`assert_refused`): a ``CheckpointError`` whose
message names the file (and the field, where there is one), from ``load`` and from ``convert``
into destinations that existed before, which are left byte for byte as they were, with no
temporary beside them or beside the source.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from checks import assert_bit_identical, zip_records

from mlperf_tutor import cli, convert
from mlperf_tutor.convert import orbax_io
from mlperf_tutor.convert.tensors import TensorSpec
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.core.io import leftovers_below
from mlperf_tutor.train import checkpoints

pytestmark = pytest.mark.requires("torch", "jax")

ROOT = Path(__file__).resolve().parents[1]
HANG_SECONDS = 10  # far above any refusal here (milliseconds); a hang is what it catches


def tree() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(24, dtype=np.float32).reshape(4, 6),
        "b": np.full(3, 0.5, np.float16),
        "n": np.array([2**40 + 1, -3], np.int64),
    }


def other_tree() -> dict[str, np.ndarray]:
    return {"x": np.ones((2, 2), np.float32)}


# --- helpers ----------------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, object]:
    """Every entry under ``directory``: a regular file's bytes, else what it is (a FIFO's
    contents are never read)."""
    out: dict[str, object] = {}
    for path in sorted(directory.rglob("*")):
        mode = os.lstat(path).st_mode
        key = str(path.relative_to(directory))
        if path.is_symlink():
            out[key] = ("symlink", os.readlink(path))
        elif path.is_file() and not path.is_fifo():
            out[key] = path.read_bytes()
        else:
            out[key] = ("dir" if path.is_dir() else "special", mode)
    return out


@contextlib.contextmanager
def unblocked(fifo: Path | None):
    """Fail instead of hanging when a reader blocks on ``fifo``: after HANG_SECONDS, open its
    other end (which releases a blocked ``open``) and close it (``read`` then sees EOF)."""
    done, fired = threading.Event(), []

    def watch():
        if not done.wait(HANG_SECONDS) and fifo is not None:
            fired.append(True)
            fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            time.sleep(0.1)
            os.close(fd)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    assert not fired, f"a reader blocked on {fifo}"
    assert time.monotonic() - start < HANG_SECONDS


@pytest.fixture(scope="module")
def destinations(tmp_path_factory):
    """Checkpoints that exist before every failed conversion, one per format."""
    directory = tmp_path_factory.mktemp("destinations")
    for name in ("out.safetensors", "out.pt", "out_orbax"):
        convert.save(other_tree(), directory / name)
    return directory


def assert_refused(src: Path, destinations: Path, *words: str, fifo: Path | None = None, **kw):
    """``src`` is refused with a CheckpointError naming it (and ``words``, e.g. the field) by
    load and by convert into each existing destination; nothing changes anywhere."""
    around = [Path(src).parent, destinations]
    before = [snapshot(d) for d in around]
    names = [re.escape(str(src))] + [re.escape(w) for w in words]
    with unblocked(fifo):
        with pytest.raises(CheckpointError) as info:
            convert.load(src, **kw)
        for name in names:
            assert re.search(name, str(info.value)), f"{name!r} not in: {info.value}"
        for dst in sorted(destinations.iterdir()):
            with pytest.raises(CheckpointError, match=re.escape(str(src))):
                convert.convert(src, dst, **kw)
    assert [snapshot(d) for d in around] == before
    return info.value


def write_header(path: Path, header, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


# =============================================================================================
# (1) Only regular files are opened
# =============================================================================================
FILE_NAMES = ["m.safetensors", "m.pt"]


@pytest.mark.parametrize("name", FILE_NAMES)
def test_fifo_is_refused_at_once(tmp_path, destinations, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    assert_refused(fifo, destinations, "FIFO", fifo=fifo)


@pytest.mark.parametrize("name", FILE_NAMES)
def test_fifo_behind_a_symlink_is_refused(tmp_path, destinations, name):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / name).symlink_to(fifo)
    assert_refused(tmp_path / name, destinations, "FIFO", fifo=fifo)


@pytest.mark.parametrize("name", FILE_NAMES)
def test_directory_where_a_file_is_expected_is_refused(tmp_path, destinations, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "inner").write_bytes(b"x")
    assert convert.detect_format(tmp_path / name) != "orbax"
    assert_refused(tmp_path / name, destinations, "a directory")


@pytest.mark.parametrize("name", FILE_NAMES)
def test_device_is_refused(tmp_path, destinations, name):
    # /dev/zero never ends: a reader that opened it would read forever. Only stat'ed here.
    (tmp_path / name).symlink_to("/dev/zero")
    assert_refused(tmp_path / name, destinations, "a device")


def test_detect_format_raises_the_package_error(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "m.npz"))):
        convert.load(tmp_path / "m.npz")


# --- Orbax directories ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def orbax_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    convert.save(tree(), path)
    return path


@pytest.fixture
def orbax_copy(tmp_path, orbax_template):
    path = tmp_path / "ckpt"
    shutil.copytree(orbax_template, path)
    return path


def _biggest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_orbax_roundtrip_still_keeps_order(orbax_copy):
    assert_bit_identical(convert.load(orbax_copy), tree(), ordered=True)


def test_orbax_tree_with_a_fifo_is_refused(orbax_copy, destinations):
    victim = _biggest_file(orbax_copy)
    victim.unlink()
    os.mkfifo(victim)
    assert_refused(orbax_copy, destinations, str(victim), "FIFO", fifo=victim)


def test_orbax_tree_with_a_symlink_leaving_it_is_refused(orbax_copy, destinations, tmp_path):
    victim = _biggest_file(orbax_copy)
    outside = tmp_path / "elsewhere"
    shutil.copy(victim, outside)  # the same bytes: only where they live is wrong
    victim.unlink()
    victim.symlink_to(outside)
    assert_refused(orbax_copy, destinations, str(victim), "outside")


def test_orbax_tree_with_a_dangling_symlink_is_refused(orbax_copy, destinations):
    victim = _biggest_file(orbax_copy)
    victim.unlink()
    victim.symlink_to(orbax_copy / "nowhere")
    assert_refused(orbax_copy, destinations, str(victim), "dangling")


def test_orbax_symlink_inside_the_tree_is_followed(orbax_copy):
    victim = _biggest_file(orbax_copy)
    moved = orbax_copy / "moved_here"
    victim.rename(moved)
    victim.symlink_to(moved)
    assert_bit_identical(convert.load(orbax_copy), tree(), ordered=True)


# =============================================================================================
# (2) JSON guards: safetensors header, HF index, Orbax metadata, run.json
# =============================================================================================
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b"9" * 5000


def _tensor(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# name: (header (dict or raw bytes), data bytes, words the message must hold, whether the
# reference safetensors library refuses it too)
SAFETENSORS_HEADERS = {
    "not-utf8": (b'{"x\xff": 1}', b"", ["not UTF-8"], True),
    "deep-nesting": (DEEP, b"", ["nested too deeply"], True),
    "huge-int": (
        b'{"x": {"dtype": "F32", "shape": [' + HUGE_INT + b'], "data_offsets": [0, 8]}}',
        b"\0" * 8,
        ["not valid JSON"],
        True,
    ),
    "nan": (b'{"x": NaN}', b"", ["NaN"], True),
    "repeated-name": (
        b'{"x": '
        + json.dumps(_tensor()).encode()
        + b', "x": '
        + json.dumps(_tensor()).encode()
        + b"}",
        b"\0" * 8,
        ["'x'", "twice"],
        False,  # the library keeps the last one
    ),
    "header-is-a-list": ([1, 2], b"", ["not a JSON object"], True),
    "entry-is-a-string": ({"x": "F32"}, b"", ["'x'", "JSON object"], True),
    "dtype-int": ({"x": _tensor(dtype=5)}, b"\0" * 8, ["'x'", "dtype"], True),
    "dtype-unknown": ({"x": _tensor(dtype="F33")}, b"\0" * 8, ["'x'", "dtype 'F33'"], True),
    "dtype-complex": ({"x": _tensor(dtype="C64")}, b"\0" * 8, ["'x'", "dtype 'C64'"], False),
    "shape-string": ({"x": _tensor(shape="2")}, b"\0" * 8, ["'x'", "shape"], True),
    "shape-float": ({"x": _tensor(shape=[2.0])}, b"\0" * 8, ["'x'", "shape [2.0]"], True),
    "shape-bool": ({"x": _tensor(shape=[True, 2])}, b"\0" * 8, ["'x'", "shape"], True),
    "shape-negative": ({"x": _tensor(shape=[-2])}, b"\0" * 8, ["'x'", "shape [-2]"], True),
    "shape-missing": (
        {"x": {"dtype": "F32", "data_offsets": [0, 8]}},
        b"\0" * 8,
        ["'x'", "shape None"],
        True,
    ),
    "offsets-one": ({"x": _tensor(offsets=[8])}, b"\0" * 8, ["'x'", "data_offsets"], True),
    "metadata-not-strings": (
        {"__metadata__": {"format": 1}, "x": _tensor()},
        b"\0" * 8,
        ["__metadata__"],
        True,
    ),
    # (3) byte counts
    "2**62x4-at-0-0": ({"x": _tensor(shape=[2**62, 4], offsets=[0, 0])}, b"", ["'x'"], True),
    "zero-times-2**70": ({"x": _tensor(shape=[0, 2**70], offsets=[0, 0])}, b"", ["'x'"], True),
    "65-dimensions": ({"x": _tensor(shape=[0] * 65, offsets=[0, 0])}, b"", ["'x'"], True),
    "offsets-not-shape": ({"x": _tensor(offsets=[0, 4])}, b"\0" * 4, ["'x'", "needs 8"], True),
    "offsets-reversed": ({"x": _tensor(offsets=[8, 0])}, b"\0" * 8, ["'x'", "data_offsets"], True),
    "out-of-bounds": ({"x": _tensor()}, b"\0" * 4, ["4 after the header"], True),
    "overlap": (
        {"x": _tensor(), "y": _tensor(offsets=[4, 12])},
        b"\0" * 12,
        ["'y'", "overlaps"],
        True,
    ),
    "gap": ({"x": _tensor(), "y": _tensor(offsets=[12, 20])}, b"\0" * 20, ["'y'", "gap"], True),
    "trailing-bytes": ({"x": _tensor()}, b"\0" * 12, ["12 after the header"], True),
    "header-longer-than-file": (b"", b"", ["header of"], True),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_HEADERS))
def test_safetensors_hostile_header(tmp_path, destinations, case):
    header, data, words, library_refuses = SAFETENSORS_HEADERS[case]
    path = write_header(tmp_path / "bad.safetensors", header, data)
    if case == "header-longer-than-file":
        path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    assert_refused(path, destinations, *words)
    if library_refuses:  # the reference implementation agrees
        import safetensors.numpy

        with pytest.raises(Exception):  # noqa: B017 - whatever the library's own type is
            safetensors.numpy.load_file(str(path))


def test_safetensors_header_of_2_62_by_4_would_have_wrapped(tmp_path):
    # The old byte count (numpy int64) wrapped 2**62 * 4 * 4 bytes to 0, matching offsets [0, 0].
    assert int(np.prod([2**62, 4], dtype=np.int64)) * 4 == 0
    assert convert.TensorSpec((2**62, 4), np.dtype(np.float32)).nbytes == 2**66


def test_safetensors_zero_size_tensors_still_load(tmp_path):
    # Empty tensors share their offset with a neighbour; the tiling check must allow it.
    t = {"e": np.zeros((0, 3), np.float32), "w": np.ones(2, np.float64), "f": np.zeros(0, np.int8)}
    convert.save(t, tmp_path / "m.safetensors")
    assert_bit_identical(convert.load(tmp_path / "m.safetensors"), t, ordered=True)


# --- Hugging Face directories with an index -----------------------------------------------------
class IdentityOwner:
    """A CheckpointOwner whose Hugging Face names are the canonical ones: the files alone."""

    name = "identity"

    def __init__(self, expected=None):
        self.expected = expected
        self.hf = HfInterop(
            architecture=(),
            config_from_hf=lambda hf_config, **kwargs: None,
            config_to_hf=lambda cfg: {"model_type": "x"},
            load_pretrained=lambda directory: (None, convert.read_hf_weights(directory)),
            save_pretrained=self._save,
        )

    @staticmethod
    def _save(t, cfg, directory):
        specs = convert.specs_of(t, str(directory))
        convert.write_hf_directory(directory, {"model_type": "x"}, specs, iter(t.items()))

    def canonical_specs(self, cfg):
        return self.expected


INDEX = "model.safetensors.index.json"


@pytest.fixture
def sharded(tmp_path):
    """A save_pretrained directory with two shards and an index, as transformers writes it."""
    directory = tmp_path / "model.hf"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "x"}')
    t = tree()
    convert.save({"w": t["w"]}, directory / "model-00001-of-00002.safetensors")
    convert.save({"b": t["b"], "n": t["n"]}, directory / "model-00002-of-00002.safetensors")
    weight_map = {
        "w": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "n": "model-00002-of-00002.safetensors",
    }
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


HF = {"workload": IdentityOwner()}


def test_hf_sharded_directory_loads(sharded):
    assert_bit_identical(convert.load(sharded, **HF), tree(), ordered=False)


INDEX_CASES = {
    "not-utf8": (b'{"weight_map": {"w": "\xff"}}', ["not UTF-8"]),
    "deep-nesting": (DEEP, ["nested too deeply"]),
    "huge-int": (b'{"weight_map": {}, "x": ' + HUGE_INT + b"}", ["not valid JSON"]),
    "a-list": (b"[]", ["JSON array, expected a JSON object"]),
    "no-weight-map": (b'{"metadata": {}}', ["weight_map"]),
    "weight-map-a-list": (b'{"weight_map": ["w"]}', ["weight_map"]),
    "shard-an-int": (b'{"weight_map": {"w": 1}}', ["weight_map", "'w'"]),
    "shard-outside": (b'{"weight_map": {"w": "../x.safetensors"}}', ["weight_map", "'w'"]),
    "shard-absolute": (b'{"weight_map": {"w": "/tmp/x.safetensors"}}', ["weight_map", "'w'"]),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_hf_hostile_index(sharded, destinations, case):
    raw, words = INDEX_CASES[case]
    (sharded / INDEX).write_bytes(raw)
    assert_refused(sharded, destinations, str(sharded / INDEX), *words, **HF)


def test_hf_index_that_is_a_fifo(sharded, destinations):
    index = sharded / INDEX
    index.unlink()
    os.mkfifo(index)
    assert_refused(sharded, destinations, str(index), "FIFO", fifo=index, **HF)


def test_hf_shard_that_is_a_fifo(sharded, destinations):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    assert_refused(sharded, destinations, str(shard), "FIFO", fifo=shard, **HF)


def test_hf_shard_that_is_a_directory(sharded, destinations):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    assert_refused(sharded, destinations, str(shard), "a directory", **HF)


def test_hf_shard_behind_a_symlink_leaving_the_directory(sharded, destinations, tmp_path):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.rename(tmp_path / "stolen.safetensors")
    shard.symlink_to(tmp_path / "stolen.safetensors")
    assert_refused(sharded, destinations, str(shard), "outside", **HF)


def test_hf_single_weights_behind_a_symlink_leaving_the_directory(tmp_path, destinations):
    directory = tmp_path / "single.hf"
    convert.save(tree(), tmp_path / "a.safetensors")
    convert.convert(tmp_path / "a.safetensors", directory, IdentityOwner(), cfg=object())
    weights = directory / "model.safetensors"
    weights.rename(tmp_path / "elsewhere.safetensors")
    weights.symlink_to(tmp_path / "elsewhere.safetensors")
    assert_refused(directory, destinations, str(weights), "outside", **HF)


def test_hf_index_naming_a_tensor_its_shard_lacks(sharded, destinations):
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    assert_refused(sharded, destinations, str(sharded / INDEX), "ghost", **HF)


# --- Orbax metadata ---------------------------------------------------------------------------
def _set_order(ckpt: Path, order) -> Path:
    path = ckpt / "_CHECKPOINT_METADATA"
    meta = json.loads(path.read_text())
    meta["custom_metadata"][orbax_io._META_KEY]["order"] = order
    path.write_text(json.dumps(meta))
    return path


ORBAX_METADATA = {
    "not-json": lambda ckpt: (ckpt / "_CHECKPOINT_METADATA", b"{not json", ["not valid JSON"]),
    "deep-nesting": lambda ckpt: (ckpt / "_CHECKPOINT_METADATA", DEEP, ["nested too deeply"]),
    "not-utf8": lambda ckpt: (ckpt / "_CHECKPOINT_METADATA", b'{"a": "\xff"}', ["not UTF-8"]),
    "state-metadata-a-list": lambda ckpt: (ckpt / "state" / "_METADATA", b"[1]", ["JSON array"]),
}


@pytest.mark.parametrize("case", list(ORBAX_METADATA))
def test_orbax_hostile_metadata(orbax_copy, destinations, case):
    path, raw, words = ORBAX_METADATA[case](orbax_copy)
    path.write_bytes(raw)
    assert_refused(orbax_copy, destinations, str(path), *words)


@pytest.mark.parametrize(
    "order, words",
    [(["w", "b"], ["order", "other keys"]), ("w,b,n", ["order", "not a list"]), ([1, 2, 3], [])],
)
def test_orbax_damaged_key_order(orbax_copy, destinations, order, words):
    path = _set_order(orbax_copy, order)
    assert_refused(orbax_copy, destinations, str(path), "order", *words)


# =============================================================================================
# (4) .pt: checksums verified, torch's own exceptions wrapped
# =============================================================================================
@pytest.mark.parametrize("record", ["data/0", "data.pkl", "byteorder"])
def test_pt_byte_flip_fails_its_checksum(tmp_path, destinations, record):
    path = tmp_path / "m.pt"
    convert.save(tree(), path)
    name = next(n for n in zip_records(path) if n.endswith("/" + record))
    start, size = zip_records(path)[name]
    data = bytearray(path.read_bytes())
    data[start + size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert_refused(path, destinations, "CRC-32", name)


PT_DAMAGE = {
    # case: (bytes from a good zip file and a good legacy file, the exception torch or zipfile
    # raised, which the CheckpointError must carry as its cause)
    "zip-truncated": (lambda z, old: z[: len(z) - 30], "BadZipFile"),
    "zip-junk-after-magic": (lambda z, old: b"PK\x03\x04" + bytes(200), "BadZipFile"),
    "zip-not-torch": (None, "RuntimeError"),
    # Cut inside the first pickle (the magic number, the same in every legacy file).
    "legacy-truncated": (lambda z, old: old[:10], "EOFError"),
    "legacy-garbage": (lambda z, old: b"\x80\x02" + bytes(range(200)), "UnpicklingError"),
    "empty": (lambda z, old: b"", "EOFError"),
}


@pytest.mark.parametrize("case", list(PT_DAMAGE))
def test_pt_foreign_exceptions_are_wrapped(tmp_path, destinations, case):
    import torch

    damage, cause = PT_DAMAGE[case]
    path = tmp_path / "m.pt"
    if damage is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("hello.txt", "a zip, not a torch.save archive")
    else:
        torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
        torch.save({"w": torch.ones(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
        z, old = (tmp_path / "zip.pt").read_bytes(), (tmp_path / "old.pt").read_bytes()
        path.write_bytes(damage(z, old))
    error = assert_refused(path, destinations)
    assert type(error.__cause__).__name__ == cause


# =============================================================================================
# (5) Keras .weights.h5: nothing from outside the file
# =============================================================================================
@pytest.fixture(scope="module")
def keras_good(tmp_path_factory):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    cfg = toy.config("tiny")
    path = tmp_path_factory.mktemp("keras") / "good.weights.h5"
    convert.save(toy.init_canonical(cfg, seed=0), path, workload=toy, cfg=cfg)
    return path, {"workload": toy, "cfg": cfg}


VICTIM = "fc1/vars/0"  # a (16, 16) float32 kernel of the toy model


def _edit_h5(path: Path, edit) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        shape, dtype = f[VICTIM].shape, f[VICTIM].dtype
        del f[VICTIM]
        edit(f, shape, dtype)


def _external_storage(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(256, dtype=np.float32).tobytes())

    def edit(f, shape, dtype):
        f.create_dataset(VICTIM, shape, dtype, external=[(str(secret), 0, secret.stat().st_size)])

    return edit


def _virtual(tmp_path):
    import h5py

    def edit(f, shape, dtype):
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as g:
            g["d"] = np.zeros(shape, dtype)
        layout = h5py.VirtualLayout(shape, dtype)
        layout[...] = h5py.VirtualSource(str(other), "d", shape)
        f.create_virtual_dataset(VICTIM, layout)

    return edit


def _external_link(tmp_path):
    import h5py

    def edit(f, shape, dtype):
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as g:
            g["d"] = np.zeros(shape, dtype)
        f[VICTIM] = h5py.ExternalLink(str(other), "d")

    return edit


def _soft_link(tmp_path):
    import h5py

    def edit(f, shape, dtype):
        f["elsewhere"] = np.zeros(shape, dtype)
        f[VICTIM] = h5py.SoftLink("/elsewhere")

    return edit


def _strings(tmp_path):
    def edit(f, shape, dtype):
        f[VICTIM] = np.array([b"not", b"numbers"])

    return edit


H5_CASES = {
    "external-storage": (_external_storage, "stored in an external file"),
    "virtual-dataset": (_virtual, "virtual"),
    "external-link": (_external_link, "ExternalLink"),
    "soft-link": (_soft_link, "SoftLink"),
    "string-dataset": (_strings, "not a number type"),
}


@pytest.mark.requires("tf")
@pytest.mark.parametrize("case", list(H5_CASES))
def test_keras_weights_reaching_outside_the_file(tmp_path, destinations, keras_good, case):
    good, kw = keras_good
    make, words = H5_CASES[case]
    path = tmp_path / "m.weights.h5"
    shutil.copy(good, path)
    _edit_h5(path, make(tmp_path))
    assert_refused(path, destinations, "/" + VICTIM, words, **kw)


@pytest.mark.requires("tf")
@pytest.mark.parametrize("kind", ["fifo", "directory", "garbage", "truncated"])
def test_keras_weights_not_a_regular_hdf5_file(tmp_path, destinations, keras_good, kind):
    good, kw = keras_good
    path = tmp_path / "m.weights.h5"
    fifo = None
    if kind == "fifo":
        os.mkfifo(path)
        fifo = path
    elif kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path.write_bytes(good.read_bytes()[:20_000])
    assert_refused(path, destinations, fifo=fifo, **kw)


@pytest.mark.requires("tf")
def test_keras_failed_conversion_keeps_an_existing_weights_file(tmp_path, keras_good):
    good, kw = keras_good
    dst = tmp_path / "dst.weights.h5"
    shutil.copy(good, dst)
    bad = write_header(tmp_path / "bad.safetensors", {"x": _tensor()}, b"\0" * 4)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        convert.convert(bad, dst, **kw)
    assert snapshot(tmp_path) == before


# =============================================================================================
# Training checkpoints (train/checkpoints.py)
# =============================================================================================
def _state(**fields) -> checkpoints.RunState:
    base = dict(
        workload="toy",
        config={"channels": 8},
        framework="torch",
        precision="fp32",
        seed=0,
        steps=3,
        batch_size=2,
        data=None,
        data_position=3,
    )
    return checkpoints.RunState(**{**base, **fields})


@pytest.fixture
def step_dir(tmp_path):
    runs = checkpoints.RunCheckpoints(tmp_path / "run")
    return runs.save(_state(), lambda d: convert.save(tree(), d / "weights.safetensors"))


def test_run_checkpoint_reads_back(step_dir):
    state, state_dir = checkpoints.read(step_dir)
    assert state == _state() and state_dir == step_dir / "state"


RUN_JSON = {
    "not-utf8": (b'{"format": "\xff"}', ["not UTF-8"]),
    "deep-nesting": (DEEP, ["nested too deeply"]),
    "huge-int": (None, ["not valid JSON"]),
    "nan": (None, ["NaN"]),
    "a-list": (b"[]", ["JSON array"]),
    "steps-a-string": ({"steps": "3"}, ["steps"]),
    "seed-a-bool": ({"seed": True}, ["seed"]),
    "steps-negative": ({"steps": -1}, ["steps -1"]),
    "seed-too-big": ({"seed": 2**70}, ["seed"]),
    "batch-size-zero": ({"batch_size": 0}, ["batch_size 0"]),
    "config-a-list": ({"config": []}, ["config"]),
    "missing-field": ({"data_position": None}, ["data_position"]),
}


@pytest.mark.parametrize("case", list(RUN_JSON))
def test_run_json_hostile(step_dir, case):
    raw, words = RUN_JSON[case]
    where = step_dir / "run.json"
    good = json.loads(where.read_text())
    if case == "huge-int":
        raw = where.read_bytes().replace(b'"seed": 0', b'"seed": ' + HUGE_INT)
    elif case == "nan":
        raw = where.read_bytes().replace(b'"seed": 0', b'"seed": NaN')
    elif isinstance(raw, dict):
        raw = json.dumps({k: v for k, v in {**good, **raw}.items() if v is not None}).encode()
    where.write_bytes(raw)
    before = snapshot(step_dir.parent)
    with pytest.raises(CheckpointError) as info:
        checkpoints.RunCheckpoints(step_dir.parent).latest()
    assert str(where) in str(info.value)
    for word in words:
        assert word in str(info.value)
    assert snapshot(step_dir.parent) == before


def test_run_json_fifo(step_dir):
    where = step_dir / "run.json"
    where.unlink()
    os.mkfifo(where)
    with unblocked(where), pytest.raises(CheckpointError, match=re.escape(str(where)) + ".*FIFO"):
        checkpoints.read(step_dir)


def test_run_json_symlink_leaving_the_step(step_dir, tmp_path):
    where = step_dir / "run.json"
    where.rename(tmp_path / "run.json")
    where.symlink_to(tmp_path / "run.json")
    with pytest.raises(CheckpointError, match=re.escape(str(where)) + ".*outside"):
        checkpoints.read(step_dir)


@pytest.mark.parametrize("kind", ["fifo", "symlink-out", "dangling"])
def test_state_tree_checked_before_a_framework_opens_it(step_dir, tmp_path, kind):
    victim = step_dir / "state" / "weights.safetensors"
    fifo = None
    if kind == "fifo":
        victim.unlink()
        os.mkfifo(victim)
        fifo, word = victim, "FIFO"
    elif kind == "symlink-out":
        victim.rename(tmp_path / "w.safetensors")
        victim.symlink_to(tmp_path / "w.safetensors")
        word = "outside"
    else:
        victim.unlink()
        victim.symlink_to(step_dir / "state" / "gone")
        word = "dangling"
    with unblocked(fifo), pytest.raises(CheckpointError) as info:
        checkpoints.read(step_dir)
    assert str(victim) in str(info.value) and word in str(info.value)


def test_run_checkpoints_keep_removes_old_steps_without_leftovers(tmp_path):
    runs = checkpoints.RunCheckpoints(tmp_path, keep=1)
    for steps in (1, 2, 3):
        runs.save(_state(steps=steps), lambda d: (d / "f").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


# =============================================================================================
# (6) Temporaries of interrupted writes: swept on the next write, by doctor, at a run's start
# =============================================================================================
KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from mlperf_tutor.core import io

    directory, how = Path(sys.argv[1]), sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if how == "file":  # killed while writing a file
        with io.atomic_file(directory / "m.safetensors") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            die()
    elif how == "dir":  # killed while writing a directory
        with io.atomic_dir(directory / "ckpt", lambda p: True, "a checkpoint") as target:
            target.mkdir()
            (target / "f").write_text("new")
            die()
    elif how == "between-renames":  # killed after moving the previous directory aside
        rename = os.rename
        def rename_then_die(a, b):
            rename(a, b)
            if Path(b).name == "previous":
                die()
        io.os.rename = rename_then_die
        with io.atomic_dir(directory / "ckpt", lambda p: True, "a checkpoint") as target:
            target.mkdir()
            (target / "f").write_text("new")
    elif how == "run-save":  # killed while a run saves step 2
        from mlperf_tutor.train import checkpoints
        state = checkpoints.RunState("toy", {}, "torch", "fp32", 0, 2, 2, None, 2)
        def write_state(d):
            (d / "half").write_text("x")
            die()
        checkpoints.RunCheckpoints(directory).save(state, write_state)
    """
)


def killed_write(directory: Path, how: str) -> int:
    """Run a write in a child process that is killed (SIGKILL) midway; return its pid."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(directory), how], env=env, timeout=60
    )
    assert child.returncode == -signal.SIGKILL
    pids = {item.writer for item in leftovers_below(directory)}
    assert len(pids) == 1, "the killed write left nothing"
    return pids.pop()


def doctor(*args) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(["doctor", *map(str, args)])
    return code, out.getvalue()


def test_killed_file_write_is_swept_by_the_next_write(tmp_path):
    convert.save(other_tree(), tmp_path / "m.safetensors")
    pid = killed_write(tmp_path, "file")
    names = [p.name for p in tmp_path.iterdir()]
    assert len(names) == 2 and any(n.startswith(f".tmp-{pid}-") for n in names)
    # The destination still holds the previous checkpoint.
    assert_bit_identical(convert.load(tmp_path / "m.safetensors"), other_tree())
    convert.save(tree(), tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_doctor_lists_then_removes_a_stale_temporary(tmp_path):
    pid = killed_write(tmp_path, "file")
    code, out = doctor(tmp_path)
    assert code == 1 and f"process {pid} is gone" in out and "--fix removes it" in out
    assert len(list(tmp_path.iterdir())) == 1  # listing changes nothing
    code, out = doctor(tmp_path, "--fix")
    assert code == 0 and "removed" in out
    assert list(tmp_path.iterdir()) == []
    assert doctor(tmp_path) == (0, f"{tmp_path}: no leftovers of interrupted writes\n")


def test_killed_between_renames_previous_directory_is_moved_back(tmp_path):
    convert.save(other_tree(), tmp_path / "ckpt")
    before = snapshot(tmp_path / "ckpt")
    killed_write(tmp_path, "between-renames")
    assert not (tmp_path / "ckpt").exists()  # the one window atomic_dir cannot close
    code, out = doctor(tmp_path / "ckpt")
    assert code == 1 and "the previous ckpt is kept in it" in out
    code, out = doctor(tmp_path, "--fix")
    assert code == 0 and "moved the previous ckpt back" in out
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert snapshot(tmp_path / "ckpt") == before
    assert_bit_identical(convert.load(tmp_path / "ckpt"), other_tree())


def test_next_write_recovers_the_previous_directory_first(tmp_path):
    convert.save(other_tree(), tmp_path / "ckpt")
    killed_write(tmp_path, "between-renames")
    # A next write that fails must leave the recovered previous checkpoint in place.
    specs = {"a": TensorSpec((2,), np.dtype(np.float32))}
    with pytest.raises(CheckpointError, match="expected tensor 'a'"):
        orbax_io.write_orbax(tmp_path / "ckpt", specs, iter([("z", np.ones(2, np.float32))]))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_bit_identical(convert.load(tmp_path / "ckpt"), other_tree())


def test_stranded_new_directory_is_reported_and_kept_by_doctor(tmp_path):
    killed_write(tmp_path, "dir")  # no destination existed before
    code, out = doctor(tmp_path, "--fix")
    assert code == 1 and "never reached its place" in out and "kept" in out
    staging = next(tmp_path.iterdir())
    assert f"inspect {staging / 'ckpt'}" in out and (staging / "ckpt" / "f").read_text() == "new"
    # The next write to the same destination replaces it.
    convert.save(tree(), tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_run_checkpoints_sweep_a_killed_save_at_start(tmp_path):
    runs = checkpoints.RunCheckpoints(tmp_path)
    runs.save(_state(steps=1), lambda d: (d / "f").write_text("step 1"))
    killed_write(tmp_path, "run-save")
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".tmp-step_00000002-")]) == 1
    reopened = checkpoints.RunCheckpoints(tmp_path)
    assert len(reopened.swept) == 1 and reopened.swept[0].startswith(".tmp-step_00000002-")
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]
    assert reopened.latest()[0] == _state(steps=1)


def test_a_write_in_progress_is_never_swept(tmp_path):
    # A live process that started before the temporary was written is its possible writer.
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        tmp = tmp_path / f".tmp-{writer.pid}-0123abcd-m.safetensors"
        tmp.write_bytes(b"being written")
        convert.save(tree(), tmp_path / "m.safetensors")
        code, out = doctor(tmp_path, "--fix")
        assert tmp.exists() and code == 0 and "in progress" in out
    finally:
        writer.kill()
        writer.wait()
    convert.save(tree(), tmp_path / "m.safetensors")  # its writer is gone now
    assert not tmp.exists()


def test_a_reused_pid_does_not_protect_an_old_temporary(tmp_path):
    # The pid is alive, but its process started after the temporary was last written.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = tmp_path / f".tmp-{other.pid}-0123abcd-m.safetensors"
        tmp.write_bytes(b"left by a process long gone")
        an_hour_ago = time.time() - 3600
        os.utime(tmp, (an_hour_ago, an_hour_ago))
        convert.save(tree(), tmp_path / "m.safetensors")
        assert not tmp.exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("age, swept", [(3600, True), (0, False)])
def test_older_unnumbered_temporaries_are_swept_by_age(tmp_path, age, swept):
    # Names without a pid (written by versions before the sweep): stale once older than this
    # process; a recent one may belong to an older version's write in progress.
    tmp = tmp_path / ".tmp-0123abcd-m.safetensors"
    tmp.write_bytes(b"old")
    os.utime(tmp, (time.time() - age,) * 2)
    convert.save(tree(), tmp_path / "m.safetensors")
    assert tmp.exists() != swept


def test_only_our_own_temporaries_are_touched(tmp_path):
    dead = _dead_pid()
    keep = {
        ".tmp-notes.txt": "a user's file with a similar name",
        f".tmp-{dead}-0123abcd-other.safetensors": "another destination's temporary",
        "m.safetensors.tmp": "not our pattern",
    }
    for name, text in keep.items():
        (tmp_path / name).write_text(text)
    # Our pattern, but a symlink and a directory where a file temporary is a regular file.
    (tmp_path / f".tmp-{dead}-0123abcd-m.safetensors").symlink_to(tmp_path / ".tmp-notes.txt")
    (tmp_path / f".tmp-{dead}-4567abcd-m.safetensors").mkdir()
    before = snapshot(tmp_path)
    convert.save(tree(), tmp_path / "m.safetensors")
    after = snapshot(tmp_path)
    del after["m.safetensors"]
    assert after == before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
