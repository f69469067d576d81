"""The LoRA and parallelism figures are drawn from the config they are given: change the config,
and the shapes and labels change with it."""

import pytest
from matplotlib.patches import Rectangle

import mlperf_tutor as mt
from mlperf_tutor.figures import lora, parallelism


@pytest.fixture(autouse=True)
def close_figures():
    """The figures are made with pyplot; close them so tests do not accumulate open figures."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [fig._suptitle.get_text()]


def boxes(fig):
    return {p.get_label(): p for p in fig.axes[0].patches if isinstance(p, Rectangle)}


def test_lora_figure_labels_follow_the_config():
    cfg = mt.workloads.get("llama2_70b_lora").config("mlperf")
    labels = " ".join(texts(lora.lora_update(cfg)))
    # Llama 2 70B's fused qkv_proj: (64 query + 2 x 8 kv heads) x 128 dims out, 8192 in.
    assert "10,240 × 8,192" in labels and "B  10,240 × 16" in labels and "A  16 × 8,192" in labels
    assert f"{16 * (10240 + 8192):,} trainable" in labels
    rank8 = " ".join(texts(lora.lora_update(cfg.replace(lora_rank=8))))
    assert "B  10,240 × 8" in rank8 and "A  8 × 8,192" in rank8
    assert f"{8 * (10240 + 8192):,} trainable" in rank8


def test_lora_figure_shapes_follow_the_config():
    cfg = mt.workloads.get("llama2_70b_lora").config("tiny")  # d 64, 4 + 2 x 2 heads of 16
    qkv = boxes(lora.lora_update(cfg, "qkv_proj"))
    o = boxes(lora.lora_update(cfg, "o_proj"))
    # W is drawn (out, in) to scale: 128 x 64 for qkv_proj, 64 x 64 for o_proj.
    assert qkv["W"].get_height() == pytest.approx(2 * qkv["W"].get_width())
    assert o["W"].get_height() == pytest.approx(o["W"].get_width())
    wide = boxes(lora.lora_update(cfg.replace(lora_rank=64)))
    assert wide["B"].get_width() > qkv["B"].get_width()
    assert wide["A"].get_height() > qkv["A"].get_height()


def test_lora_figure_rejects_what_it_cannot_draw():
    cfg = mt.workloads.get("llama2_70b_lora").config("tiny")
    with pytest.raises(ValueError, match="target must be one of"):
        lora.lora_update(cfg, "gate_proj")
    with pytest.raises(ValueError, match="lora_rank is 0"):
        lora.lora_update(cfg.replace(lora_rank=0))


def test_parallel_layout_splits_layers_and_heads_of_the_config():
    cfg = mt.workloads.get("gpt3").config("mlperf")  # 96 layers, 96 heads, FFN 49152
    found = parallelism.shards(cfg, data=2, tensor=4, pipeline=6)
    assert len(found) == 48 and sorted(s.gpu for s in found) == list(range(48))
    last = max(found, key=lambda s: s.gpu)
    assert (last.replica, last.stage, last.rank) == (1, 5, 3)
    assert (last.layers.start, last.layers.stop) == (80, 96)
    assert (last.heads.start, last.heads.stop) == (72, 96)
    assert (last.ffn.start, last.ffn.stop) == (36864, 49152)
    labels = texts(parallelism.parallel_layout(cfg, data=484, tensor=4, pipeline=6))
    assert "GPU 23: layers 80-95\nheads 72-95, FFN 36864-49151" in labels
    assert "stage 5" in labels and "stage 6" not in labels
    assert "(2 of 484 shown)" in labels[-1] and "11,616 GPUs" in labels[-1]


def test_parallel_layout_changes_with_the_config():
    cfg = mt.workloads.get("gpt3").config("tiny")  # 2 layers, 2 heads
    fig = parallelism.parallel_layout(cfg, data=1, tensor=2, pipeline=2)
    assert len(fig.axes[0].patches) == 4
    assert "GPU 3: layers 1-1\nheads 1-1, FFN 64-127" in texts(fig)
    deeper = parallelism.parallel_layout(cfg.replace(num_layers=8), data=1, tensor=2, pipeline=2)
    assert "GPU 3: layers 4-7\nheads 1-1, FFN 64-127" in texts(deeper)


def test_parallel_layout_names_a_factor_that_does_not_divide():
    cfg = mt.workloads.get("gpt3").config("mlperf")
    with pytest.raises(ValueError, match=r"pipeline=5 does not divide the config's num_layers"):
        parallelism.shards(cfg, data=1, tensor=4, pipeline=5)
    with pytest.raises(ValueError, match=r"tensor=7 does not divide the config's num_heads"):
        parallelism.shards(cfg, data=1, tensor=7, pipeline=1)
    with pytest.raises(ValueError, match="data must be at least 1"):
        parallelism.shards(cfg, data=0, tensor=1, pipeline=1)
