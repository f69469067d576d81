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


def _flat(tree) -> dict:
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory):
    """The resumed runs: a fresh process restores each checkpoint and takes the next ``STEPS``
    steps. Started as soon as the checkpoints exist, it compiles on the second core while this
    process runs the other tests; :func:`test_resume_in_a_fresh_process_is_bit_exact` waits."""
    jobs = [(n, p, str(runs(n, p).checkpoint)) for n in RESUMED for p in fj.PRECISIONS]
    directory = tmp_path_factory.mktemp("resumed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = RESUME.format(tests=str(ROOT / "tests"))
    out, log = directory / "resumed.npz", directory / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(jobs), str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    yield process, jobs, out, log
    if process.poll() is None:
        process.kill()
        process.wait()


def test_checkpoint_holds_the_whole_training_state(resumed, runs):
    import orbax.checkpoint as ocp

    checkpoint = runs("llama2_70b_lora", "bf16").checkpoint / fj.CHECKPOINT_FOLDER
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(checkpoint).item_metadata.tree
    names = {name: (tuple(m.shape), np.dtype(m.dtype).name) for name, m in _flat(tree).items()}
    t = runs("llama2_70b_lora", "bf16").trainer
    assert {n.split(".")[0] for n in names} == {"params", "frozen", "rest", "opt_state", "steps"}
    for k in fj.trainable_names(t.model):  # float32 masters
        assert names[f"params.{k}"][1] == "float32", k
    frozen = [v for n, v in names.items() if n.startswith("frozen.")]
    assert frozen and {dtype for _, dtype in frozen} == {"bfloat16"}
    # Every dropout stream: its key as key_data (uint32) and its counter.
    keys = [v for n, v in names.items() if n.startswith("rest.") and n.endswith(".rngs.key")]
    counts = [n for n in names if n.startswith("rest.") and n.endswith(".rngs.count")]
    assert keys and len(keys) == len(counts) and {dtype for _, dtype in keys} == {"uint32"}
    assert names["steps"] == ((), "int64")


def test_fp32_trainer_equals_train_step_bit_for_bit(runs):
    # toy: BatchNorm statistics; llama: frozen base weights and LoRA dropout (seed 0 gives the
    # RNG streams the keys the model was built with, so the existing path draws the same masks).
    for name in ("toy", "llama2_70b_lora"):
        wl, cfg = mt.workloads.get(name), config(name)
        model = wl.build("jax", cfg, weights=wl.init_canonical(cfg, seed=0))
        optimizer = fj.make_optimizer(*wl.optimizer(cfg), model)
        expected = [fj.train_step(model, optimizer, b) for b in batches(name, 0, 5)]
        assert runs(name, "fp32").losses[:5] == expected, name


# Every workload's bf16 run against float32 is test_parity_bf16's; here the ones whose bf16
# handling is special: BatchNorm statistics (toy), the frozen bf16 base (llama), the bags (dlrm).
@pytest.mark.parametrize("name", ["toy", "llama2_70b_lora", "dlrm_dcnv2"])
def test_bf16_loss_is_near_fp32(runs, name):
    fp32, bf16 = runs(name, "fp32"), runs(name, "bf16")
    assert np.isfinite(bf16.losses).all()
    assert bf16.losses[STEPS - 1] == pytest.approx(fp32.losses[STEPS - 1], rel=2e-2)
    # Trained weights come back as float32 masters, different from fp32's but close.
    for key, value in bf16.weights_at_save.items():
        assert value.dtype == fp32.weights_at_save[key].dtype, key


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


def test_model_property_writes_the_weights_back():
    t = trainer("toy")
    for batch in batches("toy", 0, 2):
        t.step(batch)
    canonical = fj.to_canonical(t.model)
    assert canonical.keys() == t.weights().keys()
    for key, value in t.weights().items():
        np.testing.assert_array_equal(canonical[key], value, err_msg=key)
    assert np.isfinite(fj.forward(t.model, batches("toy", 0, 1)[0])["loss"])  # evaluation
    t.step(batches("toy", 2, 3)[0])  # and training goes on after it
    assert t.steps == 3 and np.isfinite(fj.forward(t.model, batches("toy", 0, 1)[0])["loss"])


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


@pytest.fixture
def default_device():
    """Puts JAX's default device back after a test that calls use_device."""
    before = jax.config.jax_default_device
    yield
    jax.config.update("jax_default_device", before)


def test_use_device_resolves_names(default_device):
    assert fj.use_device("cpu") == "cpu"
    assert jax.config.jax_default_device == jax.devices("cpu")[0]
    assert fj.use_device("auto") == fj._describe(jax.devices()[0])
    with pytest.raises(ValueError, match="choose one of \\['auto', 'cpu', 'gpu', 'tpu'\\]"):
        fj.use_device("npu")
    spec, schedule = mt.workloads.get("toy").optimizer(config("toy"))
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        fj.Trainer(trainer("toy").model, spec, schedule, precision="fp16")


def test_use_device_refuses_a_missing_accelerator(default_device):
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


def test_resume_in_a_fresh_process_is_bit_exact(resumed, runs):
    process, jobs, out, log = resumed
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    restored = np.load(out)
    for name, precision, _ in jobs:
        run = runs(name, precision)
        key = f"{name}-{precision}"
        np.testing.assert_array_equal(restored[f"{key}/losses"], run.losses[STEPS:], err_msg=key)
        for k, value in run.trainer.weights().items():
            np.testing.assert_array_equal(restored[f"{key}/{k}"], value, err_msg=f"{key} {k}")
