"""The activation registry: name -> entry (torch reference class, gated or not, optional fused kernel).

Adding an activation is one decorated class in one file of this package::

    @register_activation("my_act", gated=False)
    class MyAct(nn.Module):
        def forward(self, x):  # [..., ffn]  (gated: [..., 2 * ffn] -> [..., ffn])
            ...

Every module of ``dense_model.activations`` is imported when the package is, so nothing else is
edited. Names are unique: registering a name twice raises.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationEntry:
    """One registered activation."""

    name: str
    cls: type[torch.nn.Module]
    gated: bool  # the input is 2x the FFN width: [gate, up] halves, like megatron's GLU layout
    fused: str | None  # "module:function" of an optional fused (Triton) fast path, imported lazily
    summary: str

    def load_fused(self):
        """The fused kernel's callable, or None when the entry has none or Triton is missing."""
        if self.fused is None:
            return None
        module_name, _, attr = self.fused.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
        return getattr(module, attr)


_REGISTRY: dict[str, ActivationEntry] = {}


def register_activation(name: str, *, gated: bool = False, fused: str | None = None):
    """Class decorator that registers an activation under ``name``."""

    def decorate(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(
                f"activation {name!r} is already registered by {_REGISTRY[name].cls.__module__}."
                f"{_REGISTRY[name].cls.__qualname__}; pick another name for {cls.__qualname__}"
            )
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = ActivationEntry(name=name, cls=cls, gated=gated, fused=fused, summary=summary)
        cls.activation_name = name
        cls.gated = gated
        return cls

    return decorate


def list_activations() -> list[str]:
    """Names of all registered activations, sorted."""
    return sorted(_REGISTRY)


def get_activation_entry(name: str) -> ActivationEntry:
    """The registry entry for ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known activations: {', '.join(list_activations())}"
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
