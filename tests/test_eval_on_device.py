"""The language models' evaluation keeps the logits on the device: only each batch's mean loss
comes back, and the token-weighted result equals the float64 cross-entropy of the full logits.

(On a GPU, the logits of one GPT-3 Small eval batch of 32 are 6.6 GB in float32; copying them to
the host and reducing them there in float64 stalled `mlperf-tutor train gpt3 --device gpu` at its
first evaluation.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.workloads.gpt.data import token_cross_entropy
from mlperf_tutor.workloads.llama.data import answer_cross_entropy

pytestmark = pytest.mark.requires("torch", "jax", "tf")

REFERENCE = {"gpt3": token_cross_entropy, "llama2_70b_lora": answer_cross_entropy}


@pytest.mark.parametrize("framework", ["torch", "jax", "tf"])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_eval_loss_is_token_weighted_from_device_losses(name, framework):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    if name == "gpt3":
        cfg = cfg.replace(seq_len=256)  # tiny's 2048 tokens only make the test slower
    model = wl.build(framework, cfg, weights=wl.init_canonical(cfg))
    eval_set = {k: v[:3] for k, v in wl.eval_set(cfg).items()}
    # Batches of unequal token counts, so a mean of batch means would differ from the answer.
    eval_set["labels"] = eval_set["labels"].copy()
    eval_set["labels"][0, : eval_set["labels"].shape[1] // 2] = -100

    seen = []
    forward = wl.forward

    def spy(framework, model, batch, train=False, outputs=None):
        out = forward(framework, model, batch, train=train, outputs=outputs)
        seen.append(sorted(out))
        return out

    wl.forward = spy
    try:
        got = wl.evaluate(framework, model, eval_set, batch_size=2)
    finally:
        del wl.forward
    assert seen == [["loss"]] * 2  # batches of 2 and 1: the logits never came to the host

    logits = forward(framework, model, eval_set)["logits"]
    total, count = REFERENCE[name](logits, eval_set["labels"])
    batch_means = np.mean(
        [
            np.divide(*REFERENCE[name](logits[s : s + 2], eval_set["labels"][s : s + 2]))
            for s in (0, 2)
        ]
    )
    assert abs(got - total / count) <= 1e-6 * abs(total / count)
    assert abs(batch_means - total / count) > 1e-4  # the check above can tell them apart
