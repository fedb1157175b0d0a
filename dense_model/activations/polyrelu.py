"""PolyReLU: a0 + a1 relu(x) + a2 relu(x)^2 + a3 relu(x)^3 (order configurable)."""

from dense_model.activations._polycom import PolyCom, load_fused_kernel
from dense_model.activations.registry import register_activation


@register_activation("polyrelu", takes_tp_group=True, fused=load_fused_kernel)
class PolyReLU(PolyCom):
    """PolyReLU (PolyCom with inner relu); learnable a1..a3 = 1/3, a0 = 0."""

    default_inner = "relu"
