"""Core attention on torch's ``scaled_dot_product_attention`` (flash, cuDNN or memory-efficient
kernels on GPUs), a drop-in for megatron-core's local ``DotProductAttention``.

Without Transformer Engine, megatron-core's local core attention materialises the [b*h, s, s] scores
and runs an unfused softmax; this module keeps that module's constructor, its [s, b, h, d] inputs and
[s, b, h*d] output, its TP split of the heads (each rank holds heads/tp query heads and groups/tp
key/value groups) and its dropout RNG (the model-parallel tracker's stream unless sequence parallel),
and only replaces the arithmetic. ``model.attention_backend`` selects it (``select_attention_backend``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


def select_attention_backend(backend: str, transformer_impl: str, device: torch.device) -> str:
    """The core attention to build: ``auto`` is Transformer Engine's where the layers are TE's,
    else SDPA on GPUs, else megatron-core's local module (the CPU default, unchanged). ``te`` with
    local layers is refused by the config's validation."""
    if backend != "auto":
        return backend
    if transformer_impl == "transformer_engine":
        return "te"
    return "sdpa" if device.type == "cuda" else "local"


class SDPAttention(DotProductAttention):
    """megatron-core's DotProductAttention with the scores, mask, softmax, dropout and context
    computed by one ``scaled_dot_product_attention`` call. Constructor and sharded state as the
    parent's (the layer spec passes the same arguments)."""

    def __init__(
        self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None, **kwargs
    ):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, **kwargs)
        # Features of the local module that SDPA's fused kernels cannot express.
        unsupported = {
            "softmax_type": config.softmax_type != "vanilla",
            "window_size": is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number
            ),
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(
                f"model.attention_backend=sdpa does not support {', '.join(bad)}; "
                "set model.attention_backend=local"
            )

    def forward(
        self,
        query,  # [sq, b, np, hn]
        key,  # [sk, b, ng, hn]
        value,  # [sk, b, ng, hn]
        attention_mask,  # None (causal from attn_mask_type) or bool [b or 1, 1, sq, sk], True = masked
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):  # -> [sq, b, np * hn]
        assert packed_seq_params is None, "packed sequences need attention_backend=te"
        assert attention_bias is None, "attention bias is not supported by attention_backend=sdpa"
        sq, b = query.shape[0], query.shape[1]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron masks where True, SDPA attends where True
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            # As the local module: sq == 1 is a KV-cache step (attends to everything cached).
            assert sq == key.shape[0], "causal attention_backend=sdpa is only for self attention"
            causal = True
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition,
            )

        if dropout > 0 and not self.config.sequence_parallel:
            # Heads are split over TP: each rank draws its own mask, from the model-parallel stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
