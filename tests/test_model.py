"""The GPTModel built from the config: TP=2 and PP=2 over gloo against TP=1, spec plumbing, 1B sizes."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

VOCAB, SEQ, MBS, MICROBATCHES = 256, 16, 2, 2


def tiny_config(activation: str, tp: int = 1, pp: int = 1):
    activation, _, init = activation.partition("+")  # "polynorm+olmo_normal": that model.init
    return load_config(
        None,
        [
            *tiny_model_overrides(activation=activation, layers=4, vocab=VOCAB, seq=SEQ),
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            "training.recompute_granularity=selective",
            *([f"model.init={init}", "model.init_method_std=0.02"] if init else []),
        ],
    )


def fixed_batches():
    batches = random_lm_batches(MICROBATCHES, MBS, SEQ, VOCAB)
    for batch in batches:
        batch["loss_mask"][0, :3] = 0  # masked tokens must not count
    return batches


def _run(rank, world_size, activations, tp, pp, out_file):
    from dense_model.parallel import initialize_parallel

    initialize_parallel(tp, pp, seed=11)
    results = {a: _one_model(a, tp, pp) for a in activations}
    torch.save(results, f"{out_file}.rank{rank}")


def _one_model(activation, tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dense_model.model import build_model
    from dense_model.training.step import forward_backward, reduce_lm_loss

    cfg = tiny_config(activation, tp, pp)
    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11, force_reset_rng=True)
    model = build_model(cfg)
    batches = fixed_batches()
    result = {}
    if pp == 1:
        with torch.no_grad():
            logits = model(batches[0]["tokens"], batches[0]["position_ids"], None)  # [b, s, v/tp]
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        result["logits"] = torch.cat(parts, dim=-1)
    losses = forward_backward([model], iter(batches), MICROBATCHES, SEQ, MBS)
    if ps.is_pipeline_last_stage():
        result["loss"] = reduce_lm_loss(losses)
    offset = ps.get_pipeline_model_parallel_rank() * (cfg.model.num_layers // pp)
    result["coef_grads"] = {
        (offset + int(name.split(".")[2]), name.rsplit(".", 1)[1]): p.grad.clone()
        for name, p in model.named_parameters()
        if ".activation_func." in name
    }
    result["fc2_grad_norm_sq"] = sum(
        p.grad.double().pow(2).sum().item() for n, p in model.named_parameters() if "linear_fc2" in n
    )
    return result


ACTIVATIONS = ["polynorm", "polyrelu", "swiglu"]
OLMO_INIT = "polynorm+olmo_normal"  # the seed's MoE init (truncated normal): layout-invariant too


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Each layout runs once (one spawn) for all activations; tests compare them."""
    out_dir = tmp_path_factory.mktemp("layouts")
    cache = {}

    def get(tp, pp):
        if (tp, pp) not in cache:
            out = out_dir / f"tp{tp}_pp{pp}"
            spawn_workers(
                _run, tp * pp, [*ACTIVATIONS, OLMO_INIT] if pp == 1 else ["polynorm"], tp, pp, str(out)
            )
            cache[tp, pp] = [torch.load(f"{out}.rank{r}") for r in range(tp * pp)]
        return cache[tp, pp]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("activation", [*ACTIVATIONS, OLMO_INIT])
def test_tp2_matches_tp1(layouts, activation):
    ref = layouts(1, 1)[0][activation]
    if activation == OLMO_INIT:  # another init, the same at TP=2
        assert not torch.allclose(ref["logits"], layouts(1, 1)[0]["polynorm"]["logits"])
    tp_ranks = [r[activation] for r in layouts(2, 1)]
    for res in tp_ranks:
        torch.testing.assert_close(res["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert res["coef_grads"].keys() == ref["coef_grads"].keys()
        for key, grad in ref["coef_grads"].items():
            # every TP rank holds the full gradient of the replicated scalars
            torch.testing.assert_close(res["coef_grads"][key], grad, rtol=1e-5, atol=1e-7)
    # fc2 is split over TP: the two halves' squared norms add up to TP=1's
    total = sum(r["fc2_grad_norm_sq"] for r in tp_ranks)
    assert total == pytest.approx(ref["fc2_grad_norm_sq"], rel=1e-5)
    if activation != "swiglu":
        assert ref["coef_grads"] and all(g.abs().sum() > 0 for g in ref["coef_grads"].values())


@pytest.mark.slow
def test_pp2_matches_pp1(layouts):
    ref = layouts(1, 1)[0]["polynorm"]
    first, last = (r["polynorm"] for r in layouts(1, 2))
    assert last["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    merged = {**first["coef_grads"], **last["coef_grads"]}
    assert merged.keys() == ref["coef_grads"].keys()
    for key, grad in ref["coef_grads"].items():
        torch.testing.assert_close(merged[key], grad, rtol=1e-5, atol=1e-7)


def _count_1b(rank, world_size, out_file):
    from dense_model.model import build_model, count_parameters
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1)
    counts = {}
    for activation in ("swiglu", "polynorm", "polyrelu", "gelu"):
        # The defaults are the 1B model; its vocabulary (the Llama tokenizer's) is given: no tokenizer here.
        cfg = load_config(None, [f"model.activation={activation}", "model.vocab_size=32000"])
        model = build_model(cfg, allocate_only=True)  # untouched memory: 1.3B fp32 params allocate lazily
        built = sum(p.numel() for p in model.parameters())
        mlp = model.decoder.layers[0].mlp
        counts[activation] = {
            "built": built,
            "formula": count_parameters(cfg.model)["total"],
            "fc1": tuple(mlp.linear_fc1.weight.shape),
            "act": type(mlp.activation_func.act).__name__,
        }
        del model
    torch.save(counts, out_file)


@pytest.mark.slow
def test_1b_parameter_counts(tmp_path):
    out = tmp_path / "counts.pt"
    spawn_workers(_count_1b, 1, str(out))
    counts = torch.load(out)
    for activation, c in counts.items():
        assert c["built"] == c["formula"], activation
        assert 1.30e9 < c["built"] < 1.40e9, (activation, c["built"])
        print(f"{activation}: {c['built']:,} parameters (fc1 {c['fc1']}, {c['act']})")
    assert counts["swiglu"]["fc1"] == (2 * 5504, 2048) and counts["polynorm"]["fc1"] == (8256, 2048)
    assert counts["polynorm"]["act"] == "PolyNorm"
    rel = abs(counts["polynorm"]["built"] - counts["swiglu"]["built"]) / counts["swiglu"]["built"]
    assert rel < 1e-3, rel


def test_layer_spec_swaps_only_the_mlp_activation():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP

    from dense_model.model import RegistryActivation, layer_spec

    spec = layer_spec(tiny_config("polynorm").model)
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert spec.module is stock.module
    assert spec.submodules.self_attention == stock.submodules.self_attention
    assert spec.submodules.mlp.module is MLP
    act = spec.submodules.mlp.submodules.activation_func
    assert act.module is RegistryActivation and act.params["name"] == "polynorm"
    assert stock.submodules.mlp.submodules.activation_func is None  # the stock spec is untouched
