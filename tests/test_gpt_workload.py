"""GPT-3 and GPT-J end to end: configs and MLPerf rules, training, generation, info and GPT-3's
MLPerf log (parity and conversion: test_workload_contract.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from test_mllog import checker, read_log, records_of

from mlperf_tutor import cli, frameworks, train, workloads
from mlperf_tutor.workloads.gpt import LANGUAGE_SEED, TARGET_LOG_PERPLEXITY
from mlperf_tutor.workloads.gpt.config import mlperf_schedule
from mlperf_tutor.workloads.gpt.data import bigram_table

pytestmark = pytest.mark.requires("torch", "jax", "tf")

GPT3, GPTJ = workloads.get("gpt3"), workloads.get("gptj")
TINY = {"gpt3": GPT3.config("tiny"), "gptj": GPTJ.config("tiny")}


# --- configs and MLPerf rules (no framework) ---------------------------------------------------


def test_mlperf_preset_is_gpt3_175b():
    cfg = GPT3.config("mlperf")
    assert (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.ffn) == (96, 12288, 96, 4 * 12288)
    assert (cfg.seq_len, cfg.vocab_size, cfg.padded_vocab_size) == (2048, 50257, 50304)
    d, layers = cfg.hidden, cfg.num_layers
    # Per block: 4 d^2 + 4 d attention, 8 d^2 + 5 d MLP, 4 d in two LayerNorms; plus the
    # padded token table, 2048 learned positions and the final LayerNorm.
    expected = layers * (12 * d * d + 13 * d) + (50304 + 2048) * d + 2 * d
    assert GPT3.param_count(cfg) == expected == 174_604_836_864


def test_full_preset_is_gptj_6b():
    cfg = GPTJ.config("full")
    d, f, v = 4096, 16384, 50400
    # Per block: 4 d^2 attention (no biases), 2 d f + f + d MLP, one LayerNorm (2 d); plus the
    # token table, the final LayerNorm and the untied head with its bias.
    expected = 28 * (4 * d * d + 2 * d * f + f + d + 2 * d) + v * d + 2 * d + v * d + v
    assert GPTJ.param_count(cfg) == expected == 6_050_882_784
    assert (cfg.rotary_dim, cfg.head_dim, cfg.parallel_residual) == (64, 256, True)


@pytest.mark.parametrize(
    ("batch", "lr", "warmup", "decay", "checkpoint"),
    [
        (1536, 2e-5, 265, 108600, 4000),
        (2048, 2e-5, 199, 81450, 3000),
        (4096, 3e-5, 100, 40725, 1500),
        (8192, 3e-5, 50, 20363, 750),
    ],
)
def test_mlperf_schedule_follows_the_v4_rules(batch, lr, warmup, decay, checkpoint):
    rules = mlperf_schedule(batch)
    assert (rules["lr"], rules["warmup_steps"], rules["total_steps"]) == (lr, warmup, decay)
    assert rules["init_checkpoint_step"] == checkpoint


def test_mlperf_schedule_refuses_batches_outside_the_rules():
    with pytest.raises(ValueError, match="global batch 1536-8192, got 1024"):
        mlperf_schedule(1024)


def test_optimizer_is_adam_with_cosine_to_a_tenth():
    spec, schedule = GPT3.optimizer(GPT3.config("mlperf"))
    assert (spec.name, spec.beta1, spec.beta2, spec.eps) == ("adamw", 0.9, 0.95, 1e-8)
    assert (spec.weight_decay, spec.clip_norm) == (0.1, 1.0)
    assert schedule.lr_at(265) == pytest.approx(2e-5)
    assert schedule.lr_at(132) == pytest.approx(2e-5 * 133 / 265, rel=1e-2)
    assert schedule.lr_at(108600) == pytest.approx(2e-6) == schedule.lr_at(200000)
    # The reference passes --do-layernorm-bias-weight-decay: every parameter is decayed.
    assert spec.decays("blocks.0.attention_norm.weight") and spec.decays("final_norm.bias")
    gptj_spec, _ = GPTJ.optimizer(GPTJ.config("full"))
    assert not gptj_spec.decays("blocks.0.attention_norm.weight")
    assert not gptj_spec.decays("lm_head.bias") and gptj_spec.decays("lm_head.weight")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rotary_dim": 3, "position": "rotary"}, "rotary_dim"),
        ({"seq_len": 4096}, "exceeds max_positions"),
        ({"lm_head_bias": True}, "untied head"),
        ({"activation": "relu"}, "activation must be"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPT3.config("tiny", **overrides)


@pytest.mark.parametrize("name", ["gpt3", "gptj"])
def test_synthetic_batch_is_next_token_prediction(name):
    wl, cfg = workloads.get(name), TINY[name]
    batch = wl.synthetic_batch(cfg, batch_size=3, seed=4)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, cfg.seq_len)
    assert batch["input_ids"].dtype == np.int32
    assert np.array_equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    # Real tokens only: the padded rows of the vocabulary are never inputs nor labels.
    assert batch["labels"].max() < cfg.vocab_size <= cfg.padded_vocab_size
    again = wl.synthetic_batch(cfg, batch_size=3, seed=4)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)


def test_synthetic_language_can_reach_the_mlperf_target():
    # The best achievable log perplexity is the bigram entropy under the data's token
    # distribution; it must be below 2.69 for the tiny run to reach the target.
    table = bigram_table(TINY["gpt3"].vocab_size, LANGUAGE_SEED)
    entropy = -(table * np.log(table)).sum(axis=1)
    assert entropy.max() < TARGET_LOG_PERPLEXITY - 0.3


def test_info_reports_palm_training_flops_per_token(capsys):
    assert cli.main(["info", "gpt3", "--preset", "mlperf"]) == 0
    out = capsys.readouterr().out
    cfg = GPT3.config("mlperf")
    d, layers = cfg.hidden, cfg.num_layers
    # PaLM: 6 N + 12 L D T with N the matmul weights (blocks and the tied head).
    flops = 6 * (layers * 12 * d * d + 50304 * d) + 12 * layers * d * 2048
    assert GPT3.info(cfg)["training FLOPs per token (6N + 12LDT)"] == flops
    assert f"{flops:,}" in out or f"{flops:.4g}" in out


# --- every framework ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt3", "gptj"])
def test_greedy_generation_gives_the_same_tokens_in_every_framework(name):
    wl, cfg = workloads.get(name), TINY[name]
    # Weights trained for 30 steps, so that each argmax is decided by a learned margin rather
    # than by the round-off of near-equal random logits.
    adapter = frameworks.get("torch")
    model = wl.build("torch", cfg)
    start = wl.recipe(cfg).checkpoint  # gpt3 tiny pretrains at a higher rate; gptj has none
    spec, schedule = (start.optimizer, start.schedule) if start else wl.optimizer(cfg)
    optimizer = adapter.make_optimizer(spec, schedule, model)
    for step in range(30):
        adapter.train_step(model, optimizer, wl.synthetic_batch(cfg, batch_size=1, seed=step))
    weights = adapter.to_canonical(model)
    prompt = wl.synthetic_batch(cfg, batch_size=2, seed=9)["input_ids"][:, :5]
    tokens = {
        f: wl.generate(f, wl.build(f, cfg, weights=weights), cfg, prompt, new_tokens=6)
        for f in frameworks.NAMES
    }
    assert tokens["torch"].shape == (2, 11)
    assert np.array_equal(tokens["torch"][:, :5], prompt)
    assert tokens["torch"].max() < cfg.vocab_size
    for f in ("jax", "tf"):
        assert np.array_equal(tokens[f], tokens["torch"]), f


def test_generation_refuses_more_tokens_than_positions():
    cfg = TINY["gpt3"]
    with pytest.raises(ValueError, match="exceed the model's 2048 positions"):
        GPT3.generate("torch", None, cfg, np.zeros((1, 2044), np.int32), new_tokens=5)


@pytest.fixture(scope="module")
def gptj_curves():
    cfg = TINY["gptj"]
    return {
        f: np.array(train.train(GPTJ, f, cfg, max_steps=40, progress=False).losses)
        for f in frameworks.NAMES
    }


def test_gptj_trains_and_the_curves_agree(gptj_curves):
    torch_curve = gptj_curves["torch"]
    assert torch_curve[-5:].mean() < torch_curve[:5].mean() - 0.3
    for framework in ("jax", "tf"):
        assert np.abs(gptj_curves[framework] - torch_curve).max() <= 1e-5, framework


@pytest.mark.parametrize("framework", ["torch", "jax", "tf"])
def test_tiny_gpt3_reaches_the_target_and_its_log_passes_the_checker(framework, tmp_path, capsys):
    log = tmp_path / "result_0.txt"
    argv = ["train", "gpt3", "--framework", framework, "--max-steps", "300", "--mllog", str(log)]
    assert cli.main(argv) == 0
    assert "(target 2.69): success" in capsys.readouterr().out
    code, output = checker(log, tmp_path)
    assert code == 0 and "SUCCESS" in output, output
    cfg = TINY["gpt3"]
    tokens_per_eval = cfg.eval_every_samples * cfg.seq_len
    evals = records_of(log, "eval_accuracy")
    assert [r["metadata"]["epoch_num"] % tokens_per_eval for r in evals] == [0] * len(evals)
    assert 2.6 < evals[-1]["value"] <= 2.69 < evals[-2]["value"]
    # The eval loss falls at every evaluation of the run.
    assert all(a["value"] > b["value"] for a, b in itertools.pairwise(evals))
    assert records_of(log, "init_checkpoint_step")[0]["value"] == cfg.init_checkpoint_step
    assert records_of(log, "train_samples")[0]["value"] == evals[-1]["metadata"]["epoch_num"]
    assert {r["key"] for r in read_log(log.read_text())} >= {"opt_end_learning_rate", "run_stop"}


def test_gpt3_target_is_a_positive_log_perplexity(capsys):
    argv = ["train", "gpt3", "--framework", "torch", "--max-steps", "1", "--target", "-1"]
    assert cli.main(argv) == 2
    assert "target must be positive" in capsys.readouterr().err


def test_dry_run_logs_the_closed_gpt3_rules(tmp_path):
    import yaml
    from test_mllog import RULES

    log = tmp_path / "dry.txt"
    argv = ["train", "gpt3", "--framework", "jax", "--preset", "mlperf", "--dry-run"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    values = {r["key"]: r["value"] for r in read_log(log.read_text())}
    assert values["submission_division"] == "closed"
    rules = yaml.safe_load((RULES / "closed_gpt3.yaml").read_text())
    for rule in rules:
        key, check = rule["KEY"]["NAME"], rule["KEY"].get("CHECK")
        if rule["KEY"].get("REQ") != "EXACTLY_ONE":
            continue
        assert key in values, key
        if isinstance(check, str):  # the rule's own expression on the logged value
            assert eval(check, {}, {"v": {"value": values[key]}}), (key, values[key])
    assert values["init_checkpoint_step"] == 4000 and math.isclose(
        values["opt_end_learning_rate"], 2e-6
    )


@pytest.mark.parametrize("framework", ["torch", "jax", "tf"])
def test_key_bias_gradient_is_exactly_zero_without_rotary(framework):
    # Softmax ignores the shift q . b_k shared by all keys of a query; the layers keep the
    # analytic zero instead of round-off (see Attention._keys).
    cfg = TINY["gpt3"]
    model = GPT3.build(framework, cfg, weights=GPT3.init_canonical(cfg, seed=3))
    _, grads = frameworks.get(framework).loss_and_grads(model, GPT3.synthetic_batch(cfg))
    for i in range(cfg.num_layers):
        assert not grads[f"blocks.{i}.attention.k_proj.bias"].any()
        assert grads[f"blocks.{i}.attention.q_proj.bias"].any()  # a real gradient beside it
