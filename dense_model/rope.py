"""Fused rotary position embedding without Transformer Engine: one Triton kernel per direction.

megatron-core applies RoPE through ``rope_utils.apply_rotary_pos_emb``. With
``config.apply_rope_fusion`` it calls the module global ``rope_utils.fused_apply_rotary_pos_emb(t,
freqs, interleaved=config.rotary_interleaved)``, which is Transformer Engine's when TE imports and
None otherwise (and ``TransformerConfig`` then refuses ``apply_rope_fusion``). Without TE, the
unfused path is about a dozen elementwise kernels per query/key tensor, forward and backward.

    backend = rope_fusion_backend(cfg.model.rope_fusion, device, installed_kernels())
    if backend == "triton":
        install_rope_fusion()        # before TransformerConfig(apply_rope_fusion=True)

``fused_apply_rotary_pos_emb`` has the semantics of megatron-core's unfused
``_apply_rotary_pos_emb_bshd`` (mscale 1, no multi-latent attention): ``t`` is [s, b, h, d] (any
strides), ``freqs`` is [s', 1, 1, d_rot] with s' >= s (its first s rows are used, as TE does) and an
even d_rot <= d; the first d_rot channels are rotated (halves, or even/odd pairs when
``interleaved``), the rest pass through. cos and sin are computed in fp32 from ``freqs`` and the
result is rounded once to ``t``'s dtype (the unfused path rounds cos/sin to ``t``'s dtype first: bf16
results differ by a rounding). The backward is the transposed rotation,
``dt = g * cos(f) - rotate(g * sin(f))``, in the same kernel; ``freqs`` gets no gradient (megatron's
are a buffer). Only the ``sbhd`` layout: packed sequences (``thd``) need TE's function, and TE is
what ``attention_backend=te`` needs anyway.

The kernel is defined on first use, so that a process that never runs it needs no Triton, and the
tests can define it under Triton's interpreter (``TRITON_INTERPRET=1``) to run it on CPU tensors.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from dense_model.backends import Kernels
from dense_model.config.checks import ConfigError

RopeFusion = Literal["te", "triton"]


def rope_fusion_backend(setting: bool | str, device: torch.device, kernels: Kernels) -> RopeFusion | None:
    """Which fused RoPE ``model.rope_fusion`` (auto, true, false) gets for a model on ``device`` with
    the ``kernels`` installed: Transformer Engine's where TE imports, else ours (Triton), else none.
    auto = on wherever one can run (a CUDA device); true where none can run is a ConfigError."""
    if setting is False or setting == "false":
        return None
    if setting not in (True, "true", "auto"):
        raise ConfigError(f"model.rope_fusion must be auto, true or false, got {setting!r}")
    if device.type == "cuda" and kernels.transformer_engine:
        return "te"
    if device.type == "cuda" and kernels.triton:
        return "triton"
    if setting == "auto":
        return None
    why = (
        f"the model runs on {device.type}"
        if device.type != "cuda"
        else "neither Transformer Engine nor Triton imports"
    )
    raise ConfigError(
        f"model.rope_fusion=true but no fused RoPE can run here ({why}): it needs a CUDA GPU with "
        "Transformer Engine or Triton; set model.rope_fusion=auto (fused where it can run) or false"
    )


def install_rope_fusion() -> bool:
    """Make ours megatron-core's ``rope_utils.fused_apply_rotary_pos_emb`` unless one is already
    there (Transformer Engine's, or ours). True when ours is the one installed now."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    return rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb


def fused_apply_rotary_pos_emb(
    t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False, interleaved: bool = False
) -> torch.Tensor:
    """RoPE on ``t`` [s, b, h, d] with ``freqs`` [s' >= s, 1, 1, d_rot]: megatron-core's
    ``fused_apply_rotary_pos_emb`` call (``transpose_output_memory`` is ignored, as TE ignores it:
    the output is a new contiguous [s, b, h, d] tensor)."""
    if transpose_output_memory:
        warnings.warn("transpose_output_memory is ignored by dense_model's fused RoPE", stacklevel=2)
    _check(t, freqs)
    return _FusedRoPE.apply(t, freqs, bool(interleaved))


def _check(t: torch.Tensor, freqs: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"fused RoPE takes t as [s, b, h, d] (sbhd), got shape {tuple(t.shape)}")
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"fused RoPE takes freqs as [s, 1, 1, d_rot], got shape {tuple(freqs.shape)}")
    s, d, d_rot = t.shape[0], t.shape[-1], freqs.shape[-1]
    if freqs.shape[0] < s:
        raise ValueError(f"fused RoPE: freqs has {freqs.shape[0]} positions, t has {s}")
    if d_rot % 2 or d_rot > d:
        raise ValueError(f"fused RoPE: the rotary dim {d_rot} must be even and at most t's last dim {d}")
    if t.device != freqs.device:
        raise ValueError(f"fused RoPE: t is on {t.device}, freqs on {freqs.device}")


class _FusedRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs, interleaved):
        ctx.save_for_backward(freqs)
        ctx.interleaved = interleaved
        return _launch(t, freqs, interleaved, backward=False)

    @staticmethod
    @once_differentiable  # the kernel's output has no graph of its own
    def backward(ctx, grad):
        (freqs,) = ctx.saved_tensors
        return _launch(grad, freqs, ctx.interleaved, backward=True), None, None


def _launch(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool, backward: bool) -> torch.Tensor:
    """One pass of the kernel: y = R x (forward) or R^T x (backward), R the rotation of ``freqs``."""
    import triton

    if x.stride(-1) != 1:
        x = x.contiguous()
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    s, b, h, d = x.shape
    d_rot = freqs.shape[-1]
    y = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    rows = b * h
    if y.numel() == 0:
        return y
    block_d = triton.next_power_of_2(d)
    block_r = min(triton.next_power_of_2(rows), max(1, 2048 // block_d))
    grid = (s, triton.cdiv(rows, block_r))
    _kernel()[grid](
        x, freqs, y, rows, h,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        freqs.stride(0), d, d_rot,
        INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=4,
    )  # fmt: skip
    return y


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(
        x_ptr, f_ptr, y_ptr, rows, heads,
        sx_s, sx_b, sx_h, sy_s, sy_b, sy_h, sf_s, d, d_rot,
        INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One position (program_id 0) and BLOCK_R of its b * h rows (program_id 1), whole rows.
        pos = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_D)
        row_ok = r < rows
        rot = col < d_rot
        bi = (r // heads).to(tl.int64)
        hi = (r % heads).to(tl.int64)
        x_row = pos * sx_s + bi * sx_b + hi * sx_h
        y_row = pos * sy_s + bi * sy_b + hi * sy_h
        # rotate(x)[j] = sign[j] * x[partner[j]]: halves [-x2, x1], or pairs [-x_odd, x_even].
        half = d_rot // 2
        if INTERLEAVED:
            partner = col ^ 1
            first = (col % 2) == 0
        else:
            partner = tl.where(col < half, col + half, col - half)
            first = col < half
        sign = tl.where(first, -1.0, 1.0)
        angle = tl.load(f_ptr + pos * sf_s + col, mask=rot, other=0.0).to(tl.float32)
        cos = tl.cos(angle)
        if BACKWARD:  # dt = g cos(f) - rotate(g sin(f)): the partner's angle, the opposite sign
            partner_angle = tl.load(f_ptr + pos * sf_s + partner, mask=rot, other=0.0).to(tl.float32)
            sin = -tl.sin(partner_angle)
        else:
            sin = tl.sin(angle)
        mask = row_ok[:, None] & (col < d)[None, :]
        x = tl.load(x_ptr + x_row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(
            x_ptr + x_row[:, None] + partner[None, :], mask=row_ok[:, None] & rot[None, :], other=0.0
        ).to(tl.float32)
        out = tl.where(rot[None, :], x * cos[None, :] + (sign * sin)[None, :] * x_partner, x)
        tl.store(y_ptr + y_row[:, None] + col[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)

    return rope_kernel
