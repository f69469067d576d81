"""Run rules as data (``Workload.recipe``): targets, eval cadence, the start checkpoint; and the
workload defaults derived from ``canonical_shapes`` (specs, parameter count, initial weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlperf_tutor import workloads
from mlperf_tutor.core.checkpoint import tree_specs
from mlperf_tutor.core.optim import OptimizerSpec, ScheduleSpec
from mlperf_tutor.workloads.recipe import CheckpointStart, Recipe, Target

BENCHMARKS = {
    "bert": "bert",
    "dlrm_dcnv2": "dlrm_dcnv2",
    "gpt3": "gpt3",
    "llama2_70b_lora": "llama2_70b_lora",
    "stable_diffusion": "stable_diffusion",
}


@pytest.mark.parametrize("name", workloads.names())
def test_recipe_names_the_mlperf_benchmark_and_targets_of_every_preset(name):
    wl = workloads.get(name)
    for preset in wl.presets:
        recipe = wl.recipe(wl.config(preset))
        assert recipe.benchmark == BENCHMARKS.get(name)
        # Every MLPerf benchmark here is evaluated; the others (toy, gptj) are not.
        assert recipe.evaluated == (name in BENCHMARKS)


def test_mlperf_targets_are_the_rules_values():
    def targets(name):
        wl = workloads.get(name)
        return wl.recipe(wl.config("mlperf")).targets

    assert targets("bert") == (Target("masked-LM accuracy", 0.720),)
    assert targets("dlrm_dcnv2") == (Target("ROC AUC", 0.80275),)
    assert targets("gpt3") == (Target("log perplexity", 2.69, higher_is_better=False),)
    assert targets("llama2_70b_lora") == (Target("eval loss", 0.925, higher_is_better=False),)
    assert targets("stable_diffusion") == (
        Target("FID", 90.0, higher_is_better=False),
        Target("CLIP", 0.15),
    )


def test_stable_diffusion_needs_both_bars_and_a_new_target_replaces_only_fid():
    wl = workloads.get("stable_diffusion")
    recipe = wl.recipe(wl.config("mlperf"))
    assert recipe.quality_metric == "FID" and recipe.target == 90.0
    assert recipe.quality_reached({"FID": 90.0, "CLIP": 0.15})  # both bars inclusive
    assert not recipe.quality_reached({"FID": 90.1, "CLIP": 0.9})
    assert not recipe.quality_reached({"FID": 10.0, "CLIP": 0.149})
    stricter = recipe.with_target(20.0)
    assert stricter.targets == (Target("FID", 20.0, False), Target("CLIP", 0.15))
    assert not stricter.quality_reached({"FID": 30.0, "CLIP": 0.9})
    assert recipe.target == 90.0  # with_target made a new recipe


def test_higher_and_lower_is_better_targets_include_the_bar():
    accuracy = Target("acc", 0.72)
    assert accuracy.reached({"acc": 0.72}) and not accuracy.reached({"acc": 0.7199})
    loss = Target("loss", 2.69, higher_is_better=False)
    assert loss.reached({"loss": 2.69}) and not loss.reached({"loss": 2.6901})


def test_bert_eval_cadence_is_the_config_value_or_the_rule_of_the_batch_size():
    wl = workloads.get("bert")
    tiny = wl.recipe(wl.config("tiny"))
    assert [tiny.eval_every_samples(b) for b in (1, 8192)] == [40, 40]
    rule = wl.recipe(wl.config("tiny", eval_every_samples=None))
    assert [rule.eval_every_samples(b) for b in (3584, 8192)] == [175_000, 225_000]


def test_gpt3_continues_its_start_checkpoint_and_logs_tokens():
    wl = workloads.get("gpt3")
    cfg = wl.config("tiny")
    recipe = wl.recipe(cfg)
    start = recipe.checkpoint
    assert recipe.start_step == start.steps == 60 and start.continues and start.config == cfg
    assert start.schedule.lr == 5e-3 and start.schedule.total_steps == cfg.total_steps
    assert start.optimizer == wl.optimizer(cfg)[0]
    assert recipe.units_per_sample == cfg.seq_len
    assert recipe.hyperparameters["init_checkpoint_step"] == 60
    assert wl.recipe(cfg.replace(init_checkpoint_step=0)).checkpoint is None


def test_llama_pretrains_its_base_without_adapters_and_starts_a_fresh_optimizer():
    wl = workloads.get("llama2_70b_lora")
    cfg = wl.config("tiny")
    start = wl.recipe(cfg).checkpoint
    assert start.steps == cfg.init_checkpoint_step and not start.continues
    assert (start.config.lora_rank, start.config.prompt_fraction) == (0, 0.0)
    assert start.config.language == "general"
    assert start.schedule == ScheduleSpec(cfg.checkpoint_lr)
    assert wl.recipe(wl.config("mlperf")).checkpoint is None


def test_recipe_is_read_only_and_refuses_incomplete_rules():
    recipe = Recipe(targets=(Target("acc", 0.5),), eval_every=10, hyperparameters={"a": 1})
    with pytest.raises(TypeError):
        recipe.hyperparameters["a"] = 2
    with pytest.raises(ValueError, match="needs eval_every"):
        Recipe(targets=(Target("acc", 0.5),))
    with pytest.raises(ValueError, match="eval_every_samples must be at least 1, got 0"):
        Recipe(targets=(Target("acc", 0.5),), eval_every=0)
    with pytest.raises(ValueError, match="init_checkpoint_step"):
        CheckpointStart(0, OptimizerSpec("adamw"), ScheduleSpec(1e-3), config=None)
    with pytest.raises(ValueError, match="no target to replace"):
        Recipe().with_target(0.5)


@pytest.mark.parametrize("name", workloads.names())
def test_specs_and_param_count_follow_canonical_shapes(name):
    wl = workloads.get(name)
    cfg = wl.config("tiny")
    shapes = wl.canonical_shapes(cfg)
    tree = wl.init_canonical(cfg)
    assert tree_specs(tree) == wl.canonical_specs(cfg)
    assert list(tree) == list(shapes)  # drawn in canonical order
    assert all(v.dtype == np.float32 for v in tree.values())
    total = sum(math.prod(s) for s in shapes.values())
    # Every entry is a parameter, except toy's BatchNorm statistics and llama's adapters (its
    # count is the base model's, as LlamaForCausalLM counts).
    excluded = {"toy": ("running_",), "llama2_70b_lora": ("lora_",)}.get(name, ())
    kept = sum(math.prod(s) for k, s in shapes.items() if not any(e in k for e in excluded))
    assert wl.param_count(cfg) == kept <= total
