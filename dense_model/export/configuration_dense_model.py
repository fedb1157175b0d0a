"""Hugging Face config of an exported dense_model checkpoint whose MLP activation is not SwiGLU.

Copied next to ``config.json`` by ``toolkits/checkpoint_conversion/export_hf.py`` and loaded from
there with ``trust_remote_code=True``, on machines without dense_model installed: it imports only
``transformers``. It is ``LlamaConfig`` plus the activation (a name from dense_model's registry and
its keyword arguments, e.g. ``{"order": 3}`` for PolyNorm/PolyReLU), and for a mixture of experts
Qwen2-MoE's field names: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
``shared_expert_intermediate_size`` (None: no shared expert) and ``norm_topk_prob`` (True: softmax
over the top-k logits; False: softmax over all experts, top-k probabilities as they are, OLMoE's); and ``moe_activation_params``
(``shared``: one activation, ``mlp.act_fn``, per layer for all experts; ``per_expert``: each its own).
``qk_norm`` ("none" or "full"): "full" adds OLMoE's RMSNorm over the whole query and key projections.
"""

from transformers.models.llama.configuration_llama import LlamaConfig


class DenseModelConfig(LlamaConfig):
    """LlamaConfig + ``activation`` / ``activation_kwargs`` for the MLP (see modeling_dense_model.py)
    + the mixture of experts, if ``num_experts`` is set."""

    model_type = "dense_model"
    # Tensor-parallel plan for transformers' own TP: attention only. The MLP stays whole because
    # PolyNorm normalises over the full FFN row, which a column split would cut.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }

    activation: str = "polynorm"
    activation_kwargs: dict | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    moe_activation_params: str = "per_expert"
    qk_norm: str = "none"


__all__ = ["DenseModelConfig"]
