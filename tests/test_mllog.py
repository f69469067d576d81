"""MLPerf logs of the training loop: the official v4.0 compliance checker passes them, a run stops
at the target (success) or the step limit (aborted), ten runs make a folder that scores, and a
dry run logs the mlperf preset's closed-division hyperparameters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlperf_logging
import pytest
import yaml
from mlperf_logging.mllog import constants

from mlperf_tutor import cli, train, workloads
from mlperf_tutor.mlperf import score
from mlperf_tutor.mlperf.mllog import RULESET
from mlperf_tutor.mlperf.scoring import RUN_COUNTS
from mlperf_tutor.train import loop

pytestmark = pytest.mark.requires("torch", "jax", "tf")

RULES = Path(mlperf_logging.__file__).parent / "compliance_checker" / f"training_{RULESET}"
MLLOG_KEYS = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}


def read_log(text: str) -> list[dict]:
    """The records of every ``:::MLLOG`` line of ``text``."""
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in text.splitlines() if line]


def records_of(path: Path, key: str) -> list[dict]:
    return [r for r in read_log(path.read_text()) if r["key"] == key]


def checker(log: Path, tmp_path: Path) -> tuple[int, str]:
    """Exit code and output of ``python -m mlperf_logging.compliance_checker`` (ruleset 4.0.0)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlperf_logging.compliance_checker",
            "--usage",
            "training",
            "--ruleset",
            RULESET,
            "--log_output",
            str(tmp_path / "checker.log"),
            str(log),
        ],
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("framework", ["torch", "jax", "tf"])
def test_tiny_bert_log_passes_the_v4_compliance_checker(framework, tmp_path, capsys):
    log = tmp_path / "result_0.txt"
    argv = ["train", "bert", "--framework", framework, "--max-steps", "8", "--mllog", str(log)]
    assert cli.main(argv) == 0
    assert "(target 0.72): aborted" in capsys.readouterr().out
    code, output = checker(log, tmp_path)
    assert code == 0 and "SUCCESS" in output, output
    records = read_log(log.read_text())
    assert {r["key"] for r in records} <= MLLOG_KEYS
    # Evaluations every 40 samples (the tiny preset's cadence) and at the step limit (64).
    assert [r["metadata"]["epoch_num"] for r in records_of(log, "eval_accuracy")] == [40, 64]
    assert records_of(log, "submission_division")[0]["value"] == "open"
    assert records_of(log, "run_stop")[0]["metadata"]["status"] == "aborted"
    assert records_of(log, "train_samples")[0]["value"] == 64
    # mllog's call-site metadata names the training loop, not the logging module.
    assert {r["metadata"]["file"] for r in records} == {"mlperf_tutor/train/loop.py"}


def test_step_limit_aborts_and_reaching_the_target_stops_early_with_success(tmp_path):
    limited = train.train("bert", "torch", max_steps=15, mllog=tmp_path / "a.txt", progress=False)
    assert limited.status == "aborted" and len(limited.losses) == 15
    assert [samples for samples, _ in limited.evals] == [40, 80, 120]
    assert records_of(tmp_path / "a.txt", "run_stop")[0]["metadata"]["status"] == "aborted"
    # The same run (same seed) with the best quality it reached as the target stops at the first
    # evaluation that reaches it, long before the step limit.
    qualities = [q for _, q in limited.evals]
    first_best = qualities.index(max(qualities))
    log = tmp_path / "b.txt"
    stopped = train.train(
        "bert", "torch", max_steps=50, target=max(qualities), mllog=log, progress=False
    )
    assert stopped.status == "success" and len(stopped.losses) == 5 * (first_best + 1)
    assert stopped.evals == limited.evals[: first_best + 1]
    assert records_of(log, "run_stop")[0]["metadata"]["status"] == "success"
    assert records_of(log, "train_samples")[0]["value"] == 40 * (first_best + 1)
    code, output = checker(log, tmp_path)
    assert code == 0 and "SUCCESS" in output, output


def test_ten_converged_runs_make_a_folder_that_scores(tmp_path):
    runs = RUN_COUNTS["bert"]
    for i in range(runs):
        log = tmp_path / "bert" / f"result_{i}.txt"
        argv = [
            "train",
            "bert",
            "--framework",
            "torch",
            "--seed",
            str(i),
            "--max-steps",
            "5",
            "--target",
            "0",
            "--mllog",
            str(log),
        ]
        assert cli.main(argv) == 0
    (row,) = score(tmp_path)
    assert (row.benchmark, row.runs, row.used, row.non_converged) == ("bert", runs, runs - 2, 0)
    assert row.minutes > 0


def test_eval_cadence_follows_mlperf_rule_and_crosses_each_multiple():
    wl = workloads.get("bert")
    # The MLPerf rule at the batch of NVIDIA's 8-GPU submissions (3584) and of the mlperf preset.
    assert wl.recipe(wl.config("mlperf")).eval_every_samples(3584) == 175_000
    assert wl.recipe(wl.config("mlperf")).eval_every_samples(8192) == 225_000
    assert wl.recipe(wl.config("tiny")).eval_every_samples(8) == 40
    # Batch 6, every 40 samples: after step 7 (42 samples), step 14 (84), then the limit.
    ends, steps = [], 0
    while steps < 16:
        steps = loop._next_eval(steps, 6, 40, 16)
        ends.append(steps)
    assert ends == [7, 14, 16]


def test_dry_run_logs_the_mlperf_preset_for_the_closed_division(tmp_path, capsys):
    log = tmp_path / "dry.txt"
    argv = ["train", "bert", "--framework", "torch", "--preset", "mlperf", "--dry-run"]
    assert cli.main([*argv, "--mllog", str(log)]) == 0
    values = {r["key"]: r["value"] for r in read_log(log.read_text())}
    assert values["submission_division"] == "closed"
    assert values["global_batch_size"] == 8192 and values["opt_base_learning_rate"] == 0.00288293
    assert (values["opt_lamb_beta_1"], values["start_warmup_step"]) == (0.88, -76)
    # Every key the closed rules require once is logged once; the checker names none of them
    # (it does fail the log, for the run it lacks: run_start, eval_accuracy and the rest).
    required = [
        rule["KEY"]["NAME"]
        for name in ("closed_common.yaml", "closed_bert.yaml")
        for rule in yaml.safe_load((RULES / name).read_text())
        if rule["KEY"].get("REQ") == "EXACTLY_ONE"
    ]
    assert "opt_lamb_weight_decay_rate" in required and "gradient_accumulation_steps" in required
    assert set(required) <= set(values)
    code, output = checker(log, tmp_path)
    assert code == 1 and "'run_start'" in output
    assert not [key for key in required if f"'{key}'" in output], output


def test_dry_run_and_import_load_no_framework_and_no_mlperf_logging_until_logging():
    code = (
        "import sys, mlperf_tutor.train, mlperf_tutor.cli as cli; "
        "assert 'mlperf_logging' not in sys.modules; "
        "cli.main(['train', 'bert', '--framework', 'jax', '--preset', 'mlperf', '--dry-run']); "
        "assert not {'torch', 'jax', 'tensorflow', 'keras'} & set(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    values = {r["key"]: r["value"] for r in read_log(out.stdout)}
    assert values["submission_benchmark"] == "bert" and values["max_sequence_length"] == 512


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["toy", "--mllog", "LOG"], "workload 'toy' is not an MLPerf Training benchmark"),
        (["toy", "--dry-run"], "workload 'toy' is not an MLPerf Training benchmark"),
        (["toy", "--target", "0.5"], "workload 'toy' is not evaluated"),
        (["bert", "--target", "72"], "target must be a fraction between 0 and 1"),
        (["bert", "--mllog", "."], "MLPerf log path . is a folder; give a file name"),
    ],
)
def test_bad_input_is_one_clear_error(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *argv, "--framework", "torch", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlperf-tutor: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "LOG").exists()
