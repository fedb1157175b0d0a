"""Hugging Face model of an exported dense_model checkpoint whose MLP activation is not SwiGLU.

Written next to ``config.json`` by the export (dense_model/export/hf.py); load it with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``DenseModelForCausalLM`` is transformers' ``LlamaForCausalLM`` with each layer's ``mlp`` replaced
by ``DenseModelMLP``. The activation is not written again here: the export copies, next to this
file, the source files of dense_model that define it (the registry, the module that registers the
activation and the dense_model.activations modules it imports, with those imports made relative)
and ``activation_dense_model.py``, which imports them. So the exported model computes the same code
the checkpoint trained with, and needs only torch and transformers (dense_model need not be
installed). The MLP, with Llama's projection names:

    gated (swiglu, geglu, reglu):   down_proj(act([gate_proj(x), up_proj(x)]))   act: [..., 2 ffn] -> [..., ffn]
    plain (everything else):        down_proj(act(up_proj(x)))

An activation's own parameters keep their names under ``mlp.act_fn`` (PolyCom: ``weight`` [r] =
a_1..a_r and ``bias`` [1] = a_0).
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .activation_dense_model import build_activation, is_gated
from .configuration_dense_model import DenseModelConfig


class DenseModelMLP(nn.Module):
    """The dense_model MLP with Llama's projection names (gate_proj only when gated)."""

    def __init__(self, config: DenseModelConfig):
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.gated = is_gated(config.activation)
        self.gate_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias) if self.gated else None
        self.up_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=config.mlp_bias)
        self.act_fn = build_activation(config.activation, **(config.activation_kwargs or {}))

    def forward(self, x):  # [b, s, hidden] -> [b, s, hidden]
        if self.gated:  # dense_model's gated activations take fc1's [gate, up] layout
            return self.down_proj(self.act_fn(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)))
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
        if isinstance(module, DenseModelMLP):  # the activation's parameters at its own init
            fresh = build_activation(self.config.activation, **(self.config.activation_kwargs or {}))
            for name, param in module.act_fn.named_parameters():
                init.copy_(param, fresh.get_parameter(name))


__all__ = ["DenseModelForCausalLM", "DenseModelMLP"]
