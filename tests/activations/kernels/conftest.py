"""Fixtures of the fused PolyCom kernel tests.

Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on when Triton and the kernels are imported and while they run: this conftest imports
them with ``TRITON_INTERPRET=1`` when it is loaded (CI runs plain ``pytest``) and sets it again for
each test module of this folder, never for the rest of the session. With CUDA the same
tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "TRITON_INTERPRET" not in os.environ:
    # Triton decorates its own language functions and our kernels at import: both with the
    # interpreter on. Then it is switched off again, so that it does not leak into the rest of the
    # session (other tests' models take the fused kernels on the CPU under the interpreter, and
    # their training subprocesses would inherit it and run interpreted kernels for minutes).
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        from dense_model.activations.kernels import polycom_triton  # noqa: F401
    except ImportError:  # no Triton: the tests that need it skip
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_on_while_the_kernel_tests_run():
    """Triton's interpreter reads TRITON_INTERPRET when kernels run too (it imports more of Triton
    lazily): on for each test module of this folder, off again after it."""
    if DEVICE == "cuda" or "TRITON_INTERPRET" in os.environ:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        del os.environ["TRITON_INTERPRET"]


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
            raise RuntimeError(
                "Triton was imported before tests/activations/kernels/conftest.py switched its "
                "interpreter on: run the kernel tests in a fresh process"
            )
    return polycom
