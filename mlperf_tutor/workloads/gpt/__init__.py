"""GPT decoders: GPT-3 (MLPerf Training ``gpt3``) and GPT-J 6B (``gptj``), one implementation.

Forward (same in all three frameworks; B batch, T tokens, D hidden, V padded vocabulary)::

    input_ids (B, T) -> word_embeddings (+ position_embeddings[:T] when learned) -> dropout
    -> L causal blocks:
         GPT-3 (pre-LN):  x = x + attention(attention_norm(x)); x = x + mlp(mlp_norm(x))
         GPT-J (parallel): h = attention_norm(x); x = x + attention(h) + mlp(h)
       (GPT-J's attention rotates the first rotary_dim dims of q and k, interleaved pairs)
    -> final_norm -> logits = x @ word_embeddings.T (tied) or lm_head(x)        (B, T, V)
    loss = mean next-token cross-entropy over labels != -100 (float32 at least)

A batch is ``input_ids`` and ``labels`` (B, T) int32, ``labels[:, t]`` the token after
``input_ids[:, t]`` (Megatron's sample of T + 1 tokens, split); a batch without ``labels``
gives logits only (generation).
"""

from __future__ import annotations

import dataclasses
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
    epoch_rng,
    labelled_tokens,
    new_data_directory,
    token_weighted_loss,
)
from mlperf_tutor.workloads.gpt.config import Gpt3Config, GptConfig, GptjConfig
from mlperf_tutor.workloads.gpt.hf import GPT2_INTEROP, GPTJ_INTEROP
from mlperf_tutor.workloads.recipe import CheckpointStart, Recipe, Target

# MLPerf GPT-3 quality target: log perplexity 2.69 on the C4 validation subset (v4.0 rules).
TARGET_LOG_PERPLEXITY = 2.69
# Parameters without weight decay unless cfg.decay_norms_and_biases (the MLPerf GPT-3 reference
# decays them too): LayerNorm weights and biases, as Megatron's default and AdamW practice do.
NO_DECAY = (r"norm\.", r"bias$")
# Seed of the synthetic language (its transition table) and of the eval set: far from the
# training batches' seeds (seed + 1 + step).
LANGUAGE_SEED = 2**31 - 2
EVAL_SEED = 2**31 - 1


def canonical_shapes(cfg: GptConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every weight (PyTorch layouts: Linear weight is (out, in))."""
    d, f, v = cfg.hidden, cfg.ffn, cfg.padded_vocab_size

    def linear(name, n_in, n_out, bias):
        return {f"{name}.weight": (n_out, n_in)} | ({f"{name}.bias": (n_out,)} if bias else {})

    def norm(name):
        return {f"{name}.weight": (d,), f"{name}.bias": (d,)}

    shapes = {"embeddings.word_embeddings.weight": (v, d)}
    if cfg.position == "learned":
        shapes["embeddings.position_embeddings.weight"] = (cfg.max_positions, d)
    for i in range(cfg.num_layers):
        block = f"blocks.{i}"
        shapes |= norm(f"{block}.attention_norm")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes |= linear(f"{block}.attention.{proj}", d, d, cfg.attention_bias)
        if not cfg.parallel_residual:
            shapes |= norm(f"{block}.mlp_norm")
        shapes |= linear(f"{block}.mlp.fc_in", d, f, cfg.mlp_bias)
        shapes |= linear(f"{block}.mlp.fc_out", f, d, cfg.mlp_bias)
    shapes |= norm("final_norm")
    if not cfg.tie_embeddings:
        shapes |= linear("lm_head", d, v, cfg.lm_head_bias)
    return shapes


def flops_per_token(cfg: GptConfig, training: bool = True) -> float:
    """PaLM's model FLOPs per token (Chowdhery et al. 2022, appendix B): ``6 N + 12 L D T``
    for training (forward + backward), a third of it for a forward. N counts every weight
    matrix the tokens go through, the LM head included and the position table excluded."""
    shapes = canonical_shapes(cfg)
    n = sum(math.prod(s) for k, s in shapes.items() if len(s) == 2 and "position" not in k)
    if cfg.tie_embeddings:
        n += cfg.padded_vocab_size * cfg.hidden  # the tied head is a matmul too
    n -= cfg.padded_vocab_size * cfg.hidden  # the embedding lookup is not
    total = 6 * n + 12 * cfg.num_layers * cfg.hidden * cfg.seq_len
    return total if training else total / 3


class GptWorkload(Workload):
    """A causal language model; GPT-3 and GPT-J are instances with their own configs."""

    package = "mlperf_tutor.workloads.gpt"

    def loss_terms(self, cfg: GptConfig) -> tuple[LossTerm, ...]:
        """One mean over the labelled tokens (the labels are already the next tokens)."""
        return (LossTerm("loss", labelled_tokens(0)),)

    def flops_per_sample(self, cfg: GptConfig) -> float:
        """:func:`flops_per_token` times the sequence's tokens."""
        return flops_per_token(cfg) * cfg.seq_len

    def canonical_shapes(self, cfg: GptConfig) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(cfg)

    def deterministic(self, cfg: GptConfig) -> GptConfig:
        return cfg.replace(dropout=0.0)

    def init_weight(
        self, cfg: GptConfig, name: str, shape: tuple[int, ...], rng: np.random.Generator
    ) -> np.ndarray:
        """The default (norms 1, biases 0, matrices normal with ``cfg.init_std``), except that
        with ``cfg.scaled_residual_init`` the two projections into the residual stream get
        std ``init_std / sqrt(2 L)``."""
        into_residual = len(shape) > 1 and name.endswith(("o_proj.weight", "fc_out.weight"))
        if into_residual and cfg.scaled_residual_init:
            residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
            return residual_std * rng.standard_normal(shape)
        return super().init_weight(cfg, name, shape, rng)

    def synthetic_batch(self, cfg: GptConfig, batch_size: int = 2, seed: int = 0) -> dict:
        """Sequences of a seeded random bigram language (see :func:`data.bigram_sequences`)."""
        from mlperf_tutor.workloads.gpt.data import bigram_sequences, split_tokens

        tokens = bigram_sequences(cfg.vocab_size, batch_size, cfg.seq_len + 1, seed, LANGUAGE_SEED)
        return split_tokens(tokens)

    def batch_check(self, cfg: GptConfig) -> BatchCheck:
        """Input ids and labels below ``vocab_size`` (the padded rows are never used), labels
        -100 where not predicted."""
        from mlperf_tutor.layers.spec import IGNORE_INDEX

        return BatchCheck(
            ids=(
                Ids("input_ids", cfg.vocab_size, "cfg.vocab_size"),
                Ids("labels", cfg.vocab_size, "cfg.vocab_size", ignore=IGNORE_INDEX),
            )
        )

    def write_sample_data(
        self, cfg: GptConfig, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """A Megatron-LM indexed dataset ``directory/sample_text_document.{idx,bin}`` of the
        synthetic bigram language, holding ``samples`` samples of ``seq_len + 1`` tokens (see
        :func:`.data.write_sample_documents`); returns the prefix
        ``directory/sample_text_document``."""
        from mlperf_tutor.workloads.gpt.data import write_sample_documents

        directory = new_data_directory(directory, samples)
        return write_sample_documents(
            directory / "sample_text_document",
            cfg.vocab_size,
            samples,
            cfg.seq_len,
            seed,
            LANGUAGE_SEED,
        )

    def data_batches(
        self,
        cfg: GptConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of Megatron's samples (:class:`~.data.GptSamples` of ``cfg.seq_len``) of
        the indexed dataset at the prefix ``path``; epoch ``e`` is a permutation of the samples
        seeded by ``(seed, e)``, and every token must be below ``cfg.vocab_size``."""
        from mlperf_tutor.workloads.gpt.data import GptSamples, IndexedDataset

        samples = GptSamples(IndexedDataset(path), cfg.seq_len, vocab_size=cfg.vocab_size)

        def epoch(e: int, first: int) -> Iterator[dict[str, np.ndarray]]:
            order = epoch_rng(seed, e).permutation(len(samples))
            for j in range(first, len(samples) // batch_size):
                yield samples.batch(order[j * batch_size : (j + 1) * batch_size])

        return endless_batches(path, len(samples), batch_size, seed, start, epoch)

    def optimizer(self, cfg: GptConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec(
            "adamw",
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            clip_norm=cfg.clip_norm,
            no_decay=() if cfg.decay_norms_and_biases else NO_DECAY,
        )
        schedule = ScheduleSpec(
            cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay="cosine",
            total_steps=cfg.total_steps,
            end_lr=cfg.lr * cfg.end_lr_fraction,
        )
        return spec, schedule

    def recipe(self, cfg: GptConfig) -> Recipe:
        """A run from a checkpoint of ``cfg.init_checkpoint_step`` steps (at ``checkpoint_lr``
        when set), whose optimizer state and step count it continues; no MLPerf benchmark and
        no evaluation (GPT-3 adds them)."""
        if cfg.init_checkpoint_step == 0:
            return Recipe()
        pretraining = cfg if cfg.checkpoint_lr is None else cfg.replace(lr=cfg.checkpoint_lr)
        optimizer, schedule = self.optimizer(pretraining)
        return Recipe(
            checkpoint=CheckpointStart(cfg.init_checkpoint_step, optimizer, schedule, config=cfg)
        )

    def eval_set(self, cfg: GptConfig) -> dict:
        return self.synthetic_batch(cfg, batch_size=cfg.eval_samples, seed=EVAL_SEED)

    def evaluate(self, framework: str, model, eval_set: dict, batch_size: int) -> float:
        """Log perplexity: next-token cross-entropy averaged over every labelled token of
        ``eval_set`` (token-weighted across batches, not a mean of batch means).

        Each batch's mean loss is computed on the device and only that number comes back: the
        logits of one GPT-3 Small batch of 32 are 6.6 GB in float32.
        """
        return token_weighted_loss(self, framework, model, eval_set, batch_size, shift=0)

    def generate(
        self, framework: str, model, cfg: GptConfig, prompt: np.ndarray, new_tokens: int
    ) -> np.ndarray:
        """Greedy decoding: ``prompt`` (B, P) int -> (B, P + new_tokens). Each new token is the
        argmax over the real vocabulary (never a padding row) of the logits at the last
        position; the whole prefix is recomputed every step (no key/value cache)."""
        tokens = np.asarray(prompt, np.int32)
        if tokens.shape[1] + new_tokens > cfg.max_positions:
            raise ValueError(
                f"prompt ({tokens.shape[1]}) + new_tokens ({new_tokens}) exceed the model's "
                f"{cfg.max_positions} positions"
            )
        for _ in range(new_tokens):
            logits = self.forward(framework, model, {"input_ids": tokens})["logits"]
            nxt = logits[:, -1, : cfg.vocab_size].argmax(-1).astype(np.int32)  # (B,)
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
        return tokens

    def info(self, cfg: GptConfig) -> dict:
        n = self.param_count(cfg)
        s = cfg.seq_len
        activations = self.activation_bytes(cfg)  # per sequence (Korthikanti et al. 2022)
        return {
            "workload": self.name,
            "parameters": n,
            "padded vocabulary": cfg.padded_vocab_size,
            "training FLOPs per token (6N + 12LDT)": flops_per_token(cfg),
            "training FLOPs per sequence": flops_per_token(cfg) * s,
            "bf16 weights (GB)": 2 * n / 1e9,
            "fp32 master weights + grads + Adam moments (GB)": 16 * n / 1e9,
            "activations per sequence, 16-bit, no recomputation (GB)": activations / 1e9,
            "global batch size": cfg.global_batch_size,
            "tokens per global batch": cfg.global_batch_size * s,
        }


class Gpt3Workload(GptWorkload):
    name = "gpt3"
    rounds = ("v4.0",)  # the summaries' benchmark columns
    description = "GPT-3 175B causal LM (Adam, cosine); MLPerf target log perplexity 2.69"
    config_class = Gpt3Config
    hf = GPT2_INTEROP  # transformers GPT2LMHeadModel

    def recipe(self, cfg: GptConfig) -> Recipe:
        """MLPerf's ``gpt3``: log perplexity 2.69 (reached from above), evaluated every
        ``cfg.eval_every_samples`` sequences, from the start checkpoint of
        :meth:`GptWorkload.recipe`. The log counts tokens: Google's v4.0 logs evaluate at
        epoch_num 50331648 = 24576 samples x 2048 tokens, and train_samples is in tokens too.
        The logged hyperparameters are the keys of mlperf_logging's
        ``training_4.0.0/closed_gpt3.yaml``, read from the optimizer and schedule that train."""
        spec, schedule = self.optimizer(cfg)
        return dataclasses.replace(
            super().recipe(cfg),
            benchmark="gpt3",
            targets=(Target("log perplexity", TARGET_LOG_PERPLEXITY, higher_is_better=False),),
            eval_every=cfg.eval_every_samples,
            units_per_sample=cfg.seq_len,
            hyperparameters={
                "max_sequence_length": cfg.seq_len,
                "opt_name": "adam",
                "opt_base_learning_rate": schedule.lr,
                "opt_end_learning_rate": schedule.end_lr,
                "opt_learning_rate_decay_steps": schedule.total_steps,
                "opt_learning_rate_warmup_steps": schedule.warmup_steps,
                "opt_learning_rate_decay_schedule": "cosine with linear warmup",
                "opt_adam_beta_1": spec.beta1,
                "opt_adam_beta_2": spec.beta2,
                "opt_adam_epsilon": spec.eps,
                "opt_gradient_clip_norm": spec.clip_norm,
                "opt_weight_decay": spec.weight_decay,
                "init_checkpoint_step": cfg.init_checkpoint_step,
            },
        )


class GptjWorkload(GptWorkload):
    name = "gptj"
    suite = "inference"  # an MLPerf Inference model; the book trains it as a GPT exercise
    description = (
        "GPT-J 6B causal LM (rotary, parallel blocks), AdamW; not an MLPerf Training benchmark"
    )
    config_class = GptjConfig
    hf = GPTJ_INTEROP  # transformers GPTJForCausalLM


GPT3 = Gpt3Workload()
GPTJ = GptjWorkload()
