"""Stable Diffusion v2 data as the MLPerf reference stores it: webdataset shards of VAE moments
and captions for training, a TSV of COCO-2014 captions for evaluation.

- Training (mlcommons/training ``stable_diffusion/configs/train_32x08x08.yaml``): the tar shards
  ``/datasets/laion-400m/webdataset-moments-filtered/{00000..00831}.tar``, read by webdataset
  with ``keep_only_keys: ["npy", "txt"]``. A sample is the tar members that share a key (the
  member name up to the first dot of its base name): ``<key>.npy``, the VAE encoder's moments
  (mean and log-variance of the 4 latent channels stacked on the channel axis, (8, h, w) or
  (1, 8, h, w), float16 or float32), and ``<key>.txt``, the caption in utf-8. Each time a sample
  is read (every step) a new latent is drawn from the moments, as ldm's
  ``DiagonalGaussianDistribution.sample()`` does, then scaled by 0.18215.
- Evaluation (``validation`` of that config): ``/datasets/coco2014/val2014_30k.tsv``, tab
  separated with a header row ``image_id  id  caption`` (written by pandas, so a caption holding
  a tab, a quote or a newline is quoted with ``"``).

:func:`read_shards` and :class:`LatentCaptionBatches` stream the shards as the reference does;
:class:`ShardIndex` reads their samples in any order (from the tar headers' offsets), which the
workload's ``data_batches`` needs to shuffle whole epochs and to resume at any batch.

Batches follow the workload's format: ``latents`` (B, 4, h, w), ``noise`` (B, 4, h, w),
``timesteps`` (B,) int32 and ``context`` (B, L, D), all float32 but the timesteps.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlperf_tutor.core.files import NPY_HEADER_ERRORS, regular_file
from mlperf_tutor.workloads.stable_diffusion.diffusion import sample_latents

if TYPE_CHECKING:
    from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
    from mlperf_tutor.workloads.stable_diffusion.standins import TextEncoder

MOMENTS, CAPTION = "npy", "txt"  # the reference's keep_only_keys
TSV_COLUMNS = ("image_id", "id", "caption")
# webdataset's split of a member name into key and extension, and its metadata files to skip.
_NAME = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")
_META = re.compile(r"(^|/)__[^/]*__($|/)")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic


class ShardError(ValueError):
    """A training shard that cannot be read (the message names the shard and member)."""


def _reason(error: BaseException) -> str:
    """A library's exception as one line of an error message (theirs can hold newlines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


class CaptionsError(ValueError):
    """A captions TSV file that cannot be read (the message names the file and line)."""


# --- writing shards ------------------------------------------------------------------------------
def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, np.ndarray, str]]) -> None:
    """Write a webdataset tar shard (atomically: a temporary file beside ``path``, then renamed).

    Args:
        path: the ``.tar`` file to write.
        samples: ``(key, moments, caption)`` triples, stored as members ``<key>.npy`` (by
            ``np.save``, in the moments' own float dtype) and ``<key>.txt`` (utf-8).

    Raises:
        ValueError: an empty key, a key with a dot in its base name (webdataset cuts the key
            there), a repeated key, moments that are not a finite float array, or a non-string
            caption.
    """
    from mlperf_tutor.core.io import atomic_file

    members, keys = [], set()
    for i, (key, moments, caption) in enumerate(samples):
        if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample {i}: key {key!r} must be a non-empty name without a dot")
        if key in keys:
            raise ValueError(f"sample {i}: key {key!r} repeats an earlier sample's key")
        moments = np.asarray(moments)
        if not np.issubdtype(moments.dtype, np.floating):
            raise ValueError(f"sample {i} ({key!r}): moments must be floats, not {moments.dtype}")
        if not np.isfinite(moments).all():  # the reader refuses such a shard as corrupt
            bad = int(np.sum(~np.isfinite(moments)))
            raise ValueError(f"sample {i} ({key!r}): moments hold {bad} NaN or infinite values")
        if not isinstance(caption, str):
            raise ValueError(f"sample {i} ({key!r}): the caption must be a str")
        keys.add(key)
        npy = io.BytesIO()
        np.save(npy, moments, allow_pickle=False)
        members += [(f"{key}.{MOMENTS}", npy.getvalue()), (f"{key}.{CAPTION}", caption.encode())]
    with atomic_file(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


# --- reading shards ------------------------------------------------------------------------------
def _members(
    path: Path, random_access: bool = False
) -> Iterator[tuple[str, str, str, bytes | tuple[int, int] | None]]:
    """``(name, key, extension, payload)`` of each sample file in tar order; the payload only
    for the kept extensions: the member's bytes, streamed, or with ``random_access`` its
    ``(offset, size)`` in the file, found from the headers alone (uncompressed tars only).
    Directories, metadata and names without a dot are skipped, as webdataset does."""
    if not path.exists():
        raise ShardError(f"shard {path} does not exist; check the shard paths")
    regular_file(path, ShardError, "shard")
    with open(path, "rb") as file:
        if random_access and file.read(6).startswith(_COMPRESSED):
            raise ShardError(
                f"shard {path} is compressed; reading samples in any order needs uncompressed "
                ".tar shards, as the reference's are (decompress it)"
            )
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        try:
            with tarfile.open(fileobj=file, mode="r:" if random_access else "r|*") as tar:
                for info in tar:
                    match = _NAME.match(info.name)
                    if not info.isfile() or _META.search(info.name) or not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    payload = None
                    if ext in (MOMENTS, CAPTION) and random_access:
                        if info.offset_data + info.size > size:
                            raise ShardError(
                                f"shard {path} is truncated: member {info.name} ends past the "
                                "end of the file; download or write it again"
                            )
                        payload = (info.offset_data, info.size)
                    elif ext in (MOMENTS, CAPTION):
                        payload = tar.extractfile(info).read()
                    yield info.name, key, ext, payload
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError, UnicodeError) as e:
            if isinstance(e, ShardError):
                raise
            raise ShardError(
                f"shard {path} is not a tar file or is truncated ({_reason(e)}); download or "
                "write it again"
            ) from None
        if not _has_end_marker(file):
            raise ShardError(
                f"shard {path} is truncated: it ends without the tar end-of-archive marker (two "
                "zero blocks); download or write it again"
            )


def _has_end_marker(file) -> bool:
    """Whether a tar ends with two zero blocks: tarfile takes a file cut at a member boundary for
    a whole archive. Compressed files pass (their decompressor notices a cut)."""
    file.seek(0)
    if file.read(6).startswith(_COMPRESSED):
        return True
    size = file.seek(0, os.SEEK_END)
    if size < 2 * tarfile.BLOCKSIZE or size % tarfile.BLOCKSIZE:
        return False
    file.seek(size - 2 * tarfile.BLOCKSIZE)
    return not any(file.read(2 * tarfile.BLOCKSIZE))


def _grouped(path: Path, random_access: bool = False) -> Iterator[tuple[str, dict[str, tuple]]]:
    """``(key, {extension: (member name, payload)})`` per sample (payloads as
    :func:`_members` gives them): runs of members with one key, each holding its moments and
    caption."""
    for key, parts in _runs(path, random_access):
        for ext in (MOMENTS, CAPTION):
            if ext not in parts:
                found = ", ".join(name for name, _ in parts.values())
                raise ShardError(
                    f"shard {path}: sample {key!r} has no {key}.{ext} member (it has "
                    f"{found}); every sample needs adjacent moments (.npy) and caption (.txt)"
                )
        yield key, parts


def _runs(path: Path, random_access: bool) -> Iterator[tuple[str, dict[str, tuple]]]:
    key, parts, seen = None, {}, set()
    for name, member_key, ext, data in _members(path, random_access):
        if member_key != key:
            if key is not None:
                yield key, parts
            if member_key in seen:
                raise ShardError(
                    f"shard {path}: member {name} belongs to sample {member_key!r}, whose other "
                    "members came before other samples; a sample's members must be adjacent"
                )
            key, parts = member_key, {}
            seen.add(key)
        if ext in parts:
            raise ShardError(f"shard {path}: member {name} repeats {parts[ext][0]}")
        parts[ext] = (name, data)
    if key is not None:
        yield key, parts


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _npy_header(data: bytes, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of a .npy member's bytes."""
    f = io.BytesIO(data)
    try:
        read = _NPY_HEADERS.get(np.lib.format.read_magic(f))
        if read is None:
            raise ValueError("an unknown .npy version")
        shape, fortran, dtype = read(f)
    except NPY_HEADER_ERRORS as e:
        raise ShardError(f"{where} is not a .npy array ({_reason(e)})") from None
    if dtype.hasobject:
        raise ShardError(f"{where} is not a .npy array of numbers (it holds Python objects)")
    return shape, fortran, dtype, f.tell()


def _moments(
    path: Path, name: str, data: bytes, channels: int, size: int | None, validate: bool = True
) -> np.ndarray:
    # The header is checked before any array is made: a header announcing a huge shape would
    # make np.load allocate it.
    where = f"shard {path}: member {name}"
    shape, fortran, dtype, offset = _npy_header(data, where)
    if dtype.kind != "f":
        raise ShardError(f"{where} has dtype {dtype}; moments must be float16 or float32")
    sample = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
    if len(sample) != 3 or sample[0] != channels:
        raise ShardError(
            f"{where} has shape {shape}; moments must be ({channels}, h, w) or "
            f"(1, {channels}, h, w): the mean and log-variance of {channels // 2} latent channels"
        )
    if size is not None and sample[1:] != (size, size):
        raise ShardError(
            f"{where} holds {sample[1]}x{sample[2]} latents; the config's latent_size is {size}"
        )
    count = math.prod(shape)
    if count * dtype.itemsize > len(data) - offset:
        raise ShardError(
            f"{where} is truncated: its header announces {dtype} {shape}, "
            f"{count * dtype.itemsize} bytes, but the member holds {len(data) - offset}"
        )
    moments = np.frombuffer(data, dtype, count, offset).reshape(
        shape, order="F" if fortran else "C"
    )
    with np.errstate(over="ignore"):  # a float64 too large for float32: inf, refused below
        moments = moments.reshape(sample).astype(np.float32)
    if validate and not np.isfinite(moments).all():
        raise ShardError(f"{where} has {np.sum(~np.isfinite(moments))} NaN or infinite values")
    return moments


def read_shards(
    paths: Iterable[str | os.PathLike],
    latent_channels: int = 4,
    latent_size: int | None = None,
    *,
    validate: bool = True,
) -> Iterator[tuple[str, np.ndarray, str]]:
    """Stream the samples of webdataset shards, in order, without extracting them to disk.

    Members other than ``.npy`` and ``.txt`` are skipped (the reference's ``keep_only_keys``).

    Args:
        paths: the ``.tar`` shards (compressed ones are read too).
        latent_channels: C; the moments must have 2C channels.
        latent_size: when given, the moments must be (2C, latent_size, latent_size).
        validate: check that every moment is finite (no NaN or inf: the latents drawn from
            them would be NaN); ``False`` skips it, to read trusted shards faster.

    Yields:
        ``(key, moments, caption)``: moments (2C, h, w) float32, the caption as stored.

    Raises:
        ShardError: a missing file, a file that is not a tar (or is truncated), a sample without
            its ``.npy`` or ``.txt`` member or whose members are not adjacent, a repeated member,
            moments that are not a float .npy array of the right shape or hold NaN or inf, or a
            caption that is not utf-8.
    """
    for path in map(Path, paths):
        for key, parts in _grouped(path):
            moments = _moments(path, *parts[MOMENTS], 2 * latent_channels, latent_size, validate)
            yield key, moments, _caption(path, *parts[CAPTION])


def _caption(path: Path, name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(f"shard {path}: member {name} is not utf-8 text ({e})") from None


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The shards at ``path``: the ``*.tar`` files of a directory in name order, or the one
    file ``path``.

    Raises:
        ShardError: a directory without ``.tar`` files.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    paths = sorted(p for p in path.iterdir() if p.suffix == ".tar")
    if not paths:
        raise ShardError(f"{path} holds no .tar shards; check the path")
    return paths


class ShardIndex:
    """The samples of uncompressed webdataset shards, read in any order.

    Opening reads every shard's tar headers (not the members' bytes) and checks the samples'
    layout as :func:`read_shards` does: each sample has adjacent ``.npy`` and ``.txt``
    members, nothing repeats, the file is a whole tar. Reading a sample seeks to its two
    members and checks them then (a float .npy of the config's shape without NaN or inf; utf-8
    text).

    Args:
        paths: the ``.tar`` shards, in order (sample ``i`` counts across them).
        latent_channels: C; the moments must have 2C channels.
        latent_size: when given, the moments must be (2C, latent_size, latent_size).
        validate: check that every moment read is finite; ``False`` skips it (see
            :func:`read_shards`).

    Raises:
        ShardError: a missing, compressed, truncated or non-tar file, a sample without its
            moments or caption, members out of place; while reading, a bad member (each message
            names the shard and the member).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        latent_channels: int = 4,
        latent_size: int | None = None,
        *,
        validate: bool = True,
    ):
        self.paths = [Path(p) for p in paths]
        self.channels, self.latent_size = 2 * latent_channels, latent_size
        self.validate = validate
        # Per sample: (shard, key, (moments name, (offset, size)), (caption name, (offset, size)))
        self._samples = [
            (shard, key, parts[MOMENTS], parts[CAPTION])
            for shard, path in enumerate(self.paths)
            for key, parts in _grouped(path, random_access=True)
        ]
        if not self._samples:
            raise ShardError(f"the shards {', '.join(map(str, self.paths))} hold no samples")

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, indices: Iterable[int]) -> list[tuple[str, np.ndarray, str]]:
        """Samples ``indices`` as ``(key, moments (2C, h, w) float32, caption)``, in order;
        each shard they touch is opened once."""
        indices = [int(i) for i in indices]
        out: dict[int, tuple[str, np.ndarray, str]] = {}
        for shard in sorted({self._samples[i][0] for i in indices}):
            path = regular_file(self.paths[shard], ShardError, "shard")
            with open(path, "rb") as file:
                for i in indices:
                    owner, key, (npy_name, npy), (txt_name, txt) = self._samples[i]
                    if owner == shard and i not in out:
                        npy_bytes = _read_at(file, *npy)
                        moments = _moments(
                            path,
                            npy_name,
                            npy_bytes,
                            self.channels,
                            self.latent_size,
                            self.validate,
                        )
                        out[i] = key, moments, _caption(path, txt_name, _read_at(file, *txt))
        return [out[i] for i in indices]


def _read_at(file, offset: int, size: int) -> bytes:
    file.seek(offset)
    return file.read(size)


class LatentCaptionBatches:
    """Training batches from webdataset shards of moments and captions.

    Each pass over the shards (an epoch) reads them in order, or, with a shuffle buffer, in a
    seeded random order through a webdataset-style buffer (the reference shuffles with a
    1000-sample buffer over shards drawn with replacement). A last incomplete batch is dropped
    (the reference's ``partial: False``). Iterating again restarts from ``seed``: the same
    batches.

    Args:
        paths: the shards.
        cfg: a ``StableDiffusionConfig`` (uses latent_channels, latent_size, latent_scale,
            num_timesteps, context_len, context_dim).
        text_encoder: a frozen ``TextEncoder`` (captions -> (B, L, D) float32).
        batch_size: B.
        seed: seeds the shuffle and the latents', noise's and timesteps' draws.
        shuffle_buffer: samples held in the shuffle buffer; 0 keeps the file order.
        epochs: passes over the shards; ``None`` repeats them forever.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        cfg: StableDiffusionConfig,
        text_encoder: TextEncoder,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 0,
        epochs: int | None = 1,
    ):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
        if not self.paths:
            raise ValueError("no shards given; pass the paths of the .tar shards")
        if batch_size < 1 or shuffle_buffer < 0 or (epochs is not None and epochs < 1):
            raise ValueError("batch_size and epochs must be at least 1, shuffle_buffer at least 0")
        shape = (text_encoder.context_len, text_encoder.context_dim)
        if shape != (cfg.context_len, cfg.context_dim):
            raise ValueError(
                f"the text encoder's (context_len, context_dim) is {shape}; the config's is "
                f"{(cfg.context_len, cfg.context_dim)}"
            )
        self.cfg, self.text_encoder, self.batch_size = cfg, text_encoder, batch_size
        self.seed, self.shuffle_buffer, self.epochs = seed, shuffle_buffer, epochs
        self._size = (cfg.latent_channels, cfg.latent_size)

    def _stream(self, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, str]]:
        for _ in itertools.count() if self.epochs is None else range(self.epochs):
            n = len(self.paths)
            order = rng.permutation(n) if self.shuffle_buffer else range(n)
            empty = True
            for sample in read_shards([self.paths[i] for i in order], *self._size):
                empty = False
                yield sample
            if empty:
                raise ShardError(f"the shards {', '.join(map(str, self.paths))} hold no samples")

    def _shuffled(self, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, str]]:
        buffer = []
        for sample in self._stream(rng):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = int(rng.integers(len(buffer)))
            yield buffer[i]
            buffer[i] = sample
        for i in rng.permutation(len(buffer)):
            yield buffer[i]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        order_rng, draw_rng = map(np.random.default_rng, np.random.SeedSequence(self.seed).spawn(2))
        samples = self._shuffled(order_rng) if self.shuffle_buffer else self._stream(order_rng)
        pending = []
        for sample in samples:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._batch(pending, draw_rng)
                pending = []

    def _batch(self, samples, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return make_batch(self.cfg, self.text_encoder, samples, rng)


def make_batch(
    cfg: StableDiffusionConfig,
    text_encoder: TextEncoder,
    samples: Sequence[tuple[str, np.ndarray, str]],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """A training batch of ``(key, moments, caption)`` samples: latents drawn from the moments
    (scaled by ``cfg.latent_scale``), then noise N(0, 1) and timesteps uniform in
    [0, num_timesteps), all from ``rng``; the context is ``text_encoder``'s of the captions."""
    b = len(samples)
    latents = sample_latents(np.stack([m for _, m, _ in samples]), rng, cfg.latent_scale)
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    timesteps = rng.integers(0, cfg.num_timesteps, b).astype(np.int32)
    context = np.asarray(text_encoder([c for _, _, c in samples]), np.float32)
    if context.shape != (b, cfg.context_len, cfg.context_dim):
        raise ValueError(
            f"the text encoder returned shape {context.shape} for {b} captions; expected "
            f"{(b, cfg.context_len, cfg.context_dim)}"
        )
    return {"latents": latents, "noise": noise, "timesteps": timesteps, "context": context}


def write_sample_shards(
    directory: str | os.PathLike,
    moments: np.ndarray,
    captions: Sequence[str],
    shards: int = 2,
) -> Path:
    """Write ``(moments[i], captions[i])`` samples as ``shards`` tar shards named as the
    reference's (``00000.tar``, ...), keys ``000000000``, ... across them; returns
    ``directory``."""
    directory = Path(directory)
    parts = np.array_split(np.arange(len(captions)), max(1, min(shards, len(captions))))
    for i, part in enumerate(parts):
        samples = ((f"{j:09d}", moments[j], captions[j]) for j in part)
        write_shard(directory / f"{i:05d}.tar", samples)
    return directory


# --- the evaluation captions ---------------------------------------------------------------------
def read_captions_tsv(path: str | os.PathLike) -> list[tuple[int, int, str]]:
    """Read the reference's COCO captions TSV (``val2014_30k.tsv``).

    Args:
        path: a tab-separated utf-8 file whose header names ``image_id``, ``id`` and ``caption``
            (other columns are ignored); quoted fields (pandas' ``to_csv``) are unquoted.

    Returns:
        ``(image_id, id, caption)`` per row, in file order.

    Raises:
        CaptionsError: a missing or non-regular file, bytes that are not utf-8, a header
            without the three columns, a row with the wrong number of fields, an id that is
            not an integer in [0, 2**31), an empty caption, or no rows at all (the message
            names the file, the line and the column).
    """
    path = Path(path)
    if not path.exists():
        raise CaptionsError(f"captions file {path} does not exist")
    regular_file(path, CaptionsError, "captions file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(_tsv_rows(csv.reader(f, delimiter="\t"), path))
    except UnicodeDecodeError as e:
        raise CaptionsError(f"captions file {path} is not utf-8 text ({e})") from None
    except csv.Error as e:
        raise CaptionsError(
            f"captions file {path} is not a valid TSV file ({_reason(e)})"
        ) from None
    except OSError as e:
        raise CaptionsError(f"captions file {path} cannot be read ({_reason(e)})") from None
    if not rows:
        raise CaptionsError(f"captions file {path} has a header but no caption rows")
    return rows


def _tsv_rows(reader, path: Path) -> Iterator[tuple[int, int, str]]:
    header = next(reader, None)
    if header is None or not set(TSV_COLUMNS) <= set(header):
        raise CaptionsError(
            f"captions file {path}: the header {header} must name the columns "
            f"{', '.join(TSV_COLUMNS)} (tab separated)"
        )
    where = [header.index(c) for c in TSV_COLUMNS]
    for fields in reader:
        line = f"captions file {path}, line {reader.line_num}"
        if len(fields) != len(header):
            raise CaptionsError(
                f"{line}: has {len(fields)} fields, the header {len(header)} (tab separated)"
            )
        image_id, sample_id, caption = (fields[i] for i in where)
        for column, value in (("image_id", image_id), ("id", sample_id)):
            # COCO's ids: non-negative, and fitting the int32 arrays they may be put in.
            digits = re.fullmatch(r"\s*\+?([0-9]{1,10})\s*", value)
            if not digits or int(digits.group(1)) >= 2**31:
                raise CaptionsError(f"{line}: {column} {value!r} is not an integer in [0, 2**31)")
        if not caption.strip():
            raise CaptionsError(f"{line}: the caption is empty")
        yield int(image_id), int(sample_id), caption


def write_captions_tsv(path: str | os.PathLike, rows: Iterable[tuple[int, int, str]]) -> None:
    """Write ``(image_id, id, caption)`` rows as the reference's TSV (atomically; quoted as
    pandas quotes)."""
    from mlperf_tutor.core.io import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        writer.writerows((int(i), int(j), str(c)) for i, j, c in rows)
