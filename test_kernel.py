"""
How the StableMask attention implementations are checked.

Three implementations of one function: model.stablemask_reference (the paper's Eq. 11, materialised),
model.stablemask_sdpa (PyTorch's fused attention with the log-sum-exp corrected) and
stablemask_kernel.stablemask_attention (the fused Triton kernel). Each is compared, output and all
three gradients, with the reference run in float64 on the same random inputs, by relative error
||x - ref|| / ||ref||. On a CPU the kernel runs in Triton's interpreter; on a GPU natively, and only
there in bfloat16 (the interpreter's bf16 tl.dot is wrong).
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kernel_configs as kc
import stablemask_kernel as sk
import stablemask_sdpa as sdpa_module
from conftest import DRY_RUN, REPO, run_command
from model import GPT, GPTConfig, alibi_slopes, log_pseudo_mass, stablemask_reference, stablemask_sdpa
from stablemask_kernel import stablemask_attention
from stablemask_sdpa import StableMaskSDPA, attention_bias, fused_kernel

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
IMPLS = {'kernel': stablemask_attention, 'sdpa': stablemask_sdpa, 'reference': stablemask_reference}


def rel_err(x, ref):
    """||x - ref|| / ||ref||; the absolute error where ref is exactly zero (the gradient of q at T = 1)."""
    err = (x.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return err / scale if scale > 0 else err


def inputs(B, H, T, D, dtype, seed=0, device=DEVICE, kv_heads=None):
    """Random q, do (B, H, T, D) and k, v (B, kv_heads or H, T, D)."""
    g = torch.Generator().manual_seed(seed)
    heads = lambda i: kv_heads if i in (1, 2) and kv_heads else H
    return tuple(torch.randn(B, heads(i), T, D, generator=g).to(device, dtype) for i in range(4))


def gammas(kind, H):
    """The pseudo-score decays under test: per head (the paper's ALiBi slopes), one scalar for every
    head, zero (the paper's ablation), a mix of tiny to large, or None (plain causal attention)."""
    return {'slopes': alibi_slopes(H), 'scalar': torch.full((H,), 0.3), 'zero': torch.zeros(H),
            'mixed': torch.tensor([1e-6, 0.05, 0.5, 20.0][:H]), 'none': None}[kind]


def run(impl, q, k, v, do, gamma, alibi, pseudo_len):
    """Output and dq, dk, dv of one implementation, on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dev = lambda t: None if t is None else t.to(q.device)
    out = IMPLS[impl](q, k, v, dev(gamma), dev(alibi), pseudo_len)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


def float64_reference(q, k, v, do, gamma, alibi, pseudo_len):
    d = lambda t: None if t is None else t.double()
    return run('reference', d(q), d(k), d(v), d(do), d(gamma), d(alibi), pseudo_len)


def check(impl, q, k, v, do, gamma, alibi=None, pseudo_len=None):
    expected = float64_reference(q, k, v, do, gamma, alibi, pseudo_len)
    got = run(impl, q, k, v, do, gamma, alibi, pseudo_len)
    for name, x, ref in zip(('out', 'dq', 'dk', 'dv'), got, expected):
        assert x.shape == ref.shape and x.dtype == q.dtype, name  # dk, dv: K's heads, summed over each group
        assert torch.isfinite(x).all(), f"{impl} {name}: NaN or inf"
        err = rel_err(x, ref)
        assert err <= TOLERANCE[q.dtype], f"{impl} {name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------
# every implementation against float64, over lengths that do and do not fill the kernel's blocks

CASES = [  # T, head dim, gamma, alibi, pseudo_len beyond T (SM-I)
    (1, 32, 'slopes', False, 0), (1, 16, 'zero', True, 40), (2, 32, 'scalar', False, 0),
    (2, 64, 'none', True, 0), (17, 64, 'slopes', True, 0), (17, 32, 'zero', False, 15),
    (17, 32, 'none', False, 0), (64, 32, 'mixed', False, 0), (64, 64, 'slopes', False, 64),
    (64, 16, 'scalar', True, 0), (100, 32, 'zero', True, 0), (100, 64, 'slopes', False, 1),
    (100, 32, 'none', True, 0), (257, 64, 'slopes', True, 0), (257, 32, 'mixed', False, 300),
    (129, 128, 'scalar', False, 0), (50, 24, 'slopes', False, 0), (33, 80, 'mixed', True, 7),
]


@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
@pytest.mark.parametrize('T,D,gamma,alibi,extra', CASES)
def test_float32_matches_float64(poisoned, impl, T, D, gamma, alibi, extra):
    B, H = 2, 4 if gamma == 'mixed' else 3
    q, k, v, do = inputs(B, H, T, D, torch.float32, seed=T * D)
    check(impl, q, k, v, do, gammas(gamma, H), alibi_slopes(H) if alibi else None, T + extra)


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
@pytest.mark.parametrize('H,kv_heads,T,D,alibi,extra', [
    (4, 1, 17, 32, False, 0), (4, 2, 100, 64, True, 0), (6, 2, 257, 32, True, 30), (8, 4, 64, 24, False, 5),
    (3, 1, 1, 16, True, 9)])
def test_grouped_query_attention(poisoned, impl, H, kv_heads, T, D, alibi, extra):
    """Fewer K/V heads than query heads, each serving a group: against float64 (whose reference
    repeats K and V); dK and dV come back with K's heads, the sum over their group."""
    q, k, v, do = inputs(2, H, T, D, torch.float32, seed=H * T, kv_heads=kv_heads)
    check(impl, q, k, v, do, alibi_slopes(H), alibi_slopes(H) if alibi else None, T + extra)


@pytest.mark.slow
@pytest.mark.parametrize('dq', ['atomic', 'separate'])
@pytest.mark.parametrize('H,kv_heads,T,D,alibi,extra', [
    (3, 3, 1, 32, False, 0), (3, 3, 100, 64, True, 0), (4, 2, 257, 32, True, 30), (2, 1, 129, 128, False, 3),
    (4, 4, 50, 24, False, 0)])
def test_both_ways_of_dq(poisoned, monkeypatch, dq, H, kv_heads, T, D, alibi, extra):
    """dQ added by atomics from the dK/dV kernel (FlashAttention-2's backward; the default), and by a
    kernel of its own (the default under torch.use_deterministic_algorithms): both against float64,
    and each launches only its own kernels."""
    monkeypatch.setattr(kc, 'DQ', dq)
    launched = launches(monkeypatch, lambda name, kwargs: name)
    q, k, v, do = inputs(2, H, T, D, torch.float32, seed=H * T + D, kv_heads=kv_heads)
    check('kernel', q, k, v, do, alibi_slopes(H), alibi_slopes(H) if alibi else None, T + extra)
    assert launched == ['fwd', 'preprocess', 'dkdv'] + (['dq'] if dq == 'separate' else [])


def launches(monkeypatch, what):
    """A list that gets what(name, kwargs) of each kernel launch from here on."""
    launched, launch = [], sk._launch

    def logged(name, *args, **kwargs):
        launched.append(what(name, kwargs))
        return launch(name, *args, **kwargs)
    monkeypatch.setattr(sk, '_launch', logged)
    return launched


@pytest.mark.parametrize('dq', ['atomic', 'separate'])
@pytest.mark.parametrize('H,kv_heads,T,D,alibi,sink', [
    (3, 3, 1, 32, False, False), (3, 3, 100, 64, True, False), (4, 2, 257, 32, False, True),
    (2, 1, 129, 128, True, False), (4, 4, 50, 24, False, False)])
@pytest.mark.skipif(DEVICE == 'cuda' or DRY_RUN, reason="on a GPU 16-bit inputs take the descriptors by "
                    "default (test_gpu.py's forced configurations run them); float32 never does")
def test_tensor_descriptors(poisoned, monkeypatch, dq, H, kv_heads, T, D, alibi, sink):
    """The forward and the dQ kernel reading Q, K, V and dO through tensor descriptors (TMA on Hopper;
    forced here, in the interpreter) against float64, output and gradients, dQ both ways (dK/dV reads
    through pointers); a layout TMA cannot take (rows not 16-byte aligned) falls back to pointers."""
    if kc.TensorDescriptor is None:
        pytest.skip('this Triton has no tensor descriptors')
    monkeypatch.setattr(kc, 'TMA', 'on')
    monkeypatch.setattr(kc, 'DQ', dq)
    launched = launches(monkeypatch, lambda name, kwargs: kwargs.get('TMA'))
    q, k, v, do = inputs(2, H, T, D, torch.float32, seed=H * T + D + 1, kv_heads=kv_heads)
    if sink:
        sinks = torch.randn(H, generator=torch.Generator().manual_seed(1))
        expected = run_with_sink(*(t.double() for t in (q, k, v, do)), sinks.double(), ref=True)
        for got, want in zip(run_with_sink(q, k, v, do, sinks), expected):
            assert rel_err(got, want) <= TOLERANCE[torch.float32]
    else:
        check('kernel', q, k, v, do, alibi_slopes(H), alibi_slopes(H) if alibi else None, T)
    # the preprocess and dK/dV kernels: no TMA setting
    assert launched == [True, None, None] + ([True] if dq == 'separate' else [])
    odd = torch.randn(2, H, T, D + 1)[..., 1:]  # rows start 4 bytes past alignment
    assert not kc.use_tma(odd, odd, odd) and kc.use_tma(q, k, v)


def run_with_sink(q, k, v, do, sinks, ref=False):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    gamma = alibi_slopes(q.size(1)).to(q.dtype)
    out = (stablemask_reference if ref else stablemask_attention)(q, k, v, gamma, sink=sinks)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def test_dq_is_deterministic_when_asked():
    """By default dQ comes by atomics; under torch.use_deterministic_algorithms(True) by its own kernel."""
    assert kc.DQ == 'auto' and not torch.are_deterministic_algorithms_enabled() and kc.atomic_dq()
    torch.use_deterministic_algorithms(True)
    try:
        assert not kc.atomic_dq()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
@pytest.mark.parametrize('T,gamma,offset,alibi,kv_heads', [
    (100, 'slopes', 0.0, False, None), (64, 'none', 0.0, True, None), (33, 'zero', -2.0, False, None),
    (257, 'slopes', 0.0, True, 2), (1, 'none', 0.0, False, None)])
def test_sink_logit_and_offset(poisoned, impl, T, gamma, offset, alibi, kv_heads):
    """A sink logit per head (a virtual key of value 0 in every row: gpt-oss's learned sinks, 0 for
    softmax off by one), alone or beside StableMask's pseudo mass, and a constant added to every
    pseudo score: the output and the gradients of q, k, v and the sink against float64 autograd."""
    H = 4
    q, k, v, do = inputs(2, H, T, 32, torch.float32, seed=T, kv_heads=kv_heads)
    sink = torch.tensor([-1.0, 0.0, 1.5, 3.0])
    results = []
    for name, dtype in ((impl, torch.float32), ('reference', torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, sink)]
        extra = lambda t: None if t is None else t.to(dtype)
        out = IMPLS[name](*leaves[:3], extra(gammas(gamma, H)), extra(alibi_slopes(H) if alibi else None), T,
                          offset=offset, sink=leaves[3])
        results.append((out, *torch.autograd.grad(out, leaves, do.to(dtype))))
    for what, x, ref in zip(('out', 'dq', 'dk', 'dv', 'dsink'), *results):
        assert x.shape == ref.shape and torch.isfinite(x).all(), what
        assert rel_err(x, ref) <= 1e-5, f"{impl} {what}: relative error {rel_err(x, ref):.2e}"


@pytest.mark.parametrize('T', [1, 17, 130])
@pytest.mark.parametrize('impl', ['kernel', 'sdpa'])
def test_pseudo_len_shorter_than_T(poisoned, impl, T):
    """Past the training length N (generation beyond block_size) rows i >= N-1 have no pseudo mass."""
    q, k, v, do = inputs(2, 3, T, 32, torch.float32, seed=T)
    check(impl, q, k, v, do, alibi_slopes(3), alibi_slopes(3), pseudo_len=max(1, T // 2))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
@pytest.mark.parametrize('T,alibi', [(100, False), (257, True)])
def test_low_precision(poisoned, impl, dtype, T, alibi):
    if impl == 'kernel' and dtype == torch.bfloat16 and DEVICE == 'cpu' and not DRY_RUN:
        pytest.skip("Triton's interpreter multiplies bf16 wrongly in tl.dot; bf16 is checked on a GPU")
    q, k, v, do = inputs(2, 3, T, 64, dtype, seed=T)
    check(impl, q, k, v, do, alibi_slopes(3), alibi_slopes(3) if alibi else None)


def low_precision_reference(q, k, v, gamma, alibi):
    """StableMask as PyTorch computes attention in q's dtype (float16 or bfloat16): scores, softmax and
    products rounded to that dtype, each row's pseudo mass a virtual key of logit log S_i and value 0
    (README, The method), dropped after the softmax."""
    B, H, T, D = q.shape
    k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(T, device=q.device)[None, :]
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(D))
    if alibi is not None:
        s = s + (alibi.view(-1, 1, 1) * (j - i)).to(q.dtype)
    s = s.masked_fill(j > i, -math.inf)
    virtual = log_pseudo_mass(gamma, torch.arange(T), T).to(q.device, q.dtype).view(1, H, T, 1)
    return torch.softmax(torch.cat([s, virtual.expand(B, H, T, 1)], dim=-1), dim=-1)[..., :T] @ v


LOW_PRECISION = [  # B, H, K/V heads, T, head dim, scale of q and k (10: near one-hot rows), ALiBi, dQ
    (2, 4, 2, 3, 16, 10, False, 'atomic'), (2, 4, 2, 3, 64, 10, True, 'separate'),
    (2, 4, 1, 3, 128, 10, False, 'atomic'), (2, 4, 2, 40, 64, 10, False, 'atomic'),
    (2, 4, 2, 100, 64, 1, True, 'atomic'), (2, 3, 3, 257, 128, 1, False, 'separate')]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('case', LOW_PRECISION, ids=lambda c: f"T{c[3]}-D{c[4]}-x{c[5]}-{c[7]}")
def test_low_precision_within_3x_of_pytorch(poisoned, monkeypatch, dtype, case):
    """FlashAttention's criterion: in float16 and bfloat16 the kernel's error (output and every
    gradient) is at most 3x the error of the same attention computed by PyTorch in that dtype, both
    against float64 (plus FlashAttention's floor, float32's rounding at 0.3, for gradients near zero),
    over near one-hot rows (q and k scaled by 10, where dP - Delta cancels to almost nothing) and
    ordinary ones, grouped-query attention, both ways of summing dQ; 3 seeds for the short rows."""
    # (a dry run's kernels are only logged)
    if dtype == torch.bfloat16 and DEVICE == 'cpu' and not DRY_RUN:
        pytest.skip("Triton's interpreter multiplies bf16 wrongly in tl.dot; bf16 is checked on a GPU")
    B, H, kv_heads, T, D, scale, alibi, dq = case
    monkeypatch.setattr(kc, 'DQ', dq)
    gamma, slopes = alibi_slopes(H).to(DEVICE), alibi_slopes(H).to(DEVICE) if alibi else None
    for seed in range(3 if T <= 3 else 1):
        g = torch.Generator().manual_seed(seed)
        q, k, v, do = (torch.randn(B, H if i in (0, 3) else kv_heads, T, D, generator=g) for i in range(4))
        q, k, v, do = (t.to(DEVICE, dtype) for t in (q * scale, k * scale, v, do))
        ref = float64_reference(q, k, v, do, gamma, slopes, None)
        low = run_leaves(low_precision_reference, q, k, v, do, gamma, slopes)
        got = run('kernel', q, k, v, do, gamma, slopes, None)
        for name, x, pytorch, r in zip(('out', 'dq', 'dk', 'dv'), got, low, ref):
            ours, theirs, floor = rel_err(x, r), rel_err(pytorch, r), 2 * rel_err(r.float() + 0.3 - 0.3, r)
            assert ours <= 3 * theirs + floor, f"seed {seed} {name}: {ours:.2e}, PyTorch's {theirs:.2e}"


def run_leaves(fn, q, k, v, do, *args):
    """fn(q, k, v, *args) and its gradients of q, k, v, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, *args)
    return (out, *torch.autograd.grad(out, leaves, do))


def test_float32_output_only_where_a_gradient_will_be_taken(monkeypatch):
    """The forward keeps O in float32 for the backward (above) only where a gradient will be taken:
    under torch.no_grad(), or when no input requires a gradient, its third output is empty; when q
    or only the sink logit requires one, it is O unrounded, in O's layout. The operator's shape
    function (for torch.compile) gives the same outputs as the kernel, both ways. (Every call has a
    sink logit, so that on a GPU they compile one kernel each way.)"""
    outputs, forward = [], sk._attention_forward
    monkeypatch.setattr(sk, '_attention_forward', lambda *a: outputs.append(forward(*a)) or outputs[-1])
    q, k, v, _ = inputs(2, 3, 40, 32, torch.float16)
    gamma, sink = alibi_slopes(3).to(DEVICE), torch.zeros(3, device=DEVICE)
    with torch.no_grad():
        stablemask_attention(q.requires_grad_(), k, v, gamma, sink=sink)
    stablemask_attention(q.detach(), k, v, gamma, sink=sink)
    stablemask_attention(q.detach(), k, v, gamma, sink=sink.requires_grad_())
    stablemask_attention(q, k, v, gamma, sink=sink.detach())
    assert [o32.shape for _, _, o32 in outputs] == [(0,), (0,), q.shape, q.shape]
    for o, _, o32 in outputs[2:]:
        assert o32.dtype == torch.float32 and o32.stride() == o.stride() and torch.equal(o32.half(), o)
    for keep_o32 in (False, True):
        args = (q.detach(), k, v, gamma, None, sink.detach(), 40, 32 ** -0.5, 0.0, True, keep_o32)
        torch.library.opcheck(forward, args, test_utils='test_faketensor')

@pytest.mark.parametrize('gamma', [1e-8, 1e-3, 0.0, 50.0, 1e4])
@pytest.mark.parametrize('impl', ['kernel', 'sdpa'])
def test_extreme_gamma(poisoned, impl, gamma):
    """The closed form's edges: tiny decays (where 1 - exp(-x) cancels), zero, and decays so large
    that the pseudo mass underflows. The reference builds the pseudo scores directly, not the closed
    form."""
    q, k, v, do = inputs(2, 2, 70, 32, torch.float32, seed=1)
    check(impl, q, k, v, do, torch.full((2,), gamma), pseudo_len=90)


@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
def test_no_pseudo_mass_is_causal_sdpa(impl):
    """gamma=None is plain causal attention: PyTorch's own is the judge."""
    q, k, v, do = inputs(2, 3, 77, 64, torch.float32, seed=3)
    out, *grads = run(impl, q, k, v, do, None, None, None)
    expected = run_torch_causal(q, k, v, do)
    for x, ref in zip((out, *grads), expected):
        assert rel_err(x, ref) <= 1e-5


def run_torch_causal(q, k, v, do):
    q, k, v = (t.double().detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return (out, *torch.autograd.grad(out, (q, k, v), do.double()))


def test_closed_form_pseudo_mass():
    """log S_i in closed form against the sum it replaces, in float64, for every row."""
    T, N = 40, 64
    gamma = torch.tensor([0.0, 1e-7, 0.01, 0.5, 3.0], dtype=torch.float64)
    got = log_pseudo_mass(gamma, torch.arange(T), N)
    j = torch.arange(N, dtype=torch.float64)
    for h, g in enumerate(gamma):
        for i in range(T):
            expected = torch.logsumexp(-j[i + 1:] * g, dim=0)
            assert torch.isclose(got[h, i], expected, rtol=1e-10, atol=0), (g.item(), i)
    assert got.dtype == torch.float64
    # no mass at the end
    assert torch.isneginf(log_pseudo_mass(gamma, torch.tensor([N - 1, N + 5]), N)).all()


@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
def test_absolute_position_from_identical_inputs(impl):
    """README, The method: with every logit equal and every value v, a StableMask head outputs
    (i+1)e^a / ((i+1)e^a + S_i) * v, rising with position i; a causal head outputs v everywhere."""
    T, D = 50, 32
    token = torch.randn(D)
    token = token / token.norm()  # a small logit a, so the pseudo share stays visible along the row
    q = k = v = token.expand(1, 1, T, D).contiguous().to(DEVICE)
    for gamma in (torch.tensor([0.0]), torch.tensor([0.1])):
        out = IMPLS[impl](q, k, v, gamma.to(DEVICE), None, None)[0, 0].cpu()
        share = out @ token / token.dot(token)  # the share of attention on real keys, per row
        a = token.dot(token) / math.sqrt(D)
        i = torch.arange(T, dtype=torch.float64)
        mass = torch.exp(log_pseudo_mass(gamma.double(), i.long(), T)[0])
        expected = (i + 1) * torch.exp(a) / ((i + 1) * torch.exp(a) + mass)
        torch.testing.assert_close(share.double(), expected, rtol=1e-4, atol=1e-5)
        assert (share.diff() > 0).all()  # each position reads differently: absolute position is visible
    causal = IMPLS[impl](q, k, v, None, None, None)[0, 0].cpu()
    torch.testing.assert_close(causal, token.expand(T, D), rtol=1e-5, atol=1e-5)


def test_kernel_strided_inputs(poisoned):
    """q, k, v as the model makes them: views into one fused projection, heads not contiguous."""
    B, T, H, D = 2, 45, 3, 32
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(DEVICE)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    # a gradient in the output's layout
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)
    check('kernel', q, k, v, do, alibi_slopes(H), alibi_slopes(H))


# a view of a leaf of another shape: (B, H, T, D) with the strides under test: the last dim not
# contiguous, every other element, one batch element (stride 0)
LAYOUTS = {
    'transposed': (lambda B, H, T, D: (B, H, D, T), lambda t: t.transpose(-1, -2)),
    'sliced': (lambda B, H, T, D: (B, H, T, 2 * D), lambda t: t[..., ::2]),
    'expanded': (lambda B, H, T, D: (1, H, T, D), lambda t: t.expand(2, -1, -1, -1)),
}


@pytest.mark.parametrize('impl', ['kernel', 'sdpa', 'reference'])
@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_every_entry_point_takes_any_strides(poisoned, impl, layout):
    """Transposed, sliced and expanded q, k, v give what contiguous ones do (output, and gradients of
    the tensors they are views of), against float64."""
    B, H, T, D = 2, 3, 37, 16
    shape, view = LAYOUTS[layout]
    g = torch.Generator().manual_seed(11)
    leaves = [torch.randn(shape(B, H, T, D), generator=g).to(DEVICE) for _ in range(3)]
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    gamma, alibi = alibi_slopes(H).to(DEVICE), alibi_slopes(H).to(DEVICE)
    results = []
    for dtype in (torch.float32, torch.float64):
        bases = [t.to(dtype).requires_grad_() for t in leaves]
        fn = IMPLS[impl] if dtype == torch.float32 else stablemask_reference
        out = fn(*(view(t) for t in bases), gamma.to(dtype), alibi.to(dtype))
        results.append([out, *torch.autograd.grad(out, bases, do.to(dtype))])
    for name, x, ref in zip(('out', 'dq', 'dk', 'dv'), *results):
        err = rel_err(x, ref)
        assert err <= TOLERANCE[torch.float32], f"{impl} {layout} {name}: relative error {err:.2e}"


def test_kernel_rejects_bad_input():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match='H a multiple of H_kv'):
        stablemask_attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match='H a multiple of H_kv'):
        # 3 query heads cannot share 2 K/V heads
        stablemask_attention(torch.randn(1, 3, 8, 16, device=DEVICE), q, q)
    with pytest.raises(ValueError, match='dtype'):
        stablemask_attention(q, q.half(), q)
    with pytest.raises(ValueError, match='above'):
        big = torch.randn(1, 1, 8, 256, device=DEVICE)
        stablemask_attention(big, big, big)
    with pytest.raises(ValueError, match='one value per head'):
        stablemask_attention(q, q, q, gamma=torch.ones(3))
    out = stablemask_attention(q, q, q, gamma=0.25)  # a float means that decay for every head
    torch.testing.assert_close(out, stablemask_attention(q, q, q, gamma=torch.full((2,), 0.25)))


# ---------------------------------------------------------------------------------------------------
# what a CPU can prove of the GPU paths


@pytest.mark.parametrize('device_type,dtype,D,bias,capability,expected', [
    ('cpu', torch.float32, 20, True, None, ('cpu', 20)),
    ('cuda', torch.bfloat16, 128, False, (9, 0), ('cudnn', 128)),     # Hopper: cuDNN's
    ('cuda', torch.bfloat16, 128, False, (8, 0), ('flash', 128)),     # Ampere: flash
    ('cuda', torch.bfloat16, 160, False, (9, 0), ('flash', 160)),     # past cuDNN's 128
    ('cuda', torch.float16, 20, False, (9, 0), ('cudnn', 24)),        # padded to a multiple of 8
    ('cuda', torch.float16, 20, False, (8, 0), ('flash', 24)),
    ('cuda', torch.bfloat16, 64, True, (9, 0), ('efficient', 64)),    # a bias: ALiBi or a window
    ('cuda', torch.float32, 36, False, (9, 0), ('efficient', 40)),    # flash has no float32
    ('cuda', torch.bfloat16, 288, False, (9, 0), ('efficient', 288)),  # past flash's 256
    ('cuda', torch.float16, 64, False, (7, 5), ('efficient', 64)),    # flash needs sm80
])
def test_fused_kernel_dispatch(device_type, dtype, D, bias, capability, expected):
    assert fused_kernel(device_type, dtype, D, bias, capability) == expected


@pytest.mark.parametrize('alibi', [False, True])
def test_sdpa_pads_head_dims_the_fused_kernels_lack(poisoned, monkeypatch, alibi):
    """CUDA's fused kernels want head dims in multiples of 8: the sdpa path zero-pads q, k, v and
    keeps the scale of the real head dim. Forced here on the CPU kernel, against float64."""
    monkeypatch.setattr(sdpa_module, 'fused_kernel',
                        lambda device_type, dtype, D, has_bias, capability: ('cpu', -(-D // 8) * 8 + 8))
    q, k, v, do = inputs(2, 3, 45, 20, torch.float32, seed=5)
    check('sdpa', q, k, v, do, alibi_slopes(3), alibi_slopes(3) if alibi else None)


@pytest.mark.parametrize('kind,D,width,bias', [
    ('cudnn', 64, 64, False), ('cudnn', 20, 24, False), ('flash', 64, 64, False), ('flash', 20, 24, False),
    ('efficient', 20, 24, False), ('efficient', 36, 40, True)])
def test_cuda_branches_run_on_meta_tensors(monkeypatch, kind, D, width, bias):
    """The CUDA branches' calls into aten (arguments, output shapes, padding, the log-sum-exp that the
    memory-efficient kernel pads), forward and backward, on shape-only tensors: a CPU checks the
    plumbing that only a GPU can run."""
    monkeypatch.setattr(sdpa_module, 'fused_kernel', lambda *args: (kind, width))
    H, T = 3, 17
    q, k, v = (torch.empty(2, H, T, D, device='meta', dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    log_mass = log_pseudo_mass(alibi_slopes(H), torch.arange(T), T).to('meta')
    mask = attention_bias(alibi_slopes(H).to('meta'), None, T, T, torch.bfloat16, 'meta') if bias else None
    out = StableMaskSDPA.apply(q, k, v, log_mass, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    assert out.shape == q.shape and all(g.shape == q.shape for g in grads)


INT64_OFFSETS = r'''
import torch
from model import alibi_slopes, stablemask_reference
from stablemask_kernel import stablemask_attention
B, H, T, D, stride = 1, 2, 40, 16, 2 ** 26  # row 39 sits 2.6e9 elements in: past int32
n = (T - 1) * stride + H * D
g = torch.Generator().manual_seed(0)
q, k, v = (torch.empty(n, dtype=torch.float16).as_strided((B, H, T, D), (n, D, stride, 1)) for _ in range(3))
for t in (q, k, v):
    t.copy_(torch.randn(B, H, T, D, generator=g))  # only these rows are touched: memory stays small
# from here torch.empty fills with NaN: unwritten output shows
torch.use_deterministic_algorithms(True, warn_only=True)
do = torch.randn(B, H, T, D, generator=g).half()
leaves = [t.detach().requires_grad_() for t in (q, k, v)]
got = [stablemask_attention(*leaves, alibi_slopes(H))]
got += torch.autograd.grad(got[0], leaves, do)
dl = [t.detach().double().requires_grad_() for t in (q, k, v)]
ref = [stablemask_reference(*dl, alibi_slopes(H).double())]
ref += torch.autograd.grad(ref[0], dl, do.double())
errs = [((x.double() - r).norm() / r.norm()).item() for x, r in zip(got, ref)]
assert max(errs) < 5e-3, errs
print('ok', errs)
'''


@pytest.mark.skipif(DEVICE == 'cuda' or DRY_RUN,
                    reason='the interpreter reads a sparse allocation; on a GPU 16 GB would be real')
def test_offsets_past_int32():
    """Row offsets (row x stride) past 2^31 elements: with int32 arithmetic the kernel reads and writes
    elsewhere (the interpreter segfaults), so the check runs in a process of its own."""
    import sys
    result = run_command([sys.executable, '-c', INT64_OFFSETS], cwd=REPO)
    assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize('dq', ['atomic', 'separate'])
def test_autotuning_once_per_length_bucket(monkeypatch, dq):
    """The autotuner keys on a length bucket (the next power of two), not on T: lengths 20 to 64 tune
    once, 65 to 128 once more. Triton's own autotuner, run in the interpreter with a stub benchmark;
    with dQ by atomics the dQ kernel never runs, and each timed run of dK/dV finds dQ's sums zeroed
    (else they would count every config tried). Every config is timed, whatever STABLEMASK_AUTOTUNE
    says (gpu_check.py's correctness steps set it to 'first')."""
    monkeypatch.setattr(kc, 'DQ', dq)
    monkeypatch.setattr(kc, 'AUTOTUNE', 'full')
    tunings = []

    def stub_bench(kernel_call, quantiles=None):
        kernel_call()
        tunings.append(1)
        return [1.0, 1.0, 1.0]
    small = dict(fwd=[(32, 16, 4, 1), (16, 16, 4, 1)], dkdv=[(16, 32, 4, 1), (16, 16, 4, 1)],
                 dq=[(32, 16, 4, 1), (16, 16, 4, 1)])
    monkeypatch.setattr(kc, 'CONFIGS', {**kc.CONFIGS, **{(name, 32, 64): c for name, c in small.items()}})
    tuned = {name: kc.autotuned(fn, name, do_bench=stub_bench)
             for name, fn in (('fwd', sk._attn_fwd), ('dkdv', sk._attn_bwd_dkdv), ('dq', sk._attn_bwd_dq))}
    monkeypatch.setattr(sk, '_kernels', {**sk._kernels, **tuned})
    counts = []
    for T in (20, 33, 50, 64, 65, 100, 128):
        q, k, v, do = inputs(1, 2, T, 16, torch.float32, seed=T)
        check('kernel', q, k, v, do, alibi_slopes(2))
        counts.append(len(tuned['fwd'].cache))
    if DRY_RUN:
        pytest.skip('gpu_check.py --dry_run: launches logged, counted; the autotuner runs where kernels do')
    assert counts == [1, 1, 1, 1, 2, 2, 2]
    kernels = 2 if dq == 'atomic' else 3
    assert [len(t.cache) for t in tuned.values()] == [2, 2, 2 if dq == 'separate' else 0]
    assert len(tunings) == 2 * kernels * 2  # buckets x kernels x configs
    assert [kc.length_bucket(T) for T in (1, 64, 65, 4096, 4097)] == [64, 64, 128, 4096, 8192]


def test_autotuner_times_what_fits_the_gpu(monkeypatch):
    """The autotuner times configs_for's configurations in their order, all of which fit Hopper (the
    limit off a GPU); on a GPU with less shared memory those that fit, or at least the smallest; with
    STABLEMASK_AUTOTUNE=first only the first of them, untimed."""
    monkeypatch.setattr(kc, 'AUTOTUNE', 'full')  # a user's run's (gpu_check.py's correctness steps: 'first')
    assert kc.shared_memory_limit(torch.device('cpu')) == kc.SHARED_MEMORY
    tuples = lambda configs: [kc.config_tuple(c) for c in configs]
    for name, tiles in kc.TILES.items():
        for dtype, D in ((torch.float32, 128), (torch.bfloat16, 128), (torch.float16, 64),
                         (torch.bfloat16, 32)):
            q = torch.empty(0, dtype=dtype)
            every = kc.configs_for(name, dtype, D)
            assert tuples(kc.candidates(name, q, D)) == tuples(every) and every
            size = lambda c: kc.shared_memory(c, *tiles, D, dtype.itemsize)
            with monkeypatch.context() as m:
                m.setattr(kc, 'shared_memory_limit', lambda device: 48 * 1024)
                fitting = tuples(kc.candidates(name, q, D))
                smallest = tuples([min(every, key=size)])
                assert fitting == tuples([c for c in every if size(c) <= 48 * 1024]) or fitting == smallest
                m.setattr(kc, 'AUTOTUNE', 'first')
                assert tuples(kc.candidates(name, q, D)) == fitting[:1]


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['sdpa', 'triton'])
def test_torch_compile_fullgraph(impl):
    """torch.compile(model, fullgraph=True) traces both fast paths in one graph (the kernel is a custom
    operator it calls, not code it must trace) and gives the eager logits and gradients."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=32, attn_impl=impl,
                       pos_enc='alibi')
    gpt = GPT(config).to(DEVICE)
    idx = torch.randint(0, 50, (2, 24), device=DEVICE)
    results = []
    for run in (gpt, torch.compile(gpt, fullgraph=True)):
        gpt.zero_grad()
        logits, loss = run(idx, idx)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in gpt.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for g, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


GPU_MACHINE_TRITON = '3.6'  # the Triton of the GPU machine this project is lent (README, Checking on a GPU)
# ahead-of-time compiles for Hopper (sm_90) without a GPU, in a process of their own (the interpreter off)
HOPPER_TOOLS = r'''
import os, re, subprocess, sys, tempfile
os.environ['TRITON_INTERPRET'] = '0'  # compile for a GPU that is not here
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernel_configs as kc
import stablemask_kernel as sk

def compile_for_hopper(fn, dtype, config, fp32=(), **constexprs):
    # fp32: pointers to float32 whatever the inputs' dtype (the forward's float32 O, read by the backward)
    constexprs.update(config.kwargs)
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = 'constexpr'
        elif constexprs.get('TMA') and name in ('Q', 'K', 'V', 'DO'):
            # tensor descriptors of (B, H, T, D), a tile of rows each
            rows = constexprs['BLOCK_M' if name in ('Q', 'DO') else 'BLOCK_N']
            types[name] = f"tensordesc<{dtype}[1,1,{rows},{constexprs['HEAD_DIM']}]>"
        elif name in ('sm_scale', 'offset'):
            types[name] = 'fp32'
        elif name in ('LSE', 'Gamma', 'Alibi', 'Delta', 'Sink', 'DQ_ACC', 'Out32', *fp32):
            types[name] = '*fp32'
        elif name in ('T', 'H', 'pseudo_len', 'T_BUCKET') or name.startswith('stride'):
            types[name] = 'i32'
        else:
            types[name] = '*' + dtype
    # what a launch tells the compiler about 16-aligned pointers and strides, which lets it pipeline loads
    attrs = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(fn.arg_names)
             if types[name][0] == '*' or name.startswith('stride')}
    src = ASTSource(fn=fn, signature=types, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options=options)

def memory_ordering(compiled):
    # the global atomics and fences, in the PTX and in the SASS ptxas made of it (Triton ships cuobjdump)
    from triton.tools.disasm import get_sass
    ptx, sass = compiled.asm['ptx'], get_sass(compiled.asm['cubin'])
    count = lambda pattern, text: len(re.findall(pattern, text))
    atomics = r'\b(?:atom|red)\.global'
    return {'ptx atomics': count(atomics, ptx), 'ptx acq_rel': ptx.count('acq_rel'),
            'ptx relaxed': count(atomics + r'[\w.]*\.relaxed', ptx), 'ATOMG': count(r'\bATOMG\.', sass),
            'REDG': count(r'\bREDG\.', sass),
            'MEMBAR GPU': count(r'\bMEMBAR\.[\w.]*GPU', sass), 'CCTL.IVALL': sass.count('CCTL.IVALL')}
'''
HOPPER_COMPILE = f'GPU_MACHINE_TRITON = {GPU_MACHINE_TRITON!r}' + HOPPER_TOOLS + r'''
from concurrent.futures import ProcessPoolExecutor
from triton.backends.nvidia.compiler import get_ptxas

# the autotuners: keys name real arguments, blocks tile the diagonal
for kernel in (sk._kernels[name] for name in kc.TUNE_KEYS):
    keys = set(kernel.keys)
    assert keys <= set(kernel.fn.arg_names) and 'T_BUCKET' in keys and 'T' not in keys, keys
assert {'HAS_PSEUDO', 'HAS_SINK'} <= set(sk._kernels['fwd'].keys)
for (name, _, _), choices in kc.CONFIGS.items():
    for m, n, _, _ in choices:
        assert (n % m if name == 'dkdv' else m % n) == 0, (name, m, n)
KERNELS = dict(fwd=sk._attn_fwd, dkdv=sk._attn_bwd_dkdv, dq=sk._attn_bwd_dq, preprocess=sk._bwd_preprocess)

def spill_stores(compiled):
    # what ptxas reports of the PTX Triton made: the bytes of registers it had to store to local memory
    with tempfile.NamedTemporaryFile('w', suffix='.ptx') as f:
        f.write(compiled.asm['ptx'])
        f.flush()
        command = [get_ptxas(90).path, '-arch=sm_90a', '-v', f.name, '-o', os.devnull]
        out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    return sum(int(n) for n in re.findall(r'(\d+) bytes spill stores', out.stdout + out.stderr))

def check(job):
    name, dtype, D, group, choice, tma = job
    config = kc.triton_configs([choice])[0]
    size = 4 if dtype == 'fp32' else 2
    # the heaviest variant of each kernel, with pointers and (16-bit, Hopper's default) tensor descriptors
    heaviest = dict(fwd=dict(HAS_PSEUDO=True, HAS_SINK=True, KEEP_O32=True), dkdv=dict(ATOMIC_DQ=True))
    extra = heaviest.get(name, {})
    if name != 'dkdv':  # which reads through pointers only
        extra['TMA'] = tma
    compiled = compile_for_hopper(KERNELS[name], dtype, config, HEAD_DIM=D, HAS_ALIBI=True,
                                  PRECISION='tf32x3' if dtype == 'fp32' else 'tf32', GROUP=group, **extra)
    estimate = kc.shared_memory(config, *kc.TILES[name], D, size, dq_sums=name == 'dkdv')
    problems = []
    # the estimate is the compiler's layout for Hopper's MMA, an upper bound for float32's
    used = compiled.metadata.shared
    # dQ's sums: the compiler overlaps dS's transpose with other buffers
    slack = 10240 if name == 'dkdv' else 2048
    if used > kc.SHARED_MEMORY or used > estimate + 2048 or (dtype != 'fp32' and estimate - used > slack):
        problems.append(f"shared memory {used}, estimated {estimate}")
    spilled = spill_stores(compiled)
    if spilled:
        problems.append(f"{spilled} bytes of spill stores")
    if 'nvidia_mma' not in compiled.asm['ttgir']:  # tensor cores, float32 included (tf32x3)
        problems.append('no tensor-core MMA')
    # Hopper's own, for the 16-bit tiles
    if dtype != 'fp32' and 'warp_group_dot' not in compiled.asm['ttgir']:
        problems.append('no warp-group MMA')
    copies = 'async_tma_copy' if tma else 'async_copy'
    if dtype == 'bf16' and (name == 'fwd' or tma) and copies not in compiled.asm['ttgir']:
        problems.append('no pipelined asynchronous copies' + ' by TMA' * tma)
    ordering = memory_ordering(compiled) if name == 'dkdv' else {}
    if ordering and (ordering['ATOMG'] or ordering['MEMBAR GPU'] or ordering['CCTL.IVALL']):
        problems.append(f"dQ's sums as atomics with fences: {ordering}")
    what = f"{name} {dtype} head dim {D} group {group} {choice}{' TMA' * tma}"
    return f"{what}: {'; '.join(problems)}" if problems else None

# every configuration the autotuner can keep, for each dtype it serves, at group 1 and (bf16, fp32) 4;
# fp16, whose instructions are bf16's on another type, under the GPU machine's Triton (CI's second pass)
halves = ('bf16', 'fp16') if triton.__version__.startswith(GPU_MACHINE_TRITON) else ('bf16',)
jobs = [(name, dtype, D, group, choice, tma) for (name, bits, D), choices in kc.CONFIGS.items()
        for choice in choices for dtype in (halves if bits == 16 else ('fp32',))
        for group in ((1, 4) if dtype != 'fp16' else (1,))
        for tma in ((False, True) if bits == 16 and name != 'dkdv' else (False,))]
with ProcessPoolExecutor(int(sys.argv[1])) as pool:
    problems = [p for p in pool.map(check, jobs) if p]
compile_for_hopper(sk._bwd_preprocess, 'bf16', triton.Config({'BLOCK_M': 64}), fp32=('O',), HEAD_DIM=128)
assert not problems, chr(10).join(problems)
print(f'compiled {len(jobs)}')
'''


@pytest.mark.skipif(DEVICE == 'cuda' or DRY_RUN,
                    reason='on a GPU the kernels are compiled and run by the tests above')
@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """The interpreter does not compile the kernels, so without a GPU this is the check that every
    configuration the autotuner can keep compiles for Hopper (sm_90) with no register spills and
    within its shared memory (the estimate the autotuner prunes by is the compiler's), on tensor
    cores (float32 through tf32x3), for each dtype, head dims 64 and 128, and grouped-query
    attention; and that the autotuning set-up a GPU uses is sound."""
    result = compile_ahead_of_time(HOPPER_COMPILE, str(os.cpu_count() or 1))
    assert result.returncode == 0 and 'compiled' in result.stdout, result.stderr[-3000:]


def compile_ahead_of_time(script, *args):
    """Run one of the scripts above in a Python of its own, in a process group of its own (its pool's
    workers end with it, at the hang guard too). Skipped where this Triton cannot compile ahead of
    time."""
    import sys
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({e})")
    env = {**os.environ, 'TRITON_DEFAULT_FP_FUSION': '1'}
    return run_command([sys.executable, '-c', script, *args], cwd=REPO, env=env)


DQ_SUMS = HOPPER_TOOLS + r'''
import json
for D in (64, 128):
    config = kc.triton_configs(kc.CONFIGS['dkdv', 16, D][:1])[0]
    compiled = compile_for_hopper(sk._attn_bwd_dkdv, 'bf16', config, HEAD_DIM=D, HAS_ALIBI=False,
                                  PRECISION='tf32', GROUP=1, ATOMIC_DQ=True)
    print(json.dumps(memory_ordering(compiled)))
'''


@pytest.mark.skipif(DEVICE == 'cuda' or DRY_RUN, reason='compiled ahead of time where no GPU compiles it')
def test_dq_sums_are_reductions_without_fences():
    """The dK/dV kernel adds dQ's sums with relaxed atomics: nothing reads a sum before the kernel
    ends, so no fence need order them. Compiled for sm_90 (its first configuration at head dims 64 and
    128), they are plain reductions (SASS REDG), with no GPU-wide fence (MEMBAR ... GPU)
    nor L1 invalidation (CCTL.IVALL) around them, which the default acq_rel put around each one. (The
    PTX says red under Triton 3.9, atom under 3.6: ptxas makes reductions of atomics nothing reads.)"""
    result = compile_ahead_of_time(DQ_SUMS)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.splitlines():
        counts = json.loads(line)
        assert counts['ptx atomics'] == counts['ptx relaxed'] > 0 and counts['ptx acq_rel'] == 0, counts
        assert counts['REDG'] > 0, counts
        assert counts['ATOMG'] == counts['MEMBAR GPU'] == counts['CCTL.IVALL'] == 0, counts
    assert len(result.stdout.splitlines()) == 2
