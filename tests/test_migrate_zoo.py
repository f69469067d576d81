"""The zoo of third-party models (tests/zoo/): each recipe trains in torch, and each migrates.

Every entry runs ``verify`` for 10 steps with its own recipe's optimizer, scheduler, loss and
step options (clipping, accumulation, autocast) and must pass, or, when it is marked as an
expected refusal, must be refused with a message that names the op, module or feature. The
recipes themselves are checked in torch first: ten steps on one batch lower the loss, and the
models said to tie weights hold one ``Parameter`` under every name.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import types

import pytest
import torch
import zoo
from zoo.recipes import STEPS

pytestmark = pytest.mark.requires("torch", "jax", "hf")

ZOO = zoo.zoo()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread for this module: these models are too small to share out, and on a
    shared CPU two threads ran the zoo several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_zoo_holds_twenty_models_or_more():
    assert len(ZOO) >= 20, sorted(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_recipe_lowers_the_torch_loss(name):
    entry = ZOO[name]
    model, optimizer, scheduler = entry.build()
    micro_batches = entry.micro_batches(0)

    def loss_now():
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws before and after
        with torch.no_grad():
            losses = [float(entry.loss_fn(model, zoo.as_torch(b))) for b in micro_batches]
        return sum(losses) / len(losses)

    before = loss_now()
    for _ in range(STEPS):
        zoo.torch_step(entry, model, optimizer, scheduler, micro_batches)
    after = loss_now()
    assert after < before, (before, after)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_declares_exactly_the_tied_parameters(name):
    model, _, _ = ZOO[name].build()
    names_of = collections.defaultdict(list)
    for param_name, p in model.named_parameters(remove_duplicate=False):
        names_of[id(p)].append(param_name)
    shared = sorted(tuple(names) for names in names_of.values() if len(names) > 1)
    assert shared == sorted(ZOO[name].tied)


def test_zoo_covers_the_tied_models_of_issue_20():
    # the six models whose tied embeddings issue #20 found refused
    tied = {n for n, e in ZOO.items() if e.tied}
    assert {"gpt2", "nanogpt", "qwen2", "t5", "distilbert-mlm", "whisper"} <= tied


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_passes_verify(name):
    entry = ZOO[name]
    result = zoo.run(entry)
    if entry.refusal is None:
        assert result.status == "pass", f"{result.error}: {result.message}"
        assert len(result.report.rows) == STEPS
    else:
        assert result.status != "pass", "an expected refusal passed: unmark it"
        full = str(result.exception) if result.exception is not None else result.message
        assert re.search(entry.refusal, full), full


def recording_verify(calls):
    """A stand-in for verify with the step options: records what it is given."""

    def verify(
        model,
        optimizer,
        loss_fn,
        batches,
        scheduler=None,
        *,
        quiet=False,
        raise_on_failure=True,
        clip_grad_norm=None,
        accumulate=1,
        autocast=None,
    ):
        calls.append(
            dict(
                batches=len(batches),
                clip_grad_norm=clip_grad_norm,
                accumulate=accumulate,
                autocast=autocast,
                scheduler=scheduler,
            )
        )
        return types.SimpleNamespace(ok=True, rows=[{}] * len(batches))  # one batch per step

    return verify


def test_runner_refuses_a_recipe_option_that_verify_lacks():
    calls = []

    def verify_without_options(
        model, optimizer, loss_fn, batches, scheduler=None, *, quiet=False, raise_on_failure=True
    ):
        calls.append(batches)

    result = zoo.run(ZOO["nanogpt"], verify=verify_without_options)
    assert result.status == "refused"
    assert "clip_grad_norm" in result.message and "1.0" in result.message
    assert not calls  # the step without clipping never ran


def test_runner_hands_every_recipe_option_to_verify():
    calls = []
    # clipping and accumulation as mistral's recipe has them, and autocast (which the zoo's
    # mistral runs without: see its entry)
    entry = dataclasses.replace(ZOO["mistral"], autocast="bf16")
    result = zoo.run(entry, steps=3, verify=recording_verify(calls))
    assert result.status == "pass"
    (call,) = calls
    assert call["clip_grad_norm"] == entry.clip_grad_norm == 1.0
    assert call["accumulate"] == entry.accumulate == 2 and call["batches"] == 3
    assert call["autocast"] == "bf16"
    assert call["scheduler"] is not None
