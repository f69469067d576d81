"""A missing framework is normal (a Colab TPU runtime has no TensorFlow): parity, the CLI and
migrate use the frameworks that are installed and say how to add the others.

``MLPERF_TUTOR_FRAMEWORKS=torch,jax`` makes the package see a runtime without TensorFlow;
patching a framework's required modules makes it look uninstalled."""

from __future__ import annotations

import sys

import pytest

from mlperf_tutor import cli, frameworks, migrate, parity, project

pytestmark = pytest.mark.requires("torch", "jax")


@pytest.fixture
def no_tf(monkeypatch):
    monkeypatch.setenv(frameworks.SELECT_VARIABLE, "torch,jax")


@pytest.fixture
def tf_uninstalled(monkeypatch):
    monkeypatch.delenv(frameworks.SELECT_VARIABLE, raising=False)
    monkeypatch.setitem(frameworks._REQUIRES, "tf", ("tensorflow", "surely_not_installed_pkg"))


def test_installed_and_present_follow_the_selection(no_tf, capsys):
    assert frameworks.installed() == ["torch", "jax"]
    assert frameworks.present("jax") is True
    assert capsys.readouterr().out == ""
    assert frameworks.present("tf") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "tf" in out and frameworks.SELECT_VARIABLE in out


def test_parity_compares_the_installed_frameworks(no_tf):
    report = parity.run("toy", "tiny", steps=1)
    assert {row.pair for row in report.rows} == {"torch-jax"}
    assert set(report.losses) == {"torch", "jax"}
    assert report.missing == {"tf": frameworks.install_hint("tf")}
    assert report.ok


def test_parity_refuses_a_named_missing_framework(tf_uninstalled):
    with pytest.raises(frameworks.FrameworkNotInstalled) as err:
        parity.run("toy", "tiny", frameworks=["torch", "tf"], steps=1)
    message = str(err.value)
    assert "parity of toy needs torch and tf" in message
    assert project.requirement(("tf",)) in message


def test_parity_with_one_framework_says_how_to_add_another(monkeypatch):
    monkeypatch.setenv(frameworks.SELECT_VARIABLE, "jax")
    with pytest.raises(frameworks.FrameworkNotInstalled, match=r"at least 2 installed") as err:
        parity.run("toy", "tiny", steps=1)
    assert "torch: " in str(err.value) and "tf: " in str(err.value)


def test_cli_list_shows_installed_frameworks(no_tf, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "frameworks installed: torch, jax\n" in out
    assert f"tf is not available: {frameworks.install_hint('tf')}" in out


def test_cli_list_names_the_pip_line_of_an_uninstalled_framework(tf_uninstalled, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "frameworks installed: torch, jax\n" in out
    assert f'tf is not available: pip install "{project.requirement(("tf",))}"' in out


def test_cli_parity_without_tf(no_tf, capsys):
    assert cli.main(["parity", "toy", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch-jax" in out and "jax-tf" not in out
    assert f"tf not compared, not available here: {frameworks.install_hint('tf')}" in out


def test_cli_train_defaults_to_an_installed_framework(monkeypatch, capsys):
    monkeypatch.setenv(frameworks.SELECT_VARIABLE, "jax")
    assert cli.main(["train", "toy", "--max-steps", "2", "--preset", "auto"]) == 0
    captured = capsys.readouterr()
    assert "--framework jax (the first installed)" in captured.err
    assert "--preset auto: tiny" in captured.err  # this machine has no accelerator
    assert captured.out.startswith("toy jax on cpu")


def test_cli_names_a_missing_framework_in_one_line(tf_uninstalled, capsys):
    assert cli.main(["train", "toy", "--framework", "tf", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlperf-tutor: error: ") and err.count("\n") == 1
    assert project.requirement(("tf",)) in err


def test_migrate_to_tf_without_tf(no_tf):
    with pytest.raises(frameworks.FrameworkNotInstalled) as err:
        migrate.to_tf(None)
    assert str(err.value) == (
        "mlperf_tutor.migrate.to_tf needs jax and tf, and tf is not available here "
        f"(tf: {frameworks.install_hint('tf')})"
    )


def test_migrate_torch_to_jax_without_jax(monkeypatch):
    monkeypatch.setitem(frameworks._REQUIRES, "jax", ("jax", "surely_not_installed_pkg"))
    with pytest.raises(frameworks.FrameworkNotInstalled, match=r"migrate.torch_to_jax needs"):
        migrate.torch_to_jax(None, None, None, None)
    with pytest.raises(frameworks.FrameworkNotInstalled, match=r"parity.diff_layers needs"):
        parity.diff_layers(None, None, None)


def test_a_framework_below_the_declared_minimum_is_not_available(monkeypatch):
    # The package's metadata as pyproject.toml declares it, and a Colab-like old flax.
    import importlib.metadata
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    declared = [f'{r}; extra == "{e}"' for e, rs in extras.items() for r in rs]
    flax_min = next(r for r in extras["jax"] if r.startswith("flax"))
    real_version = importlib.metadata.version
    monkeypatch.delenv(frameworks.SELECT_VARIABLE, raising=False)
    # A process that has not imported the JAX adapter yet: once imported, get() returns it
    # without reading the versions again.
    monkeypatch.delitem(sys.modules, "mlperf_tutor.frameworks.jax", raising=False)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: declared)
    monkeypatch.setattr(
        importlib.metadata, "version", lambda n: "0.1.0" if n == "flax" else real_version(n)
    )
    assert frameworks.outdated("jax") == [f"flax 0.1.0 (needs {flax_min.removeprefix('flax')})"]
    assert frameworks.outdated("torch") == []
    assert "jax" not in frameworks.installed()
    with pytest.raises(frameworks.FrameworkNotInstalled, match=r"needs newer versions of .*flax"):
        frameworks.get("jax")


def test_an_imported_adapter_comes_back_without_reading_versions_again(monkeypatch):
    # The workloads ask for the adapter once per evaluation batch; reading the installed
    # versions took 20 ms each time (1,024 times in an evaluation of tiny DLRM at batch 2).
    import importlib.metadata

    adapter = frameworks.get("torch")

    def unreadable(name):
        raise AssertionError(f"read the version of {name} again")

    monkeypatch.setattr(importlib.metadata, "version", unreadable)
    assert frameworks.get("torch") is adapter
    monkeypatch.setenv(frameworks.SELECT_VARIABLE, "jax")
    with pytest.raises(frameworks.FrameworkNotInstalled, match="left out"):
        frameworks.get("torch")
