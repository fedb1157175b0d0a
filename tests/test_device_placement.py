"""The GPU path decided without a GPU: fusion flags as a function of (device, installed kernels),
each accepted by megatron-core for the spec in use; the model and the batches on the model's
device; initial weights drawn on the CPU whatever the device."""

import pytest
import torch

from dense_model.config import load_config
from dense_model.model import Kernels, fusion_flags, installed_kernels, transformer_config
from dense_model.testing import spawn_workers, tiny_model_overrides

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
KERNEL_MODULES = {
    "masked_softmax_fusion": "scaled_masked_softmax_cuda",
    "apply_rope_fusion": "transformer_engine.pytorch",
    "gradient_accumulation_fusion": "fused_weight_gradient_mlp_cuda",
}


def tiny_config(*extra):
    return load_config(None, [*tiny_model_overrides(layers=2, vocab=256, seq=32), *extra])


def test_no_fusion_on_the_cpu_whatever_is_installed():
    everything = Kernels(transformer_engine=True, apex_softmax=True, apex_grad_accum=True, triton=True)
    assert not any(fusion_flags(CPU, everything).values())


def test_each_cuda_fusion_needs_its_kernel():
    bare = fusion_flags(CUDA, Kernels())
    assert bare == {
        "bias_dropout_fusion": True,  # torch's JIT fuser: needs nothing else
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
    }
    assert fusion_flags(CUDA, Kernels(apex_softmax=True))["masked_softmax_fusion"]
    assert not fusion_flags(CUDA, Kernels(apex_softmax=True), "transformer_engine")["masked_softmax_fusion"]
    assert fusion_flags(CUDA, Kernels(transformer_engine=True))["apply_rope_fusion"]
    assert fusion_flags(CUDA, Kernels(apex_grad_accum=True))["gradient_accumulation_fusion"]
    full = Kernels(transformer_engine=True, apex_softmax=True, apex_grad_accum=True)
    assert not fusion_flags(CUDA, full)["persist_layer_norm"]  # no spec of ours uses apex's LayerNorm


def test_fusions_for_this_machine_import():
    """With what is installed here, every fusion a GPU would switch on has a module that imports."""
    kernels = installed_kernels()
    modules = dict(KERNEL_MODULES)
    if not kernels.transformer_engine:  # without TE the fused RoPE is dense_model.rope's Triton kernel
        modules["apply_rope_fusion"] = "triton"
    for flag, on in fusion_flags(CUDA, kernels).items():
        if on and flag in modules:
            __import__(modules[flag])


def test_cuda_config_builds_the_local_spec_and_runs_its_softmax():
    """The config a GPU without apex/TE gets: megatron-core accepts it (TransformerConfig, the local
    spec's torch RMSNorm) and its attention softmax runs in bf16 at a fusable shape."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from dense_model.compat import enable_cpu_mode

    enable_cpu_mode()  # megatron-core's causal mask asks for a CUDA tensor
    cfg = tiny_config()
    config = transformer_config(cfg, device=CUDA, dtype=torch.bfloat16, kernels=Kernels())
    assert config.bf16 and not config.persist_layer_norm and not config.masked_softmax_fusion
    norm = WrappedTorchNorm(config, hidden_size=cfg.model.hidden_size, eps=1e-5)
    assert norm(torch.ones(2, cfg.model.hidden_size)).shape == (2, cfg.model.hidden_size)

    def softmax(config):
        return FusedScaleMaskSoftmax(
            input_in_fp16=False,
            input_in_bf16=True,
            attn_mask_type=AttnMaskType.causal,
            scaled_masked_softmax_fusion=config.masked_softmax_fusion,
            mask_func=lambda scores, mask: scores.masked_fill(mask, -10000.0),
            softmax_in_fp32=True,
            scale=None,
        )

    scores = torch.randn(2, 4, 128, 128, dtype=torch.bfloat16)  # [b, heads, sq, sk]: a fusable shape
    probs = softmax(config)(scores, None)
    assert probs.dtype == torch.bfloat16 and torch.allclose(
        probs.float().sum(-1), torch.ones(2, 4, 128), atol=1e-2
    )
    # With the flag on (as a GPU got it before), the same call needs apex's extension.
    with_apex = transformer_config(cfg, device=CUDA, dtype=torch.bfloat16, kernels=Kernels(apex_softmax=True))
    if not installed_kernels().apex_softmax:
        with pytest.raises(ModuleNotFoundError, match="softmax_cuda"):
            softmax(with_apex)(scores, None)


def _placement(rank, world_size, out_file):
    from dense_model.model import build_model, initialize_weights
    from dense_model.parallel import initialize_parallel
    from dense_model.training.batches import batch_iterator

    initialize_parallel(1, 1, seed=5)
    cfg = tiny_config("training.global_batch_size=2", "training.micro_batch_size=1")
    meta = torch.device("meta")
    on_meta = build_model(cfg, device=meta)
    on_cpu = build_model(cfg)
    initialize_weights(on_meta, cfg)  # the generator is the CPU's whatever the parameters' device
    samples = [
        {
            "tokens": torch.arange(32),
            "labels": torch.arange(1, 33),
            "loss_mask": torch.ones(32),
            "position_ids": torch.arange(32),
        }
    ] * 4
    batch = next(batch_iterator(samples, cfg, 0, device=meta))
    torch.save(
        {
            "meta_params": sorted({p.device.type for p in on_meta.parameters()}),
            "meta_buffers": sorted({b.device.type for b in on_meta.buffers()}),
            "cpu_params": sorted({p.device.type for p in on_cpu.parameters()}),
            "batch": {k: (v.device.type, tuple(v.shape)) for k, v in batch.items()},
        },
        out_file,
    )


def test_model_and_batches_go_to_the_requested_device(tmp_path):
    out = tmp_path / "placement.pt"
    spawn_workers(_placement, 1, str(out))
    r = torch.load(out)
    assert r["meta_params"] == ["meta"] and r["meta_buffers"] in ([], ["meta"])
    assert r["cpu_params"] == ["cpu"]
    assert r["batch"] == {
        "tokens": ("meta", (1, 32)),
        "labels": ("meta", (1, 32)),
        "loss_mask": ("meta", (1, 32)),
        "position_ids": ("meta", (1, 32)),
    }
