"""llama2_70b_lora as a workload: sizes, info, the transformers leg of conversion, LoRA runs,
MLPerf logs (parity and the other formats: test_workload_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_mllog import RULES, checker, read_log, records_of

from mlperf_tutor import cli, convert, frameworks, train, workloads
from mlperf_tutor.core.checkpoint import tree_specs
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama import adapter_count, flops_per_token
from mlperf_tutor.workloads.llama.hf import merge_adapters

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("llama2_70b_lora")
TINY = WL.config("tiny")


@pytest.mark.requires("hf")
def test_mlperf_param_count_equals_transformers_llama():
    import torch
    import transformers

    cfg = WL.config("mlperf")
    config = transformers.LlamaConfig(
        **{
            k: v
            for k, v in WL.hf.config_to_hf(cfg).items()
            if k not in ("architectures", "model_type")
        }
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert WL.param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert WL.param_count(cfg) == 68_976_648_192  # "about 68.98B"


def test_adapter_count_is_rank_times_in_plus_out_per_target():
    cfg = WL.config("mlperf")
    qkv_out = (64 + 2 * 8) * 128  # 64 query heads and 8 kv heads of 128 dims
    per_layer = 16 * (8192 + qkv_out) + 16 * (8192 + 8192)
    assert adapter_count(cfg) == 80 * per_layer == 44_564_480
    assert adapter_count(cfg.replace(lora_rank=0)) == 0


def test_info_reports_the_adapters_flops_and_memory(capsys):
    assert cli.main(["info", "llama2_70b_lora", "--preset", "mlperf"]) == 0
    assert "44,564,480" in capsys.readouterr().out
    info = WL.info(WL.config("mlperf"))
    cfg = WL.config("mlperf")
    # 4N + 6N_lora + 12LDT for LoRA, 6N + 12LDT for full fine-tuning; N: the weight matrices
    # (no embedding lookup, no RMSNorm weights).
    n = WL.param_count(cfg) - 32000 * 8192 - (2 * 80 + 1) * 8192
    attention = 12 * 80 * 8192 * 8192
    assert info["training FLOPs per token, LoRA (4N + 6N_lora + 12LDT)"] == (
        4 * n + 6 * 44_564_480 + attention
    )
    assert flops_per_token(cfg, lora=False) == 6 * n + attention
    assert info["full fine-tuning: fp32 weights + grads + Adam moments (GB)"] > 1000
    assert 130 < info["LoRA: bf16 base + fp32 adapters, grads, Adam moments (GB)"] < 140


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_without_lora_the_base_model_has_no_adapters_and_trains_everything(framework):
    cfg = TINY.replace(lora_rank=0)
    model = WL.build(framework, cfg)
    exported = WL.export(framework, model)
    assert tree_specs(exported) == WL.canonical_specs(cfg)
    assert not any(map(is_adapter, exported))
    assert sorted(frameworks.get(framework).trainable_names(model)) == sorted(exported)


def test_optimizer_follows_the_reference():
    spec, schedule = WL.optimizer(WL.config("mlperf"))
    assert (spec.name, spec.weight_decay, spec.clip_norm, spec.no_decay) == ("adamw", 1e-4, 0.3, ())
    assert (schedule.lr, schedule.warmup_steps, schedule.decay) == (4e-4, 0, "cosine")
    assert schedule.lr_at(0) == 4e-4 and schedule.lr_at(1024) == 0.0
    assert WL.recipe(WL.config("mlperf")).hyperparameters["lora_rank"] == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_kv_heads": 3}, r"num_heads divisible by num_kv_heads \(3\)"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"language": "french"}, "language must be one of"),
        ({"seq_len": 500}, r"exceeds max_positions"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        WL.config("tiny", **overrides)


def test_untrained_adapters_stay_out_of_a_transformers_directory_and_come_back_fresh(tmp_path):
    # The formats that hold every tensor are test_workload_contract's; a transformers directory
    # holds the base only. Untrained adapters (lora_b zero) are a no-op: they are left out and
    # come back fresh.
    tree = WL.init_canonical(TINY, seed=2)
    src, dst = tmp_path / "a.safetensors", tmp_path / "hf"
    convert.save(tree, src)
    assert cli.main(["convert", "llama2_70b_lora", str(src), str(dst)]) == 0
    back = WL.export("torch", WL.build("torch", TINY, weights=dst))
    assert all(np.array_equal(back[k], tree[k]) for k in tree if not k.endswith("lora_a.weight"))


def test_trained_adapters_are_not_dropped_on_the_way_to_transformers(tmp_path):
    tree = WL.init_canonical(TINY, seed=2)
    tree["blocks.0.attention.o_proj.lora_b.weight"][0, 0] = 0.5
    with pytest.raises(ValueError, match="trained LoRA adapters"):
        WL.hf.save_pretrained(tree, TINY, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    merged = merge_adapters(tree, TINY)
    WL.hf.save_pretrained(merged, TINY, tmp_path / "hf")
    batch = WL.synthetic_batch(TINY, batch_size=2, seed=0)
    want = WL.forward("torch", WL.build("torch", TINY, weights=tree), batch)["logits"]
    base_cfg = TINY.replace(lora_rank=0)
    got = WL.forward("torch", WL.build("torch", base_cfg, weights=tmp_path / "hf"), batch)
    assert np.abs(got["logits"] - want).max() <= 1e-5


@pytest.fixture(scope="module")
def short_runs():
    """Every framework trains the tiny adapters for 64 steps (two evaluations)."""
    return {f: train.train(WL, f, TINY, max_steps=64, progress=False) for f in frameworks.NAMES}


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_lora_training_lowers_the_eval_loss(short_runs, framework):
    run = short_runs[framework]
    # The start checkpoint: the base pretrained on the general language.
    assert run.checkpoint_losses[-1] < run.checkpoint_losses[0] - 2.0
    (_, first), (_, second) = run.evals
    assert second < first - 0.3, run.evals
    assert run.status == "aborted"


def test_every_framework_starts_from_the_same_pretrained_base(short_runs):
    base = np.array(short_runs["torch"].checkpoint_losses)
    for framework in ("jax", "tf"):
        # 60 full-model AdamW steps in float32: the curves agree to round-off.
        assert np.abs(np.array(short_runs[framework].checkpoint_losses) - base).max() < 1e-3


def test_tiny_run_reaches_the_target_and_its_log_passes_the_checker(tmp_path, capsys):
    log = tmp_path / "result_0.txt"
    # --deterministic (LoRA dropout off): with dropout, whether the 256-step schedule crosses
    # 0.925 depends on the CPU's round-off (crossed after about 180 steps on one machine,
    # ended at 0.944 on one without AVX2); without it the run crosses with room to spare
    # (0.893 at step 224 there). The rules checked below do not fix the dropout.
    argv = ["train", "llama2_70b_lora", "--framework", "torch", "--max-steps", "256"]
    argv += ["--deterministic"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    assert "(target 0.925): success" in capsys.readouterr().out
    # mlperf-logging's v4.0 open_common.yaml leaves llama2_70b_lora out of the open division's
    # benchmarks, so an open log (any preset but mlperf) fails that one rule and no other ...
    code, output = checker(log, tmp_path)
    assert code == 1 and "'gnn'] " in output and "llama2_70b_lora" in output, output
    assert output.count("failed test") == 1, output
    # ... and the same log passes every rule of the closed division, the llama ones included.
    closed = tmp_path / "closed" / "result_0.txt"
    closed.parent.mkdir()
    closed.write_text(log.read_text().replace('"value": "open"', '"value": "closed"'))
    code, output = checker(closed, tmp_path)
    assert code == 0 and "SUCCESS" in output, output
    evals = records_of(log, "eval_accuracy")
    assert [r["metadata"]["epoch_num"] % TINY.eval_every_samples for r in evals] == [0] * len(evals)
    assert evals[-1]["value"] <= 0.925 < evals[-2]["value"]
    values = {r["key"]: r["value"] for r in read_log(log.read_text())}
    assert values["lora_rank"] == 16 and values["lora_alpha"] == 32
    assert values["train_samples"] == evals[-1]["metadata"]["epoch_num"]


def test_dry_run_logs_the_closed_llama_rules(tmp_path):
    import yaml

    log = tmp_path / "dry.txt"
    argv = ["train", "llama2_70b_lora", "--framework", "jax", "--preset", "mlperf", "--dry-run"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    values = {r["key"]: r["value"] for r in read_log(log.read_text())}
    assert values["submission_division"] == "closed"
    for rule in yaml.safe_load((RULES / "closed_llama2_70b_lora.yaml").read_text()):
        key, check = rule["KEY"]["NAME"], rule["KEY"].get("CHECK")
        if rule["KEY"].get("REQ") != "EXACTLY_ONE":
            continue
        assert key in values, key
        if isinstance(check, str):
            assert eval(check, {}, {"v": {"value": values[key]}}), (key, values[key])
    assert values["global_batch_size"] == 8 and values["eval_samples"] == 173
