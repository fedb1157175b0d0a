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

``grouped_linear`` uses ``torch.nn.functional.grouped_mm`` where it runs (CPU: fp32/bf16/fp16;
CUDA: bf16; widths whose rows are 16-byte aligned), otherwise one matmul per expert, the same math.

Activations: one without parameters (SwiGLU, GELU, ...) is called once on all rows (it acts per
row). PolyCom (PolyNorm, PolyReLU) gets per-row coefficients: the experts' a_1..a_r and a_0 are
stacked [E, r] and repeated to the rows [N, r], so each row uses its expert's coefficients and each
expert's coefficient gradient is the sum over its rows only; PolyNorm's per-row statistics and
the coefficient gradients are reduced over the expert-TP group as in each expert's own module.
An activation with parameters of another kind, and PolyCom with its fused Triton kernel (which
takes one set of scalar coefficients per call), run per expert on that expert's rows.

``model.moe.activation_params=shared`` (``SequentialExperts``, and ``GroupedExperts`` which extends
it): the experts module holds ONE activation module, ``activation_func`` (parameter names
``...mlp.experts.activation_func.act.<p>``), and each local expert's ``activation_func`` slot is a
parameter-free ``SharedActivationCall`` into it. The grouped forward calls it once on all rows
(fused kernel or reference), so its gradient is the sum over every local expert's rows. It is a
dense parameter (``allreduce=True``) summed over the whole pipeline stage (DDP over DP,
finalize_model_grads over TP) and divided by expert-TP (``dense_model.moe.SharedExpertActivation``),
so each rank's sum over its local experts adds up to the sum over all experts and all tokens.
Its checkpoint entry has no expert axis: one tensor replicated over (expert-)TP, EP and DP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from dense_model.activations._polycom import PolyCom, fused_kernels_run_on, polycom_reference


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes ``x [N, in]`` and ``weight [E, out, in]``:
    rows of 16-byte multiples, on CUDA bf16 only, on the CPU not float64 (torch 2.13's kernels)."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype or x.shape[0] == 0:
        return False
    size = x.element_size()
    if (weight.shape[1] * size) % 16 or (weight.shape[2] * size) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    # torch 2.13's CPU grouped_mm takes fp32/bf16/fp16 (float64: the per-expert loop)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x [N, in]``, rows grouped by expert (``counts[e]`` rows each), times each group's
    ``weight[e].T`` (``weight [E, out, in]``, the layout of a linear's weight) -> ``[N, out]``."""
    if grouped_mm_runs(x, weight):
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x.device, dtype=torch.int32)
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    parts = torch.split(x, counts)
    return torch.cat([torch.matmul(part, w.t()) for part, w in zip(parts, weight)], dim=0)


class SharedActivationCall(torch.nn.Module):
    """A local expert's ``activation_func`` slot under ``activation_params=shared``: calls the
    experts module's one activation. Held in a tuple, not as a submodule, so the parameters are
    registered (named, reduced, saved) once, on the experts module."""

    def __init__(self, shared: torch.nn.Module):
        super().__init__()
        self._shared = (shared,)

    def forward(self, x):  # [tokens of this expert, fc1 out] -> [tokens, ffn/tp]
        return self._shared[0](x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}  # the experts module saves the shared parameters, without the expert axis


class SequentialExperts(SequentialMLP):
    """megatron-core's SequentialMLP; with ``shared_activation`` (a ModuleSpec, the layer's one
    activation module) every local expert calls that module instead of its own."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, shared_activation=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.shared = shared_activation is not None
        if self.shared:
            from megatron.core.transformer.spec_utils import build_module

            # Replaces the per-expert modules megatron's MLP built (their coefficients are dropped).
            self.activation_func = build_module(shared_activation, self.config)
            for expert in self.local_experts:
                expert.activation_func = SharedActivationCall(self.activation_func)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """SequentialMLP's (the experts, with their expert axis), plus the shared activation's
        parameters with the layer's offsets only: one global tensor, replicas everywhere else."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.shared:
            state.update(
                self.activation_func.sharded_state_dict(
                    f"{prefix}activation_func.", sharded_offsets, metadata
                )
            )
        return state


class GroupedExperts(SequentialExperts):
    """SequentialMLP's local experts (same parameters, names and checkpoint layout) computed as two
    grouped GEMMs over all local experts, with the registry activation per expert (or the layer's
    shared one)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, shared_activation=None):
        super().__init__(
            num_local_experts,
            config,
            submodules,
            pg_collection=pg_collection,
            shared_activation=shared_activation,
        )
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
        if self.shared:  # one module, the same coefficients for every row: one call (fused or reference)
            return self.activation_func(x)
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
