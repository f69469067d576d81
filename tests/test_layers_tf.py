"""The Keras layers read their spec and nothing else, and the models refuse an input longer than
``max_positions`` with the spec's own ValueError (as torch and JAX do)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="install the [tf] extra")
pytest.importorskip("keras", reason="install the [tf] extra")

from mlperf_tutor import workloads  # noqa: E402
from mlperf_tutor.layers.tf.attention import Attention  # noqa: E402
from mlperf_tutor.layers.tf.block import TransformerBlock  # noqa: E402
from mlperf_tutor.layers.tf.conv import SpatialTransformer  # noqa: E402
from mlperf_tutor.layers.tf.mlp import MLP  # noqa: E402

# The arrays with a time axis, per workload (BERT's masked positions and NSP labels have none).
TOKEN_KEYS = {
    "gpt3": ("input_ids", "labels"),
    "gptj": ("input_ids", "labels"),
    "bert": ("input_ids", "segment_ids", "input_mask"),
    "llama2_70b_lora": ("input_ids", "attention_mask", "labels"),
}


def too_long(batch: dict, keys: tuple[str, ...], length: int) -> dict:
    """``batch`` with the arrays of ``keys`` tiled along their time axis and cut to ``length``."""
    out = dict(batch)
    for key in keys:
        reps = -(-length // batch[key].shape[1])
        out[key] = np.tile(batch[key], (1, reps))[:, :length]
    return out


@pytest.mark.parametrize("name", sorted(TOKEN_KEYS))
def test_input_longer_than_max_positions_gets_the_specs_error(name):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    limit = cfg.max_positions
    with pytest.raises(ValueError) as want:
        cfg.block_spec().check_length(limit + 1)
    model = wl.build("tf", cfg)
    batch = too_long(wl.synthetic_batch(cfg, batch_size=2, seed=0), TOKEN_KEYS[name], limit + 1)
    assert batch["input_ids"].shape == (2, limit + 1)
    with pytest.raises(ValueError, match=re.escape(str(want.value))):
        wl.forward("tf", model, batch)


def _specs():
    block = workloads.get("llama2_70b_lora").config("tiny").block_spec()  # with LoRA
    return {
        "Attention": (Attention, block.attention),
        "MLP": (MLP, block.mlp),
        "TransformerBlock": (TransformerBlock, block),
    }


@pytest.mark.parametrize("layer", ["Attention", "MLP", "TransformerBlock"])
def test_layer_takes_a_spec_and_keras_arguments_only(layer):
    cls, spec = _specs()[layer]
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "spec", "kwargs"]
    with pytest.raises(ValueError, match="Unrecognized keyword arguments.*num_heads"):
        cls(spec, num_heads=2)
    config = cls(spec, name="x", dtype="float64").get_config()
    # The config is the spec's fields plus Keras' own keys, nothing written a second time.
    assert config["spec"] == dataclasses.asdict(spec)
    assert set(config) == {"spec", "name", "trainable", "dtype"}
    rebuilt = cls.from_config(json.loads(json.dumps(config)))  # as a saved model reads it
    assert rebuilt.spec == spec and rebuilt.dtype_policy.name == "float64"


def test_spatial_transformer_config_rebuilds_its_block_spec():
    cfg = workloads.get("stable_diffusion").config("tiny")
    layer = SpatialTransformer(cfg.block_spec(64), depth=2, groups=8, norm_eps=1e-6)
    rebuilt = SpatialTransformer.from_config(json.loads(json.dumps(layer.get_config())))
    assert rebuilt.spec == cfg.block_spec(64) and len(rebuilt.transformer_blocks) == 2
    assert (rebuilt.groups, rebuilt.norm_eps) == (8, 1e-6)
