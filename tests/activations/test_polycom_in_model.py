"""The model's fused PolyCom path (Triton kernels, run by Triton's interpreter on the CPU) against
the torch reference inside a TP=2 GPTModel over gloo: the TP group handed to the kernel by the
model, the tensors it saves, the backward through megatron-core's MLP. Same loss and gradients."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

VOCAB, SEQ, MBS, MICROBATCHES = 256, 16, 2, 2


def _fused_vs_reference(rank, world_size, activation, out_file):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel
    from dense_model.training.step import forward_backward, reduce_lm_loss

    initialize_parallel(world_size, 1, seed=3)
    batches = random_lm_batches(MICROBATCHES, MBS, SEQ, VOCAB)
    results = {}
    for fused in (False, True):
        cfg = load_config(
            None,
            [
                *tiny_model_overrides(activation=activation, layers=2, vocab=VOCAB, seq=SEQ),
                f"parallel.tensor_model_parallel_size={world_size}",
                f"model.fused_activation={str(fused).lower()}",
                "training.recompute_granularity=none",
            ],
        )
        torch.manual_seed(3)
        model_parallel_cuda_manual_seed(3, force_reset_rng=True)
        model = build_model(cfg)
        backward_nodes = set()
        for module in model.modules():
            if type(module).__name__ == "RegistryActivation":
                module.register_forward_hook(
                    lambda m, i, out, seen=backward_nodes: seen.add(type(out.grad_fn).__name__)
                )
        losses = forward_backward([model], iter(batches), MICROBATCHES, SEQ, MBS)
        results[fused] = {
            "loss": reduce_lm_loss(losses),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "backward_nodes": sorted(backward_nodes),
        }
    torch.save(results, f"{out_file}.rank{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["polynorm", "polyrelu"])
def test_fused_path_in_tp2_model_matches_reference(tmp_path, activation):
    pytest.importorskip("triton")
    out = tmp_path / "fused"
    spawn_workers(_fused_vs_reference, 2, activation, str(out), env={"TRITON_INTERPRET": "1"})
    for rank in range(2):
        r = torch.load(f"{out}.rank{rank}")
        ref, fused = r[False], r[True]
        assert fused["backward_nodes"] == ["PolyComFunctionBackward"], fused["backward_nodes"]
        assert "PolyComFunctionBackward" not in ref["backward_nodes"]
        assert fused["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert fused["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(fused["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
