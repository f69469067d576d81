"""Hostile configs (issue 19): a config.json, adapter_config.json, diffusers config, config
override or CLI option of the wrong type or out of range gets one error of the package naming the
file and the field, before anything is allocated, and a conversion asked to write leaves nothing.

Every directory is written by the package's own writers (``save_pretrained``, ``save_adapter``)
from the tiny presets; each case changes one value of its config file.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlperf_tutor import cli, convert, workloads
from mlperf_tutor.core.checkpoint import CheckpointError
from mlperf_tutor.core.config import ConfigError
from mlperf_tutor.workloads.llama import peft

ROOT = Path(__file__).resolve().parents[1]
HF_WORKLOADS = ("bert", "gpt3", "gptj", "llama2_70b_lora", "stable_diffusion")
# config.json keys of each kind, per workload (None: its config.json has no such key).
KEYS = {
    "bert": dict(
        size="num_hidden_layers",
        eps="layer_norm_eps",
        dropout="hidden_dropout_prob",
        init="initializer_range",
        enum=("hidden_act", "swish"),
        wrong_type=("hidden_size", [32]),
    ),
    "gpt3": dict(
        size="n_layer",
        eps="layer_norm_epsilon",
        dropout="resid_pdrop",
        init="initializer_range",
        enum=("activation_function", "swish"),
        wrong_type=("n_embd", {"width": 32}),
    ),
    "gptj": dict(
        size="n_head",
        eps="layer_norm_epsilon",
        dropout="resid_pdrop",
        init="initializer_range",
        enum=("activation_function", "relu"),
        wrong_type=("tie_word_embeddings", "false"),
    ),
    "llama2_70b_lora": dict(
        size="num_key_value_heads",
        eps="rms_norm_eps",
        dropout=None,  # LoRA's dropout is adapter_config.json's (see the adapter cases)
        init="initializer_range",
        enum=("hidden_act", "gelu"),
        wrong_type=("rope_parameters", [10000.0]),
    ),
    "stable_diffusion": dict(
        size="layers_per_block",
        eps="norm_eps",
        dropout="dropout",
        init=None,  # a diffusers UNet config has no init std
        enum=("down_block_types", ["CrossAttnDownBlock2D", "FancyDownBlock2D"]),
        wrong_type=("block_out_channels", 32),
    ),
}
INF = "__inf__"  # written as 1e400, which JSON parsers read as infinity


def _cases(kind_values):
    return [
        (wl, kind, label, value)
        for wl, keys in KEYS.items()
        for kind, label, value in kind_values
        if keys[kind] is not None
    ]


# (kind of key, label, value): every case of the list that is one value of one key.
VALUE_CASES = _cases(
    [
        ("size", "string int", "2"),
        ("size", "float int", 2.0),
        ("size", "bool", True),
        ("size", "negative size", -2),
        ("size", "zero size", 0),
        ("eps", "infinite float", INF),
        ("eps", "zero eps", 0.0),
        ("eps", "negative eps", -1e-5),
        ("eps", "string float", "1e-5"),
        ("dropout", "dropout 1", 1.0),
        ("dropout", "negative dropout", -0.1),
        ("init", "zero init range", 0.0),
        ("init", "negative init range", -0.02),
    ]
)
TYPE_CASES = [(wl, label) for wl in KEYS for label in ("unknown enum", "wrong JSON type")]


def _mutated(wl: str, label: str, value=None) -> tuple[str, object]:
    keys = KEYS[wl]
    if label == "unknown enum":
        return keys["enum"]
    if label == "wrong JSON type":
        return keys["wrong_type"]
    kind = next(k for _, k, lab, _ in VALUE_CASES if lab == label)
    return keys[kind], value


def _write_config(path: Path, config: dict) -> None:
    text = json.dumps(config)
    path.write_text(text.replace(f'"{INF}"', "1e400"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """workload -> a save_pretrained directory of its tiny preset, written by the package."""
    root = tmp_path_factory.mktemp("pristine")
    dirs = {}
    for name in HF_WORKLOADS:
        wl = workloads.get(name)
        cfg = wl.config("tiny")
        dirs[name] = root / f"{name}.hf"
        wl.hf.save_pretrained(wl.init_canonical(cfg), cfg, dirs[name])
    return dirs


def _copy_with(pristine_dir: Path, tmp_path: Path, key: str, value) -> Path:
    directory = tmp_path / "model.hf"
    shutil.copytree(pristine_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    _write_config(directory / "config.json", {**config, key: value})
    return directory


def _assert_refused(error, *names):
    for name in names:
        assert str(name) in str(error.value), f"{name!r} not in: {error.value}"


def _check_file_case(name, directory, key, tmp_path, capsys):
    wl = workloads.get(name)
    config_json = directory / "config.json"
    with pytest.raises(CheckpointError) as error:
        wl.config_from_hf(directory, preset="tiny")
    _assert_refused(error, config_json, key)
    with pytest.raises(CheckpointError) as error:
        wl.config_from_hf(config_json, preset="tiny")
    _assert_refused(error, config_json, key)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as error:
        convert.convert(directory, out / "model.safetensors", workload=wl, cfg=wl.config("tiny"))
    _assert_refused(error, config_json, key)
    capsys.readouterr()
    assert cli.main(["convert", name, str(directory), str(out / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(config_json) in err and key in err, err
    assert list(out.iterdir()) == [], "a refused conversion left files"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.hf", "out"]


@pytest.mark.parametrize(("name", "kind", "label", "value"), VALUE_CASES)
def test_config_json_value_is_refused_naming_the_file_and_key(
    name, kind, label, value, pristine, tmp_path, capsys
):
    key = KEYS[name][kind]
    directory = _copy_with(pristine[name], tmp_path, key, value)
    _check_file_case(name, directory, key, tmp_path, capsys)


@pytest.mark.parametrize(("name", "label"), TYPE_CASES)
def test_config_json_enum_or_type_is_refused_naming_the_file_and_key(
    name, label, pristine, tmp_path, capsys
):
    key, value = _mutated(name, label)
    directory = _copy_with(pristine[name], tmp_path, key, value)
    _check_file_case(name, directory, key, tmp_path, capsys)


@pytest.mark.parametrize(("name", "kind", "label", "value"), VALUE_CASES)
def test_config_in_memory_is_refused_with_a_config_error_naming_the_key(name, kind, label, value):
    wl = workloads.get(name)
    key = KEYS[name][kind]
    data = wl.hf.config_to_hf(wl.config("tiny")) | {key: math.inf if value == INF else value}
    with pytest.raises(ConfigError) as error:
        wl.config_from_hf(data, preset="tiny")
    _assert_refused(error, "the Hugging Face config", key)


@pytest.mark.parametrize("name", HF_WORKLOADS)
def test_nan_is_refused_in_memory_and_in_a_file(name, pristine, tmp_path):
    wl = workloads.get(name)
    key = KEYS[name]["eps"]
    with pytest.raises(ConfigError) as error:
        wl.config_from_hf(wl.hf.config_to_hf(wl.config("tiny")) | {key: math.nan}, preset="tiny")
    _assert_refused(error, key, "nan")
    # json.dumps writes NaN, which is not JSON: the reader refuses the file before any field.
    directory = _copy_with(pristine[name], tmp_path, key, math.nan)
    with pytest.raises(CheckpointError) as error:
        wl.config_from_hf(directory)
    _assert_refused(error, directory / "config.json", "NaN")


@pytest.mark.parametrize("name", HF_WORKLOADS)
def test_missing_required_key_is_named(name, pristine, tmp_path):
    key = {"bert": "model_type", "gpt3": "model_type", "gptj": "model_type"}.get(
        name, {"llama2_70b_lora": "hidden_size", "stable_diffusion": "in_channels"}.get(name)
    )
    directory = tmp_path / "model.hf"
    shutil.copytree(pristine[name], directory)
    config = json.loads((directory / "config.json").read_text())
    del config[key]
    _write_config(directory / "config.json", config)
    with pytest.raises(CheckpointError) as error:
        workloads.get(name).config_from_hf(directory)
    _assert_refused(error, directory / "config.json", key)


def test_absent_per_level_keys_take_the_diffusers_defaults():
    sd = workloads.get("stable_diffusion")
    data = sd.hf.config_to_hf(sd.config("tiny"))
    del data["transformer_layers_per_block"]  # diffusers' default: 1 per level
    assert sd.config_from_hf(data, preset="tiny") == sd.config("tiny")
    del data["attention_head_dim"]  # diffusers' default: 8 heads per level, 4 and 8 wide here
    with pytest.raises(ConfigError, match=r"head widths \[4, 8\]"):
        sd.config_from_hf(data, preset="tiny")


@pytest.mark.parametrize("name", HF_WORKLOADS)
def test_config_json_that_is_not_an_object_is_refused(name, pristine, tmp_path):
    directory = tmp_path / "model.hf"
    shutil.copytree(pristine[name], directory)
    (directory / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as error:
        workloads.get(name).config_from_hf(directory)
    _assert_refused(error, directory / "config.json", "array")


# --- declared sizes larger than the weights: refused before allocation ------------------------
HUGE = {  # workload -> [(key, value)]: layers past the cap, a vocabulary past int32, a width
    # that passes every range but needs more bytes than the weight files hold.
    "bert": [("num_hidden_layers", 10**9), ("vocab_size", 10**12), ("hidden_size", 10**9)],
    "gpt3": [("n_layer", 10**9), ("vocab_size", 10**12), ("n_embd", 10**9)],
    "gptj": [("n_layer", 10**9), ("vocab_size", 10**12), ("n_inner", 10**9)],
    "llama2_70b_lora": [
        ("num_hidden_layers", 10**9),
        ("vocab_size", 10**12),
        ("intermediate_size", 10**9),
    ],
    "stable_diffusion": [
        ("layers_per_block", 10**9),
        ("in_channels", 10**12),
        ("cross_attention_dim", 10**9),
    ],
}
# Runs in a child process: the CLI's convert of every huge case, under an address-space limit
# of 1 GiB above what the process holds after a first, valid conversion (every import done);
# its peak RSS growth is reported too.
_CHILD = """
import contextlib, io, json, resource, sys
from mlperf_tutor import cli

cases = json.loads(sys.argv[1])
with contextlib.redirect_stderr(io.StringIO()):
    assert cli.main(["convert", "bert", cases["warmup"][0], cases["warmup"][1]]) == 0

def vm_bytes():  # Linux; elsewhere only the RSS growth below is measured
    try:
        with open("/proc/self/status") as status:
            return next(int(x.split()[1]) * 1024 for x in status if x.startswith("VmSize:"))
    except (OSError, StopIteration):
        return None

if vm_bytes() is not None:
    limit = vm_bytes() + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for name, src, dst in cases["huge"]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli.main(["convert", name, src, dst])
        except MemoryError:
            rc = "MemoryError"
    results.append({"rc": rc, "err": err.getvalue()})
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
print(json.dumps({"results": results, "rss_growth": growth}))
"""


def test_huge_declared_sizes_are_refused_within_a_gigabyte(pristine, tmp_path):
    cases, expected = [], []
    for name, changes in HUGE.items():
        for key, value in changes:
            case = tmp_path / f"{name}-{key}"
            case.mkdir()
            directory = _copy_with(pristine[name], case, key, value)
            (case / "out").mkdir()
            cases.append((name, str(directory), str(case / "out" / "model.safetensors")))
            expected.append((case, directory / "config.json", key))
    warmup = (str(pristine["bert"]), str(tmp_path / "warmup.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps({"huge": cases, "warmup": warmup})],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["rss_growth"] < 2**30
    for result, (case, config_json, key) in zip(report["results"], expected, strict=True):
        assert result["rc"] == 2, result  # the CLI's error exit: a package error, not MemoryError
        assert str(config_json) in result["err"] and key in result["err"], result["err"]
        assert list((case / "out").iterdir()) == []


@pytest.mark.parametrize("name", HF_WORKLOADS)
def test_width_beyond_the_weights_is_refused_by_their_size(name, pristine, tmp_path):
    key, value = HUGE[name][2]
    directory = _copy_with(pristine[name], tmp_path, key, value)
    with pytest.raises(CheckpointError) as error:
        convert.load(directory, workload=workloads.get(name))
    _assert_refused(error, directory / "config.json", key, "parameters", "too few")


# --- adapter_config.json ------------------------------------------------------------------------
LLAMA = workloads.get("llama2_70b_lora")
ADAPTER_CASES = [
    ("r", "16", "string int"),
    ("r", 16.0, "float int"),
    ("r", True, "bool"),
    ("r", 0, "zero size"),
    ("r", -16, "negative size"),
    ("r", 10**9, "huge rank"),
    ("lora_alpha", INF, "infinite float"),
    ("lora_alpha", 0.0, "zero alpha"),
    ("lora_alpha", "32", "string float"),
    ("lora_dropout", 1.0, "dropout 1"),
    ("lora_dropout", -0.1, "negative dropout"),
    ("peft_type", "PREFIX_TUNING", "unknown enum"),
    ("bias", "all", "unknown enum"),
    ("use_dora", "false", "string bool"),
    ("target_modules", 5, "wrong JSON type"),
    ("rank_pattern", {"q_proj": 8}, "per-module ranks"),
    ("alpha_pattern", [1], "wrong JSON type"),
]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    cfg = LLAMA.config("tiny")
    directory = tmp_path_factory.mktemp("peft") / "adapter"
    peft.save_adapter(LLAMA.init_canonical(cfg), cfg, directory)
    return directory


@pytest.mark.parametrize(("key", "value", "label"), ADAPTER_CASES)
def test_adapter_config_value_is_refused_naming_the_file_and_key(
    key, value, label, adapter_dir, tmp_path
):
    directory = tmp_path / "adapter"
    shutil.copytree(adapter_dir, directory)
    config = json.loads((directory / peft.CONFIG).read_text())
    _write_config(directory / peft.CONFIG, {**config, key: value})
    with pytest.raises(CheckpointError) as error:
        peft.load_adapter(directory, LLAMA.config("tiny"))
    _assert_refused(error, directory / peft.CONFIG, key)
    assert sorted(p.name for p in directory.iterdir()) == [peft.CONFIG, peft.WEIGHTS]


def test_adapter_config_as_written_is_read(adapter_dir):
    cfg = LLAMA.config("tiny")
    tree = peft.load_adapter(adapter_dir, cfg)
    assert sorted(tree) == sorted(peft.adapter_shapes(cfg))


# --- config overrides (Python) and the presets --------------------------------------------------
OVERRIDE_FIELDS = {  # workload -> role -> field
    "bert": dict(size="num_layers", eps="norm_eps", dropout="dropout", init="init_std"),
    "dlrm_dcnv2": dict(size="embedding_dim", eps="eps", tuple="table_sizes"),
    "gpt3": dict(size="hidden", eps="norm_eps", dropout="dropout", enum="activation"),
    "gptj": dict(size="num_heads", eps="norm_eps", init="init_std", enum="position"),
    "llama2_70b_lora": dict(
        size="num_layers", eps="norm_eps", dropout="lora_dropout", enum="language"
    ),
    "stable_diffusion": dict(size="model_channels", eps="layer_norm_eps", tuple="channel_mult"),
    "toy": dict(size="channels", eps="norm_eps", init="init_std"),
}
OVERRIDE_VALUES = {
    "size": ["2", 2.0, True, -1, 0, 10**12, [2], None],
    "eps": [math.nan, math.inf, -math.inf, 0.0, -1e-5, "1e-5", True, 10**400],
    "dropout": [1.0, -0.1, math.nan, "0.1"],
    "init": [0.0, -0.02, math.inf],
    "enum": ["nope", 1, None],
    "tuple": ["2", [1, "2"], [1.5], [], 5, [True]],
}
OVERRIDE_CASES = [
    (name, field, value)
    for name, roles in OVERRIDE_FIELDS.items()
    for role, field in roles.items()
    for value in OVERRIDE_VALUES[role]
]


@pytest.mark.parametrize(("name", "field", "value"), OVERRIDE_CASES, ids=repr)
def test_config_override_is_refused_naming_the_field(name, field, value):
    wl = workloads.get(name)
    with pytest.raises(ConfigError) as error:
        wl.config("tiny", **{field: value})
    assert error.value.field == field
    _assert_refused(error, f"{type(wl.config('tiny')).__name__}.{field}")
    with pytest.raises(ConfigError):
        wl.config("tiny").replace(**{field: value})


@pytest.mark.parametrize("name", ["bert", "gpt3", "gptj", "llama2_70b_lora"])
def test_a_billion_layers_is_refused_as_a_config(name):
    with pytest.raises(ConfigError) as error:
        workloads.get(name).config("tiny", num_layers=10**9)
    assert error.value.field == "num_layers"


def test_every_preset_validates_and_survives_a_round_trip_through_lists():
    for name in workloads.names():
        wl = workloads.get(name)
        for preset in wl.presets:
            cfg = wl.config(preset)
            # Keras configs and JSON turn tuples into lists: they come back as tuples.
            listed = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
            assert type(cfg)(**listed) == cfg, (name, preset)


def test_numbers_are_stored_as_their_annotated_type():
    import numpy as np

    cfg = workloads.get("bert").config("tiny", num_layers=np.int64(3), lr=1, dropout=0)
    assert type(cfg.num_layers) is int and cfg.num_layers == 3
    assert type(cfg.lr) is float and type(cfg.dropout) is float


# --- CLI options ----------------------------------------------------------------------------
CLI_OPTIONS = [
    (["train", "toy"], "--batch-size"),
    (["train", "toy"], "--max-steps"),
    (["train", "toy"], "--checkpoint-every"),
    (["train", "toy"], "--keep"),
    (["train", "toy"], "--seed"),
    (["parity", "toy"], "--steps"),
    (["parity", "toy"], "--batch-size"),
    (["make-sample-data", "bert", "data"], "--samples"),
]
CLI_BAD = ["2.0", "1e9", "true", "two", "-3", "99999999999", ""]


@pytest.mark.parametrize(("command", "option"), CLI_OPTIONS)
@pytest.mark.parametrize("value", CLI_BAD + ["0"])
def test_cli_integer_option_is_refused_before_anything_runs(
    command, option, value, tmp_path, monkeypatch, capsys
):
    if option == "--seed" and value == "0":
        value = "-1"  # 0 is a seed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, option, value])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "x"])
def test_cli_target_must_be_a_finite_number(value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "gpt3", "--target", value, "--curve", "curve.csv"])
    assert exit_.value.code == 2
    assert "argument --target" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_preset_is_one_error(capsys):
    assert cli.main(["info", "bert", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


# --- fuzz: random values of random keys; only the package's errors escape ------------------
HOSTILE = [
    "2",
    "",
    2.5,
    -1,
    0,
    1,
    True,
    False,
    None,
    10**12,
    2**63,
    -(2**31) - 1,
    1e308,
    -1e-12,
    math.nan,
    math.inf,
    [],
    [1, "a"],
    {},
    {"a": 1},
    "gelu",
    [32, 64],
    [2, 0],
    {"rope_theta": "1e4"},
]


def _mutations(config: dict, rng: random.Random, count: int):
    keys = sorted(config) + ["unknown_key"]
    for _ in range(count):
        mutated = dict(config)
        for key in rng.sample(keys, rng.choice((1, 1, 2))):
            if rng.random() < 0.1:
                mutated.pop(key, None)
            else:
                mutated[key] = rng.choice(HOSTILE)
        yield mutated


def _sane(cfg) -> None:
    """An accepted config holds only finite numbers of its fields' own types."""
    for key, value in cfg.to_dict().items():
        assert not isinstance(value, str) or key in type(cfg).CHOICES, key
        if isinstance(value, float):
            assert math.isfinite(value), key
        if isinstance(value, tuple):
            assert all(type(v) is int for v in value), key


@pytest.mark.parametrize("name", HF_WORKLOADS)
def test_fuzz_config_json_raises_only_package_errors(name, pristine, tmp_path):
    wl = workloads.get(name)
    rng = random.Random(f"configs-{name}")
    config = json.loads((pristine[name] / "config.json").read_text())
    for i, mutated in enumerate(_mutations(config, rng, 40)):
        try:
            _sane(wl.config_from_hf(mutated, preset="tiny"))
        except ConfigError:
            pass
        if i % 5 == 0:  # every fifth through the files too: load_pretrained and convert
            directory = tmp_path / f"case{i}"
            shutil.copytree(pristine[name], directory)
            (directory / "config.json").write_text(json.dumps(mutated))
            try:
                convert.convert(directory, tmp_path / f"out{i}.safetensors", workload=wl)
            except CheckpointError:
                assert not (tmp_path / f"out{i}.safetensors").exists()


def test_fuzz_adapter_config_raises_only_checkpoint_errors(adapter_dir, tmp_path):
    rng = random.Random("configs-peft")
    config = json.loads((adapter_dir / peft.CONFIG).read_text())
    cfg = LLAMA.config("tiny")
    directory = tmp_path / "adapter"
    shutil.copytree(adapter_dir, directory)
    for mutated in _mutations(config, rng, 30):
        (directory / peft.CONFIG).write_text(json.dumps(mutated))
        try:
            peft.load_adapter(directory, cfg)
        except CheckpointError:
            pass


@pytest.mark.parametrize("name", sorted(OVERRIDE_FIELDS))
def test_fuzz_overrides_raise_only_config_errors(name):
    wl = workloads.get(name)
    rng = random.Random(f"overrides-{name}")
    fields = sorted(wl.config("tiny").to_dict())
    for _ in range(30):
        overrides = {field: rng.choice(HOSTILE) for field in rng.sample(fields, 2)}
        try:
            _sane(wl.config("tiny", **overrides))
        except ConfigError:
            pass
