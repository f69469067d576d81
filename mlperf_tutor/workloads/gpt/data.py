"""GPT data: a synthetic bigram language, next-token batches and log perplexity.

Batches are dicts of int32 arrays: ``input_ids`` and ``labels`` (B, T), where ``labels[:, t]``
is the token after ``input_ids[:, t]`` (a sample of T + 1 tokens split in two, as Megatron's
GPT dataset does) and ``-100`` marks tokens that are not predicted.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
# Next tokens each token may be followed by in the synthetic language: entropy about
# log(BRANCHING) nats per token at best (~1.95 for 7), below the MLPerf target of 2.69, so a
# tiny model trained on it crosses the target.
BRANCHING = 7


def bigram_table(vocab_size: int, language_seed: int) -> np.ndarray:
    """(V, V) row-stochastic transition matrix: each token has ``BRANCHING`` likely successors
    (random, Zipf-weighted) plus a little mass on every token, so any sequence is possible."""
    rng = np.random.default_rng(language_seed)
    table = np.full((vocab_size, vocab_size), 0.02 / vocab_size)
    weights = 1.0 / np.arange(1, BRANCHING + 1)
    for token in range(vocab_size):
        successors = rng.choice(vocab_size, size=min(BRANCHING, vocab_size), replace=False)
        table[token, successors] += 0.98 * weights[: successors.size] / weights[: successors.size].sum()
    return table / table.sum(axis=1, keepdims=True)


def bigram_sequences(
    vocab_size: int, batch_size: int, length: int, seed: int, language_seed: int
) -> np.ndarray:
    """(batch_size, length) int32 token sequences sampled from :func:`bigram_table`."""
    cumulative = np.cumsum(bigram_table(vocab_size, language_seed), axis=1)  # (V, V)
    rng = np.random.default_rng(seed)
    tokens = np.empty((batch_size, length), np.int32)
    tokens[:, 0] = rng.integers(0, vocab_size, batch_size)
    draws = rng.random((batch_size, length))
    for t in range(1, length):
        rows = cumulative[tokens[:, t - 1]]  # (B, V)
        tokens[:, t] = np.minimum((rows < draws[:, t : t + 1]).sum(axis=1), vocab_size - 1)
    return tokens


def split_tokens(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of T + 1 tokens (B, T + 1) -> ``{"input_ids", "labels"}``, each (B, T) int32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"samples must be (B, T + 1) with T >= 1, got shape {tokens.shape}")
    return {
        "input_ids": tokens[:, :-1].astype(np.int32),
        "labels": tokens[:, 1:].astype(np.int32),
    }


def token_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of labelled tokens), in float64.

    ``logits`` (B, T, V), ``labels`` (B, T); labels equal to ``-100`` are skipped. The mean,
    sum / count over a whole eval set, is the log perplexity MLPerf's GPT-3 target is set in.
    """
    logits = np.asarray(logits, np.float64)
    keep = labels != IGNORE_INDEX  # (B, T)
    picked = logits[keep]  # (M, V)
    top = picked.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(picked - top).sum(axis=-1)) + top[:, 0]  # (M,)
    target = np.take_along_axis(picked, labels[keep][:, None].astype(np.int64), axis=-1)[:, 0]
    return float((log_z - target).sum()), int(keep.sum())
