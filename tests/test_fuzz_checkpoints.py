"""Seeded fuzzing of every checkpoint format: byte flips, truncations and header mutations.

Each mutated checkpoint must either be refused with the package's own error
(``CheckpointError``) or load to exactly what it declares, within a per-case time bound (byte
flips cannot make a FIFO, so a hang would show as a slow case). What "exactly" means depends on
what the format can know:

- ``.pt``: the zip's CRCs cover every byte of every record, so a loaded file holds the original
  weights bit for bit; a flip inside a record's data always raises.
- safetensors: the format has no checksum, so a flip in the data section changes values
  legitimately; whatever loads has the names, shapes and dtypes its header declares (parsed
  here with ``json``) and each tensor's bytes are the declared slice of the file.
- Orbax and ``.weights.h5``: no checksum on raw array data either; a loaded checkpoint has the
  original names (in order), shapes and dtypes.
- Hugging Face index and the run checkpoint's ``run.json``: a loaded one is the original.

About 300 cases in all; every failure is collected and reported together.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import shutil
import time

import ml_dtypes
import numpy as np
import pytest
from checks import zip_records

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.train import checkpoints

pytestmark = pytest.mark.requires("torch", "jax")

# Each case takes milliseconds (a tenth of a second for .weights.h5, which builds a model).
# Slower than CASE_SECONDS fails the test; at HANG_SECONDS the process is ended with every
# thread's traceback (faulthandler), so a loop inside a C library fails the run, never hangs it.
CASE_SECONDS = 30.0
HANG_SECONDS = 120.0

# The safetensors dtype names, written out here rather than taken from the reader.
SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def tree() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "embed.weight": rng.standard_normal((6, 4), dtype=np.float32),
        "fc.weight": rng.standard_normal((3, 4)).astype(np.float16),
        "fc.bias": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "steps": np.array([2**40 + 1, -3], np.int64),
        "mask": np.array([True, False, True]),
    }


def flip(data: bytes, rng, lo: int = 0, hi: int | None = None) -> tuple[int, bytes]:
    """``data`` with one random bit flipped in [lo, hi)."""
    pos = int(rng.integers(lo, len(data) if hi is None else hi))
    out = bytearray(data)
    out[pos] ^= 1 << int(rng.integers(8))
    return pos, bytes(out)


def truncate(data: bytes, rng) -> tuple[int, bytes]:
    size = int(rng.integers(0, len(data)))
    return size, data[:size]


class Outcomes:
    """Runs cases and collects what went wrong: a foreign exception, a slow case, or a check
    of a loaded checkpoint that failed (``check`` returns a problem, or None)."""

    def __init__(self):
        self.problems: list[str] = []
        self.counts = {"refused": 0, "loaded": 0}

    def run(self, case: str, load, check, must_raise: bool = False) -> None:
        start = time.monotonic()
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            loaded = load()
        except CheckpointError:
            self.counts["refused"] += 1
            loaded = None
        except Exception as e:  # the point: nothing else may escape
            self.problems.append(f"{case}: {type(e).__name__} escaped: {str(e)[:200]}")
            loaded = None
        finally:
            faulthandler.cancel_dump_traceback_later()
        if loaded is not None:
            self.counts["loaded"] += 1
            if must_raise:
                self.problems.append(f"{case}: loaded, but it must be refused")
            else:
                problem = check(loaded)
                if problem:
                    self.problems.append(f"{case}: {problem}")
        elapsed = time.monotonic() - start
        if elapsed > CASE_SECONDS:
            self.problems.append(f"{case}: took {elapsed:.1f} s")

    def assert_clean(self, cases: int) -> None:
        assert not self.problems, "\n".join(self.problems)
        assert sum(self.counts.values()) == cases
        # Both outcomes happen: the cases are neither all trivially fatal nor all harmless.
        assert self.counts["refused"] and self.counts["loaded"], self.counts


def same_specs(loaded: dict, want: dict) -> str | None:
    got = [(k, v.shape, np.dtype(v.dtype)) for k, v in loaded.items()]
    expected = [(k, v.shape, np.dtype(v.dtype)) for k, v in want.items()]
    return None if got == expected else f"loaded {got}, wrote {expected}"


def bit_identical(loaded: dict, want: dict) -> str | None:
    problem = same_specs(loaded, want)
    if problem:
        return problem
    changed = [k for k in want if np.asarray(loaded[k]).tobytes() != want[k].tobytes()]
    return f"silently different values in {changed}" if changed else None


def in_order_of(want: dict, got: dict) -> dict:
    """``got`` in ``want``'s key order when both hold the same keys (else as it is)."""
    return {k: got[k] for k in want} if set(got) == set(want) else got


# --- safetensors ------------------------------------------------------------------------------
def declared(data: bytes) -> str | None | dict:
    """What a safetensors file declares, parsed here independently: name -> (shape, dtype,
    bytes); None where the header is not plain JSON of the documented form."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    header.pop("__metadata__", None)
    body = data[8 + n :]
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        out[name] = (
            tuple(entry["shape"]),
            np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]),
            body[begin:end],
        )
    return out


def as_declared(data: bytes):
    def check(loaded):
        try:
            want = declared(data)
        except (KeyError, TypeError, ValueError) as e:
            return f"loaded a header this test cannot read ({type(e).__name__}: {e})"
        if want is None:
            return "loaded a header that is not JSON"
        got = {k: (v.shape, np.dtype(v.dtype), np.asarray(v).tobytes()) for k, v in loaded.items()}
        if list(got) != list(want):
            return f"loaded names {list(got)}, the header declares {list(want)}"
        wrong = [k for k in want if got[k] != want[k]]
        return f"{wrong} differ from their declared shape, dtype or bytes" if wrong else None

    return check


HOSTILE_VALUES = [-1, 2**64, 2**62, "F32", "x", None, [], {}, 1.5, True, [0], [0, 0, 0], "BF16"]


def mutate_header(header: dict, rng) -> dict:
    """One structured change to a parsed header: a field replaced, nudged or dropped, an entry
    dropped or duplicated, or two entries' offsets swapped."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    field = ["dtype", "shape", "data_offsets"][int(rng.integers(3))]
    how = int(rng.integers(6))
    if how == 0:
        entry[field] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    elif how == 1 and field != "dtype" and entry[field]:
        i = int(rng.integers(len(entry[field])))
        entry[field][i] += int(rng.choice([-8, -1, 1, 2, 8]))
    elif how == 2:
        del entry[field]
    elif how == 3:
        del header[name]
    elif how == 4:
        header[name + ".copy"] = dict(entry)
    else:
        other = header[names[int(rng.integers(len(names)))]]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    return header


def test_fuzz_safetensors(tmp_path):
    good_path = tmp_path / "good.safetensors"
    convert.save(tree(), good_path)
    good = good_path.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    rng = np.random.default_rng(0)
    path = tmp_path / "m.safetensors"
    outcomes = Outcomes()
    cases = []
    for _ in range(30):  # header bytes, the length prefix included
        pos, data = flip(good, rng, 0, 8 + n)
        cases.append((f"header flip at {pos}", data, False))
    for _ in range(15):  # the data section: values change, the layout does not
        pos, data = flip(good, rng, 8 + n)
        cases.append((f"data flip at {pos}", data, False))
    for _ in range(15):
        size, data = truncate(good, rng)
        cases.append((f"truncated to {size}", data, True))
    for i in range(20):
        raw = json.dumps(mutate_header(header, rng)).encode()
        data = len(raw).to_bytes(8, "little") + raw + good[8 + n :]
        cases.append((f"header mutation {i}: {raw[:120]!r}", data, False))
    for case, data, must_raise in cases:
        path.write_bytes(data)
        outcomes.run(case, lambda: convert.load(path), as_declared(data), must_raise)
    outcomes.assert_clean(len(cases))


# --- .pt --------------------------------------------------------------------------------------
def test_fuzz_pt(tmp_path):
    good_path = tmp_path / "good.pt"
    original = tree()
    convert.save(original, good_path)
    good = good_path.read_bytes()
    records = zip_records(good_path)
    rng = np.random.default_rng(1)
    path = tmp_path / "m.pt"
    outcomes = Outcomes()
    cases = []
    for _ in range(40):  # anywhere: refused, or the original weights exactly
        pos, data = flip(good, rng)
        cases.append((f"flip at {pos}", data, False))
    spans = [(name, start, size) for name, (start, size) in records.items() if size]
    for _ in range(12):  # inside a record's data: the CRC catches every one
        name, start, size = spans[int(rng.integers(len(spans)))]
        pos, data = flip(good, rng, start, start + size)
        cases.append((f"flip in {name} at {pos}", data, True))
    for _ in range(10):
        size, data = truncate(good, rng)
        cases.append((f"truncated to {size}", data, True))
    for case, data, must_raise in cases:
        path.write_bytes(data)
        outcomes.run(
            case, lambda: convert.load(path), lambda t: bit_identical(t, original), must_raise
        )
    outcomes.assert_clean(len(cases))


# --- Orbax directories --------------------------------------------------------------------------
# When a restore fails, Orbax's event loop sometimes closes before a tensorstore callback fires
# ("Event loop is closed", inside orbax); the error we raise is unaffected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fuzz_orbax(tmp_path):
    original = tree()
    good = tmp_path / "good"
    convert.save(original, good)
    files = sorted(p.relative_to(good) for p in good.rglob("*") if p.is_file() and p.stat().st_size)
    rng = np.random.default_rng(2)
    path = tmp_path / "ckpt"
    outcomes = Outcomes()
    count = 0
    for i in range(45):
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(good, path)
        victim = path / files[int(rng.integers(len(files)))]
        data = victim.read_bytes()
        if i < 35:
            pos, data = flip(data, rng)
            case = f"flip in {victim.relative_to(path)} at {pos}"
        else:
            size, data = truncate(data, rng)
            case = f"{victim.relative_to(path)} truncated to {size}"
        victim.write_bytes(data)
        outcomes.run(case, lambda: convert.load(path), lambda t: same_specs(t, original))
        count += 1
    outcomes.assert_clean(count)


# --- Keras .weights.h5 ------------------------------------------------------------------------
@pytest.mark.requires("tf")
def test_fuzz_keras_weights(tmp_path):
    from mlperf_tutor import workloads

    toy = workloads.get("toy")
    cfg = toy.config("tiny")
    original = toy.init_canonical(cfg, seed=0)
    good_path = tmp_path / "good.weights.h5"
    convert.save(original, good_path, workload=toy, cfg=cfg)
    good = good_path.read_bytes()
    rng = np.random.default_rng(3)
    path = tmp_path / "m.weights.h5"
    outcomes = Outcomes()
    cases = [("flip at {}", *flip(good, rng)) for _ in range(30)]
    cases += [("truncated to {}", *truncate(good, rng)) for _ in range(10)]
    for case, where, data in cases:
        path.write_bytes(data)
        outcomes.run(
            case.format(where),
            lambda: convert.load(path, workload=toy, cfg=cfg),
            lambda t: same_specs(t, original),
        )
    outcomes.assert_clean(len(cases))


# --- Hugging Face directory with an index -----------------------------------------------------
class IdentityOwner:
    """A CheckpointOwner whose Hugging Face names are the canonical ones: the files alone."""

    name = "identity"
    hf = HfInterop(
        architecture=(),
        config_from_hf=lambda hf_config, **kwargs: None,
        config_to_hf=lambda cfg: {},
        load_pretrained=lambda directory: (None, convert.read_hf_weights(directory)),
        save_pretrained=None,
    )

    def canonical_specs(self, cfg):
        return None


def test_fuzz_hf_index(tmp_path):
    original = tree()
    directory = tmp_path / "model.hf"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    names = list(original)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        convert.save({k: original[k] for k in keys}, directory / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    index = directory / "model.safetensors.index.json"
    good = json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()
    rng = np.random.default_rng(4)
    outcomes = Outcomes()
    cases = [("flip at {}", *flip(good, rng)) for _ in range(30)]
    cases += [("truncated to {}", *truncate(good, rng)) for _ in range(8)]
    for case, where, data in cases:
        index.write_bytes(data)
        outcomes.run(
            case.format(where),
            lambda: convert.load(directory, workload=IdentityOwner()),
            # Any name or file name the flip changed is missing from the shards: only the
            # original (in the index's order) can load.
            lambda t: bit_identical(in_order_of(original, t), original),
        )
    outcomes.assert_clean(len(cases))


# --- the training loop's run.json -------------------------------------------------------------
def test_fuzz_run_json(tmp_path):
    runs = checkpoints.RunCheckpoints(tmp_path / "run")
    state = checkpoints.RunState(
        workload="toy",
        config={"channels": 8, "dropout": 0.1},
        framework="jax",
        precision="bf16",
        seed=12,
        steps=30,
        batch_size=4,
        data="/data/toy",
        data_position=29,
    )
    step = runs.save(state, lambda d: (d / "weights").write_bytes(b"w"))
    where = step / "run.json"
    good = where.read_bytes()
    fields = [f.name for f in dataclasses.fields(checkpoints.RunState)]
    rng = np.random.default_rng(5)
    outcomes = Outcomes()
    cases = [("flip at {}", *flip(good, rng)) for _ in range(40)]
    cases += [("truncated to {}", *truncate(good, rng)) for _ in range(8)]
    for case, pos, data in cases:
        where.write_bytes(data)

        def check(loaded, data=data):
            # Loaded: the file parses as JSON here, and the state is its fields, unchanged
            # where the flip fell in whitespace, a key the reader ignores or a value it keeps.
            raw = json.loads(data)
            got = loaded[0]
            wrong = [
                f
                for f in fields
                if getattr(got, f) != raw[f] or type(getattr(got, f)) is not type(raw[f])
            ]
            return f"fields {wrong} differ from the file" if wrong else None

        outcomes.run(case.format(pos), lambda: checkpoints.read(step), check)
    outcomes.assert_clean(len(cases))
    assert os.listdir(tmp_path / "run") == [step.name]
