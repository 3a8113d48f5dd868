"""
A GPT whose attention uses StableMask (Yin et al., ICML 2024), in one file.

StableMask replaces the causal mask with one that adds pseudo-attention mass to every softmax row
(paper Eq. 11). README.md's "The method" gives every formula used here; the pieces, top to bottom:
1) the attention itself: the readable reference (Eq. 11 as written) and the choice among it, the
   fast path through PyTorch's fused attention (stablemask_sdpa.py) and the Triton kernel,
2) the LLaMA-style model of the paper: RMSNorm, SwiGLU, no biases, RoPE / ALiBi / learned / none,
3) generation with a KV cache under the paper's SM-I inference, and checkpoint loading.
"""

import math
import os
import pickle
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from kv_cache import FixedKVCache, KVCache
from stablemask_sdpa import log_pseudo_mass, repeat_kv, sdpa_attention  # noqa: F401 (log_pseudo_mass: for the model's users)

if not torch.cuda.is_available():
    # attn_impl='triton' without a GPU runs in Triton's interpreter, which must be chosen before
    # triton is first imported, and some of torch imports it (the meta device, for one)
    os.environ.setdefault('TRITON_INTERPRET', '1')

# -----------------------------------------------------------------------------
# StableMask attention


def alibi_slopes(n_head):
    """ALiBi's per-head slopes, shape (n_head,): 2^(-8/n), 2^(-16/n), ... for n a power of two;
    otherwise those of the power of two below n, then every other slope of the one above."""
    def geometric(n):
        return [2 ** (-8 * (h + 1) / n) for h in range(n)]
    p = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(geometric(p) + geometric(2 * p)[0::2][: n_head - p])


def stablemask_weights(q, k, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None):
    """The attention weights of the paper's Eq. 11, written to be read, not to be fast.
    q (B, H, Tq, D) are the last Tq of the T positions of k (B, H, T, D) (Tq = T in training, Tq < T
    when decoding with a KV cache). gamma (H,) is the pseudo-score decay, or None for plain causal
    attention; alibi (H,) ALiBi slopes or None; pseudo_len the length the pseudo mass extends to
    (default T; the training block size under SM-I); window: each row sees only its last `window`
    keys (itself included), as with a KV cache that drops its oldest entry; None: every earlier key;
    offset: a constant added to every pseudo score (with gamma 0, the paper's 'constant' ablation);
    sink (H,): a per-head logit of one more key of value 0 in every row (a learned sink, or 0 for
    softmax off by one), or None.
    Returns W (B, H, Tq, T), float32 (float64 for float64 inputs); row i sums to R_i / (R_i + S_i),
    the rest being the pseudo-attention mass. k may have fewer heads than q (grouped-query
    attention): each of its heads serves H / H_kv consecutive query heads."""
    k = repeat_kv(k, q.size(1))
    Tq, T = q.size(-2), k.size(-2)
    N = T if pseudo_len is None else pseudo_len
    dtype = torch.promote_types(q.dtype, torch.float32)
    i = torch.arange(T - Tq, T, device=q.device)[:, None]  # query positions (rows)
    j = torch.arange(max(T, N), device=q.device)[None, :]  # key positions, padded to N (columns)
    A = q.to(dtype) @ k.to(dtype).transpose(-2, -1) / math.sqrt(q.size(-1))
    A = F.pad(A, (0, j.size(1) - T))  # padding columns are never attended
    if alibi is not None:
        A = A - alibi.to(dtype).view(-1, 1, 1) * (i - j)  # ALiBi: only j <= i survives the mask
    C = (j <= i).to(dtype)  # Eq. 8: the causal mask
    if gamma is None:
        P = torch.where(j > i, -math.inf, 0.0)  # the plain causal baseline: no pseudo mass
    else:
        P = torch.where(j > i, offset - j * gamma.to(dtype).view(-1, 1, 1), 0.0)  # Eq. 10: P[i,j] = -j*gamma (+ offset)
        P = P.masked_fill((j > i) & (j >= N), -math.inf)  # no pseudo column at or beyond N
    scores = A * C + P
    if window is not None:  # keys that have left the window are not in the row at all
        scores = scores.masked_fill(j <= i - window, -math.inf)
    if sink is not None:  # a sink logit: one more column in every row, dropped after the softmax like the future
        scores = torch.cat([scores, sink.to(dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
        C = F.pad(C, (0, 1))
    W = torch.softmax(scores, dim=-1) * C  # Eq. 11: softmax over all columns, THEN zero the future
    return W[..., :T]


def stablemask_reference(q, k, v, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None):
    """StableMask attention, O = W V with W from stablemask_weights (Eq. 11). v (B, H, T, D);
    returns (B, H, Tq, D) in q's dtype."""
    W = stablemask_weights(q, k, gamma, alibi, pseudo_len, window, offset, sink)
    return (W @ repeat_kv(v, q.size(1)).to(W.dtype)).to(q.dtype)


def stablemask_sdpa(q, k, v, gamma, alibi=None, pseudo_len=None, window=None, offset=0.0, sink=None, shared=None):
    """StableMask attention on PyTorch's fused kernels (stablemask_sdpa.py), the same function as
    stablemask_reference. Tq must be T (training, prefill) or 1 (a decode step), on a CPU or a CUDA
    GPU; anything else goes to the reference. shared: see stablemask_sdpa.sdpa_attention."""
    if q.size(-2) not in (k.size(-2), 1) or q.device.type not in ('cpu', 'cuda'):
        return stablemask_reference(q, k, v, gamma, alibi, pseudo_len, window, offset, sink)
    return sdpa_attention(q, k, v, gamma, alibi, pseudo_len, window, offset, sink, shared)


def auto_impl(device_type, alibi, window):
    """attn_impl='auto', the fastest path that is correct where it runs (README, Using the attention
    alone): on a CPU the sdpa path (the Triton kernel runs in its interpreter there, for tests); on
    CUDA the sdpa path too, on cuDNN (Hopper on), flash or memory-efficient kernels, except for ALiBi,
    whose bias those kernels would take as a T x T tensor a head and the Triton kernel computes as it
    goes; any other device, the reference."""
    if device_type == 'cpu':
        return 'sdpa'
    if device_type == 'cuda':
        return 'triton' if alibi is not None and window is None else 'sdpa'
    return 'reference'


def attend(q, k, v, gamma, alibi, pseudo_len, impl, window=None, offset=0.0, sink=None, shared=None):
    """Dispatch to one of three implementations of the same function; see GPTConfig.attn_impl."""
    if impl == 'auto':
        impl = auto_impl(q.device.type, alibi, window)
    if window is not None and window >= k.size(-2):
        window = None  # it hides nothing
    if impl == 'triton' and q.size(-2) == k.size(-2) and window is None:  # decode steps and windows use sdpa
        from stablemask_kernel import MAX_HEAD_DIM, stablemask_attention  # imported on use: the other paths need no Triton
        if q.size(-1) <= MAX_HEAD_DIM:  # wider heads use sdpa too
            return stablemask_attention(q, k, v, gamma, alibi, pseudo_len, offset=offset, sink=sink)
    if impl == 'reference':
        return stablemask_reference(q, k, v, gamma, alibi, pseudo_len, window, offset, sink)
    return stablemask_sdpa(q, k, v, gamma, alibi, pseudo_len, window, offset, sink, shared)


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
    sm_gamma: float = None  # pseudo-score decay: None = per-head ALiBi slopes (paper), a float = every head, 0.0 = ablation
    pos_enc: str = 'rope'  # 'rope', 'alibi', 'learned', 'none'
    attn_impl: str = 'auto'  # 'auto' (auto_impl's rule: sdpa, the Triton kernel for ALiBi on CUDA), 'reference', 'triton', 'sdpa'
    rope_base: float = 10000.0
    # what pretrained LLaMA-family checkpoints need (pretrained.py); the defaults are the paper's models
    n_kv_head: int = None  # key/value heads, each shared by n_head // n_kv_head query heads (grouped-query attention); None: n_head
    head_dim: int = None  # None: n_embd // n_head
    n_hidden: int = None  # the SwiGLU width; None: LLaMA's rule (swiglu_hidden)
    norm_eps: float = 1e-6  # RMSNorm's epsilon
    rope_scaling: dict = None  # {'rope_type': 'linear', 'factor': f} or Llama 3's {'rope_type': 'llama3', ...}; None: plain RoPE
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    tie_embeddings: bool = False  # the output head shares the token embedding matrix
    # the paper's Table 3 comparisons, and today's sinks (experiments.py lm); each combines with every pos_enc
    sm_offset: float = 0.0  # added to every pseudo score: with sm_gamma=0.0, the paper's 'constant' pseudo value
    sink_logit: str = 'none'  # 'learned': a logit per head for a virtual key of value 0 in every row (gpt-oss); 'zero': that logit fixed at 0 (softmax off by one)
    sink_token: str = 'none'  # 'learned': an embedding prepended to every sequence (a sink token); 'fixed': the same, never trained
    attn_gate: str = 'none'  # 'elementwise': a sigmoid gate per head and channel on attention's output

    def __post_init__(self):
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
                      attn_impl=('auto', 'reference', 'triton', 'sdpa'), sink_logit=('none', 'learned', 'zero'),
                      sink_token=('none', 'learned', 'fixed'), attn_gate=('none', 'elementwise'))

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
    """Rotary embedding tables for the given positions, each (T, 1, head_dim // 2) (to broadcast over
    the heads of a (B, T, heads, head_dim) tensor), float32."""
    inv_freq = rope_frequencies(head_dim, base, scaling).to(positions.device)
    angles = positions.float()[:, None, None] * inv_freq
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
        smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def apply_rope(x, cos, sin):
    """Rotate the halves of x (B, T, heads, D) by the position angles (GPT-NeoX's pairing), in x's
    dtype as transformers' Llama does: the tables are cast (T x D/2), never q and k. With a gradient
    to take, through RoPE below, whose backward is the rotation back."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if torch.compiler.is_compiling():  # the plain formula, which the compiler fuses (writes into views break its graph)
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

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head or config.n_head
        self.head_dim = config.head_dim or config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.impl = config.attn_impl
        self.offset = config.sm_offset
        if config.sink_logit == 'learned':  # a parameter, unlike StableMask: its gradient comes through the virtual key
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
            gamma = alibi_slopes(config.n_head) if config.sm_gamma is None else torch.full((config.n_head,), float(config.sm_gamma))
        alibi = alibi_slopes(config.n_head) if config.pos_enc == 'alibi' else None
        to = lambda t: None if t is None else t.to(device) if device is not None else t
        self.register_buffer('gamma', to(gamma), persistent=False)
        self.register_buffer('alibi', to(alibi), persistent=False)
        if config.sink_logit != 'learned':
            self.register_buffer('sink', to(torch.zeros(config.n_head)) if config.sink_logit == 'zero' else None, persistent=False)

    def forward(self, x, rope=None, layer=0, kv_cache=None, pseudo_len=None, window=None, shared=None):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)  # split, not sliced: its backward is one cat
        if rope is not None:  # q and k rotated together, in the layout the projection wrote (rows contiguous)
            qk = apply_rope(qk, *rope)
        q, k = (t.transpose(1, 2) for t in qk.split([self.n_head, self.n_kv_head], dim=2))  # (B, H, T, D), (B, H_kv, T, D)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        y = attend(q, k, v, self.gamma, self.alibi, pseudo_len, self.impl, window, self.offset, self.sink, shared)
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

    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, layer, kv_cache, pseudo_len, window, shared=None):
        x = x + self.attn(self.ln_1(x), rope, layer, kv_cache, pseudo_len, window, shared)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.n_sink = int(config.sink_token != 'none')  # positions before the tokens: the sink token's
        self.activation_checkpointing = False  # train.py's setting: each block's activations recomputed in the backward
        if config.pos_enc == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size + self.n_sink, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied, as in LLaMA, unless tie_embeddings
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

    def forward(self, idx, targets=None, pseudo_len=None, kv_cache=None, window=None):
        """idx (B, T) token ids. Returns (logits, loss): logits (B, T, V) and the mean cross-entropy
        when targets (B, T) are given (-1 = ignore), else logits of the last position (B, 1, V).
        pseudo_len: the length StableMask's pseudo mass extends to; None = T (training); generation
        passes block_size (SM-I). kv_cache: a KVCache, for generation (its window applies).
        window: every position attends only to the last `window` positions (itself included)."""
        B, T = idx.size()
        first = kv_cache is None or kv_cache.empty
        window = window if kv_cache is None else kv_cache.window
        x = self.transformer.wte(idx)
        prepend = self.n_sink and first  # the sink token opens every sequence (a cache holds it after)
        if prepend:
            x = torch.cat([self.sink_token.to(x.dtype).expand(B, 1, -1), x], dim=1)
            if window is not None:
                raise ValueError("a window with a sink token is not supported (generation recomputes the last block_size tokens instead)")
        if pseudo_len is not None:
            pseudo_len += self.n_sink  # the training length, in positions: block_size tokens after the sink
        pos = torch.arange(x.size(1), device=idx.device) if kv_cache is None else kv_cache.positions(x.size(1), idx.device)
        rope = None
        if self.config.pos_enc == 'learned':
            if pos[-1] >= self.config.block_size + self.n_sink:
                raise ValueError(f"position {pos[-1]} is past the learned positions (block_size {self.config.block_size})")
            x = x + self.transformer.wpe(pos)
        elif self.config.pos_enc == 'rope':
            rope = rope_cos_sin(pos, self.transformer.h[0].attn.head_dim, self.config.rope_base, self.config.rope_scaling)
        x = self.transformer.drop(x)
        # what every layer of this pass computes alike, once: the pseudo mass of its rows (a cache's decode
        # step has it already, and a fixed cache's mask); every layer's decays and slopes are the same
        attn = self.transformer.h[0].attn
        shared = {} if kv_cache is None else kv_cache.step_constants(x.size(1), attn.gamma, attn.alibi, pseudo_len)
        for layer, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():  # recomputed in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layer, kv_cache, pseudo_len, window, shared, use_reentrant=False)
            else:
                x = block(x, rope, layer, kv_cache, pseudo_len, window, shared)
        if kv_cache is not None:
            kv_cache.advance(x.size(1))
        x = self.transformer.ln_f(x[:, self.n_sink:] if prepend else x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position is needed
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
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
        """Yield max_new_tokens next tokens, each (B, 1), continuing idx (B, T). temperature 0 is greedy.
        Every row uses pseudo_len = block_size (the paper's SM-I), so a cached step equals the same
        row of a full forward pass. Past block_size, each new token attends to the last block_size
        tokens (sliding_window: a KV cache that drops its oldest entry, a length the model was trained
        at), or with sliding_window=False to the whole context (RoPE / ALiBi / no positions). A
        learned-position model has no positions past block_size: it recomputes the last block_size
        tokens at every step instead, and so does a model with a sink token (which stays first, as
        StreamingLLM keeps its sinks) unless sliding_window is False. use_cache: True, a cache that
        grows (kv_cache.KVCache); 'fixed', one whose decode steps all have the same shapes, for
        torch.compile (kv_cache.FixedKVCache; where it cannot serve, recomputing or the reference
        attention, the growing one); False, none."""
        N = self.config.block_size
        recompute = self.config.pos_enc == 'learned' or (self.n_sink and sliding_window)  # past N: the last N tokens anew
        window = N if sliding_window and not recompute else None
        Cache = FixedKVCache if use_cache == 'fixed' and not recompute and self.config.attn_impl != 'reference' else KVCache
        cache = None
        for step in range(max_new_tokens):
            if cache is not None and not (recompute and cache.pos >= N + self.n_sink):
                logits, _ = self(idx[:, -1:], pseudo_len=N, kv_cache=cache)  # one new token through the cache
            else:  # the first step; every step without the cache; learned positions or a sink token past block_size
                context = idx[:, -N:] if recompute else idx
                cacheable = use_cache and not (recompute and context.size(1) >= N)
                size = self.n_sink + context.size(1) + max_new_tokens - step
                cache = Cache(self.config.n_layer, size, window) if cacheable else None
                logits, _ = self(context, pseudo_len=N, kv_cache=cache, window=window)
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True, sliding_window=True):
        """idx (B, T) continued by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        steps = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, use_cache, sliding_window))
        return torch.cat([idx, *steps], dim=1)

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

    @staticmethod
    def from_pretrained(path, **overrides):
        """The GPT of a local Hugging Face LLaMA-family folder (pretrained.py), or of a checkpoint of
        ours, with GPTConfig fields overridden: attn_mask='stablemask', block_size, attn_impl, ...
        A pretrained model keeps its own causal mask unless attn_mask says otherwise."""
        return model_from_checkpoint(load_checkpoint(path), **overrides)


def resolve_device(device):
    """The device a script runs on: 'auto' is this process's GPU (LOCAL_RANK under torchrun) if
    CUDA is there, else the CPU. Raises ValueError, one line, for a device this machine lacks."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device == 'auto':
        if not torch.cuda.is_available():
            return 'cpu'
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device=auto: this is local process {local_rank} but the machine has "
                             f"{torch.cuda.device_count()} GPU(s): start at most that many per node, or pass --device=cpu")
        return f"cuda:{local_rank}"
    try:
        torch.empty(0, device=device)
    except NotImplementedError:  # the dispatcher's page-long account of a backend this build lacks
        raise ValueError(f"device={device!r} is not usable here: this build of PyTorch has no {torch.device(device).type} backend") from None
    except (RuntimeError, AssertionError) as e:  # a bad name, no CUDA, no such GPU, ...
        raise ValueError(f"device={device!r} is not usable here: {str(e).strip().splitlines()[0][:200]}") from None
    return device


def autocast_for(device_type, dtype):
    """The run's dtype name and its autocast context. dtype: 'float32', 'bfloat16', 'float16', or
    'auto': float32 on a CPU, bfloat16 on GPUs that have it, float16 on older ones."""
    if dtype == 'auto':
        dtype = 'float32' if device_type == 'cpu' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype == 'float32':
        return dtype, nullcontext()
    return dtype, torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype))


# dense bf16/fp16 tensor-core peaks in FLOP/s; the first name found in the GPU's name wins
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'A100': 312e12}


def gpu_peak_flops(device):
    """The bf16 peak of the GPU `device`, for MFU; None for a CPU or a GPU not in the table."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if torch.device(device).type == 'cuda' else None


def peak_flops_of(name):
    """The bf16 peak of a GPU by the name CUDA gives it: the first key of GPU_PEAK_FLOPS in the name
    (so an 'H100 NVL' is not taken for an H100 SXM), or None."""
    return next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)


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
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, -math.inf)  # the first token always stays
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)


# -----------------------------------------------------------------------------
# checkpoints: plain dicts of tensors and Python values, loaded with weights_only=True so that a
# checkpoint from a stranger cannot run code


def checkpoint_file(path):
    """A checkpoint names a file, a folder holding ckpt.pt (or a sharded ckpt.dcp), or a Hugging Face
    model's folder."""
    from pretrained import is_pretrained_folder
    from sharded import LINK, is_sharded
    if os.path.isdir(path) and is_sharded(path):
        return os.path.join(path, LINK) if os.path.isdir(os.path.join(path, LINK)) else path
    return os.path.join(path, 'ckpt.pt') if os.path.isdir(path) and not is_pretrained_folder(path) else path


def load_checkpoint(path, device='cpu', weights=True):
    """Load a checkpoint file, or the ckpt.pt in a folder, or a Hugging Face LLaMA-family model's
    folder (pretrained.py) as a checkpoint with its tokenizer's description. A sharded checkpoint
    (sharded.py), and a Hugging Face folder with weights=False, come without their tensors: then
    'sharded' or 'pretrained' says where they are, and model_from_checkpoint or sharded.py reads them.
    Raises ValueError, with one line saying what is wrong, for a missing, corrupt, truncated or foreign file."""
    from pretrained import is_pretrained_folder, pretrained_args, pretrained_checkpoint  # imported on use, as the kernel is
    from sharded import folder_of, is_sharded, read_run, safe_metadata
    if is_pretrained_folder(path):
        return pretrained_checkpoint(path) if weights else pretrained_args(path)
    if os.path.isdir(path) and is_sharded(path):
        safe_metadata(folder_of(path))  # before anything reads it
        return dict(read_run(path), sharded=folder_of(path))
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns before some of the failures below; the error says it all
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is damaged, or holds Python objects other than tensors and plain values, "
                         "which are refused because loading them could run code") from None
    except Exception as e:  # RuntimeError, EOFError, ... by the kind of damage
        reason = str(e).strip().splitlines()[0].split('. ')[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint (corrupt or truncated?): {reason}") from None
    if not isinstance(checkpoint, dict) or not {'model', 'model_args'} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint of this project (no model and model_args)")
    # checkpoints of a torch.compile'd model (nanoGPT's, say) prefix every key with _orig_mod.
    checkpoint['model'] = {k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()}
    return checkpoint


def load_model(path, device='cpu', **overrides):
    """(the GPT, its checkpoint) of load_checkpoint(path), GPTConfig fields overridden. Raises
    ValueError, one line (naming the file where its tensors are what is wrong)."""
    checkpoint = load_checkpoint(path, device)
    try:
        return model_from_checkpoint(checkpoint, **overrides), checkpoint
    except ValueError as e:
        raise ValueError(f"{checkpoint_file(path)}: {e}") from None


def model_from_checkpoint(checkpoint, **overrides):
    """The GPT a checkpoint holds, with GPTConfig fields overridden (attn_impl, attn_mask, ...).
    Raises ValueError, one line, when its model_args or its tensors do not describe a model of ours."""
    args = {**checkpoint['model_args'], **overrides}
    fc = checkpoint.get('model', {}).get('transformer.h.0.mlp.c_fc.weight')
    if args.get('n_hidden') is None and fc is not None:
        args['n_hidden'] = fc.size(0)  # saved before swiglu_hidden's rule for small models: its own width
    unknown = sorted(args.keys() - GPTConfig.__dataclass_fields__.keys())
    if unknown:
        raise ValueError(f"its model_args hold settings this version does not know: {', '.join(unknown)}")
    model = GPT(GPTConfig(**args))
    config = model.config
    if 'model' not in checkpoint:  # sharded, or weights=False: read whole into this process now
        from pretrained import pretrained_checkpoint
        from sharded import full_model_state
        state = full_model_state(checkpoint['sharded'], model) if 'sharded' in checkpoint else \
            pretrained_checkpoint(checkpoint['pretrained'])['model']
        checkpoint = {**checkpoint, 'model': state}
    state = checkpoint['model']
    if config.pos_enc == 'learned' and 'transformer.wpe.weight' in state:  # a shorter block_size keeps the first positions
        wpe, positions = state['transformer.wpe.weight'], config.block_size + model.n_sink
        if positions > wpe.size(0):
            raise ValueError(f"block_size {config.block_size} is past the checkpoint's {wpe.size(0) - model.n_sink} learned positions")
        state = {**state, 'transformer.wpe.weight': wpe[:positions]}
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        problems = [f"{what} {', '.join(names[:3])}" for what, names in (('missing', missing), ('unexpected', unexpected)) if names]
        raise ValueError(f"its tensors do not fit its model_args: {'; '.join(problems)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"its tensors do not fit its model_args: {name} is {tuple(tensor.shape)}, "
                             f"the model needs {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model
