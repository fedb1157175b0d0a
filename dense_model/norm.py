"""RMSNorm for megatron-core's local layer spec, with sequence parallelism.

megatron-core's local spec builds its norms with ``WrappedTorchNorm``, which returns a plain
``torch.nn.RMSNorm`` and refuses ``sequence_parallel`` (it has no way to mark its weight). Without
Transformer Engine or apex that left no norm for sequence parallelism, and so no MoE training at
TP > 1 (megatron-core's MoE layer needs sequence parallelism there).

``RMSNorm`` is torch's RMSNorm (same numerics, same ``weight`` parameter, same state dict, so
checkpoints written with the stock spec load unchanged), built from megatron's norm slot
``(config, hidden_size, eps)``. Under sequence parallelism each TP rank normalises its own slice of
the sequence, so its weight gradient is a partial sum: the weight carries megatron's
``sequence_parallel`` mark, and ``finalize_model_grads`` sums those gradients over the TP group.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm in megatron's norm slot, its weight marked for sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        # unused: the slot's other keywords (persist_layer_norm, zero_centered_gamma, normalization),
        # which megatron-core also ignores for its torch norms.
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError(
                f"dense_model.norm.RMSNorm is a plain RMSNorm, got normalization={config.normalization!r}, "
                f"layernorm_zero_centered_gamma={config.layernorm_zero_centered_gamma}"
            )
        super().__init__(hidden_size, eps=eps)
        # Read by megatron-core's finalize_model_grads: sum this gradient over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel
