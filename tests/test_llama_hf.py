"""Llama 2 interop: transformers' LlamaForCausalLM (base weights) and PEFT (LoRA adapters).

Models come from small configs that transformers and PEFT build locally (nothing downloaded):
a grouped-query Llama with 4 query heads sharing 2 key/value heads.
"""

from __future__ import annotations

import json

import numpy as np
import peft as peft_lib
import pytest
import torch
import transformers
from checks import assert_bit_identical, lively_lora

from mlperf_tutor import convert, frameworks, workloads
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.parity import OUTPUT_ATOL
from mlperf_tutor.layers.spec import is_adapter
from mlperf_tutor.workloads.llama import hf, peft

pytestmark = pytest.mark.requires("torch", "jax", "tf", "hf")

WL = workloads.get("llama2_70b_lora")
HF_CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
IDS = np.random.default_rng(0).integers(0, 96, (2, 11)).astype(np.int32)


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random LlamaForCausalLM, saved, and its logits."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    directory = tmp_path_factory.mktemp("llama") / "hf"
    model.save_pretrained(directory)
    return directory, hf_logits(model)


def test_config_from_hf_reads_the_architecture(hf_dir):
    cfg = WL.config_from_hf(hf_dir[0], preset="tiny")
    assert (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.num_kv_heads) == (2, 32, 4, 2)
    assert (cfg.ffn, cfg.vocab_size, cfg.norm_eps, cfg.rotary_base) == (48, 96, 1e-5, 10000.0)
    assert cfg.lora_rank == WL.config("tiny").lora_rank  # LoRA comes from the preset
    with pytest.raises(ValueError, match="cannot be overridden"):
        WL.config_from_hf(hf_dir[0], preset="tiny", hidden=64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "scales rotary"),
        ({"head_dim": 4}, "head_dim=4"),
    ],
)
def test_config_from_hf_refuses_what_the_decoder_lacks(hf_dir, change, message):
    data = json.loads((hf_dir[0] / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        WL.config_from_hf(data, preset="tiny")


@pytest.mark.parametrize("framework", frameworks.NAMES)
def test_logits_match_transformers(hf_dir, framework):
    if not frameworks.available(framework):
        pytest.skip(f"{framework} is not installed; install the [{framework}] extra")
    directory, want = hf_dir
    cfg = WL.config_from_hf(directory, preset="tiny", lora_rank=0, seq_len=11)
    model = WL.build(framework, cfg, weights=directory)
    got = WL.forward(framework, model, {"input_ids": IDS})["logits"]
    assert np.abs(got - want).max() <= OUTPUT_ATOL


def test_base_checkpoint_gets_fresh_no_op_adapters(hf_dir):
    directory, want = hf_dir
    cfg = WL.config_from_hf(directory, preset="tiny", seq_len=11)  # with LoRA
    model = WL.build("torch", cfg, weights=directory)
    tree = WL.export("torch", model)
    assert any(is_adapter(k) for k in tree)
    got = WL.forward("torch", model, {"input_ids": IDS})["logits"]
    assert np.abs(got - want).max() <= OUTPUT_ATOL  # lora_b starts at zero


def test_save_pretrained_loads_in_transformers_and_round_trips(tmp_path):
    cfg = WL.config("tiny", lora_rank=0, vocab_size=96, hidden=32, ffn=48, num_heads=4)
    tree = WL.init_canonical(cfg, seed=3)
    hf.save_pretrained(tree, cfg, tmp_path / "ours")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ours = WL.forward("torch", WL.build("torch", cfg, weights=tree), {"input_ids": IDS})
    assert np.abs(hf_logits(model) - ours["logits"]).max() <= OUTPUT_ATOL
    found_cfg, back = hf.load_pretrained(tmp_path / "ours")
    assert all(getattr(found_cfg, f) == getattr(cfg, f) for f in hf.ARCHITECTURE)
    assert_bit_identical(back, tree, ordered=True)


def test_the_reference_fused_qkv_layout_is_read(tmp_path, hf_dir):
    cfg, tree = hf.load_pretrained(hf_dir[0])
    fused = {hf._hf_name(k): v for k, v in tree.items()}  # self_attn.qkv_proj kept
    directory = tmp_path / "fused"
    directory.mkdir()
    config = json.loads((hf_dir[0] / "config.json").read_text()) | {"model_type": "custom_llama"}
    (directory / "config.json").write_text(json.dumps(config))
    convert.save(fused, directory / "model.safetensors")
    _, back = hf.load_pretrained(directory)
    assert_bit_identical(back, tree, ordered=True)


def test_bad_checkpoint_names_every_offending_key(tmp_path, hf_dir):
    _, tree = hf.load_pretrained(hf_dir[0])
    state = dict(hf.to_hf(tree, WL.config_from_hf(hf_dir[0], preset="tiny")))
    state.pop("model.layers.1.self_attn.k_proj.weight")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:5]
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    convert.save(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        hf.load_pretrained(directory)
    assert "model.layers.1.self_attn.k_proj.weight" in str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value)


# --- PEFT ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    cfg = WL.deterministic(
        WL.config("tiny", vocab_size=96, hidden=32, ffn=48, num_heads=4, lora_rank=4)
    )
    tree = lively_lora(WL, cfg, std=0.1)
    root = tmp_path_factory.mktemp("peft")
    hf.save_pretrained({k: v for k, v in tree.items() if not is_adapter(k)}, cfg, root / "base")
    ours = WL.forward("torch", WL.build("torch", cfg, weights=tree), {"input_ids": IDS})
    return cfg, tree, root, ours["logits"]


def test_peft_runs_our_adapters_on_transformers_llama(lora_setup):
    cfg, tree, root, ours = lora_setup
    peft.save_adapter(tree, cfg, root / "adapter", layout="hf")
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    model = peft_lib.PeftModel.from_pretrained(base, root / "adapter").eval()
    got = hf_logits(model)
    assert np.abs(got - ours).max() <= OUTPUT_ATOL
    plain = hf_logits(transformers.LlamaForCausalLM.from_pretrained(root / "base").eval())
    assert np.abs(plain - ours).max() > 1e-3  # the adapters do change the output


@pytest.mark.parametrize("layout", peft.LAYOUTS)
def test_adapter_round_trip_is_bit_identical(lora_setup, tmp_path, layout):
    cfg, tree, _, _ = lora_setup
    peft.save_adapter(tree, cfg, tmp_path / layout, layout=layout)
    config = json.loads((tmp_path / layout / peft.CONFIG).read_text())
    assert config["r"] == cfg.lora_rank and config["target_modules"] == sorted(peft.LAYOUTS[layout])
    back = peft.load_adapter(tmp_path / layout, cfg)
    assert_bit_identical(back, {k: v for k, v in tree.items() if is_adapter(k)})


def test_adapter_trained_by_peft_is_read_when_it_is_one_fused_adapter(lora_setup, tmp_path):
    cfg, tree, root, _ = lora_setup
    base = transformers.LlamaForCausalLM.from_pretrained(root / "base")
    config = peft_lib.LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    model = peft_lib.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
            if "lora_A" in name and ".q_proj." not in name and ".o_proj." not in name:
                # k and v share q's A: one adapter on a fused projection.
                q_name = name.replace(".k_proj.", ".q_proj.").replace(".v_proj.", ".q_proj.")
                p.copy_(dict(model.named_parameters())[q_name])
    model.save_pretrained(tmp_path / "peft")
    want = hf_logits(model.eval())
    adapters = peft.load_adapter(tmp_path / "peft", cfg)
    base_tree = {k: v for k, v in tree.items() if not is_adapter(k)}
    ours = WL.build("torch", cfg, weights=base_tree | adapters)
    got = WL.forward("torch", ours, {"input_ids": IDS})["logits"]
    assert np.abs(got - want).max() <= OUTPUT_ATOL

    with torch.no_grad():  # now k gets its own A: no fused equivalent
        dict(model.named_parameters())[
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"
        ].add_(1.0)
    model.save_pretrained(tmp_path / "separate")
    with pytest.raises(CheckpointError, match="different lora_A matrices"):
        peft.load_adapter(tmp_path / "separate", cfg)


def test_adapter_config_mismatch_is_refused(lora_setup, tmp_path):
    cfg, tree, _, _ = lora_setup
    peft.save_adapter(tree, cfg, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"has r=4 but the config needs 8"):
        peft.load_adapter(tmp_path / "a", cfg.replace(lora_rank=8))
    with pytest.raises(CheckpointError, match="has no adapter_config.json"):
        peft.load_adapter(tmp_path / "missing", cfg)
    with pytest.raises(ValueError, match="no adapters to save"):
        peft.save_adapter(tree, cfg.replace(lora_rank=0), tmp_path / "b")
