"""Fused (Triton) kernels of the activations; imported on demand by a loader, never at package import.

``polycom.polycom_fused`` is PolyNorm's and PolyReLU's fast path (``polycom_triton`` holds the
``@triton.jit`` code). Importing this package does not import Triton; importing ``polycom`` raises
ImportError where Triton is missing, and ``_polycom.load_fused_kernel`` then returns None (the torch
reference runs).
"""
