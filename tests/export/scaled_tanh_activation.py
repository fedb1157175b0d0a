"""An activation defined outside dense_model, for test_export_custom_activation.py: registered
through ``model.activation_modules: [tests.export.scaled_tanh_activation]``, trained, exported, and
run by the exported Hugging Face model from this file's own source."""

import torch

from dense_model.activations import register_activation


@register_activation("test_scaled_tanh")
class ScaledTanh(torch.nn.Module):
    """x + alpha * tanh(x), alpha learnable (starts at 0.5)."""

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor([float(alpha)]))

    def forward(self, x):  # [..., ffn] -> [..., ffn]
        return x + self.alpha * torch.tanh(x)
