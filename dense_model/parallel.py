"""Process groups: torch.distributed + megatron-core's model-parallel groups.

NCCL on GPUs, gloo on the CPU (where the CPU layer in ``dense_model.compat.cpu`` is switched on
first). Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and as a single
process with no launcher at all (world size 1).
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports the activation registry (torch); only the type is needed here
    from dense_model.config import ParallelConfig

import torch
import torch.distributed as dist

from dense_model.compat import enable_cpu_mode


def initialize_parallel_from(parallel: ParallelConfig, seed: int) -> None:
    """``initialize_parallel`` with the sizes of a config's ``parallel`` section (TP, PP, EP, expert TP)."""
    initialize_parallel(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        seed=seed,
        timeout_minutes=parallel.distributed_timeout_minutes,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> None:
    """Start torch.distributed (if needed), megatron's parallel groups and the model-parallel RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_cpu = enable_cpu_mode()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if world_size == 1 else "29500")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            # MoE: experts over EP ranks, each expert's FFN over expert-TP ranks (None = TP)
            expert_model_parallel_size=expert_model_parallel_size,
            expert_tensor_parallel_size=expert_tensor_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
