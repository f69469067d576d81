"""Canonical names and shapes of the UNet's weights (PyTorch layouts: Linear (out, in), conv
OIHW), and their initialisation; framework-free."""

from __future__ import annotations

import math

import numpy as np

from mlperf_tutor.core.checkpoint import Tree
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.plan import unet_plan

Shapes = dict[str, tuple[int, ...]]


def _linear(shapes: Shapes, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _conv(shapes: Shapes, name: str, n_in: int, n_out: int, k: int) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in, k, k)
    shapes[f"{name}.bias"] = (n_out,)


def _norm(shapes: Shapes, name: str, ch: int) -> None:
    shapes[f"{name}.weight"] = (ch,)
    shapes[f"{name}.bias"] = (ch,)


def _resnet(shapes: Shapes, name: str, n_in: int, n_out: int, time_dim: int) -> None:
    _norm(shapes, f"{name}.norm1", n_in)
    _conv(shapes, f"{name}.conv1", n_in, n_out, 3)
    _linear(shapes, f"{name}.time_emb_proj", time_dim, n_out)
    _norm(shapes, f"{name}.norm2", n_out)
    _conv(shapes, f"{name}.conv2", n_out, n_out, 3)
    if n_in != n_out:
        _conv(shapes, f"{name}.conv_shortcut", n_in, n_out, 1)


def _transformer(shapes: Shapes, name: str, ch: int, cfg: StableDiffusionConfig) -> None:
    _norm(shapes, f"{name}.norm", ch)
    _linear(shapes, f"{name}.proj_in", ch, ch)
    for k in range(cfg.transformer_depth):
        block = f"{name}.transformer_blocks.{k}"
        for attn, kv_in in (("attention", ch), ("cross_attention", cfg.context_dim)):
            _norm(shapes, f"{block}.{attn}_norm", ch)
            _linear(shapes, f"{block}.{attn}.q_proj", ch, ch, bias=False)
            _linear(shapes, f"{block}.{attn}.k_proj", kv_in, ch, bias=False)
            _linear(shapes, f"{block}.{attn}.v_proj", kv_in, ch, bias=False)
            _linear(shapes, f"{block}.{attn}.o_proj", ch, ch)
        _norm(shapes, f"{block}.mlp_norm", ch)
        _linear(shapes, f"{block}.mlp.fc_gate", ch, 4 * ch)  # GEGLU: gelu(fc_gate) * fc_in
        _linear(shapes, f"{block}.mlp.fc_in", ch, 4 * ch)
        _linear(shapes, f"{block}.mlp.fc_out", 4 * ch, ch)
    _linear(shapes, f"{name}.proj_out", ch, ch)


def canonical_shapes(cfg: StableDiffusionConfig) -> Shapes:
    """Canonical name -> shape of every UNet weight, in the order of the forward."""
    plan, c0, td = unet_plan(cfg), cfg.model_channels, cfg.time_dim
    shapes: Shapes = {}
    _linear(shapes, "time_embedding.linear_1", c0, td)
    _linear(shapes, "time_embedding.linear_2", td, td)
    _conv(shapes, "conv_in", cfg.latent_channels, c0, 3)
    for i, level in enumerate(plan.down):
        for j, (n_in, n_out) in enumerate(level.resnets):
            _resnet(shapes, f"down_blocks.{i}.resnets.{j}", n_in, n_out, td)
            if level.heads:
                _transformer(shapes, f"down_blocks.{i}.attentions.{j}", n_out, cfg)
        if level.resample:
            _conv(shapes, f"down_blocks.{i}.downsamplers.0.conv", n_out, n_out, 3)
    mid = plan.mid_width
    _resnet(shapes, "mid_block.resnets.0", mid, mid, td)
    _transformer(shapes, "mid_block.attentions.0", mid, cfg)
    _resnet(shapes, "mid_block.resnets.1", mid, mid, td)
    for i, level in enumerate(plan.up):
        for j, (n_in, n_out) in enumerate(level.resnets):
            _resnet(shapes, f"up_blocks.{i}.resnets.{j}", n_in, n_out, td)
            if level.heads:
                _transformer(shapes, f"up_blocks.{i}.attentions.{j}", n_out, cfg)
        if level.resample:
            _conv(shapes, f"up_blocks.{i}.upsamplers.0.conv", n_out, n_out, 3)
    _norm(shapes, "conv_norm_out", c0)
    _conv(shapes, "conv_out", c0, cfg.latent_channels, 3)
    return shapes


# Layers the reference initialises to zero (ldm's zero_module): the last conv of every residual
# block, every spatial transformer's proj_out and conv_out, so each residual branch and the
# whole UNet start as the identity / zero.
ZERO_INIT = (".conv2.", ".proj_out.", "conv_out.")
_NORMS = (
    "norm1",
    "norm2",
    "norm",
    "conv_norm_out",
    "attention_norm",
    "cross_attention_norm",
    "mlp_norm",
)


def init_canonical(cfg: StableDiffusionConfig, seed: int = 0, zero_init: bool = True) -> Tree:
    """PyTorch's default init made explicit: weights and biases uniform in +-1/sqrt(fan_in)
    (kaiming_uniform with a = sqrt(5)), norms at weight 1 and bias 0, and the ``ZERO_INIT``
    layers at zero as the reference's ``zero_module`` (drawn like the others when not
    ``zero_init``)."""
    rng = np.random.default_rng(seed)
    tree, shapes = {}, canonical_shapes(cfg)
    for name, shape in shapes.items():
        module, leaf = name.rsplit(".", 1)
        if module.rsplit(".", 1)[-1] in _NORMS:
            value = np.ones(shape) if leaf == "weight" else np.zeros(shape)
        elif zero_init and any(z in f".{name}" for z in ZERO_INIT):
            value = np.zeros(shape)
        else:
            fan_in = math.prod(shapes[f"{module}.weight"][1:])
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, shape)
        tree[name] = value.astype(np.float32)
    return tree
