"""parallel.distributed_timeout_minutes: a collective that a rank never joins fails after that
long, not after torch's default 30 minutes (a hung rank shows as an error while someone watches)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dense_model.testing import spawn_workers


def _one_rank_never_joins(rank: int, world_size: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from dense_model.config import ParallelConfig
    from dense_model.parallel import initialize_parallel_from

    initialize_parallel_from(ParallelConfig(distributed_timeout_minutes=0.05), seed=1)  # 3 s
    done = Path(out) / "rank0.txt"
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "returned"
        except Exception as err:  # noqa: BLE001 - gloo's error type varies by version
            outcome = f"{type(err).__name__}: {err}"
        done.write_text(outcome)
    else:  # stays alive without joining, until rank 0 has its answer (or a minute has passed)
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.mark.slow
def test_a_collective_one_rank_never_joins_times_out_after_the_configured_minutes(tmp_path):
    spawn_workers(_one_rank_never_joins, 2, str(tmp_path))
    outcome = (tmp_path / "rank0.txt").read_text()
    # Timed out, not "connection closed" (which is what the default 30 minutes gives: rank 1 leaves first)
    assert "timed out" in outcome.lower() or "timeout" in outcome.lower(), outcome
