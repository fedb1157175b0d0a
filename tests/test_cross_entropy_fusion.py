"""megatron-core's native fused cross-entropy (``training.cross_entropy_fusion``) in our model, on
the CPU (its torch.compile'd kernels build with the CPU backend), at TP=1 and TP=2 over gloo.

The per-token losses of the fused model equal the unfused model's (megatron-core's own
``vocab_parallel_cross_entropy``) and a float64 cross-entropy of the model's logits to fp32
rounding, at both layouts. The gradient is where the two differ: the fused backward hands back the
logits' gradient in bf16 whatever the logits' dtype, so in this fp32 model it is the unfused
gradient rounded to bf16 (why ``auto`` turns the fusion on only for bf16 models on GPUs).
"""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import random_lm_batches, run_layouts, tiny_model_overrides

VOCAB, SEQ, MBS = 512, 32, 2


def _config(tp: int, fused):
    return load_config(
        None,
        [
            *tiny_model_overrides(layers=2, vocab=VOCAB, seq=SEQ),
            f"parallel.tensor_model_parallel_size={tp}",
            "training.bf16=false",
            "training.recompute_granularity=none",
            f"training.cross_entropy_fusion={str(fused).lower()}",
        ],
    )


def test_auto_is_on_for_bf16_models_on_gpus_only():
    from dense_model.model import cross_entropy_fusion_wanted, transformer_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cross_entropy_fusion_wanted("auto", cuda, torch.bfloat16)
    assert not cross_entropy_fusion_wanted("auto", cuda, torch.float32)
    assert not cross_entropy_fusion_wanted("auto", cpu, torch.float32)
    assert cross_entropy_fusion_wanted(True, cpu, torch.float32)
    assert not cross_entropy_fusion_wanted(False, cuda, torch.bfloat16)
    for setting, on in (("auto", False), (True, True), (False, False)):
        config = transformer_config(_config(1, setting), device=cpu)
        assert (config.cross_entropy_loss_fusion, config.cross_entropy_fusion_impl) == (on, "native")


def _run(rank, world_size, layouts, out_dir):
    """For each layout (name -> TP size): the tiny model, unfused then fused (same weights: they do
    not depend on the layout), on one batch: per-token losses, this rank's slice of the logits and
    of the output layer's weight gradient; and megatron-core's two functions on those logits."""
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel_from

    batch = random_lm_batches(1, MBS, SEQ, VOCAB)[0]
    for name, tp in layouts.items():
        result = {}
        for fused in (False, True):
            cfg = _config(tp, fused)
            initialize_parallel_from(cfg.parallel, seed=11)
            model = build_model(cfg)
            assert model.config.cross_entropy_loss_fusion is fused
            loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
            loss.sum().backward()
            with torch.no_grad():
                logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, vocab / tp]
            result[fused] = {
                "loss": loss.detach(),
                "logits": logits,
                "output_grad": model.output_layer.weight.grad.clone(),  # [vocab / tp, hidden]
            }
            ps.destroy_model_parallel()
        # The two functions alone on the model's logits ([s, b, vocab / tp], as the model calls them).
        initialize_parallel_from(_config(tp, False).parallel, seed=11)
        logits = result[False]["logits"].transpose(0, 1).contiguous()
        labels = batch["labels"].transpose(0, 1).contiguous()
        grads = []
        for fn in (vocab_parallel_cross_entropy, fused_vocab_parallel_cross_entropy):
            x = logits.clone().requires_grad_()
            args = (ps.get_tensor_model_parallel_group(),) if fn is fused_vocab_parallel_cross_entropy else ()
            fn(x, labels, *args).sum().backward()
            grads.append(x.grad)
        result["logits_grad"] = grads  # [unfused, fused]
        ps.destroy_model_parallel()
        torch.save(result, f"{out_dir}/{name}.rank{rank}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_layouts(_run, {1: {"tp1": 1}, 2: {"tp2": 2}}, tmp_path_factory.mktemp("ce_fusion"))


def _gathered(ranks, fused, key, dim):
    return torch.cat([r[fused][key] for r in ranks], dim=dim)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_fused_loss_equals_the_unfused_loss_to_fp32_rounding(runs, layout):
    ranks = runs[layout]
    for r in ranks:  # every TP rank returns the whole [b, s] loss
        torch.testing.assert_close(r[True]["loss"], r[False]["loss"], rtol=1e-6, atol=1e-6)
    logits = _gathered(ranks, False, "logits", dim=-1).double()  # [b, s, vocab]
    reference = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), random_lm_batches(1, MBS, SEQ, VOCAB)[0]["labels"].flatten(), reduction="none"
    ).view(MBS, SEQ)
    for fused in (False, True):
        torch.testing.assert_close(ranks[0][fused]["loss"].double(), reference, rtol=1e-6, atol=1e-6)
    # TP=2 computes the same losses as one process (the weights do not depend on the layout)
    torch.testing.assert_close(ranks[0][True]["loss"], runs["tp1"][0][True]["loss"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_fused_gradient_is_the_unfused_one_rounded_to_bf16(runs, layout):
    ranks = runs[layout]
    for r in ranks:
        unfused, fused = r["logits_grad"]
        assert fused.dtype == torch.float32  # autograd casts it back to the logits' dtype...
        assert torch.equal(fused, fused.bfloat16().float())  # ...after megatron's kernel rounded it
        assert not torch.equal(unfused, unfused.bfloat16().float())  # the unfused one is fp32
        # the same gradient to bf16 rounding (one bf16 step where fp32 noise crosses a rounding edge)
        torch.testing.assert_close(fused, unfused.bfloat16().float(), rtol=2**-7, atol=1e-8)
    # In the model: the output layer's weight gradient moves by that rounding, no more.
    want = _gathered(ranks, False, "output_grad", dim=0)
    got = _gathered(ranks, True, "output_grad", dim=0)
    assert not torch.equal(got, want)  # the fused path ran in the model
    assert ((got - want).norm() / want.norm()).item() < 2**-8
