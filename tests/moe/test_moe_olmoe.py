"""The seed's (OLMoE's) router, router losses, init and weight decay, on a real megatron-core MoE model.

One spawned process builds a tiny model from ``configs/moe/olmoe_1b7b_polynorm.yaml`` (3 layers,
top-3 of 8 experts, so layers and top-k both scale the losses), runs one training forward and saves
what the router saw and what megatron-core attached to the graph. The references below are float64
re-implementations written from megablocks' OLMoE branch (``layers/router.py`` LearnedRouter,
``layers/moe.py`` batched_load_balancing_loss) and OLMo's ``init_normal`` / ``get_param_groups``.
"""

from pathlib import Path

import pytest
import torch

from dense_model.config import ConfigError, load_config, validate
from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

VOCAB, SEQ, MBS, LAYERS, EXPERTS, TOPK = 256, 16, 2, 3, 8, 3
OLMOE = Path(__file__).resolve().parents[2] / "configs" / "moe" / "olmoe_1b7b_polynorm.yaml"


def olmoe_config(*overrides):
    return load_config(
        OLMOE,
        [
            *tiny_model_overrides(activation="polynorm", layers=LAYERS, vocab=VOCAB, seq=SEQ),
            "data.demo=true",
            "data.blend=null",
            f"model.moe.num_experts={EXPERTS}",
            f"model.moe.router_topk={TOPK}",
            "model.moe.ffn_hidden_size=32",
            "parallel.expert_model_parallel_size=1",
            "parallel.use_distributed_optimizer=false",  # the optimizer holds the model's own parameters
            f"training.micro_batch_size={MBS}",
            "training.recompute_granularity=none",
            "training.train_iters=4",
            "training.lr_warmup_iters=1",
            *overrides,
        ],
    )


def _run(rank, world_size, out_file):
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_scheduler, build_training_model, torch_adams

    cfg = olmoe_config()
    initialize_parallel_from(cfg.parallel, seed=11)
    model, ddp, optimizer = build_training_model(cfg)
    result = {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "routers": []}

    def weight_decay_by_name(cfg):
        model, _, optimizer = build_training_model(cfg)
        build_scheduler(optimizer, cfg)  # sets each group's weight_decay from its wd_mult
        decay = {
            id(p): g["weight_decay"]
            for opt in torch_adams(optimizer)
            for g in opt.param_groups
            for p in g["params"]
        }
        return {n: decay[id(p)] for n, p in model.named_parameters()}

    result["decay_all"] = weight_decay_by_name(cfg)
    result["decay_matrices"] = weight_decay_by_name(olmoe_config("training.weight_decay_on=matrices"))

    # What megatron-core adds to the objective: every aux loss goes through MoEAuxLossAutoScaler
    # (z-loss on the logits first, then the load-balancing loss on the probabilities, per router).
    attached, apply = [], moe_utils.MoEAuxLossAutoScaler.apply

    def record(activation, aux_loss):
        attached.append(aux_loss.detach().double())
        return apply(activation, aux_loss)

    def save_router(router, inputs, output):
        probs, routing_map = output  # [tokens, experts]
        result["routers"].append(
            {
                "input": inputs[0].detach().double().reshape(-1, router.weight.shape[1]),
                "weight": router.weight.detach().double(),
                "probs": probs.detach().double(),
                "map": routing_map.clone(),
            }
        )

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(save_router)
    moe_utils.MoEAuxLossAutoScaler.apply = record
    try:
        batch = random_lm_batches(1, MBS, SEQ, VOCAB)[0]
        model.train()
        model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    finally:
        moe_utils.MoEAuxLossAutoScaler.apply = apply
    result["z_attached"], result["lb_attached"] = attached[0::2], attached[1::2]
    torch.save(result, out_file)


@pytest.fixture(scope="module")
def olmoe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("olmoe") / "run.pt"
    spawn_workers(_run, 1, str(out))
    return torch.load(out)


def olmoe_losses(routers, lb_weight, z_weight, top_k):
    """megablocks (OLMoE branch) batched_load_balancing_loss in float64: softmax scores over all
    experts, tokens per expert from the top-k, over all layers at once; the z-loss on the logits."""
    num_layers, num_experts = len(routers), routers[0]["weight"].shape[0]
    tokens = routers[0]["input"].shape[0]
    counts, mean_scores, zsum = [], [], 0.0
    for r in routers:
        logits = r["input"] @ r["weight"].T  # [tokens, experts]
        scores = logits.softmax(dim=-1)
        top = torch.topk(scores, top_k, dim=-1).indices
        counts.append(torch.bincount(top.flatten(), minlength=num_experts).double())
        mean_scores.append(scores.mean(dim=0))
        zsum = zsum + (torch.log(torch.exp(logits).sum(dim=-1)) ** 2).sum()
    denominator = num_layers * tokens * top_k
    lb = lb_weight * num_experts / denominator * torch.dot(torch.cat(counts), torch.cat(mean_scores))
    return lb.item(), (z_weight * zsum / denominator).item()


@pytest.mark.slow
def test_router_is_olmoes_softmax_then_topk_without_renormalising(olmoe_run):
    assert len(olmoe_run["routers"]) == LAYERS
    for r in olmoe_run["routers"]:
        scores = (r["input"] @ r["weight"].T).softmax(dim=-1)  # [tokens, experts] over all 8
        top = torch.topk(scores, TOPK, dim=-1)
        expected = torch.zeros_like(scores).scatter(1, top.indices, top.values)
        assert torch.equal(r["map"], expected > 0)
        torch.testing.assert_close(r["probs"], expected, rtol=1e-6, atol=1e-7)
        assert (r["probs"].sum(dim=-1) < 1 - 1e-3).all()  # not renormalised over the top-k


@pytest.mark.slow
def test_router_losses_equal_olmoes_totals(olmoe_run):
    lb, z = olmoe_losses(olmoe_run["routers"], 0.01, 0.001, TOPK)
    assert len(olmoe_run["lb_attached"]) == len(olmoe_run["z_attached"]) == LAYERS
    assert sum(x.item() for x in olmoe_run["lb_attached"]) == pytest.approx(lb, rel=1e-6)
    assert sum(x.item() for x in olmoe_run["z_attached"]) == pytest.approx(z, rel=1e-6)


def test_router_loss_coefficients_are_megablocks_per_layer_share():
    """The exact relationship with megatron-core's per-layer coefficients (16 layers, top-8)."""
    from dense_model.moe import router_loss_coeffs

    paper = load_config(OLMOE, ["data.demo=true", "data.blend=null"]).model
    assert router_loss_coeffs(paper) == pytest.approx((0.01 / 16, 0.001 / (16 * 8)), rel=1e-12)
    paper.moe.router_loss_scaling = "per_layer"
    assert router_loss_coeffs(paper) == (0.01, 0.001)


TRUNCATED_STD = 0.986593  # std of a standard normal truncated at +-3


@pytest.mark.slow
def test_olmo_normal_init_every_matrix(olmoe_run):
    """std 0.02 truncated at 3 sigma for every matrix (router, embedding, output, residual-writing
    layers too: no depth scaling); norms 1; PolyNorm's coefficients their own init."""
    matrices = {n: p for n, p in olmoe_run["params"].items() if p.dim() == 2}
    names = " ".join(matrices)
    for part in ("word_embeddings", "output_layer", "router", "linear_proj", "linear_fc2", "linear_qkv"):
        assert part in names
    for name, w in matrices.items():
        assert w.abs().max().item() <= 3 * 0.02 + 1e-7, name
        assert w.std().item() == pytest.approx(0.02 * TRUNCATED_STD, rel=0.1), name
    pooled = torch.cat([w.flatten() for w in matrices.values()])
    assert pooled.std().item() == pytest.approx(0.02 * TRUNCATED_STD, rel=0.01)
    for name, p in olmoe_run["params"].items():
        if name.endswith("norm.weight") or "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.slow
def test_weight_decay_groups_per_parameter(olmoe_run):
    everything, matrices = olmoe_run["decay_all"], olmoe_run["decay_matrices"]
    assert everything.keys() == olmoe_run["params"].keys()
    norms = [n for n in everything if n.endswith("norm.weight") or "layernorm" in n]
    coefficients = [n for n in everything if ".activation_func." in n]
    assert norms and coefficients and any("word_embeddings" in n for n in everything)
    for name, wd in everything.items():  # OLMo's decay_norm_and_bias + decay_embeddings
        assert wd == (0.0 if name in coefficients else 0.1), name
    for name, wd in matrices.items():  # megatron-core's: not on 1-D parameters
        assert wd == (0.1 if olmoe_run["params"][name].dim() == 2 else 0.0), name
    assert all(matrices[n] == 0.0 for n in norms + coefficients)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.router_score=sigmoid", "model.moe.router_score: 'sigmoid' is not one of"),
        ("model.moe.router_loss_scaling=mean", "model.moe.router_loss_scaling: 'mean' is not one of"),
        ("model.init=xavier", "model.init: 'xavier' is not one of"),
        ("model.init_cutoff_factor=0", "model.init_cutoff_factor"),
        ("training.weight_decay_on=norms", "training.weight_decay_on: 'norms' is not one of"),
    ],
)
def test_bad_olmoe_fields_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(olmoe_config(override), world_size=1)
    assert "\n" not in str(err.value)
