"""data.repetition_filter in the trainer's batches: a caught sample gets loss mask 0 (the loss is
the other samples' loss) and is counted for the log."""

from __future__ import annotations

import json

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import spawn_workers, tiny_model_overrides
from tests.training.pretrain_jobs import trained_ok

SEQ = 64


def _samples() -> list[dict]:
    """Four samples; sample 2 repeats a period-7 unit 9 times (63 tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(4):
        tokens = torch.randint(1, 256, (SEQ + 1,), generator=g)
        if i == 2:
            tokens[:63] = torch.arange(10, 17).repeat(9)
        out.append(
            {
                "tokens": tokens[:-1],
                "labels": tokens[1:],
                "loss_mask": torch.ones(SEQ),
                "position_ids": torch.arange(SEQ),
            }
        )
    return out


def _filtered_batches(rank: int, world_size: int, out_file: str) -> None:
    from dense_model.parallel import initialize_parallel
    from dense_model.training.batches import batch_iterator
    from dense_model.training.step import loss_func

    initialize_parallel(1, 1, seed=5)
    result = {}
    for enabled in (True, False):
        cfg = load_config(
            None,
            [
                *tiny_model_overrides(layers=1, vocab=256, seq=SEQ),
                "training.global_batch_size=4",
                "training.micro_batch_size=4",
                f"data.repetition_filter.enabled={str(enabled).lower()}",
                "data.repetition_filter.max_count=9",
            ],
        )
        batches = batch_iterator(
            _samples(), cfg, 0, num_workers=0, device=torch.device("cpu"), filter_repeats=True
        )
        batch = next(batches)
        losses = torch.rand(4, SEQ, generator=torch.Generator().manual_seed(1))  # per-token losses [b, s]
        total, count, _ = loss_func(batch["loss_mask"], losses)
        result[enabled] = {
            "mask": batch["loss_mask"],
            "loss": float(total / count),
            "filtered": batches.take_filtered(),
            "keys": sorted(batch),
            "losses": losses,
        }
    torch.save(result, out_file)


def test_a_repetitive_sample_adds_nothing_to_the_loss_and_is_counted(tmp_path):
    out = tmp_path / "r.pt"
    spawn_workers(_filtered_batches, 1, str(out))
    r = torch.load(out)
    on, off = r[True], r[False]
    assert on["filtered"] == 1 and off["filtered"] == 0
    assert on["mask"][2].sum() == 0 and torch.equal(on["mask"][[0, 1, 3]], torch.ones(3, SEQ))
    assert torch.equal(off["mask"], torch.ones(4, SEQ))
    others = on["losses"][[0, 1, 3]].mean().item()
    assert abs(on["loss"] - others) < 1e-6 and abs(off["loss"] - on["losses"].mean().item()) < 1e-6
    assert on["keys"] == off["keys"] == ["labels", "loss_mask", "position_ids", "tokens"]


@pytest.mark.slow
def test_filtered_instances_are_logged_summed_over_data_parallel_ranks(tiny_config):
    """max_count 1 catches every sample: each step logs the whole global batch (8), counted on two
    data-parallel ranks (4 each) and summed, and an all-masked batch's loss is 0."""
    config, run_dir = tiny_config(
        "filter",
        "training.train_iters=3",
        "checkpoint.save_interval=100",
        "data.repetition_filter.enabled=true",
        "data.repetition_filter.max_period=1",
        "data.repetition_filter.max_count=1",
    )
    trained_ok(config, nproc=2)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "filtered_instances" in r]
    assert [r["step"] for r in train] == [1, 2, 3], records
    assert all(r["filtered_instances"] == 8 and r["loss"] == 0.0 for r in train), train
