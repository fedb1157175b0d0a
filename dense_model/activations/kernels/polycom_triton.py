"""Triton kernels of the PolyCom activations (PolyNorm, PolyReLU), forward and backward.

Launchers and the ``autograd.Function`` live in ``polycom.py``; this module holds only ``@triton.jit``
code. Every kernel works on a 2-D row-major view ``[rows, n_cols]`` of the activation input (one row
per token, ``n_cols`` = the local FFN slice, e.g. 8256 at TP=1 for the 1B model, not a power of two:
columns are masked, long rows are walked in column tiles).

Notation shared by all kernels. A "per-power vector" has ``PAD = next_pow2(ORDER + 1)`` lanes
indexed by the power k = 0..ORDER (lanes above ORDER are zero):

* forward statistics   s_k = sum_j x_j^(2k)        (k >= 1; PolyNorm's sums of squares of x^k)
* inverse RMS          inv_k = rsqrt(s_k / width + eps), width = n_cols * tp_size
* polynomial           P(u) = sum_k c_k u^k with c_0 = bias, c_k = w_k * inv_k (PolyNorm) or w_k (PolyReLU)
* backward moments     m_k = sum_j g_j u_j^k        (k >= 0; m_0 = sum g feeds d bias, m_k d w_k)

PolyNorm backward (per row, D_k = m_k summed over the TP group):
    dx = g * P'(x) - x * sum_k k c_k (inv_k^2 D_k / width) x^(2(k-1))
PolyReLU backward: dx = g * P'(relu(x)) * [x > 0].

All arithmetic is fp32 whatever the storage dtype (x^6 overflows fp16), results are cast on store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pick(vec, lanes, k):
    """Lane k of a small per-power vector, as a scalar."""
    return tl.sum(tl.where(lanes == k, vec, 0.0), axis=0)


@triton.jit
def _sumsq_of_powers(x, lanes, ORDER: tl.constexpr):
    """[PAD] vector: lane k (1..ORDER) = sum over the tile of (x^k)^2 = x^(2k); lane 0 = 0."""
    x2 = x * x
    q = x2
    sums = tl.zeros(lanes.shape, tl.float32)
    for k in tl.static_range(1, ORDER + 1):
        sums = tl.where(lanes == k, tl.sum(q, axis=0), sums)
        q = q * x2
    return sums


@triton.jit
def _moments(u, g, lanes, ORDER: tl.constexpr):
    """[PAD] vector: lane k (0..ORDER) = sum over the tile of g * u^k."""
    t = g
    mom = tl.zeros(lanes.shape, tl.float32)
    for k in tl.static_range(0, ORDER + 1):
        mom = tl.where(lanes == k, tl.sum(t, axis=0), mom)
        t = t * u
    return mom


@triton.jit
def _poly(u, coef, lanes, ORDER: tl.constexpr):
    """P(u) = sum_{k=0..ORDER} c_k u^k by Horner's rule."""
    h = tl.zeros_like(u) + _pick(coef, lanes, ORDER)
    for j in tl.static_range(1, ORDER + 1):
        h = h * u + _pick(coef, lanes, ORDER - j)
    return h


@triton.jit
def _poly_deriv(u, coef, lanes, ORDER: tl.constexpr):
    """P'(u) = sum_{k=1..ORDER} k c_k u^(k-1) by Horner's rule."""
    h = tl.zeros_like(u) + ORDER * _pick(coef, lanes, ORDER)
    for j in tl.static_range(1, ORDER):
        h = h * u + (ORDER - j) * _pick(coef, lanes, ORDER - j)
    return h


@triton.jit
def _norm_correction(x, e, lanes, ORDER: tl.constexpr):
    """x * sum_{k=1..ORDER} e_k (x^2)^(k-1): the part of dx that flows through the row statistics."""
    x2 = x * x
    h = tl.zeros_like(x) + _pick(e, lanes, ORDER)
    for j in tl.static_range(1, ORDER):
        h = h * x2 + _pick(e, lanes, ORDER - j)
    return h * x


@triton.jit
def _load_coefs(W, B, lanes, ORDER: tl.constexpr):
    """[PAD] fp32 vector (bias, w_1, ..., w_ORDER, 0...) from the parameters (fp32 or bf16)."""
    w = tl.load(W + lanes - 1, mask=(lanes >= 1) & (lanes <= ORDER), other=0.0).to(tl.float32)
    b = tl.load(B).to(tl.float32)
    return tl.where(lanes == 0, b, w)


@triton.jit
def _inv_rms(sums, lanes, inv_width, eps, ORDER: tl.constexpr):
    """[PAD] vector of rsqrt(s_k / width + eps) on lanes 1..ORDER, 0 elsewhere."""
    valid = (lanes >= 1) & (lanes <= ORDER)
    return tl.where(valid, tl.rsqrt(sums * inv_width + eps), 0.0)


# ----------------------------------------------------------------------------------------------
# PolyNorm forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def polynorm_fwd_fused_kernel(
    X,  # [rows, n_cols] input (any float dtype)
    Y,  # [rows, n_cols] output (x's dtype)
    INV,  # [rows, ORDER] fp32 out: inverse RMS per power, saved for backward
    W,  # [ORDER] weights
    B,  # [1] bias
    n_cols,
    stride_x,
    stride_y,
    inv_width,  # 1 / n_cols (TP=1)
    eps,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # BLOCK >= n_cols: the row stays in registers, read once
):
    """One program per row: statistics and output in one kernel (TP=1)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    lanes = tl.arange(0, PAD)
    cols = tl.arange(0, BLOCK)
    coef = _load_coefs(W, B, lanes, ORDER)
    if SINGLE_TILE:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        inv = _inv_rms(_sumsq_of_powers(x, lanes, ORDER), lanes, inv_width, eps, ORDER)
        coef = tl.where(lanes == 0, coef, coef * inv)
        y = _poly(x, coef, lanes, ORDER)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Two passes over the row; the second re-reads a tile this program just read (an L2 hit
        # on a GPU: a row is 16.5 KB in bf16 at n_cols = 8256), so HBM still sees one read.
        sums = tl.zeros([PAD], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            sums += _sumsq_of_powers(x, lanes, ORDER)
        inv = _inv_rms(sums, lanes, inv_width, eps, ORDER)
        coef = tl.where(lanes == 0, coef, coef * inv)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = _poly(x, coef, lanes, ORDER)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(INV + row * ORDER + lanes - 1, inv, mask=(lanes >= 1) & (lanes <= ORDER))


@triton.jit
def polynorm_fwd_stats_kernel(
    X,  # [rows, n_cols] input
    SUMSQ,  # [rows, ORDER] fp32 out: sum_j x_j^(2k) over the local slice
    n_cols,
    stride_x,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: the local per-row sums of squares of x^1..x^ORDER (split path)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    lanes = tl.arange(0, PAD)
    cols = tl.arange(0, BLOCK)
    sums = tl.zeros([PAD], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        sums += _sumsq_of_powers(x, lanes, ORDER)
    tl.store(SUMSQ + row * ORDER + lanes - 1, sums, mask=(lanes >= 1) & (lanes <= ORDER))


@triton.jit
def polynorm_fwd_apply_kernel(
    X,  # [rows, n_cols] input
    Y,  # [rows, n_cols] output
    INV,  # [rows, ORDER] fp32: inverse RMS from the (all-reduced) statistics
    W,
    B,
    n_cols,
    stride_x,
    stride_y,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (rows, column tiles): y = b + sum_k w_k inv_k x^k (split path)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    lanes = tl.arange(0, PAD)
    inv = tl.load(INV + row * ORDER + lanes - 1, mask=(lanes >= 1) & (lanes <= ORDER), other=0.0)
    coef = _load_coefs(W, B, lanes, ORDER)
    coef = tl.where(lanes == 0, coef, coef * inv)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _poly(x, coef, lanes, ORDER)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# PolyNorm backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _polynorm_dx_coefs(W, B, INV, MOM, row, lanes, inv_width, ORDER: tl.constexpr, PAD: tl.constexpr):
    """(c, e): c_k = w_k inv_k (c_0 = b); e_k = k c_k inv_k^2 D_k / width, D_k from the moments."""
    valid = (lanes >= 1) & (lanes <= ORDER)
    inv = tl.load(INV + row * ORDER + lanes - 1, mask=valid, other=0.0)
    mom = tl.load(MOM + row * (ORDER + 1) + lanes, mask=lanes <= ORDER, other=0.0)
    coef = _load_coefs(W, B, lanes, ORDER)
    coef = tl.where(lanes == 0, coef, coef * inv)
    e = lanes.to(tl.float32) * coef * inv * inv * mom * inv_width
    return coef, e


@triton.jit
def polynorm_bwd_fused_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] grad of the input out
    INV,  # [rows, ORDER] fp32 saved inverse RMS
    MOM,  # [rows, ORDER + 1] fp32 out: m_k = sum_j g_j x_j^k (for d weight / d bias)
    W,
    B,
    n_cols,
    stride_x,
    stride_g,
    stride_dx,
    inv_width,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """One program per row (TP=1): moments of g against x^k, then dx, in one kernel."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    dx_row = DX + row * stride_dx
    lanes = tl.arange(0, PAD)
    cols = tl.arange(0, BLOCK)
    valid = (lanes >= 1) & (lanes <= ORDER)
    inv = tl.load(INV + row * ORDER + lanes - 1, mask=valid, other=0.0)
    coef = _load_coefs(W, B, lanes, ORDER)
    coef = tl.where(lanes == 0, coef, coef * inv)
    if SINGLE_TILE:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        mom = _moments(x, g, lanes, ORDER)
        e = lanes.to(tl.float32) * coef * inv * inv * mom * inv_width
        dx = g * _poly_deriv(x, coef, lanes, ORDER) - _norm_correction(x, e, lanes, ORDER)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        mom = tl.zeros([PAD], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            mom += _moments(x, g, lanes, ORDER)
        e = lanes.to(tl.float32) * coef * inv * inv * mom * inv_width
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            dx = g * _poly_deriv(x, coef, lanes, ORDER) - _norm_correction(x, e, lanes, ORDER)
            tl.store(dx_row + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(MOM + row * (ORDER + 1) + lanes, mom, mask=lanes <= ORDER)


@triton.jit
def polynorm_bwd_stats_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    MOM,  # [rows, ORDER + 1] fp32 out: local m_k = sum_j g_j x_j^k
    n_cols,
    stride_x,
    stride_g,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: the local moments m_0..m_ORDER (split path, all-reduced after)."""
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, PAD)
    cols = tl.arange(0, BLOCK)
    mom = tl.zeros([PAD], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + row * stride_g + start + cols, mask=mask, other=0.0).to(tl.float32)
        mom += _moments(x, g, lanes, ORDER)
    tl.store(MOM + row * (ORDER + 1) + lanes, mom, mask=lanes <= ORDER)


@triton.jit
def polynorm_bwd_apply_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] out
    INV,  # [rows, ORDER] fp32 saved inverse RMS
    MOM,  # [rows, ORDER + 1] fp32 moments summed over the TP group
    W,
    B,
    n_cols,
    stride_x,
    stride_g,
    stride_dx,
    inv_width,  # 1 / (n_cols * tp_size)
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (rows, column tiles): dx from the global moments (split path)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    lanes = tl.arange(0, PAD)
    coef, e = _polynorm_dx_coefs(W, B, INV, MOM, row, lanes, inv_width, ORDER, PAD)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    dx = g * _poly_deriv(x, coef, lanes, ORDER) - _norm_correction(x, e, lanes, ORDER)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# PolyReLU (elementwise; the backward also reduces the moments for d weight / d bias)
# ----------------------------------------------------------------------------------------------


@triton.jit
def polyrelu_fwd_kernel(
    X,  # [rows, n_cols] input
    Y,  # [rows, n_cols] output
    W,
    B,
    n_cols,
    stride_x,
    stride_y,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (rows, column tiles): y = b + sum_k w_k relu(x)^k."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    lanes = tl.arange(0, PAD)
    coef = _load_coefs(W, B, lanes, ORDER)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _poly(tl.maximum(x, 0.0), coef, lanes, ORDER)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def polyrelu_bwd_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] out
    PART,  # [rows, n_tiles, ORDER + 1] fp32 out: per-tile sum g * relu(x)^k
    W,
    B,
    n_cols,
    n_tiles,
    stride_x,
    stride_g,
    stride_dx,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid (rows, column tiles): dx = g * P'(relu(x)) * [x > 0] and the tile's partial moments."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    lanes = tl.arange(0, PAD)
    coef = _load_coefs(W, B, lanes, ORDER)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.maximum(x, 0.0)
    dx = tl.where(x > 0.0, g * _poly_deriv(u, coef, lanes, ORDER), 0.0)
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    mom = _moments(u, g, lanes, ORDER)
    tl.store(PART + (row * n_tiles + tile) * (ORDER + 1) + lanes, mom, mask=lanes <= ORDER)
