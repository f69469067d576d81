"""DLRM-DCNv2 end to end: the reference's sizes, training to a rising AUC, the MLPerf log and info
(parity and conversion: test_workload_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_mllog import checker, read_log, records_of

from mlperf_tutor import cli, frameworks, train, workloads
from mlperf_tutor.workloads.dlrm import EVAL_BATCH
from mlperf_tutor.workloads.dlrm.config import MULTI_HOT_SIZES, TABLE_SIZES
from mlperf_tutor.workloads.dlrm.data import roc_auc

pytestmark = pytest.mark.requires("torch", "jax", "tf")

WL = workloads.get("dlrm_dcnv2")
TINY = WL.config("tiny")


def test_mlperf_preset_has_the_reference_sizes():
    cfg = WL.config("mlperf")
    # mlcommons/training recommendation_v2/torchrec_dlrm README.
    assert cfg.table_sizes[:5] == (40000000, 39060, 17295, 7424, 20265)
    assert cfg.multi_hot_sizes[:6] == (3, 2, 1, 2, 6, 1) and sum(MULTI_HOT_SIZES) == 214
    assert (cfg.embedding_dim, cfg.bottom_mlp, cfg.top_mlp) == (
        128,
        (512, 256, 128),
        (1024, 1024, 512, 256, 1),
    )
    e, d, r = 128, 27 * 128, 512
    mlps = (13 * 512 + 512) + (512 * 256 + 256) + (256 * 128 + 128)
    mlps += (d * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 256 + 256)
    mlps += 256 + 1
    cross = 3 * (r * d + d * r + d)
    assert WL.param_count(cfg) == sum(TABLE_SIZES) * e + mlps + cross


def test_info_reports_embedding_memory_without_allocating(capsys):
    assert cli.main(["info", "dlrm_dcnv2", "--preset", "mlperf"]) == 0
    out = capsys.readouterr().out
    info = WL.info(WL.config("mlperf"))
    assert info["embedding parameters"] == sum(TABLE_SIZES) * 128
    assert info["fp32 embedding tables (GB)"] == pytest.approx(sum(TABLE_SIZES) * 512 / 1e9)
    assert f"{info['embedding parameters']:,}" in out


def test_optimizer_is_the_v4_adagrad():
    spec, schedule = WL.optimizer(WL.config("mlperf"))
    assert (spec.name, spec.eps, spec.initial_accumulator, spec.weight_decay) == (
        "adagrad",
        1e-8,
        0.0,
        0.0,
    )
    assert schedule.lr_at(0) == schedule.lr_at(10**6) == 0.004


@pytest.fixture(scope="module")
def runs():
    return {f: train.train(WL, f, TINY, max_steps=60, progress=False) for f in frameworks.NAMES}


def test_auc_rises_well_above_chance_and_the_frameworks_agree(runs):
    for framework, run in runs.items():
        aucs = [auc for _, auc in run.evals]
        assert aucs[-1] > 0.75 and aucs[-1] > aucs[0], (framework, aucs)
    reference = np.array(runs["torch"].losses)
    for framework in ("jax", "tf"):
        assert np.abs(np.array(runs[framework].losses) - reference).max() <= 1e-4, framework


def test_tiny_log_passes_the_v4_compliance_checker(tmp_path, capsys):
    log = tmp_path / "result_0.txt"
    argv = ["train", "dlrm_dcnv2", "--framework", "torch", "--max-steps", "20", "--mllog", str(log)]
    assert cli.main(argv) == 0
    code, output = checker(log, tmp_path)
    assert code == 0 and "SUCCESS" in output, output
    assert records_of(log, "opt_adagrad_epsilon")[0]["value"] == 1e-8
    assert len(records_of(log, "eval_accuracy")) >= 2
    assert {r["key"] for r in read_log(log.read_text())} >= {"run_stop", "train_samples"}


@pytest.mark.parametrize("framework", ["torch", "jax", "tf"])
def test_untouched_rows_stay_bit_identical_through_training(framework):
    adapter = frameworks.get(framework)
    tree = WL.init_canonical(TINY, seed=4)
    model = WL.build(framework, TINY, weights=tree)
    optimizer = adapter.make_optimizer(*WL.optimizer(TINY), model)
    touched = [set() for _ in TINY.table_sizes]
    offsets = np.cumsum((0, *TINY.multi_hot_sizes))
    for step in range(5):
        batch = WL.synthetic_batch(TINY, batch_size=4, seed=step)
        for f in range(TINY.num_tables):
            touched[f] |= set(batch["sparse"][:, offsets[f] : offsets[f + 1]].ravel().tolist())
        adapter.train_step(model, optimizer, batch)
    after = adapter.to_canonical(model)
    moved = 0
    for f, rows in enumerate(touched):
        name = f"embedding_bags.{f}.weight"
        untouched = sorted(set(range(TINY.table_sizes[f])) - rows)
        assert np.array_equal(after[name][untouched], tree[name][untouched]), name
        moved += int((after[name][sorted(rows)] != tree[name][sorted(rows)]).any())
    assert moved == TINY.num_tables


def test_evaluation_runs_in_large_batches_whatever_the_training_batch(monkeypatch):
    # A run of batch 2 evaluated tiny's 2,048 samples in 1,024 forwards (4.5 minutes in Keras'
    # eager forward). The forward holds no activations for a backward, so evaluation batches
    # are at least EVAL_BATCH samples; eval mode treats samples alone, so the AUC is the one of
    # any batching.
    wl = workloads.get("dlrm_dcnv2")
    cfg = wl.config("tiny")
    model = wl.build("torch", cfg)
    eval_set = wl.eval_set(cfg)
    forward, sizes = wl.forward, []

    def counted(framework, model, batch, **options):
        sizes.append(len(batch["labels"]))
        return forward(framework, model, batch, **options)

    monkeypatch.setattr(wl, "forward", counted)
    auc = wl.evaluate("torch", model, eval_set, batch_size=2)
    assert cfg.eval_samples < EVAL_BATCH and sizes == [cfg.eval_samples]
    pieces = [
        forward("torch", model, {k: v[s : s + 256] for k, v in eval_set.items()})["logits"]
        for s in range(0, cfg.eval_samples, 256)
    ]
    assert abs(auc - roc_auc(np.concatenate(pieces), eval_set["labels"])) < 1e-6
