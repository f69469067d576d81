"""bf16 parity mode: each framework's bf16 training path against the float32 reference."""

from __future__ import annotations

import dataclasses

import pytest

from mlperf_tutor import cli, frameworks, parity

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WORKLOADS = ["bert", "dlrm_dcnv2", "gpt3", "gptj", "llama2_70b_lora", "stable_diffusion", "toy"]


@pytest.mark.parametrize("name", WORKLOADS)
def test_bf16_parity_passes(name):
    report = parity.run(name, "tiny", steps=10, precision="bf16")
    assert report.ok, report.table()
    # Every framework's bf16 run is compared at every step, against torch's float32 run.
    assert {row.pair for row in report.rows} == {f"{f} bf16-torch fp32" for f in frameworks.NAMES}
    assert len(report.rows) == 10 * len(frameworks.NAMES)
    # bf16 is not float32: the runs really ran in bf16 (their losses differ from the reference).
    assert any(row.max_abs > 0 for row in report.rows)


def test_bf16_bar_fails_on_a_planted_bug(monkeypatch):
    # The bug: the bf16 run trains with a learning rate 1.5 x the recipe's (say, a schedule
    # taken from another preset). Everything else is right; the bar must still catch it.
    original = parity.trainer_losses

    def planted(wl, cfg, framework, precision, *args):
        if precision == "bf16" and framework == "jax":
            cfg = dataclasses.replace(cfg, lr=cfg.lr * 1.5)
        return original(wl, cfg, framework, precision, *args)

    monkeypatch.setattr(parity, "trainer_losses", planted)
    report = parity.run("gpt3", "tiny", steps=10, precision="bf16")
    assert not report.ok
    assert {row.pair for row in report.failures()} == {"jax bf16-torch fp32"}


def test_cli_parity_bf16(capsys):
    argv = ["parity", "toy", "--precision", "bf16", "--frameworks", "jax", "--steps", "3"]
    assert cli.main(argv) == 0
    assert "jax bf16-jax fp32" in capsys.readouterr().out
