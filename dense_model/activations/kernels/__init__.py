"""Fused (Triton) kernels of the activations; imported lazily by the registry, never at package import.

``polycom.polycom_fused`` is PolyNorm's and PolyReLU's fast path (``polycom_triton`` holds the
``@triton.jit`` code). Importing this package does not import Triton; importing ``polycom`` raises
ImportError where Triton is missing, and the registry then uses the torch reference.
"""
