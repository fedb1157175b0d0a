"""Run megatron-core on the CPU, over gloo, when CUDA is absent.

megatron-core has no CPU mode: about 140 places call ``torch.cuda.current_device()``, ``.cuda()``,
pass ``device="cuda"``, use the CUDA RNG state or assert that a gradient is a
``torch.cuda.FloatTensor`` (see docs/megatron-core.md). This module is the one place
that bends those calls to the CPU, so the rest of dense_model is written as for a GPU:

  (a) a ``TorchFunctionMode`` maps CUDA device arguments of factory calls, ``.cuda()`` and ``.to()``
      to the CPU, and turns off ``pin_memory``;
  (b) the model-parallel RNG tracker and ``torch.cuda`` RNG calls use the CPU generator;
  (c) ``torch.cuda.current_device/synchronize/...`` and CUDA streams become harmless stubs;
  (d) custom autograd Functions' backward runs under the same mode (recompute re-runs forward);
  (e) ``Tensor.type()`` reports CPU tensors under their CUDA names, so megatron's checks that
      a parameter or gradient is a ``torch.cuda.FloatTensor`` pass for CPU float32.

``enable_cpu_mode()`` does all of it once per process, and does nothing at all when CUDA is
available: a GPU run is never changed. Call it before building any megatron-core object
(``dense_model.parallel.initialize_parallel`` does).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_active = False
_mode: TorchFunctionMode | None = None

# Tensor.type() names megatron compares against, CPU name -> CUDA name.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() (an int) as device
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement in every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call and tensor attribute of a CPU run comes through here (about 8,000 per
        # training step of the tests' tiny model): the common case, no keyword naming a CUDA device
        # or pinned memory, goes straight through, without copying kwargs.
        if func is not torch.Tensor.cuda and func is not torch.Tensor.type and func is not torch.Tensor.to:
            if not kwargs:
                return func(*args)
            device = kwargs.get("device")
            if (device is None or not _is_cuda_device(device)) and not kwargs.get("pin_memory"):
                return func(*args, **kwargs)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            # .to("cuda"), .to(0), .to(device="cuda", dtype=...), .to(torch.device("cuda"), dtype)
            args = list(args)
            if len(args) > 1 and _is_cuda_device(args[1]) and not isinstance(args[1], torch.dtype):
                args.pop(1)
            if _is_cuda_device(kwargs.get("device")):
                kwargs.pop("device")
            if len(args) == 1 and not kwargs:
                return args[0]
            return func(*args, **kwargs)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def query(self):
        return True


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    # RNG: the CPU generator is the only device generator there is.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (left alone: a no-op without CUDA).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state


def _patch_autograd_backward() -> None:
    """Custom autograd Functions' backward (activation recompute re-runs the forward there) sees the
    mode too: the autograd engine does not carry torch-function modes into backward."""
    from torch.autograd.function import BackwardCFunction

    original = BackwardCFunction.apply

    def apply(self, *args):
        if torch.overrides._get_current_function_mode_stack():
            return original(self, *args)
        with _CudaToCpuMode():
            return original(self, *args)

    BackwardCFunction.apply = apply


def cpu_mode_active() -> bool:
    """True when this process runs megatron-core through the CPU layer."""
    return _active


def enable_cpu_mode() -> bool:
    """Activate the CPU layer if (and only if) CUDA is unavailable. Idempotent.

    Returns True when the layer is active in this process.
    """
    global _active, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active:
            return True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_autograd_backward()
        _mode = _CudaToCpuMode()
        _mode.__enter__()  # stays pushed for the life of the process
        _active = True
    return True
