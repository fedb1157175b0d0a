"""MLP activations: a registry of torch references (one file each) with optional fused kernels.

    >>> from dense_model.activations import list_activations, build_activation
    >>> act = build_activation("polynorm")          # PolyNorm, order 3, weights 1/3, bias 0
    >>> y = act(torch.randn(4, 8256))

``build_activation(name, **kw)`` returns an ``nn.Module``; ``is_gated(name)`` says whether its input
is 2x the FFN width. Every module in this package is imported here, so a new activation is one
decorated class in one new file (elsewhere: one file named in ``model.activation_modules``).
"""

import importlib
import pkgutil

from dense_model.activations.registry import (
    ActivationEntry,
    build_activation,
    get_activation_entry,
    import_activation_modules,
    is_gated,
    list_activations,
    register_activation,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in ("registry", "kernels"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "ActivationEntry",
    "build_activation",
    "get_activation_entry",
    "import_activation_modules",
    "is_gated",
    "list_activations",
    "register_activation",
]
