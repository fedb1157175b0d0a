"""The CPU mode's TorchFunctionMode (dense_model/compat/cpu.py) in this process: what megatron-core
writes for a GPU (a CUDA device as a keyword, an int or a torch.device; pinned memory; ``.cuda()``,
``.to("cuda")``; ``Tensor.type()`` names) runs on the CPU, and every other call (the fast path, no
keyword arguments to rewrite) returns what it returns without the mode."""

import pytest
import torch

from dense_model.compat.cpu import _CudaToCpuMode


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, torch.device("cuda")], ids=str)
def test_factory_calls_on_a_cuda_device_make_cpu_tensors(device):
    with _CudaToCpuMode():
        for make in (
            lambda: torch.zeros(2, 3, device=device),
            lambda: torch.empty(4, dtype=torch.bfloat16, device=device),
            lambda: torch.arange(5, device=device),
            lambda: torch.tensor([1.0], device=device),
        ):
            assert make().device.type == "cpu"


def test_pinned_memory_cuda_moves_and_type_names():
    x = torch.randn(3, 2)
    with _CudaToCpuMode():
        assert torch.empty(3, pin_memory=True).is_pinned() is False
        assert torch.zeros(2, device="cpu", pin_memory=True).device.type == "cpu"
        assert x.cuda() is x
        assert x.to("cuda") is x and x.to(0) is x and x.to(device="cuda") is x
        assert x.to("cuda", torch.float64).dtype == torch.float64
        assert x.to(device=torch.device("cuda"), dtype=torch.bfloat16).dtype == torch.bfloat16
        assert x.type() == "torch.cuda.FloatTensor" and x.long().type() == "torch.cuda.LongTensor"
        assert x.type(torch.float64).dtype == torch.float64


def test_other_calls_are_unchanged():
    x, y = torch.randn(3, 4), torch.randn(4, 2)
    with _CudaToCpuMode():
        got = (x @ y, x.shape, x.size(1), torch.cat([x, x], dim=0), x.sum(dim=1, keepdim=True))
        cpu = torch.ones(2, device="cpu", dtype=torch.float64)
    assert cpu.dtype == torch.float64
    assert torch.equal(got[0], x @ y) and got[1] == (3, 4) and got[2] == 4
    assert torch.equal(got[3], torch.cat([x, x])) and got[4].shape == (3, 1)
