"""The PyTorch layers read their spec and nothing else, and the models refuse inputs longer than
``max_positions`` with the spec's words."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec
from mlperf_tutor.layers.torch.attention import Attention
from mlperf_tutor.layers.torch.block import TransformerBlock
from mlperf_tutor.layers.torch.mlp import MLP
from mlperf_tutor.layers.torch.norms import RMSNorm

LANGUAGE_MODELS = ("gpt3", "gptj", "bert", "llama2_70b_lora")


def longer_than_max_positions(wl, cfg) -> dict[str, np.ndarray]:
    """A synthetic batch whose token-level arrays (those as long as ``input_ids``) are tiled
    along the time axis to ``max_positions + 1``; per-example arrays (BERT's masked positions
    and next-sentence labels) stay as they are."""
    batch = wl.synthetic_batch(cfg, batch_size=2, seed=0)
    t, length = batch["input_ids"].shape[1], cfg.max_positions + 1
    return {
        k: np.tile(v, (1, math.ceil(length / t)))[:, :length] if v.shape[:2] == (2, t) else v
        for k, v in batch.items()
    }


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_input_longer_than_max_positions_is_refused(name):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    model = wl.build("torch", cfg)
    batch = longer_than_max_positions(wl, cfg)
    assert batch["input_ids"].shape == (2, cfg.max_positions + 1)
    message = (
        f"the input has {cfg.max_positions + 1} tokens; the model takes at most "
        f"max_positions = {cfg.max_positions}"
    )
    with pytest.raises(ValueError, match=message):
        wl.forward("torch", model, batch)


@pytest.mark.parametrize("layer", [Attention, MLP, TransformerBlock])
def test_layers_take_one_spec_and_refuse_anything_else(layer):
    assert list(inspect.signature(layer).parameters) == ["spec"]
    spec = BlockSpec(AttentionSpec(8, 2), MlpSpec(8, 16), norm_eps=1e-5)
    with pytest.raises(TypeError, match=f"{layer.__name__} takes a"):
        layer(spec.attention if layer is TransformerBlock else spec)


def test_transformer_block_is_built_from_its_spec_alone():
    with pytest.raises(TypeError):
        TransformerBlock(8, 2, 16, norm_eps=1e-5)  # the keyword signature is gone
    for name in LANGUAGE_MODELS:
        cfg = workloads.get(name).config("tiny")
        spec = cfg.block_spec()
        block = TransformerBlock(spec)
        assert block.spec is spec and block.attention.spec is spec.attention
        assert block.mlp.spec is spec.mlp
        # The spec alone gives the workload's block: the same names and shapes as its first.
        want = {
            k.removeprefix("blocks.0."): shape
            for k, (shape, _) in workloads.get(name).canonical_specs(cfg).items()
            if k.startswith("blocks.0.")
        }
        assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == want, name
    # A field of the spec changes the block; there is nothing else to set.
    spec = BlockSpec(AttentionSpec(8, 2), MlpSpec(8, 16), norm_eps=1e-5, norm_position="pre")
    parallel = TransformerBlock(dataclasses.replace(spec, norm_position="parallel"))
    assert hasattr(TransformerBlock(spec), "mlp_norm") and not hasattr(parallel, "mlp_norm")
    rms = TransformerBlock(dataclasses.replace(spec, norm="rmsnorm"))
    assert isinstance(rms.attention_norm, RMSNorm) and isinstance(rms.mlp_norm, RMSNorm)
