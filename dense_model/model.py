"""The model: megatron-core's GPTModel, Llama style, with the MLP activation from the registry.

    initialize_parallel(tp, pp)
    model = build_model(cfg)                 # GPTModel for this rank's pipeline stage

Llama style: RMSNorm, RoPE (base 10000), untied embeddings, no linear biases, no dropout by default.
The activation is swapped through megatron-core's ``ModuleSpec``: the stock layer spec (local or
Transformer Engine) is kept whole; the MLP's ``activation_func`` submodule is replaced by
``RegistryActivation``, which builds ``dense_model.activations.build_activation(name)``, the
core attention follows ``model.attention_backend`` (``dense_model.attention``), and the local
spec's norms are ``dense_model.norm.RMSNorm`` (sequence parallelism). The transformer layer is
never copied. Gated activations set ``gated_linear_unit`` so fc1 is 2x wide
with megatron's [gate, up] layout and checkpoint resharding across TP sizes stays right.
"""

from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.nn.functional as F

from dense_model.activations import build_activation, get_activation_entry, import_activation_modules
from dense_model.backends import Kernels, installed_kernels, transformer_engine_available
from dense_model.config import (
    Config,
    ModelConfig,
    expert_ffn_hidden_size,
    ffn_hidden_size,
    moe_enabled,
    padded_vocab_size,
)
from dense_model.mlp import RegistryActivation
from dense_model.qk_norm import qk_norm_slots
from dense_model.rope import install_rope_fusion, rope_fusion_backend


def model_device() -> torch.device:
    """This rank's device: its GPU (set by initialize_parallel from LOCAL_RANK) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def fusion_flags(
    device: torch.device, kernels: Kernels, transformer_impl: str = "local", rope_fusion: bool | str = "auto"
) -> dict[str, bool]:
    """megatron-core's fusion flags for a model on ``device``: each on only where its kernel imports.

    - bias_dropout_fusion: torch's own JIT fuser, any CUDA device.
    - masked_softmax_fusion: the local attention imports apex's softmax extensions in bf16/fp16
      (``fusions/fused_softmax.py``); without apex that is a ModuleNotFoundError on the first forward.
    - persist_layer_norm: only apex's FusedLayerNorm reads it, and neither spec uses it for RMSNorm
      (the local spec's norms are dense_model.norm's), so it is always off.
    - apply_rope_fusion: ``model.rope_fusion`` (``dense_model.rope.rope_fusion_backend``): Transformer
      Engine's kernel where TE imports, else our Triton kernel, which ``transformer_config`` installs
      as megatron-core's (megatron-core refuses the flag while it has no fused function).
    - gradient_accumulation_fusion: apex's fused_weight_gradient_mlp_cuda (megatron's own linear
      layers, the output layer included, need it in both specs).
    """
    cuda = device.type == "cuda"
    return {
        "bias_dropout_fusion": cuda,
        "masked_softmax_fusion": cuda and transformer_impl == "local" and kernels.apex_softmax,
        "persist_layer_norm": False,
        "apply_rope_fusion": rope_fusion_backend(rope_fusion, device, kernels) is not None,
        "gradient_accumulation_fusion": cuda and kernels.apex_grad_accum,
    }


def cross_entropy_fusion_wanted(setting, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``training.cross_entropy_fusion`` (auto, true, false) turns on megatron-core's native
    fused cross-entropy for a model on ``device`` in ``dtype``. auto = on GPUs in bf16 only: the fused
    backward casts the logits' gradient to bf16 whatever the logits' dtype (``calculate_gradients``
    in ``fusions/fused_cross_entropy.py``), which in bf16 is the dtype autograd hands the output layer
    anyway and in fp32 a rounding the unfused path does not make; and it runs through torch.compile,
    which on the CPU costs a C++ build of its kernels (about 30 s on the 2-core test machine)."""
    if setting == "auto":
        return device.type == "cuda" and dtype == torch.bfloat16
    return bool(setting)


def params_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 where asked for and on a GPU, else fp32 (CPU bf16 matmuls are slow and the tests run fp32)."""
    return torch.bfloat16 if cfg.training.bf16 and device.type == "cuda" else torch.float32


def activation_entry(m: ModelConfig):
    """The registry entry of ``m.activation``, once the modules in ``m.activation_modules`` are imported."""
    import_activation_modules(m.activation_modules)
    return get_activation_entry(m.activation)


def layer_spec(cfg: ModelConfig, device: torch.device | None = None):
    """megatron-core's stock GPT layer spec with the MLP activation replaced by the registry's and the
    core attention chosen by ``cfg.attention_backend`` for ``device`` (default: this rank's), and the
    q/k norm slots filled per ``cfg.qk_norm`` (``dense_model.qk_norm``)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.spec_utils import ModuleSpec

    # dense_model.attention subclasses megatron-core's attention: imported with megatron-core, here.
    from dense_model.attention import SDPAttention, select_attention_backend

    if cfg.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not installed "
                "(or no GPU): pip install 'transformer-engine[pytorch]' on a CUDA machine, or set "
                "model.transformer_impl=local"
            )
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    activation = ModuleSpec(
        module=RegistryActivation,
        params={"name": cfg.activation, "kwargs": dict(cfg.activation_kwargs), "fused": cfg.fused_activation},
    )
    if moe_enabled(cfg):
        from dense_model.moe import moe_layer_spec

        spec = moe_layer_spec(cfg, activation)
    else:
        spec = copy.deepcopy(spec)
        spec.submodules.mlp.submodules.activation_func = activation
    backend = select_attention_backend(cfg.attention_backend, cfg.transformer_impl, device or model_device())
    attention = spec.submodules.self_attention.submodules
    if cfg.transformer_impl == "local":  # our RMSNorm instead of megatron's torch norm: it takes SP
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from dense_model.norm import RMSNorm

        for slots in (spec.submodules, attention):
            for slot in ("input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm"):
                if getattr(slots, slot, None) is WrappedTorchNorm:
                    setattr(slots, slot, RMSNorm)
    qk_slots = qk_norm_slots(cfg.qk_norm, cfg.transformer_impl)  # model.qk_norm (dense_model.qk_norm)
    if qk_slots is not None:
        attention.q_layernorm, attention.k_layernorm = qk_slots
    if backend == "sdpa":
        attention.core_attention = SDPAttention
    elif backend == "local":
        attention.core_attention = DotProductAttention
    return spec


def recompute_granularity(cfg: Config, device: torch.device) -> str | None:
    """megatron's recompute granularity for ``cfg`` on ``device``. Selective recompute re-runs the
    core attention in backward (megatron's only selective module in a dense model): worth it with
    the local module, which saves the [b*h, s, s] scores, waste with SDPA's and TE's fused kernels,
    which save only the output and its log-sum-exp; with those, selective means no recompute."""
    from dense_model.attention import select_attention_backend

    granularity = cfg.training.recompute_granularity
    if granularity == "none":
        return None
    if granularity == "selective":
        m = cfg.model
        if select_attention_backend(m.attention_backend, m.transformer_impl, device) in ("sdpa", "te"):
            return None
    return granularity


def transformer_config(
    cfg: Config,
    perform_initialization: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    kernels: Kernels | None = None,
):
    """megatron-core TransformerConfig for ``cfg`` (Llama style) on ``device`` (default: this rank's),
    in ``dtype`` (default: ``params_dtype``), with the fusions the ``kernels`` installed allow."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, t = cfg.model, cfg.parallel, cfg.training
    device = model_device() if device is None else device
    dtype = params_dtype(cfg, device) if dtype is None else dtype
    bf16 = dtype == torch.bfloat16
    kernels = installed_kernels() if kernels is None else kernels
    gated = activation_entry(m).gated
    recompute = recompute_granularity(cfg, device)
    if rope_fusion_backend(m.rope_fusion, device, kernels) == "triton":
        install_rope_fusion()  # megatron-core's TransformerConfig checks that a fused function is there
    if moe_enabled(m):
        from dense_model.moe import moe_transformer_config_kwargs

        moe_kwargs = moe_transformer_config_kwargs(cfg)
    else:
        moe_kwargs = {}
    return TransformerConfig(
        **moe_kwargs,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn_hidden_size(m),
        kv_channels=m.hidden_size // m.num_attention_heads,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=False,
        gated_linear_unit=gated,
        # The MLP calls the spec's activation module (RegistryActivation). megatron-core validates
        # activation_func against the TE-supported set when this flag is on; the value is unused.
        use_te_activation_func=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        # per_head's gain is shared by the heads of every TP rank: finalize_model_grads sums its
        # gradient over TP when this is on (model.qk_norm=full's gain is TP-sharded: off).
        qk_layernorm=m.qk_norm == "per_head",
        init_method_std=m.init_method_std,
        bf16=bf16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        recompute_granularity=recompute,
        recompute_method=t.recompute_method if recompute == "full" else None,
        recompute_num_layers=t.recompute_num_layers if recompute == "full" else None,
        # megatron's init also sets the TP attributes that grad-norm and the optimizer read;
        # initialize_weights() then redraws the values so they do not depend on the TP/PP layout.
        use_cpu_initialization=device.type != "cuda",
        perform_initialization=perform_initialization,
        **fusion_flags(device, kernels, m.transformer_impl, m.rope_fusion),
        cross_entropy_loss_fusion=cross_entropy_fusion_wanted(t.cross_entropy_fusion, device, dtype),
        cross_entropy_fusion_impl="native",  # "te" needs Transformer Engine's kernel
        attention_softmax_in_fp32=True,
    )


def build_model(
    cfg: Config,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    initialize: bool = True,
    allocate_only: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """The GPTModel of this rank's pipeline stage (needs ``initialize_parallel`` first), on ``device``
    (default: this rank's GPU, or the CPU) in ``dtype`` (default: bf16 on GPUs when training.bf16).

    Weights are drawn by ``initialize_weights``: identical for every TP/PP layout. ``initialize=False``
    skips that (a checkpoint is loaded next); ``allocate_only=True`` also skips megatron's own init
    (uninitialised memory: for counting the parameters of big models, not for training).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    m = cfg.model
    device = model_device() if device is None else device
    config = transformer_config(cfg, perform_initialization=not allocate_only, device=device, dtype=dtype)
    spec = layer_spec(m, device)
    if m.transformer_impl == "local":  # the final norm too (the block default: TE, apex or torch norm)
        from megatron.core.transformer.transformer_block import (
            TransformerBlockSubmodules,
            get_num_layers_to_build,
        )

        from dense_model.norm import RMSNorm

        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(m, cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not m.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
    )
    if initialize and not allocate_only:
        initialize_weights(model, cfg)
    # megatron-core leaves some parameters where torch made them (norm weights, the PolyCom
    # scalars: CPU, fp32); Megatron-LM's trainer moves the model itself, so we do it here, once.
    return model.to(device=device, dtype=model.config.params_dtype)


def _global_name(model, name: str) -> str:
    """Parameter name with the local layer index replaced by the global one (PP stages)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


@torch.no_grad()
def initialize_weights(model, cfg: Config, seed: int | None = None) -> None:
    """Draw every weight from a generator keyed by (seed, global parameter name), then keep this
    rank's TP slice: the same model whatever the TP/PP layout (megatron's own init depends on PP).

    ``model.init=megatron``: normal(0, std) everywhere, std / sqrt(2 * layers) for the layers that
    write into the residual stream (attention linear_proj, MLP linear_fc2). ``olmo_normal`` (OLMo's
    ``init_fn: normal``, the seed's MoE run): every matrix, router, embedding and output layer
    included, normal(0, std) truncated at +-``init_cutoff_factor`` std, no depth scaling. Ones for
    norms; PolyCom scalars keep their own init (1/r, 0).
    """
    from megatron.core import parallel_state as ps

    seed = cfg.training.seed if seed is None else seed
    std = cfg.model.init_method_std
    olmo = cfg.model.init == "olmo_normal"
    residual_std = std if olmo else std / math.sqrt(2.0 * cfg.model.num_layers)
    dense_tp_rank = ps.get_tensor_model_parallel_rank()
    dense_tp = ps.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        if ".activation_func." in name:
            continue
        if "layernorm" in name or name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if name.endswith(".bias"):
            param.zero_()
            continue
        gname = _global_name(model, name)
        tp_rank, tp = dense_tp_rank, dense_tp
        if ".local_experts." in gname:  # routed MoE experts: global expert index, expert-TP slice
            from dense_model.moe import expert_param_layout

            gname, tp_rank, tp = expert_param_layout(model, gname)
        sliced = getattr(param, "tensor_model_parallel", False) and tp > 1
        dim = getattr(param, "partition_dim", 0)
        full_shape = list(param.shape)
        if sliced:
            full_shape[dim] *= tp
        # Drawn on the CPU whatever the parameter's device: a GPU run starts from the CPU run's weights.
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
        s = residual_std if ("linear_proj" in name or "linear_fc2" in name) else std
        full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
        if olmo:
            cut = cfg.model.init_cutoff_factor * s
            torch.nn.init.trunc_normal_(full, mean=0.0, std=s, a=-cut, b=cut, generator=gen)
        else:
            full.normal_(0.0, s, generator=gen)
        if sliced:
            # Megatron's layout: split into tp * stride chunks, rank r keeps chunks r, r + tp, ...
            stride = getattr(param, "partition_stride", 1)
            chunks = torch.chunk(full, tp * stride, dim=dim)
            full = torch.cat(chunks[tp_rank::tp], dim=dim)
        param.copy_(full.to(param.dtype))


def count_parameters(m: ModelConfig) -> dict[str, int]:
    """Parameter counts of the full (unsharded) model, analytically; tested against a built model."""
    h, layers = m.hidden_size, m.num_layers
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    kv = h // heads
    ffn = ffn_hidden_size(m)
    gated = activation_entry(m).gated
    act = build_activation(m.activation, **m.activation_kwargs)
    act_params = sum(p.numel() for p in act.parameters())
    attention = h * (heads + 2 * groups) * kv + heads * kv * h
    mlp = h * ffn * (2 if gated else 1) + ffn * h
    mlp += act_params
    active_mlp = mlp
    if moe_enabled(m):  # each expert an MLP with its own activation, the router [experts, h]
        moe = m.moe
        width = expert_ffn_hidden_size(m)
        one_set = moe.activation_params == "shared"  # one activation per layer for all routed experts
        expert = h * width * (2 if gated else 1) + width * h + (0 if one_set else act_params)
        shared = moe.shared_expert_ffn_hidden_size or 0
        always = moe.num_experts * h + (
            h * shared * (2 if gated else 1) + shared * h + act_params if shared else 0
        )
        always += act_params if one_set else 0
        mlp, active_mlp = moe.num_experts * expert + always, moe.router_topk * expert + always
        act_params *= (1 if one_set else moe.num_experts) + (1 if shared else 0)
    norms = 2 * h + {"none": 0, "per_head": 2 * kv, "full": (heads + groups) * kv}[m.qk_norm]
    per_layer = attention + mlp + norms
    vocab = padded_vocab_size(m, 1)
    embedding = vocab * h
    output = vocab * h if m.untie_embeddings else 0
    total = layers * per_layer + embedding + output + h  # + final norm
    return {
        "total": total,
        "active": total - layers * (mlp - active_mlp),  # per token: top-k experts (= total when dense)
        "non_embedding": total - embedding - output,
        "per_layer": per_layer,
        "mlp_per_layer": mlp,
        "activation_per_layer": act_params,
        "embedding": embedding,
        "output_layer": output,
    }
