"""Plain (non-gated) elementwise activations: gelu, relu, squared_relu, silu."""

import torch
import torch.nn.functional as F

from dense_model.activations.registry import register_activation


@register_activation("gelu")
class GELU(torch.nn.Module):
    """GELU with the exact erf form (megatron-core's default F.gelu)."""

    def forward(self, x):
        return F.gelu(x)


@register_activation("relu")
class ReLU(torch.nn.Module):
    """ReLU."""

    def forward(self, x):
        return F.relu(x)


@register_activation("squared_relu")
class SquaredReLU(torch.nn.Module):
    """relu(x)^2 (Primer, So et al. 2021)."""

    def forward(self, x):
        return F.relu(x).square()


@register_activation("silu")
class SiLU(torch.nn.Module):
    """SiLU / swish: x * sigmoid(x), not gated."""

    def forward(self, x):
        return F.silu(x)
