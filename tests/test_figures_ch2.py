"""The book's drawn figures for DLRM-DCNv2, the SD UNet and the RCP pruning follow the package's
configs and data: each test finds the figure's parts by gid and checks them against the config
(or an independent source), not against a stored image."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor.figures import dlrm, rcp, unet  # noqa: E402
from mlperf_tutor.mlperf import results  # noqa: E402


def _gids(fig) -> dict[str, object]:
    found = {}
    for artist in fig.findobj():
        gid = artist.get_gid()
        if gid:
            found[gid] = artist
    return found


def _label(gids, gid) -> str:
    return gids[f"{gid}:label"].get_text()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --- DLRM-DCNv2 -------------------------------------------------------------------------------


def test_dlrm_figure_draws_every_table_and_layer_of_the_mlperf_config():
    cfg = mt.workloads.get("dlrm_dcnv2").config("mlperf")
    gids = _gids(dlrm.architecture(cfg))
    tables = sorted(int(g.split(":")[1]) for g in gids if re.fullmatch(r"table:\d+", g))
    assert tables == list(range(26))
    # Criteo 1TB as the reference caps it: five tables of 40M rows, the tallest bars.
    heights = {i: gids[f"table:{i}"].get_height() for i in tables}
    tallest = [i for i, h in heights.items() if h == max(heights.values())]
    assert tallest == [0, 9, 19, 20, 21]
    assert all(_label(gids, f"table:{i}").startswith("40M") for i in tallest)
    assert _label(gids, "table:20") == "40M\n×100"  # the one 100-hot feature
    assert [_label(gids, f"bottom_mlp:{i}") for i in range(3)] == [
        "linear → 512, ReLU",
        "linear → 256, ReLU",
        "linear → 128, ReLU",
    ]
    assert "(26 + 1) × 128 = 3456" in _label(gids, "interaction")
    assert sum(bool(re.fullmatch(r"cross:\d+", g)) for g in gids) == 3
    assert all("rank 512" in _label(gids, f"cross:{i}") for i in range(3))
    assert [_label(gids, f"top_mlp:{i}") for i in range(5)][-1] == "linear → 1: click logit"


def test_dlrm_figure_follows_a_changed_config():
    cfg = mt.workloads.get("dlrm_dcnv2").config(
        "tiny", cross_layers=2, cross_rank=4, top_mlp=(16, 1)
    )
    gids = _gids(dlrm.architecture(cfg))
    assert sum(bool(re.fullmatch(r"table:\d+", g)) for g in gids) == cfg.num_tables
    assert sum(bool(re.fullmatch(r"cross:\d+", g)) for g in gids) == 2
    assert "rank 4" in _label(gids, "cross:0")
    assert [g for g in gids if re.fullmatch(r"top_mlp:\d+", g)] == ["top_mlp:0", "top_mlp:1"]
    for i, rows in enumerate(cfg.table_sizes):  # small tables print their exact row count
        assert _label(gids, f"table:{i}").split("\n")[0] == str(rows)


# --- Stable Diffusion UNet --------------------------------------------------------------------


def _skip_arrows(gids) -> list[tuple[str, str, int]]:
    arrows = []
    for gid in gids:
        match = re.fullmatch(r"skip:(.+)->(.+):(\d+)", gid)
        if match:
            arrows.append((match[1], match[2], int(match[3])))
    return arrows


def test_unet_figure_of_sd2_has_the_diffusers_blocks_and_twelve_skips():
    cfg = mt.workloads.get("stable_diffusion").config("mlperf")
    gids = _gids(unet.unet(cfg))
    arrows = _skip_arrows(gids)
    # SD 2's UNet2DConditionModel: 4 levels x 3 up resnets, each taking one skip.
    assert len(arrows) == 12
    assert len({dest for _, dest, _ in arrows}) == 12
    # The first up block (8x8) takes the two level-3 resnets and the last downsampler, the last
    # up block's final resnet takes conv_in's 320 channels.
    assert sorted(a for a in arrows if a[1].startswith("up:3:")) == [
        ("down:3:0", "up:3:1", 1280),
        ("down:3:1", "up:3:0", 1280),
        ("downsample:2", "up:3:2", 1280),
    ]
    assert ("conv_in", "up:0:2", 320) in arrows
    assert _label(gids, "up:3:0") == "res 2560→1280"  # 1280 from below + a 1280 skip
    assert _label(gids, "up:0:2") == "res 640→320\n+ attn 5h"
    assert _label(gids, "down:2:0") == "res 640→1280\n+ attn 20h"
    assert "attn" not in _label(gids, "down:3:0")
    assert "attn 20h" in _label(gids, "mid")


def test_unet_figure_skip_channels_add_up_to_each_up_resnets_input():
    wl = mt.workloads.get("stable_diffusion")
    for cfg in (
        wl.config("tiny"),
        wl.config("mlperf", channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
    ):
        gids = _gids(unet.unet(cfg))
        skips = {dest: channels for _, dest, channels in _skip_arrows(gids)}
        ups = [g for g in gids if re.fullmatch(r"up:\d+:\d+", g)]
        assert sorted(skips) == sorted(ups)
        assert len(ups) == len(cfg.channel_mult) * (cfg.num_res_blocks + 1)
        for gid in ups:
            level, j = map(int, gid.split(":")[1:])
            n_in, n_out = map(int, re.match(r"res (\d+)→(\d+)", _label(gids, gid)).groups())
            assert n_out == cfg.widths[level]
            # the input is the previous output (or the level below's width) plus the skip
            below = cfg.widths[level] if j else cfg.widths[min(level + 1, len(cfg.widths) - 1)]
            assert n_in == below + skips[gid], gid


# --- RCP pruning --------------------------------------------------------------------------------


def _checker_kept(benchmark: str) -> list[int]:
    """The batch sizes mlperf-logging's own RCP checker keeps after pruning."""
    from mlperf_logging.rcp_checker.rcp_checker import RCP_Checker

    checker = RCP_Checker("training", "4.0.0", benchmark, verbose=False)
    return sorted(record["BS"] for record in checker.pruned_rcp_data.values())


@pytest.mark.parametrize("benchmark", results.BENCHMARKS)
def test_rcp_pruning_keeps_what_the_official_checker_keeps(benchmark):
    kept = [p.batch_size for p in rcp.prune(rcp.load(benchmark))]
    assert kept == _checker_kept(benchmark)


def test_rcp_mean_is_the_olympic_mean():
    point = rcp.Point("bert", "x", 256, (5.0, 1.0, 3.0, 100.0))
    assert point.mean == 4.0  # 1 and 100 dropped
    runs = tuple(float(r) for r in range(40))
    assert rcp.Point("unet3d", "y", 28, runs).mean == sum(range(4, 36)) / 32


def test_rcp_figure_marks_kept_and_pruned_points():
    fig = rcp.pruning(results.BENCHMARKS)
    gids = _gids(fig)
    for benchmark in results.BENCHMARKS:
        points = rcp.load(benchmark)
        kept = _checker_kept(benchmark)
        line = gids[f"kept:{benchmark}"]
        assert list(line.get_xdata()) == kept
        pruned = gids[f"pruned:{benchmark}"].get_offsets()
        assert sorted(int(x) for x, _ in pruned) == sorted(
            p.batch_size for p in points if p.batch_size not in kept
        )
    # stable_diffusion: batch 384 converges slower than 512, so it is dropped in step 1
    assert [int(x) for x, _ in gids["pruned:stable_diffusion"].get_offsets()] == [384]


def test_rcp_unknown_benchmark_names_the_file_and_the_choices():
    with pytest.raises(ValueError, match=r"rcps_nope\.json.*stable_diffusion"):
        rcp.load("nope")
