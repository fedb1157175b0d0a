"""Mixture of experts: megatron-core's MoELayer with the registry activation inside every expert.

    model.moe.num_experts: 64, model.moe.router_topk: 8          # in a config; dense when unset

The stock GPT layer spec with ``num_experts`` is kept whole (router, token dispatcher, experts,
optional shared expert); only the ``activation_func`` slot of the experts' ``MLPSubmodules`` is
filled, with ``ExpertActivation``. megatron-core's ``SequentialMLP`` builds one MLP per local
expert, so each expert gets its own activation module and PolyCom experts their own a0..ar.
With ``model.moe.grouped_gemm`` and no TE grouped GEMM, the experts are
``dense_model.moe_experts.GroupedExperts``: the same modules, run as torch grouped GEMMs.

Expert tensor parallelism splits each expert's FFN width over the *expert* TP group, which need not
be the dense TP group: PolyNorm's row statistics and the coefficient gradients are reduced over
that group. The coefficients are expert parameters (megatron's ``allreduce=False`` when EP > 1),
so DDP reduces their gradients over the expert data-parallel group, like the expert weights.
With ``model.moe.activation_params=shared`` (the seed's megablocks dMoE) the layer has one
``SharedExpertActivation`` that every expert calls (``dense_model.moe_experts.SequentialExperts``):
a dense parameter whose gradient is summed over the whole pipeline stage (DDP over DP, then
finalize_model_grads over TP) and divided by expert-TP, right whether expert-TP equals TP or not.

Also here: the layout-invariant init names of expert weights, the router metrics logged by the
trainer (aux and z losses, tokens per expert) and the active-parameter FLOPs for MFU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from dense_model import collectives
from dense_model.activations import build_activation, get_activation_entry
from dense_model.activations._polycom_common import tp_world_size
from dense_model.backends import transformer_engine_available
from dense_model.config import Config, ModelConfig, expert_ffn_hidden_size, expert_tensor_parallel_size
from dense_model.mlp import RegistryActivation


def prepare_megatron_moe() -> None:
    """Two gaps in megatron-core 0.16.1's MoE path, closed once per process.

    Without Transformer Engine the router's gating linear reads ``moe_utils.te_general_gemm``,
    which is only defined when TE imports (NameError): None selects the torch matmul. On the CPU
    (gloo) the alltoall dispatcher's split sizes stay torch tensors, because its ``.numpy()``
    conversion only runs for CUDA tensors, and ``all_to_all_single`` rejects tensors as sizes.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    to_cpu = token_dispatcher.maybe_move_tensor_to_cpu
    if torch.cuda.is_available() or getattr(to_cpu, "_numpy_on_cpu", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._numpy_on_cpu = True
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


class ExpertActivation(RegistryActivation):
    """An expert's activation: statistics and coefficient gradients over the expert TP group."""

    def __init__(self, config, name: str, kwargs: dict, fused: bool):
        from megatron.core import parallel_state

        group = parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
        super().__init__(config, name, kwargs, fused, tp_group=group)
        for param in self.parameters():
            # As megatron marks the expert linears: gradients reduced over expert-DP under EP.
            param.allreduce = not (config.expert_model_parallel_size > 1)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Coefficients replicated over expert TP (SequentialMLP adds the expert axis and expert-DP)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state,
            prefix,
            sharded_offsets=sharded_offsets,
            tp_group=parallel_state.get_expert_tensor_parallel_group(),
            dp_cp_group=parallel_state.get_expert_data_parallel_group(),
        )


class SharedExpertActivation(RegistryActivation):
    """``activation_params=shared``: the one activation module of a MoE layer, called by every expert.

    Row statistics over the expert-TP group (each expert's FFN width is split over it). The
    gradient must be the sum over all experts and all tokens, over any layout (expert-TP equal to
    TP or not). Each token lives on one rank of a pipeline stage (sequence parallel splits it over
    TP, data parallel over DP), and the dispatcher brings it to its experts' ranks within the
    expert-TP x EP group; so a rank's backward gives its local experts' share of the tokens of its
    expert-TP x EP group, already summed over expert-TP (the reference's coefficient all-reduce and
    the fused kernel's row moments), hence the same on the expert-TP ranks. The whole stage's sum
    is then expert-TP times the true sum, and the true gradient is

        sum over the stage (TP x DP ranks) of the rank's gradient / expert-TP, / DP (the batch mean)

    which megatron's own mechanisms give: a dense parameter (``allreduce`` True: DDP and the
    (distributed) optimizer sum it over the DP group and divide by DP), marked ``sequence_parallel``
    so ``finalize_model_grads`` sums it over the TP group (as the norms'; nothing at TP=1), and a
    gradient hook dividing each backward's gradient by expert-TP (no communication, so DDP's
    overlapped reduce is untouched). Checkpointed by RegistryActivation: replicated over TP and
    DP-CP, which cover the stage, no expert axis.
    """

    def __init__(self, config, name: str, kwargs: dict, fused: bool):
        from megatron.core import parallel_state

        group = parallel_state.get_expert_tensor_parallel_group(check_initialized=False)
        super().__init__(config, name, kwargs, fused, tp_group=group)
        etp = tp_world_size(group)
        for param in self.parameters():
            param.allreduce = True
            param.sequence_parallel = config.sequence_parallel  # finalize_model_grads: sum over TP
            if etp > 1:  # each expert-TP rank holds the same expert-TP total: count it once
                param.register_hook(lambda grad, etp=etp: grad / etp)


def uses_grouped_gemm(cfg: ModelConfig) -> bool:
    """TE grouped-GEMM experts share one activation module over all local experts, so they are
    used only for activations without learnable coefficients; PolyCom keeps per-expert MLPs."""
    has_params = any(True for _ in build_activation(cfg.activation, **cfg.activation_kwargs).parameters())
    return cfg.moe.grouped_gemm and transformer_engine_available() and not has_params


def uses_torch_grouped_experts(cfg: ModelConfig) -> bool:
    """``model.moe.grouped_gemm`` where TE's grouped GEMM is not used (no Transformer Engine, or
    experts with learnable coefficients): ``dense_model.moe_experts.GroupedExperts``."""
    return cfg.moe.grouped_gemm and not uses_grouped_gemm(cfg)


def moe_layer_spec(cfg: ModelConfig, dense_activation):
    """The stock MoE layer spec with ExpertActivation in the experts and ``dense_activation`` (the
    dense MLP's activation spec) in the shared expert."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    prepare_megatron_moe()
    num_experts = cfg.moe.num_experts
    if cfg.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=uses_grouped_gemm(cfg)
        )
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
        )
    moe = spec.submodules.mlp.submodules
    moe.experts.submodules.activation_func = ModuleSpec(
        module=ExpertActivation, params=dense_activation.params
    )
    moe.shared_experts.submodules.activation_func = dense_activation
    from dense_model.moe_experts import GroupedExperts, SequentialExperts

    if uses_torch_grouped_experts(cfg):  # SequentialMLP's modules and checkpoint keys, grouped GEMMs
        moe.experts.module = GroupedExperts
    if cfg.moe.activation_params == "shared":
        assert moe.experts.module in (GroupedExperts, SequentialMLP), moe.experts.module
        if moe.experts.module is SequentialMLP:
            moe.experts.module = SequentialExperts
        moe.experts.params = {
            "shared_activation": ModuleSpec(module=SharedExpertActivation, params=dense_activation.params)
        }
    return spec


def router_loss_coeffs(m: ModelConfig) -> tuple[float, float | None]:
    """(load-balancing, z-loss) coefficients handed to megatron-core, which adds each layer's loss
    times its coefficient: the total is the sum over layers.

    ``per_layer``: the config's numbers as they are. ``olmoe``: megablocks' (OLMoE branch)
    ``batched_load_balancing_loss`` scales the load-balancing loss by
    ``weight * E / (layers * tokens * top_k)`` over all layers' counts and mean probabilities, which
    is megatron-core's per-layer formula (``E / (top_k * tokens^2)``) summed over layers times
    ``weight / layers``; and its z-loss is ``weight * sum(logsumexp^2) / (layers * tokens * top_k)``,
    megatron-core's per-layer mean of logsumexp^2 summed over layers times ``weight / (layers *
    top_k)``. So the same 0.01 / 0.001 are 16x / 128x weaker in OLMoE-1B-7B (16 layers, top-8).
    """
    moe = m.moe
    if moe.router_loss_scaling == "per_layer":
        return moe.aux_loss_coeff, moe.z_loss_coeff
    z = None if moe.z_loss_coeff is None else moe.z_loss_coeff / (m.num_layers * moe.router_topk)
    return moe.aux_loss_coeff / m.num_layers, z


def moe_transformer_config_kwargs(cfg: Config) -> dict:
    """TransformerConfig fields for the MoE layers and the expert-parallel layout."""
    moe, p = cfg.model.moe, cfg.parallel
    aux_coeff, z_coeff = router_loss_coeffs(cfg.model)
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.router_topk,
        moe_ffn_hidden_size=expert_ffn_hidden_size(cfg.model),
        # softmax over all experts, then the top-k probabilities without renormalising (OLMoE);
        # else top-k of the logits and a softmax over those k
        moe_router_pre_softmax=moe.router_score == "softmax_then_topk",
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_coeff,
        moe_z_loss_coeff=z_coeff,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_grouped_gemm=uses_grouped_gemm(cfg.model),
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size(p),
    )


def expert_param_layout(model, global_name: str) -> tuple[str, int, int]:
    """(name with the global expert index, expert-TP rank, expert-TP size) of a routed expert's
    parameter ``decoder.layers.L.mlp.experts.local_experts.I.*``: the init draws each expert's
    weights from its global name, so they do not depend on the EP/expert-TP layout."""
    from megatron.core import parallel_state as ps

    head, tail = global_name.split(".local_experts.", 1)
    local_index, rest = tail.split(".", 1)
    num_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    global_index = ps.get_expert_model_parallel_rank() * num_local + int(local_index)
    return (
        f"{head}.local_experts.{global_index}.{rest}",
        ps.get_expert_tensor_parallel_rank(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def moe_mlp_flops_per_token(m: ModelConfig) -> float:
    """Forward FLOPs of one MoE layer's MLP per token, active parameters only: the router, top-k
    routed experts and the shared expert (matmuls only, as for the dense MLP)."""
    h, moe = m.hidden_size, m.moe
    up = 2 if get_activation_entry(m.activation).gated else 1
    expert = 2 * h * expert_ffn_hidden_size(m) * (up + 1)  # fc1 [h -> up*F] + fc2 [F -> h]
    shared = 2 * h * (moe.shared_expert_ffn_hidden_size or 0) * (up + 1)
    return 2 * h * moe.num_experts + moe.router_topk * expert + shared


class MoEMonitor:
    """Router metrics between two log lines: aux losses (megatron's tracker) and tokens per expert.

    ``metrics(steps, microbatches)`` is collective (all ranks, at log steps) and returns, averaged
    over layers: ``moe_aux_loss`` / ``moe_z_loss`` (unscaled by their coefficients, per
    micro-batch) and the expert load, tokens per expert / the mean: ``expert_load_min``/``max``
    (worst layer; 1 = balanced) and ``expert_load_entropy`` (normalised by log E; 1 = uniform).
    """

    def __init__(self, model, cfg: Config):
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg
        self.counts = torch.zeros(cfg.model.num_layers, cfg.model.moe.num_experts, dtype=torch.float64)
        self.counting = True
        for module in model.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(self._count)

    def _count(self, router, inputs, output):
        if self.counting:
            _, routing_map = output  # [tokens, experts] bool
            self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(self.counts.dtype).cpu()

    @contextlib.contextmanager
    def paused(self):
        """Validation forwards: neither counted nor added to the aux-loss tracker."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        saved = {name: entry["values"].clone() for name, entry in tracker.items()}
        self.counting = False
        try:
            yield
        finally:
            self.counting = True
            for name, entry in tracker.items():
                entry["values"].copy_(saved[name]) if name in saved else entry["values"].zero_()

    def metrics(self, steps: int, microbatches: int) -> dict[str, float]:
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
            reduce_aux_losses_tracker_across_ranks,
        )

        out = {}
        tracker = get_moe_layer_wise_logging_tracker()
        reduce_aux_losses_tracker_across_ranks()
        if self.cfg.parallel.sequence_parallel:
            # megatron-core leaves the z-loss at each TP rank's own slice of the sequence (the
            # load-balancing loss is already global, the same on every TP rank): mean over TP.
            tp = ps.get_tensor_model_parallel_group()
            for entry in tracker.values():
                collectives.sum_over_group(entry["values"], tp).div_(dist.get_world_size(tp))
        for name, key in (("load_balancing_loss", "moe_aux_loss"), ("z_loss", "moe_z_loss")):
            if name in tracker:
                per_layer = tracker[name]["values"].double() / max(steps * microbatches, 1)
                out[key] = per_layer.mean().item()
        clear_aux_losses_tracker()

        counts = self.counts.clone()
        groups = [ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()]
        if self.cfg.parallel.sequence_parallel:  # each TP rank routed its own sequence shard
            groups.append(ps.get_tensor_model_parallel_group())
        for group in groups:
            if dist.get_world_size(group) > 1:
                collectives.sum_over_group(counts, group)  # on the group's device (NCCL: the GPU)
        self.counts.zero_()
        load = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-12)  # [layers, experts]
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
        entropy = -(share * share.clamp(min=1e-30).log()).sum(dim=1) / math.log(max(counts.shape[1], 2))
        out["expert_load_min"] = load.min().item()  # [layers, experts] -> worst expert anywhere
        out["expert_load_max"] = load.max().item()
        out["expert_load_entropy"] = entropy.mean().item()
        return out
