"""Language-model losses in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlperf_tutor.layers.spec import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T) over the labels that
    are not ``IGNORE_INDEX`` (sum / count), in float32 at least (float64 models stay float64).

    The caller aligns them: ``labels[:, t]`` is the token that ``logits[:, t]`` predicts.
    """
    # bf16 logits would lose the softmax's precision. F.cross_entropy's "mean" with ignore_index
    # is the sum over the labelled tokens divided by their count.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
