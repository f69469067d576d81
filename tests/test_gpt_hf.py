"""GPT-3 / GPT-J <-> Hugging Face transformers (GPT2LMHeadModel, GPTJForCausalLM): names,
config, save_pretrained directories, convert and CLI, outputs of every framework.

Every transformers model here is built locally from a config (HF_HUB_OFFLINE: no downloads).
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from checks import assert_bit_identical, listing, numpy_state  # noqa: E402

pytestmark = pytest.mark.requires("torch", "jax", "tf", "hf")

import numpy_reference as ref  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import cli, convert, frameworks  # noqa: E402
from mlperf_tutor.convert import hf_io  # noqa: E402
from mlperf_tutor.core.checkpoint import CheckpointError  # noqa: E402
from mlperf_tutor.workloads.gpt.hf import GPT2_NAMING, GPTJ_NAMING  # noqa: E402

GPT3, GPTJ = mt.workloads.get("gpt3"), mt.workloads.get("gptj")
# Rename tables and state-dict mapping, beyond what the workloads' ``hf`` interop exposes.
NAMING = {"gpt3": GPT2_NAMING, "gptj": GPTJ_NAMING}
# The tiny presets' architectures, as transformers users write them (bos/eos None: the
# default 50256 is outside a 96-token vocabulary).
SMALL = dict(
    vocab_size=96,
    n_embd=32,
    n_layer=2,
    n_inner=128,
    bos_token_id=None,
    eos_token_id=None,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
CASES = {
    "gpt3": (
        GPT3,
        transformers.GPT2LMHeadModel,
        lambda **kw: transformers.GPT2Config(
            **SMALL,
            n_head=2,
            n_positions=2048,
            activation_function="gelu",
            initializer_range=0.006,
            **kw,
        ),
    ),
    "gptj": (
        GPTJ,
        transformers.GPTJForCausalLM,
        lambda **kw: transformers.GPTJConfig(**SMALL, n_head=4, n_positions=64, rotary_dim=4, **kw),
    ),
}


def random_tree(wl, cfg, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(dtype) for k, (s, _) in wl.canonical_specs(cfg).items()
    }


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(workload, HF model with every weight random, its save_pretrained directory)."""
    wl, model_class, make_config = CASES[request.param]
    torch.manual_seed(0)
    model = model_class(make_config(attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + (1.0 if ".ln_" in name and "weight" in name else 0))
    path = tmp_path_factory.mktemp("hf") / f"{request.param}-tiny"
    model.save_pretrained(path)
    return wl, model, path


def hf_outputs(model, input_ids):
    """HF logits (B, T, V) and its loss, which shifts the labels itself."""
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids).long(), labels=torch.from_numpy(input_ids).long())
    return out.logits.numpy(), float(out.loss)


# --- reading ----------------------------------------------------------------------------------
def test_load_pretrained_is_bit_identical_to_state_dict(case):
    wl, model, path = case
    cfg, tree = wl.hf.load_pretrained(path)
    assert list(tree) == list(wl.canonical_specs(cfg))  # canonical order, not the file's
    assert_bit_identical(tree, NAMING[wl.name].from_hf(numpy_state(model), cfg.tie_embeddings))
    assert cfg == wl.config_from_hf(model.config)
    assert (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.ffn, cfg.padded_vocab_size) == (
        2,
        32,
        wl.config("tiny").num_heads,
        128,
        96,
    )


def test_logits_and_loss_match_numpy_reference(case):
    wl, model, path = case
    cfg, tree = wl.hf.load_pretrained(path)
    ids = np.random.default_rng(0).integers(0, 96, (2, 9))
    logits, loss = hf_outputs(model, ids)
    w = {k: np.asarray(v, np.float64) for k, v in tree.items()}
    assert np.abs(ref.gpt(w, cfg, ids)["logits"] - logits).max() <= 1e-5
    got = ref.gpt(w, cfg, ids[:, :-1], labels=ids[:, 1:])["loss"]
    assert abs(got - loss) <= 1e-5


@pytest.mark.parametrize("fw", frameworks.NAMES)
def test_every_framework_matches_transformers(case, fw):
    wl, model, path = case
    cfg = wl.deterministic(wl.config_from_hf(path, preset="tiny"))
    ids = np.random.default_rng(1).integers(0, 96, (3, 8)).astype(np.int32)
    logits, loss = hf_outputs(model, ids)
    labels = ids[:, 1:].copy()
    out = wl.forward(
        fw, wl.build(fw, cfg, weights=path), {"input_ids": ids[:, :-1], "labels": labels}
    )
    assert np.abs(out["logits"] - logits[:, :-1]).max() <= 1e-5
    assert abs(float(out["loss"]) - loss) <= 1e-5


def test_preset_config_with_padded_vocabulary_loads_the_checkpoint(case):
    wl, model, path = case
    cfg = wl.config("tiny")  # gpt3: 90 tokens padded to 96, as the file's 96 rows
    got = wl.forward(
        "torch", wl.build("torch", cfg, weights=path), {"input_ids": np.ones((1, 4), np.int32)}
    )
    want = hf_outputs(model, np.ones((1, 4), np.int64))[0]
    assert np.abs(got["logits"] - want).max() <= 1e-5


def test_sharded_directory_loads_the_same(case, tmp_path):
    wl, model, path = case
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf_io.INDEX).is_file()
    assert_bit_identical(
        wl.hf.load_pretrained(tmp_path / "sharded")[1], wl.hf.load_pretrained(path)[1]
    )


def test_old_files_buffers_bare_names_and_tied_copies_are_read(case, tmp_path):
    wl, model, path = case
    cfg, tree = wl.hf.load_pretrained(path)
    state = numpy_state(model)  # GPT-2's holds the tied lm_head copy
    for i in range(2):  # causal-mask buffers that old transformers saved
        state[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        state[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    convert.save(state, old / "model.safetensors")
    assert_bit_identical(wl.hf.load_pretrained(old)[1], tree)
    if cfg.tie_embeddings:  # openai-community/gpt2 ships GPT2Model's names, without a head
        bare = {k.removeprefix("transformer."): v for k, v in state.items() if "lm_head" not in k}
        convert.save(bare, old / "model.safetensors")
        assert_bit_identical(wl.hf.load_pretrained(old)[1], tree)
        state["lm_head.weight"] = state["lm_head.weight"] + 1
        convert.save(state, old / "model.safetensors")
        with pytest.raises(CheckpointError, match="lm_head.weight that differs"):
            wl.hf.load_pretrained(old)


# --- config -----------------------------------------------------------------------------------
def test_config_from_hf_accepts_object_dict_file_and_directory(case):
    wl, model, path = case
    forms = [model.config, model.config.to_dict(), path / "config.json", path]
    configs = [wl.config_from_hf(form, preset="tiny") for form in forms]
    assert all(c == configs[0] for c in configs)
    assert configs[0] == wl.config("tiny", vocab_size=96, vocab_multiple=1)


def test_config_from_hf_keeps_a_padded_vocabulary_when_asked():
    config = CASES["gpt3"][2]()
    assert GPT3.config_from_hf(config, preset="tiny", vocab_size=90, vocab_multiple=32) == (
        GPT3.config("tiny")
    )
    with pytest.raises(ValueError, match="padded to a multiple of 1 is 91 rows"):
        GPT3.config_from_hf(config, preset="tiny", vocab_size=91)
    full = GPT3.config_from_hf(transformers.GPT2Config(vocab_size=50304, n_positions=1024))
    assert (full.seq_len, full.vocab_size, full.lr) == (1024, 50304, GPT3.config("mlperf").lr)


@pytest.mark.parametrize(
    "wl, preset",
    [(GPT3, "tiny"), (GPT3, "small"), (GPT3, "mlperf"), (GPTJ, "tiny"), (GPTJ, "full")],
    ids=["gpt3-tiny", "gpt3-small", "gpt3-mlperf", "gptj-tiny", "gptj-full"],
)
def test_config_to_hf_roundtrips_and_builds_in_transformers(wl, preset):
    cfg = wl.config(preset, dropout=0.05)
    vocab = {"vocab_size": cfg.vocab_size, "vocab_multiple": cfg.vocab_multiple}
    assert wl.config_from_hf(wl.hf.config_to_hf(cfg), preset=preset, **vocab) == cfg
    built = transformers.AutoConfig.for_model(**wl.hf.config_to_hf(cfg))
    assert wl.config_from_hf(built, preset=preset, **vocab) == cfg


@pytest.mark.parametrize(
    "wl, change, key",
    [
        (GPT3, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        (GPT3, {"scale_attn_weights": False}, "scale_attn_weights"),
        (GPT3, {"add_cross_attention": True}, "add_cross_attention"),
        (GPT3, {"activation_function": "relu"}, "activation_function"),
        (GPT3, {"model_type": "gptj"}, "model_type='gptj'"),
        (GPTJ, {"tie_word_embeddings": True}, "tie_word_embeddings"),
        (GPTJ, {"rotary_dim": None}, "rotary_dim=None"),
        (GPTJ, {"rotary_dim": 3}, "rotary_dim"),
        (GPTJ, {"model_type": "gpt2"}, "model_type='gpt2'"),
    ],
)
def test_config_from_hf_refuses_what_our_decoder_lacks(wl, change, key):
    with pytest.raises(ValueError, match=key):
        wl.config_from_hf({**wl.hf.config_to_hf(wl.config("tiny")), **change}, preset="tiny")


def test_config_to_hf_refuses_what_the_hf_class_lacks():
    with pytest.raises(ValueError, match="cannot express attention_bias=False"):
        GPT3.hf.config_to_hf(GPT3.config("tiny", attention_bias=False))
    with pytest.raises(ValueError, match="cannot express rotary_base=500000.0"):
        GPTJ.hf.config_to_hf(GPTJ.config("tiny", rotary_base=500000.0))


def test_config_from_hf_refuses_architecture_overrides():
    with pytest.raises(ValueError, match=r"\['num_layers'\] come from"):
        GPT3.config_from_hf(GPT3.hf.config_to_hf(GPT3.config("tiny")), num_layers=3)


def test_param_counts_equal_transformers():
    with torch.device("meta"):
        gpt3 = transformers.GPT2LMHeadModel(
            transformers.AutoConfig.for_model(**GPT3.hf.config_to_hf(GPT3.config("mlperf")))
        )
        gptj = transformers.GPTJForCausalLM(
            transformers.AutoConfig.for_model(**GPTJ.hf.config_to_hf(GPTJ.config("full")))
        )
    n3 = sum(p.numel() for p in gpt3.parameters())  # the tied head is one parameter
    nj = sum(p.numel() for p in gptj.parameters())
    assert GPT3.param_count(GPT3.config("mlperf")) == n3 == 174_604_836_864
    assert GPTJ.param_count(GPTJ.config("full")) == nj == 6_050_882_784


# --- writing, convert and CLI -------------------------------------------------------------------
def test_save_pretrained_loads_in_transformers_with_no_missing_keys(case, tmp_path):
    wl, model, path = case
    cfg = wl.config("tiny")
    tree = random_tree(wl, cfg)
    wl.hf.save_pretrained(tree, cfg, tmp_path / "out.hf")
    assert listing(tmp_path) == {"out.hf", "out.hf/config.json", "out.hf/model.safetensors"}
    assert set(hf_io.read_weights(tmp_path / "out.hf")) == set(hf_io.read_weights(path))
    loaded, info = type(model).from_pretrained(tmp_path / "out.hf", output_loading_info=True)
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    assert_bit_identical(NAMING[wl.name].from_hf(numpy_state(loaded), cfg.tie_embeddings), tree)


def test_convert_roundtrips_bit_identically_in_float32_and_bf16(case, tmp_path):
    wl, model, path = case
    cfg = wl.config("tiny")
    flat, back = tmp_path / "x.safetensors", tmp_path / "back.hf"
    convert.convert(path, flat, workload=wl, cfg=cfg)
    assert_bit_identical(convert.load(flat), wl.hf.load_pretrained(path)[1])
    convert.convert(flat, back, workload=wl, cfg=cfg)
    assert_bit_identical(hf_io.read_weights(back), hf_io.read_weights(path))
    tree = random_tree(wl, cfg, dtype=ml_dtypes.bfloat16)
    convert.save(tree, tmp_path / "bf16.hf", workload=wl, cfg=cfg)
    assert_bit_identical(convert.load(tmp_path / "bf16.hf", wl, cfg), tree)
    assert json.loads((tmp_path / "bf16.hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_convert_roundtrips(case, tmp_path):
    wl, model, path = case
    flat, back = tmp_path / "x.safetensors", tmp_path / "back.hf"
    assert cli.main(["convert", wl.name, str(path), str(flat), "--preset", "tiny"]) == 0
    assert cli.main(["convert", wl.name, str(flat), str(back), "--preset", "tiny"]) == 0
    assert_bit_identical(hf_io.read_weights(back), hf_io.read_weights(path))


def _other_architecture(src, path):
    src.mkdir()
    other = (
        "gptj" if json.loads((path / "config.json").read_text())["model_type"] == "gpt2" else "gpt2"
    )
    wl = GPTJ if other == "gptj" else GPT3
    wl.hf.save_pretrained(wl.init_canonical(wl.config("tiny")), wl.config("tiny"), src)
    return f"model_type='{other}'"


def _missing_key(src, path):
    src.mkdir()
    state = hf_io.read_weights(path)
    del state["transformer.h.1.ln_1.bias"]
    (src / "config.json").write_text((path / "config.json").read_text())
    convert.save(state, src / "model.safetensors")
    return "transformer.h.1.ln_1.bias"


def _wrong_shape(src, path):
    src.mkdir()
    state = dict(hf_io.read_weights(path))
    state["transformer.ln_f.weight"] = np.ones(31, np.float32)
    (src / "config.json").write_text((path / "config.json").read_text())
    convert.save(state, src / "model.safetensors")
    return "transformer.ln_f.weight"


@pytest.mark.parametrize("make", [_other_architecture, _missing_key, _wrong_shape])
def test_bad_directory_is_one_clear_error_and_no_output(case, tmp_path, capsys, make):
    wl, model, path = case
    message = make(tmp_path / "src", path)
    before = listing(tmp_path)
    args = [
        "convert",
        wl.name,
        str(tmp_path / "src"),
        str(tmp_path / "o.safetensors"),
        "--preset",
        "tiny",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: ") and message in err and err.count("\n") == 1
    assert listing(tmp_path) == before
    with pytest.raises(CheckpointError, match=message):
        convert.load(tmp_path / "src", workload=wl, cfg=wl.config("tiny"))


def test_build_refuses_a_config_of_another_architecture(case):
    wl, model, path = case
    heads = wl.config("tiny").num_heads
    with pytest.raises(CheckpointError, match=f"num_heads {heads} in the checkpoint, 8 in the"):
        wl.build("torch", wl.config("tiny", num_heads=8), weights=path)
