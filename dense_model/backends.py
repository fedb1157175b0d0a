"""Which optional fused-kernel packages import on this machine (Transformer Engine, apex, Triton).

Below the model and the MoE layer, which both ask; imports no other dense_model module.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


def transformer_engine_available() -> bool:
    return installed_kernels().transformer_engine and torch.cuda.is_available()


def _imports(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # ImportError, or a CUDA extension whose shared library cannot load
        return False
    return True


@dataclass(frozen=True)
class Kernels:
    """Which optional fused-kernel packages import on this machine (the fusions depend on them)."""

    transformer_engine: bool = False
    apex_softmax: bool = False  # apex's scaled_(upper_triang_)masked_softmax_cuda extensions
    apex_grad_accum: bool = False  # apex's fused_weight_gradient_mlp_cuda extension
    triton: bool = False


@functools.cache
def installed_kernels() -> Kernels:
    softmax = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda", "scaled_softmax_cuda")
    return Kernels(
        transformer_engine=_imports("transformer_engine.pytorch"),
        apex_softmax=all(_imports(m) for m in softmax),
        apex_grad_accum=_imports("fused_weight_gradient_mlp_cuda"),
        triton=_imports("triton"),
    )
