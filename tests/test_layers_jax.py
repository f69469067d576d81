"""The JAX layers built from the framework-free specs (``layers/spec.py``): a transformer block is
made from its ``BlockSpec`` alone, and the models refuse an input longer than ``max_positions``
with the spec's error before they look anything up."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("flax", reason="install the [jax] extra")

from flax import nnx  # noqa: E402

from mlperf_tutor import frameworks, workloads  # noqa: E402
from mlperf_tutor.layers.jax.block import TransformerBlock  # noqa: E402

fj = frameworks.get("jax")
TRANSFORMERS = ["gpt3", "gptj", "bert", "llama2_70b_lora"]
# The arrays with a time axis (axis 1) of each batch; BERT's masked-position lists have none.
TOKEN_KEYS = {"bert": ("input_ids", "segment_ids", "input_mask")}


def lengthened(batch: dict[str, np.ndarray], keys, length: int) -> dict[str, np.ndarray]:
    """``batch`` with the arrays ``keys`` tiled along axis 1 and cut to ``length`` tokens."""
    out = dict(batch)
    for key in keys:
        reps = -(-length // batch[key].shape[1])  # ceil
        out[key] = np.concatenate([batch[key]] * reps, axis=1)[:, :length]
    return out


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_an_input_longer_than_max_positions_is_refused(name):
    wl = workloads.get(name)
    cfg = wl.config("tiny", seq_len=16)
    model = wl.build("jax", cfg)
    batch = wl.synthetic_batch(cfg, batch_size=1)
    keys = TOKEN_KEYS.get(name, tuple(batch))
    too_long = lengthened(batch, keys, cfg.max_positions + 1)
    message = (
        f"the input has {cfg.max_positions + 1} tokens; the model takes at most "
        f"max_positions = {cfg.max_positions}"
    )
    with pytest.raises(ValueError, match=message):
        wl.forward("jax", model, too_long)
    # The longest input the model takes runs.
    longest = lengthened(batch, keys, cfg.max_positions)
    assert np.isfinite(wl.forward("jax", model, longest)["loss"])


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_block_is_its_spec(name):
    # The one argument besides the rngs is the spec: every number of the block comes from it.
    params = inspect.signature(TransformerBlock.__init__).parameters
    assert list(params) == ["self", "spec", "rngs"]
    assert params["rngs"].kind is inspect.Parameter.KEYWORD_ONLY
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    spec = cfg.block_spec()
    block = TransformerBlock(spec, rngs=nnx.Rngs(0))
    assert block.spec is spec
    # The block made from the spec alone has exactly the leaves of the model's first block.
    want = {
        k.removeprefix("blocks.0."): shape
        for k, (shape, _) in wl.canonical_specs(cfg).items()
        if k.startswith("blocks.0.")
    }
    assert {k: v.shape for k, v in fj.to_canonical(block).items()} == want
