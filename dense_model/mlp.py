"""The MLP's activation module, shared by the dense MLP (``model.py``) and the MoE experts (``moe.py``).

Below both: megatron-core's ``MLP`` builds it from the layer spec's ``activation_func`` slot, and
it builds ``dense_model.activations.build_activation(name)`` as the registry entry declares.
"""

from __future__ import annotations

import os

import torch

from dense_model.activations import build_activation, get_activation_entry


class RegistryActivation(torch.nn.Module):
    """The MLP's activation_func submodule: the registry activation, built as its entry declares.

    megatron-core's MLP calls it on fc1's whole output (``use_te_activation_func`` is the flag that
    makes MLP build and call the spec's activation module instead of a bare function).
    """

    def __init__(self, config, name: str, kwargs: dict, fused: bool, tp_group=None):
        super().__init__()
        from megatron.core import parallel_state

        entry = get_activation_entry(name)
        kwargs = dict(kwargs)
        if entry.takes_tp_group:
            if tp_group is None:  # MoE experts pass their expert-TP group (dense_model.moe)
                tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
            kwargs["tp_group"] = tp_group
        if entry.fused is not None:
            # The fused kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, as the
            # tests run them): elsewhere Triton is not even imported.
            use = fused and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
            kwargs["fused_kernel"] = entry.fused() if use else None
        self.act = build_activation(name, **kwargs)

    def forward(self, x):  # [s, b, ffn/tp] (gated: [s, b, 2*ffn/tp]) -> [s, b, ffn/tp]
        return self.act(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Coefficients (if any) as replicated sharded tensors, so distributed checkpoints hold them."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, sharded_offsets=sharded_offsets)
