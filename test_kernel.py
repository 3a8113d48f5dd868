"""
How the StableMask attention implementations are checked.

Three implementations of one function: model.stablemask_reference (the paper's Eq. 11, materialised),
model.stablemask_sdpa (PyTorch's fused attention with the log-sum-exp corrected) and
stablemask_kernel.stablemask_attention (the fused Triton kernel). Each is compared, output and all
three gradients, with the reference run in float64 on the same random inputs, by relative error
||x - ref|| / ||ref||. On a CPU the kernel runs in Triton's interpreter; on a GPU natively, and only
there in bfloat16 (the interpreter's bf16 tl.dot is wrong).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import alibi_slopes, log_pseudo_mass, stablemask_reference, stablemask_sdpa
from stablemask_kernel import stablemask_attention

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
IMPLS = {'kernel': stablemask_attention, 'sdpa': stablemask_sdpa, 'reference': stablemask_reference}


def rel_err(x, ref):
    """||x - ref|| / ||ref||; the absolute error where ref is exactly zero (the gradient of q at T = 1)."""
    err = (x.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return err / scale if scale > 0 else err


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor made by torch.empty / empty_like starts as NaN, so an element a kernel forgets to
    write shows in the comparison instead of passing by chance as stale memory."""
    for name in ('empty', 'empty_like'):
        make = getattr(torch, name)

        def poisoned_make(*args, _make=make, **kwargs):
            t = _make(*args, **kwargs)
            return t.fill_(math.nan) if t.is_floating_point() else t
        monkeypatch.setattr(torch, name, poisoned_make)


def inputs(B, H, T, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(4))
    return q, k, v, do


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
        assert x.shape == ref.shape and x.dtype == q.dtype, name
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
    if impl == 'kernel' and dtype == torch.bfloat16 and DEVICE == 'cpu':
        pytest.skip("Triton's interpreter multiplies bf16 wrongly in tl.dot; bf16 is checked on a GPU")
    q, k, v, do = inputs(2, 3, T, 64, dtype, seed=T)
    check(impl, q, k, v, do, alibi_slopes(3), alibi_slopes(3) if alibi else None)


@pytest.mark.parametrize('gamma', [1e-8, 1e-3, 0.0, 50.0, 1e4])
@pytest.mark.parametrize('impl', ['kernel', 'sdpa'])
def test_extreme_gamma(poisoned, impl, gamma):
    """The closed form's edges: tiny decays (where 1 - exp(-x) cancels), zero, and decays so large
    that the pseudo mass underflows. The reference builds the pseudo scores directly, not the closed form."""
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
    assert torch.isneginf(log_pseudo_mass(gamma, torch.tensor([N - 1, N + 5]), N)).all()  # no mass at the end


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
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)  # a gradient in the output's layout
    check('kernel', q, k, v, do, alibi_slopes(H), alibi_slopes(H))


def test_kernel_rejects_bad_input():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match='share one shape'):
        stablemask_attention(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match='dtype'):
        stablemask_attention(q, q.half(), q)
    with pytest.raises(ValueError, match='above'):
        big = torch.randn(1, 1, 8, 256, device=DEVICE)
        stablemask_attention(big, big, big)
    with pytest.raises(ValueError, match='one value per head'):
        stablemask_attention(q, q, q, gamma=torch.ones(3))
    out = stablemask_attention(q, q, q, gamma=0.25)  # a float means that decay for every head
    torch.testing.assert_close(out, stablemask_attention(q, q, q, gamma=torch.full((2,), 0.25)))


HOPPER_COMPILE = r'''
import os
os.environ['TRITON_INTERPRET'] = '0'  # compile for a GPU that is not here
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import stablemask_kernel as sk

for kernel in sk._kernels.values():  # the autotuners: keys name real arguments, blocks tile the diagonal
    assert set(kernel.keys) <= set(kernel.fn.arg_names), kernel.keys
for m, n, _, _ in sk._FWD_CONFIGS + sk._DQ_CONFIGS:
    assert m % n == 0
for m, n, _, _ in sk._DKDV_CONFIGS:
    assert n % m == 0

def compile_for_hopper(fn, dtype, **constexprs):
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = 'constexpr'
        elif name == 'sm_scale':
            types[name] = 'fp32'
        elif name in ('LSE', 'Gamma', 'Alibi', 'Delta'):
            types[name] = '*fp32'
        elif name in ('T', 'H', 'pseudo_len') or name.startswith('stride'):
            types[name] = 'i32'
        else:
            types[name] = '*' + dtype
    # what a launch tells the compiler about 16-aligned pointers and strides, which lets it pipeline loads
    attrs = {(i,): [['tt.divisibility', 16]] for i, name in enumerate(fn.arg_names) if types[name][0] == '*' or name.startswith('stride')}
    src = ASTSource(fn=fn, signature=types, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=8, num_stages=3))

for dtype, precision in (('bf16', 'tf32'), ('fp32', 'ieee')):
    common = dict(HEAD_DIM=128 if dtype == 'bf16' else 64, HAS_ALIBI=True, PRECISION=precision)
    fwd = compile_for_hopper(sk._attn_fwd, dtype, BLOCK_M=128, BLOCK_N=64, HAS_PSEUDO=True, **common)
    compile_for_hopper(sk._attn_bwd_dkdv, dtype, BLOCK_M=32, BLOCK_N=128, **common)
    compile_for_hopper(sk._attn_bwd_dq, dtype, BLOCK_M=128, BLOCK_N=32, **common)
    if dtype == 'bf16':  # Hopper's warp-group MMA, fed by pipelined asynchronous copies
        assert 'warp_group_dot' in fwd.asm['ttgir'] and 'async_copy' in fwd.asm['ttgir']
compile_for_hopper(sk._bwd_preprocess, 'bf16', HEAD_DIM=128, BLOCK_M=64)
print('compiled')
'''


@pytest.mark.skipif(DEVICE == 'cuda', reason='on a GPU the kernels are compiled and run by the tests above')
def test_kernels_compile_for_hopper():
    """The interpreter does not compile the kernels, so without a GPU this is the check that they
    compile to Hopper (sm_90) code, and that the autotuning set-up a GPU uses is sound."""
    import subprocess
    import sys
    from conftest import REPO
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time compile API ({e})")
    result = subprocess.run([sys.executable, '-c', HOPPER_COMPILE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'compiled' in result.stdout, result.stderr[-3000:]
