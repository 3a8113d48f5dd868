"""
A GPT whose attention uses StableMask (Yin et al., ICML 2024), in one file.

StableMask replaces the causal mask with one that adds pseudo-attention mass to every softmax row
(paper Eq. 11). README.md's "The method" gives every formula used here. Top to bottom:
1) the attention: Eq. 11 as written (stablemask_weights), then the choice among three
   implementations of it: that reference, PyTorch's fused attention corrected by a virtual key
   (stablemask_sdpa.py) and the fused Triton kernel (stablemask_kernel.py),
2) the LLaMA-style model of the paper: RMSNorm, SwiGLU, no biases, RoPE / ALiBi / learned / none,
3) generation with a KV cache (kv_cache.py) under the paper's SM-I inference.
Checkpoints are checkpoint.py's; this file knows nothing of files, devices or sharding.
"""

import math
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.nn import functional as F

from kv_cache import FixedKVCache, KVCache
from stablemask_sdpa import (aligned, attention_bias, log_pseudo_mass, repeat_kv, sdpa_attention,
                             virtual_logits)

# -----------------------------------------------------------------------------
# StableMask attention


def stablemask_weights(q, k, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None,
                       pad=None):
    """The attention weights of the paper's Eq. 11, written to be read, not to be fast.
    q (B, H, Tq, D) are the last Tq of the T positions of k (B, H_kv, T, D): Tq = T in training,
    Tq < T when decoding with a KV cache. k may have fewer heads than q (grouped-query attention):
    each serves H / H_kv consecutive query heads.
    gamma (H,): the pseudo-score decay, or None for plain causal attention. alibi (H,): ALiBi's slopes,
    or None. pseudo_len: how far the pseudo columns extend (default T; SM-I's training length).
    window: each row sees only its last `window` keys, itself included (a KV cache that drops its
    oldest entry); None, every earlier key. offset: added to every pseudo score (with gamma 0, the
    paper's 'constant' ablation). sink (H,): the logit of one more key of value 0 in every row (a
    learned sink, or 0 for softmax off by one), or None. pad (B,): how many of each row's first keys
    are left padding (prompts of different lengths in one batch): no row after them sees them, and
    the row's positions start after them; None, no padding.
    Returns W (B, H, Tq, T) in float32 (float64 for float64 inputs). Row i sums to R_i / (R_i + S_i);
    the rest is the pseudo-attention mass."""
    k = repeat_kv(k, q.size(1))
    Tq, T = q.size(-2), k.size(-2)
    N = T if pseudo_len is None else pseudo_len
    dtype = torch.promote_types(q.dtype, torch.float32)
    # the column of each row's position 0: padding shifts its queries and keys alike
    shift = 0 if pad is None else pad.view(-1, 1, 1, 1)
    span = max(T, N + (0 if pad is None else int(pad.max())))
    i = torch.arange(T - Tq, T, device=q.device)[:, None]  # query columns (rows)
    j = torch.arange(span, device=q.device)[None, :]  # key columns, padded to position N
    A = q.to(dtype) @ k.to(dtype).transpose(-2, -1) / math.sqrt(q.size(-1))
    A = F.pad(A, (0, span - T))  # padding columns are never attended
    if alibi is not None:
        # ALiBi: only j <= i survives the mask
        A = A - alibi.to(dtype).view(-1, 1, 1) * (i - j)
    C = (j <= i).to(dtype)  # Eq. 8: the causal mask
    if gamma is None:
        # the plain causal baseline: no pseudo mass
        P = torch.where(j > i, -math.inf, 0.0)
    else:
        # Eq. 10: P[i, j] = -j * gamma (+ offset) above the diagonal, j a position; none at or past N
        P = torch.where(j > i, offset - (j - shift) * gamma.to(dtype).view(-1, 1, 1), 0.0)
        P = P.masked_fill((j > i) & (j - shift >= N), -math.inf)
    if pad is not None:
        # padding keys, for the rows after them (padding rows see earlier padding: no row of -inf alone)
        P = P.masked_fill((j < shift) & (i >= shift), -math.inf)
    scores = A * C + P
    if window is not None:
        # keys that have left the window are not in the row at all
        scores = scores.masked_fill(j <= i - window, -math.inf)
    if sink is not None:
        # a sink logit: one more column in every row, dropped after the softmax like the future
        scores = torch.cat([scores, sink.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
        C = F.pad(C, (0, 1))
    W = torch.softmax(scores, dim=-1) * C  # Eq. 11: softmax over all columns, THEN zero the future
    return W[..., :T]


def stablemask_reference(q, k, v, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None,
                         pad=None):
    """StableMask attention, O = W V with W from stablemask_weights (Eq. 11). v (B, H_kv, T, D);
    returns (B, H, Tq, D) in q's dtype."""
    W = stablemask_weights(q, k, gamma, alibi, pseudo_len, window, offset, sink, pad)
    return (W @ repeat_kv(v, q.size(1)).to(W.dtype)).to(q.dtype)


def alibi_slopes(n_head):
    """ALiBi's per-head slopes, shape (n_head,): 2^(-8/n), 2^(-16/n), ... for n a power of two;
    otherwise those of the power of two below n, then every other slope of the one above."""
    def geometric(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: n_head - p])


def auto_impl(device_type, alibi, window):
    """attn_impl='auto', the fastest path that is correct where it runs (README, Using the attention
    alone): on a CPU the sdpa path (the Triton kernel runs in its interpreter there, for tests). On
    CUDA the sdpa path too, on cuDNN (Hopper on), flash or memory-efficient kernels, except for ALiBi:
    those kernels would take its bias as a T x T tensor a head, where the Triton kernel computes it
    as it goes. Any other device, the reference."""
    if device_type == 'cpu':
        return 'sdpa'
    if device_type == 'cuda':
        return 'triton' if alibi is not None and window is None else 'sdpa'
    return 'reference'


@dataclass
class Pass:
    """What every layer of one forward pass shares, made once: the rotary tables of its positions, its
    rows' log pseudo mass (log S_i, (H, Tq) or (B, H, Tq), for the sdpa path; with a KV cache None where
    no row has any), SM-I's length, the sliding window, the KV cache, the sdpa path's mask (a fixed-shape
    cache's over its ring, or the first layer's), and how many of each row's first keys are left
    padding ((B,), or None)."""
    rope: tuple = None
    log_mass: torch.Tensor = None
    pseudo_len: int = None
    window: int = None
    kv_cache: object = None
    bias: torch.Tensor = None
    pad: torch.Tensor = None


def attend(q, k, v, layer, p):
    """One layer's attention by the implementation it asks for (GPTConfig.attn_impl): q, k, v from
    the layer, its constants from `layer` (impl, gamma, alibi, offset, sink), the rest from the pass
    `p`. Decode steps, sliding windows, padded batches and heads wider than the kernel's go to the sdpa
    path."""
    impl = auto_impl(q.device.type, layer.alibi, p.window) if layer.impl == 'auto' else layer.impl
    Tq, T = q.size(-2), k.size(-2)
    window = None if p.window is not None and p.window >= T else p.window  # a window that hides nothing
    if impl == 'triton' and Tq == T and window is None and p.pad is None:
        # imported on use: the other paths need no Triton
        from stablemask_kernel import MAX_HEAD_DIM, stablemask_attention
        if q.size(-1) <= MAX_HEAD_DIM:
            return stablemask_attention(q, k, v, layer.gamma, layer.alibi, p.pseudo_len, offset=layer.offset,
                                        sink=layer.sink)
    if impl == 'reference' or Tq not in (T, 1) or q.device.type not in ('cpu', 'cuda'):
        return stablemask_reference(q, k, v, layer.gamma, layer.alibi, p.pseudo_len, window, layer.offset,
                                    layer.sink, p.pad)
    if p.log_mass is None and p.kv_cache is None and layer.gamma is not None:
        # the rows' pseudo mass, the same in every layer of the pass: made by the first, kept for the others
        rows = torch.arange(T - Tq, T, device=q.device)
        if p.pad is not None:
            # each row's own positions: a left-padded row's first token is position 0
            rows = (rows - p.pad[:, None]).clamp(min=0)
        p.log_mass = log_pseudo_mass(layer.gamma, rows, T if p.pseudo_len is None else p.pseudo_len)
    if p.bias is not None and p.bias.dtype != q.dtype:
        # a fixed cache's mask, converted once a pass, its rows still aligned
        p.bias = aligned(p.bias.to(q.dtype))
    if p.bias is None and (layer.alibi is not None or window is not None or p.pad is not None):
        # the same in every layer of the pass: made by the first, kept for the others
        p.bias = attention_bias(layer.alibi, window, Tq, T, q.dtype, q.device, p.pad)
    virtual = virtual_logits(p.log_mass, layer.offset, layer.sink, q.size(1), Tq, q.device)
    return sdpa_attention(q, k, v, virtual, p.bias)


def stablemask_sdpa(q, k, v, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None):
    """The same function as stablemask_reference, on PyTorch's fused attention (stablemask_sdpa.py):
    causal attention plus one virtual key per row that holds its pseudo mass. Tq must be T (training,
    prefill) or 1 (a decode step), on a CPU or a CUDA GPU; anything else goes to the reference."""
    layer = SimpleNamespace(impl='sdpa', gamma=gamma, alibi=alibi, offset=offset, sink=sink)
    return attend(q, k, v, layer, Pass(pseudo_len=pseudo_len, window=window))


# -----------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    block_size: int = 1024  # the training length N; also SM-I's pseudo_len at inference
    vocab_size: int = 50257  # GPT-2 BPE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings and residual branches (the paper uses 0)
    bias: bool = False  # biases in Linear layers (LLaMA and the paper: none)
    attn_mask: str = 'stablemask'  # 'stablemask' or 'causal' (the baseline)
    sm_gamma: float = None  # pseudo-score decay: None, ALiBi's slopes (the paper's); a float, every head's
    pos_enc: str = 'rope'  # 'rope', 'alibi', 'learned', 'none'
    attn_impl: str = 'auto'  # 'auto' (auto_impl), 'reference', 'triton', 'sdpa'
    rope_base: float = 10000.0

    # what pretrained LLaMA-family checkpoints need (pretrained.py); the defaults are the paper's models
    n_kv_head: int = None  # key/value heads, each serving n_head // n_kv_head query heads; None: n_head
    head_dim: int = None  # None: n_embd // n_head
    n_hidden: int = None  # the SwiGLU width; None: LLaMA's rule (swiglu_hidden)
    norm_eps: float = 1e-6  # RMSNorm's epsilon
    rope_scaling: dict = None  # {'rope_type': 'linear' or 'llama3', 'factor': f, ...}; None: plain RoPE
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    tie_embeddings: bool = False  # the output head shares the token embedding matrix

    # the paper's Table 3 comparisons and today's sinks (experiments.py lm), each with every pos_enc
    sm_offset: float = 0.0  # added to every pseudo score; with sm_gamma=0.0, the paper's 'constant'
    sink_logit: str = 'none'  # 'learned': a virtual key of value 0 per head (gpt-oss); 'zero': off by one
    sink_token: str = 'none'  # 'learned' or 'fixed': an embedding prepended to every sequence
    attn_gate: str = 'none'  # 'elementwise': a sigmoid gate per head and channel on attention's output

    def __post_init__(self):
        # a checkpoint's or a config file's values arrive here: a wrong type is one line, not a traceback
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue
            if field.type is int and not (type(value) is int and value > 0):
                raise ValueError(f"{field.name}={value!r}: expected a positive whole number")
            if field.type is float and not (type(value) in (int, float) and math.isfinite(value)):
                raise ValueError(f"{field.name}={value!r}: expected a number")
            if field.type in (bool, str, dict) and not isinstance(value, field.type):
                raise ValueError(f"{field.name}={value!r}: expected a {field.type.__name__}")
        for name, allowed in CONFIG_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.sm_gamma is not None and not self.sm_gamma >= 0:
            raise ValueError(f"sm_gamma={self.sm_gamma}: the pseudo-score decay must be >= 0 (or None)")


CONFIG_CHOICES = dict(attn_mask=('stablemask', 'causal'), pos_enc=('rope', 'alibi', 'learned', 'none'),
                      attn_impl=('auto', 'reference', 'triton', 'sdpa'),
                      sink_logit=('none', 'learned', 'zero'), sink_token=('none', 'learned', 'fixed'),
                      attn_gate=('none', 'elementwise'))

# The paper's model sizes (README, Pretraining) and a tiny one for CPUs. The names are the paper's;
# GPT(...).get_num_params() gives the count (untied GPT-2 embeddings included): 71.9M, 162M, 308M, 1.44B.
PRESETS = {
    'tiny': dict(n_layer=4, n_head=4, n_embd=128),
    '71M': dict(n_layer=6, n_head=8, n_embd=512),
    '160M': dict(n_layer=12, n_head=12, n_embd=768),
    '400M': dict(n_layer=16, n_head=16, n_embd=1024),
    '1.4B': dict(n_layer=24, n_head=16, n_embd=2048),
}


def swiglu_hidden(n_embd):
    """The SwiGLU width: LLaMA's 2/3 of 4 * n_embd, rounded up to a multiple of 256, or for a model
    narrower than 512 to a multiple of the largest power of two at most n_embd / 2 (256 would inflate
    a small MLP by half: 341 -> 512 at n_embd 128, now 384). The paper's models keep LLaMA's widths."""
    multiple = min(256, 1 << ((n_embd // 2).bit_length() - 1))
    return -(-(8 * n_embd // 3) // multiple) * multiple


def rope_cos_sin(positions, head_dim, base, scaling=None):
    """Rotary embedding tables for the given positions (T,), each (T, 1, head_dim // 2) (to broadcast
    over the heads of a (B, T, heads, head_dim) tensor), float32; for positions (B, T) of each row's
    own, (B, T, 1, head_dim // 2)."""
    inv_freq = rope_frequencies(head_dim, base, scaling).to(positions.device)
    angles = positions.float()[..., None, None] * inv_freq
    return angles.cos(), angles.sin()


def rope_frequencies(head_dim, base, scaling=None):
    """RoPE's angle per position of each pair of dimensions, (head_dim // 2,): base^(-2i/d); with
    linear scaling divided by the factor; with Llama 3's, divided by it for long wavelengths only,
    smoothly between its low and high frequency bounds."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    kind = (scaling or {}).get('rope_type', 'default')
    if kind == 'linear':
        return inv_freq / scaling['factor']
    if kind == 'llama3':
        factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
        context = scaling['original_max_position_embeddings']
        wavelength = 2 * math.pi / inv_freq
        # 0 for long wavelengths, 1 for short ones
        smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate the halves of x (B, T, heads, D) by the position angles (GPT-NeoX's pairing), in x's
    dtype as transformers' Llama does: the tables are cast (T x D/2), never q and k. With a gradient
    to take, through RoPE below, whose backward is the rotation back."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():
        # the plain formula, which the compiler fuses (writes into views would break its graph)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return RoPE.apply(x, cos, sin) if torch.is_grad_enabled() and x.requires_grad else rotate(x, cos, sin)


def rotate(x, cos, sin):
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), each half written in place into one output
    with one temporary (six operations, no cat); the same roundings as transformers' rotate_half."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out.chunk(2, dim=-1)
    tmp = x2 * sin
    torch.mul(x1, cos, out=out1).sub_(tmp)
    torch.mul(x1, sin, out=tmp)
    torch.mul(x2, cos, out=out2).add_(tmp)
    return out


class RoPE(torch.autograd.Function):
    """A rotation's gradient is the rotation by the opposite angles: six operations where autograd
    takes nine and a cat, and nothing of x's size saved."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rotate(dy, cos, -sin), None, None


class RMSNorm(nn.Module):

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32, w32 = x.float(), self.weight.float()
        if x.device.type == 'cpu' and torch.is_grad_enabled() and (x.requires_grad or w32.requires_grad):
            return RMSNormCPU.apply(x32, w32, self.eps).to(x.dtype)
        return F.rms_norm(x32, (x.size(-1),), w32, self.eps).to(x.dtype)


class RMSNormCPU(torch.autograd.Function):
    """RMSNorm with its backward written out, for CPUs: PyTorch has no fused RMSNorm backward there,
    and its autograd of F.rms_norm takes some ten full-size operations, each a fresh tensor (5-12x
    layer_norm's fused backward); this one six, reusing its buffers. y = x r w, r = rsqrt(mean(x^2)
    + eps): dx = r (g - x_hat mean(g x_hat)) with g = dy w, x_hat = x r; dw = sum of dy x_hat."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight  # F.rms_norm's roundings, and transformers'

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, rstd = ctx.saved_tensors
        dy_x_hat = dy * x_hat
        dw = dy_x_hat.sum(tuple(range(dy.dim() - 1))) if ctx.needs_input_grad[1] else None
        mean = dy_x_hat.mul_(weight).mean(-1, keepdim=True)  # mean of g x_hat
        return (dy * weight).sub_(x_hat * mean).mul_(rstd), dw, None


class CausalSelfAttention(nn.Module):

    def __init__(self, config, index):
        super().__init__()
        self.index = index  # the layer's place in the stack: its slot in a KV cache
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, width, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.impl = config.attn_impl
        self.offset = config.sm_offset
        if config.sink_logit == 'learned':
            # a parameter, unlike StableMask: its gradient comes through the virtual key
            self.sink = nn.Parameter(torch.zeros(config.n_head))
        # Gated attention (Qiu et al., NeurIPS 2025; Qwen3-Next): the output of every head, channel by
        # channel, times sigmoid(x W_gate^T + b_gate) of the layer's input x, before c_proj. W_gate starts
        # at zero, so every gate starts at exactly 0.5 and the layer at half its ungated output; and no
        # random draw is taken, so a gated model starts from its ungated twin's weights (Qwen's code
        # draws it with q's projection, std 0.02: gates near 0.5 too). b_gate, zero, only with bias=True.
        gated, width = config.attn_gate == 'elementwise', self.n_head * self.head_dim
        self.gate_weight = nn.Parameter(torch.zeros(width, config.n_embd)) if gated else None
        self.gate_bias = nn.Parameter(torch.zeros(width)) if gated and config.bias else None
        self.set_constants(config)

    def set_constants(self, config, device=None):
        """The layer's constants, not parameters (StableMask adds nothing to train): the pseudo-score
        decays, ALiBi's slopes, a fixed sink logit. Set anew after a model built on the meta device
        gets its memory (sharded.py)."""
        gamma = None
        if config.attn_mask == 'stablemask':
            gamma = alibi_slopes(config.n_head) if config.sm_gamma is None else \
                torch.full((config.n_head,), float(config.sm_gamma))
        alibi = alibi_slopes(config.n_head) if config.pos_enc == 'alibi' else None
        to = lambda t: None if t is None else t.to(device) if device is not None else t
        self.register_buffer('gamma', to(gamma), persistent=False)
        self.register_buffer('alibi', to(alibi), persistent=False)
        if config.sink_logit != 'learned':
            zero = torch.zeros(config.n_head) if config.sink_logit == 'zero' else None
            self.register_buffer('sink', to(zero), persistent=False)

    def forward(self, x, p):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        # split, not sliced: its backward is one cat
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if p.rope is not None:
            # q and k rotated together, in the layout the projection wrote (rows contiguous)
            qk = apply_rope(qk, *p.rope)
        # (B, H, T, D) and (B, H_kv, T, D)
        q, k = (t.transpose(1, 2) for t in qk.split([self.n_head, self.n_kv_head], dim=2))
        v = v.transpose(1, 2)
        if p.kv_cache is not None:
            k, v = p.kv_cache.update(self.index, k, v)
        y = attend(q, k, v, self, p)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        if self.gate_weight is not None:  # from each token's own x: a decode step gates its new token alone
            y = y * torch.sigmoid(F.linear(x, self.gate_weight, self.gate_bias))
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020), as in LLaMA."""

    def __init__(self, config):
        super().__init__()
        hidden = config.n_hidden or swiglu_hidden(config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config, index):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, index)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, p):
        x = x + self.attn(self.ln_1(x), p)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, index) for index in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.n_sink = int(config.sink_token != 'none')  # positions before the tokens: the sink token's
        if config.pos_enc == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size + self.n_sink, config.n_embd)
        # untied, as in LLaMA, unless tie_embeddings
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.sink_token != 'none':
            token = torch.randn(config.n_embd, generator=torch.Generator().manual_seed(0)) * 0.02
            if config.sink_token == 'learned':
                self.sink_token = nn.Parameter(token)
            else:  # saved with the model, so that it is the same token after loading
                self.register_buffer('sink_token', token)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def get_num_params(self):
        """Every parameter, both embedding matrices included."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, pseudo_len=None, kv_cache=None, window=None, pad=None):
        """idx (B, T) token ids. Returns (logits, loss): logits (B, T, V) and the mean cross-entropy
        when targets (B, T) are given (-1 = ignore), else logits of the last position (B, 1, V).
        pseudo_len: the length StableMask's pseudo mass extends to; None = T (training); generation
        passes block_size (SM-I). kv_cache: a KVCache, for generation (its window and pad apply).
        window: every position attends only to the last `window` positions (itself included).
        pad (B,): how many padding tokens open each row (prompts of different lengths, left-padded
        into one batch: left_padded): no later token sees them, and each row's positions start after
        them, its first token at position 0; their logits mean nothing (targets -1 there)."""
        B, T = idx.size()
        first = kv_cache is None or kv_cache.empty
        window = window if kv_cache is None else kv_cache.window
        pad = pad if kv_cache is None else kv_cache.pad
        x = self.transformer.wte(idx)
        prepend = self.n_sink and first  # the sink token opens every sequence (a cache holds it after)
        if prepend:
            x = torch.cat([self.sink_token.to(x.dtype).expand(B, 1, -1), x], dim=1)
            if pad is not None:
                # after each row's padding, before its tokens: its position 0; padding needs no sink
                x[torch.arange(B, device=x.device), pad] = self.sink_token.to(x.dtype)
            if window is not None:
                raise ValueError("a window with a sink token is not supported (generation recomputes "
                                 "the last block_size tokens instead)")
        if pseudo_len is not None:
            pseudo_len += self.n_sink  # the training length, in positions: block_size tokens after the sink
        if kv_cache is not None:
            pos = kv_cache.positions(x.size(1), idx.device)
        else:
            pos = torch.arange(x.size(1), device=idx.device)
            pos = pos if pad is None else (pos - pad[:, None]).clamp(min=0)
        p = Pass(pseudo_len=pseudo_len, window=window, kv_cache=kv_cache,
                 pad=pad if kv_cache is None else kv_cache.key_pad())
        if self.config.pos_enc == 'learned':
            if pos.max() >= self.config.block_size + self.n_sink:
                raise ValueError(f"position {pos.max()} is past the learned positions "
                                 f"(block_size {self.config.block_size})")
            x = x + self.transformer.wpe(pos)
        elif self.config.pos_enc == 'rope':
            head_dim, config = self.transformer.h[0].attn.head_dim, self.config
            p.rope = rope_cos_sin(pos, head_dim, config.rope_base, config.rope_scaling)
        x = self.transformer.drop(x)
        # with a cache, the rows' pseudo mass (which a decode step reads from a table) and a fixed cache's
        # mask over its ring, the same in every layer; without one, the first layer makes the mass (attend)
        attn = self.transformer.h[0].attn
        if kv_cache is not None and attn.gamma is not None:
            # None: the length of each row so far
            N = pos[..., -1:, None] + 1 if pseudo_len is None else pseudo_len
            p.log_mass = kv_cache.log_mass(attn.gamma, pos, N)
        if kv_cache is not None:
            p.bias = kv_cache.step_bias(attn.alibi)
        for block in self.transformer.h:
            x = block(x, p)
        if kv_cache is not None:
            kv_cache.advance(x.size(1))
        x = self.transformer.ln_f(x[:, self.n_sink:] if prepend else x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not on norms or biases)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')

    def flops_per_token(self, T):
        """Training FLOPs per token (forward and backward): 6 per weight used in a matmul (the input
        embedding is a lookup, unless the output head shares it), plus the attention matmuls, of
        which causal attention does half."""
        cfg = self.config
        n = self.get_num_params() - (0 if cfg.tie_embeddings else self.transformer.wte.weight.numel())
        if cfg.pos_enc == 'learned':
            n -= self.transformer.wpe.weight.numel()
        attn = self.transformer.h[0].attn
        return 6 * n + 6 * cfg.n_layer * attn.n_head * attn.head_dim * T

    def estimate_mfu(self, tokens_per_sec, T, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the hardware's peak."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                        sliding_window=True):
        """Yield max_new_tokens next tokens, each (B, 1), continuing idx: a (B, T) tensor of B prompts of T
        tokens, or a list of B prompts of any lengths (each a 1-D tensor or a list of token ids), decoded as
        one batch, left-padded (left_padded): every row has positions of its own and generates what it would
        alone; prompts of one length make the tensor's batch, and take its path. temperature 0 is greedy.
        Every row uses pseudo_len = block_size (the paper's SM-I), so a cached step equals the same row of a
        full forward pass. Past block_size, each new token attends to the last block_size tokens
        (sliding_window: a KV cache that drops its oldest entry, a length the model was trained at), or with
        sliding_window=False to the whole context (RoPE / ALiBi / no positions). A learned-position model
        has no positions past block_size: it recomputes the last block_size tokens at every step instead,
        and so does a model with a sink token (which stays first, as StreamingLLM keeps its sinks) unless
        sliding_window is False. use_cache: True, a cache that grows (kv_cache.KVCache); 'fixed', one whose
        decode steps all have the same shapes, for torch.compile (kv_cache.FixedKVCache; where it cannot
        serve, recomputing or the reference attention, the growing one); False, none."""
        N = self.config.block_size
        idx, counts = left_padded(idx, self.lm_head.weight.device)
        # past N: the last N tokens computed anew at every step
        recompute = self.config.pos_enc == 'learned' or (self.n_sink and sliding_window)
        window = N if sliding_window and not recompute else None
        fixed = use_cache == 'fixed' and not recompute and self.config.attn_impl != 'reference'
        Cache = FixedKVCache if fixed else KVCache
        cache = None
        for step in range(max_new_tokens):
            if cache is not None and not (recompute and cache.pos >= N + self.n_sink):
                # one new token through the cache
                logits, _ = self(idx[:, -1:], pseudo_len=N, kv_cache=cache)
            else:
                # the first step; every step without the cache; learned positions or a sink token past N
                context = idx[:, -N:] if recompute else idx
                # the padding the context still holds
                pad = padding(counts, idx.size(1) - context.size(1), idx.device)
                cacheable = use_cache and not (recompute and context.size(1) >= N)
                size = self.n_sink + context.size(1) + max_new_tokens - step
                cache = Cache(self.config.n_layer, size, window, pad) if cacheable else None
                logits, _ = self(context, pseudo_len=N, kv_cache=cache, window=window, pad=pad)
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 sliding_window=True, end_token=None):
        """idx (B, T) continued by max_new_tokens sampled tokens: (B, T + max_new_tokens). A list of
        prompts of any lengths (as generate_tokens takes them) gives a list: each prompt continued, a
        1-D tensor. end_token: a row ends with it, and generation stops once every row has; in the
        tensor a row that has ended goes on with end_token."""
        steps, ended = [], None
        for token in self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, use_cache,
                                          sliding_window):
            if ended is not None:
                token = token.masked_fill(ended, end_token)
            steps.append(token)
            if end_token is not None:
                ended = token == end_token
                if ended.all():
                    break
        if torch.is_tensor(idx):
            return torch.cat([idx, *steps], dim=1)
        device = self.lm_head.weight.device
        new = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in idx]
        rows = []
        for prompt, tokens in zip(idx, new):
            tokens = tokens[:tokens.index(end_token) + 1] if end_token in tokens else tokens
            rows.append(torch.cat([torch.as_tensor(prompt, dtype=torch.long, device=device).view(-1),
                                   torch.tensor(tokens, dtype=torch.long, device=device)]))
        return rows

    def set_constants(self, device):
        """Every layer's constants (CausalSelfAttention.set_constants), on device."""
        for block in self.transformer.h:
            block.attn.set_constants(self.config, device)

    def scale_pseudo_mass(self, scale):
        """Multiply StableMask's pseudo mass by scale, from 0 (causal attention, exactly) to 1 (the
        paper's): what train.py's mask_warmup_iters ramps, so that a causal model turns into a
        StableMask one without a jump in its loss. Each layer's offset (log of the scale) carries it."""
        offset = self.config.sm_offset + (math.log(scale) if scale > 0 else -math.inf)
        for block in self.transformer.h:
            block.attn.offset = offset


def left_padded(prompts, device):
    """Prompts as one batch, (B, T) token ids, and how many padding tokens open each row ([0] * B for a
    tensor, a batch already). A list of prompts of any lengths (1-D tensors or lists of ids) is put on
    device, each row its padding (token 0) first: its tokens end together with the others', so every
    step appends one column to all."""
    if torch.is_tensor(prompts):
        return prompts, [0] * prompts.size(0)
    rows = [torch.as_tensor(p, dtype=torch.long, device=device).view(-1) for p in prompts]
    if not rows or not all(len(row) for row in rows):
        raise ValueError("generation needs one prompt or more, each of one token or more")
    T = max(len(row) for row in rows)
    return torch.stack([F.pad(row, (T - len(row), 0)) for row in rows]), [T - len(row) for row in rows]


def padding(counts, cut, device):
    """(B,): how many padding tokens open each row once its first `cut` columns are cut off, or None
    where no row has any (the path of a batch of one length)."""
    counts = [max(0, n - cut) for n in counts]
    return torch.tensor(counts, device=device) if any(counts) else None


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from logits (B, V): greedy at temperature 0, else from the softmax at that
    temperature restricted to the top_k tokens and to the smallest set holding top_p of the mass."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # the first token always stays
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
