"""The project's own small collectives: flags, scalars and broadcasts from the last pipeline stage.

On GPUs the default process group (and megatron-core's groups) is NCCL, which has no CPU backend: a
collective on a CPU tensor fails with "No backend type associated with device type cpu". gloo takes
both, so CPU tests cannot see that mistake. Every tensor built here for a collective is therefore
allocated on ``communication_device(group)`` (CUDA for NCCL, CPU for gloo), and the rest of the
package calls these helpers instead of ``torch.distributed`` collectives
(``tests/test_collectives.py`` scans the package to keep it so).

    any_rank(flag)                      # True on every rank if it is True on one
    all_reduce_max([a, b])              # element-wise max of a few numbers over a group
    sum_over_group(tensor, group)       # in-place sum of an existing tensor (e.g. loss sums)
    broadcast_from_last_stage(value)    # a number known on the last PP stage, on every stage
    all_gather_objects(obj, group)      # every rank's picklable object, in rank order
    broadcast_object(obj, src, group)   # one rank's picklable object on every rank
    send(tensor, dst, group); recv_into(tensor, src, group); broadcast_tensor(tensor, src, group)
    barrier()                           # no-op without torch.distributed
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def device_for_backend(backend: str) -> torch.device:
    """The device a collective over a group with this backend must use ("nccl" -> this rank's GPU)."""
    backend = backend.lower()
    # A group built with both ("cpu:gloo,cuda:nccl") can take CPU tensors: prefer the CPU then.
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda")  # the current device, set from LOCAL_RANK by initialize_parallel
    return torch.device("cpu")


def communication_device(group=None) -> torch.device:
    """Where tensors for a collective over ``group`` (None: the default group) must live."""
    return device_for_backend(str(dist.get_backend(group)))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_max_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Element-wise max of ``tensor`` over ``group`` (a copy, on the group's device)."""
    staged = tensor.to(communication_device(group), copy=True) if _initialized() else tensor.clone()
    if _initialized():
        dist.all_reduce(staged, op=dist.ReduceOp.MAX, group=group)
    return staged


def all_reduce_max(values: list[float], group=None) -> list[float]:
    """Element-wise max of a few numbers over ``group``; one collective for all of them."""
    return all_reduce_max_tensor(torch.tensor(values, dtype=torch.float64), group).tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when ``flag`` is True on at least one."""
    return all_reduce_max([1.0 if flag else 0.0], group)[0] > 0


def sum_over_group(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group``, moved to the group's device and back if needed."""
    if not _initialized():
        return tensor
    device = communication_device(group)
    staged = tensor.to(device)
    dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def send(tensor: torch.Tensor, dst: int, group=None) -> None:
    """Point-to-point send of ``tensor`` to global rank ``dst`` (staged on the group's device)."""
    dist.send(tensor.to(communication_device(group)).contiguous(), dst, group=group)


def recv_into(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Receive into ``tensor`` (its shape and dtype) from global rank ``src``; returns it."""
    staged = tensor.to(communication_device(group))
    dist.recv(staged, src, group=group)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def broadcast_tensor(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` into ``tensor`` on every rank of ``group``; returns it."""
    if not _initialized():
        return tensor
    staged = tensor.to(communication_device(group))
    dist.broadcast(staged, src, group=group)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def broadcast_from_last_stage(value: float | None) -> float:
    """A number known on the last pipeline stage (the loss), on every stage (0.0 elsewhere: unused)."""
    from megatron.core import parallel_state as ps

    value = 0.0 if value is None else float(value)
    if not _initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    group = ps.get_pipeline_model_parallel_group()
    t = torch.tensor([value], dtype=torch.float64, device=communication_device(group))
    dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(), group=group)
    return t.item()


def all_gather_objects(obj, group=None) -> list:
    """[each rank's ``obj``] over ``group`` in group-rank order (picklable objects; [obj] alone).
    torch pickles them onto the group's device itself (the current GPU for NCCL)."""
    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj, src: int, group=None):
    """Global rank ``src``'s picklable ``obj`` on every rank of ``group`` (``obj`` alone without
    torch.distributed); torch pickles it onto the group's device itself (broadcast_object_list)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if _initialized():
        if device_for_backend(str(dist.get_backend(group))).type == "cuda":
            # NCCL's barrier guesses the device from the rank; name it so it cannot guess wrong.
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


def rank() -> int:
    return dist.get_rank() if _initialized() else 0
