"""The UNet's block layout, computed once from the config (framework-free).

The three models, the canonical names and the parameter count all read this plan, so the channel
arithmetic of the skip connections lives in one place. Names follow diffusers'
``UNet2DConditionModel`` (``down_blocks.i.resnets.j``, ``mid_block``, ``up_blocks.i``), which
keeps the diffusers interop a rename of the transformer-block internals only.

Down path: ``conv_in`` (C0), then per level l: ``num_res_blocks`` residual blocks to C_l, each
followed by a spatial transformer on attention levels, then a stride-2 conv (but the last
level). Every one of these outputs (conv_in's included) is kept as a skip. Middle: residual
block, spatial transformer, residual block at the last width. Up path: the levels reversed, each
with ``num_res_blocks + 1`` residual blocks that first concatenate the latest skip on the channel
axis, then a nearest x2 upsampling and a conv (but the last).
"""

from __future__ import annotations

from typing import NamedTuple

from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig


class Level(NamedTuple):
    """One down or up block.

    Attributes:
        resnets: (input channels, output channels) of each residual block; on the way up the
            input includes the concatenated skip.
        heads: attention heads of the spatial transformer after each residual block (0: none).
        resample: whether the block ends in a downsampler (down) or an upsampler (up).
    """

    resnets: tuple[tuple[int, int], ...]
    heads: int
    resample: bool


class Plan(NamedTuple):
    down: tuple[Level, ...]
    mid_width: int
    mid_heads: int
    up: tuple[Level, ...]


def unet_plan(cfg: StableDiffusionConfig) -> Plan:
    """The down, middle and up blocks of ``cfg``'s UNet."""
    widths, last = cfg.widths, len(cfg.widths) - 1
    heads = [
        w // cfg.head_channels if lvl in cfg.attention_levels else 0 for lvl, w in enumerate(widths)
    ]
    down, skips, ch = [], [widths[0]], widths[0]
    for lvl, width in enumerate(widths):
        resnets = []
        for _ in range(cfg.num_res_blocks):
            resnets.append((ch, width))
            ch = width
            skips.append(ch)
        if lvl != last:
            skips.append(ch)
        down.append(Level(tuple(resnets), heads[lvl], lvl != last))
    # The middle block's transformer has heads even where the last level has none (SD: 1280/64).
    mid_heads = widths[last] // cfg.head_channels
    up = []
    for lvl in reversed(range(len(widths))):
        resnets = []
        for _ in range(cfg.num_res_blocks + 1):
            resnets.append((ch + skips.pop(), widths[lvl]))
            ch = widths[lvl]
        up.append(Level(tuple(resnets), heads[lvl], lvl != 0))
    return Plan(tuple(down), widths[last], mid_heads, tuple(up))
