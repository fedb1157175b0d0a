"""Fused PolyCom (PolyNorm / PolyReLU) forward and backward: launchers and the autograd Function.

The fast path on GPUs of ``polynorm`` and ``polyrelu`` (their registry loader is
``_polycom.load_fused_kernel``); the torch reference in ``_polycom.py`` stays the fallback and the
test oracle, and this function has exactly its semantics, tensor parallelism included.

What it stores for backward: the input x (already alive: it is fc1's output) and, for PolyNorm,
the per-row inverse RMS in fp32 ([rows, r], 12 bytes per token at r = 3), never the powers.

Data movement (TP=1, one program per row):
  * forward: one read of x, one write of y (the row's statistics are reduced in registers, or over
    column tiles re-read from L2 when a row is longer than ``max_fused_block``);
  * backward: one read of x and of dy, one write of dx; d weight / d bias come from per-row
    moments ([rows, r + 1] fp32) summed by torch afterwards (deterministic, no atomics).
Under TP > 1 (the FFN dimension split over ranks) PolyNorm runs split: a statistics kernel, an
all-reduce (SUM) of the [rows, r] sums over the TP group, then an apply kernel; the backward
likewise all-reduces the [rows, r + 1] moments between its statistics and apply kernels. Since
d weight_k = sum_rows inv_k * D_k and d bias = sum_rows D_0 with D the all-reduced moments, every
rank ends with the full, bitwise identical parameter gradient without another collective.
PolyReLU is elementwise; only its [r + 1] parameter gradient is all-reduced.

Runs on CPU tensors too under ``TRITON_INTERPRET=1`` (how the tests check it); without Triton,
importing this module raises ImportError and the model falls back to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton  # ImportError here is load_fused_kernel's signal to fall back to the torch reference

from dense_model.activations._polycom_common import INNER_FUNCTIONS, tp_world_size
from dense_model.activations.kernels import polycom_triton as K


@dataclass(frozen=True)
class PolyComKernelConfig:
    """Tile sizes of the PolyCom kernels (untuned defaults; ``scripts/bench_activations.py`` sweeps them)."""

    max_fused_block: int = 16384  # rows up to this many columns are held in registers (one HBM read)
    loop_block: int = 4096  # column tile of the per-row kernels when a row is longer
    apply_block: int = 2048  # column tile of the 2-D (rows x tiles) elementwise kernels
    row_num_warps: int | None = None  # warps of the per-row kernels; None = by tile size
    force_split: bool = False  # use the TP code path (stats -> all-reduce -> apply) even at TP=1


DEFAULT_CONFIG = PolyComKernelConfig()


def _num_warps(block: int) -> int:
    # ~16-32 fp32 values per thread per live row tile: 4 warps at 2048 columns, 16 at 8192+.
    return max(4, min(16, block // 512))


def _pad(order: int) -> int:
    return max(2, triton.next_power_of_2(order + 1))


def _row_tile(n_cols: int, cfg: PolyComKernelConfig) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_TILE, num_warps) for the one-program-per-row kernels."""
    full = triton.next_power_of_2(max(n_cols, 1))
    block, single = (full, True) if full <= cfg.max_fused_block else (min(cfg.loop_block, full), False)
    return block, single, cfg.row_num_warps or _num_warps(block)


def _apply_tile(n_cols: int, cfg: PolyComKernelConfig) -> int:
    return min(cfg.apply_block, triton.next_power_of_2(max(n_cols, 1)))


# ----------------------------------------------------------------------------------------------
# Launchers: x2 is [rows, n_cols] with unit column stride
# ----------------------------------------------------------------------------------------------


def polynorm_forward(x2, weight, bias, eps, tp_group, cfg):
    """(y2, inv): y2 like x2, inv [rows, r] fp32."""
    rows, n_cols = x2.shape
    order = weight.numel()
    tp = tp_world_size(tp_group)
    y2 = torch.empty_like(x2)
    inv = torch.empty(rows, order, device=x2.device, dtype=torch.float32)
    if tp == 1 and not cfg.force_split:
        if rows > 0:
            block, single, warps = _row_tile(n_cols, cfg)
            K.polynorm_fwd_fused_kernel[(rows,)](
                x2, y2, inv, weight, bias, n_cols, x2.stride(0), y2.stride(0), 1.0 / max(n_cols, 1), eps,
                ORDER=order, PAD=_pad(order), BLOCK=block, SINGLE_TILE=single, num_warps=warps,
            )  # fmt: skip
        return y2, inv
    sumsq = torch.zeros(rows, order, device=x2.device, dtype=torch.float32)
    if rows > 0 and n_cols > 0:
        block = min(cfg.loop_block, triton.next_power_of_2(n_cols))
        K.polynorm_fwd_stats_kernel[(rows,)](
            x2, sumsq, n_cols, x2.stride(0),
            ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    if tp > 1:
        dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=tp_group)
    torch.rsqrt(sumsq / (n_cols * tp) + eps, out=inv)  # [rows, r]
    if rows > 0 and n_cols > 0:
        block = _apply_tile(n_cols, cfg)
        K.polynorm_fwd_apply_kernel[(rows, triton.cdiv(n_cols, block))](
            x2, y2, inv, weight, bias, n_cols, x2.stride(0), y2.stride(0),
            ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return y2, inv


def polynorm_backward(g2, x2, inv, weight, bias, tp_group, cfg):
    """(dx2, d_weight fp32 [r], d_bias fp32 [1]); the parameter grads are the TP-group totals."""
    rows, n_cols = x2.shape
    order = weight.numel()
    tp = tp_world_size(tp_group)
    dx2 = torch.empty_like(x2)
    mom = torch.zeros(rows, order + 1, device=x2.device, dtype=torch.float32)  # m_k = sum g x^k
    inv_width = 1.0 / max(n_cols * tp, 1)
    if tp == 1 and not cfg.force_split:
        if rows > 0:
            block, single, warps = _row_tile(n_cols, cfg)
            K.polynorm_bwd_fused_kernel[(rows,)](
                x2, g2, dx2, inv, mom, weight, bias, n_cols, x2.stride(0), g2.stride(0), dx2.stride(0),
                inv_width, ORDER=order, PAD=_pad(order), BLOCK=block, SINGLE_TILE=single, num_warps=warps,
            )  # fmt: skip
    else:
        if rows > 0 and n_cols > 0:
            block = min(cfg.loop_block, triton.next_power_of_2(n_cols))
            K.polynorm_bwd_stats_kernel[(rows,)](
                x2, g2, mom, n_cols, x2.stride(0), g2.stride(0),
                ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
            )  # fmt: skip
        if tp > 1:
            dist.all_reduce(mom, op=dist.ReduceOp.SUM, group=tp_group)
        if rows > 0 and n_cols > 0:
            block = _apply_tile(n_cols, cfg)
            K.polynorm_bwd_apply_kernel[(rows, triton.cdiv(n_cols, block))](
                x2, g2, dx2, inv, mom, weight, bias, n_cols, x2.stride(0), g2.stride(0), dx2.stride(0),
                inv_width, ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
            )  # fmt: skip
    # dL/dw_k = sum_rows sum_j g x^k inv_k = sum_rows inv_k D_k; dL/db = sum_rows D_0.
    d_weight = (inv * mom[:, 1:]).sum(dim=0)  # [r]
    d_bias = mom[:, :1].sum(dim=0)  # [1]
    return dx2, d_weight, d_bias


def polyrelu_forward(x2, weight, bias, cfg):
    rows, n_cols = x2.shape
    order = weight.numel()
    y2 = torch.empty_like(x2)
    if rows > 0 and n_cols > 0:
        block = _apply_tile(n_cols, cfg)
        K.polyrelu_fwd_kernel[(rows, triton.cdiv(n_cols, block))](
            x2, y2, weight, bias, n_cols, x2.stride(0), y2.stride(0),
            ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return y2


def polyrelu_backward(g2, x2, weight, bias, tp_group, cfg):
    rows, n_cols = x2.shape
    order = weight.numel()
    dx2 = torch.empty_like(x2)
    block = _apply_tile(n_cols, cfg)
    n_tiles = triton.cdiv(n_cols, block)
    part = torch.zeros(rows, n_tiles, order + 1, device=x2.device, dtype=torch.float32)
    if rows > 0 and n_cols > 0:
        K.polyrelu_bwd_kernel[(rows, n_tiles)](
            x2, g2, dx2, part, weight, bias, n_cols, n_tiles, x2.stride(0), g2.stride(0), dx2.stride(0),
            ORDER=order, PAD=_pad(order), BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    grads = part.sum(dim=(0, 1))  # [r + 1]: d bias, d w_1..d w_r
    if tp_world_size(tp_group) > 1:
        dist.all_reduce(grads, op=dist.ReduceOp.SUM, group=tp_group)
    return dx2, grads[1:], grads[:1]


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class PolyComFunction(torch.autograd.Function):
    """y = PolyCom(x; weight, bias) over the last dim; x [..., f], weight [r], bias [1]."""

    @staticmethod
    def forward(ctx, x, weight, bias, inner, eps, tp_group, cfg):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # [rows, f]; a view when x is contiguous
        w = weight.detach().contiguous()
        b = bias.detach().contiguous()
        if inner == "norm":
            y2, inv = polynorm_forward(x2, w, b, float(eps), tp_group, cfg)
            ctx.save_for_backward(x2, w, b, inv)
        else:
            y2 = polyrelu_forward(x2, w, b, cfg)
            ctx.save_for_backward(x2, w, b)
        ctx.inner, ctx.tp_group, ctx.cfg, ctx.shape = inner, tp_group, cfg, shape
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return y2.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        shape = ctx.shape
        g2 = grad_out.reshape(-1, shape[-1]).contiguous()  # [rows, f]
        if ctx.inner == "norm":
            x2, w, b, inv = ctx.saved_tensors
            dx2, dw, db = polynorm_backward(g2, x2, inv, w, b, ctx.tp_group, ctx.cfg)
        else:
            x2, w, b = ctx.saved_tensors
            dx2, dw, db = polyrelu_backward(g2, x2, w, b, ctx.tp_group, ctx.cfg)
        dx = dx2.view(shape) if ctx.needs_input_grad[0] else None
        dw = dw.to(ctx.param_dtypes[0]) if ctx.needs_input_grad[1] else None
        db = db.to(ctx.param_dtypes[1]) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def polycom_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    inner: str,
    eps: float = 1e-6,
    tp_group=None,
    config: PolyComKernelConfig | None = None,
) -> torch.Tensor:
    """Fused PolyCom over the last dim of x ([..., ffn / tp]); same semantics as ``polycom_reference``.

    weight [r] (any r >= 1) and bias [1] may be fp32 or bf16; their grads come back in their dtype.
    ``tp_group``: the tensor-parallel group the FFN dimension is split over (None or size 1: no TP).
    """
    if inner not in INNER_FUNCTIONS:
        raise ValueError(f"unknown PolyCom inner function {inner!r}; choose one of {INNER_FUNCTIONS}")
    if weight.dim() != 1 or weight.numel() < 1 or bias.numel() != 1:
        raise ValueError(
            f"PolyCom expects weight [r] and bias [1], got {tuple(weight.shape)}, {tuple(bias.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"PolyCom input must be a float tensor, got {x.dtype}")
    return PolyComFunction.apply(x, weight, bias, inner, eps, tp_group, config or DEFAULT_CONFIG)
