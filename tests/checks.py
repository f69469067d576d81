"""Helpers that several test modules share (imported as ``checks``, like ``numpy_reference``).

Framework-free at import: the PyTorch helpers only call methods of the objects they are given.
"""

from __future__ import annotations

import math
import zipfile

import numpy as np

from mlperf_tutor import frameworks


def as_f64(tree: dict) -> dict:
    """``tree`` with every array cast to float64."""
    return {k: v.astype(np.float64) for k, v in tree.items()}


def assert_bit_identical(got: dict, want: dict, ordered: bool = False) -> None:
    """Same keys (in the same order when ``ordered``), dtypes, shapes and bytes."""
    assert (list(got) == list(want)) if ordered else (set(got) == set(want))
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.asarray(got[key]).tobytes() == np.asarray(value).tobytes(), key


def listing(directory) -> set[str]:
    """Every path under ``directory``, relative to it."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def numpy_state(model) -> dict[str, np.ndarray]:
    """A PyTorch module's ``state_dict`` as numpy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def random_tree(tree: dict, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights of ``tree``'s names and shapes (``tree`` maps names to arrays or
    to shape tuples): norm scales near 1, biases N(0, 0.2), other weights N(0, 1 / fan_in)
    (fan_in: a conv's in x kernel, else the last axis), so that no layer starts at zero as
    inits often do."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in tree.items():
        shape = value if isinstance(value, tuple) else tuple(np.shape(value))
        if "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            out[name] = 0.2 * rng.standard_normal(shape)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 2 else shape[-1]
            out[name] = rng.standard_normal(shape) / math.sqrt(fan_in)
    return {k: v.astype(np.float32) for k, v in out.items()}


def randomized(module, seed: int) -> dict[str, np.ndarray]:
    """Load :func:`random_tree` weights into a PyTorch ``module``, put it in eval mode and
    return the weights."""
    tree = random_tree(module.state_dict(), seed)
    frameworks.get("torch").load_canonical(module, tree)
    module.eval()
    return tree


def max_abs(a, b) -> float:
    """The largest absolute difference of two arrays, in float64."""
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def lively_lora(wl, cfg, seed: int = 0, std: float = 0.05) -> dict[str, np.ndarray]:
    """Initial weights of a LoRA workload with random ``lora_b`` (normal, ``std``) instead of
    zeros, so that the adapters change the output and ``lora_a`` gets gradients."""
    tree = wl.init_canonical(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name in tree:
        if name.endswith("lora_b.weight"):
            tree[name] = (std * rng.standard_normal(tree[name].shape)).astype(np.float32)
    return tree


def padded_lora_batch(wl, cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Two sequences of ``wl``'s synthetic batch, the second ending in three padding tokens."""
    batch = wl.synthetic_batch(cfg, batch_size=2, seed=seed)
    batch["attention_mask"][1, -3:] = 0
    batch["labels"][1, -3:] = -100
    return batch


def zip_records(path) -> dict[str, tuple[int, int]]:
    """Record name -> (offset of its first data byte, size) in a zip archive (a ``.pt`` file),
    read from each record's local header."""
    spans = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
            spans[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return spans
