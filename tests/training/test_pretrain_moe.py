"""MoE training end to end, as real torchrun jobs: loss falls, router metrics logged, exact resume
after SIGKILL, EP=2 losses equal one process's; an EP=2 checkpoint resumes at EP=1."""

import json

import pytest

from tests.training.pretrain_jobs import kill_job, launch, read_metrics, trained_ok

pytestmark = pytest.mark.slow

MOE = [
    "model.moe.num_experts=4",
    "model.moe.router_topk=2",
    "model.moe.ffn_hidden_size=32",
    "model.moe.z_loss_coeff=1e-3",
    "parallel.use_distributed_optimizer=false",
]
SHORT = ["training.train_iters=4", "checkpoint.save_interval=1000", "logging.eval_interval=0"]


def test_moe_trains_logs_router_metrics_and_resumes_exactly_after_sigkill(tiny_config):
    config, ref_dir = tiny_config("reference", *MOE)
    trained_ok(config)  # the uninterrupted run: the trainer alone
    reference, _ = read_metrics(ref_dir)
    assert reference[12] < reference[1] - 0.5, reference  # the loss falls
    record = json.loads((ref_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("moe_aux_loss", "moe_z_loss", "expert_load_min", "expert_load_max", "expert_load_entropy"):
        assert key in record, record
    # top-2 of 4 experts: the switch loss is E * sum_e f_e P_e >= 1 (1 when balanced, f_e = 2/E)
    assert 0.9 < record["moe_aux_loss"] < 4
    assert 0 <= record["expert_load_min"] <= 1 <= record["expert_load_max"] <= 4
    assert 0 < record["expert_load_entropy"] <= 1

    config, run_dir = tiny_config("killed", *MOE)
    proc = launch(config)
    for line in proc.stdout:  # kill the whole job right after the step-8 checkpoint is complete
        if "saved checkpoint" in line and "iter_0000008" in line:
            kill_job(proc)
            break
    out = trained_ok(config)
    assert "at step 8" in out
    resumed, _ = read_metrics(run_dir)
    for step in range(9, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bitwise


def test_ep2_matches_single_process(tiny_config):
    """(Expert-TP=2 training, TP=2 with sequence parallelism: tests/test_sequence_parallel.py.)"""
    config, ref_dir = tiny_config("single", *MOE)
    trained_ok(config, *SHORT)
    single, _ = read_metrics(ref_dir)
    config, run_dir = tiny_config("ep2", *MOE)
    trained_ok(config, *SHORT, "parallel.expert_model_parallel_size=2", nproc=2)
    losses, _ = read_metrics(run_dir)
    for step in range(1, 5):
        assert losses[step] == pytest.approx(single[step], rel=1e-5), step


def test_ep2_checkpoint_loads_at_ep1_with_same_validation_loss(tiny_config):
    config, run_dir = tiny_config("reshard", *MOE)
    six = ["training.train_iters=6"]
    trained_ok(config, *six, "parallel.expert_model_parallel_size=2", nproc=2)
    _, valid_ep2 = read_metrics(run_dir)
    out = trained_ok(config, *six, "parallel.expert_model_parallel_size=1")
    assert "at step 6" in out
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert len(lines) == 2 and lines[0]["step"] == lines[1]["step"] == 6
    assert lines[1]["val_loss"] == pytest.approx(valid_ep2[6], rel=1e-5)
