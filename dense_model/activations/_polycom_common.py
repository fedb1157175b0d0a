"""What the PolyCom reference (``_polycom.py``) and its fused kernels (``kernels/polycom.py``) share:
the inner functions and the TP group's size. Below both, so neither imports the other for them."""

from __future__ import annotations

import torch.distributed as dist

INNER_FUNCTIONS = ("relu", "norm")


def tp_world_size(group) -> int:
    """Ranks in the TP group; 1 without a group or outside torch.distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)
