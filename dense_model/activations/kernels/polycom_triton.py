"""Triton kernels of the PolyCom activations (PolyNorm, PolyReLU), forward and backward.

Launchers and the ``autograd.Function`` live in ``polycom.py``; this module holds only ``@triton.jit``
code. Every kernel works on a 2-D row-major view ``[rows, n_cols]`` of the activation input (one row
per token, ``n_cols`` = the local FFN slice, e.g. 8256 at TP=1 for the 1B model, not a power of two).

Layout for bandwidth:

* a persistent grid: program p handles rows p, p + P, p + 2P, ... (P = a few programs per SM), so
  loads of one row overlap the reductions and stores of another, and several programs share an SM;
* exact column tiling: a row is walked in ``n_cols // BLOCK`` unmasked chunks of ``BLOCK`` columns
  and one masked tail chunk of ``TAIL = next_pow2(n_cols % BLOCK)`` columns (8256 = 8 x 1024 + 64:
  no lane is padding outside the 64-column tail), never one power-of-two tile over the whole row;
  two-pass kernels re-read the row's chunks from L2 (a row is 16.5 KB in bf16), not HBM;
* coefficient gradients from per-program partials: each program accumulates its rows'
  (d bias, d w_1..d w_r) in registers and writes one [r + 1] row of ``PART`` ([P, r + 1]); the
  launcher sums the P rows (fixed order: deterministic, no atomics).

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


@triton.jit
def _load(ptr, offs, n_cols, MASKED: tl.constexpr):
    """fp32 values at ``ptr + offs`` (masked to ``offs < n_cols`` in the tail chunk)."""
    if MASKED:
        return tl.load(ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _store(ptr, offs, value, n_cols, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < n_cols)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _row_sumsq(x_row, n_cols, lanes, ORDER: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """[PAD] vector s_k = sum_j x_j^(2k) over one row (full chunks, then the tail)."""
    sums = tl.zeros(lanes.shape, tl.float32)
    cols = tl.arange(0, BLOCK)
    n_full = n_cols // BLOCK
    for c in range(0, n_full):
        sums += _sumsq_of_powers(_load(x_row, c * BLOCK + cols, n_cols, False), lanes, ORDER)
    if TAIL > 0:
        offs = n_full * BLOCK + tl.arange(0, TAIL)
        sums += _sumsq_of_powers(_load(x_row, offs, n_cols, True), lanes, ORDER)
    return sums


@triton.jit
def _row_moments(
    x_row,
    g_row,
    n_cols,
    lanes,
    RELU: tl.constexpr,
    ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """[PAD] vector m_k = sum_j g_j u_j^k over one row, u = x (PolyNorm) or relu(x) (PolyReLU)."""
    mom = tl.zeros(lanes.shape, tl.float32)
    cols = tl.arange(0, BLOCK)
    n_full = n_cols // BLOCK
    for c in range(0, n_full):
        offs = c * BLOCK + cols
        u = _load(x_row, offs, n_cols, False)
        if RELU:
            u = tl.maximum(u, 0.0)
        mom += _moments(u, _load(g_row, offs, n_cols, False), lanes, ORDER)
    if TAIL > 0:
        offs = n_full * BLOCK + tl.arange(0, TAIL)
        u = _load(x_row, offs, n_cols, True)
        if RELU:
            u = tl.maximum(u, 0.0)
        mom += _moments(u, _load(g_row, offs, n_cols, True), lanes, ORDER)
    return mom


@triton.jit
def _poly_chunk(
    x_row, y_row, offs, n_cols, coef, lanes, RELU: tl.constexpr, ORDER: tl.constexpr, MASKED: tl.constexpr
):
    """y = P(x) (PolyNorm, coef already scaled by inv) or P(relu(x)) on one chunk."""
    u = _load(x_row, offs, n_cols, MASKED)
    if RELU:
        u = tl.maximum(u, 0.0)
    _store(y_row, offs, _poly(u, coef, lanes, ORDER), n_cols, MASKED)


@triton.jit
def _row_poly(
    x_row,
    y_row,
    n_cols,
    coef,
    lanes,
    RELU: tl.constexpr,
    ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    n_full = n_cols // BLOCK
    for c in range(0, n_full):
        _poly_chunk(x_row, y_row, c * BLOCK + cols, n_cols, coef, lanes, RELU, ORDER, False)
    if TAIL > 0:
        offs = n_full * BLOCK + tl.arange(0, TAIL)
        _poly_chunk(x_row, y_row, offs, n_cols, coef, lanes, RELU, ORDER, True)


@triton.jit
def _norm_dx_chunk(
    x_row, g_row, dx_row, offs, n_cols, coef, e, lanes, ORDER: tl.constexpr, MASKED: tl.constexpr
):
    x = _load(x_row, offs, n_cols, MASKED)
    g = _load(g_row, offs, n_cols, MASKED)
    dx = g * _poly_deriv(x, coef, lanes, ORDER) - _norm_correction(x, e, lanes, ORDER)
    _store(dx_row, offs, dx, n_cols, MASKED)


@triton.jit
def _row_norm_dx(
    x_row, g_row, dx_row, n_cols, coef, e, lanes, ORDER: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr
):
    cols = tl.arange(0, BLOCK)
    n_full = n_cols // BLOCK
    for c in range(0, n_full):
        _norm_dx_chunk(x_row, g_row, dx_row, c * BLOCK + cols, n_cols, coef, e, lanes, ORDER, False)
    if TAIL > 0:
        offs = n_full * BLOCK + tl.arange(0, TAIL)
        _norm_dx_chunk(x_row, g_row, dx_row, offs, n_cols, coef, e, lanes, ORDER, True)


@triton.jit
def _relu_dx_chunk(
    x_row, g_row, dx_row, offs, n_cols, coef, lanes, ORDER: tl.constexpr, MASKED: tl.constexpr
):
    """dx = g P'(relu(x)) [x > 0] on one chunk; returns the chunk's moments of g against relu(x)^k."""
    x = _load(x_row, offs, n_cols, MASKED)
    g = _load(g_row, offs, n_cols, MASKED)
    u = tl.maximum(x, 0.0)
    _store(dx_row, offs, tl.where(x > 0.0, g * _poly_deriv(u, coef, lanes, ORDER), 0.0), n_cols, MASKED)
    return _moments(u, g, lanes, ORDER)


@triton.jit
def _norm_e(coef, inv, mom, lanes, inv_width):
    """e_k = k c_k inv_k^2 D_k / width (the statistics' part of dx)."""
    return lanes.to(tl.float32) * coef * inv * inv * mom * inv_width


@triton.jit
def _param_grads(mom, inv, lanes):
    """A row's share of (d bias, d w_1..): D_0 and inv_k D_k."""
    return tl.where(lanes == 0, mom, inv * mom)


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
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    inv_width,  # 1 / n_cols (TP=1)
    eps,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows (TP=1): the row's statistics (pass 1), then its output (pass 2, from L2)."""
    lanes = tl.arange(0, PAD)
    valid = (lanes >= 1) & (lanes <= ORDER)
    coef0 = _load_coefs(W, B, lanes, ORDER)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        x_row = X + row * stride_x
        inv = _inv_rms(_row_sumsq(x_row, n_cols, lanes, ORDER, BLOCK, TAIL), lanes, inv_width, eps, ORDER)
        coef = tl.where(lanes == 0, coef0, coef0 * inv)
        _row_poly(x_row, Y + row * stride_y, n_cols, coef, lanes, False, ORDER, BLOCK, TAIL)
        tl.store(INV + row * ORDER + lanes - 1, inv, mask=valid)


@triton.jit
def polynorm_fwd_stats_kernel(
    X,  # [rows, n_cols] input
    SUMSQ,  # [rows, ORDER] fp32 out: sum_j x_j^(2k) over the local slice
    n_rows,
    n_cols,
    stride_x,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows: the local per-row sums of squares of x^1..x^ORDER (split path)."""
    lanes = tl.arange(0, PAD)
    valid = (lanes >= 1) & (lanes <= ORDER)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        sums = _row_sumsq(X + row * stride_x, n_cols, lanes, ORDER, BLOCK, TAIL)
        tl.store(SUMSQ + row * ORDER + lanes - 1, sums, mask=valid)


@triton.jit
def polynorm_fwd_apply_kernel(
    X,  # [rows, n_cols] input
    Y,  # [rows, n_cols] output
    SUMSQ,  # [rows, ORDER] fp32: the statistics summed over the TP group
    INV,  # [rows, ORDER] fp32 out: inverse RMS, saved for backward
    W,
    B,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    inv_width,  # 1 / (n_cols * tp_size)
    eps,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows: inv from the (all-reduced) statistics, y = b + sum_k w_k inv_k x^k (split path)."""
    lanes = tl.arange(0, PAD)
    valid = (lanes >= 1) & (lanes <= ORDER)
    coef0 = _load_coefs(W, B, lanes, ORDER)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        sums = tl.load(SUMSQ + row * ORDER + lanes - 1, mask=valid, other=0.0)
        inv = _inv_rms(sums, lanes, inv_width, eps, ORDER)
        coef = tl.where(lanes == 0, coef0, coef0 * inv)
        _row_poly(X + row * stride_x, Y + row * stride_y, n_cols, coef, lanes, False, ORDER, BLOCK, TAIL)
        tl.store(INV + row * ORDER + lanes - 1, inv, mask=valid)


# ----------------------------------------------------------------------------------------------
# PolyNorm backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def polynorm_bwd_fused_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] grad of the input out
    INV,  # [rows, ORDER] fp32 saved inverse RMS
    PART,  # [programs, ORDER + 1] fp32 out: this program's (d bias, d w_1..d w_ORDER)
    W,
    B,
    n_rows,
    n_cols,
    stride_x,
    stride_g,
    stride_dx,
    inv_width,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows (TP=1): moments of g against x^k (pass 1), then dx (pass 2, from L2)."""
    lanes = tl.arange(0, PAD)
    valid = (lanes >= 1) & (lanes <= ORDER)
    coef0 = _load_coefs(W, B, lanes, ORDER)
    acc = tl.zeros([PAD], tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        x_row = X + row * stride_x
        g_row = G + row * stride_g
        inv = tl.load(INV + row * ORDER + lanes - 1, mask=valid, other=0.0)
        coef = tl.where(lanes == 0, coef0, coef0 * inv)
        mom = _row_moments(x_row, g_row, n_cols, lanes, False, ORDER, BLOCK, TAIL)
        e = _norm_e(coef, inv, mom, lanes, inv_width)
        _row_norm_dx(x_row, g_row, DX + row * stride_dx, n_cols, coef, e, lanes, ORDER, BLOCK, TAIL)
        acc += _param_grads(mom, inv, lanes)
    tl.store(PART + tl.program_id(0) * (ORDER + 1) + lanes, acc, mask=lanes <= ORDER)


@triton.jit
def polynorm_bwd_stats_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    MOM,  # [rows, ORDER + 1] fp32 out: local m_k = sum_j g_j x_j^k
    n_rows,
    n_cols,
    stride_x,
    stride_g,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows: the local moments m_0..m_ORDER (split path, all-reduced after)."""
    lanes = tl.arange(0, PAD)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        mom = _row_moments(X + row * stride_x, G + row * stride_g, n_cols, lanes, False, ORDER, BLOCK, TAIL)
        tl.store(MOM + row * (ORDER + 1) + lanes, mom, mask=lanes <= ORDER)


@triton.jit
def polynorm_bwd_apply_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] out
    INV,  # [rows, ORDER] fp32 saved inverse RMS
    MOM,  # [rows, ORDER + 1] fp32 moments summed over the TP group
    PART,  # [programs, ORDER + 1] fp32 out: this program's (d bias, d w_1..d w_ORDER)
    W,
    B,
    n_rows,
    n_cols,
    stride_x,
    stride_g,
    stride_dx,
    inv_width,  # 1 / (n_cols * tp_size)
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows: dx from the global moments, and the parameter-gradient partials (split
    path; every TP rank sums the same all-reduced moments: identical gradients on every rank)."""
    lanes = tl.arange(0, PAD)
    valid = (lanes >= 1) & (lanes <= ORDER)
    coef0 = _load_coefs(W, B, lanes, ORDER)
    acc = tl.zeros([PAD], tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        inv = tl.load(INV + row * ORDER + lanes - 1, mask=valid, other=0.0)
        mom = tl.load(MOM + row * (ORDER + 1) + lanes, mask=lanes <= ORDER, other=0.0)
        coef = tl.where(lanes == 0, coef0, coef0 * inv)
        e = _norm_e(coef, inv, mom, lanes, inv_width)
        _row_norm_dx(
            X + row * stride_x,
            G + row * stride_g,
            DX + row * stride_dx,
            n_cols,
            coef,
            e,
            lanes,
            ORDER,
            BLOCK,
            TAIL,
        )
        acc += _param_grads(mom, inv, lanes)
    tl.store(PART + tl.program_id(0) * (ORDER + 1) + lanes, acc, mask=lanes <= ORDER)


# ----------------------------------------------------------------------------------------------
# PolyReLU (elementwise; the backward also reduces the moments for d weight / d bias)
# ----------------------------------------------------------------------------------------------


@triton.jit
def polyrelu_fwd_kernel(
    X,  # [rows, n_cols] input
    Y,  # [rows, n_cols] output
    W,
    B,
    n_rows,
    n_cols,
    stride_x,
    stride_y,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows: y = b + sum_k w_k relu(x)^k."""
    lanes = tl.arange(0, PAD)
    coef = _load_coefs(W, B, lanes, ORDER)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        _row_poly(X + row * stride_x, Y + row * stride_y, n_cols, coef, lanes, True, ORDER, BLOCK, TAIL)


@triton.jit
def polyrelu_bwd_kernel(
    X,  # [rows, n_cols] saved input
    G,  # [rows, n_cols] grad of the output
    DX,  # [rows, n_cols] out
    PART,  # [programs, ORDER + 1] fp32 out: this program's sum g * relu(x)^k
    W,
    B,
    n_rows,
    n_cols,
    stride_x,
    stride_g,
    stride_dx,
    ORDER: tl.constexpr,
    PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """Persistent rows, one pass: dx = g * P'(relu(x)) * [x > 0] and the program's moments."""
    lanes = tl.arange(0, PAD)
    coef = _load_coefs(W, B, lanes, ORDER)
    cols = tl.arange(0, BLOCK)
    n_full = n_cols // BLOCK
    acc = tl.zeros([PAD], tl.float32)
    for row in range(tl.program_id(0).to(tl.int64), n_rows, tl.num_programs(0)):
        x_row = X + row * stride_x
        g_row = G + row * stride_g
        dx_row = DX + row * stride_dx
        for c in range(0, n_full):
            acc += _relu_dx_chunk(x_row, g_row, dx_row, c * BLOCK + cols, n_cols, coef, lanes, ORDER, False)
        if TAIL > 0:
            offs = n_full * BLOCK + tl.arange(0, TAIL)
            acc += _relu_dx_chunk(x_row, g_row, dx_row, offs, n_cols, coef, lanes, ORDER, True)
    tl.store(PART + tl.program_id(0) * (ORDER + 1) + lanes, acc, mask=lanes <= ORDER)
