"""Checkpoints and resume of the training path, for every workload in every framework.

The uninterrupted run is a 6-step run that saves at step 3 and at step 6 (saving must not
change what it trains). A fresh process then resumes from its step-3 checkpoint and trains to
step 6; its losses and final weights must equal the uninterrupted run's bit for bit, with
dropout on and batches read from the workload's real-format sample files (so the data position
is part of what resumes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mlperf_tutor import frameworks, train, workloads
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL, errors
from mlperf_tutor.train.checkpoints import RunCheckpoints

pytestmark = pytest.mark.requires("torch", "jax", "tf", "data")

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ["bert", "dlrm_dcnv2", "gpt3", "gptj", "llama2_70b_lora", "stable_diffusion", "toy"]
BATCH = 2
STEPS = 6
HALF = STEPS // 2  # where the checkpoint that a run resumes from is saved


def config(name: str):
    """The tiny preset with dropout on wherever the model has dropout (gpt3 also with 64-token
    sequences instead of 2048: seconds per step on a CPU otherwise)."""
    wl = workloads.get(name)
    overrides = {"gpt3": {"dropout": 0.1, "seq_len": 64}, "gptj": {"dropout": 0.1}}
    overrides = overrides.get(name, {})
    return wl.config("tiny", **overrides)


def unreachable_target(name: str) -> float | None:
    """A quality no short run reaches, so that no run stops early at an evaluation."""
    wl = workloads.get(name)
    recipe = wl.recipe(config(name))
    if not recipe.evaluated:
        return None
    return 1.0 if recipe.targets[0].higher_is_better else 1e-9


def run_kwargs(name: str, framework: str, root: Path) -> dict:
    return dict(
        workload=name,
        framework=framework,
        preset=config(name),
        max_steps=STEPS,
        batch_size=BATCH,
        seed=3,
        target=unreachable_target(name),
        progress=False,
        device="cpu",
        data=json.loads((root / "data" / "paths.json").read_text())[name],
        checkpoint_dir=str(root / framework / name),
    )


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_resume import WORKLOADS, run_kwargs
    from mlperf_tutor import train
    from pathlib import Path
    framework, root = sys.argv[1], Path(sys.argv[2])
    for name in WORKLOADS:
        kwargs = run_kwargs(name, framework, root)
        result = train.train(**kwargs, resume=True)
        from mlperf_tutor import workloads
        tree = workloads.get(name).export(framework, result.model)
        np.savez(root / framework / f"{{name}}.resumed.npz", **tree)
        (root / framework / f"{{name}}.resumed.json").write_text(
            json.dumps({{"losses": result.losses, "start": result.start_step}}))
    """
)


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    paths = {
        name: str(
            workloads.get(name).write_sample_data(
                config(name), root / "data" / name, samples=48, seed=5
            )
        )
        for name in WORKLOADS
    }
    (root / "data" / "paths.json").write_text(json.dumps(paths))
    return root


@pytest.fixture(scope="module", params=frameworks.NAMES)
def runs(request, sample_data):
    """(uninterrupted results, resumed losses/weights) per workload in one framework."""
    framework, root = request.param, sample_data
    uninterrupted = {}
    for name in WORKLOADS:
        kwargs = run_kwargs(name, framework, root)
        result = train.train(**kwargs, checkpoint_every=HALF, keep=3)
        uninterrupted[name] = (result.losses, workloads.get(name).export(framework, result.model))
        # The resumed run starts from the first checkpoint: set the last one aside.
        checkpoints = RunCheckpoints(kwargs["checkpoint_dir"], keep=3)
        assert checkpoints.steps() == [HALF, STEPS], name
        os.rename(checkpoints.path(STEPS), root / framework / f"{name}.last")
    script = RESUME_SCRIPT.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script, framework, str(root)], check=True, env=env)
    resumed = {}
    for name in WORKLOADS:
        meta = json.loads((root / framework / f"{name}.resumed.json").read_text())
        with np.load(root / framework / f"{name}.resumed.npz") as f:
            resumed[name] = (meta, dict(f))
    return framework, uninterrupted, resumed


@pytest.mark.parametrize("name", WORKLOADS)
def test_resume_in_a_fresh_process_equals_the_uninterrupted_run(runs, name):
    framework, uninterrupted, resumed = runs
    losses, weights = uninterrupted[name]
    meta, resumed_weights = resumed[name]
    assert meta["start"] == HALF and len(losses) == STEPS
    assert meta["losses"] == losses[HALF:], f"{name} {framework}: losses after the resume differ"
    assert set(resumed_weights) == set(weights)
    differing = [k for k in weights if not np.array_equal(weights[k], resumed_weights[k])]
    assert not differing, f"{name} {framework}: weights differ after the resume: {differing[:5]}"


def test_dropout_is_on_in_the_resumed_runs(runs, sample_data):
    # The bit-for-bit resume above is a statement about live dropout only if dropout changes
    # what these runs train: the same first two steps without dropout have other losses (two:
    # LoRA's B starts at zero, so LoRA dropout changes nothing before the first update).
    framework, uninterrupted, _ = runs
    for name in ("bert", "gpt3", "llama2_70b_lora"):
        kwargs = run_kwargs(name, framework, sample_data)
        kwargs |= dict(preset=workloads.get(name).deterministic(config(name)), max_steps=2)
        del kwargs["checkpoint_dir"]
        without = train.train(**kwargs).losses
        assert without != uninterrupted[name][0][:2], f"{name} {framework}: dropout is off"


@pytest.mark.parametrize("target", ["jax", "tf"])
@pytest.mark.parametrize("name", ["toy", "gpt3"])
def test_torch_checkpoint_resumes_in_another_framework(tmp_path, name, target):
    wl = workloads.get(name)
    cfg = wl.deterministic(config(name))
    common = dict(preset=cfg, batch_size=BATCH, seed=1, progress=False, device="cpu")
    reference = train.train(
        name, "torch", max_steps=STEPS, checkpoint_dir=tmp_path, checkpoint_every=HALF, **common
    )
    for leftover in RunCheckpoints(tmp_path).steps()[1:]:
        os.rename(RunCheckpoints(tmp_path).path(leftover), tmp_path / f"gone{leftover}")
    moved = train.train(
        name, target, max_steps=STEPS, checkpoint_dir=tmp_path, resume=True, **common
    )
    assert moved.start_step == HALF
    loss_error = np.abs(np.array(moved.losses) - np.array(reference.losses[HALF:])).max()
    assert loss_error <= OUTPUT_ATOL, f"losses after the move differ by {loss_error}"
    ours, theirs = wl.export(target, moved.model), wl.export("torch", reference.model)
    worst = max(errors(ours[k], theirs[k])[1] for k in theirs)
    assert worst <= STEP_RTOL, f"parameters after the move differ by {worst} (relative)"


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlperf_tutor import frameworks, train
    framework, directory = sys.argv[1], Path(sys.argv[2])
    adapter = frameworks.get(framework)
    original = adapter.Trainer.save
    def slow_save(self, path):
        original(self, path)
        if self.steps >= 2:  # the second save: announce it, then wait to be killed
            (directory.parent / "saving").write_text(str(path))
            time.sleep(120)
    adapter.Trainer.save = slow_save
    train.train("toy", framework, max_steps=5, checkpoint_dir=directory, checkpoint_every=1,
                batch_size=2, device="cpu", progress=False)
    """
)


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path, framework):
    directory = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, framework, str(directory)], env=env
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "saving").exists():
        assert child.poll() is None, "the training process ended before its second save"
        assert time.monotonic() < deadline, "the second save never started"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # The interrupted save wrote its state under a staging name, never as step 2.
    staging = [p.name for p in directory.iterdir() if p.name.startswith(".tmp-")]
    assert staging, "the kill did not interrupt a save"
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == [
        "step_00000001"
    ]
    resumed = train.train(
        "toy",
        framework,
        max_steps=3,
        checkpoint_dir=directory,
        resume=True,
        batch_size=2,
        device="cpu",
        progress=False,
    )
    assert resumed.start_step == 1 and len(resumed.losses) == 2
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]  # swept


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    train.train("toy", "torch", max_steps=2, checkpoint_dir=tmp_path, progress=False, device="cpu")
    with pytest.raises(CheckpointError, match=r"different run: .*seed 0 \(this run: 1\)"):
        train.train(
            "toy",
            "torch",
            max_steps=4,
            checkpoint_dir=tmp_path,
            resume=True,
            seed=1,
            progress=False,
            device="cpu",
        )


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something else"}', "not an mlperf_tutor run checkpoint"),
        (None, "is a directory, not a regular run.json"),
    ],
)
def test_a_corrupt_run_json_is_named(tmp_path, content, problem):
    train.train("toy", "torch", max_steps=2, checkpoint_dir=tmp_path, progress=False, device="cpu")
    run_json = tmp_path / "step_00000002" / "run.json"
    run_json.unlink()
    if content is None:
        run_json.mkdir()
    else:
        run_json.write_text(content)
    with pytest.raises(CheckpointError, match=problem) as raised:
        train.train(
            "toy",
            "torch",
            max_steps=4,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
            device="cpu",
        )
    assert str(run_json) in str(raised.value)


def test_keep_holds_the_newest_checkpoints(tmp_path):
    train.train(
        "toy",
        "jax",
        max_steps=5,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        keep=2,
        progress=False,
        device="cpu",
    )
    assert RunCheckpoints(tmp_path).steps() == [4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("source, target", [("torch", "jax"), ("tf", "torch")])
def test_bf16_lora_checkpoint_resumes_and_evaluates_in_another_framework(tmp_path, source, target):
    # bf16 LoRA: the frozen base is stored in bf16, and each run ends with an evaluation of the
    # bf16 model outside the training step (the trainer's evaluating() context).
    common = dict(
        batch_size=BATCH,
        progress=False,
        device="cpu",
        precision="bf16",
        target=1e-9,
        checkpoint_dir=tmp_path,
    )
    first = train.train("llama2_70b_lora", source, max_steps=2, **common)
    moved = train.train("llama2_70b_lora", target, max_steps=4, resume=True, **common)
    assert moved.start_step == 2 and len(moved.losses) == 2
    assert np.isfinite(first.losses + moved.losses).all()
    assert [samples for samples, _ in first.evals + moved.evals] == [4, 8]
