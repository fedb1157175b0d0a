"""QK-norm over the full query / key width (OLMo's and OLMoE's), tensor-parallel, in megatron-core's
``q_layernorm`` / ``k_layernorm`` slots.

``model.qk_norm`` chooses what normalises the queries and keys before RoPE and attention:

- ``none``: nothing (Llama, the paper's dense run).
- ``per_head``: megatron-core's ``qk_layernorm``: one RMSNorm with a gain of ``head_dim`` shared by
  every head, each head normalised on its own.
- ``full``: the paper's MoE run (an OLMoE fork): one RMSNorm over the whole query projection
  (``num_attention_heads x head_dim`` = hidden) and one over the whole key projection
  (``num_query_groups x head_dim``), with a gain as wide, applied before the head split. Its
  statistic, mean(x^2) over every head of a token, spans the TP ranks (each holds
  ``heads / TP`` heads): the per-token sum of squares is all-reduced over the TP group, forward and
  backward (every rank's output depends on every rank's heads), as PolyNorm's statistics are
  (``activations/_polycom.py``). The gain is sharded like the heads (rank r holds heads
  ``r*heads/TP ..``), so its gradient is complete on each rank (it is marked TP-parallel, never
  summed over TP), and checkpoints store it whole, split along dim 0 (``sharded_state_dict``), so
  a save at one TP size loads at another.

Numerics as OLMo's ``RMSLayerNorm`` and transformers' ``OlmoeRMSNorm``: the statistic in fp32 (fp64
stays fp64), ``x * rsqrt(mean(x^2) + eps)`` cast back to the input dtype, then times the gain;
eps is ``model.norm_epsilon`` (1e-5, OLMo's ``layer_norm_eps``).
"""

from __future__ import annotations

import torch

from dense_model import collectives
from dense_model.activations._polycom_common import tp_world_size

QK_NORMS = ("none", "per_head", "full")


def full_width_rms_norm(x, weight, eps: float, width: int, tp_group=None):
    """RMSNorm of each token over all its heads, TP-aware.

    x: [..., heads_local, head_dim] (megatron's [sq, b, np, hn]); weight: [heads_local * head_dim];
    width: heads x head_dim over the whole TP group. Returns a tensor like x (dtype: x's and the
    gain's, promoted)."""
    return _FullWidthRMSNorm.apply(x, weight, float(eps), int(width), tp_group)


class _FullWidthRMSNorm(torch.autograd.Function):
    """``w * (x * rsqrt(mean(x^2) + eps))`` with the mean over every head of the token, its sum of
    squares all-reduced over the TP group.

    A hand-written backward rather than autograd's: autograd's graph of the broadcasting formula
    takes about twice the passes over q and k (square, sum, two broadcast products and their
    backward reductions), and megatron hands q and k over as strided views of the fused QKV output,
    which every one of those passes (and the copies a reshape makes of them) reads slowly. Here x is
    made contiguous once and seen as rows, one per token ([tokens, local width]). With
    x^ = x * r, r = rsqrt(S/W + eps) and S the sum of squares over all ranks' heads:
        dL/dx = r * (g' - x^ * <g', x^> / W),   g' = g * w,
    where <g', x^> spans every head too, so it is all-reduced over TP as S is. x^ is kept in the
    statistic's dtype (fp32 at least), so bf16 gradients are those of the fp32 formula.

    Passes over the rows: forward a copy, a norm and two products; backward two products, a column
    sum, a product with the gain vector, an addcmul and a scaling. Where x^ is also the normalised
    output (x in fp32 or fp64), <g', x^> is (g * x^) @ w, a matrix-vector product on the rows the
    gain gradient sums anyway, instead of one more pass."""

    @staticmethod
    def forward(ctx, x, weight, eps, width, tp_group):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 at least
        # [tokens, local width], this function's own copy (x is a strided view of the fused QKV
        # output), normalised in place
        rows = x.to(compute, memory_format=torch.contiguous_format, copy=True).view(-1, weight.numel())
        sumsq = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).square_()  # [tokens, 1]
        if tp_world_size(tp_group) > 1:
            collectives.sum_over_group(sumsq, tp_group)  # all heads of the token
        rstd = sumsq.mul_(1.0 / width).add_(eps).rsqrt_()  # [tokens, 1]
        xhat = rows.mul_(rstd)
        normed = xhat if x.dtype == compute else xhat.to(x.dtype)
        ctx.save_for_backward(xhat, weight, rstd, normed)
        ctx.width, ctx.tp_group, ctx.x_dtype, ctx.x_shape = width, tp_group, x.dtype, x.shape
        return (normed * weight).view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, weight, rstd, normed = ctx.saved_tensors
        rows = grad.reshape(xhat.shape)  # [tokens, local width]
        prod = rows * normed
        grad_gain = prod.sum(0)  # [local width]
        if normed.dtype == xhat.dtype:  # normed is x^: <g * w, x^> = (g * x^) @ w
            dot = torch.mv(prod, weight.to(prod.dtype))  # [tokens]
            grad_x = torch.mul(rows, weight, out=prod)  # g' = g * w, in prod's place
        else:
            grad_x = (rows * weight).to(xhat.dtype)
            dot = torch.linalg.vecdot(grad_x, xhat)
        if tp_world_size(ctx.tp_group) > 1:
            collectives.sum_over_group(dot, ctx.tp_group)
        grad_x.addcmul_(xhat, dot.mul_(-1.0 / ctx.width).unsqueeze(-1)).mul_(rstd)
        return grad_x.view(ctx.x_shape).to(ctx.x_dtype), grad_gain.to(weight.dtype), None, None, None


class FullWidthQKNorm(torch.nn.Module):
    """The ``full`` QK-norm in megatron's q_layernorm / k_layernorm slot (``heads``: "query" or
    "key"). The slot passes ``hidden_size`` = head_dim; the head counts come from the config."""

    def __init__(
        self, config, hidden_size: int, eps: float = 1e-5, heads: str = "query", tp_group=None, **unused
    ):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        if heads not in ("query", "key"):
            raise ValueError(f"FullWidthQKNorm heads={heads!r}: 'query' or 'key'")
        tp = config.tensor_model_parallel_size
        total = config.num_attention_heads if heads == "query" else config.num_query_groups
        total = total or config.num_attention_heads
        if total % tp:
            # the config check (model.qk_norm, config/rules.py) says this before launch
            raise ValueError(f"qk_norm=full: {total} {heads} heads are not divisible by TP={tp}")
        self.heads, self.eps, self.width = heads, float(eps), total * hidden_size
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(
            torch.ones(total // tp * hidden_size, dtype=config.params_dtype)  # this rank's heads
        )
        # TP-sharded like the heads: grad-norm counts each slice once and finalize_model_grads
        # leaves it alone (model.qk_norm=full keeps TransformerConfig.qk_layernorm off, which would
        # sum every q/k_layernorm gradient over TP).
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x):  # x: [sq, b, heads_local, head_dim]
        return full_width_rms_norm(x, self.weight, self.eps, self.width, self.tp_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The gain as one tensor of the full width, split along dim 0 over TP (resharding loads)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)

    def extra_repr(self) -> str:
        return f"{self.heads}, width={self.width} (local {self.weight.numel()}), eps={self.eps}"


def qk_norm_slots(qk_norm: str, transformer_impl: str):
    """What goes into SelfAttentionSubmodules' (q_layernorm, k_layernorm) for ``model.qk_norm``;
    None for ``none`` (the stock spec's slots are kept)."""
    if qk_norm == "none":
        return None
    if qk_norm == "per_head":
        if transformer_impl == "transformer_engine":
            from megatron.core.extensions.transformer_engine import TENorm

            return TENorm, TENorm
        from dense_model.norm import RMSNorm

        return RMSNorm, RMSNorm
    if qk_norm == "full":
        from megatron.core.transformer.spec_utils import ModuleSpec

        return (
            ModuleSpec(module=FullWidthQKNorm, params={"heads": "query"}),
            ModuleSpec(module=FullWidthQKNorm, params={"heads": "key"}),
        )
    raise ValueError(f"model.qk_norm={qk_norm!r}: one of {', '.join(QK_NORMS)}")
