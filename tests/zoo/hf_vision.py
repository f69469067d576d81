"""transformers image classifiers, from tiny configs, with their ImageNet recipes.

torchvision and timm cannot be installed here; transformers' ResNet, ConvNeXt, MobileNetV2,
EfficientNet, Swin and ViT are the same architectures. Images are 3 x 16 x 16 (32 x 32 for the
networks that downsample 32 times), 10 classes.
"""

from __future__ import annotations

import functools

import torch
import transformers as tf
from torch.optim import lr_scheduler
from transformers.optimization import get_cosine_schedule_with_warmup

from . import Entry
from .recipes import STEPS, WARMUP, cross_entropy, images, seeded, trainer_param_groups

CLASSES = 10


def classify(model, batch, smoothing: float = 0.0):
    """Cross-entropy of the logits, label-smoothed as the recipe says."""
    return cross_entropy(
        model(pixel_values=batch["pixel_values"]).logits, batch["labels"], smoothing
    )


smoothed = functools.partial(classify, smoothing=0.1)


def cosine_warmup(optimizer):
    return get_cosine_schedule_with_warmup(optimizer, WARMUP, STEPS)


ENTRIES = [
    Entry(
        "vit",
        seeded(
            tf.ViTForImageClassification,
            tf.ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=CLASSES,
            ),
        ),
        functools.partial(images, size=16, classes=CLASSES),
        smoothed,
        # ViT paper App. B.1: Adam(W) betas (0.9, 0.999), weight decay 0.1, linear warm-up and
        # cosine decay, gradient clipping at global norm 1; DeiT's label smoothing 0.1
        lambda m: torch.optim.AdamW(trainer_param_groups(m, 0.1), lr=1e-3),
        cosine_warmup,
        "ViT paper App. B.1 + DeiT label smoothing 0.1",
        clip_grad_norm=1.0,
    ),
    Entry(
        "convnext",
        seeded(
            tf.ConvNextForImageClassification,
            tf.ConvNextConfig(
                num_channels=3,
                patch_size=2,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                num_stages=2,
                drop_path_rate=0.1,
                image_size=16,
                num_labels=CLASSES,
            ),
        ),
        functools.partial(images, size=16, classes=CLASSES),
        smoothed,
        # ConvNeXt paper App. A.1 (ImageNet-1K): AdamW lr 4e-3, weight decay 0.05, cosine
        # with warm-up, label smoothing 0.1, stochastic depth, layer scale 1e-6
        lambda m: torch.optim.AdamW(m.parameters(), lr=4e-3, weight_decay=0.05),
        cosine_warmup,
        "ConvNeXt paper App. A.1 (stochastic depth 0.1, label smoothing 0.1)",
    ),
    Entry(
        "swin",
        seeded(
            tf.SwinForImageClassification,
            tf.SwinConfig(
                image_size=16,
                patch_size=2,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 4],
                window_size=4,
                drop_path_rate=0.1,
                num_labels=CLASSES,
            ),
        ),
        functools.partial(images, size=16, classes=CLASSES),
        smoothed,
        # Swin paper App. A2.1: AdamW lr 1e-3, weight decay 0.05, cosine with warm-up,
        # gradient clipping max norm 5.0, label smoothing 0.1, stochastic depth
        lambda m: torch.optim.AdamW(trainer_param_groups(m, 0.05), lr=1e-3),
        cosine_warmup,
        "Swin paper App. A2.1 (clip 5.0, label smoothing 0.1, stochastic depth)",
        clip_grad_norm=5.0,
    ),
    Entry(
        "resnet",
        seeded(
            tf.ResNetForImageClassification,
            tf.ResNetConfig(
                num_channels=3,
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                layer_type="basic",
                num_labels=CLASSES,
            ),
        ),
        functools.partial(images, size=32, classes=CLASSES),
        classify,
        # torchvision references/classification (ResNet): SGD lr 0.1 momentum 0.9, weight
        # decay 1e-4, StepLR every 30 epochs by 0.1 (here every 4 steps)
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.1),
        "torchvision references/classification README (ResNet)",
    ),
    Entry(
        "mobilenet-v2",
        seeded(
            tf.MobileNetV2ForImageClassification,
            # torchvision's MobileNetV2 head: dropout 0.2 (transformers defaults to 0.8)
            tf.MobileNetV2Config(
                num_channels=3,
                image_size=64,
                depth_multiplier=0.25,
                finegrained_output=False,
                classifier_dropout_prob=0.2,
                num_labels=CLASSES,
            ),
        ),
        # batch 8: BatchNorm over 4 images at the 1 x 1 last stage is too noisy to train.
        # 64 x 64 images, not 32 x 32: the last stages' BatchNorm then averages 2 x 2 x 8
        # values, not 8. With 8, a CPU without AVX2 rounded the first step differently
        # enough to move the loss by 1.7e-4, past what the float64 referee allows.
        functools.partial(images, size=64, classes=CLASSES, batch=8),
        classify,
        # MobileNetV2 paper 4.1 / torchvision's recipe: SGD momentum 0.9, weight decay 4e-5,
        # lr decayed by 0.98 every epoch (here every step)
        lambda m: torch.optim.SGD(m.parameters(), lr=0.036, momentum=0.9, weight_decay=4e-5),
        lambda o: lr_scheduler.ExponentialLR(o, gamma=0.98),
        "torchvision references/classification README (MobileNetV2)",
    ),
    Entry(
        "efficientnet",
        seeded(
            tf.EfficientNetForImageClassification,
            tf.EfficientNetConfig(
                num_channels=3,
                image_size=32,
                width_coefficient=0.25,
                depth_coefficient=0.25,  # one block a stage
                # B0's first three stages of seven (a tiny model compiles in seconds)
                kernel_sizes=[3, 3, 5],
                strides=[1, 2, 2],
                in_channels=[32, 16, 24],
                out_channels=[16, 24, 40],
                expand_ratios=[1, 6, 6],
                num_block_repeats=[1, 2, 2],
                depthwise_padding=[],
                hidden_dim=320,  # must equal the top conv's round_filters(1280) at width 0.25
                num_labels=CLASSES,
            ),
        ),
        functools.partial(images, size=32, classes=CLASSES),
        classify,
        # EfficientNet paper 5.2: RMSProp decay 0.9 momentum 0.9, weight decay 1e-5, lr
        # decayed by 0.97 every 2.4 epochs (here every 2 steps), stochastic depth 0.2
        lambda m: torch.optim.RMSprop(
            m.parameters(), lr=1e-3, alpha=0.9, momentum=0.9, eps=1e-3, weight_decay=1e-5
        ),
        lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.97),
        "EfficientNet paper 5.2 (RMSProp, stochastic depth 0.2)",
    ),
]
