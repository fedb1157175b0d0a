"""SDPA core attention against megatron-core's local DotProductAttention: forward and backward at
TP=1 and TP=2 over gloo (fp32, GQA), the same training losses in a tiny model, and the backend choice."""

import pytest
import torch

from dense_model.config import ConfigError, load_config, validate
from dense_model.testing import random_lm_batches, spawn_workers, tiny_model_overrides

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 12, 2, 4, 2, 16  # tiny_model_overrides: hidden 64, 4 heads


def _attention_config(tp: int, dropout: float = 0.0):
    """The TransformerConfig the model itself builds for a tiny GQA model at TP=``tp`` on the CPU."""
    from dense_model.model import transformer_config

    overrides = [f"parallel.tensor_model_parallel_size={tp}", f"model.attention_dropout={dropout}"]
    cfg = load_config(None, [*tiny_model_overrides(), f"model.num_query_groups={GROUPS}", *overrides])
    config = transformer_config(cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert (config.num_attention_heads, config.kv_channels) == (HEADS, HEAD_DIM)
    return config


def _forward_backward(module, q, k, v, grad_out):
    """(output [s, b, np*hn], dq, dk, dv) of ``module`` on leaf copies of q, k, v."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, attention_mask=None)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _parity_worker(rank, world_size):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from dense_model.attention import SDPAttention
    from dense_model.parallel import initialize_parallel

    tp = world_size
    initialize_parallel(tp, 1, seed=3)
    gen = torch.Generator().manual_seed(5)  # the same full-size tensors on every rank
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    grad_out = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=gen)
    # This rank's heads and groups (the QKV projection is column-parallel over heads).
    hq, hg = HEADS // tp, GROUPS // tp
    q, k, v = (
        q[:, :, rank * hq : (rank + 1) * hq],
        k[:, :, rank * hg : (rank + 1) * hg],
        v[:, :, rank * hg : (rank + 1) * hg],
    )
    grad_out = grad_out[:, :, rank * hq * HEAD_DIM : (rank + 1) * hq * HEAD_DIM]

    config = _attention_config(tp)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    local = _forward_backward(DotProductAttention(**args), q, k, v, grad_out)
    sdpa = _forward_backward(SDPAttention(**args), q, k, v, grad_out)
    assert sdpa[0].shape == (SEQ, BATCH, hq * HEAD_DIM)
    for name, want, got in zip(("output", "dq", "dk", "dv"), local, sdpa):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"tp={tp} {n}: {m}")

    # Dropout acts in training only; in eval mode the dropout-configured module still matches.
    dropped = SDPAttention(**dict(args, config=_attention_config(tp, dropout=0.5)))
    assert not torch.allclose(dropped(q, k, v, None), local[0])
    dropped.eval()
    torch.testing.assert_close(dropped(q, k, v, None), local[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_matches_local_forward_and_backward(tp):
    spawn_workers(_parity_worker, tp)


def _training_worker(rank, world_size, out_file):
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel
    from dense_model.training.optim import build_training_model
    from dense_model.training.step import forward_backward, reduce_lm_loss

    initialize_parallel(1, 1, seed=11)
    vocab, seq, mbs = 256, 16, 2
    batches = random_lm_batches(4, mbs, seq, vocab)
    results = {}
    for backend in ("local", "sdpa"):
        cfg = load_config(
            None,
            [
                *tiny_model_overrides(vocab=vocab, seq=seq),
                "model.num_query_groups=2",
                f"model.attention_backend={backend}",
                "training.lr=0.01",
            ],
        )
        core = type(build_model(cfg).decoder.layers[0].self_attention.core_attention).__name__
        model, ddp, optimizer = build_training_model(cfg)
        losses = []
        for batch in batches:  # one micro-batch per step
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses.append(reduce_lm_loss(forward_backward([ddp], iter([batch]), 1, seq, mbs)))
            optimizer.step()
        results[backend] = (core, losses)
    torch.save(results, out_file)


def test_sdpa_trains_like_local(tmp_path):
    out = tmp_path / "losses.pt"
    spawn_workers(_training_worker, 1, str(out))
    results = torch.load(out)
    assert results["local"][0] == "DotProductAttention" and results["sdpa"][0] == "SDPAttention"
    local, sdpa = results["local"][1], results["sdpa"][1]
    assert len(set(local)) == len(local)  # the weights moved: the steps are not all the same
    assert sdpa == pytest.approx(local, rel=1e-5)


def test_backend_choice():
    from dense_model.attention import select_attention_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert select_attention_backend("auto", "local", cpu) == "local"  # CPU default unchanged
    assert select_attention_backend("auto", "local", cuda) == "sdpa"
    assert select_attention_backend("auto", "transformer_engine", cuda) == "te"
    assert select_attention_backend("sdpa", "transformer_engine", cuda) == "sdpa"
    assert select_attention_backend("local", "local", cuda) == "local"
    with pytest.raises(ConfigError, match="model.attention_backend=te needs model.transformer_impl"):
        validate(load_config(None, ["model.attention_backend=te"]))


def test_layer_spec_swaps_only_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from dense_model.attention import SDPAttention
    from dense_model.model import layer_spec

    model = load_config(None, ["model.attention_backend=sdpa"]).model
    spec = layer_spec(model, torch.device("cpu")).submodules.self_attention
    stock = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention
    assert spec.submodules.core_attention is SDPAttention
    assert spec.submodules.linear_qkv is stock.submodules.linear_qkv
    assert spec.module is stock.module and spec.params == stock.params
    auto = layer_spec(load_config(None, []).model, torch.device("cpu")).submodules.self_attention
    assert auto.submodules.core_attention is stock.submodules.core_attention
