"""torch_to_jax + verify: the migrated JAX step computes the torch step's numbers for 10 steps.

Covered: user-style models (an MLP, a CNN with BatchNorm and dropout, a ResNet basic block, a
Transformer encoder layer, a custom forward with indexing, einsum and masking), every workload's
PyTorch model at ``tiny``, every supported optimizer and scheduler, migration mid-run, and the
step as a ``tf.function``. Optimizer and scheduler semantics are tested one by one in
test_migrate_optim.py, the op translations in test_migrate_interpreter.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_models as tm
from torch.optim import lr_scheduler as sched

from mlperf_tutor import workloads
from mlperf_tutor.migrate import VerificationError, to_tf, torch_to_jax, verify

pytestmark = pytest.mark.requires("torch", "jax")

STEPS = 10
# The workloads' tiny models are verified for fewer steps: each step runs four models (torch and
# JAX in float32 and float64), and a wrong translation shows from the first step.
WORKLOAD_STEPS = 4


def seeded(make):
    torch.manual_seed(0)
    return make()


# model, loss, batch maker, optimizer, scheduler: every optimizer and scheduler appears once.
CASES = {
    "mlp-sgd-nesterov-steplr": (
        tm.MLP,
        tm.classify,
        tm.vector_batch,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda o: sched.StepLR(o, step_size=3, gamma=0.5),
    ),
    "cnn-adam-cosine": (
        tm.CNN,
        tm.classify,
        tm.image_batch,
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-4),
        lambda o: sched.CosineAnnealingLR(o, T_max=STEPS),
    ),
    "resnet-adamw-onecycle": (
        tm.BasicBlock,
        tm.classify,
        lambda s: tm.image_batch(s, channels=4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
        lambda o: sched.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS),
    ),
    # SGD for the encoder: the key part of in_proj_bias has an exact zero gradient (softmax
    # ignores q . b_k), and adaptive optimizers (RMSprop, Adagrad, Adam) turn the round-off that
    # stands in for it into lr-sized steps that differ between frameworks (5e-3 relative).
    "encoder-sgd-sequential": (
        tm.Encoder,
        tm.classify_tokens,
        tm.token_batch,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda o: sched.SequentialLR(
            o, [sched.LinearLR(o, 0.1, total_iters=3), sched.ExponentialLR(o, 0.9)], milestones=[3]
        ),
    ),
    "custom-rmsprop-multistep": (
        tm.Custom,
        tm.classify_tokens,
        tm.token_batch,
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
        lambda o: sched.MultiStepLR(o, milestones=[2, 6], gamma=0.3),
    ),
    "mlp-adagrad-linear": (
        tm.MLP,
        tm.classify,
        tm.vector_batch,
        lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1),
        lambda o: sched.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=STEPS),
    ),
    "mlp-adamw-lambda": (
        tm.MLP,
        tm.classify,
        tm.vector_batch,
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda o: sched.LambdaLR(o, lambda step: 1.0 / (1.0 + step)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_passes_for_user_models_optimizers_and_schedulers(case, capsys):
    make, loss_fn, batch, make_opt, make_sched = CASES[case]
    model = seeded(make).train()
    optimizer = make_opt(model.parameters())
    scheduler = make_sched(optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify(model, optimizer, loss_fn, [batch(s) for s in range(STEPS)], scheduler)
    assert report.ok and len(report.rows) == STEPS
    assert "PASS" in capsys.readouterr().out
    # verify works on copies: the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if case.startswith("cnn") or case.startswith("encoder"):
        assert report.dropout_off  # dropout is switched off in both for the comparison


def test_batchnorm_running_statistics_are_carried_as_state():
    model = seeded(tm.CNN).train()
    model.dropout.p = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.image_batch(0))
    for step in range(3):
        batch = tm.image_batch(step)
        optimizer.zero_grad()
        tm.classify(model, {k: torch.from_numpy(v) for k, v in batch.items()}).backward()
        optimizer.step()
        migrated.run(batch)
    for name in ("bn.running_mean", "bn.running_var"):
        want = model.state_dict()[name].numpy()
        assert np.abs(np.asarray(migrated.state.buffers[name]) - want).max() <= 1e-6, name


def test_migrating_mid_run_continues_the_torch_run():
    model = seeded(tm.MLP)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = sched.StepLR(optimizer, step_size=2, gamma=0.5)
    batches = [{k: torch.from_numpy(v) for k, v in tm.vector_batch(s).items()} for s in range(8)]
    for batch in batches[:4]:  # four torch steps first: moments, step count, lr position
        optimizer.zero_grad()
        tm.classify(model, batch).backward()
        optimizer.step()
        scheduler.step()
    migrated = torch_to_jax(model, optimizer, tm.classify, batches[0], scheduler)
    for batch in batches[4:]:
        optimizer.zero_grad()
        tm.classify(model, batch).backward()
        optimizer.step()
        scheduler.step()
        migrated.run({k: v.numpy() for k, v in batch.items()})
    for name, p in model.named_parameters():
        got, want = np.asarray(migrated.params[name]), p.detach().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5, name


def workload_case(name):
    wl = workloads.get(name)
    cfg = wl.deterministic(wl.config("tiny"))
    if name == "gpt3":
        cfg = cfg.replace(seq_len=64)  # tiny gpt3 trains on 2048-token sequences: slow here
    # stable_diffusion's init zeroes its output layers, which would hide a wrong translation
    # (see Workload.parity_weights); the other workloads' parity weights are their init.
    model = wl.build("torch", cfg, weights=wl.parity_weights(cfg)).train()
    return wl, cfg, model


@pytest.mark.parametrize("name", sorted(set(workloads.names())))
def test_every_workload_torch_model_migrates(name, capsys):
    wl, cfg, model = workload_case(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    batches = [wl.synthetic_batch(cfg, batch_size=2, seed=s) for s in range(WORKLOAD_STEPS)]
    report = verify(model, optimizer, lambda m, b: m(b)["loss"], batches)
    assert report.ok, report


def test_verify_raises_on_a_wrong_migration(monkeypatch):
    model = seeded(tm.MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    import mlperf_tutor.migrate as migrate

    real = migrate.torch_to_jax

    def sabotaged(*args, **kwargs):
        migrated = real(*args, **kwargs)
        migrated.params["fc1.bias"] = migrated.params["fc1.bias"] + 1e-2
        return migrated

    monkeypatch.setattr(migrate, "torch_to_jax", sabotaged)
    with pytest.raises(VerificationError, match="diverged"):
        verify(model, optimizer, tm.classify, [tm.vector_batch(s) for s in range(2)], quiet=True)


def test_unused_optimizer_parameters_are_named():
    model = seeded(tm.MLP)
    model.spare = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"never uses the parameters \['spare.bias', 'spare.weight'\]"
    ):
        torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0))


@pytest.mark.requires("tf")
def test_to_tf_runs_the_same_step():
    model = seeded(tm.CNN).train()
    model.dropout.p = 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.image_batch(0))
    tf_step = to_tf(migrated)
    params, state = migrated.params, migrated.state
    tf_params, tf_state = params, state
    for step in range(3):
        batch = tm.image_batch(step)
        params, state, loss = migrated.step(params, state, batch)
        tf_params, tf_state, tf_loss = tf_step(tf_params, tf_state, batch)
        assert abs(float(loss) - float(tf_loss)) <= 1e-5
    for name, value in params.items():
        assert np.abs(np.asarray(value) - np.asarray(tf_params[name])).max() <= 1e-5, name
