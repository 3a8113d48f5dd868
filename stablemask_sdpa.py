"""
StableMask through PyTorch's own fused attention kernels: the fast path on CPUs, and on GPUs the
one for what the Triton kernel does not take (decode steps, sliding windows, wide heads).

StableMask is causal attention plus one virtual key per row, of logit log S_i (the closed-form
pseudo mass) and value 0 (README, The method). So PyTorch's fused causal attention computes it
exactly: its output O and log-sum-exp lse, corrected by the virtual key,
    L_i = logaddexp(lse_i, log S_i),   O_i = O_causal_i * sigmoid(lse_i - log S_i),
then its fused backward, handed this O and L in place of its own, gives StableMask's gradients. This
holds for each kernel that returns its log-sum-exp and takes it back in the backward: the CPU's flash
kernel, and CUDA's flash, memory-efficient and cuDNN kernels (fused_kernel says which runs). A sink
logit is folded into the same virtual key. Nothing of size T x T is built but a bias, where ALiBi or a
window needs one. model.stablemask_sdpa is the entry point; model.stablemask_reference the function.
"""

import math

import torch
from torch.nn import functional as F


def log_pseudo_mass(gamma, rows, pseudo_len):
    """log S_i, the log of the pseudo-attention mass sum_{j=i+1}^{pseudo_len-1} exp(-j*gamma) of each
    query row i, in closed form (README, The method). gamma (H,) >= 0, rows (Tq,) integer, or (B, Tq)
    when each row of a batch has positions of its own (a left-padded batch). Returns (H, Tq), or
    (B, H, Tq), float32 (float64 if gamma is); -inf where a row has no pseudo columns."""
    g = gamma.to(torch.promote_types(gamma.dtype, torch.float32))[:, None]
    i = rows.to(g.dtype).unsqueeze(-2)
    count = (pseudo_len - 1 - i).clamp(min=0)  # pseudo columns j with i < j < pseudo_len
    decaying = -(i + 1) * g + torch.log(-torch.expm1(-count * g)) - torch.log(-torch.expm1(-g))
    return torch.where(g > 0, decaying, torch.log(count))  # g = 0: every pseudo score is 0


def repeat_kv(x, n_head):
    """(B, H_kv, T, D) keys or values with each head repeated for the n_head // H_kv query heads it
    serves."""
    return x if x.size(1) == n_head else x.repeat_interleave(n_head // x.size(1), dim=1)


def attention_bias(alibi, window, Tq, T, dtype, device, pad=None):
    """Additive bias for fused attention ops, (1, H or 1, Tq, T): the causal mask, the keys a sliding
    window has dropped (or no window: None), and ALiBi's bias (or none: alibi None). The queries are
    the last Tq of T positions. pad (B,): how many of each row's first keys are left padding, which
    no row after them sees; the bias is then (B, H or 1, Tq, T). (ALiBi's distances are those of the
    positions: padding shifts a row's queries and keys alike.) The rows are padded to a multiple of 16
    elements because the CUDA memory-efficient kernel needs aligned bias rows."""
    i = torch.arange(T - Tq, T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    bias = torch.zeros(1, 1, Tq, T, device=device) if alibi is None else \
        -alibi.view(1, -1, 1, 1).float() * (i - j)
    hidden = (j > i) if window is None else (j > i) | (j <= i - window)
    if pad is not None:
        # padding rows see earlier padding: a row of -inf alone would make NaNs
        pad = pad.view(-1, 1, 1, 1)
        hidden = hidden | ((j < pad) & (i >= pad))
    return aligned(torch.where(hidden, -math.inf, bias).to(dtype))


def ring_bias(alibi, position, size, pad=None):
    """attention_bias for one query at `position` (a 0-d tensor) over a ring of `size` slots that
    holds position p in slot p % size (kv_cache.FixedKVCache), (1, H or 1, 1, size), float32: each
    slot holds the position `distance` back, where distance = (position - slot) mod size, and -inf
    hides the slots whose position would be before 0 (not written yet). pad (B,): each row's count of
    left padding, hidden too; the bias is then (B, H or 1, 1, size)."""
    distance = (position - torch.arange(size, device=position.device)) % size
    bias = (torch.zeros(1, 1, 1, size, device=position.device) if alibi is None
            else -alibi.view(1, -1, 1, 1).float() * distance)
    oldest = position if pad is None else position - pad.view(-1, 1, 1, 1)
    return aligned(torch.where(distance > oldest, -math.inf, bias))


def aligned(bias):
    """bias (1, H, Tq, T) in storage whose rows are padded to a multiple of 16 elements, as the
    CUDA memory-efficient kernel needs."""
    T = bias.size(-1)
    padded = bias.new_empty(*bias.shape[:-1], -(-T // 16) * 16)
    padded[..., :T] = bias
    return padded[..., :T]


def fused_kernel(device_type, dtype, head_dim, has_bias, capability=None):
    """Which of PyTorch's fused attention kernels computes the causal part, and the head dim it
    needs: the CPU's flash kernel takes any; on CUDA, cuDNN's (sm90 and newer, fp16/bf16, no bias,
    head dims up to 128), else the flash kernel (fp16/bf16, no bias, up to 256, sm80 and newer), else
    the memory-efficient one (the rest). CUDA's want multiples of 8, so other head dims are
    zero-padded up to one (zero columns change no dot product; the scale stays 1/sqrt(D))."""
    if device_type == 'cpu':
        return 'cpu', head_dim
    width = -(-head_dim // 8) * 8
    half = not has_bias and dtype in (torch.float16, torch.bfloat16)
    if half and width <= 128 and capability >= (9, 0):
        return 'cudnn', width
    return 'flash' if half and width <= 256 and capability >= (8, 0) else 'efficient', width


def _fused_forward(kind, q, k, v, bias, causal, scale):
    """PyTorch's fused attention, returning the output, its log-sum-exp (natural log, float32,
    (B, H, Tq); padded past Tq on some kernels) and what the matching backward needs."""
    aten = torch.ops.aten
    if kind == 'cpu':
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse, ()
    # cuDNN's log-sum-exp may have a trailing dimension of 1, which its backward wants back
    if kind == 'cudnn':
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse.view(lse.shape[:3]), (cu_q, cu_k, max_q, max_k, seed, offset, lse.dim())
    if kind == 'flash':
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse, (cu_q, cu_k, max_q, max_k, seed, offset)
    bias_b = None if bias is None else bias.expand(q.size(0), q.size(1), -1, -1)
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, bias_b, True, 0.0, causal, scale=scale)
    return out, lse, (bias_b, seed, offset)


def _fused_backward(kind, do, q, k, v, out, lse, bias, causal, scale, saved):
    aten = torch.ops.aten
    if kind == 'cpu':
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    if kind == 'cudnn':
        cu_q, cu_k, max_q, max_k, seed, offset, dims = saved
        return aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, out, lse.unsqueeze(-1) if dims == 4 else lse, seed, offset, None, cu_q, cu_k,
            max_q, max_k, 0.0, causal, scale=scale)
    if kind == 'flash':
        cu_q, cu_k, max_q, max_k, seed, offset = saved
        return aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
    bias_b, seed, offset = saved
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, bias_b, out, lse, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, dk, dv


def stablemask_fused(q, k, v, log_mass, bias, for_backward=False):
    """StableMask through PyTorch's fused causal attention, corrected by the virtual key: the
    output at the kernel's head dim, and with for_backward what the fused backward needs: (q, k, v
    padded to that width, the log-sum-exp with the virtual mass, causal, the kernel, its values)."""
    causal = bias is None and q.size(-2) > 1  # a bias already holds the causal mask
    D = q.size(-1)
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    kind, width = fused_kernel(q.device.type, q.dtype, D, bias is not None, capability)
    if width != D:
        q, k, v = (F.pad(t, (0, width - D)) for t in (q, k, v))
    out, lse, saved = _fused_forward(kind, q, k, v, bias, causal, 1 / math.sqrt(D))
    Tq = q.size(-2)
    rows = lse if lse.size(-1) == Tq else lse[..., :Tq]  # some kernels pad it
    if not for_backward:  # generation: in place, a decode step's few operations counted
        # rows: the kernel's own, not needed again
        share = torch.sigmoid_(rows.sub_(log_mass)).unsqueeze(-1)
        return out.mul_(share if out.dtype == share.dtype else share.to(out.dtype)), None
    share = torch.sigmoid(rows - log_mass).unsqueeze(-1)  # of each row's mass, the real keys' share
    out = out * share.to(out.dtype)
    lse_sm = lse.clone()
    lse_sm[..., :Tq] = torch.logaddexp(lse[..., :Tq], log_mass)
    return out, (q, k, v, lse_sm, causal, kind, saved)


class StableMaskSDPA(torch.autograd.Function):
    """The fused forward corrected by the virtual key, and the fused backward handed the corrected
    O and L (module docstring). The virtual key's logit (log S_i, with a sink logit folded in) gets
    -P_virtual(i) * Delta_i, with Delta_i = rowsum(dO_i * O_i): what a learned sink logit learns from."""

    @staticmethod
    def forward(ctx, q, k, v, log_mass, bias):
        D = q.size(-1)
        out, (q, k, v, lse_sm, causal, kind, saved) = stablemask_fused(
            q, k, v, log_mass, bias, for_backward=True)
        ctx.save_for_backward(q, k, v, out, lse_sm, bias, log_mass)
        ctx.causal, ctx.kind, ctx.head_dim, ctx.saved = causal, kind, D, saved
        return out[..., :D]

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse_sm, bias, log_mass = ctx.saved_tensors
        D = ctx.head_dim
        do = F.pad(do, (0, q.size(-1) - D)) if q.size(-1) != D else do.contiguous()
        grads = _fused_backward(ctx.kind, do, q, k, v, out, lse_sm, bias, ctx.causal,
                                1 / math.sqrt(D), ctx.saved)
        d_log_mass = None
        if ctx.needs_input_grad[3]:
            delta = (do.float() * out.float()).sum(-1)  # (B, H, Tq)
            d_log_mass = -torch.exp(log_mass - lse_sm[..., :q.size(-2)]) * delta
            # summed over the batch where every row's mass is the same, (H, Tq)
            d_log_mass = d_log_mass.sum_to_size(log_mass.shape)
        return (*(g[..., :D] for g in grads), d_log_mass, None)


def sdpa_attention(q, k, v, virtual=None, bias=None):
    """Causal attention plus, in every row, one virtual key of value 0 whose logit is virtual (H, Tq),
    or (B, H, Tq) where rows have positions of their own (None: no such key), on PyTorch's fused
    kernels. bias: an additive mask (1 or B, H or 1, Tq, T) that holds the causal mask (attention_bias,
    ring_bias), or None for the causal mask alone. q is (B, H, Tq, D), the last Tq of k's T positions:
    Tq = T (training, prefill) or 1 (a decode step), on a CPU or a CUDA GPU. Without a gradient to
    take (generation), no autograd.Function wraps the fused call."""
    Tq = q.size(-2)
    # grouped-query attention: autograd sums dK, dV over each group
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    # the fused kernels read rows as contiguous
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if bias is not None and bias.dtype != q.dtype:
        bias = aligned(bias.to(q.dtype))
    if virtual is None:
        # causal attention, or rows past the pseudo columns: no correction; PyTorch picks the kernel
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and Tq > 1)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or virtual.requires_grad):
        return StableMaskSDPA.apply(q, k, v, virtual, bias)
    out = stablemask_fused(q, k, v, virtual, bias)[0]
    return out if out.size(-1) == q.size(-1) else out[..., :q.size(-1)]


def virtual_logits(log_mass, offset, sink, n_head, Tq, device):
    """(H, Tq): the logit of each row's one virtual key of value 0, which stands for all its extra
    mass: StableMask's pseudo mass (log_mass, (H, Tq) or (B, H, Tq), shifted by offset) and a sink
    logit (H,), either of them or both; None where there is neither (causal attention)."""
    if log_mass is None and sink is None:
        return None
    logits = torch.full((n_head, Tq), -math.inf, device=device) if log_mass is None else \
        log_mass + offset if offset else log_mass
    return logits if sink is None else torch.logaddexp(logits, sink.float().view(-1, 1))
