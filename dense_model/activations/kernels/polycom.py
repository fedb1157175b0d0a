"""Fused PolyCom (PolyNorm / PolyReLU) forward and backward: launchers and the autograd Function.

The fast path on GPUs of ``polynorm`` and ``polyrelu`` (their registry loader is
``_polycom.load_fused_kernel``); the torch reference in ``_polycom.py`` stays the fallback and the
test oracle, and this function has exactly its semantics, tensor parallelism included.

What it stores for backward: the input x (already alive: it is fc1's output) and, for PolyNorm,
the per-row inverse RMS in fp32 ([rows, r], 12 bytes per token at r = 3), never the powers.

Data movement (TP=1; a persistent grid of a few programs per SM, each looping over rows, a row
walked in fixed column chunks with one masked tail chunk: ``polycom_triton``'s docstring):
  * forward: one read of x, one write of y (the row's statistics from a first pass over its
    chunks, the output from a second pass that re-reads them from L2);
  * backward: one read of x and of dy, one write of dx; d weight / d bias come from per-program
    partials ([programs, r + 1] fp32) summed by torch afterwards (deterministic, no atomics).
Under TP > 1 (the FFN dimension split over ranks) PolyNorm runs split: a statistics kernel, an
all-reduce (SUM) of the [rows, r] sums over the TP group, then an apply kernel; the backward
likewise all-reduces the [rows, r + 1] moments between its statistics and apply kernels. Since
d weight_k = sum_rows inv_k * D_k and d bias = sum_rows D_0 with D the all-reduced moments (summed
by the apply kernel into the same per-program partials on every rank), every rank ends with the
full, bitwise identical parameter gradient without another collective.
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
    """Launch shape of the PolyCom kernels (untuned defaults: ``scripts/bench_activations.py
    --sweep`` times the alternatives at the 1B widths on a GPU)."""

    block: int = 1024  # column chunk (a power of two); the row's tail is one chunk of next_pow2(rest)
    num_warps: int = 4  # warps per program
    programs_per_sm: int = 4  # persistent grid: this many programs per SM, each looping over rows
    max_programs: int | None = None  # cap on the grid (tests: several rows per program on the CPU)
    force_split: bool = False  # use the TP code path (stats -> all-reduce -> apply) even at TP=1


DEFAULT_CONFIG = PolyComKernelConfig()
CPU_PROGRAMS = 4  # the interpreter's "SMs": enough for several rows per program in the tests


def _pad(order: int) -> int:
    return max(2, triton.next_power_of_2(order + 1))


def _tail(n_cols: int, block: int) -> int:
    """Columns of the masked tail chunk: next_pow2(n_cols % block), 0 when block divides n_cols."""
    rest = n_cols % block
    return triton.next_power_of_2(rest) if rest else 0


_SM_COUNT: dict = {}


def _programs(rows: int, device: torch.device, cfg: PolyComKernelConfig) -> int:
    """Size of the persistent grid: programs_per_sm per SM, at most one per row."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        programs = _SM_COUNT[index] * cfg.programs_per_sm
    else:
        programs = CPU_PROGRAMS
    if cfg.max_programs is not None:
        programs = min(programs, cfg.max_programs)
    return max(1, min(rows, programs))


def _launch(kernel, rows: int, x2, cfg: PolyComKernelConfig, order: int, *args) -> int:
    """Launch a persistent-row kernel over ``rows`` rows; returns the number of programs."""
    programs = _programs(rows, x2.device, cfg)
    n_cols = x2.shape[1]
    kernel[(programs,)](
        *args, ORDER=order, PAD=_pad(order), BLOCK=cfg.block, TAIL=_tail(n_cols, cfg.block),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return programs


def _partials(x2, rows: int, cfg, order: int):
    """[programs, r + 1] fp32 partials buffer (every program writes its row)."""
    return torch.empty(_programs(rows, x2.device, cfg), order + 1, device=x2.device, dtype=torch.float32)


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
    inv_width = 1.0 / max(n_cols * tp, 1)
    if rows == 0:
        return y2, inv
    if tp == 1 and not cfg.force_split:
        if n_cols == 0:  # nothing to normalise: the statistics are 0
            return y2, inv.fill_(eps**-0.5)
        _launch(
            K.polynorm_fwd_fused_kernel, rows, x2, cfg, order,
            x2, y2, inv, weight, bias, rows, n_cols, x2.stride(0), y2.stride(0), inv_width, eps,
        )  # fmt: skip
        return y2, inv
    sumsq = torch.empty(rows, order, device=x2.device, dtype=torch.float32)
    _launch(K.polynorm_fwd_stats_kernel, rows, x2, cfg, order, x2, sumsq, rows, n_cols, x2.stride(0))
    if tp > 1:
        dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=tp_group)
    _launch(
        K.polynorm_fwd_apply_kernel, rows, x2, cfg, order,
        x2, y2, sumsq, inv, weight, bias, rows, n_cols, x2.stride(0), y2.stride(0), inv_width, eps,
    )  # fmt: skip
    return y2, inv


def polynorm_backward(g2, x2, inv, weight, bias, tp_group, cfg):
    """(dx2, d_weight fp32 [r], d_bias fp32 [1]); the parameter grads are the TP-group totals."""
    rows, n_cols = x2.shape
    order = weight.numel()
    tp = tp_world_size(tp_group)
    dx2 = torch.empty_like(x2)
    inv_width = 1.0 / max(n_cols * tp, 1)
    if rows == 0 or n_cols == 0 and tp == 1:
        grads = torch.zeros(order + 1, device=x2.device, dtype=torch.float32)
        return dx2, grads[1:], grads[:1]
    part = _partials(x2, rows, cfg, order)
    if tp == 1 and not cfg.force_split:
        _launch(
            K.polynorm_bwd_fused_kernel, rows, x2, cfg, order,
            x2, g2, dx2, inv, part, weight, bias, rows, n_cols, x2.stride(0), g2.stride(0), dx2.stride(0),
            inv_width,
        )  # fmt: skip
    else:
        mom = torch.empty(rows, order + 1, device=x2.device, dtype=torch.float32)  # m_k = sum g x^k
        if n_cols > 0:
            _launch(
                K.polynorm_bwd_stats_kernel, rows, x2, cfg, order,
                x2, g2, mom, rows, n_cols, x2.stride(0), g2.stride(0),
            )  # fmt: skip
        else:
            mom.zero_()
        if tp > 1:
            dist.all_reduce(mom, op=dist.ReduceOp.SUM, group=tp_group)
        # dL/dw_k = sum_rows inv_k D_k; dL/db = sum_rows D_0, in per-program partials.
        _launch(
            K.polynorm_bwd_apply_kernel, rows, x2, cfg, order,
            x2, g2, dx2, inv, mom, part, weight, bias, rows, n_cols, x2.stride(0), g2.stride(0),
            dx2.stride(0), inv_width,
        )  # fmt: skip
    grads = part.sum(dim=0)  # [r + 1]: d bias, d w_1..d w_r (a fixed order: deterministic)
    return dx2, grads[1:], grads[:1]


def polyrelu_forward(x2, weight, bias, cfg):
    rows, n_cols = x2.shape
    order = weight.numel()
    y2 = torch.empty_like(x2)
    if rows > 0 and n_cols > 0:
        _launch(
            K.polyrelu_fwd_kernel, rows, x2, cfg, order,
            x2, y2, weight, bias, rows, n_cols, x2.stride(0), y2.stride(0),
        )  # fmt: skip
    return y2


def polyrelu_backward(g2, x2, weight, bias, tp_group, cfg):
    rows, n_cols = x2.shape
    order = weight.numel()
    dx2 = torch.empty_like(x2)
    if rows > 0 and n_cols > 0:
        part = _partials(x2, rows, cfg, order)
        _launch(
            K.polyrelu_bwd_kernel, rows, x2, cfg, order,
            x2, g2, dx2, part, weight, bias, rows, n_cols, x2.stride(0), g2.stride(0), dx2.stride(0),
        )  # fmt: skip
        grads = part.sum(dim=0)  # [r + 1]: d bias, d w_1..d w_r
    else:
        grads = torch.zeros(order + 1, device=x2.device, dtype=torch.float32)
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
