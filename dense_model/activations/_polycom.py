"""PolyCom (polynomial composition) activations, the family behind PolyReLU and PolyNorm.

    PolyCom(x) = a0 + sum_{i=1..r} a_i * rho(x)^i      with rho = relu        (PolyReLU)
    PolyCom(x) = a0 + sum_{i=1..r} a_i * N(x^i)        with N(v) = v / sqrt(mean(v^2) + eps)  (PolyNorm)

(ICLR 2025, arXiv 2411.03884; docs/paper.md). The scalars a_1..a_r start at 1/r and a0 at
0; they are 1-D parameters, so the optimizer gives them no weight decay.

Tensor parallelism. fc1 is column-parallel, so each TP rank holds a slice of the FFN dimension.
  * PolyNorm's mean(v^2) runs over the whole FFN row: each rank sums its slice, the per-row sums
    are all-reduced over the TP group (forward), and the gradient flowing into those sums is
    all-reduced too (backward), because every rank's output depends on every rank's slice.
  * The scalars are replicated on every TP rank but each rank only sees its slice's contribution
    to dL/da: their gradient is summed over the TP group (identity forward, all-reduce backward),
    so all TP ranks hold the full gradient and stay identical.
The reference implementation does neither and is only right at TP=1.

Numerics: statistics are computed in fp32 whatever the input dtype (x^6 inside N(x^3) overflows
fp16), and the result is cast back to the input dtype.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dense_model.activations._polycom_common import INNER_FUNCTIONS, tp_world_size


class _AllReduceSumBothWays(torch.autograd.Function):
    """Forward: all-reduce (sum) over the group. Backward: all-reduce (sum) the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SumGradOverGroup(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce (sum) the gradient (replicated parameters)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def load_fused_kernel():
    """The fused Triton kernel (kernels/polycom.py), or None where Triton is missing."""
    try:  # imported on demand: Triton is optional, and the exported model never calls this
        from dense_model.activations.kernels.polycom import polycom_fused
    except ImportError:
        return None
    return polycom_fused


def replicated_coefficients(weight, bias, group, dtype=torch.float32):
    """The scalars as ``dtype`` tensors whose gradient is summed over the TP group."""
    weight, bias = weight.to(dtype), bias.to(dtype)
    if tp_world_size(group) > 1:
        weight = _SumGradOverGroup.apply(weight, group)
        bias = _SumGradOverGroup.apply(bias, group)
    return weight, bias


def polycom_reference(x, weight, bias, *, inner: str, eps: float = 1e-6, tp_group=None):
    """Torch reference of PolyCom over the last dimension (the local FFN slice under TP).

    x: [..., ffn / tp]; weight: [r]; bias: [1]. Returns a tensor like x. Per-row coefficients
    (grouped MoE experts, ``dense_model.moe_experts``): weight [..., r] and bias [..., 1] with x's
    leading dimensions; each row's coefficient gradient is then its own.
    """
    out_dtype = x.dtype
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 at least
    x32 = x.to(compute)  # [..., f]
    w, b = replicated_coefficients(weight, bias, tp_group, compute)
    order = w.shape[-1]
    if inner == "relu":
        r = F.relu(x32)
        power = r
        out = b + w[..., 0:1] * power
        for i in range(1, order):
            power = power * r
            out = out + w[..., i : i + 1] * power
        return out.to(out_dtype)
    if inner == "norm":
        powers = [x32]
        for _ in range(1, order):
            powers.append(powers[-1] * x32)
        sumsq = torch.stack([p.square().sum(dim=-1) for p in powers], dim=-1)  # [..., r]
        width = x.shape[-1] * tp_world_size(tp_group)
        if tp_world_size(tp_group) > 1:
            sumsq = _AllReduceSumBothWays.apply(sumsq, tp_group)
        inv_rms = torch.rsqrt(sumsq / width + eps)  # [..., r]
        out = b
        for i, p in enumerate(powers):
            out = out + w[..., i : i + 1] * (p * inv_rms[..., i : i + 1])
        return out.to(out_dtype)
    raise ValueError(f"unknown PolyCom inner function {inner!r}; choose one of {INNER_FUNCTIONS}")


def fused_kernels_run_on(x: torch.Tensor) -> bool:
    """Triton compiles its kernels for CUDA tensors; its interpreter (TRITON_INTERPRET=1, how the
    CPU tests run them) takes CPU tensors too."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class PolyCom(torch.nn.Module):
    """PolyCom of order r with inner function relu or norm; the base of PolyReLU and PolyNorm."""

    default_inner = "norm"

    def __init__(
        self,
        order: int = 3,
        inner: str | None = None,
        eps: float = 1e-6,
        tp_group=None,
        fused_kernel=None,
    ):
        super().__init__()
        inner = inner or self.default_inner
        if inner not in INNER_FUNCTIONS:
            raise ValueError(f"PolyCom inner={inner!r} is not one of {INNER_FUNCTIONS}")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"PolyCom order must be a positive integer, got {order!r}")
        self.order, self.inner, self.eps = order, inner, float(eps)
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(torch.full((order,), 1.0 / order))  # a_1..a_r
        self.bias = torch.nn.Parameter(torch.zeros(1))  # a_0
        self.fused_kernel = fused_kernel  # load_fused_kernel()'s callable, or None: the reference

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.fill_(1.0 / self.order)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"order={self.order}, inner={self.inner}, eps={self.eps}, tp={tp_world_size(self.tp_group)}"

    def forward(self, x):  # [..., ffn / tp] -> [..., ffn / tp]
        if self.fused_kernel is not None and fused_kernels_run_on(x):
            return self.fused_kernel(
                x, self.weight, self.bias, inner=self.inner, eps=self.eps, tp_group=self.tp_group
            )
        return polycom_reference(
            x, self.weight, self.bias, inner=self.inner, eps=self.eps, tp_group=self.tp_group
        )
