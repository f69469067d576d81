"""A decoder's layout across data, tensor and pipeline parallelism, drawn from its config.

Pipeline parallelism gives each stage a contiguous block of layers; tensor parallelism splits the
attention heads (and the MLP's inner width) of every layer of a stage across the GPUs of a
group; data parallelism repeats the whole grid. Megatron-LM's papers describe the scheme
(Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053; Narayanan et al. 2021,
https://arxiv.org/abs/2104.04473). Interleaved pipeline stages are not drawn.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mlperf_tutor.core.config import Config


@dataclasses.dataclass(frozen=True)
class Shard:
    """What one GPU of a (data, tensor, pipeline) layout holds."""

    gpu: int  # rank, counted tensor-fastest, then pipeline, then data (Megatron's order)
    replica: int  # data-parallel index
    stage: int  # pipeline stage
    rank: int  # tensor-parallel rank inside the stage
    layers: range  # decoder layers of the stage
    heads: range  # query heads of each of those layers
    ffn: range  # columns of the MLP's inner width


def shards(cfg: Config, data: int, tensor: int, pipeline: int) -> list[Shard]:
    """Every GPU's part of the model for a ``data`` x ``tensor`` x ``pipeline`` layout.

    Raises:
        ValueError: a factor below 1, or layers, heads or FFN width that the factor does not
            divide (the message names the option and the config field).
    """
    for name, value in (("data", data), ("tensor", tensor), ("pipeline", pipeline)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for option, value, field in (
        ("pipeline", pipeline, "num_layers"),
        ("tensor", tensor, "num_heads"),
        ("tensor", tensor, "ffn"),
    ):
        size = getattr(cfg, field)
        if size % value:
            raise ValueError(f"{option}={value} does not divide the config's {field} ({size})")
    per_stage = cfg.num_layers // pipeline
    heads, ffn = cfg.num_heads // tensor, cfg.ffn // tensor
    out = []
    for replica in range(data):
        for stage in range(pipeline):
            for rank in range(tensor):
                out.append(
                    Shard(
                        gpu=(replica * pipeline + stage) * tensor + rank,
                        replica=replica,
                        stage=stage,
                        rank=rank,
                        layers=range(stage * per_stage, (stage + 1) * per_stage),
                        heads=range(rank * heads, (rank + 1) * heads),
                        ffn=range(rank * ffn, (rank + 1) * ffn),
                    )
                )
    return out


def parallel_layout(
    cfg: Config, data: int, tensor: int, pipeline: int, replicas_shown: int = 2
) -> Figure:
    """Draw the GPUs of the first ``replicas_shown`` data-parallel replicas, one box per GPU
    with its layers, heads and FFN columns.

    Args:
        cfg: a decoder config with ``num_layers``, ``num_heads`` and ``ffn``.
        data, tensor, pipeline: the parallel factors; their product is the GPU count.
        replicas_shown: how many replicas to draw (the rest are summarised in the title).

    Returns:
        A matplotlib Figure, made with pyplot (a notebook shows it with ``plt.show()``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    drawn = [s for s in shards(cfg, data, tensor, pipeline) if s.replica < replicas_shown]
    shown = min(replicas_shown, data)
    cell_w, cell_h, pad = 1.45, 0.62, 0.08
    fig = plt.figure(figsize=(0.9 + pipeline * cell_w, 0.9 + shown * (tensor * cell_h + 0.45)))
    ax = fig.add_axes((0, 0, 1, 0.9))
    colours = ["#3b75af", "#e07b39", "#519e3e", "#c53a32", "#8d69b8", "#84584e"]
    row_of = {}
    for s in drawn:
        top = s.replica * (tensor * cell_h + 0.45)
        y = -(top + (s.rank + 1) * cell_h)
        x = s.stage * cell_w
        ax.add_patch(
            Rectangle(
                (x + pad / 2, y + pad / 2),
                cell_w - pad,
                cell_h - pad,
                color=colours[s.stage % len(colours)],
                alpha=0.35,
            )
        )
        label = (
            f"GPU {s.gpu}: layers {s.layers.start}-{s.layers.stop - 1}\n"
            f"heads {s.heads.start}-{s.heads.stop - 1}, FFN {s.ffn.start}-{s.ffn.stop - 1}"
        )
        ax.text(x + cell_w / 2, y + cell_h / 2, label, ha="center", va="center", fontsize=6)
        row_of[s.replica] = top
    for replica, top in row_of.items():
        ax.text(
            -0.1,
            -top - tensor * cell_h / 2,
            f"replica {replica}",
            rotation=90,
            ha="right",
            va="center",
            fontsize=7,
        )
    for stage in range(pipeline):
        ax.text((stage + 0.5) * cell_w, 0.1, f"stage {stage}", ha="center", va="bottom", fontsize=7)
    ax.set_xlim(-0.5, pipeline * cell_w + 0.1)
    ax.set_ylim(-(shown * (tensor * cell_h + 0.45)), 0.4)
    ax.axis("off")
    more = f" ({shown} of {data} shown)" if data > shown else ""
    fig.suptitle(
        f"{cfg.num_layers} layers, {cfg.num_heads} heads on {data * tensor * pipeline:,} GPUs: "
        f"data {data}{more} × pipeline {pipeline} × tensor {tensor}",
        fontsize=9,
    )
    return fig


def plan_layout(plan, names: list[str]) -> Figure:
    """Draw which devices hold which block of each parameter in ``names`` under ``plan`` (a
    :class:`mlperf_tutor.parallel.Plan`): one panel per parameter, its matrix (a vector: one
    row) cut into the blocks the plan splits it into, each block labelled with the devices
    that hold it (several where an axis replicates it).

    Returns:
        A matplotlib Figure, made with pyplot (a notebook shows it with ``plt.show()``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
    colours = ["#3b75af", "#e07b39", "#519e3e", "#c53a32", "#8d69b8", "#84584e", "#d5a021"]
    for ax, name in zip(axes[0], names, strict=True):
        shape = plan.shapes[name]
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        holders: dict[tuple, list[int]] = {}
        for rank in range(plan.mesh.devices):
            part = plan.device_slices(name, rank)
            row = part[0] if len(shape) == 2 else slice(0, 1)
            col = part[1] if len(shape) == 2 else part[0]
            holders.setdefault((row.start, row.stop, col.start, col.stop), []).append(rank)
        for block, (r0, r1, c0, c1) in enumerate(sorted(holders)):
            ranks = holders[(r0, r1, c0, c1)]
            ax.add_patch(
                Rectangle(
                    (c0 / cols, 1 - r1 / rows),
                    (c1 - c0) / cols,
                    (r1 - r0) / rows,
                    facecolor=colours[block % len(colours)],
                    alpha=0.35,
                    edgecolor="black",
                )
            )
            label = (
                "devices\n" + ",".join(map(str, ranks)) if len(ranks) > 1 else f"device {ranks[0]}"
            )
            centre = ((c0 + c1) / 2 / cols, 1 - (r0 + r1) / 2 / rows)
            ax.text(*centre, label, ha="center", va="center", fontsize=7)
        split = " × ".join("+".join(axes) or "·" for axes in plan.partitions[name])
        ax.set_title(f"{name}\n{tuple(shape)} split {split}", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.axis("off")
    fig.suptitle(f"mesh {plan.mesh}", fontsize=9)
    fig.tight_layout()
    return fig
