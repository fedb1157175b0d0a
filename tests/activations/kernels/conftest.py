"""Fixtures of the fused PolyCom kernel tests.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before the kernels are decorated, i.e. before ``polycom_triton`` is imported: this
conftest sets ``TRITON_INTERPRET=1`` when it is loaded (CI runs plain ``pytest``). With CUDA the same
tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def polycom_kernels():
    """The ``dense_model.activations.kernels.polycom`` module, its kernels interpreted on the CPU."""
    pytest.importorskip("triton")
    from dense_model.activations.kernels import polycom, polycom_triton

    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(polycom_triton.polynorm_fwd_fused_kernel, InterpretedFunction):
            # Imported earlier in this session without the interpreter: decorate the kernels again.
            os.environ["TRITON_INTERPRET"] = "1"
            importlib.reload(polycom_triton)
    return polycom
