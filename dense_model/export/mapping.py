"""The one weight mapping between our model and the Hugging Face Llama layout, for both directions.

``weight_rules(model_config)`` lists, for a model at TP=1 and PP=1, every parameter of our
megatron-core GPTModel (state-dict names, local spec) and the Hugging Face tensors it corresponds
to; ``to_hf`` splits one of our tensors into its Hugging Face tensors (the export, hf.py) and
``from_hf`` joins them back (the import, hf_import.py), exactly (no arithmetic, only slicing,
reshaping and concatenation, so export -> import -> export is bit for bit). Per layer N:

    input_layernorm.weight                -> model.layers.N.input_layernorm.weight
    self_attention.linear_qkv.weight      -> self_attn.{q,k,v}_proj.weight          (kind qkv)
        rows are [groups x (q heads of the group, k, v) x head_dim]: de-interleaved per group
    self_attention.linear_proj.weight     -> self_attn.o_proj.weight
    self_attention.{q,k}_layernorm.weight -> self_attn.{q,k}_norm.weight            (model.qk_norm=full:
                                             OLMoE's full-width gains, heads in the same order)
    pre_mlp_layernorm.weight              -> post_attention_layernorm.weight
    mlp.linear_fc1.weight                 -> mlp.gate_proj + mlp.up_proj (gated: [gate; up], kind gate_up)
                                             or mlp.up_proj (not gated)
    mlp.linear_fc2.weight                 -> mlp.down_proj.weight
    mlp.activation_func.act.<p>           -> mlp.act_fn.<p> (the activation's own parameters, PolyCom's
                                             weight and bias; read from the registry's module)

A mixture-of-experts layer (``DenseModelSparseMoeBlock`` on the Hugging Face side):

    mlp.router.weight                                    -> mlp.gate.weight
    mlp.experts.local_experts.E.<MLP as above>           -> mlp.experts.E.<MLP as above>
    mlp.experts.activation_func.act.<p>                  -> mlp.act_fn.<p> (model.moe.activation_params=shared:
                                                            one per layer; the experts have none of their own)
    mlp.shared_experts.<MLP as above>                    -> mlp.shared_expert.<MLP as above>

plus embedding.word_embeddings -> model.embed_tokens, decoder.final_layernorm -> model.norm and,
untied, output_layer -> lm_head (kind vocab: our rows are padded to ``padded_vocab_size``; the
export cuts the padding, the import appends zero rows). RoPE needs no permutation: megatron's
default (not interleaved) is the ``rotate_half`` convention of transformers' Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dense_model.config import ModelConfig, moe_enabled


@dataclass(frozen=True)
class Rule:
    """One of our parameters and the Hugging Face tensors it corresponds to.

    ``ours``: our state-dict name, then the names Transformer Engine's spec gives the same weight
    (its norms are fused into the next linear layer). ``kind``: copy, qkv, gate_up or vocab."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"

    @property
    def name(self) -> str:
        return self.ours[0]


def _mlp_rules(m: ModelConfig, ours: str, hf: str, activation: bool = True) -> list[Rule]:
    from dense_model.model import activation_entry

    entry = activation_entry(m)
    rules = [
        Rule((ours + "linear_fc1.weight",), (hf + "gate_proj.weight", hf + "up_proj.weight"), "gate_up")
        if entry.gated
        else Rule((ours + "linear_fc1.weight",), (hf + "up_proj.weight",)),
        Rule((ours + "linear_fc2.weight",), (hf + "down_proj.weight",)),
    ]
    return rules + (_activation_rules(m, ours, hf) if activation else [])


def _activation_rules(m: ModelConfig, ours: str, hf: str) -> list[Rule]:
    from dense_model.model import activation_entry

    activation = activation_entry(m).cls(**m.activation_kwargs)
    # PolyCom: weight [r] = a_1..a_r, bias [1] = a_0
    return [
        Rule((f"{ours}activation_func.act.{name}",), (f"{hf}act_fn.{name}",))
        for name in activation.state_dict()
    ]


def weight_rules(m: ModelConfig) -> list[Rule]:
    """Every parameter of the model ``m`` (TP=1, PP=1), in state-dict order, with its HF tensors."""
    rules = [Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "vocab")]
    for i in range(m.num_layers):
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [
            Rule(
                (ours + "input_layernorm.weight", ours + "self_attention.linear_qkv.layer_norm_weight"),
                (hf + "input_layernorm.weight",),
            ),
            Rule(
                (ours + "self_attention.linear_qkv.weight",),
                tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"),
                "qkv",
            ),
            Rule((ours + "self_attention.linear_proj.weight",), (hf + "self_attn.o_proj.weight",)),
            *(  # model.qk_norm=full: OLMoE's gains, [heads x head_dim] and [groups x head_dim]
                [
                    Rule((ours + "self_attention.q_layernorm.weight",), (hf + "self_attn.q_norm.weight",)),
                    Rule((ours + "self_attention.k_layernorm.weight",), (hf + "self_attn.k_norm.weight",)),
                ]
                if m.qk_norm == "full"
                else []
            ),
            Rule(
                (ours + "pre_mlp_layernorm.weight", ours + "mlp.linear_fc1.layer_norm_weight"),
                (hf + "post_attention_layernorm.weight",),
            ),
        ]
        if not moe_enabled(m):
            rules += _mlp_rules(m, ours + "mlp.", hf + "mlp.")
            continue
        rules.append(Rule((ours + "mlp.router.weight",), (hf + "mlp.gate.weight",)))  # [experts, hidden]
        shared = m.moe.activation_params == "shared"
        for e in range(m.moe.num_experts):
            rules += _mlp_rules(
                m, f"{ours}mlp.experts.local_experts.{e}.", f"{hf}mlp.experts.{e}.", not shared
            )
        if shared:  # one activation per layer, after the experts (the experts module registers it last)
            rules += _activation_rules(m, ours + "mlp.experts.", hf + "mlp.")
        if m.moe.shared_expert_ffn_hidden_size:
            rules += _mlp_rules(m, ours + "mlp.shared_experts.", hf + "mlp.shared_expert.")
    rules.append(Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",)))
    if m.untie_embeddings:
        rules.append(Rule(("output_layer.weight",), ("lm_head.weight",), "vocab"))
    return rules


def _heads(m: ModelConfig) -> tuple[int, int, int]:
    """(query groups, query heads per group, head dim)."""
    groups = m.num_query_groups or m.num_attention_heads
    return groups, m.num_attention_heads // groups, m.hidden_size // m.num_attention_heads


def to_hf(rule: Rule, tensor: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """Our tensor -> the Hugging Face tensors of ``rule.hf``, in order."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":  # cut the vocabulary padding
        return [tensor[: m.vocab_size]]
    if rule.kind == "gate_up":
        return list(torch.chunk(tensor, 2, dim=0))
    if rule.kind == "qkv":
        groups, per_group, head_dim = _heads(m)
        hidden = tensor.shape[-1]
        qkv = tensor.reshape(groups, per_group + 2, head_dim, hidden)
        return [
            qkv[:, :per_group].reshape(groups * per_group * head_dim, hidden),
            qkv[:, per_group].reshape(groups * head_dim, hidden),
            qkv[:, per_group + 1].reshape(groups * head_dim, hidden),
        ]
    raise ValueError(f"unknown mapping kind {rule.kind!r}")


def hf_shapes(rule: Rule, shape: torch.Size | tuple, m: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes ``to_hf`` gives for one of our tensors of ``shape`` (without any data)."""
    return [tuple(t.shape) for t in to_hf(rule, torch.empty(shape, device="meta"), m)]


def from_hf(rule: Rule, tensors: list[torch.Tensor], m: ModelConfig, rows: int | None = None) -> torch.Tensor:
    """The Hugging Face tensors of ``rule.hf`` -> our tensor (``rows``: the padded vocabulary)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "vocab":  # zero rows for the padding: never looked up, and cut at inference
        (t,) = tensors
        if rows is None or rows == t.shape[0]:
            return t
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    if rule.kind == "qkv":
        groups, per_group, head_dim = _heads(m)
        q, k, v = tensors
        hidden = q.shape[-1]
        return torch.cat(
            [
                q.reshape(groups, per_group, head_dim, hidden),
                k.reshape(groups, 1, head_dim, hidden),
                v.reshape(groups, 1, head_dim, hidden),
            ],
            dim=1,
        ).reshape(groups * (per_group + 2) * head_dim, hidden)
    raise ValueError(f"unknown mapping kind {rule.kind!r}")
