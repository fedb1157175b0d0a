"""The activation registry: name -> entry (torch module class and what the model hands it).

Adding an activation is one decorated class in one file::

    @register_activation("my_act", gated=False)
    class MyAct(nn.Module):
        def forward(self, x):  # [..., ffn]  (gated: [..., 2 * ffn] -> [..., ffn])
            ...

The decorator declares the whole protocol between the activation and the model
(``dense_model.model.RegistryActivation``), which builds ``cls(**model.activation_kwargs, ...)`` with

  * ``tp_group=<the tensor-parallel group or None>`` when ``takes_tp_group=True`` (activations whose
    output depends on the whole FFN row, or whose parameters are replicated over TP ranks);
  * ``fused_kernel=<callable or None>`` when ``fused=`` names a loader: a function, called once per
    model build on machines with a GPU, that returns the fast path (imported then, so Triton stays
    optional) or None where its dependency is missing. None also when ``model.fused_activation`` is off.

A file in this package is imported with the package; a file elsewhere is named in the config
(``model.activation_modules: [my_pkg.my_act]``) and imported before the name is looked up. Names
are unique: registering a name twice raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationEntry:
    """One registered activation."""

    name: str
    cls: type[torch.nn.Module]
    gated: bool  # the input is 2x the FFN width: [gate, up] halves, like megatron's GLU layout
    takes_tp_group: bool  # the constructor takes tp_group=
    fused: (
        Callable[[], Callable | None] | None
    )  # loader of the fast path; the constructor takes fused_kernel=
    summary: str


_REGISTRY: dict[str, ActivationEntry] = {}


def register_activation(
    name: str,
    *,
    gated: bool = False,
    takes_tp_group: bool = False,
    fused: Callable[[], Callable | None] | None = None,
):
    """Class decorator that registers an activation under ``name`` (see the module docstring)."""

    def decorate(cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        if name in _REGISTRY:
            raise ValueError(
                f"activation {name!r} is already registered by {_REGISTRY[name].cls.__module__}."
                f"{_REGISTRY[name].cls.__qualname__}; pick another name for {cls.__qualname__}"
            )
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = ActivationEntry(name, cls, gated, takes_tp_group, fused, summary)
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
