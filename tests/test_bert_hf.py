"""BERT <-> Hugging Face transformers: names, config, save_pretrained directories, CLI, outputs.

Every transformers model here is built locally from a config (HF_HUB_OFFLINE: no downloads).
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from checks import assert_bit_identical, listing, numpy_state  # noqa: E402

pytestmark = pytest.mark.requires("torch", "jax", "tf", "hf")

import torch  # noqa: E402
import transformers  # noqa: E402

import mlperf_tutor as mt  # noqa: E402
from mlperf_tutor import cli, convert, frameworks  # noqa: E402
from mlperf_tutor.convert import hf_io  # noqa: E402
from mlperf_tutor.convert.safetensors_io import SafetensorsReader  # noqa: E402
from mlperf_tutor.core.checkpoint import CheckpointError  # noqa: E402
from mlperf_tutor.workloads.bert import hf  # noqa: E402

wl = mt.workloads.get("bert")
# The tiny preset's architecture, spelled the way transformers users write it.
TINY = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def hf_model():
    """A BertForPreTraining with every weight random (LayerNorms and biases too, so that a
    swapped name cannot hide behind ones and zeros)."""
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.05 * torch.randn_like(p) + (1.0 if name.endswith("LayerNorm.weight") else 0))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "bert-tiny"
    hf_model.save_pretrained(path)
    return path


def test_detect_format_knows_hf_directories(hf_dir, tmp_path):
    assert convert.detect_format(hf_dir) == "hf"  # an existing directory with config.json
    assert convert.detect_format(tmp_path / "new.hf") == "hf"  # how a new one is named
    assert convert.detect_format(f"{tmp_path}/new.HF/") == "hf"
    assert convert.detect_format(tmp_path / "new") == "orbax"
    (tmp_path / "orbax").mkdir()
    assert convert.detect_format(tmp_path / "orbax") == "orbax"


# --- reading ----------------------------------------------------------------------------------
def test_load_pretrained_is_bit_identical_to_state_dict(hf_model, hf_dir):
    cfg, tree = hf.load_pretrained(hf_dir)
    assert list(tree) == list(wl.canonical_specs(cfg))  # canonical order, not the file's
    assert_bit_identical(tree, hf.from_hf(numpy_state(hf_model)))
    assert cfg == wl.config_from_hf(hf_model.config)
    assert (cfg.num_layers, cfg.hidden, cfg.num_heads, cfg.ffn) == (2, 32, 4, 64)


def test_sharded_directory_loads_the_same(hf_model, hf_dir, tmp_path):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / hf_io.INDEX).is_file()
    assert_bit_identical(hf.load_pretrained(tmp_path / "sharded")[1], hf.load_pretrained(hf_dir)[1])


def test_legacy_names_and_tied_copies_are_read(hf_model, hf_dir, tmp_path):
    # Older files: LayerNorm gamma/beta, the decoder's tied copies, the position_ids buffer.
    state = numpy_state(hf_model)  # has the tied decoder copies
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v for k, v in state.items()}
    state["bert.embeddings.position_ids"] = np.arange(64)[None]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((hf_dir / "config.json").read_text())
    convert.save(state, old / "model.safetensors")
    assert_bit_identical(hf.load_pretrained(old)[1], hf.load_pretrained(hf_dir)[1])

    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    convert.save(state, old / "model.safetensors")
    with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight that differs"):
        hf.load_pretrained(old)


def test_config_from_hf_accepts_object_dict_file_and_directory(hf_model, hf_dir):
    forms = [hf_model.config, hf_model.config.to_dict(), hf_dir / "config.json", hf_dir]
    configs = [wl.config_from_hf(form, preset="tiny") for form in forms]
    assert all(c == configs[0] for c in configs)
    assert configs[0] == wl.config("tiny")  # every mapped field agrees with the tiny preset


def test_config_from_hf_fits_the_preset_to_the_positions():
    cfg = wl.config_from_hf(transformers.BertConfig(**TINY))  # the mlperf preset: S 512, P 76
    assert (cfg.seq_len, cfg.max_predictions, cfg.lr) == (64, 10, wl.config("mlperf").lr)
    assert wl.config_from_hf(transformers.BertConfig(**TINY), seq_len=48).seq_len == 48


@pytest.mark.parametrize("preset", ["tiny", "small", "mlperf"])
def test_config_to_hf_roundtrips_and_builds_in_transformers(preset):
    cfg = wl.config(preset, dropout=0.05)
    assert wl.config_from_hf(hf.config_to_hf(cfg), preset=preset) == cfg
    built = transformers.BertConfig.from_dict(hf.config_to_hf(cfg))
    assert wl.config_from_hf(built, preset=preset) == cfg


@pytest.mark.parametrize(
    "change, key",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"is_decoder": True}, "is_decoder"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ],
)
def test_config_from_hf_refuses_what_our_bert_lacks(change, key):
    with pytest.raises(ValueError, match=key):
        wl.config_from_hf({**hf.config_to_hf(wl.config("tiny")), **change})


def test_config_from_hf_takes_hidden_dropout_as_the_dropout():
    config = {**hf.config_to_hf(wl.config("tiny")), "hidden_dropout_prob": 0.2}
    assert wl.config_from_hf({**config, "attention_probs_dropout_prob": 0.0}).dropout == 0.2
    assert wl.config_from_hf(config, dropout=0.0).dropout == 0.0


def test_config_from_hf_refuses_architecture_overrides():
    with pytest.raises(ValueError, match=r"\['num_layers'\] come from"):
        wl.config_from_hf(hf.config_to_hf(wl.config("tiny")), num_layers=3)


def test_mlperf_param_count_equals_transformers():
    with torch.device("meta"):
        model = transformers.BertForPreTraining(
            transformers.BertConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
            )
        )
    n = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    assert wl.param_count(wl.config("mlperf")) == n == 336_226_108


# --- writing ----------------------------------------------------------------------------------
def test_save_pretrained_loads_in_transformers_with_no_missing_keys(hf_dir, tmp_path):
    cfg = wl.config("tiny")
    rng = np.random.default_rng(1)
    tree = {
        k: rng.standard_normal(shape).astype(np.float32)
        for k, (shape, _) in wl.canonical_specs(cfg).items()
    }
    hf.save_pretrained(tree, cfg, tmp_path / "out.hf")
    assert listing(tmp_path) == {"out.hf", "out.hf/config.json", "out.hf/model.safetensors"}
    # The same tensors as transformers' own save_pretrained writes (no tied copies).
    with SafetensorsReader(tmp_path / "out.hf" / "model.safetensors") as ours:
        with SafetensorsReader(hf_dir / "model.safetensors") as theirs:
            assert set(ours.specs) == set(theirs.specs) and ours.metadata == theirs.metadata

    model, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "out.hf", output_loading_info=True
    )
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    assert_bit_identical(hf.from_hf(numpy_state(model)), tree)
    decoder = model.cls.predictions.decoder.weight
    assert decoder.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert wl.config_from_hf(model.config, preset="tiny") == cfg


def test_save_pretrained_refuses_a_directory_with_other_files(tmp_path):
    cfg = wl.config("tiny")
    target = tmp_path / "bert-base"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        convert.save(wl.init_canonical(cfg), target, workload=wl, cfg=cfg)
    assert listing(tmp_path) == {"bert-base", "bert-base/config.json", "bert-base/tokenizer.json"}


def test_save_pretrained_replaces_a_model_directory_and_fails_cleanly(tmp_path, monkeypatch):
    cfg = wl.config("tiny")
    target = tmp_path / "m.hf"
    convert.save(wl.init_canonical(cfg, seed=1), target, workload=wl, cfg=cfg)
    convert.save(wl.init_canonical(cfg, seed=2), target, workload=wl, cfg=cfg)
    assert_bit_identical(convert.load(target, wl, cfg), wl.init_canonical(cfg, seed=2))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "write_safetensors", broken)
    with pytest.raises(CheckpointError, match="disk full"):
        convert.save(wl.init_canonical(cfg, seed=3), target, workload=wl, cfg=cfg)
    assert listing(tmp_path) == {"m.hf", "m.hf/config.json", "m.hf/model.safetensors"}
    assert_bit_identical(convert.load(target, wl, cfg), wl.init_canonical(cfg, seed=2))


# --- convert, CLI and build ---------------------------------------------------------------------
def test_cli_convert_roundtrips_bit_identically(hf_model, hf_dir, tmp_path):
    flat, back = tmp_path / "x.safetensors", tmp_path / "back.hf"
    assert cli.main(["convert", "bert", str(hf_dir), str(flat), "--preset", "tiny"]) == 0
    assert_bit_identical(convert.load(flat), hf.from_hf(numpy_state(hf_model)))
    assert cli.main(["convert", "bert", str(flat), str(back), "--preset", "tiny"]) == 0
    assert_bit_identical(hf_io.read_weights(back), hf_io.read_weights(hf_dir))
    assert wl.config_from_hf(back) == wl.config_from_hf(hf_dir)


def test_convert_needs_a_workload_for_hf(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="workload="):
        convert.load(hf_dir)
    with pytest.raises(CheckpointError, match="cfg="):
        convert.convert(tmp_path / "nope.safetensors", tmp_path / "out.hf", workload=wl)
    toy = mt.workloads.get("toy")
    with pytest.raises(CheckpointError, match="workload 'toy' has no Hugging Face interop"):
        convert.save(toy.init_canonical(toy.config()), tmp_path / "t.hf", toy, toy.config())
    assert listing(tmp_path) == set()


def _no_config(path):
    path.mkdir()
    convert.save({"w": np.zeros(2, np.float32)}, path / "model.safetensors")


def _gpt2(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(transformers.GPT2Config(n_layer=1).to_dict()))
    convert.save({"h.0.attn.c_attn.weight": np.zeros(2, np.float32)}, path / "model.safetensors")


def _no_weights(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf.config_to_hf(wl.config("tiny"))))


@pytest.mark.parametrize(
    "make, message",
    [
        (_no_config, "has no config.json"),
        (_gpt2, "model_type='gpt2'"),
        (_no_weights, "has no model.safetensors"),
    ],
    ids=["no-config", "gpt2", "no-weights"],
)
def test_wrong_directory_is_one_clear_error_and_no_output(tmp_path, capsys, make, message):
    src = tmp_path / "src"
    make(src)
    before = listing(tmp_path)
    assert cli.main(["convert", "bert", str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: ") and message in err and err.count("\n") == 1
    assert listing(tmp_path) == before
    with pytest.raises(CheckpointError, match=message):
        convert.load(src, workload=wl, cfg=wl.config("tiny"))


def test_build_refuses_a_config_of_another_architecture(hf_dir):
    with pytest.raises(CheckpointError, match="num_heads 4 in the checkpoint, 8 in the config"):
        wl.build("torch", wl.config("tiny", num_heads=8), weights=hf_dir)


@pytest.mark.parametrize("fw", frameworks.NAMES)
def test_outputs_match_transformers(hf_model, hf_dir, fw):
    if not frameworks.available(fw):
        pytest.skip(f"{fw} is not installed (install the [{fw}] extra)")
    cfg = wl.deterministic(wl.config_from_hf(hf_dir, preset="tiny"))
    batch = wl.synthetic_batch(cfg, batch_size=3, seed=0)
    with torch.no_grad():
        want = hf_model(
            input_ids=torch.from_numpy(batch["input_ids"]).long(),
            attention_mask=torch.from_numpy(batch["input_mask"]).long(),
            token_type_ids=torch.from_numpy(batch["segment_ids"]).long(),
        )
    rows = np.arange(3)[:, None]
    mlm = want.prediction_logits.numpy()[rows, batch["masked_lm_positions"]]  # (B, P, V)
    got = wl.forward(fw, wl.build(fw, cfg, weights=hf_dir), batch)
    assert np.abs(got["mlm_logits"] - mlm).max() <= 1e-5
    assert np.abs(got["nsp_logits"] - want.seq_relationship_logits.numpy()).max() <= 1e-5
