"""
StableMask attention as one fused Triton kernel, forward and backward.

It is FlashAttention-2 (Dao, 2023; the layout of Triton's fused-attention tutorial) with one change:
each query row's online softmax starts from the pseudo-attention mass S_i instead of from nothing,
as if every row had one more key, of logit log S_i and value 0 (README, The method). The
backward is FlashAttention-2's, run with that corrected log-sum-exp: one kernel for dK and dV that
adds dQ by atomics (atomic_dq(); or, deterministic, a kernel of its own for dQ). Blocks above the
diagonal are skipped and nothing of size T x T is ever built. On Hopper the forward and the dQ kernel
read Q, K, V (and dO) through tensor descriptors (TMA; use_tma()). model.stablemask_reference is the function this
computes; test_kernel.py checks the two against each other.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here when CUDA is
absent), which is how the tests run on a CPU. The forward and backward are registered as PyTorch
custom operators (stablemask::attention_forward / _backward), so torch.compile treats them as
opaque calls with known output shapes, fullgraph included.
"""

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined, so set before that
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # Triton 3.4 on
except ImportError:
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET and type(tl.zeros).__name__ == "JITFunction":
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run "
                      "these kernels: set TRITON_INTERPRET=1 in the environment, or import this module first")
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # the kernels work in base 2: exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 128


@triton.jit
def _log1mexp(x):
    """log(1 - exp(-x)) for x >= 0; a series where 1 - exp(-x) would lose its digits to cancellation."""
    series = x * (1 - x * (0.5 - x * (1 / 6 - x * (1 / 24 - x * (1 / 120 - x / 720)))))
    return tl.log(tl.where(x < 0.1, series, 1 - tl.exp(-x)))


@triton.jit
def _log2_pseudo_mass(gamma, rows, pseudo_len):
    """log2 S_i of query rows `rows` (README, The method), -inf where a row has no pseudo columns:
    S_i = sum_{j=i+1}^{pseudo_len-1} exp(-j*gamma) = exp(-(i+1)gamma) (1 - exp(-count*gamma)) / (1 - exp(-gamma))."""
    count = tl.maximum(pseudo_len - 1 - rows, 0).to(tl.float32)
    some = tl.maximum(count, 1.0)  # rows without pseudo columns are set to -inf below; spare them log(0)
    if gamma > 0:
        log_mass = -(rows + 1).to(tl.float32) * gamma + _log1mexp(some * gamma) - _log1mexp(gamma)
    else:  # gamma = 0: every pseudo score is 0, S_i = count
        log_mass = tl.log(some)
    return tl.where(count > 0, log_mass * LOG2E, float("-inf"))


@triton.jit
def _rows(base, idx, stride, T, HEAD_DIM: tl.constexpr):
    """Rows idx of one head's (T, HEAD_DIM) matrix, zeros past T: a (len(idx), HEAD_DIM) tile.
    Offsets in int64: row x stride passes 2^31 at long T."""
    return tl.load(base + idx[:, None].to(tl.int64) * stride + tl.arange(0, HEAD_DIM)[None, :], mask=idx[:, None] < T, other=0.0)


@triton.jit
def _rows_t(base, idx, stride, T, HEAD_DIM: tl.constexpr):
    """The same rows, transposed: a (HEAD_DIM, len(idx)) tile."""
    return tl.load(base + idx[None, :].to(tl.int64) * stride + tl.arange(0, HEAD_DIM)[:, None], mask=idx[None, :] < T, other=0.0)


@triton.jit
def _store_rows(base, idx, stride, T, tile, HEAD_DIM: tl.constexpr):
    tl.store(base + idx[:, None].to(tl.int64) * stride + tl.arange(0, HEAD_DIM)[None, :], tile.to(base.dtype.element_ty),
             mask=idx[:, None] < T)


@triton.jit
def _program(T, BLOCK: tl.constexpr, HEAVY_FIRST: tl.constexpr):
    """(batch x head, first row of this program's block) from a 1-D grid of B*H*cdiv(T, BLOCK)
    programs, heads outermost (a head's blocks run together and share its K, V in cache; one grid
    axis has no 65,535 limit). With HEAVY_FIRST a head's last blocks, which see the most keys under
    the causal mask, start first, so the short ones fill the tail of the launch."""
    blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    block = pid % blocks
    if HEAVY_FIRST:
        block = blocks - 1 - block
    return pid // blocks, block * BLOCK


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _described(desc, b, h, start, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [start, start + BLOCK) of head (b, h) through a tensor descriptor: Hopper's copy engine
    (TMA) moves the tile into shared memory, zeros past T."""
    return desc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK, HEAD_DIM)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, stride_kt, stride_vt, rows, lo, hi, T, qk_scale, alibi,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, DIAGONAL: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr):
    """The online softmax over key blocks [lo, hi); the causal mask only where DIAGONAL. With TMA
    k_base and v_base are K's and V's descriptors (of head hk of batch b), else pointers to that head."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            kT = tl.trans(_described(k_base, b, hk, start_n, BLOCK_N, HEAD_DIM))
            v = _described(v_base, b, hk, start_n, BLOCK_N, HEAD_DIM)
        else:
            kT = _rows_t(k_base, cols, stride_kt, T, HEAD_DIM)
            v = _rows(v_base, cols, stride_vt, T, HEAD_DIM)
        qk = tl.dot(q, kT, input_precision=PRECISION)
        if HAS_ALIBI or DIAGONAL:  # the scale and the bias in one multiply-add, then the mask
            s = qk * qk_scale + alibi * (cols[None, :] - rows[:, None]) if HAS_ALIBI else qk * qk_scale
            if DIAGONAL:
                s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        else:  # the scale folded into the subtraction: one multiply-add a score (logits in log2 units)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, LSE, Gamma, Alibi, Sink, sm_scale, offset, T, H, pseudo_len,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, T_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_PSEUDO: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
              HAS_SINK: tl.constexpr, TMA: tl.constexpr):
    """One block of query rows. With TMA, Q, K and V are tensor descriptors (Hopper), else pointers."""
    bh, start_m = _program(T, BLOCK_M, True)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: b x stride and h x stride pass 2^31 on long inputs
    rows = start_m + tl.arange(0, BLOCK_M)
    hk = h // GROUP  # grouped-query attention: GROUP query heads per K/V head
    if TMA:
        q = _described(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
        k_base, v_base = K, V
    else:
        q = _rows(Q + b * stride_qb + h * stride_qh, rows, stride_qt, T, HEAD_DIM)
        k_base, v_base = K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0

    # >>> StableMask, the one change to FlashAttention-2 (paper Eq. 11; README, The method):
    # the row's softmax starts with the pseudo mass already in it, as a virtual key of logit log S_i
    # and value 0 (running max m = log S_i, running sum l = 1), instead of from (m, l) = (-inf, 0).
    # Where S_i = 0 (the last row, or causal attention) m = -inf and the first key block wipes l.
    # A sink logit (learned per head, or 0 for softmax off by one) is one more such key, merged in.
    if HAS_PSEUDO:
        m_i = _log2_pseudo_mass(tl.load(Gamma + h), rows, pseudo_len) + offset * LOG2E
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    if HAS_SINK:
        sink = tl.load(Sink + h) * LOG2E
        m_new = tl.maximum(m_i, sink)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(sink - m_new)
        m_i = m_new
    # <<< the rest is FlashAttention-2
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # key blocks wholly below the diagonal need no mask; the diagonal block does; above it, nothing
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, stride_kt, stride_vt, rows, 0, start_m, T,
                               qk_scale, alibi, HEAD_DIM, BLOCK_N, HAS_ALIBI, False, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, b, hk, stride_kt, stride_vt, rows, start_m,
                               tl.minimum(start_m + BLOCK_M, T), T, qk_scale, alibi, HEAD_DIM, BLOCK_N,
                               HAS_ALIBI, True, PRECISION, TMA)
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rows < T)  # the corrected log-sum-exp, base 2
    _store_rows(Out + b * stride_ob + h * stride_oh, rows, stride_ot, T, acc / l_i[:, None], HEAD_DIM)


# -----------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_preprocess(O, DO, Delta, T, H, stride_ob, stride_oh, stride_ot,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta_i = rowsum(dO_i * O_i), with O StableMask's output."""
    bh, start_m = _program(T, BLOCK_M, False)
    rows = start_m + tl.arange(0, BLOCK_M)
    head = (bh // H).to(tl.int64) * stride_ob + (bh % H).to(tl.int64) * stride_oh
    o = _rows(O + head, rows, stride_ot, T, HEAD_DIM).to(tl.float32)
    do = _rows(DO + head, rows, stride_ot, T, HEAD_DIM).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_ot, cols, lo, hi, T,
                    qk_scale, sm_scale, alibi, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi); with ATOMIC_DQ also add each
    query block's share of dQ into a float32 buffer (FlashAttention-2's 5 products a tile pair;
    without, the dQ kernel recomputes S and dP: 7)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        qT = _rows_t(q_base, rows, stride_qt, T, HEAD_DIM)
        do = _rows(do_base, rows, stride_ot, T, HEAD_DIM)
        lse = tl.load(lse_base + rows, mask=rows < T, other=float("inf"))  # rows past T get P = 0
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            sT += alibi * (cols[:, None] - rows[None, :])
        if DIAGONAL:
            sT = tl.where(cols[:, None] <= rows[None, :], sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])  # P with StableMask's log-sum-exp
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        if ATOMIC_DQ:  # this key block's part of dQ = dS K, added by every key block of the head in turn
            dq = tl.dot(tl.trans(dsT).to(k.dtype), k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_base + rows[:, None].to(tl.int64) * stride_ot + tl.arange(0, HEAD_DIM)[None, :], dq,
                          mask=rows[:, None] < T)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, DQ_ACC, LSE, Delta, Alibi, sm_scale, T, H,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                   stride_dkb, stride_dkh, stride_dkt, T_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK and dV of one key block from one query head: walk its query blocks from the diagonal down,
    and with ATOMIC_DQ add their dQ into DQ_ACC (float32, O's layout) as it goes. With grouped-query
    attention each of the GROUP query heads of a K/V head is a program of its own (the grid stays
    B x H), writing its share; the caller sums the group's shares."""
    bh, start_n = _program(T, BLOCK_N, False)  # the first key blocks are the heavy ones here: natural order
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _rows(K + b * stride_kb + (h // GROUP) * stride_kh, cols, stride_kt, T, HEAD_DIM)
    v = _rows(V + b * stride_vb + (h // GROUP) * stride_vh, cols, stride_vt, T, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_ob + h * stride_oh
    lse_base, delta_base = LSE + bh.to(tl.int64) * T, Delta + bh.to(tl.int64) * T
    dq_base = DQ_ACC + b * stride_ob + h * stride_oh
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_ot,
                             cols, start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale, sm_scale, alibi,
                             HEAD_DIM, BLOCK_M, HAS_ALIBI, True, PRECISION, ATOMIC_DQ)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_ot,
                             cols, start_n + BLOCK_N, T, T, qk_scale, sm_scale, alibi,
                             HEAD_DIM, BLOCK_M, HAS_ALIBI, False, PRECISION, ATOMIC_DQ)
    head = b * stride_dkb + h * stride_dkh  # this query head's share (with GROUP 1, the gradient itself)
    _store_rows(DK + head, cols, stride_dkt, T, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + head, cols, stride_dkt, T, dv, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, stride_kt, stride_vt, rows, lo, hi, T, qk_scale, alibi,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if TMA:  # k_base and v_base are K's and V's descriptors
            kT = tl.trans(_described(k_base, b, hk, start_n, BLOCK_N, HEAD_DIM))
            vT = tl.trans(_described(v_base, b, hk, start_n, BLOCK_N, HEAD_DIM))
        else:
            kT = _rows_t(k_base, cols, stride_kt, T, HEAD_DIM)
            vT = _rows_t(v_base, cols, stride_vt, T, HEAD_DIM)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        if HAS_ALIBI:
            s += alibi * (cols[None, :] - rows[:, None])
        if DIAGONAL:
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < T), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, Alibi, sm_scale, T, H,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                 stride_dkb, stride_dkh, stride_dkt, T_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr):
    """dQ of one query block: walk the key blocks up to the diagonal."""
    bh, start_m = _program(T, BLOCK_M, True)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: b x stride and h x stride pass 2^31 on long inputs
    rows = start_m + tl.arange(0, BLOCK_M)
    hk = h // GROUP
    if TMA:  # Q, K, V and dO are tensor descriptors (Hopper), else pointers
        q, do = _described(Q, b, h, start_m, BLOCK_M, HEAD_DIM), _described(DO, b, h, start_m, BLOCK_M, HEAD_DIM)
        k_base, v_base = K, V
    else:
        q = _rows(Q + b * stride_qb + h * stride_qh, rows, stride_qt, T, HEAD_DIM)
        do = _rows(DO + b * stride_ob + h * stride_oh, rows, stride_ot, T, HEAD_DIM)
        k_base, v_base = K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, stride_kt, stride_vt, rows, 0, start_m, T,
                       qk_scale, alibi, HEAD_DIM, BLOCK_N, HAS_ALIBI, False, PRECISION, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, b, hk, stride_kt, stride_vt, rows, start_m,
                       tl.minimum(start_m + BLOCK_M, T), T, qk_scale, alibi, HEAD_DIM, BLOCK_N,
                       HAS_ALIBI, True, PRECISION, TMA)
    _store_rows(DQ + b * stride_ob + h * stride_oh, rows, stride_ot, T, dq * sm_scale, HEAD_DIM)


# -----------------------------------------------------------------------------
# launch: fixed small blocks in the interpreter (several blocks even at small T, so the tests reach
# every code path); autotuned on a GPU, once per (length bucket, head dim, dtype, ...).

# (BLOCK_M, BLOCK_N, warps, stages) per kernel, 16-bit or float32 inputs, and head dim (64: any up to
# 64), in order of preference (STABLEMASK_AUTOTUNE=first takes the first). Each compiles for sm_90
# under Triton 3.6 and 3.9 with no register spills, grouped-query attention included, and fits
# Hopper's shared memory (test_kernel.py compiles every one ahead of time to prove it; at head dim
# 128, 4-warp tiles of 128 rows spill, and so do dK/dV tiles of 64 rows). The forward and dQ walk
# keys in BLOCK_N steps and need BLOCK_M a multiple of BLOCK_N; dK/dV walk queries and need the
# reverse. float32 is a test path: tf32x3 holds every operand twice, so only small tiles fit in
# registers (16 x 16 at head dim 128, on Ampere-style MMA).
CONFIGS = {
    ('fwd', 16, 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
    ('fwd', 16, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
    ('fwd', 32, 128): [(16, 16, 4, 2)],
    ('fwd', 32, 64): [(64, 32, 4, 2), (32, 32, 4, 2)],
    ('dkdv', 16, 128): [(32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 8, 4)],
    ('dkdv', 16, 64): [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3)],
    ('dkdv', 32, 128): [(16, 16, 8, 2)],
    ('dkdv', 32, 64): [(16, 32, 4, 2)],
    ('dq', 16, 128): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ('dq', 16, 64): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    ('dq', 32, 128): [(16, 16, 4, 2)],
    ('dq', 32, 64): [(64, 16, 4, 2), (32, 16, 4, 2)],
}
_INTERPRETER_BLOCKS = dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16))
# the block each kernel streams through shared memory, the one it keeps, and how many tiles it keeps
TILES = dict(fwd=('BLOCK_N', 'BLOCK_M', 1), dkdv=('BLOCK_M', 'BLOCK_N', 2), dq=('BLOCK_N', 'BLOCK_M', 2))
SHARED_MEMORY = 227 * 1024  # per block on an H100 / H200; the GPU at hand says its own
AUTOTUNE = os.environ.get("STABLEMASK_AUTOTUNE", "full")  # 'full': time every config; 'first': the first that fits, untimed
LAUNCH_LOG = os.environ.get("STABLEMASK_LAUNCH_LOG")  # a file that every launch appends its specialisation to (gpu_check.py)
DRY_RUN = LAUNCH_LOG is not None and os.environ.get("STABLEMASK_DRY_RUN") == "1"  # then nothing runs: launches are only logged
DQ = os.environ.get("STABLEMASK_DQ", "auto")  # 'atomic', 'separate', or 'auto': atomic_dq() says
TMA = os.environ.get("STABLEMASK_TMA", "auto")  # 'on', 'off', or 'auto': use_tma() says


def atomic_dq():
    """Whether the backward adds dQ by atomics from the dK/dV kernel (FlashAttention-2: 5 matrix
    products a tile pair) or computes it in a kernel of its own that recomputes S and dP (7 products,
    no atomics: the same bits every run). STABLEMASK_DQ=atomic or separate; by default atomic, unless
    torch.use_deterministic_algorithms(True) asks for the same bits every run."""
    if DQ == 'auto':
        return not torch.are_deterministic_algorithms_enabled()
    return DQ == 'atomic'


def use_tma(*tensors):
    """Whether the kernels read their inputs through tensor descriptors (Hopper's TMA copy engine)
    rather than pointers: by default on sm_90 and newer for 16-bit inputs (float32 is a test path);
    STABLEMASK_TMA=on forces it where the layout allows (the interpreter too), off never. TMA needs
    16-byte aligned rows and strides; other layouts take pointers."""
    if TMA == 'off' or TensorDescriptor is None:
        return False
    if TMA == 'auto' and (INTERPRET or not tensors[0].is_cuda or tensors[0].dtype == torch.float32
                          or torch.cuda.get_device_capability(tensors[0].device)[0] < 9):
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(x * t.element_size() % 16 == 0 for x in t.stride()[:-1])
               for t in tensors)


def _describe(t):
    """A tensor descriptor of a (B, H, T, D) tensor; its tile shape is set per config (_set_tiles)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.size(-1)])


def _set_tiles(nargs):
    """A config's tiles into its kernel's descriptors: Q's and dO's rows in BLOCK_M, K's and V's in BLOCK_N."""
    for name, block in (('Q', 'BLOCK_M'), ('DO', 'BLOCK_M'), ('K', 'BLOCK_N'), ('V', 'BLOCK_N')):
        if TensorDescriptor is not None and isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [1, 1, nargs[block], nargs['HEAD_DIM']]


def _tensor(x):
    return x.base if TensorDescriptor is not None and isinstance(x, TensorDescriptor) else x


def length_bucket(T):
    """The autotuner's key for a sequence length: the next power of two (at least 64). Tuning once
    per bucket, not per length, spares generation and varied-length training a re-tune at every T."""
    return max(64, triton.next_power_of_2(T))


def configs_for(name, dtype, head_dim):
    """The triton.Configs kernel `name` may run with, for inputs of `dtype` and a (padded) head dim."""
    return _configs(CONFIGS[name, 32 if dtype == torch.float32 else 16, 128 if head_dim > 64 else 64], name)


def _configs(choices, name):
    # the descriptors (TMA) take each config's tiles
    return [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=s, pre_hook=_set_tiles) for m, n, w, s in choices]


def shared_memory(config, streamed, kept, kept_tiles, head_dim, itemsize, dq_sums=False):
    """Bytes of shared memory a config's kernel uses, as the compiler lays it out for sm_90's MMA
    (test_kernel.py checks this against it): num_stages buffers of the streamed block's two tiles
    (K and V, or Q and dO), and the kept block's kept_tiles tiles, which float32's tf32x3 holds twice
    (high and low halves). dK/dV adding dQ's sums holds K once more, as that product's other operand,
    and dS transposed (at most 9 KiB as the compiler lays it out). For float32's small tiles, on
    Ampere-style MMA, an upper bound."""
    copies = kept_tiles * (2 if itemsize == 4 else 1)
    size = (config.num_stages * 2 * config.kwargs[streamed] + copies * config.kwargs[kept]) * head_dim * itemsize
    return size + (config.kwargs[kept] * head_dim * itemsize + 9 * 1024 if dq_sums else 0)


def _shared_memory_limit(device):
    """Shared memory per block on `device`: a CUDA device without an index is the current GPU; the
    interpreter and other devices take an H100's."""
    if INTERPRET or device.type != 'cuda':
        return SHARED_MEMORY
    index = torch.cuda.current_device() if device.index is None else device.index
    return triton.runtime.driver.active.utils.get_device_properties(index)['max_shared_mem']


def candidates(name, q, head_dim, dq_sums=False):
    """The configs the autotuner times for these inputs, before anything compiles: configs_for's that
    fit in the GPU's shared memory (on a smaller GPU than Hopper, at least the smallest), or under
    STABLEMASK_AUTOTUNE=first only the first of them."""
    size = lambda c: shared_memory(c, *TILES[name], head_dim, q.element_size(), dq_sums)
    configs = configs_for(name, q.dtype, head_dim)
    limit = _shared_memory_limit(q.device)
    fitting = [c for c in configs if size(c) <= limit] or [min(configs, key=size)]
    return fitting[:1] if AUTOTUNE == 'first' else fitting


# what each autotuner keys on (besides the tensors' dtypes), and what a timed run writes into that the
# next must find zeroed: the dK/dV kernel adds dQ's sums
TUNE_KEYS = dict(fwd=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'HAS_PSEUDO', 'HAS_SINK', 'TMA'),
                 dkdv=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'ATOMIC_DQ'),
                 dq=('T_BUCKET', 'HEAD_DIM', 'HAS_ALIBI', 'GROUP', 'TMA'))
RESET_TO_ZERO = dict(dkdv=['DQ_ACC'])


def _autotuned(kernel, name, do_bench=None):
    prune = lambda configs, named_args, **kwargs: candidates(name, _tensor(named_args['Q']), kwargs['HEAD_DIM'],
                                                             kwargs.get('ATOMIC_DQ', False))  # it picks from all
    every = _configs(sorted({c for k, choices in CONFIGS.items() if k[0] == name for c in choices}), name)
    return triton.autotune(every, key=list(TUNE_KEYS[name]), reset_to_zero=RESET_TO_ZERO.get(name), do_bench=do_bench,
                           prune_configs_by={'early_config_prune': prune})(kernel)


if INTERPRET:
    _kernels = dict(fwd=_attn_fwd, dkdv=_attn_bwd_dkdv, dq=_attn_bwd_dq)
else:
    _kernels = dict(fwd=_autotuned(_attn_fwd, 'fwd'), dkdv=_autotuned(_attn_bwd_dkdv, 'dkdv'), dq=_autotuned(_attn_bwd_dq, 'dq'))


def _launch(name, grid_blocks, BH, T, *args, **kwargs):
    """Launch kernel `name` on a 1-D grid of B*H*cdiv(T, block) programs; grid_blocks names the
    block size that tiles T."""
    kernel = _kernels[name]
    if LAUNCH_LOG:
        log_launch(name, _attn_fwd if name == 'fwd' else _attn_bwd_dkdv if name == 'dkdv' else _attn_bwd_dq, args, kwargs,
                   [_config_tuple(c) for c in candidates(name, _tensor(args[0]), kwargs['HEAD_DIM'], kwargs.get('ATOMIC_DQ', False))])
        if DRY_RUN:
            return
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[lambda meta: (BH * triton.cdiv(T, meta[grid_blocks]),)](*args, **kwargs)
    else:
        m, n = _INTERPRETER_BLOCKS[name]
        _set_tiles({**dict(zip(kernel.arg_names, args)), **kwargs, 'BLOCK_M': m, 'BLOCK_N': n})
        kernel[(BH * triton.cdiv(T, m if grid_blocks == 'BLOCK_M' else n),)](*args, BLOCK_M=m, BLOCK_N=n, **kwargs)


def _config_tuple(config):
    return config.kwargs['BLOCK_M'], config.kwargs['BLOCK_N'], config.num_warps, config.num_stages


def log_launch(name, fn, args, constexprs, configs):
    """One line of STABLEMASK_LAUNCH_LOG: the kernel, what Triton compiles it for (the constexprs, each
    tensor's dtype and 16-byte alignment, each integer's being 1 or a multiple of 16), the values the
    autotuner keys on, and the configs it would time there."""
    spec = []
    for value in args:
        if isinstance(value, torch.Tensor):
            spec.append(f"{value.dtype}:{value.data_ptr() % 16 == 0}")
        elif _tensor(value) is not value:  # a tensor descriptor: specialised on its dtype (and its config's tiles)
            spec.append(f"desc:{value.base.dtype}")
        elif isinstance(value, int):
            spec.append(f"i:{value == 1}:{value % 16 == 0}")
        else:
            spec.append(type(value).__name__)
    constants = sorted(f"{k}={v}" for k, v in constexprs.items())
    dtypes = [str(value.dtype) for value in args if isinstance(value, torch.Tensor)]  # Triton's autotuner keys on them too
    bucket = dict(zip(fn.arg_names, args)).get('T_BUCKET')
    with open(LAUNCH_LOG, 'a') as f:
        f.write(json.dumps(dict(kernel=name, spec=spec + constants, tune=[bucket, *constants, *dtypes], configs=configs)) + '\n')


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _precision(dtype):
    # float32 inputs: three TF32 products per product (about float32's accuracy at tensor-core speed,
    # and a compile of seconds where "ieee" FMA loops take minutes at head dim 128)
    return "tf32x3" if dtype == torch.float32 else "tf32"


@torch.library.custom_op("stablemask::attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: Optional[torch.Tensor],
                       alibi: Optional[torch.Tensor], sink: Optional[torch.Tensor], pseudo_len: int, sm_scale: float,
                       offset: float, atomic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O in the (B, T, H, D) memory layout, the base-2 log-sum-exp with the virtual mass, (B*H, T)).
    atomic: how its backward will sum dQ (atomic_dq(), decided when the forward runs)."""
    B, H, T, D = q.shape
    # O, dO, dQ, dK and dV share one layout: (B, T, H, D) in memory, so that merging the heads is free
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
    dummy = lse  # stands in for an absent gamma or alibi; never read
    tma = use_tma(q, k, v)
    _launch('fwd', 'BLOCK_M', B * H, T, *((_describe(t) for t in (q, k, v)) if tma else (q, k, v)), o, lse,
            dummy if gamma is None else gamma, dummy if alibi is None else alibi, dummy if sink is None else sink,
            sm_scale, offset, T, H, pseudo_len, *_strides(q), *_strides(k), *_strides(v), *_strides(o), length_bucket(T),
            HEAD_DIM=D, HAS_PSEUDO=gamma is not None, HAS_ALIBI=alibi is not None, PRECISION=_precision(q.dtype),
            GROUP=H // k.size(1), HAS_SINK=sink is not None, TMA=tma)
    return o, lse


@_attention_forward.register_fake
def _(q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, offset, atomic):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B * H, T), dtype=torch.float32)


@torch.library.custom_op("stablemask::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        alibi: Optional[torch.Tensor], sink: Optional[torch.Tensor], sm_scale: float,
                        atomic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ in O's memory layout; dK, dV in the same layout with K's heads; d(sink logit) per head
    (zeros without one). atomic: dQ by atomics from the dK/dV kernel, else by its own kernel."""
    B, H, T, D = q.shape
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)
    group = H // k.size(1)
    dq, (dk, dv) = torch.empty_like(o), _kv_grads(k) if group == 1 else _kv_grads(q, torch.float32)  # or each query head's share
    delta = torch.empty_like(lse)
    block = 64 if not INTERPRET else 32
    if LAUNCH_LOG:
        log_launch('preprocess', _bwd_preprocess, (o, do, delta, T, H, *_strides(o)), dict(HEAD_DIM=D, BLOCK_M=block), [[block]])
    if not DRY_RUN:
        _bwd_preprocess[(B * H * triton.cdiv(T, block),)](o, do, delta, T, H, *_strides(o), HEAD_DIM=D, BLOCK_M=block)
    common = dict(HEAD_DIM=D, HAS_ALIBI=alibi is not None, PRECISION=_precision(q.dtype), GROUP=H // k.size(1))
    args = (q, k, v, do)
    tail = (lse, delta, lse if alibi is None else alibi, sm_scale, T, H,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(dk), length_bucket(T))
    # dQ's float32 sums in O's layout (its rows at O's strides); a one-element stand-in without atomics
    dq_acc = torch.zeros_like(o, dtype=torch.float32) if atomic else lse.new_zeros(1)
    _launch('dkdv', 'BLOCK_N', B * H, T, *args, dk, dv, dq_acc, *tail, **common, ATOMIC_DQ=atomic)
    if atomic:
        dq.copy_(dq_acc)
    else:  # dK/dV reads through pointers (with descriptors its first configuration spills); dQ's kernel by TMA where it can
        tma = use_tma(*args)
        _launch('dq', 'BLOCK_M', B * H, T, *((_describe(t) for t in args) if tma else args), dq, *tail, **common, TMA=tma)
    if group > 1:  # a K/V head's gradient is the sum of its query heads' shares
        shares, (dk, dv) = (dk, dv), _kv_grads(k)
        for grad, share in zip((dk, dv), shares):
            grad.copy_(share.view(B, k.size(1), group, T, D).sum(2))
    dsink = torch.zeros(H, device=q.device, dtype=torch.float32)
    if sink is not None:  # the sink key's probability in each row is 2^(sink log2(e) - LSE); its gradient -sum P Delta
        p_sink = torch.exp2(sink.view(1, H, 1) * LOG2E.value - lse.view(B, H, T))
        dsink = -(p_sink * delta.view(B, H, T)).sum((0, 2))
    return dq, dk, dv, dsink


def _kv_grads(like, dtype=None):
    """Two tensors of like's shape, in the (B, T, H, D) memory layout."""
    B, H, T, D = like.shape
    return (torch.empty((B, T, H, D), device=like.device, dtype=dtype or like.dtype).transpose(1, 2) for _ in range(2))


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, alibi, sink, sm_scale, atomic):
    return torch.empty_like(o), *_kv_grads(k), q.new_empty(q.size(1), dtype=torch.float32)


def _save_for_backward(ctx, inputs, output):
    q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, offset, atomic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, alibi, sink)
    ctx.sm_scale, ctx.atomic = sm_scale, atomic


def _backward(ctx, do, dlse):
    q, k, v, o, lse, alibi, sink = ctx.saved_tensors
    dq, dk, dv, dsink = _attention_backward(do, q, k, v, o, lse, alibi, sink, ctx.sm_scale, ctx.atomic)
    return dq, dk, dv, None, None, None if sink is None else dsink.to(sink.dtype), None, None, None, None


torch.library.register_autograd("stablemask::attention_forward", _backward, setup_context=_save_for_backward)


def stablemask_attention(q, k, v, gamma=None, alibi=None, pseudo_len=None, sm_scale=None, offset=0.0, sink=None):
    """StableMask attention, fused: the same function as model.stablemask_reference.
    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H a multiple of H_kv (grouped-query attention; each
    K/V head serves H / H_kv consecutive query heads); one dtype of float32 / float16 / bfloat16,
    D <= 128 (other widths than 16, 32, 64, 128 are zero-padded up to the next one). gamma: (H,) pseudo-score decays >= 0, one
    float for every head, or None for plain causal attention. alibi: (H,) ALiBi slopes or None.
    pseudo_len: the length the pseudo mass extends to (default T; the training length under SM-I).
    sm_scale: default 1/sqrt(D). offset: a constant added to every pseudo score. sink: (H,) a
    logit per head of one more key of value 0 in every row (differentiable), or None.
    Returns (B, H, T, D) in the (B, T, H, D) memory layout."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or (q.size(0), q.size(2), q.size(3)) != (k.size(0), k.size(2), k.size(3)) \
            or q.size(1) % k.size(1):
        raise ValueError(f"q (B, H, T, D) and k, v (B, H_kv, T, D) with H a multiple of H_kv; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of float32, float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is above the kernel's {MAX_HEAD_DIM}")
    if not q.is_cuda and not INTERPRET:
        raise ValueError("tensors are on the CPU: run with TRITON_INTERPRET=1 set before triton is imported")
    if isinstance(gamma, (int, float)):
        gamma = torch.full((H,), float(gamma), device=q.device)
    for name, t in (('gamma', gamma), ('alibi', alibi), ('sink', sink)):
        if t is not None and t.shape != (H,):
            raise ValueError(f"{name} must have shape ({H},), one value per head; got {tuple(t.shape)}")
    gamma = None if gamma is None else gamma.to(device=q.device, dtype=torch.float32).contiguous()
    alibi = None if alibi is None else alibi.to(device=q.device, dtype=torch.float32).contiguous()
    sink = None if sink is None else sink.to(device=q.device, dtype=torch.float32).contiguous()
    pseudo_len = T if pseudo_len is None else int(pseudo_len)
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    width = max(16, triton.next_power_of_2(D))  # tl.dot wants power-of-two tiles of at least 16
    if width != D:
        q, k, v = (F.pad(t, (0, width - D)) for t in (q, k, v))  # zero columns change no dot product
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _ = _attention_forward(q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, float(offset), atomic_dq())
    return out[..., :D]
