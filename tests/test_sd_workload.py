"""The stable_diffusion workload end to end: counts, diffusers interop, sampling, training and its
MLPerf log (parity and conversion: test_workload_contract.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from checks import random_tree
from sd_reference import diffusers_unet
from test_mllog import RULES, checker, read_log, records_of

from mlperf_tutor import cli, convert, frameworks, train, workloads
from mlperf_tutor.workloads.stable_diffusion import flops_per_image, hf

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("stable_diffusion")
TINY = WL.config("tiny")
MLPERF = WL.config("mlperf")


@pytest.mark.requires("hf")
def test_mlperf_param_count_equals_diffusers_unet():
    import diffusers
    import torch

    kwargs = {k: v for k, v in hf.config_to_hf(MLPERF).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**kwargs)
    assert WL.param_count(MLPERF) == sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == hf.hf_shapes(MLPERF)


def test_info_reports_the_unet_size_and_training_flops():
    info = WL.info(MLPERF)
    assert info["UNet parameters"] == 865_910_724
    # About 0.4 T multiply-adds per forward at 64x64 latents, three times for training.
    assert 2.2e12 < info["training FLOPs per image"] < 2.6e12
    assert flops_per_image(TINY) < 1e-3 * flops_per_image(MLPERF)


def test_optimizer_follows_the_reference():
    spec, schedule = WL.optimizer(MLPERF)
    assert (spec.name, spec.beta1, spec.beta2, spec.eps, spec.weight_decay) == (
        "adamw",
        0.9,
        0.999,
        1e-8,
        0.01,
    )
    assert schedule.lr == pytest.approx(1.25e-7 * 2048)  # base_learning_rate x global batch
    assert (schedule.warmup_steps, schedule.warmup_init_factor) == (1000, 1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_groups=24), "divisible by norm_groups"),
        (dict(attention_levels=(0, 5)), "must index channel_mult"),
        (dict(latent_size=7), "divisible by 2"),
        (dict(head_channels=24), "head_channels"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        WL.config("tiny", **overrides)


@pytest.mark.parametrize("preset", ["tiny", "mlperf"])
def test_config_round_trips_through_the_diffusers_config(preset):
    cfg = WL.config(preset)
    assert hf.config_from_hf(hf.config_to_hf(cfg), preset=preset) == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_linear_projection", False),  # SD 1.x's 1x1 conv projections
        ("resnet_time_scale_shift", "scale_shift"),
        ("attention_head_dim", [2, 2]),  # 16- and 32-wide heads: not one head width
        ("_class_name", "UNet2DModel"),
    ],
)
def test_config_from_hf_refuses_other_unets(field, value):
    data = hf.config_to_hf(TINY) | {field: value}
    named = {"attention_head_dim": "head widths", "_class_name": "UNet2DModel"}
    with pytest.raises(ValueError, match=named.get(field, field)):
        hf.config_from_hf(data, preset="tiny")


@pytest.mark.requires("hf")
def test_diffusers_reads_our_directory_and_we_read_its(tmp_path):
    import diffusers

    tree = random_tree(WL.init_canonical(TINY), seed=4)
    hf.save_pretrained(tree, TINY, tmp_path / "ours")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    reference = diffusers_unet(TINY, tree)
    for name, value in reference.state_dict().items():
        assert np.array_equal(theirs.state_dict()[name].numpy(), value.numpy()), name
    theirs.save_pretrained(tmp_path / "theirs")
    cfg, back = hf.load_pretrained(tmp_path / "theirs")
    assert all(getattr(cfg, f) == getattr(TINY, f) for f in hf.ARCHITECTURE)
    assert all(np.array_equal(back[k], tree[k]) for k in tree)


def test_a_diffusers_directory_with_a_missing_tensor_is_refused(tmp_path):
    from mlperf_tutor.core.checkpoint import CheckpointError

    tree = WL.init_canonical(TINY)
    hf.save_pretrained(tree, TINY, tmp_path / "ours")
    state = convert.load(tmp_path / "ours" / "diffusion_pytorch_model.safetensors")
    del state["conv_out.bias"]
    convert.save(state, tmp_path / "ours" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="conv_out.bias"):
        hf.load_pretrained(tmp_path / "ours")


def test_ddim_samples_agree_across_frameworks():
    tree = random_tree(WL.init_canonical(TINY), seed=5)
    batch = WL.synthetic_batch(TINY, batch_size=2, seed=0)
    uncond = np.zeros_like(batch["context"])
    samples = {}
    for framework in frameworks.NAMES:
        model = WL.build(framework, TINY, weights=tree)
        samples[framework] = WL.sample(
            framework,
            model,
            batch["noise"],
            batch["context"],
            TINY,
            steps=5,
            guidance_scale=3.0,
            uncond_context=uncond,
        )
    assert np.abs(samples["torch"]).max() > 0.1  # the sampler moved away from zero
    for a, b in itertools.combinations(frameworks.NAMES, 2):
        assert np.abs(samples[a] - samples[b]).max() <= 1e-4, (a, b)


@pytest.fixture(scope="module")
def short_runs():
    """Every framework trains tiny for 80 steps (one evaluation)."""
    return {f: train.train(WL, f, TINY, max_steps=80, progress=False) for f in frameworks.NAMES}


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_training_lowers_the_loss(short_runs, framework):
    losses = np.array(short_runs[framework].losses)
    assert losses[-20:].mean() < 0.8 * losses[:5].mean(), losses
    (metrics,) = short_runs[framework].eval_metrics
    assert set(metrics) == {"FID", "CLIP"}


def test_tiny_run_reaches_the_targets_and_its_log_passes_the_checker(tmp_path, capsys):
    log = tmp_path / "result_0.txt"
    argv = ["train", "stable_diffusion", "--framework", "torch", "--max-steps", "480"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    assert "success" in capsys.readouterr().out
    code, output = checker(log, tmp_path)
    assert code == 0 and "SUCCESS" in output, output
    evals = records_of(log, "eval_accuracy")
    fid = [r["value"] for r in evals if r["metadata"]["metric"] == "FID"]
    clip = [r["value"] for r in evals if r["metadata"]["metric"] == "CLIP"]
    assert len(fid) == len(clip) == len(evals) // 2 >= 2
    assert fid[-1] <= TINY.fid_target and clip[-1] >= TINY.clip_target
    assert not (fid[-2] <= TINY.fid_target and clip[-2] >= TINY.clip_target)


def test_dry_run_logs_the_closed_stable_diffusion_rules(tmp_path):
    import yaml

    log = tmp_path / "dry.txt"
    argv = ["train", "stable_diffusion", "--framework", "torch", "--preset", "mlperf", "--dry-run"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    values = {r["key"]: r["value"] for r in read_log(log.read_text())}
    assert values["submission_division"] == "closed"
    for rule in yaml.safe_load((RULES / "closed_stable_diffusion.yaml").read_text()):
        if "KEY" not in rule or rule["KEY"].get("REQ") != "EXACTLY_ONE":
            continue
        key, check = rule["KEY"]["NAME"], rule["KEY"]["CHECK"]
        assert key in values, key
        assert eval(check, {}, {"v": {"value": values[key]}}), (key, values[key])
    assert values["global_batch_size"] == 2048
