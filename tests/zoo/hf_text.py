"""transformers language, sequence-to-sequence and speech models, from tiny configs.

Their recipes are the transformers ``Trainer``'s unless the entry says otherwise: AdamW
(``optim="adamw_torch"``) over the Trainer's two weight-decay groups, ``lr_scheduler_type``
linear (``get_linear_schedule_with_warmup``), ``max_grad_norm=1.0``
(https://huggingface.co/docs/transformers/main_classes/trainer). A fine-tune's 5e-5 moves a
tiny random model too little to see, so the zoo uses 1e-3 where a recipe fine-tunes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers as tf
from transformers.optimization import (
    get_constant_schedule,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from . import Entry
from .recipes import STEPS, WARMUP, cross_entropy, seeded, tokens, trainer_adamw

V = 96  # vocabulary of every text model here
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def linear_warmup(optimizer):
    return get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)


def cosine_warmup(optimizer):
    return get_cosine_schedule_with_warmup(optimizer, WARMUP, STEPS)


# ---- batches ----------------------------------------------------------------------------------


def causal_batch(seed: int) -> dict[str, np.ndarray]:
    ids = tokens(seed, V)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()}


def mlm_batch(seed: int, mask_id: int = 3, pad_id: int = 0) -> dict[str, np.ndarray]:
    """BERT-style MLM: 3 positions of each row masked (labels -100 elsewhere), the first row's
    last two tokens padding."""
    rng = np.random.default_rng(seed)
    ids = tokens(seed, V)
    labels = np.full_like(ids, -100)
    mask = np.ones_like(ids)
    ids[0, -2:], mask[0, -2:] = pad_id, 0
    for row in range(ids.shape[0]):
        at = rng.choice(ids.shape[1] - 2, 3, replace=False)
        labels[row, at] = ids[row, at]
        ids[row, at] = mask_id
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classify_batch(seed: int, classes: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    ids = tokens(seed, V)
    mask = np.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = pad_id, 0
    labels = np.random.default_rng(seed + 1000).integers(0, classes, (ids.shape[0],))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq2seq_batch(seed: int, start_id: int) -> dict[str, np.ndarray]:
    """Source tokens and target labels, with ``decoder_input_ids`` the labels shifted right
    behind ``start_id`` (what fairseq calls prev_output_tokens)."""
    src = tokens(seed, V)
    labels = tokens(seed + 1000, V, seq=8)
    dec = np.concatenate([np.full_like(labels[:, :1], start_id), labels[:, :-1]], axis=1)
    return {
        "input_ids": src,
        "attention_mask": np.ones_like(src),
        "decoder_input_ids": dec,
        "labels": labels,
    }


def audio_batch(seed: int) -> dict[str, np.ndarray]:
    """Log-mel features (B, 8 mel bins, 32 frames) and target tokens (B, 6)."""
    rng = np.random.default_rng(seed)
    return {
        "input_features": rng.standard_normal((4, 8, 32), dtype=np.float32),
        "labels": tokens(seed + 1000, V, seq=6),
    }


# ---- losses -----------------------------------------------------------------------------------


def model_loss(model, batch):
    """The model's own loss (transformers computes it from ``labels``)."""
    return model(**batch).loss


def smoothed_seq2seq_loss(model, batch, smoothing: float = 0.1):
    """fairseq's ``label_smoothed_cross_entropy`` on the decoder's logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return cross_entropy(model(**inputs).logits, batch["labels"], smoothing)


# ---- models -----------------------------------------------------------------------------------


ENTRIES = [
    Entry(
        "gpt2",
        seeded(
            tf.GPT2LMHeadModel,
            tf.GPT2Config(
                vocab_size=V,
                n_positions=32,
                n_embd=32,
                n_layer=2,
                n_head=4,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        causal_batch,
        model_loss,
        # run_clm.py with the Trainer: AdamW, weight decay 0.0 (the Trainer's default)
        lambda m: trainer_adamw(m, lr=1e-3),
        linear_warmup,
        "transformers examples/pytorch/language-modeling/run_clm.py (Trainer defaults)",
        clip_grad_norm=1.0,
        tied=(("transformer.wte.weight", "lm_head.weight"),),
    ),
    Entry(
        "bert-mlm",
        seeded(
            tf.BertForMaskedLM, tf.BertConfig(vocab_size=V, max_position_embeddings=32, **SMALL)
        ),
        mlm_batch,
        model_loss,
        # BERT pre-training (Devlin et al. 2019, App. A.2): Adam betas (0.9, 0.999), L2 weight
        # decay 0.01, linear warm-up then linear decay, as run_mlm.py runs it with the Trainer
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.01),
        linear_warmup,
        "BERT paper App. A.2 / transformers run_mlm.py",
        clip_grad_norm=1.0,
        # the MLM head's decoder is tied to the word embeddings, and its bias to the head's
        tied=(
            ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
            ("cls.predictions.bias", "cls.predictions.decoder.bias"),
        ),
    ),
    Entry(
        "distilbert-cls",
        seeded(
            tf.DistilBertForSequenceClassification,
            tf.DistilBertConfig(
                vocab_size=V,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=32,
                num_labels=2,
            ),
        ),
        functools.partial(classify_batch, classes=2),
        model_loss,
        lambda m: trainer_adamw(m, lr=1e-3),
        linear_warmup,
        "transformers examples/pytorch/text-classification/run_glue.py (Trainer defaults)",
        clip_grad_norm=1.0,
    ),
    Entry(
        "distilbert-mlm",
        seeded(
            tf.DistilBertForMaskedLM,
            tf.DistilBertConfig(
                vocab_size=V,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=32,
            ),
        ),
        mlm_batch,
        model_loss,
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.01),
        linear_warmup,
        "transformers run_mlm.py (Trainer defaults, weight decay 0.01)",
        clip_grad_norm=1.0,
        tied=(("distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight"),),
    ),
    Entry(
        "roberta-cls",
        seeded(
            tf.RobertaForSequenceClassification,
            tf.RobertaConfig(
                vocab_size=V,
                max_position_embeddings=40,
                pad_token_id=1,
                type_vocab_size=1,
                num_labels=3,
                **SMALL,
            ),
        ),
        # RoBERTa pads with id 1 and numbers positions from padding_idx + 1
        lambda s: classify_batch(s, classes=3, pad_id=1),
        model_loss,
        # RoBERTa GLUE fine-tuning (Liu et al. 2019, App. C): AdamW, weight decay 0.1, linear
        # warm-up for 6 % of the steps then linear decay
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6),
        linear_warmup,
        "RoBERTa paper App. C (GLUE fine-tuning)",
        clip_grad_norm=1.0,
    ),
    Entry(
        "t5",
        seeded(
            tf.T5ForConditionalGeneration,
            tf.T5Config(
                vocab_size=V,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
                pad_token_id=0,
            ),
        ),
        lambda s: {k: v for k, v in seq2seq_batch(s, 0).items() if k != "decoder_input_ids"},
        model_loss,
        # T5 fine-tuning (Raffel et al. 2020, 3.1.3; transformers' T5 docs): Adafactor at a
        # constant 1e-3 without relative steps; the Trainer clips at 1.0. torch.optim.Adafactor
        # is torch's version of it.
        lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-3),
        get_constant_schedule,
        "T5 paper 3.1.3 / transformers T5 docs (Adafactor, constant lr 1e-3)",
        clip_grad_norm=1.0,
        tied=(
            (
                "shared.weight",
                "encoder.embed_tokens.weight",
                "decoder.embed_tokens.weight",
                "lm_head.weight",
            ),
        ),
    ),
    Entry(
        "bart",
        seeded(
            tf.BartForConditionalGeneration,
            tf.BartConfig(
                vocab_size=V,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=32,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                decoder_start_token_id=2,
            ),
        ),
        lambda s: seq2seq_batch(s, 2),
        smoothed_seq2seq_loss,
        # fairseq examples/bart/README.summarization.md: Adam betas (0.9, 0.999) eps 1e-8,
        # weight decay 0.01, polynomial_decay with warm-up, --clip-norm 0.1,
        # label_smoothed_cross_entropy 0.1
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01),
        lambda o: get_polynomial_decay_schedule_with_warmup(o, WARMUP, STEPS, lr_end=0.0),
        "fairseq examples/bart/README.summarization.md",
        clip_grad_norm=0.1,
        tied=(
            (
                "model.shared.weight",
                "model.encoder.embed_tokens.weight",
                "model.decoder.embed_tokens.weight",
                "lm_head.weight",
            ),
        ),
    ),
    Entry(
        "whisper",
        seeded(
            tf.WhisperForConditionalGeneration,
            tf.WhisperConfig(
                vocab_size=V,
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=16,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                suppress_tokens=None,
                begin_suppress_tokens=None,
            ),
        ),
        audio_batch,
        model_loss,
        # "Fine-Tune Whisper with Transformers" (huggingface.co/blog/fine-tune-whisper):
        # Seq2SeqTrainer, lr 1e-5, 500 warm-up steps, linear decay, max_grad_norm 1.0. Its
        # fp16=True is CUDA AMP with a GradScaler; the zoo runs float32 on CPU.
        lambda m: trainer_adamw(m, lr=1e-3),
        linear_warmup,
        "huggingface.co/blog/fine-tune-whisper (Seq2SeqTrainer)",
        clip_grad_norm=1.0,
        tied=(("model.decoder.embed_tokens.weight", "proj_out.weight"),),
    ),
    Entry(
        "llama",
        seeded(
            tf.LlamaForCausalLM,
            tf.LlamaConfig(
                vocab_size=V, num_key_value_heads=2, max_position_embeddings=32, **SMALL
            ),
        ),
        causal_batch,
        model_loss,
        # Llama 2 paper 2.2: AdamW betas (0.9, 0.95) eps 1e-5, weight decay 0.1, cosine with
        # warm-up down to 10 % of the peak, gradient clipping 1.0
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5),
        lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, WARMUP, STEPS, min_lr_rate=0.1),
        "Llama 2 paper section 2.2",
        clip_grad_norm=1.0,
    ),
    Entry(
        "qwen2",
        seeded(
            tf.Qwen2ForCausalLM,
            tf.Qwen2Config(
                vocab_size=V,
                num_key_value_heads=2,
                max_position_embeddings=32,
                tie_word_embeddings=True,
                **SMALL,
            ),
        ),
        causal_batch,
        model_loss,
        # Qwen2 fine-tuning (QwenLM/Qwen2.5 examples, Trainer): AdamW, weight decay 0.1,
        # cosine with warm-up, max_grad_norm 1.0; Qwen2-0.5B ties its embeddings
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)),
        cosine_warmup,
        "Qwen2.5 SFT example (Trainer, cosine)",
        clip_grad_norm=1.0,
        tied=(("model.embed_tokens.weight", "lm_head.weight"),),
    ),
    Entry(
        "mistral",
        seeded(
            tf.MistralForCausalLM,
            tf.MistralConfig(
                vocab_size=V,
                num_key_value_heads=2,
                max_position_embeddings=32,
                sliding_window=8,
                **SMALL,
            ),
        ),
        causal_batch,
        model_loss,
        # alignment-handbook recipes/zephyr-7b-beta/sft/config_full.yaml (SFT of Mistral 7B):
        # Trainer AdamW, cosine, warm-up ratio 0.1, bf16, gradient accumulation
        lambda m: trainer_adamw(m, lr=1e-3),
        cosine_warmup,
        # bf16 runs as float32 here: verify's loss bar is float32's (1e-5), and under bf16
        # autocast the two runs' losses differ by 1e-5 to 1e-4 on CPUs whose bf16 kernels
        # accumulate in another order (seen on one without AVX2). Autocast itself is tested
        # in tests/test_migrate_step_features.py.
        "alignment-handbook zephyr-7b-beta SFT (cosine, gradient accumulation; bf16 as float32)",
        clip_grad_norm=1.0,
        accumulate=2,
    ),
    Entry(
        "gpt-neox",
        seeded(
            tf.GPTNeoXForCausalLM,
            tf.GPTNeoXConfig(vocab_size=V, rotary_pct=0.25, max_position_embeddings=32, **SMALL),
        ),
        causal_batch,
        model_loss,
        # Pythia (Biderman et al. 2023, App. E): Adam betas (0.9, 0.95) eps 1e-8, weight
        # decay 0.01, cosine with warm-up to 10 % of the peak, gradient clipping 1.0
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95)),
        lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, WARMUP, STEPS, min_lr_rate=0.1),
        "Pythia paper App. E (GPT-NeoX)",
        clip_grad_norm=1.0,
    ),
    Entry(
        "opt",
        seeded(
            tf.OPTForCausalLM,
            tf.OPTConfig(
                vocab_size=V,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=32,
                word_embed_proj_dim=32,
                pad_token_id=1,
            ),
        ),
        causal_batch,
        model_loss,
        # OPT paper 2.2: AdamW betas (0.9, 0.95), weight decay 0.1, linear warm-up then linear
        # decay to 10 % of the peak, gradient clipping 1.0
        lambda m: trainer_adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)),
        lambda o: get_polynomial_decay_schedule_with_warmup(o, WARMUP, STEPS, lr_end=1e-4),
        "OPT paper section 2.2",
        clip_grad_norm=1.0,
        tied=(("model.decoder.embed_tokens.weight", "lm_head.weight"),),
    ),
]
