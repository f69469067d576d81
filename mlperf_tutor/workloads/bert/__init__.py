"""BERT-large pre-training (MLPerf Training ``bert``): masked LM + next-sentence prediction.

Reference: mlcommons/training ``language_model/tensorflow/bert`` (run_pretraining.py,
modeling.py, optimization.py); Devlin et al., "BERT", NAACL 2019.

Forward (same in all three frameworks; B batch, S tokens, P masked positions, D hidden)::

    input_ids, segment_ids (B, S) -> word + position + token-type embeddings -> norm (LayerNorm)
    -> L post-LN blocks: x = attention_norm(x + attention(x, mask)); x = mlp_norm(x + mlp(x))
    mlm: gather x at masked_lm_positions (B, P, D) -> mlm_head.dense -> gelu -> mlm_head.norm
         -> x @ word_embeddings.T + mlm_head.bias                    -> mlm_logits (B, P, V)
    nsp: pooler.dense(x[:, 0]) -> tanh -> nsp_head                   -> nsp_logits (B, 2)
    loss = mean CE over real masked positions (masked_lm_positions != 0) + mean NSP CE

Padded keys get -10000 added to their attention scores, as in the reference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.batch import BatchCheck, Ids
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.workloads.base import (
    LossTerm,
    Workload,
    endless_batches,
    examples,
    new_data_directory,
)
from mlperf_tutor.workloads.bert import hf
from mlperf_tutor.workloads.bert.config import MLM_DENOMINATOR_EPS, BertConfig
from mlperf_tutor.workloads.bert.data import TARGET_MLM_ACCURACY, masked_lm_counts
from mlperf_tutor.workloads.recipe import Recipe, Target

# Token ids of the synthetic data (the real WordPiece vocabulary has [CLS] 101, [SEP] 102,
# [MASK] 103; [PAD] is 0 in both).
PAD, CLS, SEP, MASK = 0, 1, 2, 3
NUM_SPECIAL = 4

# The reference excludes "LayerNorm", "layer_norm" and "bias" from weight decay and from LAMB's
# trust ratio; in our canonical names every LayerNorm is a module called "...norm".
NO_DECAY = (r"norm\.", r"bias$")

# Seed of the synthetic eval set. Training batches use seeds seed + 1 + step (small numbers), so
# this one is far from them: the eval set is held out and the same for every run.
EVAL_SEED = 2**31 - 1


def canonical_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every weight (PyTorch layouts: Linear weight is (out, in))."""
    d, f, v = cfg.hidden, cfg.ffn, cfg.vocab_size

    def linear(name, n_in, n_out):
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    def norm(name):
        return {f"{name}.weight": (d,), f"{name}.bias": (d,)}

    shapes = {
        "embeddings.word_embeddings.weight": (v, d),
        "embeddings.position_embeddings.weight": (cfg.max_positions, d),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        **norm("embeddings.norm"),
    }
    for i in range(cfg.num_layers):
        block = f"blocks.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes |= linear(f"{block}.attention.{proj}", d, d)
        shapes |= norm(f"{block}.attention_norm")
        shapes |= linear(f"{block}.mlp.fc_in", d, f) | linear(f"{block}.mlp.fc_out", f, d)
        shapes |= norm(f"{block}.mlp_norm")
    shapes |= linear("pooler.dense", d, d)
    shapes |= linear("mlm_head.dense", d, d) | norm("mlm_head.norm")
    shapes["mlm_head.bias"] = (v,)  # the decoder's weight is tied to the word embeddings
    shapes |= linear("nsp_head", d, 2)
    return shapes


def mlperf_eval_every_samples(batch_size: int) -> int:
    """Training samples between two evaluations at global batch size ``batch_size``, by the
    MLPerf Training rules (training_rules.adoc, BERT evaluation frequency):
    floor(0.05 * (230.23 * B + 3e6) / 25e3) * 25e3 (175,000 at B = 3584, 225,000 at 8192)."""
    return math.floor(0.05 * (230.23 * batch_size + 3_000_000) / 25_000) * 25_000


def encoder_flops_per_token(cfg: BertConfig) -> int:
    """Forward multiply-adds x 2 of one token through the encoder (matmuls only)."""
    d, f, s = cfg.hidden, cfg.ffn, cfg.seq_len
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * s * d  # projections, MLP, QK^T and AV
    return cfg.num_layers * per_layer


class BertWorkload(Workload):
    name = "bert"
    rounds = ("v4.0", "v5.0")  # the summaries' benchmark columns
    description = "BERT-large pre-training (masked LM + NSP), LAMB; MLPerf target 0.720 MLM acc"
    config_class = BertConfig
    package = "mlperf_tutor.workloads.bert"
    hf = hf.INTEROP  # transformers BertForPreTraining interop (framework-free)

    def loss_terms(self, cfg: BertConfig) -> tuple[LossTerm, ...]:
        """The masked-LM mean over masked positions (position 0, [CLS], pads; the denominator
        carries the reference's ``MLM_DENOMINATOR_EPS``) and the next-sentence mean over
        examples."""

        def masked(batch) -> float:
            return float(np.count_nonzero(batch["masked_lm_positions"])) + MLM_DENOMINATOR_EPS

        return (LossTerm("mlm_loss", masked), LossTerm("nsp_loss", examples))

    def flops_per_sample(self, cfg: BertConfig) -> float:
        """Three times the encoder's forward matmul FLOPs (:func:`encoder_flops_per_token`)
        over the sequence: forward and backward; the heads are left out."""
        return 3 * encoder_flops_per_token(cfg) * cfg.seq_len

    def canonical_shapes(self, cfg: BertConfig) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(cfg)

    def deterministic(self, cfg: BertConfig) -> BertConfig:
        return cfg.replace(dropout=0.0)

    def synthetic_batch(self, cfg: BertConfig, batch_size: int = 2, seed: int = 0) -> dict:
        """Sentence pairs of Zipf-distributed tokens, masked like the reference's data.

        ``[CLS] A [SEP] B [SEP] [PAD]...``; 15% of the real tokens (at most ``max_predictions``)
        are picked, and of those 80% become [MASK], 10% a random token and 10% stay.
        ``masked_lm_positions``/``ids`` are zero-padded, as in the MLPerf HDF5 shards.
        """
        rng = np.random.default_rng(seed)
        s, p = cfg.seq_len, cfg.max_predictions
        words = np.arange(NUM_SPECIAL, cfg.vocab_size)
        zipf = 1.0 / (np.arange(words.size) + 10.0)
        zipf /= zipf.sum()
        batch = {
            "input_ids": np.zeros((batch_size, s), np.int32),
            "segment_ids": np.zeros((batch_size, s), np.int32),
            "input_mask": np.zeros((batch_size, s), np.int32),
            "masked_lm_positions": np.zeros((batch_size, p), np.int32),
            "masked_lm_ids": np.zeros((batch_size, p), np.int32),
            "next_sentence_labels": rng.integers(0, 2, batch_size).astype(np.int32),
        }
        for b in range(batch_size):
            n = int(rng.integers(s // 2, s + 1))  # real tokens, specials included
            a = int(rng.integers(1, n - 3))  # tokens of sentence A
            tokens = rng.choice(words, size=n, p=zipf).astype(np.int32)
            tokens[0], tokens[a + 1], tokens[n - 1] = CLS, SEP, SEP
            batch["input_ids"][b, :n] = tokens
            batch["segment_ids"][b, a + 2 : n] = 1
            batch["input_mask"][b, :n] = 1
            candidates = np.flatnonzero(tokens >= NUM_SPECIAL)
            k = min(p, max(1, round(n * cfg.mask_prob)), candidates.size)
            positions = np.sort(rng.choice(candidates, size=k, replace=False))
            batch["masked_lm_positions"][b, :k] = positions
            batch["masked_lm_ids"][b, :k] = tokens[positions]
            roll = rng.random(k)
            replaced = tokens[positions].copy()
            replaced[roll < 0.8] = MASK
            random_tokens = rng.choice(words, size=k)
            replaced[(roll >= 0.8) & (roll < 0.9)] = random_tokens[(roll >= 0.8) & (roll < 0.9)]
            batch["input_ids"][b, positions] = replaced
        return batch

    def batch_check(self, cfg: BertConfig) -> BatchCheck:
        """Token ids below the vocabulary, segment ids below ``type_vocab_size``, mask and
        next-sentence labels 0 or 1, masked positions inside the sequence (a sequence longer than
        ``max_positions`` is refused by the position embeddings)."""
        vocab = "cfg.vocab_size"
        return BatchCheck(
            ids=(
                Ids("input_ids", cfg.vocab_size, vocab),
                Ids("segment_ids", cfg.type_vocab_size, "cfg.type_vocab_size"),
                Ids("input_mask", 2, "a mask: 0 or 1"),
                Ids("masked_lm_positions", "input_ids", "positions in the sequence"),
                Ids("masked_lm_ids", cfg.vocab_size, vocab),
                Ids("next_sentence_labels", 2, "next-sentence labels: 0 or 1"),
            )
        )

    def write_sample_data(
        self, cfg: BertConfig, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """MLPerf HDF5 shards (``part_0000i_of_00002.hdf5``) of :meth:`synthetic_batch` rows;
        returns ``directory``."""
        from mlperf_tutor.workloads.bert.data import write_sample_shards

        directory = new_data_directory(directory, samples)
        return write_sample_shards(directory, self.synthetic_batch(cfg, samples, seed))

    def data_batches(
        self,
        cfg: BertConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the HDF5 shards at ``path`` (a shard, or a directory of them) through
        :class:`~.data.HDF5Shards`, whose epoch ``e`` shuffles shards and rows by
        ``(seed, e)``; sequence length, predictions and vocabulary are ``cfg``'s."""
        from mlperf_tutor.workloads.bert.data import HDF5Shards

        shards = HDF5Shards(path, cfg.seq_len, cfg.max_predictions, vocab_size=cfg.vocab_size)
        return endless_batches(
            path,
            shards.num_rows,
            batch_size,
            seed,
            start,
            lambda epoch, first: shards.batches(batch_size, seed, epoch, start=first),
        )

    def optimizer(self, cfg: BertConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec(
            "lamb",
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            no_decay=NO_DECAY,
            clip_norm=cfg.clip_norm,
        )
        schedule = ScheduleSpec(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            start_warmup_step=cfg.start_warmup_step,
            decay="polynomial",
            total_steps=cfg.total_steps,
            power=1.0,
            end_lr=0.0,
        )
        return spec, schedule

    def recipe(self, cfg: BertConfig) -> Recipe:
        """MLPerf's ``bert``: masked-LM accuracy 0.720, evaluated every ``cfg.eval_every_samples``
        or by the rules' formula of the batch size (:func:`mlperf_eval_every_samples`).

        The logged hyperparameters are the keys of mlperf_logging's
        ``training_4.0.0/closed_bert.yaml``, plus two mllog constants it does not require (the
        decay power and the sequence length), so the log states the whole schedule. They are
        read from the optimizer and schedule that train, so the log cannot disagree with them.
        """
        spec, schedule = self.optimizer(cfg)
        every = cfg.eval_every_samples
        return Recipe(
            benchmark="bert",
            targets=(Target("masked-LM accuracy", TARGET_MLM_ACCURACY),),
            eval_every=mlperf_eval_every_samples if every is None else every,
            hyperparameters={
                "opt_base_learning_rate": schedule.lr,
                "opt_lamb_epsilon": spec.eps,
                "opt_lamb_learning_rate_decay_poly_power": schedule.power,
                "opt_lamb_weight_decay_rate": spec.weight_decay,
                "opt_lamb_beta_1": spec.beta1,
                "opt_lamb_beta_2": spec.beta2,
                "opt_learning_rate_warmup_steps": schedule.warmup_steps,
                "num_warmup_steps": schedule.warmup_steps,
                "start_warmup_step": schedule.start_warmup_step,
                "opt_learning_rate_training_steps": schedule.total_steps,
                "max_sequence_length": cfg.seq_len,
            },
        )

    def eval_set(self, cfg: BertConfig) -> dict:
        # One draw of all rows, so that the set does not depend on the eval batch size.
        return self.synthetic_batch(cfg, batch_size=cfg.eval_samples, seed=EVAL_SEED)

    def evaluate(self, framework: str, model, eval_set: dict, batch_size: int) -> float:
        """Masked-LM accuracy over all of ``eval_set``: correct over real masked positions,
        summed across batches as the reference does (not a mean of batch accuracies)."""
        correct = total = 0
        for start in range(0, len(eval_set["input_ids"]), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in eval_set.items()}
            logits = self.forward(framework, model, batch)["mlm_logits"]
            c, t = masked_lm_counts(logits, batch)
            correct, total = correct + c, total + t
        return correct / total

    def info(self, cfg: BertConfig) -> dict:
        n = self.param_count(cfg)
        d, v, s, p = cfg.hidden, cfg.vocab_size, cfg.seq_len, cfg.max_predictions
        forward = s * encoder_flops_per_token(cfg) + 2 * p * (d * d + d * v) + 2 * 2 * d * d
        activations = self.activation_bytes(cfg)  # per sequence (Korthikanti et al. 2022)
        return {
            "workload": self.name,
            "parameters": n,
            "forward FLOPs per sequence": forward,
            "training FLOPs per sequence (3x forward)": 3 * forward,
            "fp32 weights (GB)": 4 * n / 1e9,
            "weights + grads + LAMB moments, fp32 (GB)": 16 * n / 1e9,
            "activations per sequence, 16-bit (GB)": activations / 1e9,
            "global batch size": cfg.global_batch_size,
        }


WORKLOAD = BertWorkload()
