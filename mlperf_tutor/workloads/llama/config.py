"""Config of Llama 2 70B LoRA fine-tuning (MLPerf Training ``llama2_70b_lora``), framework-free.

Model: Llama 2 (Touvron et al. 2023, https://arxiv.org/abs/2307.09288, Table 1 and section 2.2)
with the fused ``qkv_proj`` of the checkpoint the MLPerf reference fine-tunes
(mlcommons/training ``llama2_70b_lora/scripts/regiss_llama_70b_model_config/config.json``: 80
layers, hidden 8192, 64 heads, 8 key/value heads, intermediate 28672, RMSNorm eps 1e-5, rope
theta 10000, vocab 32000, untied head, no biases). LoRA: Hu et al. 2021
(https://arxiv.org/abs/2106.09685). Hyperparameters: the reference's
``run_llama_70B_scrolls_r16.sh`` (lr 4e-4 at batch 8, weight decay 1e-4, clip 0.3, cosine
without warmup, 1024 steps, rank 16, alpha 32, dropout 0.1 on ``qkv_proj`` and ``o_proj``) and
the v4.0 rules (eval every 384 sequences, target eval loss 0.925).
"""

from __future__ import annotations

import dataclasses

from mlperf_tutor.core.config import LAYERS, NON_NEGATIVE, RATE, Config, ConfigError
from mlperf_tutor.layers.spec import AttentionSpec, BlockSpec, Lora, MlpSpec

LORA_TARGETS = ("qkv_proj", "o_proj")
LANGUAGES = ("general", "summary")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Config):
    """Hyperparameters of a Llama 2 decoder and its LoRA fine-tuning."""

    num_layers: int = 80  # L
    hidden: int = 8192  # D
    num_heads: int = 64  # N; head dim H = D / N
    num_kv_heads: int = 8  # K: grouped-query attention, N / K query heads per kv head
    ffn: int = 28672  # F: SwiGLU inner width
    vocab_size: int = 32000  # V
    max_positions: int = 8192  # the reference sets max_position_embeddings 8192
    seq_len: int = 8192  # T: tokens per (packed) training sequence
    norm_eps: float = 1e-5  # RMSNorm
    rotary_base: float = 10000.0  # rotary on every head dim, Llama's "half" pairs
    init_std: float = 0.02  # normal std of base weights (initializer_range); norms start at 1
    # LoRA on the fused qkv_proj and on o_proj: y = W x + (alpha / r) B A dropout(x), with A
    # (r, in) uniform in +-1/sqrt(in) (PEFT's kaiming_uniform(a=sqrt(5))) and B (out, r) zero.
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    # AdamW (torch's defaults for betas and eps, as the reference's adamw_torch), clipping,
    # cosine decay to 0 over total_steps without warmup.
    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    clip_norm: float = 0.3
    warmup_steps: int = 0
    total_steps: int = 1024
    global_batch_size: int = 8
    # Evaluation: mean cross-entropy over the answer tokens of the validation set.
    eval_samples: int = 173  # GovReport validation sequences after packing (reference logs)
    eval_every_samples: int = 384
    # Synthetic batches: the first prompt_fraction of each sequence is the prompt (label -100);
    # 0 labels every token (pretraining the tiny base model).
    prompt_fraction: float = 0.75
    # MLPerf fine-tunes the pretrained Llama 2 70B. Presets without pretrained weights (tiny)
    # pretrain their base here first: init_checkpoint_step full-model AdamW steps at
    # checkpoint_lr on every token of the synthetic language, before the run (not logged).
    init_checkpoint_step: int = 0
    checkpoint_lr: float = 3e-3
    # Which synthetic language the batches speak: "general" (the tiny base's pretraining) or
    # "summary" (the fine-tuning task: another successor table, which only the adapters learn).
    language: str = "summary"

    # Fields outside the defaults (ints >= 1, floats > 0; see mlperf_tutor.core.config).
    RANGES = {
        "num_layers": LAYERS,
        "lora_rank": NON_NEGATIVE,  # 0: no adapters
        "lora_dropout": RATE,
        "beta1": RATE,
        "beta2": RATE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "prompt_fraction": RATE,
        "init_checkpoint_step": NON_NEGATIVE,
    }
    CHOICES = {"language": LANGUAGES}

    def check(self):
        if self.hidden % self.num_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must divide hidden ({self.hidden})", "num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"grouped-query attention needs num_heads divisible by num_kv_heads "
                f"({self.num_kv_heads}), got num_heads {self.num_heads}",
                "num_kv_heads",
            )
        if self.seq_len > self.max_positions:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds max_positions ({self.max_positions})", "seq_len"
            )
        self.block_spec()  # heads, kv heads and rotary dims: checked once, in the spec

    def block_spec(self) -> BlockSpec:
        """Every decoder block: pre-RMSNorm, causal grouped-query attention with one fused
        ``qkv_proj`` and rotary positions on every head dim ("half" pairs), a SwiGLU MLP, no
        biases, no dropout; LoRA adapters on ``qkv_proj`` and ``o_proj`` when ``lora_rank``."""
        return BlockSpec(
            attention=AttentionSpec(
                self.hidden,
                self.num_heads,
                num_kv_heads=self.num_kv_heads,
                bias=False,
                causal=True,
                rotary_dim=self.head_dim,
                rotary_base=self.rotary_base,
                rotary_layout="half",
                fused_qkv=True,
                lora=lora_of(self),
                max_positions=self.max_positions,
            ),
            mlp=MlpSpec(self.hidden, self.ffn, activation="silu", bias=False, gated=True),
            norm_eps=self.norm_eps,
            norm="rmsnorm",
            norm_position="pre",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def qkv_dim(self) -> int:
        """Output width of the fused ``qkv_proj``: N H query dims, then K H key and value dims."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


def lora_of(cfg: LlamaConfig) -> Lora | None:
    """The LoRA adapters of ``cfg`` (None when ``lora_rank`` is 0: the plain base model)."""
    if not cfg.lora_rank:
        return None
    return Lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, LORA_TARGETS)


LlamaConfig.PRESETS = {
    # 2 layers, d 64, 4 query heads sharing 2 kv heads, 32 tokens: trains on 2 CPU cores in
    # seconds. Its base is pretrained for 60 steps on the "general" language; the adapters
    # (rank 16, alpha 32, dropout 0.1: the reference's) then learn the "summary" language and
    # cross the MLPerf target eval loss 0.925 after about 180 steps of batch 8.
    "tiny": dict(
        num_layers=2,
        hidden=64,
        num_heads=4,
        num_kv_heads=2,
        ffn=160,
        vocab_size=32,
        max_positions=128,
        seq_len=64,
        lr=1e-2,
        total_steps=256,
        global_batch_size=8,
        eval_samples=32,
        eval_every_samples=256,
        init_checkpoint_step=60,
    ),
    # Llama-style 1.1B (the TinyLlama 1.1B shape: 22 layers, d 2048, 32 heads, 4 kv heads,
    # F 5632) at 4096 tokens: one accelerator.
    "small": dict(
        num_layers=22,
        hidden=2048,
        num_heads=32,
        num_kv_heads=4,
        ffn=5632,
        max_positions=4096,
        seq_len=4096,
    ),
    "mlperf": {},
}
