"""Hugging Face model of an exported dense_model checkpoint whose MLP activation is not SwiGLU.

Copied next to ``config.json`` by ``toolkits/checkpoint_conversion/export_hf.py``; load it with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It is standalone (only torch and transformers; dense_model need not be installed) and reuses
transformers' Llama whole: ``DenseModelForCausalLM`` is ``LlamaForCausalLM`` with each layer's
``mlp`` replaced by ``DenseModelMLP``, whose activation has the same math as dense_model's
registry (dense_model/activations/):

    gated (geglu, reglu, swiglu):        down_proj(act(gate_proj(x)) * up_proj(x))
    plain (gelu, relu, squared_relu, silu, polynorm, polyrelu):   down_proj(act(up_proj(x)))

PolyCom (PolyNorm, PolyReLU) keeps its learned scalars as ``mlp.act_fn.weight`` [r] (a_1..a_r)
and ``mlp.act_fn.bias`` [1] (a_0), and computes in fp32 whatever the model dtype (x^6 inside
N(x^3) overflows fp16), casting the result back:

    PolyReLU(x) = a0 + sum_i a_i relu(x)^i
    PolyNorm(x) = a0 + sum_i a_i N(x^i),   N(v) = v / sqrt(mean(v^2 over the FFN row) + eps)
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .configuration_dense_model import DenseModelConfig


def _squared_relu(x):
    return F.relu(x).square()


# name -> (inner function, gated). Gated: the function applies to gate_proj's output.
ELEMENTWISE = {
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "squared_relu": (_squared_relu, False),
    "silu": (F.silu, False),
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "reglu": (F.relu, True),
}
POLYCOM = {"polyrelu": "relu", "polynorm": "norm"}


class Elementwise(nn.Module):
    """A parameter-free activation, computed in the input dtype (as dense_model does)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = ELEMENTWISE[name][0]

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x):
        return self.fn(x)


class PolyCom(nn.Module):
    """PolyCom of order r, inner function relu (PolyReLU) or RMS normalisation (PolyNorm)."""

    def __init__(self, inner: str, order: int = 3, eps: float = 1e-6):
        super().__init__()
        if inner not in ("relu", "norm"):
            raise ValueError(f"PolyCom inner function {inner!r} is not 'relu' or 'norm'")
        self.inner, self.order, self.eps = inner, int(order), float(eps)
        self.weight = nn.Parameter(torch.full((self.order,), 1.0 / self.order))  # a_1..a_r
        self.bias = nn.Parameter(torch.zeros(1))  # a_0

    def extra_repr(self) -> str:
        return f"inner={self.inner}, order={self.order}, eps={self.eps}"

    def forward(self, x):  # [..., ffn] -> [..., ffn]
        x32 = x.float()
        w, b = self.weight.float(), self.bias.float()
        if self.inner == "relu":
            r = F.relu(x32)
            power = r
            out = b + w[0] * power
            for i in range(1, self.order):
                power = power * r
                out = out + w[i] * power
            return out.to(x.dtype)
        powers = [x32]
        for _ in range(1, self.order):
            powers.append(powers[-1] * x32)
        sumsq = torch.stack([p.square().sum(dim=-1) for p in powers], dim=-1)  # [..., r]
        inv_rms = torch.rsqrt(sumsq / x.shape[-1] + self.eps)  # [..., r]
        out = b
        for i, p in enumerate(powers):
            out = out + w[i] * (p * inv_rms[..., i : i + 1])
        return out.to(x.dtype)


def build_activation(name: str, kwargs: dict | None = None) -> nn.Module:
    kwargs = dict(kwargs or {})
    if name in POLYCOM:
        kwargs.pop("inner", None)
        return PolyCom(POLYCOM[name], **kwargs)
    if name in ELEMENTWISE:
        if kwargs:
            raise ValueError(f"activation {name!r} takes no arguments, got {kwargs}")
        return Elementwise(name)
    known = sorted(ELEMENTWISE) + sorted(POLYCOM)
    raise ValueError(f"activation {name!r} is not supported by this modeling file; known: {', '.join(known)}")


class DenseModelMLP(nn.Module):
    """The dense_model MLP with Llama's projection names (gate_proj only when gated)."""

    def __init__(self, config: DenseModelConfig):
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.gated = ELEMENTWISE.get(config.activation, (None, False))[1]
        self.gate_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias) if self.gated else None
        self.up_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=config.mlp_bias)
        self.act_fn = build_activation(config.activation, config.activation_kwargs)

    def forward(self, x):  # [b, s, hidden] -> [b, s, hidden]
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class DenseModelForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers' ``mlp`` is ``DenseModelMLP``."""

    config_class = DenseModelConfig
    config: DenseModelConfig
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: DenseModelConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = DenseModelMLP(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PolyCom):
            init.constant_(module.weight, 1.0 / module.order)
            init.zeros_(module.bias)


__all__ = ["DenseModelForCausalLM", "DenseModelMLP", "PolyCom"]
