"""Selective recompute never re-runs a fused core attention: a tiny GPTModel on the CPU (one gloo
rank), forward + backward, counting the calls of every layer's core-attention module. With the
local module selective recompute runs it twice (forward, and again in backward: the scores are not
kept); with SDPA once; full recompute still re-runs whole layers."""

import pytest
import torch

from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

LAYERS = 2


CASES = [  # backend, granularity, core-attention module, runs per layer, granularity built
    ("sdpa", "selective", "SDPAttention", 1, None),  # fused kernel: no recompute
    ("local", "selective", "DotProductAttention", 2, "selective"),  # scores not kept: re-run
    ("sdpa", "full", "SDPAttention", 2, "full"),  # full recompute re-runs the layer
]


def _calls_worker(rank, world_size, out_file):
    from dense_model.config import load_config
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=1)
    results = {}
    for backend, granularity, *_ in CASES:
        cfg = load_config(
            None,
            [
                *tiny_model_overrides(layers=LAYERS, seq=16),
                f"model.attention_backend={backend}",
                f"training.recompute_granularity={granularity}",
                "training.bf16=false",
            ],
        )
        model = build_model(cfg)
        calls = []
        for layer in model.decoder.layers:
            core = layer.self_attention.core_attention
            core.register_forward_hook(
                lambda module, args, out, calls=calls: calls.append(type(module).__name__)
            )
        batch = random_lm_batches(1, 2, 16, cfg.model.vocab_size)[0]
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum()
        forward_calls = len(calls)
        loss.backward()
        results[backend, granularity] = {
            "forward": forward_calls,
            "total": len(calls),
            "modules": sorted(set(calls)),
            "granularity": model.config.recompute_granularity,
        }
    torch.save(results, out_file)


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompute") / "calls.pt"
    spawn_workers(_calls_worker, 1, str(out))
    return torch.load(out)


@pytest.mark.parametrize("backend, granularity, module, runs, built", CASES)
def test_core_attention_recompute(calls, backend, granularity, module, runs, built):
    got = calls[backend, granularity]
    assert got["modules"] == [module]
    assert got["forward"] == LAYERS
    assert got["total"] == runs * LAYERS, got
    assert got["granularity"] == built


def test_1b_configs_on_gpus_recompute_nothing_with_sdpa():
    """configs/1b/base.yaml asks for selective; on a GPU (auto -> SDPA) that is no recompute, with
    Transformer Engine's layers (auto -> TE's fused attention) too; the CPU's local module keeps it."""
    from dense_model.config import load_config
    from dense_model.model import recompute_granularity

    cfg = load_config("configs/1b/polynorm.yaml")
    assert cfg.training.recompute_granularity == "selective"
    assert recompute_granularity(cfg, torch.device("cuda")) is None
    assert recompute_granularity(cfg, torch.device("cpu")) == "selective"
    cfg.model.transformer_impl = "transformer_engine"
    assert recompute_granularity(cfg, torch.device("cuda")) is None
