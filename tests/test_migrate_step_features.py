"""torch_to_jax on the steps people write: tied weights, clip_grad_norm_, gradient accumulation,
autocast, a smaller last batch, host-side learning rates.

Every expected number comes from torch running the same recipe (a real loop with
``torch.nn.utils.clip_grad_norm_``, ``(loss / k).backward()``, ``torch.autocast``), held to the
parity bars of :mod:`mlperf_tutor.core.parity`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_models as tm
from torch import nn

from mlperf_tutor.core.parity import OUTPUT_ATOL, STEP_RTOL
from mlperf_tutor.migrate import torch_to_jax

pytestmark = pytest.mark.requires("torch", "jax")


def seeded(make):
    torch.manual_seed(0)
    return make()


def as_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def worst_rel(migrated, model) -> float:
    """The largest ||jax - torch|| / ||torch|| over the model's parameters."""
    worst = 0.0
    for name, p in model.named_parameters():
        want = p.detach().numpy().astype(np.float64)
        got = np.asarray(migrated.params[name], np.float64)
        worst = max(worst, np.linalg.norm(got - want) / np.linalg.norm(want))
    return worst


def torch_step(model, optimizer, loss_fn, batch, *, clip=None, accumulate=1, autocast=False):
    """The torch recipe each option of torch_to_jax stands for; returns the step's loss as the
    mean of its micro-batch losses."""
    optimizer.zero_grad()
    total = 0.0
    micro = zip(*(batch[k].chunk(accumulate) for k in batch), strict=True)
    for parts in micro:
        part = dict(zip(batch, parts, strict=True))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, part)
        (loss / accumulate).backward()
        total += float(loss.detach()) / accumulate
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return total


# --- tied weights ---------------------------------------------------------------------------


class TiedLM(nn.Module):
    """nanoGPT's tie: the token embedding registered first, the LM head's weight assigned to it."""

    def __init__(self, vocab: int = 24, d: int = 16, t: int = 6):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(t, d), ln_f=nn.LayerNorm(d))
        )
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT model.py's weight tying

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, D)
        x = x + self.mlp(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


def next_token_loss(model, batch):
    logits = model(batch["idx"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())


def lm_batch(seed: int, batch: int = 4, vocab: int = 24, t: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, t + 1)).astype(np.int64)
    return {"idx": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_tied_weights_continue_the_torch_run_and_load_back():
    model = seeded(TiedLM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):  # four torch steps first: Adam moments of the shared weight
        torch_step(model, optimizer, next_token_loss, as_torch(lm_batch(step)))
    migrated = torch_to_jax(model, optimizer, next_token_loss, lm_batch(0))

    # One leaf under named_parameters()'s name, one optimizer state.
    assert "transformer.wte.weight" in migrated.params
    assert "lm_head.weight" not in migrated.params
    assert set(migrated.state.opt.slots["exp_avg"]) == set(migrated.params)
    for step in range(4, 10):
        batch = lm_batch(step)
        want = torch_step(model, optimizer, next_token_loss, as_torch(batch))
        got = migrated.run(batch)
        assert abs(got - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step

    # Exported under every name torch knows; loading keeps the tie and the trained values.
    state = migrated.state_dict()
    assert list(state) == list(model.state_dict())
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set(migrated.params_numpy(all_names=True)) == names
    fresh = seeded(TiedLM)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    np.testing.assert_array_equal(
        fresh.lm_head.weight.detach().numpy(), np.asarray(migrated.params["transformer.wte.weight"])
    )


@pytest.mark.requires("hf")
def test_transformers_gpt2_with_tied_embeddings_migrates():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = seeded(lambda: GPT2LMHeadModel(config)).train()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied by default

    def loss_fn(m, batch):
        return m(input_ids=batch["ids"], labels=batch["ids"]).loss

    def batch(seed):
        return {"ids": np.random.default_rng(seed).integers(0, 64, (2, 12)).astype(np.int64)}

    # SGD: the key third of c_attn.bias has an exact zero gradient (softmax ignores q . b_k),
    # and Adam turns the round-off that stands in for it into lr-sized steps that differ
    # between frameworks (issue #20, item 2; verify's float64 referee is the fix).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    migrated = torch_to_jax(model, optimizer, loss_fn, batch(0))
    for step in range(3):
        want = torch_step(model, optimizer, loss_fn, as_torch(batch(step)))
        assert abs(migrated.run(batch(step)) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step
    model.load_state_dict(migrated.state_dict())
    assert model.lm_head.weight is model.transformer.wte.weight


# --- clipping, accumulation, autocast -------------------------------------------------------


def clipping_case():
    model = seeded(tm.MLP)
    # A large rate and a small max norm: every step clips (checked below).
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def test_clip_grad_norm_matches_torch_clip_grad_norm_():
    model, optimizer = clipping_case()
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0), clip_grad_norm=0.5)
    for step in range(6):
        batch = tm.vector_batch(step)
        optimizer.zero_grad()
        tm.classify(model, as_torch(batch)).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert norm > 0.5  # the clip is active
        want = torch_step(model, optimizer, tm.classify, as_torch(batch), clip=0.5)
        assert abs(migrated.run(batch) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step


def test_migrating_without_the_recipes_clip_gives_another_run():
    model, optimizer = clipping_case()
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0))  # no clip passed
    for step in range(6):
        batch = tm.vector_batch(step)
        torch_step(model, optimizer, tm.classify, as_torch(batch), clip=0.5)
        migrated.run(batch)
    assert worst_rel(migrated, model) > 100 * STEP_RTOL


def test_accumulate_matches_k_backward_passes_of_loss_over_k():
    model = seeded(tm.CNN).train()
    model.dropout.p = 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    migrated = torch_to_jax(
        model, optimizer, tm.classify, tm.image_batch(0, batch=12), accumulate=3
    )
    for step in range(4):
        batch = tm.image_batch(step, batch=12)
        want = torch_step(model, optimizer, tm.classify, as_torch(batch), accumulate=3)
        assert abs(migrated.run(batch) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step
    # BatchNorm's running statistics advanced once per micro-batch, as in torch.
    assert int(migrated.state.buffers["bn.num_batches_tracked"]) == 12
    for name in ("bn.running_mean", "bn.running_var"):
        want = model.state_dict()[name].numpy()
        assert np.abs(np.asarray(migrated.state.buffers[name]) - want).max() <= OUTPUT_ATOL, name


def test_accumulate_refuses_a_batch_it_cannot_split():
    model = seeded(tm.MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0), accumulate=2)
    with pytest.raises(ValueError, match="accumulate=2 splits every batch tensor"):
        migrated.run(tm.vector_batch(1, batch=5))


def test_autocast_bf16_matches_torch_autocast():
    model = seeded(tm.MLP)
    reference = seeded(tm.MLP)  # the same recipe without autocast
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0), autocast="bf16")
    dtypes = {
        n.meta["val"].dtype
        for n in migrated.translation.train_program.graph.nodes
        if n.target is torch.ops.aten.addmm.default
    }
    assert dtypes == {torch.bfloat16}  # the linear layers compute in bf16
    for step in range(6):
        batch = tm.vector_batch(step)
        want = torch_step(model, optimizer, tm.classify, as_torch(batch), autocast=True)
        torch_step(reference, reference_optimizer, tm.classify, as_torch(batch))
        assert abs(migrated.run(batch) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step
    # float32 masters: the parameters stay float32, and the run is not the float32 run.
    assert all(v.dtype == np.float32 for v in migrated.params.values())
    assert worst_rel(migrated, reference) > 10 * STEP_RTOL


def test_step_options_are_checked():
    model = seeded(tm.MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, message in [
        ({"autocast": "fp16"}, "autocast='fp16' is not supported"),
        ({"accumulate": 0}, "accumulate must be a positive int"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be a positive max norm"),
    ]:
        with pytest.raises(ValueError, match=message):
            torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0), **kwargs)


# --- shapes ---------------------------------------------------------------------------------


def test_a_smaller_last_batch_matches_torch():
    model = seeded(tm.CNN).train()
    model.dropout.p = 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.image_batch(0, batch=8))
    assert migrated.translation.batch_range is not None  # exported with a dynamic batch size
    for step, size in enumerate([8, 8, 5]):
        batch = tm.image_batch(step, batch=size)
        want = torch_step(model, optimizer, tm.classify, as_torch(batch))
        assert abs(migrated.run(batch) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step


class BatchSizeBranch(nn.Module):
    """Code that specialises on the batch size, which a dynamic batch dimension cannot export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.fc(x)
        return y * 2.0 if x.shape[0] > 6 else y


def test_a_model_that_specialises_on_the_batch_size_is_exported_again_per_size():
    model = seeded(BatchSizeBranch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0, batch=8))
    assert migrated.translation.batch_range is None  # fixed shapes: the export fell back
    for step, size in enumerate([8, 4, 8]):
        batch = tm.vector_batch(step, batch=size)
        want = torch_step(model, optimizer, tm.classify, as_torch(batch))
        assert abs(migrated.run(batch) - want) <= OUTPUT_ATOL, step
        assert worst_rel(migrated, model) <= STEP_RTOL, step


# --- host-side learning rates ---------------------------------------------------------------


class RecordingRates:
    """A stand-in for optim.HostRates that records how the step calls it."""

    def __init__(self, needs_loss: bool):
        self.needs_loss = needs_loss
        self.calls = []

    def before_step(self, opt_state):
        self.calls.append(("before", int(opt_state.count)))
        return opt_state

    def after_step(self, loss):
        self.calls.append(("after", loss))


@pytest.mark.parametrize("needs_loss", [False, True])
def test_step_calls_host_rates_around_the_jitted_step(monkeypatch, needs_loss):
    from mlperf_tutor.migrate import optim

    rates = RecordingRates(needs_loss)
    monkeypatch.setattr(optim, "host_rates", lambda opt, sched: rates, raising=False)
    model = seeded(tm.MLP)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    migrated = torch_to_jax(model, optimizer, tm.classify, tm.vector_batch(0))
    assert migrated.host_rates is rates
    losses = [migrated.run(tm.vector_batch(s)) for s in range(2)]
    after = losses if needs_loss else [None, None]  # the loss is synced only when needed
    assert rates.calls == [("before", 0), ("after", after[0]), ("before", 1), ("after", after[1])]
