"""The MFU numerator: flops_per_token against a hand count (1B config) and against torch's own
FLOP counter on a real forward+backward of small megatron-core models."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import spawn_workers, tiny_model_overrides


@pytest.mark.parametrize("activation", ["polynorm", "swiglu"])
def test_1b_flops_per_token_by_hand(activation):
    from dense_model.training.metrics import flops_per_token

    # The Llama tokenizer's vocabulary, given: its file (the vocabulary's source) is not on this machine.
    cfg = load_config("configs/1b/base.yaml", [f"model.activation={activation}", "model.vocab_size=32000"])
    h, s, layers, vocab = 2048, 4096, 24, 32000
    qkv, proj, scores = 2 * h * (3 * h), 2 * h * h, 2 * 2 * s * h  # no GQA; QK^T and PV over all s
    mlp = 4 * h * 8256 if activation == "polynorm" else 2 * h * (2 * 5504) + 2 * 5504 * h
    forward = layers * (qkv + proj + scores + mlp) + 2 * h * vocab
    assert forward == 3_364_880_384  # written out once: polynorm and swiglu match by design
    assert flops_per_token(cfg, training=False) == forward
    assert flops_per_token(cfg) == 3 * forward


def _count(rank, world_size, out_file):
    from torch.utils.flop_counter import FlopCounterMode

    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel
    from dense_model.training.metrics import flops_per_token

    initialize_parallel(1, 1, seed=1)
    results = {}
    for activation, groups in (("polynorm", 4), ("swiglu", 2)):
        cfg = load_config(
            None,
            [
                *tiny_model_overrides(activation=activation, layers=2, vocab=256, seq=32),
                f"model.num_query_groups={groups}",
                "training.recompute_granularity=none",
            ],
        )
        model = build_model(cfg)
        b, s = 2, cfg.model.seq_length
        tokens = torch.randint(0, 256, (b, s))
        with FlopCounterMode(display=False) as counter:
            losses = model(tokens, torch.arange(s).expand(b, s), None, labels=tokens)
            losses.sum().backward()
        results[activation] = (counter.get_total_flops() / (b * s), flops_per_token(cfg))
    torch.save(results, out_file)


def test_flops_per_token_matches_torch_flop_counter(tmp_path):
    """Training = forward + backward matmuls (3x forward) with no recompute, GQA included."""
    out = tmp_path / "flops.pt"
    spawn_workers(_count, 1, str(out))
    for activation, (counted, ours) in torch.load(out).items():
        assert counted == ours, activation
