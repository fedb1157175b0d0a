"""The fused RoPE without Transformer Engine (``dense_model.rope``): forward and gradient against
megatron-core's own unfused ``_apply_rotary_pos_emb_bshd``; ``model.rope_fusion``'s decision as a
function of (setting, device, installed kernels); and megatron-core's TransformerConfig and GPT model
taking our function through ``rope_utils.apply_rotary_pos_emb``.

Without CUDA the Triton kernel runs on CPU tensors under Triton's interpreter: ``dense_model.rope``
defines its kernel on first use, so this module switches ``TRITON_INTERPRET`` on while its tests run
(and forgets the kernel defined under it afterwards); the model test runs in a fresh process with it.
"""

from __future__ import annotations

import os

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from dense_model import rope
from dense_model.backends import Kernels, installed_kernels
from dense_model.config import ConfigError, load_config
from dense_model.model import fusion_flags, transformer_config
from dense_model.rope import fused_apply_rotary_pos_emb, install_rope_fusion, rope_fusion_backend
from dense_model.testing import spawn_workers, tiny_model_overrides

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _interpreter_on_the_cpu():
    if DEVICE == "cuda" or "TRITON_INTERPRET" in os.environ:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    rope._kernel.cache_clear()
    try:
        yield
    finally:
        del os.environ["TRITON_INTERPRET"]
        rope._kernel.cache_clear()  # an interpreted kernel must not outlive the switch


@pytest.fixture
def restore_megatron_global(monkeypatch):
    """install_rope_fusion sets megatron-core's module global: put back what was there."""
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", rope_utils.fused_apply_rotary_pos_emb)


def reference(t, freqs, interleaved):
    return _apply_rotary_pos_emb_bshd(t, freqs[: t.shape[0]], rotary_interleaved=interleaved)


def forward_and_grad(fn, t, freqs, interleaved, grad):
    t = t.detach().requires_grad_(True)
    y = fn(t, freqs, interleaved)
    (dt,) = torch.autograd.grad(y, t, grad)
    return y.detach(), dt


def fused(t, freqs, interleaved):
    return fused_apply_rotary_pos_emb(t, freqs, interleaved=interleaved)


# (s, b, h, d, d_rot): partial and full rotary dims, odd sequences, b 1 and 3, h 1 and 5, d not a
# power of two, the smallest rotary dim.
SHAPES = [(7, 3, 5, 16, 10), (5, 1, 1, 8, 8), (1, 3, 1, 12, 4), (9, 1, 5, 6, 2), (3, 3, 5, 24, 24)]


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradient_match_megatron_unfused_fp32(shape, interleaved):
    s, b, h, d, d_rot = shape
    gen = torch.Generator().manual_seed(sum(shape) + interleaved)
    t = torch.randn(s, b, h, d, generator=gen).to(DEVICE)
    # Angles of any size, not megatron's [f, f] layout: each channel its own angle.
    freqs = (torch.rand(s, 1, 1, d_rot, generator=gen) * 40 - 20).to(DEVICE)
    grad = torch.randn(s, b, h, d, generator=gen).to(DEVICE)
    y, dt = forward_and_grad(fused, t, freqs, interleaved, grad)
    y_ref, dt_ref = forward_and_grad(reference, t, freqs, interleaved, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dt, dt_ref, rtol=1e-5, atol=1e-6)
    # The channels past d_rot pass through, forward and backward, bit for bit.
    assert torch.equal(y[..., d_rot:], t[..., d_rot:]) and torch.equal(dt[..., d_rot:], grad[..., d_rot:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_strided_input_longer_freqs_and_strided_gradient(interleaved):
    """Query/key as megatron hands them over: a view into the fused QKV output (strided heads), the
    batch transposed; freqs for more positions than t has (the first s are used); a non-contiguous
    incoming gradient."""
    gen = torch.Generator().manual_seed(3)
    s, b, h, d, d_rot = 5, 3, 2, 8, 6
    qkv = torch.randn(s, b, h, 3 * d, generator=gen).to(DEVICE)
    t = qkv[..., d : 2 * d]  # the key's slice: stride(2) = 3 d
    t_bt = torch.randn(b, s, h, d, generator=gen).to(DEVICE).transpose(0, 1)
    freqs = (torch.rand(s + 4, 1, 1, d_rot, generator=gen) * 10).to(DEVICE)
    grad = torch.randn(s, b, d, h, generator=gen).to(DEVICE).transpose(2, 3)
    for x in (t, t_bt):
        assert not x.is_contiguous()
        y, dt = forward_and_grad(fused, x, freqs, interleaved, grad)
        y_ref, dt_ref = forward_and_grad(reference, x, freqs, interleaved, grad)
        assert y.is_contiguous() and y.shape == x.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dt, dt_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_long_context_angles_keep_fp32_accuracy(interleaved):
    """Positions near 8192 with megatron's frequencies (angles up to ~8200 rad): the kernel's sin and
    cos must reduce such angles as exactly as torch's (an approximate hardware sine would be ~1e-3
    off here; the interpreter uses numpy's)."""
    gen = torch.Generator().manual_seed(9)
    s, b, h, d = 6, 1, 2, 32
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(8186, 8186 + s, dtype=torch.float32), inv)
    if interleaved:
        freqs = torch.stack([angles, angles], dim=-1).flatten(-2)
    else:
        freqs = torch.cat([angles, angles], dim=-1)
    freqs = freqs[:, None, None, :].to(DEVICE)
    t = torch.randn(s, b, h, d, generator=gen).to(DEVICE)
    grad = torch.randn(s, b, h, d, generator=gen).to(DEVICE)
    y, dt = forward_and_grad(fused, t, freqs, interleaved, grad)
    y_ref, dt_ref = forward_and_grad(reference, t, freqs, interleaved, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, dt_ref, rtol=1e-5, atol=1e-5)


def test_bf16_is_the_fp32_rotation_rounded_once():
    """bf16 in, bf16 out: the fp32 result of the same bf16 input rounded once (the unfused bf16 path
    rounds cos and sin first and every product). A GPU rounds to nearest (half a bf16 ulp, 2^-8
    relative); Triton 3.9's interpreter truncates fp32 to bf16 (up to one ulp, 2^-7)."""
    gen = torch.Generator().manual_seed(5)
    s, b, h, d = 9, 3, 5, 16
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :].to(DEVICE)  # megatron's layout
    t = torch.randn(s, b, h, d, generator=gen).to(DEVICE, torch.bfloat16)
    grad = torch.randn(s, b, h, d, generator=gen).to(DEVICE, torch.bfloat16)
    y, dt = forward_and_grad(fused, t, freqs, False, grad)
    y32, dt32 = forward_and_grad(reference, t.float(), freqs, False, grad.float())
    assert y.dtype == dt.dtype == torch.bfloat16
    rtol = 2**-8 if DEVICE == "cuda" else 2**-7
    torch.testing.assert_close(y.float(), y32, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(dt.float(), dt32, rtol=rtol, atol=1e-6)


def test_shapes_megatron_never_sends_are_refused():
    t = torch.zeros(4, 1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must be even"):
        fused_apply_rotary_pos_emb(t, torch.zeros(4, 1, 1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="at most"):
        fused_apply_rotary_pos_emb(t, torch.zeros(4, 1, 1, 10, device=DEVICE))
    with pytest.raises(ValueError, match="positions"):
        fused_apply_rotary_pos_emb(t, torch.zeros(3, 1, 1, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[s, 1, 1, d_rot\]"):
        fused_apply_rotary_pos_emb(t, torch.zeros(4, 2, 1, 8, device=DEVICE))  # mRoPE's per-batch freqs


def test_decision_auto_true_false_for_each_device_and_kernels():
    te, triton, neither = Kernels(transformer_engine=True, triton=True), Kernels(triton=True), Kernels()
    assert rope_fusion_backend("auto", CPU, te) is None  # auto on the CPU: off, whatever is installed
    assert rope_fusion_backend("auto", CUDA, te) == "te"  # TE present: TE's function
    assert rope_fusion_backend(True, CUDA, te) == "te"
    assert rope_fusion_backend("auto", CUDA, triton) == "triton"
    assert rope_fusion_backend("auto", CUDA, neither) is None
    assert rope_fusion_backend(False, CUDA, triton) is None
    with pytest.raises(ConfigError, match=r"model\.rope_fusion=true .*runs on cpu"):
        rope_fusion_backend(True, CPU, triton)
    with pytest.raises(ConfigError, match=r"model\.rope_fusion=true .*neither Transformer Engine nor Triton"):
        rope_fusion_backend(True, CUDA, neither)
    assert fusion_flags(CUDA, triton)["apply_rope_fusion"]
    assert not fusion_flags(CUDA, triton, rope_fusion=False)["apply_rope_fusion"]
    assert not fusion_flags(CPU, triton)["apply_rope_fusion"]


def test_config_true_on_the_cpu_is_an_error_naming_the_field():
    cfg = load_config(None, [*tiny_model_overrides(layers=1, vocab=256, seq=16), "model.rope_fusion=true"])
    assert cfg.model.rope_fusion is True
    with pytest.raises(ConfigError, match=r"model\.rope_fusion=true"):
        transformer_config(cfg, device=CPU, kernels=Kernels(triton=True))


def test_install_keeps_an_installed_function(restore_megatron_global):
    """Where megatron-core already has a fused function (Transformer Engine's) ours is not installed."""
    rope_utils.fused_apply_rotary_pos_emb = _apply_rotary_pos_emb_bshd  # stands for TE's
    assert not install_rope_fusion()
    assert rope_utils.fused_apply_rotary_pos_emb is _apply_rotary_pos_emb_bshd


def _fused_rope_nodes(output) -> int:
    """How many of our autograd nodes the graph behind ``output`` holds."""
    seen, stack, count = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_FusedRoPEBackward"
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return count


def _gpt_worker(rank, world_size, checkpoints, out_file):
    from megatron.core.models.common.embeddings import rope_utils

    from dense_model.model import build_model, model_device, transformer_config
    from dense_model.parallel import initialize_parallel

    initialize_parallel(1, 1, seed=7)
    layers = 2
    cfg = load_config(None, tiny_model_overrides(activation="swiglu", layers=layers, vocab=256, seq=16))
    assert rope_utils.fused_apply_rotary_pos_emb is None  # no TE here: megatron-core has none
    # The GPU path decided on the CPU: a CUDA device with Triton and no TE installs ours, and
    # megatron-core's TransformerConfig accepts apply_rope_fusion=True with it.
    gpu_config = transformer_config(cfg, device=CUDA, dtype=torch.float32, kernels=Kernels(triton=True))
    installed = rope_utils.fused_apply_rotary_pos_emb is fused_apply_rotary_pos_emb
    device = model_device()
    model = build_model(cfg, dtype=torch.float32)  # on the CPU auto leaves it off; the loop sets it
    assert all(layer.self_attention.config is model.config for layer in model.decoder.layers)
    tokens = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1)).to(device)
    position_ids = torch.arange(16, device=device).expand(3, 16)
    results = {}
    for fused_on in (False, True):
        model.config.apply_rope_fusion = fused_on
        model.zero_grad(set_to_none=True)
        logits = model(tokens, position_ids, None)
        nodes = _fused_rope_nodes(logits)
        (logits.float().square().mean()).backward()
        results[fused_on] = {
            "logits": logits.detach().cpu(),
            "grads": {n: p.grad.cpu() for n, p in model.named_parameters()},
            "nodes": nodes,
        }
    # A checkpoint whose config asks for the fusion (model.rope_fusion=true, as a GPU run may) loads for
    # inference on this machine: the loader takes what runs here.
    from dense_model.checkpoint import save_checkpoint
    from dense_model.checkpoint.inference import load_model_for_inference

    cfg.model.rope_fusion = True
    save_checkpoint(checkpoints, 0, model, cfg, weights_only=True)
    loaded = load_model_for_inference(checkpoints)
    with torch.no_grad():
        inference_logits = loaded.model(tokens, position_ids, None).cpu()
    torch.save(
        {
            "inference": (
                loaded.config.model.rope_fusion,
                loaded.model.config.apply_rope_fusion,
                inference_logits,
            ),
            "gpu_flag": gpu_config.apply_rope_fusion,
            "installed": installed,
            "layers": layers,
            "results": results,
        },
        out_file,
    )


def test_gpt_model_through_megatron_apply_rotary_pos_emb_matches_unfused(tmp_path):
    """A tiny GPT model (2 layers, fp32, CPU; the kernel under Triton's interpreter) run through
    megatron-core's ``apply_rotary_pos_emb`` with apply_rope_fusion off, then on: our function is
    what megatron calls (2 autograd nodes per layer, query and key), logits and every gradient equal
    the unfused run to fp32 rounding."""
    if installed_kernels().transformer_engine:
        pytest.skip(
            "Transformer Engine is installed: megatron-core uses TE's fused RoPE, ours is not installed"
        )
    out = tmp_path / "gpt.pt"
    spawn_workers(
        _gpt_worker,
        1,
        str(tmp_path / "checkpoints"),
        str(out),
        env={} if DEVICE == "cuda" else {"TRITON_INTERPRET": "1"},
    )
    r = torch.load(out)
    assert r["gpu_flag"] and r["installed"]
    unfused, fused_run = r["results"][False], r["results"][True]
    assert unfused["nodes"] == 0 and fused_run["nodes"] == 2 * r["layers"]
    torch.testing.assert_close(fused_run["logits"], unfused["logits"], rtol=1e-5, atol=1e-5)
    rope_fusion, flag, inference_logits = r["inference"]
    assert rope_fusion == "auto" and flag == (DEVICE == "cuda")
    torch.testing.assert_close(inference_logits, unfused["logits"], rtol=1e-5, atol=1e-5)
    assert fused_run["grads"].keys() == unfused["grads"].keys()
    for name, grad in unfused["grads"].items():
        torch.testing.assert_close(fused_run["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_rope_cpu_smoke(tmp_path, capsys):
    """``scripts/bench_rope.py --device cpu`` (in this process, under the interpreter): checks fused
    against unfused at a tiny shape and writes its table and JSON, with no timings."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_rope.py"
    spec = importlib.util.spec_from_file_location("bench_rope", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if DEVICE == "cuda":
        pytest.skip("the CPU smoke run; on a GPU the script itself is the benchmark")
    out = tmp_path / "rope.json"
    assert module.main(["--device", "cpu", "--rotary-percent", "0.5", "--json", str(out)]) == 0
    blob = json.loads(out.read_text())
    assert blob["meta"]["shape"] == [7, 3, 5, 16] and blob["meta"]["rotary_dim"] == 8
    assert set(blob["results"]) == {"unfused", "fused"}
    assert all(r["fwd_bwd_ms"] is None for r in blob["results"].values())
    assert "fused ≡ unfused checked" in capsys.readouterr().out
