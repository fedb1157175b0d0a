"""megatron-core's gradient-norm and gradient-scale ops on torch's foreach kernels, when neither
Transformer Engine nor apex provides its multi-tensor kernels.

Without them megatron-core 0.16.1 falls back to ``megatron.core.utils.local_multi_tensor_l2_norm``,
which builds ``torch.tensor([norm_0, norm_1, ...])`` from per-tensor norms on the device: one
device-to-host copy (a host sync) per gradient tensor per step, about 220 at the 1B shapes, then a
fresh device tensor from a Python float. The foreach version below keeps everything on the device
(``torch._foreach_norm``: one launch over all tensors); the only host read left is the one
megatron's ``get_grad_norm_fp32`` itself does for the total. The scale (gradient clipping, and the
main-to-model parameter copy) becomes one ``torch._foreach_mul_`` instead of a loop.

The Adam fallback needs nothing here: megatron-core builds ``torch.optim.AdamW`` with
``foreach=None``, which on CUDA already takes torch's multi-tensor path.

``install()`` swaps the ops in megatron-core's modules once, and only where the local fallback is
in use; with TE or apex nothing changes.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s contract: ([1] total L2 norm in fp32 on the tensors' device,
    per-tensor norms [n] or None), without reading anything to the host."""
    norms = torch._foreach_norm(tensor_lists[0], 2.0, dtype=torch.float32)  # n x []
    stacked = torch.stack(norms)  # [n]
    total = torch.linalg.vector_norm(stacked).reshape(1)  # [1]
    return total, (stacked if per_tensor else None)


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``: dst = src * scale for every pair (in place when dst is src)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale) if scale != 1.0 else src)


def install() -> bool:
    """Point megatron-core's clip_grads and optimizer modules at the foreach ops when they use the
    local fallback. Returns whether anything was swapped."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    swapped = False
    if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
        swapped = True
    for module in (clip_grads, moptimizer):
        if module.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
            swapped = True
    return swapped or clip_grads.l2_norm_impl is foreach_l2_norm


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values into Python that a step makes (on a GPU each one is a
    host sync): ``item()``, ``float()``/``int()``/``bool()``, ``tolist()``, and ``torch.tensor``
    built from (nested) lists of tensors (one read per element). Measures syncs on the CPU, where there
    are none to time: ``with HostReads() as reads: ...; reads.count``."""

    _READS = (
        torch.Tensor.item,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__bool__,
        torch.Tensor.tolist,
    )

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._READS:
            self.count += 1
        elif func is torch.tensor and args:
            self.count += _tensors_in(args[0])
        return func(*args, **(kwargs or {}))


def _tensors_in(data) -> int:
    """Tensors in a (nested) list or tuple: the elements torch.tensor reads one by one."""
    if isinstance(data, list | tuple):
        return sum(_tensors_in(x) for x in data)
    return int(isinstance(data, torch.Tensor))
