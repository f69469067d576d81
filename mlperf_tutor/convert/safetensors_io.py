"""Safetensors files, read and written one tensor at a time.

Layout (https://huggingface.co/docs/safetensors/index): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON ``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin,
end]}, "__metadata__": {str: str}}``, then the tensors' raw little-endian bytes, offsets counted
from the end of the header.

Two ways to read. :meth:`SafetensorsReader.mapped` maps the whole file once, copy-on-write: every
tensor is a lazy view, nothing is read until used (``convert.load``). Iterating reads each tensor
into its own buffer with a plain file read (``convert.convert`` and ``iter_tensors``): pages of a
mapping count toward the process's RSS until the mapping goes, and one mapping per tensor would
cost one file descriptor per live tensor (``mmap`` duplicates it), whereas a buffer is freed the
moment the consumer drops it, so streaming holds only the tensors still in use.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from mlperf_tutor.convert.tensors import Reader, TensorSpec, native
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.files import regular_file
from mlperf_tutor.core.io import atomic_file

_TO_NUMPY = {
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
_TO_NUMPY = {k: np.dtype(v) for k, v in _TO_NUMPY.items()}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}

# The reference implementation refuses larger headers; a bigger length means a corrupt file.
_MAX_HEADER = 100_000_000
_ALIGN = 8


def _count(value) -> bool:
    """Whether a JSON value is a non-negative integer (``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class SafetensorsReader(Reader):
    """An open safetensors file: its specs from the header, and its tensors on demand.

    Use as a context manager. The header is validated completely on opening, as the reference
    library does (a regular file; UTF-8 JSON without repeated names; known dtypes; shapes and
    offsets as non-negative integers, byte counts without overflow; tensors tiling the data
    section exactly), so a truncated or corrupt file fails before any tensor is read.
    As a :class:`~mlperf_tutor.convert.tensors.Reader`, :meth:`tensors` reads each tensor into
    its own buffer and :meth:`tree` maps the file (see the module's docstring).

    Args:
        path: the ``.safetensors`` file.
    """

    streams = True

    def __init__(self, path: str | os.PathLike):
        self.path = regular_file(path, CheckpointError, "safetensors file")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror or e}") from e
        try:
            self.specs, self.metadata, self._offsets = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a valid safetensors file ({what}); it is corrupt or truncated, "
            "re-save or re-download it"
        )

    def _read_header(self):
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._corrupt("empty file" if size == 0 else f"only {size} bytes")
        n = int.from_bytes(self._file.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise self._corrupt(f"header of {n} bytes in a file of {size} bytes")
        raw = self._file.read(n)
        if len(raw) != n:
            raise self._corrupt("the header was cut short while reading")
        header = self._parse(raw)
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._corrupt("field __metadata__ is not an object of strings")
        data_start, data_size = 8 + n, size - 8 - n
        specs, spans = {}, {}
        for name, entry in header.items():
            specs[name], spans[name] = self._entry(name, entry)
        # As the reference library checks: tensors tile the data section exactly, in offset
        # order, without gap or overlap, and nothing follows the last one.
        end = 0
        for name in sorted(spans, key=lambda k: spans[k]):
            begin, stop = spans[name]
            if begin != end:
                how = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
                raise self._corrupt(f"tensor {name!r}: field data_offsets [{begin}, {stop}] {how}")
            end = stop
        if end != data_size:
            raise self._corrupt(
                f"the tensors hold {end} data bytes, the file has {data_size} after the header"
            )
        offsets = {k: data_start + begin for k, (begin, _) in spans.items()}
        return specs, metadata, offsets

    def _parse(self, raw: bytes) -> dict:
        """The header's JSON object, or one error: not UTF-8, not JSON, nested too deeply, an
        integer too long, NaN, a repeated name."""

        def no_repeats(pairs):
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                repeated = sorted({k for k in keys if keys.count(k) > 1})
                raise ValueError(f"names {repeated} appear twice")
            return dict(pairs)

        try:
            header = json.loads(
                raw.decode("utf-8"), object_pairs_hook=no_repeats, parse_constant=_no_constant
            )
        except UnicodeDecodeError as e:
            raise self._corrupt(f"the header is not UTF-8 ({e.reason} at byte {e.start})") from None
        except RecursionError:
            raise self._corrupt("the header is nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, an over-long integer, NaN, a repeated name
            raise self._corrupt(f"the header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._corrupt("the header is not a JSON object")
        return header

    def _entry(self, name: str, entry) -> tuple[TensorSpec, tuple[int, int]]:
        """A header entry's spec and [begin, end) data span, checked field by field."""
        if not isinstance(entry, dict):
            raise self._corrupt(f"tensor {name!r} is not described by a JSON object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _TO_NUMPY:
            raise self._corrupt(
                f"tensor {name!r}: field dtype {dtype!r} is not one of {sorted(_TO_NUMPY)}"
            )
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise self._corrupt(
                f"tensor {name!r}: field shape {shape!r} is not a list of non-negative integers"
            )
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
            raise self._corrupt(
                f"tensor {name!r}: field data_offsets {offsets!r} is not two non-negative integers"
            )
        spec = TensorSpec(tuple(shape), _TO_NUMPY[dtype])
        # numpy's limits: 64 dimensions, and a size in bytes that fits its index type (a zero
        # dimension does not make [0, 2**70] allocatable).
        nonzero = math.prod(d for d in shape if d) * spec.dtype.itemsize
        if len(shape) > 64 or nonzero >= 2**63:
            raise self._corrupt(f"tensor {name!r}: field shape {shape} is too large for an array")
        begin, end = offsets
        if end - begin != spec.nbytes:
            raise self._corrupt(
                f"tensor {name!r}: field data_offsets {offsets} spans {end - begin} bytes, but "
                f"shape {shape} of {dtype} needs {spec.nbytes}"
            )
        return spec, (begin, end)

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name``, read into a new array (owned and writable)."""
        spec, offset = self.specs[name], self._offsets[name]
        out = np.empty(spec.shape, spec.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._file.seek(offset)
        if self._file.readinto(view) != spec.nbytes:
            raise self._corrupt(f"{name!r} was cut short while reading")
        return out

    def mapped(self) -> dict[str, np.ndarray]:
        """Every tensor as a view of one copy-on-write mapping (writable; the file is unchanged)."""
        if not self.specs:
            return {}
        buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        tree = {}
        for name, spec in self.specs.items():
            offset = self._offsets[name]
            if spec.nbytes == 0 or offset % spec.dtype.itemsize:
                # A misaligned tensor (legal, but written neither by us nor by the reference
                # library) would be an unaligned array that some consumers reject: copy it.
                tree[name] = self.tensor(name)
            else:
                count = spec.nbytes // spec.dtype.itemsize
                tree[name] = np.frombuffer(buf, spec.dtype, count, offset).reshape(spec.shape)
        return tree

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.specs:
            yield name, self.tensor(name)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return self.tensors()

    def tree(self) -> dict[str, np.ndarray]:
        return self.mapped()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self


def header_bytes(
    specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed header for ``specs`` and each tensor's absolute file offset.

    Tensors are laid out by decreasing item size (then in ``specs`` order) after a header
    padded to 8 bytes, so every tensor starts aligned to its item size and can be mapped.
    """
    layout = sorted(specs, key=lambda k: -specs[k].dtype.itemsize)
    offsets, pos = {}, 0
    for name in layout:
        offsets[name] = pos
        pos += specs[name].nbytes
    # The header lists tensors in ``specs`` order, which readers keep as the tree's order.
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, spec in specs.items():
        if spec.dtype not in _FROM_NUMPY:
            raise CheckpointError(f"safetensors cannot store {name!r} of dtype {spec.dtype}")
        header[name] = {
            "dtype": _FROM_NUMPY[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offsets[name], offsets[name] + spec.nbytes],
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    data_start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: data_start + v for k, v in offsets.items()}


def _write_behind(f, offset: int, size: int) -> None:
    """Start writing a finished range to disk now and let the kernel drop it from the cache.

    Left alone, gigabytes of dirty pages pile up until the kernel throttles the writer to the
    disk's pace in bursts (measured: 400-900 MB/s instead of 900-2500 MB/s for 2 GB); started
    early, writeback runs alongside the next tensor's read, and a converted checkpoint does not
    evict everything else from the page cache. Linux only; elsewhere a no-op.
    """
    if hasattr(os, "posix_fadvise") and size:
        f.flush()
        os.posix_fadvise(f.fileno(), offset, size, os.POSIX_FADV_DONTNEED)


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically, one tensor at a time.

    The header is written first from ``specs``; each tensor from ``tensors`` (any order) is then
    written at its offset and may be released by the producer right after.

    Args:
        path: destination ``.safetensors`` file.
        specs: name -> spec of every tensor that will come.
        tensors: (name, array) pairs, each name of ``specs`` exactly once.
        metadata: the header's ``__metadata__`` (default ``{"format": "pt"}``, which the
            Hugging Face loaders expect of PyTorch-layout weights).

    Raises:
        CheckpointError: a tensor is missing, repeated, unknown or differs from its spec
            (nothing is written).
    """
    header, offsets = header_bytes(specs, metadata)
    written = set()
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for name, array in tensors:
            spec = specs.get(name)
            if spec is None or name in written:
                raise CheckpointError(f"tensor {name!r} is unexpected or repeated for {path}")
            if (tuple(array.shape), np.dtype(array.dtype)) != tuple(spec):
                raise CheckpointError(
                    f"tensor {name!r} for {path} is {array.shape} {array.dtype}, "
                    f"expected {spec.shape} {spec.dtype}"
                )
            f.seek(offsets[name])
            f.write(memoryview(native(array).reshape(-1).view(np.uint8)))
            _write_behind(f, offsets[name], spec.nbytes)
            written.add(name)
            del array  # streaming: not held while the producer reads the next one
        missing = sorted(set(specs) - written)
        if missing:
            raise CheckpointError(f"tensors {missing} never arrived for {path}")
        # Empty tensors write no bytes: make the file end exactly where the header says.
        f.truncate(max([len(header)] + [offsets[k] + specs[k].nbytes for k in specs]))
