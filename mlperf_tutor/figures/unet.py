"""The Stable Diffusion UNet with its skip connections, drawn from the block plan of a config.

The drawing reads :func:`~mlperf_tutor.workloads.stable_diffusion.plan.unet_plan`, the plan the
three models and the parameter count read, so it shows the network the package builds. Each
box's ``gid`` names its block (``conv_in``, ``down:l:j``, ``downsample:l``, ``mid``,
``upsample:l``, ``up:l:j``, ``conv_out``) and each skip arrow's ``gid`` is ``skip:SRC->DST``
with the channels it carries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mlperf_tutor.workloads.stable_diffusion.config import StableDiffusionConfig

_RES, _ATTN, _SAMPLE, _END = "#c6dbef", "#fdd0a2", "#e5e5e5", "white"
_W, _H, _DX, _SHIFT = 1.0, 0.5, 1.15, 0.9  # box width, height, spacing, staircase shift


def _box(ax, x, y, text, gid, colour, width=_W, height=_H):
    from matplotlib.patches import FancyBboxPatch

    patch = FancyBboxPatch(
        (x - width / 2, y - height / 2),
        width,
        height,
        boxstyle="round,pad=0.02",
        fc=colour,
        ec="black",
        lw=0.6,
    )
    patch.set_gid(gid)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=6, gid=f"{gid}:label")


def _resnet_text(n_in: int, n_out: int, heads: int) -> str:
    text = f"res {n_in}→{n_out}"
    return text + f"\n+ attn {heads}h" if heads else text


def skips(cfg: StableDiffusionConfig) -> list[tuple[str, str, int]]:
    """Every skip connection as (source block, destination block, channels).

    The down path pushes each output (``conv_in``, every residual block, every downsampler) on a
    stack; each residual block of the up path pops the latest one and concatenates it.
    """
    from mlperf_tutor.workloads.stable_diffusion.plan import unet_plan

    plan = unet_plan(cfg)
    stack = [("conv_in", cfg.widths[0])]
    for lvl, level in enumerate(plan.down):
        for j, (_, n_out) in enumerate(level.resnets):
            stack.append((f"down:{lvl}:{j}", n_out))
        if level.resample:
            stack.append((f"downsample:{lvl}", level.resnets[-1][1]))
    last = len(plan.down) - 1
    pairs = []
    for k, level in enumerate(plan.up):
        for j in range(len(level.resnets)):
            source, channels = stack.pop()
            pairs.append((source, f"up:{last - k}:{j}", channels))
    return pairs


def unet(cfg: StableDiffusionConfig) -> Figure:
    """The UNet of ``cfg`` as a U: the down path on the left, one row per resolution, the middle
    block at the bottom, the up path on the right, and an arc for every skip connection.

    Args:
        cfg: a Stable Diffusion config (any preset).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from mlperf_tutor.workloads.stable_diffusion.plan import unet_plan

    plan = unet_plan(cfg)
    levels = len(plan.down)
    per_row = max(len(level.resnets) for level in plan.up) + 1  # boxes in the widest row
    gap = 1.2
    right = (levels - 1) * _SHIFT + per_row * _DX + gap + per_row * _DX  # mirror axis
    where: dict[str, tuple[float, float]] = {}

    fig, ax = plt.subplots(figsize=(13, 1.4 + 1.25 * (levels + 1)))
    ax.set_axis_off()

    size = cfg.latent_size
    for lvl, level in enumerate(plan.down):
        y, x = -lvl, lvl * _SHIFT
        ax.text(x - 0.9, y, f"{size}×{size}", ha="right", va="center", fontsize=7)
        if lvl == 0:
            where["conv_in"] = (x, y)
            _box(ax, x, y, f"conv_in\n{cfg.latent_channels}→{cfg.widths[0]}", "conv_in", _END)
        else:
            where[f"downsample:{lvl - 1}"] = (x, y)
            _box(ax, x, y, "stride-2\nconv", f"downsample:{lvl - 1}", _SAMPLE)
        for j, (n_in, n_out) in enumerate(level.resnets):
            name = f"down:{lvl}:{j}"
            where[name] = (x + (j + 1) * _DX, y)
            colour = _ATTN if level.heads else _RES
            _box(ax, *where[name], _resnet_text(n_in, n_out, level.heads), name, colour)
        size //= 2 if level.resample else 1

    size *= 2 ** (levels - 1)  # back to the top for the up path's row labels
    for k, level in enumerate(plan.up):
        lvl = levels - 1 - k
        y = -lvl
        n = len(level.resnets)
        first = right - lvl * _SHIFT - n * _DX
        for j, (n_in, n_out) in enumerate(level.resnets):
            name = f"up:{lvl}:{j}"
            where[name] = (first + j * _DX, y)
            colour = _ATTN if level.heads else _RES
            _box(ax, *where[name], _resnet_text(n_in, n_out, level.heads), name, colour)
        if level.resample:  # output one row up, drawn as that row's first box
            name = f"upsample:{lvl}"
            row_up = lvl - 1
            where[name] = (
                right - row_up * _SHIFT - (len(plan.up[k + 1].resnets) + 1) * _DX,
                -row_up,
            )
            _box(ax, *where[name], "nearest ×2\n+ conv", name, _SAMPLE)
            ax.annotate(
                "",
                xy=where[name],
                xytext=where[f"up:{lvl}:{n - 1}"],
                arrowprops={"arrowstyle": "->", "lw": 0.6, "color": "grey"},
            )
    last_up = f"up:0:{len(plan.up[-1].resnets) - 1}"
    where["conv_out"] = (where[last_up][0] + _DX, 0)
    _box(
        ax, *where["conv_out"], f"conv_out\n{cfg.widths[0]}→{cfg.latent_channels}", "conv_out", _END
    )

    mid_x = (
        where[f"down:{levels - 1}:{len(plan.down[-1].resnets) - 1}"][0]
        + right
        - (levels - 1) * _SHIFT
        - len(plan.up[0].resnets) * _DX
    ) / 2
    where["mid"] = (mid_x, -levels)
    w = plan.mid_width
    _box(
        ax,
        mid_x,
        -levels,
        f"mid: res {w}→{w}\n+ attn {plan.mid_heads}h\n+ res {w}→{w}",
        "mid",
        _ATTN if plan.mid_heads else _RES,
        width=1.5,
        height=0.7,
    )

    bottom = levels - 1
    for start, end in [
        (f"down:{bottom}:{len(plan.down[-1].resnets) - 1}", "mid"),
        ("mid", f"up:{bottom}:0"),
    ]:
        ax.annotate(
            "",
            xy=where[end],
            xytext=where[start],
            arrowprops={
                "arrowstyle": "->",
                "lw": 0.6,
                "color": "grey",
                "shrinkA": 12,
                "shrinkB": 12,
            },
        )
    for source, dest, channels in skips(cfg):
        (x1, y1), (x2, y2) = where[source], where[dest]
        arrow = ax.annotate(
            "",
            xy=(x2, y2 + _H / 2),
            xytext=(x1, y1 + _H / 2),
            arrowprops={
                "arrowstyle": "->",
                "lw": 0.6,
                "color": "#3182bd",
                "alpha": 0.7,
                "connectionstyle": f"arc3,rad={-0.25 if x2 > x1 else 0.25}",
            },
        )
        arrow.set_gid(f"skip:{source}->{dest}:{channels}")

    ax.set_xlim(-2.0, right + _DX)
    ax.set_ylim(-levels - 0.6, 1.6)
    heads = [level.heads for level in plan.down]
    ax.set_title(
        f"SD UNet: widths {list(cfg.widths)}, {cfg.num_res_blocks} residual blocks per level "
        f"down, {cfg.num_res_blocks + 1} up; attention heads {heads} (orange: with a spatial "
        "transformer); blue arcs: skip connections",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
