"""mlperf_tutor.core: schedules, the reference optimizer, checkpoint checks, parity reports."""

import math

import numpy as np
import pytest

from mlperf_tutor.core import (
    CheckpointMismatch,
    OptimizerSpec,
    ParityReport,
    ReferenceOptimizer,
    ScheduleSpec,
    check_tree,
    clip_by_global_norm,
    errors,
    tree_specs,
)
from mlperf_tutor.core.tree import flatten, unflatten


def test_bert_warmup_with_negative_start_step():
    # MLPerf BERT README (TPU example): lr 0.00288293, 287 warmup steps, start_warmup_step -76.
    s = ScheduleSpec(
        0.00288293,
        warmup_steps=287,
        start_warmup_step=-76,
        decay="polynomial",
        total_steps=600,
        power=1.0,
    )
    assert s.lr_at(0) == pytest.approx(0.00288293 * 76 / 287)
    assert s.lr_at(210) == pytest.approx(0.00288293 * 286 / 287)
    # After warmup the polynomial decay counts from step 0, as the reference's tf code does.
    assert s.lr_at(211) == pytest.approx(0.00288293 * (1 - 211 / 600))
    assert s.lr_at(600) == 0.0 and s.lr_at(700) == 0.0


def test_cosine_decays_from_end_of_warmup_to_floor():
    s = ScheduleSpec(1.0, warmup_steps=10, decay="cosine", total_steps=110, end_lr=0.1)
    assert s.lr_at(5) == pytest.approx(0.5)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)


def test_warmup_init_factor_starts_above_zero():
    s = ScheduleSpec(2.0, warmup_steps=4, warmup_init_factor=1e-6)
    assert s.lr_at(0) == pytest.approx(2e-6)
    assert s.lr_at(2) == pytest.approx(2.0 * (1e-6 + (1 - 1e-6) * 0.5))
    assert s.lr_at(4) == 2.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "rmsprop"}, "unknown optimizer"),
        ({"name": "adam", "nesterov": True}, "nesterov"),
        ({"name": "sgd", "clip_norm": 0.0}, "clip_norm"),
    ],
)
def test_bad_optimizer_spec_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerSpec(**kwargs)


def test_decay_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        ScheduleSpec(1.0, decay="cosine")


def test_clip_by_global_norm_scales_to_the_bound():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([4.0])}
    clipped = clip_by_global_norm(grads, 1.0)
    assert np.allclose(clipped["a"], [0.6, 0.0]) and np.allclose(clipped["b"], [0.8])
    assert clip_by_global_norm(grads, 10.0)["b"][0] == 4.0


def test_reference_sgd_nesterov_matches_hand_computation():
    spec = OptimizerSpec("sgd", momentum=0.5, nesterov=True, weight_decay=0.1)
    opt = ReferenceOptimizer(spec, ScheduleSpec(0.1), {"w": np.array([1.0])})
    p = opt.step({"w": np.array([1.0])}, {"w": np.array([2.0])})
    # g = 2 + 0.1*1 = 2.1; buf = 2.1; nesterov g = 2.1 + 0.5*2.1 = 3.15; p = 1 - 0.315.
    assert p["w"][0] == pytest.approx(0.685)
    assert opt.state["momentum_buffer/w"][0] == pytest.approx(2.1)


def test_reference_lamb_masks_decay_and_trust_ratio():
    spec = OptimizerSpec("lamb", eps=0.0, weight_decay=0.5, no_decay=("bias",))
    params = {"w": np.array([3.0, 4.0]), "bias": np.array([3.0, 4.0])}
    grads = {"w": np.array([1.0, 1.0]), "bias": np.array([1.0, 1.0])}
    new = ReferenceOptimizer(spec, ScheduleSpec(0.1), params).step(params, grads)
    # First Adam step: m_hat/sqrt(v_hat) = sign(g) = 1. bias: no decay, no trust ratio.
    assert np.allclose(new["bias"], params["bias"] - 0.1)
    u = 1.0 + 0.5 * params["w"]  # update with decay
    ratio = np.linalg.norm(params["w"]) / np.linalg.norm(u)
    assert np.allclose(new["w"], params["w"] - 0.1 * ratio * u)


def test_reference_adagrad_initial_accumulator():
    spec = OptimizerSpec("adagrad", initial_accumulator=0.1, eps=0.0)
    new = ReferenceOptimizer(spec, ScheduleSpec(1.0), {"w": np.array([0.0])}).step(
        {"w": np.array([0.0])}, {"w": np.array([0.3])}
    )
    assert new["w"][0] == pytest.approx(-0.3 / math.sqrt(0.1 + 0.09))


def test_check_tree_lists_every_problem():
    expected = {"a": ((2,), "float32"), "b": ((3,), "float32"), "c": ((1,), "float32")}
    got = {"a": np.zeros(2, np.float32), "b": np.zeros(4, np.float32), "d": np.zeros(1)}
    with pytest.raises(CheckpointMismatch) as err:
        check_tree(expected, got, where="x.safetensors")
    message = str(err.value)
    assert "x.safetensors" in message and "'c'" in message and "'d'" in message
    assert "b: got ((4,), 'float32')" in message
    assert err.value.missing == ["c"] and err.value.unexpected == ["d"]


def test_check_tree_checks_dtype():
    with pytest.raises(CheckpointMismatch, match="float16"):
        check_tree(tree_specs({"a": np.zeros(2, np.float32)}), {"a": np.zeros(2, np.float16)})


def test_errors_max_abs_and_relative():
    max_abs, rel = errors(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    assert max_abs == pytest.approx(0.5)
    assert rel == pytest.approx(0.5 / np.linalg.norm([1.0, 2.5]))
    assert errors(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shapes"):
        errors(np.zeros(2), np.zeros(3))


def test_parity_report_verdict_worst_and_table():
    report = ParityReport()
    report.add("output", "logits", "torch-jax", np.array([1.0]), np.array([1.0 + 2e-6]))
    report.add_trees("gradient", "torch-jax", {"w": np.array([1.0])}, {"w": np.array([1.1])})
    assert not report.ok
    assert report.worst().name == "w" and report.worst("output").name == "logits"
    assert len(report.failures()) == 1
    table = report.table()
    assert "FAIL (1 tensors over the bar)" in table and "logits" in table
    frame = report.to_dataframe()
    assert list(frame["ok"]) == [True, False]


def test_flatten_unflatten_roundtrip():
    nested = {"a": {"b": 1, "c": {"0": 2}}, "d": 3}
    assert flatten(nested) == {"a.b": 1, "a.c.0": 2, "d": 3}
    assert unflatten(flatten(nested)) == nested


def test_mismatch_message_is_capped_but_keeps_every_key():
    expected = {f"layer.{i}.weight": ((2,), "float32") for i in range(50)}
    with pytest.raises(CheckpointMismatch) as err:
        check_tree(expected, {})
    assert "... and 30 more" in str(err.value) and str(err.value).count("layer.") == 20
    assert len(err.value.missing) == 50


def test_relative_bar_has_an_absolute_floor_for_round_off_tensors():
    report = ParityReport()
    # A gradient that is zero in exact arithmetic: noise over noise, relative error ~1.
    noise = report.add(
        "gradient",
        "k_proj.bias",
        "a-b",
        np.array([3e-12]),
        np.array([-2e-12]),
        metric="rel",
        bound=1e-4,
    )
    assert noise.rel > 1 and noise.ok and noise.floored
    real = report.add(
        "gradient",
        "w",
        "a-b",
        np.array([1e-3, 2e-7]),
        np.array([1e-3, 0.0]),
        metric="rel",
        bound=1e-4,
    )
    assert real.rel > 1e-4 and not real.ok
    assert report.worst().name == "w"  # floored rows do not hide real ones
