"""
StableMask attention as one fused Triton kernel, forward and backward.

It is FlashAttention-2 (Dao, 2023), laid out as Triton's fused-attention tutorial, with one change:
each query row's online softmax starts from the pseudo-attention mass S_i instead of from nothing,
as if every row had one more key, of logit log S_i and value 0 (README, The method). The backward
is FlashAttention-2's, run with that corrected log-sum-exp: one kernel for dK and dV that adds dQ by
atomics, or (deterministic) a kernel of its own for dQ. Blocks above the diagonal are skipped, and
nothing of size T x T is ever built. On Hopper the forward and the dQ kernel read Q, K, V and dO
through tensor descriptors (TMA). model.stablemask_reference is the function this computes;
test_kernel.py checks the two against each other. kernel_configs.py holds the kernels'
configurations and how the autotuner chooses among them.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which kernel_configs.py
sets when CUDA is absent), which is how the tests run on a CPU. The forward and backward are PyTorch
custom operators (stablemask::attention_forward / _backward), so torch.compile treats them as opaque
calls with known output shapes, fullgraph included.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

# before triton: without a GPU, kernel_configs chooses Triton's interpreter, which triton reads on import
from kernel_configs import (INTERPRET, INTERPRETER_BLOCKS, TensorDescriptor, atomic_dq, autotuned,
                            length_bucket, set_tiles, use_tma)
import triton
import triton.language as tl

# The kernels work in base 2: exp(x) = exp2(x * log2(e)).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 128


@triton.jit
def _log1mexp(x):
    """log(1 - exp(-x)) for x >= 0. A series where 1 - exp(-x) would lose its digits to cancellation."""
    series = x * (1 - x * (0.5 - x * (1 / 6 - x * (1 / 24 - x * (1 / 120 - x / 720)))))
    return tl.log(tl.where(x < 0.1, series, 1 - tl.exp(-x)))


@triton.jit
def _log2_pseudo_mass(gamma, rows, pseudo_len):
    """log2 S_i of query rows `rows` (README, The method); -inf where a row has no pseudo columns.
    S_i = sum_{j=i+1}^{pseudo_len-1} exp(-j*gamma)
        = exp(-(i+1)gamma) (1 - exp(-count*gamma)) / (1 - exp(-gamma))."""
    count = tl.maximum(pseudo_len - 1 - rows, 0).to(tl.float32)
    # rows without pseudo columns are set to -inf below; spare them log(0)
    some = tl.maximum(count, 1.0)
    if gamma > 0:
        log_mass = -(rows + 1).to(tl.float32) * gamma + _log1mexp(some * gamma) - _log1mexp(gamma)
    else:  # gamma = 0: every pseudo score is 0, S_i = count
        log_mass = tl.log(some)
    return tl.where(count > 0, log_mass * LOG2E, float("-inf"))


@triton.jit
def _rows(base, idx, stride, T, HEAD_DIM: tl.constexpr):
    """Rows idx of one head's (T, HEAD_DIM) matrix, zeros past T: a (len(idx), HEAD_DIM) tile.
    Offsets in int64: row x stride passes 2^31 at long T."""
    rows = base + idx[:, None].to(tl.int64) * stride
    return tl.load(rows + tl.arange(0, HEAD_DIM)[None, :], mask=idx[:, None] < T, other=0.0)


@triton.jit
def _rows_t(base, idx, stride, T, HEAD_DIM: tl.constexpr):
    """The same rows, transposed: a (HEAD_DIM, len(idx)) tile."""
    rows = base + idx[None, :].to(tl.int64) * stride
    return tl.load(rows + tl.arange(0, HEAD_DIM)[:, None], mask=idx[None, :] < T, other=0.0)


@triton.jit
def _store_rows(base, idx, stride, T, tile, HEAD_DIM: tl.constexpr):
    rows = base + idx[:, None].to(tl.int64) * stride
    tl.store(rows + tl.arange(0, HEAD_DIM)[None, :], tile.to(base.dtype.element_ty), mask=idx[:, None] < T)


@triton.jit
def _head(X, b, h, stride_b, stride_h, TMA: tl.constexpr):
    """Head h of batch b of X, as _tile reads it. With TMA, X is a tensor descriptor, which takes the
    head as coordinates at each load; else a pointer to the head's first row."""
    if TMA:
        head = X
    else:
        head = X + b * stride_b + h * stride_h
    return head


@triton.jit
def _tile(head, b, h, start, stride, T, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr,
          TRANSPOSED: tl.constexpr):
    """Rows [start, start + BLOCK) of head (b, h), zeros past T: a (BLOCK, HEAD_DIM) tile, or its
    transpose. With TMA Hopper's copy engine moves the tile into shared memory; else pointers do."""
    if TMA:
        tile = head.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(BLOCK, HEAD_DIM)
        if TRANSPOSED:
            tile = tl.trans(tile)
    elif TRANSPOSED:
        tile = _rows_t(head, start + tl.arange(0, BLOCK), stride, T, HEAD_DIM)
    else:
        tile = _rows(head, start + tl.arange(0, BLOCK), stride, T, HEAD_DIM)
    return tile


@triton.jit
def _program(T, BLOCK: tl.constexpr, HEAVY_FIRST: tl.constexpr):
    """(batch x head, first row of this program's block) from a 1-D grid of B*H*cdiv(T, BLOCK)
    programs, heads outermost: a head's blocks run together and share its K, V in cache, and one
    grid axis has no 65,535 limit. With HEAVY_FIRST a head's last blocks start first: they see the
    most keys under the causal mask, so the short ones fill the tail of the launch."""
    blocks = tl.cdiv(T, BLOCK)
    pid = tl.program_id(0)
    block = pid % blocks
    if HEAVY_FIRST:
        block = blocks - 1 - block
    return pid // blocks, block * BLOCK


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_head, v_head, b, hk, stride_kt, stride_vt, rows, lo, hi, T, qk_scale,
               alibi, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
               DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """The online softmax over key blocks [lo, hi); the causal mask only where DIAGONAL. k_head and
    v_head: K/V head hk of batch b (_head)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT = _tile(k_head, b, hk, start_n, stride_kt, T, BLOCK_N, HEAD_DIM, TMA, True)
        v = _tile(v_head, b, hk, start_n, stride_vt, T, BLOCK_N, HEAD_DIM, TMA, False)
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
def _attn_fwd(Q, K, V, Out, Out32, LSE, Gamma, Alibi, Sink, sm_scale, offset, T, H, pseudo_len,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, T_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_PSEUDO: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
              GROUP: tl.constexpr, HAS_SINK: tl.constexpr, TMA: tl.constexpr, KEEP_O32: tl.constexpr):
    """One block of query rows. With TMA, Q, K and V are tensor descriptors (Hopper), else pointers.
    The output goes to Out in the inputs' dtype; with KEEP_O32 also to Out32 in float32, for the
    backward."""
    bh, start_m = _program(T, BLOCK_M, True)
    # int64: b x stride and h x stride pass 2^31 on long inputs
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    hk = h // GROUP  # grouped-query attention: GROUP query heads per K/V head
    q = _tile(_head(Q, b, h, stride_qb, stride_qh, TMA), b, h, start_m, stride_qt, T, BLOCK_M, HEAD_DIM,
              TMA, False)
    k_head, v_head = _head(K, b, hk, stride_kb, stride_kh, TMA), _head(V, b, hk, stride_vb, stride_vh, TMA)
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0

    # >>> StableMask, the one change to FlashAttention-2 (paper Eq. 11; README, The method):
    # the row's softmax starts with the pseudo mass already in it, as a virtual key of logit log S_i
    # and value 0 (running max m = log S_i, running sum l = 1), instead of from (m, l) = (-inf, 0).
    # Where S_i = 0 (the last row, or causal attention) m = -inf and the first key block wipes l.
    if HAS_PSEUDO:
        m_i = _log2_pseudo_mass(tl.load(Gamma + h), rows, pseudo_len) + offset * LOG2E
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    # <<< the end of StableMask's change

    # Not StableMask, another feature: a sink logit per head (gpt-oss's learned sinks, or 0 for
    # softmax off by one) is one more key of value 0, merged into the running max and sum.
    if HAS_SINK:
        sink = tl.load(Sink + h) * LOG2E
        m_new = tl.maximum(m_i, sink)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(sink - m_new)
        m_i = m_new

    # FlashAttention-2 from here: key blocks wholly below the diagonal need no mask; the diagonal
    # block does; above it, nothing
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_head, v_head, b, hk, stride_kt, stride_vt, rows,
                               0, start_m, T, qk_scale, alibi,
                               HEAD_DIM, BLOCK_N, HAS_ALIBI, False, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_head, v_head, b, hk, stride_kt, stride_vt, rows,
                               start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, alibi,
                               HEAD_DIM, BLOCK_N, HAS_ALIBI, True, PRECISION, TMA)
    # the corrected log-sum-exp, base 2
    tl.store(LSE + bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rows < T)
    o = acc / l_i[:, None]
    _store_rows(Out + b * stride_ob + h * stride_oh, rows, stride_ot, T, o, HEAD_DIM)
    if KEEP_O32:
        _store_rows(Out32 + b * stride_ob + h * stride_oh, rows, stride_ot, T, o, HEAD_DIM)


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
def _bwd_dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt, stride_ot,
                    cols, lo, hi, T, qk_scale, sm_scale, alibi,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi). With ATOMIC_DQ also add each
    query block's share of dQ into a float32 buffer: FlashAttention-2's 5 products a tile pair
    (without, the dQ kernel recomputes S and dP: 7)."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        qT = _rows_t(q_head, rows, stride_qt, T, HEAD_DIM)
        do = _rows(do_head, rows, stride_ot, T, HEAD_DIM)
        # rows past T get P = 0
        lse = tl.load(lse_head + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(delta_head + rows, mask=rows < T, other=0.0)
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
            sums = dq_head + rows[:, None].to(tl.int64) * stride_ot + tl.arange(0, HEAD_DIM)[None, :]
            # relaxed: nothing reads the sums before the kernel ends, so no fence need order them
            tl.atomic_add(sums, dq, mask=rows[:, None] < T, sem='relaxed')
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, DQ_ACC, LSE, Delta, Alibi, sm_scale, T, H,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                   stride_dkb, stride_dkh, stride_dkt, T_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr):
    """dK and dV of one key block from one query head: walk its query blocks from the diagonal down,
    and with ATOMIC_DQ add their dQ into DQ_ACC (float32, O's layout) as it goes. With grouped-query
    attention each of the GROUP query heads of a K/V head is a program of its own (the grid stays
    B x H), writing its share; the caller sums the group's shares."""
    # the first key blocks are the heavy ones here: natural order
    bh, start_n = _program(T, BLOCK_N, False)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _rows(K + b * stride_kb + (h // GROUP) * stride_kh, cols, stride_kt, T, HEAD_DIM)
    v = _rows(V + b * stride_vb + (h // GROUP) * stride_vh, cols, stride_vt, T, HEAD_DIM)
    q_head = Q + b * stride_qb + h * stride_qh
    do_head = DO + b * stride_ob + h * stride_oh
    lse_head, delta_head = LSE + bh.to(tl.int64) * T, Delta + bh.to(tl.int64) * T
    dq_head = DQ_ACC + b * stride_ob + h * stride_oh
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                             stride_ot, cols, start_n, tl.minimum(start_n + BLOCK_N, T), T,
                             qk_scale, sm_scale, alibi, HEAD_DIM, BLOCK_M, HAS_ALIBI, True, PRECISION,
                             ATOMIC_DQ)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_head, do_head, lse_head, delta_head, dq_head, stride_qt,
                             stride_ot, cols, start_n + BLOCK_N, T, T,
                             qk_scale, sm_scale, alibi, HEAD_DIM, BLOCK_M, HAS_ALIBI, False, PRECISION,
                             ATOMIC_DQ)
    # this query head's share (with GROUP 1, the gradient itself)
    head = b * stride_dkb + h * stride_dkh
    _store_rows(DK + head, cols, stride_dkt, T, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + head, cols, stride_dkt, T, dv, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_head, v_head, b, hk, stride_kt, stride_vt, rows, lo, hi, T,
                  qk_scale, alibi, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  DIAGONAL: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT = _tile(k_head, b, hk, start_n, stride_kt, T, BLOCK_N, HEAD_DIM, TMA, True)
        vT = _tile(v_head, b, hk, start_n, stride_vt, T, BLOCK_N, HEAD_DIM, TMA, True)
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
    """dQ of one query block: walk the key blocks up to the diagonal. With TMA, Q, K, V and dO are
    tensor descriptors (Hopper), else pointers."""
    bh, start_m = _program(T, BLOCK_M, True)
    # int64: b x stride and h x stride pass 2^31 on long inputs
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    hk = h // GROUP
    q = _tile(_head(Q, b, h, stride_qb, stride_qh, TMA), b, h, start_m, stride_qt, T, BLOCK_M, HEAD_DIM,
              TMA, False)
    do = _tile(_head(DO, b, h, stride_ob, stride_oh, TMA), b, h, start_m, stride_ot, T, BLOCK_M, HEAD_DIM,
               TMA, False)
    k_head, v_head = _head(K, b, hk, stride_kb, stride_kh, TMA), _head(V, b, hk, stride_vb, stride_vh, TMA)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    qk_scale = sm_scale * LOG2E
    alibi = tl.load(Alibi + h) * LOG2E if HAS_ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_head, v_head, b, hk, stride_kt, stride_vt, rows,
                       0, start_m, T, qk_scale, alibi, HEAD_DIM, BLOCK_N, HAS_ALIBI, False, PRECISION, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_head, v_head, b, hk, stride_kt, stride_vt, rows,
                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, alibi,
                       HEAD_DIM, BLOCK_N, HAS_ALIBI, True, PRECISION, TMA)
    _store_rows(DQ + b * stride_ob + h * stride_oh, rows, stride_ot, T, dq * sm_scale, HEAD_DIM)


# -----------------------------------------------------------------------------
# launch: autotuned on a GPU (kernel_configs.py), on fixed small blocks in the interpreter

if INTERPRET:
    _kernels = dict(fwd=_attn_fwd, dkdv=_attn_bwd_dkdv, dq=_attn_bwd_dq, preprocess=_bwd_preprocess)
else:
    _kernels = dict(fwd=autotuned(_attn_fwd, 'fwd'), dkdv=autotuned(_attn_bwd_dkdv, 'dkdv'),
                    dq=autotuned(_attn_bwd_dq, 'dq'), preprocess=_bwd_preprocess)


def _launch(name, grid_blocks, BH, T, *args, **kwargs):
    """Launch kernel `name` on a 1-D grid of B*H*cdiv(T, block) programs; grid_blocks names the block
    size that tiles T. The autotuner picks the blocks on a GPU; the interpreter takes
    INTERPRETER_BLOCKS, and the preprocess kernel its caller's. Every launch passes here."""
    kernel = _kernels[name]
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel[lambda meta: (BH * triton.cdiv(T, meta[grid_blocks]),)](*args, **kwargs)
    else:
        kwargs.update(zip(('BLOCK_M', 'BLOCK_N'), INTERPRETER_BLOCKS.get(name, ())))
        set_tiles({**dict(zip(kernel.arg_names, args)), **kwargs})
        kernel[(BH * triton.cdiv(T, kwargs[grid_blocks]),)](*args, **kwargs)


def make_descriptor(t):
    """A tensor descriptor of a (B, H, T, D) tensor; each config sets its tile shape (set_tiles)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.size(-1)])


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _precision(dtype):
    # float32 inputs: three TF32 products per product (about float32's accuracy at tensor-core speed,
    # and a compile of seconds where "ieee" FMA loops take minutes at head dim 128)
    return "tf32x3" if dtype == torch.float32 else "tf32"


# -----------------------------------------------------------------------------
# the custom operators, and their autograd


@torch.library.custom_op("stablemask::attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: Optional[torch.Tensor],
                       alibi: Optional[torch.Tensor], sink: Optional[torch.Tensor], pseudo_len: int,
                       sm_scale: float, offset: float, atomic: bool,
                       keep_o32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(O, the base-2 log-sum-exp with the virtual mass (B*H, T), O in float32 for the backward).
    O is in the (B, T, H, D) memory layout; its float32 copy is empty without keep_o32 (when no
    gradient will be taken). atomic: how the backward will sum dQ (atomic_dq(), decided here)."""
    B, H, T, D = q.shape
    # O, dO, dQ, dK and dV share one layout: (B, T, H, D) in memory, so that merging the heads is free
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    o32 = _float32_copy(o, keep_o32)
    lse = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
    dummy = lse  # stands in for an absent gamma, alibi or sink; never read
    tma = use_tma(q, k, v)
    inputs = (make_descriptor(t) for t in (q, k, v)) if tma else (q, k, v)
    _launch('fwd', 'BLOCK_M', B * H, T, *inputs, o, o32, lse, dummy if gamma is None else gamma,
            dummy if alibi is None else alibi, dummy if sink is None else sink, sm_scale, offset, T, H,
            pseudo_len, *_strides(q), *_strides(k), *_strides(v), *_strides(o), length_bucket(T),
            HEAD_DIM=D, HAS_PSEUDO=gamma is not None, HAS_ALIBI=alibi is not None,
            PRECISION=_precision(q.dtype), GROUP=H // k.size(1), HAS_SINK=sink is not None, TMA=tma,
            KEEP_O32=keep_o32)
    return o, lse, o32


def _float32_copy(o, keep):
    """Room for O in float32, in O's layout; with keep False an empty stand-in.
    The backward's Delta = rowsum(dO * O) must see O unrounded: on a near one-hot row dP - Delta
    cancels to a tiny difference, which O's rounding to 16 bits would swamp (test_kernel.py,
    test_low_precision_within_3x_of_pytorch)."""
    return torch.empty_like(o, dtype=torch.float32) if keep else o.new_empty(0, dtype=torch.float32)


@_attention_forward.register_fake
def _(q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, offset, atomic, keep_o32):
    B, H, T, D = q.shape
    o = q.new_empty((B, T, H, D)).transpose(1, 2)
    return o, q.new_empty((B * H, T), dtype=torch.float32), _float32_copy(o, keep_o32)


@torch.library.custom_op("stablemask::attention_backward", mutates_args=())
def _attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        o: torch.Tensor, lse: torch.Tensor, alibi: Optional[torch.Tensor],
                        sink: Optional[torch.Tensor], sm_scale: float,
                        atomic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ in O's memory layout; dK, dV in the same layout with K's heads; d(sink logit) per head
    (zeros without one). o: the forward's float32 output. atomic: dQ by atomics from the dK/dV
    kernel, else by its own kernel."""
    B, H, T, D = q.shape
    if do.stride() != o.stride():
        do = torch.empty_like(o, dtype=q.dtype).copy_(do)
    group = H // k.size(1)
    dq = torch.empty_like(o, dtype=q.dtype)
    # with grouped-query attention, each query head's share
    dk, dv = _kv_grads(k) if group == 1 else _kv_grads(q, torch.float32)
    delta = torch.empty_like(lse)
    block = 32 if INTERPRET else 64  # the preprocess kernel's rows per program
    _launch('preprocess', 'BLOCK_M', B * H, T, o, do, delta, T, H, *_strides(o), HEAD_DIM=D, BLOCK_M=block)
    common = dict(HEAD_DIM=D, HAS_ALIBI=alibi is not None, PRECISION=_precision(q.dtype), GROUP=group)
    args = (q, k, v, do)
    tail = (lse, delta, lse if alibi is None else alibi, sm_scale, T, H,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(dk), length_bucket(T))
    # dQ's float32 sums in O's layout (its rows at O's strides); a one-element stand-in without atomics
    dq_acc = torch.zeros_like(o, dtype=torch.float32) if atomic else lse.new_zeros(1)
    _launch('dkdv', 'BLOCK_N', B * H, T, *args, dk, dv, dq_acc, *tail, **common, ATOMIC_DQ=atomic)
    if atomic:
        dq.copy_(dq_acc)
    else:
        # dK/dV reads through pointers (with descriptors its first configuration spills); dQ's kernel
        # by TMA where it can
        tma = use_tma(*args)
        inputs = (make_descriptor(t) for t in args) if tma else args
        _launch('dq', 'BLOCK_M', B * H, T, *inputs, dq, *tail, **common, TMA=tma)
    if group > 1:  # a K/V head's gradient is the sum of its query heads' shares
        shares, (dk, dv) = (dk, dv), _kv_grads(k)
        for grad, share in zip((dk, dv), shares):
            grad.copy_(share.view(B, k.size(1), group, T, D).sum(2))
    dsink = torch.zeros(H, device=q.device, dtype=torch.float32)
    if sink is not None:
        # the sink key's probability in each row is 2^(sink log2(e) - LSE); its gradient -sum P Delta
        p_sink = torch.exp2(sink.view(1, H, 1) * LOG2E.value - lse.view(B, H, T))
        dsink = -(p_sink * delta.view(B, H, T)).sum((0, 2))
    return dq, dk, dv, dsink


def _kv_grads(like, dtype=None):
    """Two tensors of like's shape, in the (B, T, H, D) memory layout."""
    B, H, T, D = like.shape
    dtype = dtype or like.dtype
    return (torch.empty((B, T, H, D), device=like.device, dtype=dtype).transpose(1, 2) for _ in range(2))


@_attention_backward.register_fake
def _(do, q, k, v, o, lse, alibi, sink, sm_scale, atomic):
    return torch.empty_like(o, dtype=q.dtype), *_kv_grads(k), q.new_empty(q.size(1), dtype=torch.float32)


def _save_for_backward(ctx, inputs, output):
    q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, offset, atomic, keep_o32 = inputs
    _, lse, o32 = output
    ctx.save_for_backward(q, k, v, o32, lse, alibi, sink)
    ctx.sm_scale, ctx.atomic = sm_scale, atomic


def _backward(ctx, do, dlse, do32):
    q, k, v, o32, lse, alibi, sink = ctx.saved_tensors
    dq, dk, dv, dsink = _attention_backward(do, q, k, v, o32, lse, alibi, sink, ctx.sm_scale, ctx.atomic)
    dsink = None if sink is None else dsink.to(sink.dtype)
    return dq, dk, dv, None, None, dsink, None, None, None, None, None


torch.library.register_autograd("stablemask::attention_forward", _backward, setup_context=_save_for_backward)


def stablemask_attention(q, k, v, gamma=None, alibi=None, pseudo_len=None, sm_scale=None, offset=0.0,
                         sink=None):
    """StableMask attention, fused: the same function as model.stablemask_reference.
    q: (B, H, T, D); k, v: (B, H_kv, T, D), with H a multiple of H_kv (grouped-query attention: each
    K/V head serves H / H_kv consecutive query heads). One dtype of float32, float16 or bfloat16.
    D <= 128; widths other than 16, 32, 64 and 128 are zero-padded up to the next one.
    gamma: (H,) pseudo-score decays >= 0, one float for every head, or None for plain causal attention.
    alibi: (H,) ALiBi slopes, or None.
    pseudo_len: the length the pseudo mass extends to (default T; the training length under SM-I).
    sm_scale: default 1/sqrt(D). offset: a constant added to every pseudo score.
    sink: (H,) a logit per head of one more key of value 0 in every row (differentiable), or None.
    Returns (B, H, T, D) in the (B, T, H, D) memory layout."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.size(1) % k.size(1) \
            or (q.size(0), q.size(2), q.size(3)) != (k.size(0), k.size(2), k.size(3)):
        raise ValueError(f"q (B, H, T, D) and k, v (B, H_kv, T, D) with H a multiple of H_kv; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of float32, float16, bfloat16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
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
    gamma, alibi, sink = (None if t is None else t.to(device=q.device, dtype=torch.float32).contiguous()
                          for t in (gamma, alibi, sink))
    pseudo_len = T if pseudo_len is None else int(pseudo_len)
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    width = max(16, triton.next_power_of_2(D))  # tl.dot wants power-of-two tiles of at least 16
    if width != D:
        q, k, v = (F.pad(t, (0, width - D)) for t in (q, k, v))  # zero columns change no dot product
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # the float32 copy of O only where a gradient will be taken
    keep_o32 = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink))
    out, _, _ = _attention_forward(q, k, v, gamma, alibi, sink, pseudo_len, sm_scale, float(offset),
                                   atomic_dq(), keep_o32)
    return out[..., :D]
