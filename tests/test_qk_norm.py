"""model.qk_norm (dense_model/qk_norm.py): OLMoE's full-width QK-norm against a float64
re-implementation of transformers' OlmoeRMSNorm, TP=2 against TP=1 (float64, over gloo), a tiny GPT
that trains with it at TP=2 like one process, a TP=2 checkpoint read back at TP=1, and the config
errors before launch."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.testing import run_layouts
from tests.test_sequence_parallel import _train, assert_trains_like, dense_overrides

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 16, 5, 3
HIDDEN = HEADS * HEAD_DIM


def olmoe_rms_norm(x, weight, eps=1e-5):
    """transformers' OlmoeRMSNorm.forward (models/olmoe/modeling_olmoe.py), in x's dtype (float64
    here, where the original computes in float32): over the last dimension, then times the gain."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _attention_config(tp: int, dtype=torch.float64):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
    )


def _inputs():
    """Full (all heads) float64 q and k as megatron hands them to the slots, [sq, b, heads, hn], the
    gains (full width) and the upstream gradients."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for kind, heads in (("query", HEADS), ("key", GROUPS)):
        shape = (SEQ, BATCH, heads, HEAD_DIM)
        out[kind] = {
            "x": torch.randn(shape, generator=gen, dtype=torch.float64) * 2,
            "gain": 1 + 0.5 * torch.randn(heads * HEAD_DIM, generator=gen, dtype=torch.float64),
            "grad": torch.randn(shape, generator=gen, dtype=torch.float64),
        }
    return out


def _norm_run(tp: int, rank: int) -> dict:
    """This rank's heads through FullWidthQKNorm at ``tp``: outputs, input and gain gradients."""
    from dense_model.qk_norm import FullWidthQKNorm

    results = {}
    for kind, t in _inputs().items():
        local = t["x"].shape[2] // tp
        heads = slice(rank * local, (rank + 1) * local)
        norm = FullWidthQKNorm(_attention_config(tp), HEAD_DIM, eps=1e-5, heads=kind)
        with torch.no_grad():
            norm.weight.copy_(t["gain"][rank * local * HEAD_DIM : (rank + 1) * local * HEAD_DIM])
        x = t["x"][:, :, heads].clone().requires_grad_(True)
        out = norm(x)
        out.backward(t["grad"][:, :, heads])
        results[kind] = {"out": out.detach(), "x_grad": x.grad, "gain_grad": norm.weight.grad}
    return results


def _gpt_overrides(tp: int) -> list[str]:
    return [
        *dense_overrides(tp=tp),
        "model.qk_norm=full",
        f"model.num_query_groups={GROUPS}",
        "training.bf16=false",
    ]


def _random_gains(model) -> None:
    """Gains other than ones (the init), each drawn whole and sliced like its heads for this rank."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                gen = torch.Generator().manual_seed(len(name))
                full = 1 + 0.3 * torch.randn(param.numel() * tp, generator=gen)
                param.copy_(full.chunk(tp)[rank])


def _logits(model) -> torch.Tensor:
    """Logits of a fixed batch, the vocabulary gathered over TP (parallel_output)."""
    from megatron.core import parallel_state as ps

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(16).expand(2, 16), None)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits, group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _worker(rank, world_size, runs, out_dir):
    """The training layouts (tests/test_sequence_parallel's _train); at world size 2 also the norm
    alone at TP=2, and a tiny GPT saved at TP=2 then loaded at TP=1 (DP=2) by the inference loader."""
    from megatron.core import parallel_state as ps
    from torch.distributed.checkpoint.api import CheckpointException

    from dense_model.checkpoint import save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference
    from dense_model.model import build_model
    from dense_model.parallel import initialize_parallel

    _train(rank, world_size, runs, out_dir)
    if world_size == 1:  # the parameter count's formula against built models
        from dense_model.model import count_parameters
        from dense_model.qk_norm import QK_NORMS

        initialize_parallel(1, 1, seed=11)
        counts = {}
        for qk_norm in QK_NORMS:
            cfg = load_config(
                None, [*dense_overrides(), f"model.qk_norm={qk_norm}", f"model.num_query_groups={GROUPS}"]
            )
            built = sum(p.numel() for p in build_model(cfg).parameters())
            counts[qk_norm] = (built, count_parameters(cfg.model)["total"])
        torch.save(counts, f"{out_dir}/counts.rank0")
        ps.destroy_model_parallel()
        return
    initialize_parallel(2, 1, seed=11)
    norm = _norm_run(2, rank)
    cfg = load_config(None, _gpt_overrides(tp=2))
    model = build_model(cfg)
    _random_gains(model)
    saved_logits = _logits(model)
    save_checkpoint(f"{out_dir}/ckpt", 1, model, cfg, weights_only=True)
    ps.destroy_model_parallel()
    result = {"norm": norm, "saved": saved_logits}
    try:  # a failed load is the checkpoint test's failure, not every test's
        loaded = load_model_for_inference(f"{out_dir}/ckpt", tensor_model_parallel_size=1)
        result["loaded"] = _logits(loaded.model)
        result["gain"] = loaded.model.decoder.layers[0].self_attention.q_layernorm.weight.detach().clone()
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        result["load_error"] = f"{type(err).__name__}: {getattr(err, 'failures', err)}"
    torch.save(result, f"{out_dir}/extra.rank{rank}")
    ps.destroy_model_parallel()


def _layout(qk_norm: str, tp: int = 1, sp: bool = False) -> list[str]:
    gqa = [f"model.num_query_groups={GROUPS}"] if qk_norm == "full" else []
    # adam_eps 1e-4: Adam's first steps move a weight by about lr x sign(grad) even where the
    # gradient is fp32 summation noise (another TP layout sums in another order); a larger eps keeps
    # such elements' steps proportional to their gradient, so the layouts stay comparable at 1e-5.
    return [*dense_overrides(tp=tp, sp=sp), f"model.qk_norm={qk_norm}", *gqa, "training.adam_eps=1e-4"]


LAYOUTS = {
    1: {"full": _layout("full"), "per_head": _layout("per_head")},
    2: {"full_tp2_sp": _layout("full", tp=2, sp=True), "per_head_tp2": _layout("per_head", tp=2)},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qk_norm")
    results = run_layouts(_worker, LAYOUTS, out)
    results["extra"] = [torch.load(out / f"extra.rank{r}") for r in range(2)]
    results["counts"] = torch.load(out / "counts.rank0")
    return results


def test_full_width_norm_is_olmoes_rmsnorm_on_the_projection_output():
    """q_proj's output [s, b, hidden] normalised whole (OlmoeRMSNorm(hidden)) equals our module on
    the same tensor split into heads, [s, b, heads, head_dim]; k likewise over kv heads x head_dim
    (GQA); float64, so the match is to rounding. In bf16 the statistic is fp32 (OLMo's autocast-off
    norm), the output bf16, within bf16 rounding of the float64 result."""
    from dense_model.qk_norm import FullWidthQKNorm

    for kind, t in _inputs().items():
        heads = t["x"].shape[2]
        norm = FullWidthQKNorm(_attention_config(1), HEAD_DIM, eps=1e-5, heads=kind)
        assert norm.weight.shape == (heads * HEAD_DIM,)
        with torch.no_grad():
            norm.weight.copy_(t["gain"])
        x = t["x"].clone().requires_grad_()
        projection = x.reshape(SEQ, BATCH, heads * HEAD_DIM)  # what q_proj / k_proj output
        gain = t["gain"].clone().requires_grad_()
        want = olmoe_rms_norm(projection, gain).reshape(t["x"].shape)
        got = norm(x)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
        # the hand-written backward against autograd through transformers' formula
        want_grads = torch.autograd.grad(want, (x, gain), t["grad"])
        got_grads = torch.autograd.grad(got, (x, norm.weight), t["grad"])
        for name, g, w in zip(("input", "gain"), got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"{kind} {name} gradient")
        want = want.detach()
        # not a per-head norm: normalising each head on its own gives another result
        per_head = olmoe_rms_norm(t["x"], t["gain"].view(heads, HEAD_DIM))
        assert (per_head - want).abs().max() > 1e-3

        bf16 = FullWidthQKNorm(_attention_config(1, torch.bfloat16), HEAD_DIM, eps=1e-5, heads=kind)
        with torch.no_grad():
            bf16.weight.copy_(t["gain"])
        x16 = t["x"].to(torch.bfloat16).requires_grad_()
        got = bf16(x16)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
        # bf16 gradients (the backward's narrow-dtype branch: <g', x^> from the fp32 x^) against the
        # float64 formula's, to bf16 rounding
        got.backward(t["grad"].to(torch.bfloat16))
        for name, g, w in zip(("input", "gain"), (x16.grad, bf16.weight.grad), want_grads):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(
                g.double(), w, rtol=3e-2, atol=3e-2, msg=f"bf16 {kind} {name} gradient"
            )


@pytest.mark.slow
def test_full_width_norm_at_tp2_equals_tp1_in_float64(runs):
    """Each TP rank holds half the heads: its outputs, its input gradients and its slice of the gain
    gradient equal the TP=1 run's (the sum of squares all-reduced over TP, forward and backward)."""
    ref = _norm_run(1, 0)
    for kind in ("query", "key"):
        for what, dim in (("out", 2), ("x_grad", 2), ("gain_grad", 0)):
            got = torch.cat([r["norm"][kind][what] for r in runs["extra"]], dim=dim)
            torch.testing.assert_close(got, ref[kind][what], rtol=1e-12, atol=1e-12, msg=f"{kind} {what}")


@pytest.mark.slow
def test_tiny_gpt_with_full_qk_norm_trains_at_tp2_like_one_process(runs):
    """3 optimizer steps of a 2-layer GPT (GQA: 4 heads, 2 kv heads) with model.qk_norm=full (the
    weights move: each step's loss differs), and at TP=2 with sequence parallelism the losses and every gradient after
    finalize_model_grads (the gains' included: TP-sharded, never summed over TP) equal one
    process's."""
    ref = runs["full"][0]
    gains = [n for n in ref["grads"][0] if "q_layernorm" in n or "k_layernorm" in n]
    assert len(gains) == 2 * 2
    assert not set(gains) & set(runs["full_tp2_sp"][0]["sp_marked"])
    assert_trains_like(runs["full_tp2_sp"], ref)


@pytest.mark.slow
def test_per_head_qk_norm_trains_at_tp2_like_one_process(runs):
    """model.qk_norm=per_head is megatron-core's qk_layernorm: the head_dim gain is shared by the
    heads of both TP ranks, so its gradient is summed over TP (TransformerConfig.qk_layernorm)."""
    ref = runs["per_head"][0]
    assert any("q_layernorm" in n for n in ref["grads"][0])
    assert_trains_like(runs["per_head_tp2"], ref)


@pytest.mark.slow
def test_a_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_logits(runs):
    """The gain is stored whole (sharded along TP): the TP=1 model reads both halves back."""
    extra = runs["extra"]
    for r in extra:
        assert "load_error" not in r, r["load_error"][:500]
        torch.testing.assert_close(r["loaded"], extra[0]["saved"], rtol=1e-5, atol=1e-5)
    assert extra[0]["gain"].shape == (HIDDEN,)
    assert not torch.allclose(extra[0]["gain"], torch.ones(HIDDEN))  # the random gains, not the init


@pytest.mark.slow
def test_parameter_count_includes_the_qk_norm_gains(runs):
    """count_parameters (the launcher's --dry-run) equals the built model: per_head adds 2 x head_dim
    per layer, full hidden + kv heads x head_dim."""
    counts = runs["counts"]
    for qk_norm, (built, formula) in counts.items():
        assert built == formula, qk_norm
    assert counts["per_head"][0] - counts["none"][0] == 2 * 2 * HEAD_DIM  # 2 layers
    assert counts["full"][0] - counts["none"][0] == 2 * (HIDDEN + GROUPS * HEAD_DIM)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.qk_norm=full", "parallel.tensor_model_parallel_size=3"],
            "config error: model.num_attention_heads=4 is not divisible by parallel.tensor_model_parallel_size=3",
        ),
        (
            ["model.qk_norm=full", "model.num_query_groups=2", "parallel.tensor_model_parallel_size=4"],
            "config error: model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4",
        ),
        (["model.qk_norm=olmo"], "config error: model.qk_norm"),
    ],
)
def test_bad_qk_norm_layouts_are_one_line_and_exit_2(overrides, message, capsys):
    """The pre-launch check (launcher.main, what run_pretrain.sh runs before torchrun)."""
    from dense_model.launcher import main

    tiny = ["model.hidden_size=64", "model.num_attention_heads=4", "model.swiglu_ffn_hidden_size=96"]
    assert main(["configs/demo.yaml", *tiny, *overrides]) == 2
    err = capsys.readouterr().err
    (line,) = err.splitlines()
    assert line.startswith(message), line


@pytest.mark.parametrize("name", ["base", "swiglu", "polynorm", "polyrelu", "gelu", "relu", "squared_relu"])
def test_1b_configs_use_the_seed_dense_runs_dropout_and_evaluation(name):
    """docs/paper.md's "As the seed ran them": the seed's dense launch script left Megatron-LM
    231007's dropout defaults (attention 0.1, hidden 0.1) and evaluated every 10,000 steps for 10
    global batches; the 1B configs say so, the dropout reaches megatron-core's TransformerConfig
    (embeddings, residual branches, attention probabilities), and the dense run has no QK-norm."""
    from dense_model.model import transformer_config

    cfg = load_config(f"configs/1b/{name}.yaml", ["model.vocab_size=32000"])
    assert (cfg.logging.eval_interval, cfg.logging.eval_iters) == (10_000, 10)
    assert cfg.model.qk_norm == "none"
    config = transformer_config(cfg, device=torch.device("cpu"), dtype=torch.float32)
    assert (config.hidden_dropout, config.attention_dropout) == (0.1, 0.1)
    assert not config.qk_layernorm
