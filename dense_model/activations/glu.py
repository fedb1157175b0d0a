"""Gated linear units: swiglu, geglu, reglu.

The input is fc1's output of width 2 x FFN laid out as megatron-core lays it out for a gated MLP
(each TP rank holds its [gate, up] halves), so the split is a local chunk under any TP size.
"""

import torch
import torch.nn.functional as F

from dense_model.activations.registry import register_activation


class _GLU(torch.nn.Module):
    inner = staticmethod(F.silu)

    def forward(self, x):  # [..., 2 * ffn] -> [..., ffn]
        gate, up = torch.chunk(x, 2, dim=-1)
        return self.inner(gate) * up


@register_activation("swiglu", gated=True)
class SwiGLU(_GLU):
    """silu(gate) * up (Shazeer 2020); the Llama MLP."""

    inner = staticmethod(F.silu)


@register_activation("geglu", gated=True)
class GEGLU(_GLU):
    """gelu(gate) * up."""

    inner = staticmethod(F.gelu)


@register_activation("reglu", gated=True)
class ReGLU(_GLU):
    """relu(gate) * up."""

    inner = staticmethod(F.relu)
