"""PolyNorm: a0 + a1 N(x) + a2 N(x^2) + a3 N(x^3), N(v) = v / sqrt(mean(v^2) + 1e-6), order configurable.

The mean runs over the whole FFN row, across TP ranks (see _polycom.py).
"""

from dense_model.activations._polycom import PolyCom, load_fused_kernel
from dense_model.activations.registry import register_activation


@register_activation("polynorm", takes_tp_group=True, fused=load_fused_kernel)
class PolyNorm(PolyCom):
    """PolyNorm (PolyCom with inner RMS normalisation, no gain); a1..a3 = 1/3, a0 = 0, eps 1e-6."""

    default_inner = "norm"
