"""Helpers shared by the PolyCom kernel tests and their TP worker processes."""

from __future__ import annotations

import torch

from dense_model.activations.kernels.parity import forward_backward as run  # noqa: F401 (re-exported)


def relative_tolerance(dtype: torch.dtype) -> float:
    """The parity budget: 1e-5 for fp32 inputs, 1e-2 for 16-bit inputs."""
    return 1e-5 if dtype == torch.float32 else 1e-2


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """|a - e| <= rtol * |e| + rtol * max|e| elementwise (relative, floored at the tensor's scale).

    The floor keeps elements that cancel to ~0 (the bias term against the polynomial) from making
    an fp32 rounding difference look like a relative error of 1.
    """
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}"
    )
