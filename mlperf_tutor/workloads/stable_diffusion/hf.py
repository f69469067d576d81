"""diffusers interop of the SD v2 UNet: ``UNet2DConditionModel`` configs and checkpoints.

Our canonical names follow diffusers' block structure (``down_blocks.i.resnets.j.conv1``, ...),
so only the transformer blocks differ, where we use the shared layers' names:

=================================================  ======================================
ours (inside ``...transformer_blocks.k``)           diffusers
=================================================  ======================================
``attention_norm``, ``cross_attention_norm``,      ``norm1``, ``norm2``, ``norm3``
``mlp_norm``
``attention.{q,k,v}_proj``, ``attention.o_proj``   ``attn1.to_{q,k,v}``, ``attn1.to_out.0``
``cross_attention.*``                              ``attn2.*`` (same renames)
``mlp.fc_in`` and ``mlp.fc_gate``                  ``ff.net.0.proj`` (GEGLU: rows [in | gate])
``mlp.fc_out``                                     ``ff.net.2``
=================================================  ======================================

diffusers saves ``config.json`` and ``diffusion_pytorch_model.safetensors``; both are read and
written here without importing diffusers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mlperf_tutor import convert
from mlperf_tutor.core.checkpoint import CheckpointError, Tree, check_tree
from mlperf_tutor.core.config import ConfigError, ConfigSource, Invalid, check_int, check_ints
from mlperf_tutor.core.interop import HfInterop
from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig
from mlperf_tutor.workloads.stable_diffusion.shapes import canonical_shapes

# Config fields a checkpoint fixes (convert refuses a config that differs in one of them).
ARCHITECTURE = (
    "latent_channels",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_levels",
    "head_channels",
    "transformer_depth",
    "context_dim",
    "norm_groups",
    "resnet_eps",
)
CLASS_NAME = "UNet2DConditionModel"
# What diffusers fixes and our UNet assumes: its own defaults, which SD 2 keeps.
_TRANSFORMER_NORM_EPS = 1e-6  # Transformer2DModel's GroupNorm
_LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock's LayerNorms (UNet2DConditionModel's default)
_REQUIRED = {
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "use_linear_projection": True,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,  # our UNet has none (the MLPerf reference trains without)
    "time_embedding_act_fn": None,
}
_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")  # index: whether the level has attention
_UP = ("UpBlock2D", "CrossAttnUpBlock2D")

_BLOCK_RENAMES = (  # ours -> diffusers, inside a transformer block
    ("cross_attention_norm", "norm2"),
    ("attention_norm", "norm1"),
    ("mlp_norm", "norm3"),
    ("cross_attention.", "attn2."),
    ("attention.", "attn1."),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("o_proj", "to_out.0"),
    ("mlp.fc_out", "ff.net.2"),
)
_GEGLU = "ff.net.0.proj"
_BLOCK = re.compile(r"(.+\.transformer_blocks\.\d+)\.(.+)")


# --- config ---------------------------------------------------------------------------------
def _per_level(src: ConfigSource, key: str, default: Any, levels: int) -> list[int]:
    """A diffusers per-level setting: one integer for every level, or a list of one per level."""

    def check(value) -> list[int]:
        if isinstance(value, (list, tuple)):
            values = list(check_ints(value))
        else:
            values = [check_int(value)] * levels
        if len(values) != levels:
            raise Invalid(f"has {len(values)} entries for {levels} levels")
        return values

    return src.get(key, default, check) if key in src.data else check(default)


def config_from_hf(hf_config: Any, preset: str = "mlperf", **overrides) -> StableDiffusionConfig:
    """Our config of a diffusers ``UNet2DConditionModel``: architecture from ``hf_config``, the
    rest (diffusion, optimizer, evaluation) from ``preset``.

    Raises:
        ConfigError: not a UNet2DConditionModel, a feature our UNet lacks, a value of the wrong
            type or range (the key is named), or an override of an architecture field;
            ``CheckpointError`` instead when ``hf_config`` is a file or directory.
    """
    data, where, error = convert.hf_config_dict(hf_config)
    return _config(ConfigSource(StableDiffusionConfig, data, where, error), preset, overrides)


def _config(src: ConfigSource, preset: str, overrides: dict) -> StableDiffusionConfig:
    if src.data.get("_class_name", CLASS_NAME) != CLASS_NAME:
        src.fail(f"is a {src.data['_class_name']!r}; stable_diffusion reads {CLASS_NAME} configs")
    for key, want in _REQUIRED.items():
        src.require(
            key,
            want,
            "has {key}={got}; the SD v2 UNet has {key}={want!r} and ours cannot load this model",
        )
    widths = src.integers("block_out_channels")
    levels = len(widths)
    down = src.strings("down_block_types")
    if len(down) != levels or any(t not in _DOWN for t in down):
        src.fail(f"has down_block_types {down}; ours are {list(_DOWN)} per level")
    attention = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    up = [_UP[i in attention] for i in reversed(range(levels))]
    if src.strings("up_block_types") != up:
        src.fail(f"has up_block_types {src.data['up_block_types']}; ours are {up}")
    # diffusers' attention_head_dim counts heads when num_attention_heads is unset (its legacy
    # naming, which SD 2's config relies on).
    heads_key = (
        "num_attention_heads" if src.data.get("num_attention_heads") else "attention_head_dim"
    )
    heads = _per_level(src, heads_key, 8, levels)
    if any(widths[i] % heads[i] for i in [*attention, levels - 1]):
        src.fail(f"has {heads_key} {heads}, which do not divide block_out_channels {widths}")
    head_widths = {widths[i] // heads[i] for i in [*attention, levels - 1]}
    if len(head_widths) != 1:
        src.fail(
            f"has head widths {sorted(head_widths)} across levels; ours share one head_channels"
        )
    depths = set(_per_level(src, "transformer_layers_per_block", 1, levels))
    if "layers_per_block" not in src.data:
        src.fail("has no 'layers_per_block'; it is required")
    per_block = _per_level(src, "layers_per_block", None, levels)
    if len(depths) != 1 or len(set(per_block)) != 1:
        src.fail("varies transformer or resnet depth per level; ours does not")
    in_channels = src.field("in_channels", "latent_channels")
    if src.integer("out_channels", in_channels) != in_channels:
        src.fail("has out_channels != in_channels; ours predicts latents")
    if any(w % widths[0] for w in widths):
        src.fail(f"has block_out_channels {widths}, not multiples of the first")
    src.keys |= {
        "model_channels": "block_out_channels",
        "channel_mult": "block_out_channels",
        "num_res_blocks": "layers_per_block",
        "attention_levels": "down_block_types",
        "head_channels": heads_key,
        "transformer_depth": "transformer_layers_per_block",
    }
    fields = {
        "latent_channels": in_channels,
        "model_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": per_block[0],
        "attention_levels": attention,
        "head_channels": head_widths.pop(),
        "transformer_depth": depths.pop(),
        "context_dim": src.field("cross_attention_dim", "context_dim"),
        "norm_groups": src.field("norm_num_groups", "norm_groups", 32),
        "resnet_eps": src.field("norm_eps", "resnet_eps", 1e-5),
        "latent_size": src.field("sample_size", "latent_size", 64),
    }
    fixed = sorted(set(overrides) & set(ARCHITECTURE))
    if fixed:
        raise ConfigError(f"{fixed} come from {src.where}; they cannot be overridden")
    return src.build(preset, fields, overrides)


def config_to_hf(cfg: StableDiffusionConfig) -> dict[str, Any]:
    """The config.json of ``cfg``'s UNet for diffusers' ``UNet2DConditionModel``.

    Raises:
        ValueError: ``cfg`` has a norm eps that diffusers fixes to another value.
    """
    if (cfg.transformer_norm_eps, cfg.layer_norm_eps) != (_TRANSFORMER_NORM_EPS, _LAYER_NORM_EPS):
        raise ValueError(
            f"diffusers fixes transformer_norm_eps {_TRANSFORMER_NORM_EPS} and layer_norm_eps "
            f"{_LAYER_NORM_EPS}; this config has {cfg.transformer_norm_eps} and "
            f"{cfg.layer_norm_eps}"
        )
    levels = range(len(cfg.widths))
    return {
        "_class_name": CLASS_NAME,
        "in_channels": cfg.latent_channels,
        "out_channels": cfg.latent_channels,
        "sample_size": cfg.latent_size,
        "block_out_channels": list(cfg.widths),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": [_DOWN[i in cfg.attention_levels] for i in levels],
        "up_block_types": [_UP[i in cfg.attention_levels] for i in reversed(levels)],
        "attention_head_dim": [w // cfg.head_channels for w in cfg.widths],
        "transformer_layers_per_block": cfg.transformer_depth,
        "cross_attention_dim": cfg.context_dim,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.resnet_eps,
        "upcast_attention": True,
        **_REQUIRED,
    }


# --- weights --------------------------------------------------------------------------------
def _hf_name(name: str) -> str:
    """Canonical name -> diffusers name (``mlp.fc_in``/``fc_gate`` both -> the GEGLU proj)."""
    match = _BLOCK.fullmatch(name)
    if not match:
        return name
    block, inner = match.groups()
    if inner.startswith(("mlp.fc_in.", "mlp.fc_gate.")):
        return f"{block}.{_GEGLU}.{inner.rsplit('.', 1)[1]}"
    for ours, theirs in _BLOCK_RENAMES:
        inner = inner.replace(ours, theirs)
    return f"{block}.{inner}"


def hf_shapes(cfg: StableDiffusionConfig) -> dict[str, tuple[int, ...]]:
    """diffusers name -> shape of every UNet tensor."""
    shapes = {}
    for name, shape in canonical_shapes(cfg).items():
        theirs = _hf_name(name)
        if theirs in shapes:  # the GEGLU projection: fc_in's rows, then fc_gate's
            shapes[theirs] = (2 * shape[0], *shape[1:])
        else:
            shapes[theirs] = shape
    return shapes


def to_hf(tree: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(diffusers name, array) of every tensor of ``tree``; the GEGLU projection is fc_in's and
    fc_gate's rows concatenated."""
    for name, array in tree.items():
        if ".mlp.fc_gate." in name:
            continue  # comes with fc_in
        if ".mlp.fc_in." in name:
            gate = tree[name.replace(".fc_in.", ".fc_gate.")]
            yield _hf_name(name), np.concatenate([array, gate], axis=0)
        else:
            yield _hf_name(name), array


def from_hf(state: Mapping[str, np.ndarray], cfg: StableDiffusionConfig) -> Tree:
    """A ``UNet2DConditionModel`` state dict -> canonical tree, in canonical order."""
    tree = {}
    for name in canonical_shapes(cfg):
        theirs = _hf_name(name)
        if theirs.rsplit(".", 1)[0].endswith(_GEGLU):
            fc_in, gate = np.split(np.asarray(state[theirs]), 2, axis=0)
            tree[name] = gate if ".fc_gate." in name else fc_in
        else:
            tree[name] = state[theirs]
    return tree


def load_pretrained(directory: str | os.PathLike) -> tuple[StableDiffusionConfig, Tree]:
    """Read a diffusers ``UNet2DConditionModel.save_pretrained`` directory (memory-mapped):
    (config from :func:`config_from_hf`, canonical tree).

    Raises:
        CheckpointError: another model, missing or corrupt files, or tensors missing,
            unexpected or misshapen (every one named, in diffusers names).
    """
    config = convert.read_hf_config(directory)
    where = Path(directory) / convert.HF_CONFIG
    src = ConfigSource(StableDiffusionConfig, config, where, CheckpointError)
    cfg = _config(src, "mlperf", {})
    shapes = hf_shapes(cfg)
    convert.check_hf_declared_size(directory, shapes, src.sizes(cfg))
    state = convert.read_hf_weights(directory)
    check_tree(
        {k: (s, "float32") for k, s in shapes.items()},
        state,
        where=str(directory),
        check_dtype=False,
        hint=f"stable_diffusion reads diffusers {CLASS_NAME} checkpoints",
    )
    return cfg, from_hf(state, cfg)


def save_pretrained(tree: Mapping[str, np.ndarray], cfg: StableDiffusionConfig, directory) -> None:
    """Write ``tree`` as a diffusers ``UNet2DConditionModel`` directory, atomically.

    Raises:
        CheckpointMismatch: the tree does not fit ``cfg`` (every bad key named).
        ValueError: ``cfg`` cannot be expressed as a diffusers config.
    """
    specs = {k: (s, "float32") for k, s in canonical_shapes(cfg).items()}
    check_tree(specs, tree, where=f"the tree for {directory}", check_dtype=False)
    ours = convert.specs_of(tree, str(directory))
    dtype = ours["conv_in.weight"].dtype
    config = config_to_hf(cfg) | {"_diffusers_version": "0.42.1"}
    out = {k: convert.TensorSpec(s, dtype) for k, s in hf_shapes(cfg).items()}
    mixed = sorted({s.dtype.name for s in ours.values()} - {dtype.name})
    if mixed:
        raise ValueError(f"the tree mixes dtypes ({dtype.name} and {mixed}); cast it to one")
    convert.write_hf_directory(directory, config, out, to_hf(tree), convert.DIFFUSERS_WEIGHTS)


# What the stable_diffusion workload's ``hf`` attribute gives convert and users.
INTEROP = HfInterop(
    architecture=ARCHITECTURE,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    load_pretrained=load_pretrained,
    save_pretrained=save_pretrained,
)
