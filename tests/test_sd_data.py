"""Stable Diffusion data: the reference's webdataset shards of VAE moments and captions (written by
:func:`write_shard` and by plain ``tarfile`` as webdataset writes them), latent sampling, the
batches, the COCO captions TSV, and the frozen numpy stand-ins of the tiny preset."""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest

from mlperf_tutor.workloads.stable_diffusion import standins
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.data import (
    CaptionsError,
    LatentCaptionBatches,
    ShardError,
    ShardIndex,
    read_captions_tsv,
    read_shards,
    sample_latents,
    write_captions_tsv,
    write_shard,
)

CFG = StableDiffusionConfig.preset("tiny")  # latent_size 8, context 8 x 32


def _moments(seed: int, shape=(8, 8, 8), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


SAMPLES = [(f"{i:09d}", _moments(i), f"caption number {i} \u00e9") for i in range(5)]


def _plain_tar(path, members) -> None:
    """A tar as webdataset's TarWriter leaves it: ``(name, bytes)`` members in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            tar.addfile(info, io.BytesIO(data))


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _good_members(n: int = 2) -> list[tuple[str, bytes]]:
    members = []
    for key, moments, caption in SAMPLES[:n]:
        members += [(f"{key}.npy", _npy(moments)), (f"{key}.txt", caption.encode())]
    return members


# --- shards --------------------------------------------------------------------------------------
def test_write_shard_round_trip(tmp_path):
    write_shard(tmp_path / "00000.tar", SAMPLES)
    got = list(read_shards([tmp_path / "00000.tar"]))
    assert [k for k, _, _ in got] == [k for k, _, _ in SAMPLES]
    for (_, m, c), (_, want_m, want_c) in zip(got, SAMPLES, strict=True):
        assert m.dtype == np.float32 and np.array_equal(m, want_m) and c == want_c
    assert not [p for p in tmp_path.iterdir() if p.name != "00000.tar"]  # no temporary left


def test_reads_plain_tar_shards_float16_and_batched_moments(tmp_path):
    half = _moments(7, (1, 8, 8, 8), np.float16)  # (1, 8, h, w) as encode(...).numpy() saves it
    members = [("./dir/", b""), ("a.npy", _npy(half)), ("a.txt", b"first"), ("a.json", b"{}")]
    members += [("__meta__", b"x"), ("sub/b.txt", b"second"), ("sub/b.NPY", _npy(_moments(8)))]
    _plain_tar(tmp_path / "00001.tar", members)
    got = list(read_shards([tmp_path / "00001.tar"]))
    assert [(k, c) for k, _, c in got] == [("a", "first"), ("sub/b", "second")]
    assert np.array_equal(got[0][1], half[0].astype(np.float32)) and got[0][1].shape == (8, 8, 8)
    assert np.array_equal(got[1][1], _moments(8))


def test_reads_several_shards_in_order_and_gzipped_ones(tmp_path):
    write_shard(tmp_path / "0.tar", SAMPLES[:2])
    with tarfile.open(tmp_path / "1.tar.gz", "w:gz") as tar:
        for name, data in _good_members(4)[4:]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = [k for k, _, _ in read_shards([tmp_path / "0.tar", tmp_path / "1.tar.gz"])]
    assert got == [k for k, _, _ in SAMPLES[:4]]


def _sample(npy: bytes, txt: bytes = b"x") -> list[tuple[str, bytes]]:
    return [("k.npy", npy), ("k.txt", txt)]


BAD_SHARDS = {
    "missing txt": ([("k.npy", _npy(_moments(0)))], r"sample 'k' has no k\.txt member"),
    "missing npy": ([("k.txt", b"hi")], r"sample 'k' has no k\.npy member"),
    "wrong channels": (_sample(_npy(_moments(0, (6, 8, 8)))), r"k\.npy has shape \(6, 8, 8\)"),
    "wrong rank": (_sample(_npy(_moments(0, (8, 64)))), r"k\.npy has shape \(8, 64\)"),
    "integers": (_sample(_npy(np.zeros((8, 8, 8), np.int32))), r"k\.npy has dtype int32"),
    "nan": (_sample(_npy(np.full((8, 8, 8), np.nan, np.float16))), r"k\.npy has 512 NaN"),
    "not npy": (_sample(b"not an array"), r"k\.npy is not a \.npy array"),
    "pickled": (_sample(_npy(np.array([{}], object))), r"k\.npy is not a \.npy array"),
    "not utf-8": (_sample(_npy(_moments(0)), b"\xff\xfe"), r"k\.txt is not utf-8"),
    "repeated": ([("k.txt", b"x"), ("k.txt", b"y")], r"member k\.txt repeats k\.txt"),
    "split sample": (
        [
            *_sample(_npy(_moments(0))),
            ("j.txt", b"y"),
            ("j.npy", _npy(_moments(1))),
            ("k.json", b""),
        ],
        r"member k\.json belongs to sample 'k', whose other members came before",
    ),
}


def _read_all_indexed(paths) -> list[tuple[str, np.ndarray, str]]:
    """Every sample through ShardIndex, in reverse order: the random-access reader."""
    index = ShardIndex(paths)
    return index.read(range(len(index) - 1, -1, -1))


READERS = {"stream": lambda paths: list(read_shards(paths)), "index": _read_all_indexed}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", BAD_SHARDS)
def test_bad_samples_raise_one_clear_error(tmp_path, case, reader):
    members, match = BAD_SHARDS[case]
    path = tmp_path / "00002.tar"
    _plain_tar(path, members)
    with pytest.raises(ShardError, match=rf"^shard {path}: .*{match}") as e:
        READERS[reader]([path])
    assert "\n" not in str(e.value)


def test_shard_index_reads_samples_in_any_order(tmp_path):
    write_shard(tmp_path / "0.tar", SAMPLES[:2])
    members = [("./dir/", b""), ("__meta__", b"x"), *_good_members(5)[4:]]
    _plain_tar(tmp_path / "1.tar", [(n, d) for n, d in members if not n.startswith("000000004")])
    write_shard(tmp_path / "2.tar", SAMPLES[4:])
    index = ShardIndex([tmp_path / f"{i}.tar" for i in range(3)], latent_size=8)
    assert len(index) == 5
    picks = [4, 0, 3, 0, 2]
    for (key, moments, caption), i in zip(index.read(picks), picks, strict=True):
        assert (key, caption) == (SAMPLES[i][0], SAMPLES[i][2])
        assert moments.dtype == np.float32 and np.array_equal(moments, SAMPLES[i][1])
    with pytest.raises(ShardError, match=r"member 000000000\.npy holds 8x8 latents"):
        ShardIndex([tmp_path / "0.tar"], latent_size=4).read([0])


def test_shard_index_refuses_compressed_empty_and_truncated_shards(tmp_path):
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("k.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ShardError, match=r"s\.tar\.gz is compressed; .* uncompressed"):
        ShardIndex([tmp_path / "s.tar.gz"])
    _plain_tar(tmp_path / "empty.tar", [("./dir/", b"")])
    with pytest.raises(ShardError, match=r"empty\.tar hold no samples"):
        ShardIndex([tmp_path / "empty.tar"])
    write_shard(tmp_path / "full.tar", SAMPLES)
    data = (tmp_path / "full.tar").read_bytes()
    end = -(-len(data.rstrip(b"\0")) // 512) * 512
    for cut in [*range(0, end + 1024, 512), 700, 1600, 3000]:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match=r"shard .*cut\.tar (is not a tar file or )?is trunc"):
            ShardIndex([tmp_path / "cut.tar"])


def test_missing_not_tar_and_truncated_shards_raise_one_clear_error(tmp_path):
    with pytest.raises(ShardError, match=r"shard .*nope\.tar does not exist"):
        list(read_shards([tmp_path / "nope.tar"]))
    (tmp_path / "text.tar").write_text("this is not a tar file at all\n" * 40)
    with pytest.raises(ShardError, match=r"shard .*text\.tar is not a tar file"):
        list(read_shards([tmp_path / "text.tar"]))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"shard .*empty\.tar is not a tar file"):
        list(read_shards([tmp_path / "empty.tar"]))
    write_shard(tmp_path / "full.tar", SAMPLES)
    data = (tmp_path / "full.tar").read_bytes()
    end = -(-len(data.rstrip(b"\0")) // 512) * 512  # the end of the last member's last block
    for cut in [*range(0, end + 1024, 512), 700, 1600, 3000]:  # at and between block boundaries
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match=r"shard .*cut\.tar (is not a tar file or )?is trunc"):
            list(read_shards([tmp_path / "cut.tar"]))


def test_latent_size_is_checked_against_the_config(tmp_path):
    write_shard(tmp_path / "s.tar", [("k", _moments(0, (8, 4, 4)), "x")])
    with pytest.raises(ShardError, match=r"member k\.npy holds 4x4 latents; the config's.* 8"):
        list(read_shards([tmp_path / "s.tar"], latent_size=8))


@pytest.mark.parametrize(
    "key, match",
    [
        ("", "non-empty"),
        ("a.b", "without a dot"),
        ("ok", "repeats"),
        ("bad", "must be floats"),
        ("nan", "hold 2 NaN or infinite values"),
    ],
)
def test_write_shard_refuses_bad_samples(tmp_path, key, match):
    samples = [("ok", _moments(0), "x"), (key, _moments(1), "y")]
    if key == "bad":
        samples[1] = ("bad", np.zeros((8, 2, 2), np.int64), "y")
    if key == "nan":  # the reader would refuse the shard as corrupt
        moments = _moments(1).copy()
        moments.flat[[0, 5]] = [np.nan, -np.inf]
        samples[1] = ("nan", moments, "y")
    with pytest.raises(ValueError, match=match):
        write_shard(tmp_path / "w.tar", samples)
    assert not list(tmp_path.iterdir())


# --- latents and batches -------------------------------------------------------------------------
def test_sample_latents_has_the_posterior_mean_and_variance():
    mean = np.array([0.5, -1.0, 2.0, 0.0], np.float32)[:, None, None] * np.ones(
        (4, 2, 2), np.float32
    )
    logvar = np.log(np.array([0.25, 1.0, 4.0, 1e-4], np.float32))[:, None, None] * np.ones(
        (4, 2, 2)
    )
    moments = np.broadcast_to(np.concatenate([mean, logvar]), (20000, 8, 2, 2))
    z = sample_latents(moments, np.random.default_rng(0), 0.5)
    assert z.shape == (20000, 4, 2, 2) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.5 * mean[:, 0, 0], atol=0.01)
    np.testing.assert_allclose(
        z.var(axis=(0, 2, 3)), 0.25 * np.array([0.25, 1, 4, 1e-4]), rtol=0.03
    )
    rng = np.random.default_rng(1)
    assert not np.array_equal(
        sample_latents(moments[:1], rng, 1), sample_latents(moments[:1], rng, 1)
    )
    huge = np.concatenate([np.zeros((4, 2, 2)), np.full((4, 2, 2), 1e4)])  # clipped at 20
    assert np.abs(sample_latents(huge, rng, 1)).max() < 6 * np.exp(10)
    with pytest.raises(ValueError, match="2C, h, w"):
        sample_latents(np.zeros((7, 2, 2)), rng, 1)


class Recorder:
    """A TextEncoder that remembers the captions it saw."""

    def __init__(self):
        self.inner, self.seen = standins.StandInTextEncoder(CFG.context_len, CFG.context_dim), []
        self.context_len, self.context_dim = self.inner.context_len, self.inner.context_dim

    def __call__(self, captions):
        self.seen += list(captions)
        return self.inner(captions)


def test_batches_have_the_batch_format_and_are_seeded(tmp_path):
    write_shard(tmp_path / "0.tar", SAMPLES[:3])
    write_shard(tmp_path / "1.tar", SAMPLES[3:])
    shards = [tmp_path / "0.tar", tmp_path / "1.tar"]
    recorder = Recorder()
    batches = list(LatentCaptionBatches(shards, CFG, recorder, batch_size=2, seed=3, epochs=2))
    assert len(batches) == 5  # 10 samples in 2 epochs
    assert recorder.seen == [c for _, _, c in SAMPLES] * 2  # file order, no shuffle
    b = batches[0]
    assert b["latents"].shape == b["noise"].shape == (2, 4, 8, 8) and b["timesteps"].shape == (2,)
    assert b["context"].shape == (2, 8, 32) and b["timesteps"].dtype == np.int32
    assert all(b[k].dtype == np.float32 for k in ("latents", "noise", "context"))
    assert all(0 <= t < CFG.num_timesteps for x in batches for t in x["timesteps"])
    # sample 0 of epoch 2 (batch 2, row 1) gets a new latent draw from the same moments
    assert not np.array_equal(batches[0]["latents"][0], batches[2]["latents"][1])
    again = list(LatentCaptionBatches(shards, CFG, Recorder(), batch_size=2, seed=3, epochs=2))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again, strict=True) for k in x)
    other = next(iter(LatentCaptionBatches(shards, CFG, Recorder(), batch_size=2, seed=4)))
    assert not np.array_equal(other["latents"], b["latents"])


def test_shuffle_buffer_permutes_every_sample_once_per_epoch(tmp_path):
    samples = [(f"k{i}", _moments(i), f"c{i}") for i in range(12)]
    write_shard(tmp_path / "0.tar", samples[:6])
    write_shard(tmp_path / "1.tar", samples[6:])
    recorder = Recorder()
    batches = LatentCaptionBatches(
        [tmp_path / "0.tar", tmp_path / "1.tar"], CFG, recorder, 3, seed=0, shuffle_buffer=4
    )
    assert len(list(batches)) == 4
    assert sorted(recorder.seen) == sorted(c for _, _, c in samples)
    assert recorder.seen != [c for _, _, c in samples]
    forever = LatentCaptionBatches(
        [tmp_path / "0.tar"], CFG, Recorder(), 4, shuffle_buffer=2, epochs=None
    )
    assert len(list(itertools.islice(forever, 10))) == 10  # 40 samples from a 6-sample shard


def test_batches_refuse_mismatches_and_empty_shards(tmp_path):
    write_shard(tmp_path / "0.tar", SAMPLES[:1])
    wrong = standins.StandInTextEncoder(77, 1024)
    with pytest.raises(
        ValueError, match=r"text encoder's \(context_len, context_dim\) is \(77, 1024\)"
    ):
        LatentCaptionBatches([tmp_path / "0.tar"], CFG, wrong, 1)
    _plain_tar(tmp_path / "empty.tar", [])
    batches = LatentCaptionBatches([tmp_path / "empty.tar"], CFG, Recorder(), 1, epochs=None)
    with pytest.raises(ShardError, match="hold no samples"):
        next(iter(batches))


# --- the captions TSV ----------------------------------------------------------------------------
def test_captions_tsv_round_trip_with_quoting(tmp_path):
    rows = [(9, 1, "A dog."), (9, 2, 'She said "hi"\tthere'), (4, 7, "two\nlines")]
    write_captions_tsv(tmp_path / "val.tsv", rows)
    assert read_captions_tsv(tmp_path / "val.tsv") == rows
    (tmp_path / "plain.tsv").write_text("id\tcaption\timage_id\n5\ta cat on a mat\t42\n")
    assert read_captions_tsv(tmp_path / "plain.tsv") == [(42, 5, "a cat on a mat")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("image_id\tcaption\n1\tx\n", r"header \['image_id', 'caption'\] must name the columns"),
        ("image_id\tid\tcaption\n", "has a header but no caption rows"),
        ("image_id\tid\tcaption\n1\t2\ta\n1\t2\n", "line 3: has 2 fields, the header 3"),
        ("image_id\tid\tcaption\n1\tx2\ta\n", "line 2: id 'x2' is not an integer"),
        ("image_id\tid\tcaption\n1\t2\t  \n", "line 2: the caption is empty"),
        ("", "header None must name"),
    ],
)
def test_bad_captions_tsv_raise_one_clear_error(tmp_path, text, match):
    (tmp_path / "c.tsv").write_text(text)
    with pytest.raises(CaptionsError, match=rf"^captions file {tmp_path / 'c.tsv'}.*{match}"):
        read_captions_tsv(tmp_path / "c.tsv")


def test_captions_tsv_missing_or_not_utf8(tmp_path):
    with pytest.raises(CaptionsError, match=r"captions file .*none\.tsv does not exist"):
        read_captions_tsv(tmp_path / "none.tsv")
    (tmp_path / "latin.tsv").write_bytes(b"image_id\tid\tcaption\n1\t2\tcaf\xe9\n")
    with pytest.raises(CaptionsError, match="is not utf-8 text"):
        read_captions_tsv(tmp_path / "latin.tsv")


# --- stand-ins -----------------------------------------------------------------------------------
def test_synthetic_batch_shapes_ranges_and_seeds():
    b = standins.synthetic_batch(CFG, 16, seed=5)
    assert set(b) == {"latents", "noise", "timesteps", "context"}
    assert b["latents"].shape == b["noise"].shape == (16, 4, 8, 8)
    assert b["timesteps"].shape == (16,) and b["timesteps"].dtype == np.int32
    assert b["context"].shape == (16, 8, 32)
    assert all(
        b[k].dtype == np.float32 and np.isfinite(b[k]).all()
        for k in ("latents", "noise", "context")
    )
    assert 0 <= b["timesteps"].min() and b["timesteps"].max() < CFG.num_timesteps
    assert 0.3 < b["latents"].std() < 2  # scaled latents of roughly unit spread, like SD's
    same, other = (
        standins.synthetic_batch(CFG, 16, seed=5),
        standins.synthetic_batch(CFG, 16, seed=6),
    )
    assert all(np.array_equal(b[k], same[k]) for k in b)
    assert not np.array_equal(b["latents"], other["latents"])
    captions = standins.random_captions(np.random.default_rng(5), 16)  # the batch's captions
    np.testing.assert_array_equal(b["context"], standins.StandInTextEncoder(8, 32)(captions))


def test_text_encoder_is_frozen_and_tells_captions_apart():
    encoder = standins.StandInTextEncoder(8, 32)
    assert isinstance(encoder, standins.TextEncoder)
    captions = ["a red square on a blue background", "a red circle on a blue background", ""]
    out = encoder(captions)
    assert out.shape == (3, 8, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out, standins.StandInTextEncoder(8, 32)(captions))
    assert np.abs(out[0] - out[1]).max() > 0.5 and not np.array_equal(out[1], out[2])
    np.testing.assert_allclose(out.std(-1), 1, rtol=1e-5)  # LayerNorm-like per token
    ids = encoder.tokenize(["A red zebra!", "one two three four five six seven eight nine"])
    assert ids[0, 0] == standins.BOS and ids[0, 4:].tolist() == [standins.EOS] * 4
    assert ids[0, 3] >= 2 + len(standins.WORDS)  # "zebra" lands in a hashed bucket
    assert ids[1, -1] == standins.EOS and standins.EOS not in ids[1, :-1]  # cut, EOS kept last
    assert not np.array_equal(standins.StandInTextEncoder(8, 32, seed=1)(captions), out)


def test_autoencoder_inverts_patch_constant_images():
    vae = standins.StandInAutoencoder()
    assert isinstance(vae, standins.Autoencoder) and vae.factor == 8
    patches = np.random.default_rng(0).random((3, 3, 4, 5))
    images = patches.repeat(8, axis=2).repeat(8, axis=3).astype(np.float32)  # (3, 3, 32, 40)
    moments = vae.encode(images)
    assert moments.shape == (3, 8, 4, 5) and moments.dtype == np.float32
    np.testing.assert_allclose(moments[:, 4:], np.log(1e-4), rtol=1e-6)
    np.testing.assert_allclose(vae.decode(moments[:, :4]), images, atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(vae.matrix, compute_uv=False), [18, 17, 16])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(np.zeros((1, 3, 12, 16)))


def test_render_draws_centred_shapes_and_refuses_other_captions():
    images = standins.render(
        ["a red square on a blue background", "a white cross on a black background"], CFG
    )
    assert images.shape == (2, 3, 64, 64) and images.dtype == np.float32
    np.testing.assert_allclose(images[0, :, 32, 32], standins.COLORS["red"], rtol=1e-6)
    np.testing.assert_allclose(images[0, :, 0, 0], standins.COLORS["blue"], rtol=1e-6)
    np.testing.assert_allclose(images[0, :, 17, 17], standins.COLORS["red"], rtol=1e-6)
    np.testing.assert_allclose(
        images[1, :, 17, 17], standins.COLORS["black"], rtol=1e-6
    )  # a corner
    assert len(set(standins.all_captions())) == 90
    with pytest.raises(ValueError, match="'a purple square on a blue background' is not"):
        standins.render(["a purple square on a blue background"], 64)


def test_clip_stand_in_scores_prototypes_high_and_noise_near_zero():
    captions = standins.random_captions(np.random.default_rng(0), 32)
    prototypes = standins.render(captions, CFG)

    def cosine(images):
        img, txt = standins.clip_embeddings(images, captions, CFG)
        return np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)

    np.testing.assert_allclose(cosine(prototypes), 1, rtol=1e-6)
    assert np.abs(cosine(np.random.default_rng(1).random(prototypes.shape))).mean() < 0.05
    features = standins.image_features(prototypes)
    assert features.shape == (32, 48) and features.dtype == np.float32
    with pytest.raises(ValueError, match="config's 64"):
        standins.clip_embeddings(prototypes[:, :, :32, :32], captions, CFG)
