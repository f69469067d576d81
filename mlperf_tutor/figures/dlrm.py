"""The DLRM-DCNv2 architecture, drawn from a ``DlrmConfig`` (any preset).

Every box is an artist with a ``gid`` naming what it stands for (``table:i``, ``bottom_mlp:i``,
``interaction``, ``cross:i``, ``top_mlp:i``), so tests (and the SVG the book serves) can find the
parts of the drawing and check them against the config.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mlperf_tutor.workloads.dlrm.config import DlrmConfig

_DENSE, _SPARSE, _CROSS, _TOP = "#9ecae1", "#fdae6b", "#c7e9c0", "#bcbddc"


def _rows(n: int) -> str:
    """A row count the way a reader says it: 40M, 3.1M, 405k, 976."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return str(n)


def _box(ax, x, y, w, h, text, gid, colour, fontsize=7):
    from matplotlib.patches import FancyBboxPatch

    patch = FancyBboxPatch(
        (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02", fc=colour, ec="black", lw=0.6
    )
    patch.set_gid(gid)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, gid=f"{gid}:label")
    return patch


def _arrow(ax, start, end):
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "lw": 0.7})


def architecture(cfg: DlrmConfig) -> Figure:
    """DLRM with a DCNv2 interaction, as ``cfg`` sizes it.

    Left: the dense features through the bottom MLP. Right: one bar per embedding table, its
    height the logarithm of its row count, labelled with the rows and the ids pooled per sample
    (the multi-hot size); the largest tables are drawn darker. Above them: the concatenated
    vectors, the low-rank cross layers and the top MLP to one logit.

    Args:
        cfg: the config to draw (any preset).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    tables = cfg.table_sizes
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.set_axis_off()

    # Embedding tables: bars along the bottom right, heights log10(rows).
    x0, step, base = 3.2, 0.34, 0.0
    largest = max(tables)
    top_of_bars = base + 1.4
    for i, (rows, hot) in enumerate(zip(tables, cfg.multi_hot_sizes, strict=True)):
        height = 1.4 * math.log10(max(rows, 2)) / math.log10(max(largest, 10))
        rect = plt.Rectangle(
            (x0 + i * step, base),
            step * 0.8,
            height,
            fc="#d94801" if rows == largest else _SPARSE,
            ec="black",
            lw=0.4,
        )
        rect.set_gid(f"table:{i}")
        ax.add_patch(rect)
        ax.text(
            x0 + i * step + step * 0.4,
            base - 0.05,
            f"{_rows(rows)}\n×{hot}",
            ha="center",
            va="top",
            fontsize=5.5,
            rotation=90,
            gid=f"table:{i}:label",
        )
    tables_mid = x0 + len(tables) * step / 2
    ax.text(
        tables_mid,
        top_of_bars + 0.15,
        f"{len(tables)} embedding tables, dimension {cfg.embedding_dim}, sum-pooled bags "
        f"(height: log rows; darker: the {sum(r == largest for r in tables)} largest)",
        ha="center",
        fontsize=8,
    )

    # Bottom MLP on the left, from the dense input upwards.
    bx, y = 1.2, 0.3
    _box(ax, bx, y, 1.6, 0.32, f"{cfg.num_dense} dense features", "dense", "white")
    for i, width in enumerate(cfg.bottom_mlp):
        y_next = y + 0.55
        _arrow(ax, (bx, y + 0.16), (bx, y_next - 0.16))
        y = y_next
        relu = "ReLU"
        _box(ax, bx, y, 1.6, 0.32, f"linear → {width}, {relu}", f"bottom_mlp:{i}", _DENSE)
    ax.text(bx, y + 0.3, "bottom MLP", ha="center", fontsize=8)

    # Interaction input: the bottom MLP's vector beside every pooled embedding.
    iy = max(y, top_of_bars) + 0.9
    ix = (bx + tables_mid) / 2 + 1.0
    width_in = cfg.interaction_dim
    _box(
        ax,
        ix,
        iy,
        4.6,
        0.36,
        f"concatenate: ({len(tables)} + 1) × {cfg.embedding_dim} = {width_in}",
        "interaction",
        "white",
    )
    _arrow(ax, (bx, y + 0.16), (ix - 1.6, iy - 0.18))
    _arrow(ax, (tables_mid, top_of_bars + 0.35), (ix + 1.6, iy - 0.18))

    # DCNv2 cross layers.
    y = iy
    for i in range(cfg.cross_layers):
        y_next = y + 0.6
        _arrow(ax, (ix, y + 0.18), (ix, y_next - 0.18))
        y = y_next
        _box(
            ax,
            ix,
            y,
            4.6,
            0.36,
            f"cross {i + 1}: x₀ ⊙ (U Vᵀ x + b) + x,  rank {cfg.cross_rank}, width {width_in}",
            f"cross:{i}",
            _CROSS,
        )

    # Top MLP to one logit.
    for i, width in enumerate(cfg.top_mlp):
        y_next = y + 0.55
        _arrow(ax, (ix, y + 0.18), (ix, y_next - 0.16))
        y = y_next
        last = i == len(cfg.top_mlp) - 1
        text = f"linear → {width}" + (": click logit" if last else ", ReLU")
        _box(ax, ix, y, 2.6, 0.32, text, f"top_mlp:{i}", _TOP)
    ax.text(ix + 1.5, y - 0.55 * (len(cfg.top_mlp) - 1) / 2, "top MLP", fontsize=8, va="center")

    ax.set_xlim(0, x0 + len(tables) * step + 0.3)
    ax.set_ylim(-0.9, y + 0.4)
    ax.set_title(
        f"DLRM-DCNv2: {len(tables)} tables, bottom MLP {cfg.num_dense}-"
        + "-".join(map(str, cfg.bottom_mlp))
        + f", {cfg.cross_layers} cross layers, top MLP "
        + "-".join(map(str, cfg.top_mlp)),
        fontsize=10,
    )
    fig.tight_layout()
    return fig
