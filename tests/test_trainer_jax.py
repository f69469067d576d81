"""The JAX Trainer: same numbers as train_step, bf16 near fp32, bit-exact resume from Orbax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.requires("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import frameworks  # noqa: E402
from mlperf_tutor.core import CheckpointMismatch  # noqa: E402

fj = frameworks.get("jax")
ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
STEPS = 10  # the bf16 comparison's length, and where a resumed run restarts
# gpt3 tiny trains on 2048-token sequences: seconds per step on a CPU. A shorter sequence keeps
# its architecture and cuts that 16x. bert, gpt3 and llama train with dropout (bit-exact resume
# must carry the RNG streams); gpt3's tiny preset has none, so it gets some.
OVERRIDES = {"gpt3": {"seq_len": 128, "dropout": 0.1}}
RESUMED = ("toy", "bert", "llama2_70b_lora")  # no dropout; dropout; LoRA dropout + frozen base


def config(name: str):
    return mt.workloads.get(name).config("tiny", **OVERRIDES.get(name, {}))


def batches(name: str, start: int, stop: int) -> list[dict]:
    wl, cfg = mt.workloads.get(name), config(name)
    return [wl.synthetic_batch(cfg, batch_size=BATCH, seed=1 + i) for i in range(start, stop)]


def trainer(name: str, precision: str = "fp32", seed: int = 0):
    wl, cfg = mt.workloads.get(name), config(name)
    model = wl.build("jax", cfg, weights=wl.init_canonical(cfg, seed=0))
    return fj.Trainer(model, *wl.optimizer(cfg), precision=precision, device="cpu", seed=seed)


class Run:
    """A trainer's first ``STEPS`` steps (saved after them), and for the resumed workloads
    ``STEPS`` more: the uninterrupted run a restored one must equal."""

    def __init__(self, name: str, precision: str, directory: Path):
        t = trainer(name, precision)
        self.losses = [t.step(b) for b in batches(name, 0, STEPS)]
        self.weights_at_save = t.weights()
        if name in RESUMED:
            self.checkpoint = directory / f"{name}-{precision}"
            self.checkpoint.mkdir()
            t.save(self.checkpoint)
            self.losses += [t.step(b) for b in batches(name, STEPS, 2 * STEPS)]
        self.losses = [t.loss_value(h) for h in self.losses]
        self.trainer = t


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("trainer_jax")
    cache = {}

    def get(name: str, precision: str) -> Run:
        if (name, precision) not in cache:
            cache[name, precision] = Run(name, precision, directory)
        return cache[name, precision]

    return get


# Restores each checkpoint in a fresh process and takes the next STEPS steps.
RESUME = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import test_trainer_jax as t
out = {{}}
for name, precision, directory in json.loads(sys.argv[1]):
    trainer = t.trainer(name, precision)
    trainer.restore(directory)
    assert trainer.steps == t.STEPS, trainer.steps
    losses = [trainer.step(b) for b in t.batches(name, t.STEPS, 2 * t.STEPS)]
    out[f"{{name}}-{{precision}}/losses"] = np.array([trainer.loss_value(h) for h in losses])
    for key, value in trainer.weights().items():
        out[f"{{name}}-{{precision}}/{{key}}"] = value
np.savez(sys.argv[2], **out)
"""


def test_fp32_trainer_equals_train_step_bit_for_bit(runs):
    # toy: BatchNorm statistics; llama: frozen base weights and LoRA dropout (seed 0 gives the
    # RNG streams the keys the model was built with, so the existing path draws the same masks).
    for name in ("toy", "llama2_70b_lora"):
        wl, cfg = mt.workloads.get(name), config(name)
        model = wl.build("jax", cfg, weights=wl.init_canonical(cfg, seed=0))
        optimizer = fj.make_optimizer(*wl.optimizer(cfg), model)
        expected = [fj.train_step(model, optimizer, b) for b in batches(name, 0, 5)]
        assert runs(name, "fp32").losses[:5] == expected, name


@pytest.mark.parametrize("name", mt.workloads.names())
def test_bf16_loss_is_near_fp32(runs, name):
    fp32, bf16 = runs(name, "fp32"), runs(name, "bf16")
    assert np.isfinite(bf16.losses).all()
    assert bf16.losses[STEPS - 1] == pytest.approx(fp32.losses[STEPS - 1], rel=2e-2)
    # Trained weights come back as float32 masters, different from fp32's but close.
    for key, value in bf16.weights_at_save.items():
        assert value.dtype == fp32.weights_at_save[key].dtype, key


def test_resume_in_a_fresh_process_is_bit_exact(runs, tmp_path):
    jobs = [(n, p, str(runs(n, p).checkpoint)) for n in RESUMED for p in ("fp32", "bf16")]
    out = tmp_path / "resumed.npz"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    code = RESUME.format(tests=str(ROOT / "tests"))
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(jobs), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = np.load(out)
    for name, precision, _ in jobs:
        run = runs(name, precision)
        key = f"{name}-{precision}"
        np.testing.assert_array_equal(resumed[f"{key}/losses"], run.losses[STEPS:], err_msg=key)
        for k, value in run.trainer.weights().items():
            np.testing.assert_array_equal(resumed[f"{key}/{k}"], value, err_msg=f"{key} {k}")


def test_bf16_stores_frozen_weights_in_bf16_and_gives_them_back_as_float32(runs):
    t = runs("llama2_70b_lora", "bf16").trainer
    frozen = [name for name in t.weights() if name not in fj.trainable_names(t.model)]
    assert frozen and all(t._params[k].dtype == jnp.float32 for k in t._params)
    assert {str(v.dtype) for v in t._frozen} == {"bfloat16"}
    canonical = fj.to_canonical(t.model)
    for name in frozen:
        assert canonical[name].dtype.name == "bfloat16"
        assert t.weights()[name].dtype == np.float32
        np.testing.assert_array_equal(t.weights()[name], canonical[name].astype(np.float32))


def test_step_donates_and_returns_an_unsynced_loss():
    t = trainer("toy")
    params, opt_state = t._params, jax.tree.leaves(t._opt.opt_state)
    loss = t.step(batches("toy", 0, 1)[0])
    assert isinstance(loss, jax.Array) and loss.dtype == jnp.float32
    assert all(p.is_deleted() for p in params.values())  # updated in place, no second copy
    assert all(s.is_deleted() for s in opt_state)
    assert t.steps == 1 and t.optimizer_state()["step"] == 1


def test_model_property_writes_the_weights_back(runs):
    t = runs("toy", "fp32").trainer
    canonical = fj.to_canonical(t.model)
    assert canonical.keys() == t.weights().keys()
    for key, value in t.weights().items():
        np.testing.assert_array_equal(canonical[key], value, err_msg=key)
    out = fj.forward(t.model, batches("toy", 0, 1)[0])  # evaluation works on it
    assert np.isfinite(out["loss"])


def test_load_state_continues_another_trainers_run():
    a, b = trainer("toy"), trainer("toy", seed=1)
    for batch in batches("toy", 0, 3):
        a.step(batch)
    b.load_state(a.weights(), a.optimizer_state())
    assert b.steps == 3
    following = batches("toy", 3, 5)  # no dropout: the canonical state is the whole state
    assert [a.loss_value(a.step(x)) for x in following] == [
        b.loss_value(b.step(x)) for x in following
    ]
    b.load_state(a.weights(), None)
    assert b.steps == 0 and b.optimizer_state()["step"] == 0


def test_load_state_is_strict_and_changes_nothing_on_error():
    t = trainer("toy")
    before = t.weights()
    bad = dict(before)
    bad.pop(next(iter(bad)))
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        t.load_state(bad, None)
    state = t.optimizer_state()
    state.pop("step")
    with pytest.raises(CheckpointMismatch, match="optimizer state"):
        t.load_state(before, state)
    for key, value in t.weights().items():
        np.testing.assert_array_equal(value, before[key])


def test_restore_names_the_directory_and_changes_nothing(runs, tmp_path):
    t = trainer("toy")
    before = t.weights()
    with pytest.raises(ValueError, match=f"{tmp_path}.*no JAX trainer checkpoint"):
        t.restore(tmp_path)
    other = runs("bert", "fp32").checkpoint  # another model: names and shapes differ
    with pytest.raises(ValueError, match=f"{other} does not match the model: missing keys"):
        t.restore(other)
    wrong_precision = runs("llama2_70b_lora", "bf16").checkpoint
    llama = trainer("llama2_70b_lora", "fp32")
    with pytest.raises(ValueError, match="wrong shape or dtype.*bfloat16"):
        llama.restore(wrong_precision)
    corrupt = tmp_path / "corrupt"
    (corrupt / fj.CHECKPOINT_FOLDER).mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{corrupt} is not a readable JAX trainer checkpoint"):
        t.restore(corrupt)
    assert t.steps == 0
    for key, value in t.weights().items():
        np.testing.assert_array_equal(value, before[key])


def test_use_device_resolves_names():
    assert fj.use_device("cpu") == "cpu"
    assert fj.use_device("auto") == fj._describe(jax.devices()[0])
    with pytest.raises(ValueError, match="choose one of \\['auto', 'cpu', 'gpu', 'tpu'\\]"):
        fj.use_device("npu")
    with pytest.raises(ValueError, match="precision"):
        trainer_args = mt.workloads.get("toy").optimizer(config("toy"))
        fj.Trainer(None, *trainer_args, precision="fp16")
    fj.use_device("cpu")


def test_use_device_refuses_a_missing_accelerator():
    for name in ("gpu", "tpu"):
        try:
            present = bool(jax.devices(name))
        except RuntimeError:
            present = False
        if present:
            assert fj.use_device(name).startswith(f"{name}:0 (")
        else:
            with pytest.raises(ValueError, match=f"no {name.upper()} visible to jax; use --device"):
                fj.use_device(name)
    fj.use_device("cpu")
