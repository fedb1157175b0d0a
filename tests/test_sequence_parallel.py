"""Sequence parallelism without Transformer Engine: TP=2 with SP trains like one process, over gloo.

Through the trainer's own pieces (``build_training_model``, ``forward_backward``, so megatron-core's
``finalize_model_grads`` runs): losses and every parameter's gradient (TP slices gathered) for a
few optimizer steps. Dense at TP=2, and MoE at expert-TP=2 (TP=2) and at TP=2, expert-TP=1, EP=2:
megatron-core's MoE layer trains at TP > 1 only with sequence parallelism.
"""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import run_layouts, spawn_workers, tiny_model_overrides
from tests.moe.test_moe_model import moe_overrides

VOCAB, SEQ, MBS, MICROBATCHES, STEPS = 256, 16, 2, 2, 3


def step_batches(step: int) -> list[dict]:
    """The micro-batches of optimizer step ``step``: every rank gets the same ones (DP=1)."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (MICROBATCHES, MBS, SEQ + 1), generator=gen)
    return [
        {
            "tokens": t[:, :-1],
            "labels": t[:, 1:],
            "loss_mask": torch.ones(MBS, SEQ),
            "position_ids": torch.arange(SEQ).expand(MBS, SEQ),
        }
        for t in tokens
    ]


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after finalize_model_grads, keyed by its global name (routed
    experts: global expert index), TP slices gathered over their (expert) TP group."""
    from megatron.core import parallel_state as ps

    from dense_model.moe import expert_param_layout

    grads = {}
    for name, param in model.named_parameters():
        grad = param.main_grad.detach().clone()  # megatron DDP's buffer, where finalize_model_grads acts
        group = ps.get_tensor_model_parallel_group()
        if ".local_experts." in name:
            name = expert_param_layout(model, name)[0]
            group = ps.get_expert_tensor_parallel_group()
        size = torch.distributed.get_world_size(group)
        if getattr(param, "tensor_model_parallel", False) and size > 1:
            assert getattr(param, "partition_stride", 1) == 1, name  # plain concatenation of slices
            parts = [torch.empty_like(grad) for _ in range(size)]
            torch.distributed.all_gather(parts, grad, group=group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[name] = grad
    return grads


def _train(rank, world_size, runs, out_dir):
    """Each of ``runs`` (name -> config overrides) in turn, in these same processes (a fresh
    megatron-core layout for each): STEPS optimizer steps, losses and gathered gradients saved."""
    from megatron.core import parallel_state as ps

    from dense_model.config import moe_enabled
    from dense_model.moe import MoEMonitor
    from dense_model.parallel import initialize_parallel_from
    from dense_model.training.optim import build_training_model
    from dense_model.training.step import forward_backward, reduce_lm_loss

    for name, overrides in runs.items():
        cfg = load_config(None, overrides)
        initialize_parallel_from(cfg.parallel, seed=11)
        model, ddp, optimizer = build_training_model(cfg)
        monitor = MoEMonitor(model, cfg) if moe_enabled(cfg.model) else None  # the trainer's router metrics
        marked = sorted(n for n, q in model.named_parameters() if getattr(q, "sequence_parallel", False))
        losses, grads = [], []
        for step in range(STEPS):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            out = forward_backward([ddp], iter(step_batches(step)), MICROBATCHES, SEQ, MBS)
            losses.append(reduce_lm_loss(out))
            grads.append(_full_grads(model))
            optimizer.step()
        result = {"losses": losses, "grads": grads, "sp_marked": marked, "training": model.training}
        result["router"] = monitor.metrics(STEPS, MICROBATCHES) if monitor else {}
        torch.save(result, f"{out_dir}/{name}.rank{rank}")
        ps.destroy_model_parallel()


def assert_trains_like(ranks: list[dict], ref: dict) -> None:
    """Losses of every step equal one process's within 1e-5 relative, and so does every gradient
    (merged over ranks: under EP each rank holds only its experts')."""
    for res in ranks:
        assert res["training"]
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        # MoE: aux and z losses, expert load, as the trainer logs them (each TP rank routes its slice)
        assert res["router"] == pytest.approx(ref["router"], rel=1e-5)
        assert len(set(res["losses"])) == STEPS  # the weights moved: each step's loss differs
    for step in range(STEPS):
        merged = {}
        for res in ranks:
            merged.update(res["grads"][step])
        assert merged.keys() == ref["grads"][step].keys()
        # Elements near zero (PolyNorm's a0 gradient is a sum with much cancellation) carry fp32
        # summation-order noise: the absolute floor is 1e-5 of the step's largest gradient element.
        largest = max(g.abs().max().item() for g in ref["grads"][step].values())
        for name, want in ref["grads"][step].items():
            assert want.abs().sum() > 0, name  # every parameter got a gradient
            torch.testing.assert_close(
                merged[name],
                want,
                rtol=1e-5,
                atol=1e-5 * largest,
                msg=lambda m, n=name, s=step: f"step {s} {n}: {m}",
            )


def dense_overrides(tp: int = 1, sp: bool = False) -> list[str]:
    return [
        *tiny_model_overrides(activation="polynorm", layers=2, vocab=VOCAB, seq=SEQ),
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        "training.recompute_granularity=none",
        "training.lr=3e-4",  # the paper's peak lr
    ]


def moe_training_overrides(tp: int = 1, ep: int = 1, etp: int | None = None) -> list[str]:
    sp = f"parallel.sequence_parallel={str(tp > 1).lower()}"  # MoE at TP > 1 trains only with SP
    return [*moe_overrides(tp=tp, ep=ep, etp=etp), sp, "training.lr=3e-4"]


# One spawn per world size runs all its layouts (process start-up is most of the cost).
LAYOUTS = {
    1: {"dense": dense_overrides(), "moe": moe_training_overrides()},
    2: {
        "dense_tp2_sp": dense_overrides(tp=2, sp=True),
        "moe_etp2_sp": moe_training_overrides(tp=2, etp=2),
        "moe_tp2_etp1_ep2_sp": moe_training_overrides(tp=2, etp=1, ep=2),
    },
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> one result dict per rank, every layout trained once for the module's tests."""
    return run_layouts(_train, LAYOUTS, tmp_path_factory.mktemp("sequence_parallel"))


@pytest.mark.slow
def test_tp2_sequence_parallel_trains_like_one_process(runs):
    """Norm weights (layer norms and the final norm: each TP rank sees half the sequence, so their
    gradients are summed over TP) and PolyNorm coefficients included."""
    ref, ranks = runs["dense"][0], runs["dense_tp2_sp"]
    norms = {n for n in ref["grads"][0] if "layernorm" in n}
    assert "decoder.final_layernorm.weight" in norms and len(norms) == 2 * 2 + 1
    assert sum(".activation_func." in n for n in ref["grads"][0]) == 2 * 2  # layers x (weight, bias)
    assert norms <= set(ranks[0]["sp_marked"])  # the marks finalize_model_grads reads
    assert not ref["sp_marked"]
    assert_trains_like(ranks, ref)


@pytest.mark.slow
def test_moe_expert_tp2_trains_like_one_process(runs):
    """Issue 15: expert-TP=2 (TP=2, SP) in training mode logs one process's losses; with SP each
    TP rank routes its own half of the sequence, so every expert sees each token once and its
    weights' and PolyNorm coefficients' gradients equal one process's (router and norms summed
    over TP by finalize_model_grads)."""
    ref, ranks = runs["moe"][0], runs["moe_etp2_sp"]
    assert sum(".local_experts." in n and ".activation_func." in n for n in ref["grads"][0]) == 2 * 4 * 2
    assert {"decoder.layers.0.mlp.router.weight", "decoder.final_layernorm.weight"} <= set(
        ranks[0]["sp_marked"]
    )
    assert_trains_like(ranks, ref)


@pytest.mark.slow
def test_moe_tp2_expert_tp1_ep2_trains_like_one_process(runs):
    """TP=2 with SP, experts over EP=2 at expert-TP=1: each rank holds half the experts whole."""
    assert_trains_like(runs["moe_tp2_etp1_ep2_sp"], runs["moe"][0])


def test_local_spec_uses_our_norm_everywhere():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from dense_model.model import layer_spec
    from dense_model.norm import RMSNorm

    cfg = load_config(None, dense_overrides())
    spec = layer_spec(cfg.model, torch.device("cpu"))
    assert spec.submodules.input_layernorm is RMSNorm and spec.submodules.pre_mlp_layernorm is RMSNorm
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert stock.submodules.input_layernorm is not RMSNorm  # megatron-core's spec is untouched


def _state_dicts(rank, world_size, out_file):
    """Our model, and the same model with megatron-core's torch norms (as it was built before)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from dense_model.model import build_model, layer_spec, transformer_config
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=11)
    cfg = load_config(None, dense_overrides())
    ours = build_model(cfg)
    spec = layer_spec(cfg.model)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    stock = GPTModel(  # a layer spec: the block adds its default final norm, WrappedTorchNorm here
        config=transformer_config(cfg),
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    stock.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    x = torch.randn(SEQ, MBS, cfg.model.hidden_size) * 3
    layers = {
        "ours": ours.decoder.layers[0].input_layernorm,
        "stock": stock.decoder.layers[0].input_layernorm,
    }
    torch.nn.init.normal_(layers["ours"].weight)
    layers["stock"].weight.data.copy_(layers["ours"].weight)
    result = {}
    for name, model in (("ours", ours), ("stock", stock)):
        sharded = model.sharded_state_dict()
        result[name] = {
            "types": {type(m).__module__ for m in (model.decoder.final_layernorm, layers[name])},
            "norm_out": layers[name](x),
            "sharded": {k: (v.key, v.global_shape, v.replica_id) for k, v in sharded.items() if "norm" in k},
        }
    torch.save(result, out_file)


def test_norm_matches_megatron_torch_norm_and_checkpoint_keys(tmp_path):
    """Same output as the norm megatron-core's local spec builds (torch's RMSNorm), same state dict
    and sharded state dict entries: checkpoints written before load unchanged."""
    spawn_workers(_state_dicts, 1, str(tmp_path / "out.pt"))
    result = torch.load(tmp_path / "out.pt")
    ours, stock = result["ours"], result["stock"]
    assert ours["types"] == {"dense_model.norm"} and stock["types"] == {"torch.nn.modules.normalization"}
    torch.testing.assert_close(ours["norm_out"], stock["norm_out"], rtol=0, atol=0)
    assert len(ours["sharded"]) == 2 * 2 + 1 and ours["sharded"] == stock["sharded"]
