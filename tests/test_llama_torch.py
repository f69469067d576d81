"""Llama 2 with LoRA in PyTorch, and the shared layers' RMSNorm, SwiGLU, fused qkv and LoRA.

Checked against the float64 numpy reference (``numpy_reference.llama``), which merges the LoRA
update into the weights (``W + scaling B A``) instead of adding it to the output as the layers do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy_reference as ref
import pytest
import torch
from checks import as_f64, lively_lora, padded_lora_batch

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.parity import OUTPUT_ATOL
from mlperf_tutor.layers.spec import AttentionSpec, Lora, MlpSpec
from mlperf_tutor.layers.torch.attention import Attention
from mlperf_tutor.layers.torch.lora import LoRALinear
from mlperf_tutor.layers.torch.mlp import MLP
from mlperf_tutor.layers.torch.norms import RMSNorm
from mlperf_tutor.workloads.llama import torch_model

pytestmark = pytest.mark.requires("torch")

ADAPTER = frameworks.get("torch")
WL = workloads.get("llama2_70b_lora")
CFG = WL.deterministic(WL.config("tiny", seq_len=9, num_layers=2))
F64_ATOL = 1e-10


def test_rms_norm_matches_numpy_and_keeps_bf16():
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    norm = RMSNorm(8, 1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))
        got = norm(torch.from_numpy(x)).numpy()
    want = ref.rms_norm({"n.weight": np.linspace(0.5, 1.5, 8)}, "n", x, 1e-5)
    assert np.abs(got - want).max() <= F64_ATOL
    assert RMSNorm(8, 1e-5).bfloat16()(torch.ones(1, 8, dtype=torch.bfloat16)).dtype == (
        torch.bfloat16
    )


def test_swiglu_mlp_matches_numpy():
    mlp = MLP(MlpSpec(6, 10, activation="silu", bias=False, gated=True)).double()
    w = {k: v.numpy() for k, v in mlp.state_dict().items()}
    assert sorted(w) == ["fc_gate.weight", "fc_in.weight", "fc_out.weight"]
    x = np.random.default_rng(1).standard_normal((3, 6))
    with torch.no_grad():
        got = mlp(torch.from_numpy(x)).numpy()
    gate = ref.ACTIVATIONS["silu"](ref.linear(w, "fc_gate", x))
    want = ref.linear(w, "fc_out", gate * ref.linear(w, "fc_in", x))
    assert np.abs(got - want).max() <= F64_ATOL


def test_lora_linear_adds_the_scaled_low_rank_update():
    layer = LoRALinear(5, 7, bias=True, lora=Lora(rank=2, alpha=6.0)).double()
    torch.nn.init.normal_(layer.lora_b.weight)
    w = {k: v.numpy() for k, v in layer.state_dict().items()}
    assert sorted(w) == ["bias", "lora_a.weight", "lora_b.weight", "weight"]
    x = np.random.default_rng(2).standard_normal((4, 5))
    with torch.no_grad():
        got = layer(torch.from_numpy(x)).numpy()
    merged = ref.merge_lora({f"p.{k}": v for k, v in w.items()}, "p", 3.0)
    assert np.abs(got - (x @ merged.T + w["bias"])).max() <= F64_ATOL


def test_fused_qkv_attention_equals_three_projections():
    dim, n, k = 16, 4, 2
    spec = AttentionSpec(
        dim, n, num_kv_heads=k, bias=False, causal=True, rotary_dim=4, rotary_layout="half"
    )
    fused = Attention(dataclasses.replace(spec, fused_qkv=True)).double()
    split = Attention(spec).double()
    qkv = fused.qkv_proj.weight.detach()
    h = dim // n
    with torch.no_grad():
        split.q_proj.weight.copy_(qkv[: n * h])
        split.k_proj.weight.copy_(qkv[n * h : (n + k) * h])
        split.v_proj.weight.copy_(qkv[(n + k) * h :])
        split.o_proj.weight.copy_(fused.o_proj.weight)
        x = torch.randn(2, 5, dim, dtype=torch.float64)
        assert torch.allclose(fused(x), split(x), atol=F64_ATOL, rtol=0)


def test_decoder_matches_numpy_in_float64_with_lora_and_padding():
    tree = lively_lora(WL, CFG)
    model = WL.build("torch", CFG, weights=tree).double()
    batch = padded_lora_batch(WL, CFG)
    out = ADAPTER.forward(model, batch)
    want = ref.llama(as_f64(tree), CFG, batch)
    assert np.abs(out["logits"] - want["logits"]).max() <= F64_ATOL
    assert abs(float(out["loss"]) - want["loss"]) <= F64_ATOL


def test_float32_forward_is_within_the_parity_bar():
    tree = lively_lora(WL, CFG)
    batch = padded_lora_batch(WL, CFG)
    out = WL.forward("torch", WL.build("torch", CFG, weights=tree), batch)
    want = ref.llama(as_f64(tree), CFG, batch)
    assert np.abs(out["logits"] - want["logits"]).max() <= OUTPUT_ATOL


def test_fused_attention_path_matches_the_explicit_one():
    tree = lively_lora(WL, CFG)
    batch = padded_lora_batch(WL, CFG)
    explicit = WL.forward("torch", WL.build("torch", CFG, weights=tree), batch)
    model = torch_model.build(CFG, fused=True)
    ADAPTER.load_canonical(model, tree)
    fused = ADAPTER.forward(model, batch)
    assert np.abs(fused["logits"] - explicit["logits"]).max() <= OUTPUT_ATOL


def test_lora_dropout_is_active_in_training_only():
    cfg = WL.config("tiny", seq_len=9, lora_dropout=0.5)
    model = WL.build("torch", cfg, weights=lively_lora(WL, cfg))
    batch = WL.synthetic_batch(cfg, batch_size=2, seed=0)
    torch.manual_seed(0)
    a, _ = ADAPTER.loss_and_grads(model, batch, train=True)
    b, _ = ADAPTER.loss_and_grads(model, batch, train=True)
    assert a != b  # two dropout draws
    assert ADAPTER.forward(model, batch)["loss"] == ADAPTER.forward(model, batch)["loss"]
