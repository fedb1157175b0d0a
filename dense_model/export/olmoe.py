"""transformers' own ``OlmoeForCausalLM`` (model_type ``olmoe``): what of our model it expresses, its
config.json, and the tensor names it reads, for the export (hf.py) and the import (hf_import.py).

An OLMoE layer is Llama's with two differences our model has as options: ``q_norm`` / ``k_norm``,
one RMSNorm over the whole query projection (heads x head_dim) and one over the whole key
projection (kv heads x head_dim), before the head split and RoPE (``model.qk_norm: full``,
dense_model/qk_norm.py), and a sparse MoE MLP in every layer: router ``mlp.gate`` with a softmax over
all experts then the top-k (``norm_topk_prob`` false: the probabilities as they are,
``model.moe.router_score: softmax_then_topk``; true: renormalised over the k, which equals
``topk_then_softmax``), SwiGLU experts ``mlp.experts.E.{gate,up,down}_proj``, no shared expert, no
biases, no q/k/v clipping. The tensor names on disk are allenai/OLMoE-1B-7B-0924's (one tensor per
expert and projection); transformers 5 fuses the experts into ``gate_up_proj`` / ``down_proj`` when
it loads them and splits them back when it saves. The weight table is mapping.py's (the q/k gains
are its ``qk_norm: full`` rows), so the export and the import share it.

The router's auxiliary loss: transformers' ``load_balancing_loss_func`` (used only when fine-tuning
with ``output_router_logits=True``) is ``router_aux_loss_coef * E * sum_e f_e * P_e`` with ``f_e``
the top-k assignments to expert e and ``P_e`` its softmax mass, each summed over all layers and
tokens and divided by ``L * T``: no division by k, and the layers pooled before the product. When
every layer routes alike that is megablocks' loss with weight ``router_aux_loss_coef * k``: the
same number is k times stronger there. allenai's OLMoE-1B-7B carries its training weight (OLMo +
megablocks, ``moe_loss_weight`` 0.01) into ``router_aux_loss_coef`` unchanged, so the number in an
OLMoE folder means megablocks' weight: the import writes it as ``aux_loss_coeff`` with
``router_loss_scaling: olmoe`` (continuing training as the model was trained) and the export writes
megablocks' weight back (``aux_loss_from_hf`` / ``aux_loss_to_hf``).
"""

from __future__ import annotations

import torch

from dense_model.config import Config, ModelConfig, expert_ffn_hidden_size, moe_enabled

ARCHITECTURE = "OlmoeForCausalLM"
FORMATS = ("auto", "olmoe")  # export_hf.py --format: auto = OLMoE where it is the only faithful one


def olmoe_refusal(m: ModelConfig) -> str | None:
    """What ``OlmoeForCausalLM`` has that the model ``m`` has not (a clause after "OlmoeForCausalLM"),
    or None when it runs ``m`` exactly."""
    if not moe_enabled(m):
        return "has a mixture of experts in every layer and this model is dense (model.moe.num_experts unset)"
    if m.activation != "swiglu":
        return f"has SwiGLU experts and this model's are model.activation={m.activation!r}"
    if m.moe.shared_expert_ffn_hidden_size:
        return (
            "has no shared expert and this model has one (model.moe.shared_expert_ffn_hidden_size="
            f"{m.moe.shared_expert_ffn_hidden_size})"
        )
    if m.qk_norm != "full":
        return (
            f"always normalises q and k over their full width and this model has model.qk_norm={m.qk_norm!r}"
        )
    return None


def wants_olmoe(m: ModelConfig, fmt: str) -> bool:
    """Whether the export writes ``OlmoeForCausalLM``: asked for, or (auto) the full-width q/k norm,
    which only OLMoE's layout has."""
    return fmt == "olmoe" or (fmt == "auto" and m.qk_norm == "full")


def aux_loss_to_hf(m: ModelConfig) -> float:
    """``router_aux_loss_coef`` as allenai's OLMoE folders carry it: megablocks' weight w."""
    weight = m.moe.aux_loss_coeff  # megablocks' w (router_loss_scaling olmoe)
    if m.moe.router_loss_scaling == "per_layer":  # megatron-core's c per layer = w / L
        weight *= m.num_layers
    return weight


def aux_loss_from_hf(coef: float) -> dict:
    """Our model.moe router-loss fields for an OLMoE folder's ``router_aux_loss_coef``: megablocks'
    weight, as allenai's conversion carried it (see the docstring)."""
    return {"aux_loss_coeff": float(coef), "router_loss_scaling": "olmoe"}


def olmoe_import_notes(m: ModelConfig) -> list[str]:
    """What an imported OLMoE folder cannot say, to print after the import: its config.json has no
    router z-loss field (``OlmoeConfig`` has ``router_aux_loss_coef`` only), so the imported config
    trains without one, while the OLMoE-1B-7B-0924 recipe the paper's MoE run used weighs it 0.001
    (``moe_zloss_weight``, megablocks' scaling)."""
    if not moe_enabled(m) or m.moe.router_loss_scaling != "olmoe" or m.moe.z_loss_coeff is not None:
        return []
    return [
        "note: an OLMoE config.json records no router z-loss, so this config trains without one; "
        "the OLMoE-1B-7B-0924 recipe (the paper's MoE run) used 0.001 with megablocks' scaling: add "
        "model.moe.z_loss_coeff=0.001 to train on as it did"
    ]


def olmoe_config(cfg: Config, special_ids: dict, dtype: torch.dtype):
    """``OlmoeConfig`` for ``cfg`` (checked by ``olmoe_refusal`` first)."""
    from transformers import OlmoeConfig

    m = cfg.model
    config = OlmoeConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=expert_ffn_hidden_size(m),  # OLMoE's intermediate_size is the expert width
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon,  # every norm, q_norm / k_norm included, as ours
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        num_experts=m.moe.num_experts,
        num_experts_per_tok=m.moe.router_topk,
        norm_topk_prob=m.moe.router_score == "topk_then_softmax",
        router_aux_loss_coef=aux_loss_to_hf(m),
        tie_word_embeddings=not m.untie_embeddings,
        bos_token_id=special_ids.get("bos_token_id"),
        eos_token_id=special_ids.get("eos_token_id"),
        pad_token_id=None,  # OlmoeConfig's default (1) would name a token the tokenizer may not pad with
        dtype=str(dtype).removeprefix("torch."),
    )
    config.architectures = [ARCHITECTURE]
    return config


def olmoe_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The tensors an OLMoE folder holds (allenai's names, one per expert and projection) and their
    shapes, from transformers' own model built on the meta device (its fused experts split back)."""
    from transformers import OlmoeForCausalLM

    with torch.device("meta"):
        model = OlmoeForCausalLM(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition("mlp.experts.")
        if not prefix:
            shapes[name] = tuple(tensor.shape)
        elif leaf == "gate_up_proj":  # [experts, 2 x width, hidden]: gate rows, then up rows
            for e in range(tensor.shape[0]):
                for proj in ("gate_proj", "up_proj"):
                    shapes[f"{prefix}mlp.experts.{e}.{proj}.weight"] = (tensor.shape[1] // 2, tensor.shape[2])
        elif leaf == "down_proj":  # [experts, hidden, width]
            for e in range(tensor.shape[0]):
                shapes[f"{prefix}mlp.experts.{e}.down_proj.weight"] = tuple(tensor.shape[1:])
        else:
            raise ValueError(f"OlmoeForCausalLM has a tensor {name} the export does not know")
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def olmoe_model_section(hf, llama_section: dict) -> dict:
    """Our model section for an ``OlmoeConfig`` ``hf`` (``llama_section``: what its Llama fields give,
    from hf_import's reader), or ValueError naming the config.json field we cannot reproduce."""
    if getattr(hf, "clip_qkv", None) is not None:
        raise ValueError(f"clip_qkv={hf.clip_qkv!r}: q/k/v clipped to a bound; dense_model does not clip")
    model = {k: v for k, v in llama_section.items() if k != "ffn_hidden_size"}  # no dense MLP
    model["qk_norm"] = "full"
    model["moe"] = {
        "num_experts": hf.num_experts,
        "router_topk": hf.num_experts_per_tok,
        "ffn_hidden_size": hf.intermediate_size,
        "router_score": "topk_then_softmax" if hf.norm_topk_prob else "softmax_then_topk",
        **aux_loss_from_hf(hf.router_aux_loss_coef),
    }
    return model
