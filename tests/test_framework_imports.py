"""Three frameworks and triton in one process, in every import order.

CUDA builds of PyTorch bring triton, and TensorFlow and triton both carry LLVM: whichever loads
second aborts the process ("LLVM ERROR: inconsistency in registered CommandLine options").
``torch._dynamo`` loads triton when the first torch optimizer is built, so a notebook that used
TensorFlow before a torch optimizer died. ``mlperf_tutor.frameworks.runtime`` loads triton ahead
of TensorFlow. Each order runs in a fresh interpreter (a crash is a signal exit there, not a
failed assertion here), and ends with the torch work that used to crash.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.requires("torch", "jax", "tf"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

TORCH_WORK = """
import torch
model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
before = model[1].weight.detach().clone()
loss = model(torch.tensor([1, 2, 3])).square().mean()
loss.backward()
optimizer.step()
assert not torch.equal(before, model[1].weight), "the torch step changed nothing"
print("TORCH_STEP_OK", "triton" in sys.modules and sys.modules["triton"] is not None)
"""


ORDERS = list(itertools.permutations(("torch", "jax", "tf")))

ADAPTERS_IN_ORDER = """
import sys
from mlperf_tutor import frameworks
for name in {order!r}:
    adapter = frameworks.get(name)
    adapter.to_numpy(adapter.from_numpy(__import__("numpy").ones(2, "float32")))
import tensorflow as tf, jax.numpy as jnp
assert float(tf.reduce_sum(tf.ones(3))) == 3.0 and float(jnp.ones(3).sum()) == 3.0
"""

PACKAGE_THEN_PLAIN_TENSORFLOW = """
import sys
import mlperf_tutor
import tensorflow as tf
"""

TENSORFLOW_BEFORE_THE_PACKAGE = """
import sys
import tensorflow as tf
from mlperf_tutor import frameworks
frameworks.get("torch")
"""


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every scenario in its own interpreter, all started at once (each takes seconds to import
    three frameworks); key -> (exit status, stdout, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("MLPERF_TUTOR_FRAMEWORKS", None)
    scripts = {order: ADAPTERS_IN_ORDER.format(order=list(order)) for order in ORDERS}
    scripts["plain"] = PACKAGE_THEN_PLAIN_TENSORFLOW
    scripts["tf first"] = TENSORFLOW_BEFORE_THE_PACKAGE
    procs = {
        key: subprocess.Popen(
            [sys.executable, "-c", code + TORCH_WORK],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for key, code in scripts.items()
    }
    results = {}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[key] = (proc.returncode, out, err)
    return results


def check_ran(result: tuple, triton_loaded: bool) -> None:
    code, out, err = result
    assert code == 0, f"exit status {code} (negative: killed by that signal)\n{err[-3000:]}"
    assert f"TORCH_STEP_OK {triton_loaded}" in out, out + err[-2000:]


def test_triton_is_installed_so_the_combination_is_exercised():
    # requirements.txt pins triton for this reason; without it the tests below prove nothing.
    # (PathFinder: this process hides triton in sys.modules, see conftest.py)
    found = importlib.machinery.PathFinder.find_spec("triton")
    assert found is not None, "pip install -r requirements.txt"


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_three_adapters_in_any_order_then_a_torch_step(runs, order):
    # triton is loaded (not kept out): the package chose the order.
    check_ran(runs[order], triton_loaded=True)


def test_plain_import_tensorflow_after_the_package_keeps_triton(runs):
    check_ran(runs["plain"], triton_loaded=True)


def test_tensorflow_before_the_package_runs_torch_without_triton(runs):
    check_ran(runs["tf first"], triton_loaded=False)
    assert "torch runs without triton" in runs["tf first"][2]
