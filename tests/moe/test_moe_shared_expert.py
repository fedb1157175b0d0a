"""An MoE model with a shared expert (model.moe.shared_expert_ffn_hidden_size) trains: through
megatron-core's schedule the loss is finite, the shared expert's weights and PolyNorm coefficients
get gradients next to the router and the routed experts', and a few SGD steps lower the loss.
(Its export: tests/export/test_export_moe.py.)"""

import json
import math
from pathlib import Path

import pytest
import torch

from dense_model.testing import spawn_workers, tiny_model_overrides

VOCAB, SEQ, MBS, SHARED = 256, 16, 2, 48


def batch():
    tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(MBS, SEQ),
        "position_ids": torch.arange(SEQ).expand(MBS, SEQ),
    }


def _job(rank, world_size, out_file):
    from dense_model.config import load_config
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel
    from dense_model.training.step import forward_backward, reduce_lm_loss

    cfg = load_config(
        None,
        [
            *tiny_model_overrides(activation="polynorm", layers=2, vocab=VOCAB, seq=SEQ),
            "model.moe.num_experts=4",
            "model.moe.router_topk=2",
            "model.moe.ffn_hidden_size=32",
            "model.moe.z_loss_coeff=1e-3",
            f"model.moe.shared_expert_ffn_hidden_size={SHARED}",
            "training.recompute_granularity=none",
        ],
    )
    initialize_parallel(1, 1, seed=11)
    model = build_model(cfg)
    shared = {n: p for n, p in model.named_parameters() if ".mlp.shared_experts." in n}
    losses, grads = [], {}
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        losses.append(reduce_lm_loss(forward_backward([model], iter([batch()]), 1, SEQ, MBS)))
        if not grads:
            grads = {
                name: {"norm": p.grad.norm().item(), "finite": bool(torch.isfinite(p.grad).all())}
                for name, p in model.named_parameters()
                if ".mlp." in name
            }
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.05)
    result = {
        "losses": losses,
        "grads": grads,
        "shared": {n: list(p.shape) for n, p in shared.items()},
    }
    Path(out_file).write_text(json.dumps(result))


@pytest.mark.slow
def test_shared_expert_gets_gradients_and_trains(tmp_path):
    spawn_workers(_job, 1, str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    expected = {}
    for i in range(2):  # layers
        layer = f"decoder.layers.{i}.mlp.shared_experts."
        expected[layer + "linear_fc1.weight"] = [SHARED, 64]
        expected[layer + "activation_func.act.weight"] = [3]  # its own PolyNorm a1..a3
        expected[layer + "activation_func.act.bias"] = [1]
        expected[layer + "linear_fc2.weight"] = [64, SHARED]
    assert result["shared"] == expected
    for name, grad in result["grads"].items():
        assert grad["finite"] and grad["norm"] > 0, name  # shared expert, router, routed experts
    assert any(".router." in n for n in result["grads"]) and any(
        ".local_experts." in n for n in result["grads"]
    )
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
