"""Grouped-GEMM experts without Transformer Engine: torch's own grouped matmul, registry activations.

``GroupedExperts`` is megatron-core's ``SequentialMLP`` with another forward. It keeps the same
modules (one ``MLP`` per local expert, ``local_experts.I.linear_fc1/linear_fc2/activation_func``),
so parameter names, the per-expert init (``dense_model.moe.expert_param_layout``), DDP's expert
gradient handling, ``sharded_state_dict`` (inherited unchanged) and therefore checkpoints, export
and evaluation are exactly SequentialMLP's: a checkpoint of either loads in the other.

The forward takes the tokens megatron's dispatcher already permuted by local expert and
``tokens_per_expert``, and runs all local experts at once:

    fc1:  grouped_mm(tokens [N, h], stack(fc1 weights) [E, out, h])     (one call, all experts)
    act:  the registry activation on all N rows, each row with its expert's coefficients
    prob: * routing probability per row (where megatron's expert MLP applies it)
    fc2:  grouped_mm(rows, stack(fc2 weights))

The weights are stacked at every forward (a copy of the local experts' weights; autograd hands
each expert's slice of the stacked gradient back to its own parameter).

``grouped_linear`` uses ``torch.nn.functional.grouped_mm`` where it runs (CPU: any float dtype;
CUDA: bf16; widths whose rows are 16-byte aligned), otherwise one matmul per expert, the same math.

Activations: one without parameters (SwiGLU, GELU, ...) is called once on all rows (it acts per
row). PolyCom (PolyNorm, PolyReLU) gets per-row coefficients: the experts' a_1..a_r and a_0 are
stacked [E, r] and repeated to the rows [N, r], so each row uses its expert's coefficients and each
expert's coefficient gradient is the sum over its rows only; PolyNorm's per-row statistics and
the coefficient gradients are reduced over the expert-TP group as in each expert's own module.
An activation with parameters of another kind, and PolyCom with its fused Triton kernel (which
takes one set of scalar coefficients per call), run per expert on that expert's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from dense_model.activations._polycom import PolyCom, fused_kernels_run_on, polycom_reference


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes ``x [N, in]`` and ``weight [E, out, in]``:
    rows of 16-byte multiples, and on CUDA bf16 only (torch 2.13's grouped GEMM kernels)."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype or x.shape[0] == 0:
        return False
    size = x.element_size()
    if (weight.shape[1] * size) % 16 or (weight.shape[2] * size) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x [N, in]``, rows grouped by expert (``counts[e]`` rows each), times each group's
    ``weight[e].T`` (``weight [E, out, in]``, the layout of a linear's weight) -> ``[N, out]``."""
    if grouped_mm_runs(x, weight):
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x.device, dtype=torch.int32)
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    parts = torch.split(x, counts)
    return torch.cat([torch.matmul(part, w.t()) for part, w in zip(parts, weight)], dim=0)


class GroupedExperts(SequentialMLP):
    """SequentialMLP's local experts (same parameters, names and checkpoint layout) computed as two
    grouped GEMMs over all local experts, with the registry activation per expert."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if self.config.add_bias_linear or self.config.fp8 or self.config.fp4:
            raise ValueError(
                "dense_model's grouped experts (model.moe.grouped_gemm without Transformer Engine) "
                "support bias-free bf16/fp32 experts only; set model.moe.grouped_gemm=false"
            )
        if not self.config.use_te_activation_func:
            raise ValueError(
                "GroupedExperts needs the registry activation module (use_te_activation_func=True)"
            )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        hidden, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: probs on the input, top-1 only
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with topk=1."
            hidden = (probs.unsqueeze(-1) * hidden).to(hidden.dtype)
            probs = torch.ones_like(probs)
        counts = [int(n) for n in tokens_per_expert.tolist()]
        experts = self.local_experts
        fc1 = torch.stack([e.linear_fc1.weight for e in experts])  # [E, out/tp, h]
        intermediate = grouped_linear(hidden, fc1, counts)
        intermediate = self._activation(intermediate, counts)
        intermediate = (intermediate * probs.unsqueeze(-1)).to(intermediate.dtype)  # as megatron's MLP
        fc2 = torch.stack([e.linear_fc2.weight for e in experts])  # [E, h, ffn/tp]
        return grouped_linear(intermediate, fc2, counts), None

    def _activation(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The registry activation on all rows ``x [N, fc1 out]``, each with its expert's parameters."""
        modules = [e.activation_func for e in self.local_experts]  # ExpertActivation (.act: registry)
        first = modules[0].act
        if next(first.parameters(), None) is None:  # nothing per expert: one call over all rows
            return modules[0](x)
        if isinstance(first, PolyCom) and not (first.fused_kernel is not None and fused_kernels_run_on(x)):
            rows = torch.tensor(counts, device=x.device)

            def per_row(name):  # [E, n] -> [N, n]: row i gets its expert's coefficients
                stacked = torch.stack([getattr(m.act, name) for m in modules])
                return stacked.repeat_interleave(rows, dim=0, output_size=x.shape[0])

            weight, bias = per_row("weight"), per_row("bias")
            return polycom_reference(
                x, weight, bias, inner=first.inner, eps=first.eps, tp_group=first.tp_group
            )
        return torch.cat([m(part) for m, part in zip(modules, torch.split(x, counts))], dim=0)
