"""Configs of the GPT decoders: GPT-3 (MLPerf Training ``gpt3``) and GPT-J 6B (framework-free).

One decoder, two configs; the fields say what genuinely differs between the two models:

=====================  ==========================  ==========================================
field                  GPT-3 (Megatron, MLPerf)    GPT-J 6B (EleutherAI)
=====================  ==========================  ==========================================
``position``           "learned" table             "rotary" on ``rotary_dim`` dims per head
``parallel_residual``  False: pre-LN, two norms    True: attention and MLP from one LayerNorm
``attention_bias``     True                        False
``tie_embeddings``     True                        False (``lm_head`` with a bias)
``activation``         "gelu" (exact, Megatron's)  "gelu_tanh" (``gelu_new``)
=====================  ==========================  ==========================================

GPT-3 175B: Brown et al. 2020 (https://arxiv.org/abs/2005.14165), Table 2.1 (96 layers, d 12288,
96 heads, context 2048); MLPerf Training v4.0 ``gpt3`` rules (training_rules.adoc) and
mlcommons/training ``large_language_model/megatron-lm`` for the optimizer and vocabulary. GPT-J:
the ``EleutherAI/gpt-j-6b`` model card and config.json (28 layers, d 4096, 16 heads, rotary_dim
64, vocab 50400, n_positions 2048).
"""

from __future__ import annotations

import dataclasses
import math

from mlperf_tutor.core.config import LAYERS, NON_NEGATIVE, RATE, Config, ConfigError, Range
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec

# MLPerf GPT-3 starts from a checkpoint the reference trained for 4000 steps at global batch
# 1536 (mlcommons/training large_language_model/megatron-lm README, "checkpoint"); a run at
# global batch B logs init_checkpoint_step = ceil(4000 * 1536 / B).
REFERENCE_CHECKPOINT_STEP = 4000
REFERENCE_BATCH = 1536


@dataclasses.dataclass(frozen=True)
class GptConfig(Config):
    """Hyperparameters of a decoder-only causal language model (GPT-3 or GPT-J)."""

    num_layers: int = 96  # L
    hidden: int = 12288  # D
    num_heads: int = 96  # N; head dim H = D / N
    ffn: int = 49152  # F = 4 D
    vocab_size: int = 50257  # tokens of the tokenizer
    # Embedding rows are padded to a multiple of this (Megatron's
    # --make-vocab-size-divisible-by); the padded ids are never labels. 1: no padding.
    vocab_multiple: int = 128
    max_positions: int = 2048  # learned position rows, or the rotary model's context
    seq_len: int = 2048  # T, tokens per training sequence
    position: str = "learned"  # "learned" (GPT-3) or "rotary" (GPT-J)
    rotary_dim: int = 0  # dims of each head that rotary rotates (GPT-J: 64 of 256)
    rotary_base: float = 10000.0
    parallel_residual: bool = False  # GPT-J: x + attention(ln(x)) + mlp(ln(x))
    attention_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True  # GPT-3: logits = x @ word_embeddings.T
    lm_head_bias: bool = False  # GPT-J's untied head has a bias
    activation: str = "gelu"  # "gelu" (erf) or "gelu_tanh"
    norm_eps: float = 1e-5
    dropout: float = 0.0  # embeddings, residual branches and attention probabilities
    # Normal std of weights. The MLPerf reference runs Megatron with --init-method-std 0.006
    # and --no-scaled-init (run_gpt3.sh); with scaled_residual_init the two projections into
    # the residual stream (o_proj, mlp.fc_out) get std / sqrt(2 L) instead (GPT-2, Megatron's
    # default). A run starts from the reference checkpoint, so init matters only from scratch.
    init_std: float = 0.006
    scaled_residual_init: bool = False
    # The reference also passes --do-layernorm-bias-weight-decay: weight decay on every
    # parameter. False: LayerNorm weights and biases are not decayed (GPT-J, AdamW as usual).
    decay_norms_and_biases: bool = True
    # Adam with decoupled weight decay, clipping, linear warmup then cosine decay to
    # end_lr_fraction * lr at total_steps (the decay steps include the warmup, as NeMo counts).
    lr: float = 2e-5
    end_lr_fraction: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    warmup_steps: int = 265
    total_steps: int = 108600
    global_batch_size: int = 1536
    # Evaluation: log perplexity (mean next-token cross-entropy) on a held-out set.
    eval_samples: int = 24567  # validation sequences (NVIDIA v4.0 gpt3 README)
    eval_every_samples: int = 24576  # MLPerf v4.0 gpt3 evaluation frequency
    # Optimizer steps of the checkpoint a run starts from (MLPerf's checkpoint-start rule), and
    # the base lr of those steps (None: lr). The MLPerf log checker pins GPT-3's lr at 2e-5 or
    # 3e-5 even in the open division, a rate at which a tiny model learns little in seconds; its
    # checkpoint is pre-trained faster, and the logged run continues at the pinned rate.
    init_checkpoint_step: int = REFERENCE_CHECKPOINT_STEP
    checkpoint_lr: float | None = None

    # Fields outside the defaults (ints >= 1, floats > 0; see mlperf_tutor.core.config).
    RANGES = {
        "num_layers": LAYERS,
        "rotary_dim": NON_NEGATIVE,
        "dropout": RATE,
        "end_lr_fraction": Range(0, 1),
        "beta1": RATE,
        "beta2": RATE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "init_checkpoint_step": NON_NEGATIVE,
    }
    CHOICES = {"position": ("learned", "rotary"), "activation": ("gelu", "gelu_tanh")}

    def check(self):
        if self.hidden % self.num_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must divide hidden ({self.hidden})", "num_heads"
            )
        if self.position == "rotary" and not (
            0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
        ):
            raise ConfigError(
                f"rotary_dim ({self.rotary_dim}) must be even and in (0, head_dim "
                f"{self.head_dim}] for rotary positions",
                "rotary_dim",
            )
        if self.position == "learned" and self.rotary_dim:
            raise ConfigError("rotary_dim must be 0 with learned positions", "rotary_dim")
        if self.seq_len > self.max_positions:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds max_positions ({self.max_positions})", "seq_len"
            )
        if self.lm_head_bias and self.tie_embeddings:
            raise ConfigError(
                "lm_head_bias needs an untied head (tie_embeddings=False)", "lm_head_bias"
            )
        if self.padded_vocab_size > 2**31 - 1:
            raise ConfigError(
                f"vocab_size {self.vocab_size} padded to a multiple of {self.vocab_multiple} "
                "does not fit int32",
                "vocab_multiple",
            )
        self.block_spec()  # heads, widths and dropout checked once, where the layers read them

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    def block_spec(self) -> BlockSpec:
        """Every decoder block: causal self-attention (rotary for GPT-J) and a GELU MLP, pre-LN
        (GPT-3) or parallel (GPT-J)."""
        return BlockSpec(
            attention=AttentionSpec(
                self.hidden,
                self.num_heads,
                bias=self.attention_bias,
                dropout=self.dropout,
                causal=True,
                rotary_dim=self.rotary_dim,
                rotary_base=self.rotary_base,
                rotary_layout="interleaved",
                max_positions=self.max_positions,
            ),
            mlp=MlpSpec(self.hidden, self.ffn, activation=self.activation, bias=self.mlp_bias),
            norm_eps=self.norm_eps,
            norm_position="parallel" if self.parallel_residual else "pre",
            dropout=self.dropout,
        )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table and width of the logits."""
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


def mlperf_schedule(global_batch_size: int) -> dict:
    """The v4.0 rules' GPT-3 lr, warmup and decay steps for a global batch size (1536-8192).

    Base lr 2e-5 for 1536-3072 and 3e-5 for 4096-8192; warmup ceil(265 * 1536 / B) and decay
    ceil(108600 * 1536 / B) steps (MLPerf Training rules, gpt3 hyperparameters table).
    """
    if not 1536 <= global_batch_size <= 8192:
        raise ValueError(
            f"the MLPerf GPT-3 rules cover global batch 1536-8192, got {global_batch_size}"
        )
    scale = REFERENCE_BATCH / global_batch_size
    return {
        "lr": 2e-5 if global_batch_size <= 3072 else 3e-5,
        "warmup_steps": math.ceil(265 * scale),
        "total_steps": math.ceil(108600 * scale),
        "global_batch_size": global_batch_size,
        "init_checkpoint_step": math.ceil(REFERENCE_CHECKPOINT_STEP * scale),
    }


@dataclasses.dataclass(frozen=True)
class Gpt3Config(GptConfig):
    """GPT-3 175B as MLPerf Training v4.0 trains it (defaults: the ``mlperf`` preset)."""

    PRESETS = {
        # Trains on 2 CPU cores; 90 tokens padded to 96 exercise the padding. The MLPerf log
        # checker pins max_sequence_length 2048 and lr 2e-5 or 3e-5 even in the open division,
        # so tiny trains on one 2048-token sequence per step at 3e-5 (the rules' rate for the
        # largest batches), from a checkpoint pre-trained for 60 steps at 5e-3: its log
        # perplexity on the synthetic language is 2.70, just above the target, as the MLPerf
        # reference checkpoint's (about 2.77) is above 2.69. About 32 steps reach the target.
        "tiny": {
            "num_layers": 2,
            "hidden": 32,
            "num_heads": 2,
            "ffn": 128,
            "vocab_size": 90,
            "vocab_multiple": 32,
            "lr": 3e-5,
            "warmup_steps": 5,
            "total_steps": 200,
            "global_batch_size": 1,
            "eval_samples": 4,
            "eval_every_samples": 8,
            "init_checkpoint_step": 60,
            "checkpoint_lr": 5e-3,
        },
        # GPT-3 Small (Brown et al. Table 2.1: 12 layers, d 768, 12 heads); lr 6e-4 (ibid.).
        "small": {
            "num_layers": 12,
            "hidden": 768,
            "num_heads": 12,
            "ffn": 3072,
            "max_positions": 1024,
            "seq_len": 1024,
            "lr": 6e-4,
            "warmup_steps": 100,
            "total_steps": 5000,
            "global_batch_size": 32,
            "eval_samples": 256,
            "eval_every_samples": 3200,
            "init_checkpoint_step": 1,
        },
        # GPT-3 XL sized (24 layers, d 2048), with 16 heads of 128; lr 2e-4 (ibid.).
        "1.3b": {
            "num_layers": 24,
            "hidden": 2048,
            "num_heads": 16,
            "ffn": 8192,
            "lr": 2e-4,
            "warmup_steps": 100,
            "total_steps": 5000,
            "global_batch_size": 8,
            "eval_samples": 64,
            "eval_every_samples": 800,
            "init_checkpoint_step": 1,
        },
        "mlperf": mlperf_schedule(1536),
    }


@dataclasses.dataclass(frozen=True)
class GptjConfig(GptConfig):
    """GPT-J 6B (defaults: the ``full`` preset). Not an MLPerf Training benchmark."""

    num_layers: int = 28
    hidden: int = 4096
    num_heads: int = 16
    ffn: int = 16384
    vocab_size: int = 50400  # already a multiple of 32; the public model is not padded
    vocab_multiple: int = 1
    position: str = "rotary"
    rotary_dim: int = 64
    parallel_residual: bool = True
    attention_bias: bool = False
    tie_embeddings: bool = False
    lm_head_bias: bool = True
    activation: str = "gelu_tanh"
    init_std: float = 0.02  # initializer_range of the public config
    decay_norms_and_biases: bool = False
    # AdamW as a causal LM (no MLPerf rule: GPT-J is an MLPerf Inference benchmark).
    lr: float = 1e-5
    beta2: float = 0.999
    weight_decay: float = 0.01
    warmup_steps: int = 100
    total_steps: int = 10000
    global_batch_size: int = 32
    eval_samples: int = 256
    eval_every_samples: int = 3200
    init_checkpoint_step: int = 0

    PRESETS = {
        "tiny": {
            "num_layers": 2,
            "hidden": 32,
            "num_heads": 4,
            "ffn": 128,
            "vocab_size": 96,
            "rotary_dim": 4,
            "max_positions": 64,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup_steps": 5,
            "total_steps": 200,
            "global_batch_size": 8,
            "eval_samples": 64,
            "eval_every_samples": 16,
        },
        "full": {},
    }
