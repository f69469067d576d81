"""Package-level behaviour: import hygiene, the workload registry, framework errors, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

import mlperf_tutor as mt
from mlperf_tutor import cli, frameworks


def test_import_loads_no_framework():
    code = (
        "import mlperf_tutor, mlperf_tutor.workloads, mlperf_tutor.cli, sys; "
        "mlperf_tutor.workloads.get('toy').config('tiny'); "
        "assert not {'torch','jax','tensorflow','keras'} & set(sys.modules), "
        "sorted({'torch','jax','tensorflow','keras'} & set(sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_workload_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown workload 'nope'; choose one of \[.*'toy'"):
        mt.workloads.get("nope")


def test_unknown_preset_and_field_are_refused():
    wl = mt.workloads.get("toy")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*\['small', 'tiny'\]"):
        wl.config("huge")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['chanels'\]"):
        wl.config("tiny", chanels=4)
    assert wl.config("tiny", channels=12).channels == 12


def test_config_is_frozen():
    cfg = mt.workloads.get("toy").config("tiny")
    with pytest.raises(AttributeError):
        cfg.channels = 3


def test_unknown_framework_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown framework 'mxnet'.*'torch', 'jax', 'tf'"):
        frameworks.get("mxnet")


def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setitem(frameworks._REQUIRES, "jax", ("jax", "surely_not_installed_pkg"))
    assert not frameworks.available("jax")
    with pytest.raises(frameworks.FrameworkNotInstalled, match=r"mlperf-tutor\[jax\]"):
        frameworks.get("jax")


def test_toy_param_count_matches_canonical_init():
    wl = mt.workloads.get("toy")
    cfg = wl.config("tiny")
    tree = wl.init_canonical(cfg)
    buffers = {"bn.running_mean", "bn.running_var"}
    assert wl.param_count(cfg) == sum(v.size for k, v in tree.items() if k not in buffers)
    assert {k: (v.shape, v.dtype.name) for k, v in tree.items()} == {
        k: (tuple(s), d) for k, (s, d) in wl.canonical_specs(cfg).items()
    }


def test_synthetic_batch_is_seeded():
    wl = mt.workloads.get("toy")
    cfg = wl.config("tiny")
    a, b = wl.synthetic_batch(cfg, 3, seed=1), wl.synthetic_batch(cfg, 3, seed=1)
    assert all((a[k] == b[k]).all() for k in a)
    assert (a["image"] != wl.synthetic_batch(cfg, 3, seed=2)["image"]).any()
    assert a["image"].shape == (3, 3, 8, 8) and a["tokens"].max() < cfg.vocab_size


def test_cli_list_and_info(capsys):
    assert cli.main(["list"]) == 0
    assert "toy" in capsys.readouterr().out
    assert cli.main(["info", "toy", "--preset", "tiny"]) == 0
    # conv1 216 + bn 16 + conv2 584 + gn 16 + embed 256 + conv1d 200 + fc1 272 + ln 32 + head 85
    assert "1,677" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_error(capsys):
    assert cli.main(["info", "gpt5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: unknown workload 'gpt5'")
    assert err.count("\n") == 1


def test_cli_refuses_abbreviated_options():
    with pytest.raises(SystemExit):
        cli.main(["info", "toy", "--pre", "tiny"])


@pytest.mark.parametrize("command", [["mlperf-tutor"], [sys.executable, "-m", "mlperf_tutor"]])
def test_console_script_runs(command):
    if command == ["mlperf-tutor"]:
        command = [str(Path(sys.executable).parent / "mlperf-tutor")]
    out = subprocess.run(command + ["list"], check=True, capture_output=True, text=True).stdout
    assert "toy" in out
