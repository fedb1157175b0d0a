"""The activation registry: name -> entry (the module class and what the model hands it).

Adding an activation is one decorated class in one file::

    @register_activation("my_act", gated=False)
    class MyAct(nn.Module):
        def forward(self, x):  # [..., ffn]  (gated: [..., 2 * ffn] -> [..., ffn])
            ...

The decorator is the whole protocol: the model (``dense_model.mlp.RegistryActivation``) builds
``cls(**model.activation_kwargs)`` plus ``tp_group=`` if ``takes_tp_group`` (the output needs the
whole FFN row, or parameters are replicated over TP ranks) and ``fused_kernel=`` if ``fused`` is
given: a loader called at model build on GPU machines that returns the fast path, or None where its
dependency (Triton) is missing; None too when ``model.fused_activation`` is off. Files of this
package are imported with it; others are named in ``model.activation_modules``. Names are unique.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

FusedLoader = Callable[[], Callable | None]  # returns the fast path, or None where it cannot run


@dataclass(frozen=True)
class ActivationEntry:
    """One registered activation."""

    name: str
    cls: type[torch.nn.Module]
    gated: bool  # the input is 2x the FFN width: [gate, up] halves, like megatron's GLU layout
    takes_tp_group: bool  # the constructor takes tp_group=
    fused: FusedLoader | None  # the constructor takes fused_kernel=


_REGISTRY: dict[str, ActivationEntry] = {}


def register_activation(name: str, *, gated=False, takes_tp_group=False, fused: FusedLoader | None = None):
    """Class decorator that registers an activation under ``name`` (see the module docstring)."""

    def decorate(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(
                f"activation {name!r} is already registered by {_REGISTRY[name].cls.__module__}."
                f"{_REGISTRY[name].cls.__qualname__}; pick another name for {cls.__qualname__}"
            )
        _REGISTRY[name] = ActivationEntry(name, cls, gated, takes_tp_group, fused)
        return cls

    return decorate


def import_activation_modules(modules: Iterable[str]) -> None:
    """Import the modules that register activations from outside this package (``model.activation_modules``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(
                f"model.activation_modules: cannot import {module!r} ({err}); "
                "put its folder on PYTHONPATH or fix the module name"
            ) from None


def list_activations() -> list[str]:
    """Names of all registered activations, sorted."""
    return sorted(_REGISTRY)


def get_activation_entry(name: str) -> ActivationEntry:
    """The registry entry for ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known activations: {', '.join(list_activations())} "
            "(an activation defined outside dense_model needs its module in model.activation_modules)"
        ) from None


def is_gated(name: str) -> bool:
    """Whether the activation's input is twice the FFN width (GLU family)."""
    return get_activation_entry(name).gated


def build_activation(name: str, **kwargs) -> torch.nn.Module:
    """Instantiate the activation ``name`` with its keyword arguments (e.g. ``order=3``)."""
    entry = get_activation_entry(name)
    try:
        return entry.cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"activation {name!r} does not take arguments {sorted(kwargs)}: {err}") from None
