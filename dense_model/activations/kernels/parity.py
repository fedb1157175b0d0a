"""Inputs and error measures for checking the fused PolyCom kernels against the torch reference:
one definition shared by the kernel tests (tests/activations/kernels) and the script that writes
the error table of docs/benchmarks.md (scripts/kernel_errors.py). Imports neither Triton nor the kernels."""

from __future__ import annotations

import torch

GRADIENTS = ("y", "dx", "d_weight", "d_bias")


def parity_inputs(shape, order, dtype, device, seed, param_dtype=torch.float32, scale=1.0):
    """(x, weight [order], bias [1], grad of y) drawn from ``seed`` on the CPU, then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    weight = torch.randn(order, generator=gen).to(param_dtype)
    bias = torch.randn(1, generator=gen).to(param_dtype)
    return x.to(device), weight.to(device), bias.to(device), grad.to(device)


def forward_backward(fn, x, weight, bias, grad, **kw):
    """(y, dx, d weight, d bias) of ``fn(x, weight, bias, **kw)`` on fresh leaves."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = fn(x, weight, bias, **kw)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad, bias.grad


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (0 when both are all zero), computed in fp64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale else diff
