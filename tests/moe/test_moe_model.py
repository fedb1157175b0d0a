"""MoE models over gloo: EP=2, expert-TP=2 and expert-TP != TP against one process, the spec, config checks.

Every rank of a layout gets the same micro-batches (deterministic routing inputs), so logits and
the LM loss must equal the one-process model's; the experts' PolyNorm coefficient gradients must
too, up to how many ranks sent each expert the same tokens.
"""

import pytest
import torch

from dense_model.config import ConfigError, load_config, validate
from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

VOCAB, SEQ, MBS, MICROBATCHES, EXPERTS = 256, 16, 2, 2, 4


def moe_overrides(activation="polynorm", tp=1, ep=1, etp=None) -> list[str]:
    return [
        *tiny_model_overrides(activation=activation, layers=2, vocab=VOCAB, seq=SEQ),
        f"model.moe.num_experts={EXPERTS}",
        "model.moe.router_topk=2",
        "model.moe.ffn_hidden_size=32",
        "model.moe.z_loss_coeff=1e-3",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.expert_model_parallel_size={ep}",
        f"parallel.expert_tensor_parallel_size={etp or tp}",
        "training.recompute_granularity=none",
    ]


def moe_config(activation="polynorm", tp=1, ep=1, etp=None):
    return load_config(None, moe_overrides(activation, tp, ep, etp))


def fixed_batches():
    return random_lm_batches(MICROBATCHES, MBS, SEQ, VOCAB)


def _run(rank, world_size, layout, out_file):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dense_model.model import build_model
    from dense_model.moe import expert_param_layout
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.step import forward_backward, reduce_lm_loss

    cfg = moe_config(**layout)
    initialize_parallel_from(cfg.parallel, seed=11)
    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11, force_reset_rng=True)
    model = build_model(cfg)
    # Dropout is 0, so eval mode computes the same; it skips MoELayer's training-only refusal of
    # TP > 1 without sequence parallelism (training with it: tests/test_sequence_parallel.py).
    model.eval()
    batches = fixed_batches()
    with torch.no_grad():
        logits = model(batches[0]["tokens"], batches[0]["position_ids"], None)  # [b, s, v/tp]
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    losses = forward_backward([model], iter(batches), MICROBATCHES, SEQ, MBS)
    coef_grads = {}
    for name, param in model.named_parameters():
        if ".activation_func." in name:  # keyed by global expert index
            coef_grads[expert_param_layout(model, name)[0]] = param.grad.clone()
    torch.save(
        {"logits": torch.cat(parts, dim=-1), "loss": reduce_lm_loss(losses), "coef_grads": coef_grads},
        f"{out_file}.rank{rank}",
    )


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("moe_layouts")
    cache = {}

    def get(name, world_size, **layout):
        if name not in cache:
            out = out_dir / name
            spawn_workers(_run, world_size, layout, str(out))
            cache[name] = [torch.load(f"{out}.rank{r}") for r in range(world_size)]
        return cache[name]

    return get


def _check_same(ranks, ref, grad_scale=1.0):
    merged = {}
    for res in ranks:
        torch.testing.assert_close(res["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        merged.update(res["coef_grads"])
    assert (
        merged.keys() == ref["coef_grads"].keys() and len(merged) == 2 * EXPERTS * 2
    )  # layers x experts x (a1..ar, a0)
    for key, grad in ref["coef_grads"].items():
        assert grad.abs().sum() > 0, key  # each expert got tokens and a coefficient gradient
        torch.testing.assert_close(merged[key] / grad_scale, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ep2_matches_one_process(layouts):
    ref = layouts("ref", 1)[0]
    # Both ranks send each expert the same tokens, so an expert's local gradient is twice one
    # process's (DDP would average it over the expert data-parallel ranks).
    _check_same(layouts("ep2", 2, ep=2), ref, grad_scale=2.0)


@pytest.mark.slow
def test_expert_tp2_matches_one_process(layouts):
    """PolyNorm's row statistics and coefficient gradients over the expert-TP group: every
    expert-TP rank holds the full coefficient gradient."""
    ref = layouts("ref", 1)[0]
    ranks = layouts("etp2", 2, tp=2, etp=2)
    # Without sequence parallelism megatron's dispatcher gathers both TP ranks' (identical) tokens,
    # so each expert sees every token twice; per-rank slices alone would not sum to 2x on each rank.
    _check_same(ranks, ref, grad_scale=2.0)
    for key in ref["coef_grads"]:
        torch.testing.assert_close(ranks[0]["coef_grads"][key], ranks[1]["coef_grads"][key])


@pytest.mark.slow
def test_expert_tp_group_differs_from_dense_tp(layouts):
    """TP=2 with expert-TP=1, EP=2: the experts' PolyNorm must reduce over its expert-TP group
    (size 1), not over the dense TP pair, whose two ranks hold different experts."""
    ref = layouts("ref", 1)[0]
    # Without sequence parallelism both TP ranks route the same tokens: each expert gets them twice.
    _check_same(layouts("tp2_ep2", 2, tp=2, etp=1, ep=2), ref, grad_scale=2.0)


def test_spec_puts_registry_activation_in_every_expert():
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from dense_model.model import RegistryActivation, layer_spec
    from dense_model.moe import ExpertActivation
    from dense_model.moe_experts import GroupedExperts

    cfg = moe_config()
    spec = layer_spec(cfg.model)
    moe = spec.submodules.mlp
    # model.moe.grouped_gemm (the default) without Transformer Engine: torch grouped-GEMM experts
    assert moe.module is MoELayer and moe.submodules.experts.module is GroupedExperts
    cfg.model.moe.grouped_gemm = False
    assert layer_spec(cfg.model).submodules.mlp.submodules.experts.module is SequentialMLP
    expert_act = moe.submodules.experts.submodules.activation_func
    assert expert_act.module is ExpertActivation and expert_act.params["name"] == "polynorm"
    assert moe.submodules.shared_experts.submodules.activation_func.module is RegistryActivation


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (
            ["parallel.expert_model_parallel_size=3"],
            3,
            "not divisible by parallel.expert_model_parallel_size",
        ),
        (["model.moe.router_topk=5"], 1, "router_topk=5"),
        (["parallel.expert_model_parallel_size=2"], 3, "expert_model_parallel_size x pipeline"),
        (
            ["parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"],
            4,
            "sequence_parallel",
        ),
        (["parallel.expert_tensor_parallel_size=2"], 2, "expert_model_parallel_size=1"),
        (["model.moe.num_experts=null", "parallel.expert_model_parallel_size=2"], 2, "model is dense"),
    ],
)
def test_bad_moe_layouts_are_rejected(overrides, world_size, message):
    cfg = load_config(
        None,
        [
            *tiny_model_overrides(),
            "data.demo=true",
            "model.moe.num_experts=4",
            "training.train_iters=8",
            "training.lr_warmup_iters=1",
            *overrides,
        ],
    )
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world_size)


@pytest.mark.parametrize("activation, expert_width", [("polynorm", 1536), ("swiglu", 1024)])
def test_paper_moe_configs_validate_on_64_gpus(activation, expert_width):
    from pathlib import Path

    from dense_model.config import expert_ffn_hidden_size

    # The blend's datasets are not on this machine: the demo data stands in (the layout is what is checked).
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "moe" / f"{activation}.yaml",
        ["data.demo=true", "data.blend=null"],
    )
    validate(cfg, world_size=64)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (16, 2048)
    assert (cfg.model.moe.num_experts, cfg.model.moe.router_topk) == (64, 8)
    assert expert_ffn_hidden_size(cfg.model) == expert_width  # parameter-matched experts


def test_mfu_counts_active_parameters_only():
    """Model FLOPs grow with top-k, not with the number of experts (only the router's E x h)."""
    from dense_model.training.metrics import flops_per_token

    def flops(*overrides):
        return flops_per_token(load_config(None, [*tiny_model_overrides(layers=2), *overrides]))

    base = flops("model.moe.num_experts=4", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=32")
    more_experts = flops("model.moe.num_experts=8", "model.moe.router_topk=2", "model.moe.ffn_hidden_size=32")
    top4 = flops("model.moe.num_experts=8", "model.moe.router_topk=4", "model.moe.ffn_hidden_size=32")
    router = 3 * 2 * 2 * 64 * 4  # training (3x) * 2 FLOPs * layers * hidden * 4 more experts
    assert more_experts - base == router
    expert = 3 * 2 * 2 * 64 * 32 * 2  # training * layers * 2 FLOPs * (fc1 + fc2) of one 32-wide expert
    assert top4 - more_experts == 2 * expert
