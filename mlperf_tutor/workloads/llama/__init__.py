"""Llama 2 70B LoRA fine-tuning (MLPerf Training ``llama2_70b_lora``) in three frameworks.

Forward (same in all three frameworks; B batch, T tokens, D hidden, V vocabulary)::

    input_ids (B, T) -> word_embeddings -> L causal blocks, each
        x = x + attention(attention_norm(x))    RMSNorm; fused qkv_proj -> N query heads and
                                                K key/value heads (grouped), rotary on every
                                                head dim (Llama's "half" pairs), o_proj
        x = x + mlp(mlp_norm(x))                SwiGLU: fc_out(silu(fc_gate(x)) * fc_in(x))
    -> final_norm -> lm_head                    logits (B, T, V)
    loss = mean cross-entropy of labels[:, t + 1] given positions <= t, over labels != -100

With LoRA (``lora_rank > 0``) ``qkv_proj`` and ``o_proj`` add ``(alpha / r) lora_b(lora_a(
dropout(x)))``; only ``lora_a`` and ``lora_b`` are trained (gradients, optimizer state), the base
weights stay frozen. Batches are the reference's: ``input_ids``, ``attention_mask`` and
``labels`` (B, T) int32, labels aligned with ``input_ids`` and -100 on the prompt.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mlperf_tutor.core.batch import BatchCheck, Ids
from mlperf_tutor.core.checkpoint import Tree
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.base import (
    LossTerm,
    Workload,
    endless_batches,
    epoch_rng,
    labelled_tokens,
    new_data_directory,
    token_weighted_loss,
)
from mlperf_tutor.workloads.llama import hf
from mlperf_tutor.workloads.llama.config import LORA_TARGETS, LlamaConfig
from mlperf_tutor.workloads.recipe import CheckpointStart, Recipe, Target

# Seeds of the synthetic languages (their successor tables) and of the eval set: far from the
# training batches' seeds (seed + 1 + step).
LANGUAGE_SEEDS = {"general": 2**31 - 5, "summary": 2**31 - 4}
EVAL_SEED = 2**31 - 3
# MLPerf llama2_70b_lora quality target: eval loss 0.925 on the GovReport validation set.
TARGET_EVAL_LOSS = 0.925


def canonical_shapes(cfg: LlamaConfig, adapters: bool = True) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every weight (PyTorch layouts: Linear weight is (out, in));
    with ``adapters`` the LoRA weights too (when ``cfg.lora_rank > 0``)."""
    d, f, v, r = cfg.hidden, cfg.ffn, cfg.vocab_size, cfg.lora_rank
    outputs = {"qkv_proj": cfg.qkv_dim, "o_proj": d}
    shapes = {"word_embeddings.weight": (v, d)}
    for i in range(cfg.num_layers):
        block = f"blocks.{i}"
        shapes[f"{block}.attention_norm.weight"] = (d,)
        for proj, n_out in outputs.items():
            shapes[f"{block}.attention.{proj}.weight"] = (n_out, d)
            if adapters and r and proj in LORA_TARGETS:
                shapes[f"{block}.attention.{proj}.lora_a.weight"] = (r, d)
                shapes[f"{block}.attention.{proj}.lora_b.weight"] = (n_out, r)
        shapes[f"{block}.mlp_norm.weight"] = (d,)
        shapes[f"{block}.mlp.fc_gate.weight"] = (f, d)
        shapes[f"{block}.mlp.fc_in.weight"] = (f, d)
        shapes[f"{block}.mlp.fc_out.weight"] = (d, f)
    shapes["final_norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def adapter_count(cfg: LlamaConfig) -> int:
    """Number of LoRA adapter parameters (the trained ones)."""
    return sum(math.prod(s) for k, s in canonical_shapes(cfg).items() if is_adapter(k))


def flops_per_token(cfg: LlamaConfig, lora: bool = True) -> float:
    """Model FLOPs of one training token, PaLM-style (Chowdhery et al. 2022, appendix B).

    Full fine-tuning: ``6 N + 12 L D T`` (N: the weight matrices a token goes through, the head
    included, the embedding lookup not). LoRA: the forward (2 N) and the gradient with respect
    to the activations (2 N) still cross every frozen matrix, but no weight gradient is formed
    for them, so ``4 N + 6 N_adapters + 12 L D T``. Causal masking is not discounted.
    """
    shapes = canonical_shapes(cfg, adapters=False)
    n = sum(math.prod(s) for k, s in shapes.items() if len(s) == 2 and "embeddings" not in k)
    attention = 12 * cfg.num_layers * cfg.hidden * cfg.seq_len
    if not lora:
        return 6 * n + attention
    return 4 * n + 6 * adapter_count(cfg) + attention


def _adapter_init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    # PEFT's init: lora_a kaiming_uniform(a=sqrt(5)), i.e. uniform in +-1/sqrt(in); lora_b 0.
    if name.endswith("lora_b.weight"):
        return np.zeros(shape)
    bound = 1.0 / math.sqrt(shape[1])
    return rng.uniform(-bound, bound, shape)


def init_adapters(cfg: LlamaConfig, seed: int = 0) -> Tree:
    """Fresh adapters alone (``lora_b`` zero: a no-op), without drawing the base weights: what
    a base checkpoint gets when a LoRA model is built from it."""
    rng = np.random.default_rng(seed)
    return {
        name: _adapter_init(name, shape, rng).astype(np.float32)
        for name, shape in canonical_shapes(cfg).items()
        if is_adapter(name)
    }


class LlamaLoraWorkload(Workload):
    name = "llama2_70b_lora"
    rounds = ("v4.0", "v5.0", "v5.1")  # the summaries' benchmark columns
    description = (
        "Llama 2 70B LoRA fine-tuning (GQA, rotary, SwiGLU, RMSNorm); MLPerf target eval "
        "loss 0.925 on GovReport"
    )
    config_class = LlamaConfig
    package = "mlperf_tutor.workloads.llama"
    hf = hf.INTEROP  # transformers LlamaForCausalLM interop (PEFT adapters: workloads.llama.peft)

    def build(
        self,
        framework: str,
        cfg: LlamaConfig,
        weights: Tree | str | os.PathLike | None = None,
        **options,
    ):
        """As :meth:`Workload.build`; a base checkpoint without adapters (a Hugging Face
        directory, say) gets freshly initialised adapters, as PEFT's ``get_peft_model`` does."""
        if isinstance(weights, (str, os.PathLike)):
            from mlperf_tutor import convert

            weights = convert.load(weights, workload=self, cfg=cfg)
        if weights is not None and cfg.lora_rank and not any(is_adapter(k) for k in weights):
            weights = {**weights, **init_adapters(cfg, seed=0)}
        return super().build(framework, cfg, weights, **options)

    def loss_terms(self, cfg: LlamaConfig) -> tuple[LossTerm, ...]:
        """One mean over the labelled tokens after the first (the model predicts
        ``labels[:, t + 1]``)."""
        return (LossTerm("loss", labelled_tokens(1)),)

    def flops_per_sample(self, cfg: LlamaConfig) -> float:
        """:func:`flops_per_token` (LoRA's count when the config has adapters) times the
        sequence's tokens."""
        return flops_per_token(cfg, lora=bool(cfg.lora_rank)) * cfg.seq_len

    def canonical_shapes(self, cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(cfg)

    def param_count(self, cfg: LlamaConfig) -> int:
        """Parameters of the base model (what ``LlamaForCausalLM`` counts), not the trained
        ones: the adapters are :func:`adapter_count`."""
        return sum(math.prod(s) for s in canonical_shapes(cfg, adapters=False).values())

    def deterministic(self, cfg: LlamaConfig) -> LlamaConfig:
        return cfg.replace(lora_dropout=0.0)

    def init_weight(
        self, cfg: LlamaConfig, name: str, shape: tuple[int, ...], rng: np.random.Generator
    ) -> np.ndarray:
        """Base weights as the default (norms at 1, matrices normal with ``init_std``);
        ``lora_a`` uniform in +-1/sqrt(in) and ``lora_b`` zero (PEFT's init), so the adapters
        start as a no-op."""
        if is_adapter(name):
            return _adapter_init(name, shape, rng)
        return super().init_weight(cfg, name, shape, rng)

    def synthetic_batch(self, cfg: LlamaConfig, batch_size: int = 2, seed: int = 0) -> dict:
        """Sequences of the config's seeded low-entropy Markov language, the first
        ``prompt_fraction`` of each labelled -100 (see :func:`data.synthetic_batch`)."""
        from mlperf_tutor.workloads.llama.data import synthetic_batch

        return synthetic_batch(cfg, batch_size, seed, LANGUAGE_SEEDS[cfg.language])

    def batch_check(self, cfg: LlamaConfig) -> BatchCheck:
        """Input ids and labels below ``vocab_size``, labels -100 on the prompt, the attention
        mask 0 or 1."""
        from mlperf_tutor.layers.spec import IGNORE_INDEX

        return BatchCheck(
            ids=(
                Ids("input_ids", cfg.vocab_size, "cfg.vocab_size"),
                Ids("attention_mask", 2, "a mask: 0 or 1"),
                Ids("labels", cfg.vocab_size, "cfg.vocab_size", ignore=IGNORE_INDEX),
            )
        )

    def write_sample_data(
        self, cfg: LlamaConfig, directory: str | os.PathLike, *, samples: int = 64, seed: int = 0
    ) -> Path:
        """The reference's GovReport layout: ``directory/train-00000-of-00001.parquet`` with
        :meth:`synthetic_batch` rows (``input_ids``, ``attention_mask``, ``labels`` lists of
        ``seq_len`` tokens, the prompt labelled -100); returns ``directory``."""
        from mlperf_tutor.workloads.llama.data import COLUMNS, write_govreport

        directory = new_data_directory(directory, samples)
        batch = self.synthetic_batch(cfg, samples, seed)
        rows = ({c: batch[c][i] for c in COLUMNS} for i in range(samples))
        write_govreport(directory / "train-00000-of-00001.parquet", rows)
        return directory

    def data_batches(
        self,
        cfg: LlamaConfig,
        path: str | os.PathLike,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the ``train*.parquet`` split in the directory ``path``, through
        :class:`~.data.GovReport` (sequences at most ``cfg.seq_len`` tokens, ids below
        ``cfg.vocab_size``), each right-padded to ``cfg.seq_len``; epoch ``e`` is a
        permutation of the sequences seeded by ``(seed, e)``."""
        from mlperf_tutor.workloads.llama.data import GovReport

        split = GovReport(path, "train", max_seq_len=cfg.seq_len, vocab_size=cfg.vocab_size)

        def epoch(e: int, first: int) -> Iterator[dict[str, np.ndarray]]:
            order = epoch_rng(seed, e).permutation(len(split))
            for j in range(first, len(split) // batch_size):
                rows = order[j * batch_size : (j + 1) * batch_size]
                yield split.batch(rows, width=cfg.seq_len)

        return endless_batches(path, len(split), batch_size, seed, start, epoch)

    def optimizer(self, cfg: LlamaConfig) -> tuple[OptimizerSpec, ScheduleSpec]:
        spec = OptimizerSpec(
            "adamw",
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            clip_norm=cfg.clip_norm,
        )
        schedule = ScheduleSpec(
            cfg.lr, warmup_steps=cfg.warmup_steps, decay="cosine", total_steps=cfg.total_steps
        )
        return spec, schedule

    def recipe(self, cfg: LlamaConfig) -> Recipe:
        """MLPerf's ``llama2_70b_lora``: eval loss 0.925 (reached from above), evaluated every
        ``cfg.eval_every_samples``. The logged hyperparameters are the keys of mlperf_logging's
        ``training_4.0.0/closed_llama2_70b_lora.yaml`` and the ones the v4.0 submissions log
        beside them.

        Presets without a pretrained base (``cfg.init_checkpoint_step`` > 0) pretrain one first:
        the base model alone, on every token of the general language, with AdamW at
        ``checkpoint_lr``; the run takes its weights, fresh adapters and a fresh optimizer at
        step 0 (fine-tuning).
        """
        spec, schedule = self.optimizer(cfg)
        checkpoint = None
        if cfg.init_checkpoint_step:
            base = cfg.replace(
                lora_rank=0, prompt_fraction=0.0, lora_dropout=0.0, language="general"
            )
            checkpoint = CheckpointStart(
                cfg.init_checkpoint_step,
                OptimizerSpec("adamw", weight_decay=0.0, clip_norm=1.0),
                ScheduleSpec(cfg.checkpoint_lr),
                config=base,
                continues=False,
            )
        return Recipe(
            benchmark="llama2_70b_lora",
            targets=(Target("eval loss", TARGET_EVAL_LOSS, higher_is_better=False),),
            eval_every=cfg.eval_every_samples,
            checkpoint=checkpoint,
            hyperparameters={
                "opt_base_learning_rate": schedule.lr,
                "opt_learning_rate_training_steps": schedule.total_steps,
                "opt_learning_rate_warmup_factor": 0.0,
                "opt_gradient_clip_norm": spec.clip_norm,
                "opt_adamw_weight_decay": spec.weight_decay,
                "lora_rank": cfg.lora_rank,
                "lora_alpha": cfg.lora_alpha,
            },
        )

    def eval_set(self, cfg: LlamaConfig) -> dict:
        return self.synthetic_batch(cfg, batch_size=cfg.eval_samples, seed=EVAL_SEED)

    def evaluate(self, framework: str, model, eval_set: dict, batch_size: int) -> float:
        """Eval loss: cross-entropy averaged over every answer token of ``eval_set``
        (token-weighted across batches, as one pass over the validation set)."""
        return token_weighted_loss(self, framework, model, eval_set, batch_size, shift=1)

    def info(self, cfg: LlamaConfig) -> dict:
        n, n_lora = self.param_count(cfg), adapter_count(cfg)
        # Per sequence (Korthikanti et al. 2022; GQA and SwiGLU ignored); the reference
        # recomputes (gradient checkpointing) instead.
        activations = self.activation_bytes(cfg)
        return {
            "workload": self.name,
            "base parameters": n,
            "LoRA adapter parameters": n_lora,
            "trained fraction": n_lora / n,
            "training FLOPs per token, full fine-tuning (6N + 12LDT)": flops_per_token(cfg, False),
            "training FLOPs per token, LoRA (4N + 6N_lora + 12LDT)": flops_per_token(cfg),
            "full fine-tuning: fp32 weights + grads + Adam moments (GB)": 16 * n / 1e9,
            "LoRA: bf16 base + fp32 adapters, grads, Adam moments (GB)": (2 * n + 16 * n_lora)
            / 1e9,
            "activations per sequence, 16-bit, no recomputation (GB)": activations / 1e9,
            "global batch size": cfg.global_batch_size,
        }


WORKLOAD = LlamaLoraWorkload()
