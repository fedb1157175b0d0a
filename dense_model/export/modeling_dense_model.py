"""Hugging Face model of an exported dense_model checkpoint whose activation is not SwiGLU, or an MoE.

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

A mixture-of-experts checkpoint (``config.num_experts`` set) gets ``DenseModelSparseMoeBlock`` as
every layer's ``mlp``: megatron-core 0.16.1's ``MoELayer`` at inference as dense_model configures it
(dropless, see the class), with ``mlp.gate`` (the router), ``mlp.experts.N`` (each a
``DenseModelMLP`` with its own activation, so PolyCom experts keep their own coefficients) and
``mlp.shared_expert`` when the checkpoint has one. With ``config.moe_activation_params == "shared"``
(the seed's megablocks dMoE) the block holds one activation, ``mlp.act_fn``, that every routed
expert calls; the experts then have no ``act_fn`` parameters of their own.

With ``config.qk_norm == "full"`` (the paper's MoE run, OLMoE's layout) each attention layer also
has ``self_attn.q_norm`` and ``self_attn.k_norm``: one RMSNorm over the whole query projection
(heads x head_dim) and one over the whole key projection (kv heads x head_dim), applied to the
projections' outputs before the head split and RoPE, as transformers' ``OlmoeAttention`` does.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaRMSNorm

from .activation_dense_model import build_activation, is_gated
from .configuration_dense_model import DenseModelConfig


class DenseModelMLP(nn.Module):
    """The dense_model MLP with Llama's projection names (gate_proj only when gated)."""

    def __init__(self, config: DenseModelConfig, intermediate_size: int | None = None, shared_act=None):
        super().__init__()
        hidden, ffn = config.hidden_size, intermediate_size or config.intermediate_size
        self.gated = is_gated(config.activation)
        self.gate_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias) if self.gated else None
        self.up_proj = nn.Linear(hidden, ffn, bias=config.mlp_bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=config.mlp_bias)
        if shared_act is None:
            self.act_fn = build_activation(config.activation, **(config.activation_kwargs or {}))
        else:  # the MoE block's one activation: held in a tuple, its parameters are the block's
            self.act_fn, self._shared_act = None, (shared_act,)

    def forward(self, x, scale=None):  # [..., hidden] -> [..., hidden]; scale [...] or None
        act = self.act_fn if self.act_fn is not None else self._shared_act[0]
        if self.gated:  # dense_model's gated activations take fc1's [gate, up] layout
            h = act(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1))  # [..., ffn]
        else:
            h = act(self.up_proj(x))
        if scale is not None:  # a routed expert's gate weight, applied where megatron's MLP applies it
            h = h * scale.unsqueeze(-1)
        return self.down_proj(h)


class DenseModelSparseMoeBlock(nn.Module):
    """megatron-core's ``MoELayer`` (``TopKRouter`` + ``SequentialMLP``) as dense_model trains it.

    The router is a linear layer without bias; each token goes to the ``num_experts_per_tok``
    experts of largest router logit, weighted by the softmax over those top-k logits (megatron's
    score function "softmax" without pre-softmax: the same as Mixtral's softmax, top-k, renormalise),
    or with ``norm_topk_prob=False`` by their softmax over all experts, not renormalised (megatron's
    pre-softmax, OLMoE's router).
    No capacity: every token reaches its experts (the export refuses checkpoints that drop tokens).
    The shared expert, if any, sees every token and is added ungated.
    """

    def __init__(self, config: DenseModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = getattr(config, "norm_topk_prob", True)  # exports before the field: True
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        shared = getattr(config, "moe_activation_params", "per_expert") == "shared"
        self.act_fn = (
            build_activation(config.activation, **(config.activation_kwargs or {})) if shared else None
        )
        self.experts = nn.ModuleList(
            DenseModelMLP(config, config.moe_intermediate_size, shared_act=self.act_fn)
            for _ in range(config.num_experts)
        )
        self.shared_expert = (
            DenseModelMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_intermediate_size
            else None
        )

    def forward(self, x):  # [b, s, hidden] -> [b, s, hidden]
        tokens = x.reshape(-1, x.shape[-1])  # [t, hidden]
        logits = self.gate(tokens)  # [t, experts]
        if self.norm_topk_prob:
            top_logits, top_experts = torch.topk(logits, self.top_k, dim=-1)  # [t, k]
            weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)  # [t, k]
        else:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)  # [t, experts]
            weights, top_experts = torch.topk(scores, self.top_k, dim=-1)  # [t, k]
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slots = torch.where(top_experts == index)  # the tokens routed to this expert
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows], weights[rows, slots]))
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.reshape(x.shape)


def add_full_width_qk_norm(attn, config: DenseModelConfig) -> None:
    """``attn.q_norm`` / ``attn.k_norm`` over the full q / k projection width, applied to the
    projections' outputs (forward hooks: Llama's attention then splits the heads and applies RoPE)."""
    head_dim = config.head_dim
    attn.q_norm = LlamaRMSNorm(config.num_attention_heads * head_dim, eps=config.rms_norm_eps)
    attn.k_norm = LlamaRMSNorm(config.num_key_value_heads * head_dim, eps=config.rms_norm_eps)
    attn.q_proj.register_forward_hook(lambda module, args, out: attn.q_norm(out))  # [b, s, heads * hd]
    attn.k_proj.register_forward_hook(lambda module, args, out: attn.k_norm(out))  # [b, s, kv * hd]


class DenseModelForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers' ``mlp`` is ``DenseModelMLP``."""

    config_class = DenseModelConfig
    config: DenseModelConfig
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: DenseModelConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = DenseModelSparseMoeBlock(config) if config.num_experts else DenseModelMLP(config)
            if getattr(config, "qk_norm", "none") == "full":  # exports before the field: none
                add_full_width_qk_norm(layer.self_attn, config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        act = getattr(module, "act_fn", None)
        if isinstance(module, DenseModelMLP | DenseModelSparseMoeBlock) and act is not None:
            # the activation's parameters at its own init
            fresh = build_activation(self.config.activation, **(self.config.activation_kwargs or {}))
            for name, param in act.named_parameters():
                init.copy_(param, fresh.get_parameter(name))


__all__ = ["DenseModelForCausalLM", "DenseModelMLP", "DenseModelSparseMoeBlock"]
