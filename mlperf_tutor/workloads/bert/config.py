"""Config of MLPerf Training BERT-large pre-training (framework-free).

Architecture: mlcommons/training ``language_model/tensorflow/bert`` (bert_config.json of the
reference checkpoint: 24 layers, hidden 1024, 16 heads, intermediate 4096, vocab 30522, 512
positions, 2 token types, GELU, initializer range 0.02) and the BERT paper (Devlin et al., 2019).
Optimizer values of the ``mlperf`` preset: the reference README's TPU example (global batch 8192,
lr 0.00288293, beta1 = beta2 = 0.88, weight decay 0.0166629, 287 warmup steps, start warmup step
-76, 600 steps); other presets use the reference defaults (beta 0.9/0.999, weight decay 0.01).
"""

from __future__ import annotations

import dataclasses

from mlperf_tutor.core.config import (
    ANY,
    LAYERS,
    NON_NEGATIVE,
    RATE,
    Config,
    ConfigError,
    Range,
)
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, MlpSpec

# Added to the masked-LM loss's denominator (the masked positions), as the reference does: a
# batch without masked positions gives 0, not 0/0.
MLM_DENOMINATOR_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BertConfig(Config):
    """Hyperparameters of BERT pre-training (masked LM + next-sentence prediction)."""

    num_layers: int = 24  # L, post-LN transformer blocks
    hidden: int = 1024  # D
    num_heads: int = 16  # N; head dim H = D / N
    ffn: int = 4096  # F, MLP width
    vocab_size: int = 30522  # V (uncased WordPiece vocabulary of the reference)
    max_positions: int = 512  # learned position embeddings
    type_vocab_size: int = 2  # segment A / B
    seq_len: int = 512  # S, tokens per sequence of the training data
    max_predictions: int = 76  # P, masked positions per sequence (max_predictions_per_seq)
    mask_prob: float = 0.15  # fraction of tokens masked by the synthetic data
    norm_eps: float = 1e-12  # LayerNorm epsilon of the reference
    dropout: float = 0.1  # hidden and attention-probability dropout
    init_std: float = 0.02  # normal std of weights (initializer_range)
    # LAMB and its schedule (lr warms up from start_warmup_step, then decays to 0).
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.01
    eps: float = 1e-6
    clip_norm: float = 1.0
    warmup_steps: int = 0
    start_warmup_step: int = 0
    total_steps: int = 1000
    global_batch_size: int = 8192
    # Evaluation (masked-LM accuracy on a held-out set; mlperf_tutor.train stops at the target).
    eval_samples: int = 10000  # sequences in the eval set, as the reference's part_eval_10k.hdf5
    eval_every_samples: int | None = None  # None: the MLPerf rule from the global batch size

    PRESETS = {
        # Trains on 2 CPU cores in seconds: tests, notebooks, parity. 76/512 of 32 tokens -> 5.
        # LAMB moves each weight by about lr relative to its norm: 1e-2 lets 50 steps show it.
        "tiny": {
            "num_layers": 2,
            "hidden": 32,
            "num_heads": 4,
            "ffn": 64,
            "vocab_size": 96,
            "max_positions": 64,
            "seq_len": 32,
            "max_predictions": 5,
            "lr": 1e-2,
            "warmup_steps": 3,
            "total_steps": 50,
            "global_batch_size": 8,
            "eval_samples": 64,
            "eval_every_samples": 40,
        },
        # BERT-base sized; one accelerator. 76/512 of 128 tokens -> 20 (the reference's phase 1).
        "small": {
            "num_layers": 12,
            "hidden": 768,
            "num_heads": 12,
            "ffn": 3072,
            "seq_len": 128,
            "max_predictions": 20,
            "warmup_steps": 100,
            "total_steps": 1000,
            "global_batch_size": 256,
        },
        "mlperf": {
            "lr": 0.00288293,
            "beta1": 0.88,
            "beta2": 0.88,
            "weight_decay": 0.0166629,
            "warmup_steps": 287,
            "start_warmup_step": -76,
            "total_steps": 600,
        },
    }

    # Fields outside the defaults (ints >= 1, floats > 0; see mlperf_tutor.core.config).
    RANGES = {
        "num_layers": LAYERS,
        "mask_prob": Range(0, 1, low_open=True, high_open=True),
        "dropout": RATE,
        "beta1": RATE,
        "beta2": RATE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "start_warmup_step": ANY,  # the reference's TPU run starts its warmup at -76
    }

    def check(self):
        if self.hidden % self.num_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must divide hidden ({self.hidden})", "num_heads"
            )
        self.block_spec()  # heads, widths and dropout checked once, where the layers read them
        if self.seq_len > self.max_positions:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds max_positions ({self.max_positions})", "seq_len"
            )
        if self.max_predictions > self.seq_len - 3:
            raise ConfigError(
                f"max_predictions ({self.max_predictions}) must leave room for [CLS] and two "
                f"[SEP] tokens in seq_len ({self.seq_len})",
                "max_predictions",
            )

    def block_spec(self) -> BlockSpec:
        """Every encoder block: post-LN, bidirectional self-attention with padded keys masked,
        exact-GELU MLP, dropout on the probabilities and on both residual branches."""
        return BlockSpec(
            attention=AttentionSpec(
                self.hidden,
                self.num_heads,
                bias=True,
                dropout=self.dropout,
                max_positions=self.max_positions,
            ),
            mlp=MlpSpec(self.hidden, self.ffn, activation="gelu", bias=True),
            norm_eps=self.norm_eps,
            norm_position="post",
            dropout=self.dropout,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads
