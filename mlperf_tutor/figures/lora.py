"""LoRA's low-rank update, drawn from a Llama config: the frozen weight W beside the trainable
B A, with the shapes and parameter counts of the config (Hu et al. 2021,
https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mlperf_tutor.workloads.llama.config import LlamaConfig

# Inches of drawing for the longest side of W; the rank side of A and B never gets thinner than
# _MIN_SIDE so that a rank of 16 beside 8,192 still shows.
_SCALE = 3.2
_MIN_SIDE = 0.12


def projection_shape(cfg: LlamaConfig, target: str) -> tuple[int, int]:
    """(out, in) of the linear layer ``target`` (``qkv_proj`` or ``o_proj``) of ``cfg``."""
    attention = cfg.num_heads * cfg.head_dim
    shapes = {"qkv_proj": (cfg.qkv_dim, cfg.hidden), "o_proj": (cfg.hidden, attention)}
    if target not in shapes:
        raise ValueError(f"target must be one of {sorted(shapes)}, got {target!r}")
    return shapes[target]


def lora_update(cfg: LlamaConfig, target: str = "qkv_proj") -> Figure:
    """Draw ``y = W x + (alpha / r) B A x`` for one adapted projection of ``cfg``.

    Rectangles are to scale (the rank side has a minimum width so that it stays visible); the
    labels give each matrix's shape and parameter count, and the title the trainable fraction.

    Args:
        cfg: a Llama config with ``lora_rank`` > 0.
        target: the adapted projection, ``qkv_proj`` or ``o_proj``.

    Returns:
        A matplotlib Figure, made with pyplot (a notebook shows it with ``plt.show()``).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if not cfg.lora_rank:
        raise ValueError("lora_rank is 0: the config has no adapters to draw")
    out, inp = projection_shape(cfg, target)
    r = cfg.lora_rank
    unit = _SCALE / max(out, inp)

    def side(n: int) -> float:
        return max(n * unit, _MIN_SIDE)

    # (name, width, height, colour, label): W is (out, in), B (out, r), A (r, in).
    w_w, w_h = side(inp), side(out)
    b_w, b_h = side(r), side(out)
    a_w, a_h = side(inp), side(r)
    gap = 0.55
    fig = plt.figure(figsize=(2 * w_w + b_w + 4 * gap + 0.6, w_h + 1.6))
    ax = fig.add_axes((0, 0, 1, 0.86))
    x = 0.3
    boxes = []
    boxes.append(("W", x, 0.0, w_w, w_h, "#bbbbbb", f"W  {out:,} × {inp:,}\nfrozen"))
    x += w_w + gap
    ax.text(x - gap / 2, w_h / 2, f"+ {cfg.lora_scaling:g} ×", ha="center", va="center")
    boxes.append(("B", x + 0.15, 0.0, b_w, b_h, "#e07b39", f"B  {out:,} × {r}"))
    x += 0.15 + b_w + 0.25
    boxes.append(("A", x, w_h - a_h, a_w, a_h, "#3b75af", f"A  {r} × {inp:,}"))
    for name, x0, y0, width, height, colour, label in boxes:
        ax.add_patch(Rectangle((x0, y0), width, height, color=colour, label=name))
        ypos = y0 + height / 2 if name == "W" else (y0 - 0.12 if name == "A" else -0.12)
        ax.text(
            x0 + width / 2,
            ypos,
            label,
            ha="center",
            va="center" if name == "W" else "top",
            fontsize=8,
        )
    frozen, trainable = out * inp, r * (out + inp)
    ax.set_xlim(0, x + a_w + 0.3)
    ax.set_ylim(-0.6, w_h + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle(
        f"LoRA on {target}: rank {r}, alpha {cfg.lora_alpha:g}; {trainable:,} trainable beside "
        f"{frozen:,} frozen ({trainable / frozen:.2%})",
        fontsize=9,
    )
    return fig
