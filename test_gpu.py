"""
What only a GPU can check, each test skipped without CUDA: every autotune configuration of the three
Triton kernels forced once against float64 (bf16, fp16, fp32), the sdpa path's CUDA branches (cuDNN,
flash, memory-efficient, padded head dims), the default bf16 path as the model feeds it (q, k, v views
of one projection; a decode step on cuDNN; PyTorch's own cuDNN attention beside ours; the
deterministic mode), decode steps, autotuning once per length bucket, and train.py on the GPU: eager
against torch.compile, and FSDP against the same run unsharded. `python gpu_check.py` runs these, the
rest of the suite on the GPU and a short benchmark, in one command; its dry run runs the tests that
launch the Triton kernels here too, the kernels only logged, to count what they compile.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import kernel_configs as kc  # before triton: off a GPU it sets TRITON_INTERPRET, read on import
import stablemask_kernel as sk
import stablemask_sdpa as sdpa_module
import triton
from configurator import GPU_PEAK_FLOPS
from conftest import DRY_RUN, run_script
import model
from model import GPT, FixedKVCache, GPTConfig, KVCache, alibi_slopes, stablemask_reference, stablemask_sdpa
from stablemask_sdpa import fused_kernel
from test_kernel import DEVICE, IMPLS, TOLERANCE, check, inputs, rel_err, run_torch_causal

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_GPU and not DRY_RUN, reason='needs a CUDA GPU')
gpu_only = pytest.mark.skipif(
    not ON_GPU, reason='needs a CUDA GPU (gpu_check.py --dry_run counts only the kernels forced)')
# dtype, T, head dim (80: padded to 128), ALiBi, pseudo_len beyond T, K/V heads of the 4 query heads
FORCED = [
    (torch.bfloat16, 257, 128, True, 0, 4), (torch.bfloat16, 300, 64, False, 40, 2),
    (torch.bfloat16, 33, 80, False, 7, 1), (torch.float16, 200, 128, False, 0, 1),
    (torch.float16, 1, 64, True, 0, 4), (torch.float32, 200, 64, True, 0, 1),
    (torch.float32, 77, 128, False, 3, 2)]
MOST = max(len(choices) for choices in kc.CONFIGS.values())


@pytest.mark.parametrize('index', range(MOST))
@pytest.mark.parametrize('dtype,T,D,alibi,extra,kv_heads', FORCED,
                         ids=[f"{str(c[0])[6:]}-T{c[1]}-D{c[2]}" for c in FORCED])
def test_every_autotune_config_against_float64(poisoned, monkeypatch, index, dtype, T, D, alibi, extra,
                                               kv_heads):
    """Each configuration the autotuner may pick, forced for all three kernels (a kernel with fewer
    configurations runs its last), against float64, dQ both by atomics and by its own kernel;
    grouped-query attention in some cases."""
    width = max(16, 1 << (D - 1).bit_length())
    lists = {name: kc.configs_for(name, dtype, width) for name in kc.TILES}
    if index >= max(len(configs) for configs in lists.values()):
        pytest.skip(f"{dtype} at head dim {width} has fewer configurations")
    forced = {name: configs[min(index, len(configs) - 1)] for name, configs in lists.items()}
    monkeypatch.setattr(kc, 'configs_for', lambda name, dtype, head_dim: [forced[name]])
    for kernel in sk._kernels.values():
        if isinstance(kernel, triton.runtime.Autotuner):
            monkeypatch.setattr(kernel, 'cache', {})  # tune anew: the one configuration
    q, k, v, do = inputs(2, 4, T, D, dtype, seed=index, kv_heads=kv_heads)
    for dq in ('atomic', 'separate'):
        monkeypatch.setattr(kc, 'DQ', dq)
        check('kernel', q, k, v, do, alibi_slopes(4), alibi_slopes(4) if alibi else None, T + extra)


@gpu_only
def test_shared_memory_limit_of_the_current_gpu():
    """torch.device('cuda') has no index: it means the current GPU (Triton's query wants an int)."""
    current = torch.device('cuda', torch.cuda.current_device())
    assert kc.shared_memory_limit(torch.device('cuda')) == kc.shared_memory_limit(current) > 0


@gpu_only
@pytest.mark.parametrize('dtype,D,alibi,kind', [
    (torch.bfloat16, 128, False, 'cudnn'), (torch.float16, 20, False, 'cudnn'),
    (torch.bfloat16, 64, False, 'cudnn'), (torch.bfloat16, 128, False, 'flash'),
    (torch.float16, 20, False, 'flash'), (torch.bfloat16, 160, False, 'flash'),
    (torch.bfloat16, 64, True, 'efficient'), (torch.float32, 64, False, 'efficient'),
    (torch.float32, 36, True, 'efficient')])
def test_sdpa_cuda_branches(poisoned, monkeypatch, dtype, D, alibi, kind):
    """Every fused backend the sdpa path corrects, each forced where this GPU has it, against float64
    (forward and every gradient): cuDNN (Hopper on), flash (Ampere on), memory-efficient."""
    need = {'cudnn': (9, 0), 'flash': (8, 0), 'efficient': (5, 0)}[kind]
    if torch.cuda.get_device_capability() < need:
        pytest.skip(f"{kind} needs sm{need[0]}{need[1]}")
    width = -(-D // 8) * 8
    assert fused_kernel('cuda', dtype, D, alibi, (9, 0))[1] == width
    monkeypatch.setattr(sdpa_module, 'fused_kernel', lambda *args: (kind, width))
    q, k, v, do = inputs(2, 3, 77, D, dtype, seed=D)
    check('sdpa', q, k, v, do, alibi_slopes(3), alibi_slopes(3) if alibi else None)


def projected(B, T, H, kv_heads, D, dtype, seed=0, device=DEVICE):
    """(q, k, v, their leaf): q, k, v as model.CausalSelfAttention makes them, views (B, H, T, D) of one
    c_attn projection (B, T, (H + 2 kv_heads) D) split into heads, which is the leaf."""
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(B, T, (H + 2 * kv_heads) * D, generator=g).to(device, dtype).requires_grad_()
    return (*projected_from(leaf, H, kv_heads, D), leaf)


def projected_from(leaf, H, kv_heads, D):
    """q, k, v (B, H or kv_heads, T, D): views of a projection (B, T, (H + 2 kv_heads) D), as the model's."""
    B, T, _ = leaf.shape
    qk, v = leaf.view(B, T, H + 2 * kv_heads, D).split([H + kv_heads, kv_heads], dim=2)
    q, k = (t.transpose(1, 2) for t in qk.split([H, kv_heads], dim=2))
    return q, k, v.transpose(1, 2)


def the_models_do(B, T, H, D, dtype, seed=1, device=DEVICE):
    """dO as the model hands it back, y.transpose(1, 2).contiguous()'s gradient: (B, T, H, D) in memory."""
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed))
    return do.to(device, dtype).transpose(1, 2)


def attend(impl, q, k, v, gamma):
    """StableMask on the path attn_impl=`impl` takes for q, k, v; 'auto' as the model decides
    (model.auto_impl: on CUDA without ALiBi the sdpa path)."""
    impl = model.auto_impl(q.device.type, None, None) if impl == 'auto' else impl
    return IMPLS['kernel' if impl == 'triton' else impl](q, k, v, gamma, None, None)


def fused_kinds(monkeypatch):
    """The fused kernels the sdpa path calls from here on, by name ('cudnn', 'flash', ...)."""
    kinds, forward = [], sdpa_module._fused_forward
    monkeypatch.setattr(sdpa_module, '_fused_forward',
                        lambda kind, *args: kinds.append(kind) or forward(kind, *args))
    return kinds


def cudnn_here():
    """Whether the sdpa path takes cuDNN's attention on this GPU (Hopper on)."""
    return ON_GPU and fused_kernel('cuda', torch.bfloat16, 64, False,
                                   torch.cuda.get_device_capability())[0] == 'cudnn'


@pytest.mark.parametrize('impl', ['auto', 'triton'])
@pytest.mark.parametrize('H,kv_heads,D', [(4, 4, 128), (4, 2, 64)])
def test_the_models_layout_in_bf16(poisoned, monkeypatch, impl, H, kv_heads, D):
    """The default GPU path as the model feeds it: bf16 q, k, v views of one projection (grouped-query
    attention too) and dO in the model's layout, through attn_impl 'auto' (RoPE's: the sdpa path, on
    cuDNN on Hopper) and 'triton', against float64: the output and the projection's gradient."""
    kinds = fused_kinds(monkeypatch)
    q, k, v, leaf = projected(2, 77, H, kv_heads, D, torch.bfloat16)
    do = the_models_do(2, 77, H, D, torch.bfloat16)
    gamma = alibi_slopes(H).to(DEVICE)
    out = attend(impl, q, k, v, gamma)
    grad, = torch.autograd.grad(out, leaf, do)
    leaf64 = leaf.detach().double().requires_grad_()
    ref = attend('reference', *projected_from(leaf64, H, kv_heads, D), gamma.double())
    grad64, = torch.autograd.grad(ref, leaf64, do.double())
    tolerance = TOLERANCE[torch.bfloat16]
    assert rel_err(out, ref) <= tolerance and rel_err(grad, grad64) <= tolerance
    if impl == 'auto' and cudnn_here():
        assert kinds == ['cudnn'], kinds


@gpu_only
@pytest.mark.parametrize('kv_heads,D', [(4, 128), (2, 64)])
def test_a_decode_step_on_cudnn_in_bf16(poisoned, monkeypatch, kv_heads, D):
    """A decode step (one query) in bf16, as the model makes it: the query a view of one projection,
    the keys and values a cache's first T rows, grouped-query attention too; on cuDNN where the GPU
    has it (Hopper on), against float64, past and within the pseudo columns."""
    kinds = fused_kinds(monkeypatch)
    H, T = 4, 50
    q, _, _, _ = projected(2, 1, H, kv_heads, D, torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(2, kv_heads, 64, D, generator=g).to('cuda', torch.bfloat16)[:, :, :T] for _ in 'kv')
    gamma = alibi_slopes(H).cuda()
    for pseudo_len in (64, 40):
        with torch.no_grad():
            out = stablemask_sdpa(q.detach(), k, v, gamma, pseudo_len=pseudo_len)
        # the query is the last of the T positions
        ref = stablemask_reference(*(t.detach().double() for t in (q, k, v, gamma)), pseudo_len=pseudo_len)
        assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16], (pseudo_len, rel_err(out, ref))
    if cudnn_here():
        assert kinds == ['cudnn', 'cudnn'], kinds


@gpu_only
def test_pytorch_cudnn_attention_and_ours_in_one_process(poisoned, monkeypatch):
    """cuDNN keeps the graphs it builds: PyTorch's own cuDNN attention (causal) and the sdpa path's
    (StableMask, cuDNN under it) at one shape in one process, in turn, twice over, each with dO in a
    layout the other did not plan for (contiguous, the model's (B, T, H, D), a slice of a wider
    tensor): every output and gradient against float64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not cudnn_here():
        pytest.skip('cuDNN attention needs Hopper (sm90) or newer')
    kinds = fused_kinds(monkeypatch)
    B, H, T, D = 2, 4, 77, 64
    q, k, v, _ = inputs(B, H, T, D, torch.bfloat16, seed=5)
    gamma = alibi_slopes(H).cuda()
    base = torch.randn(B, H, T, 2 * D, generator=torch.Generator().manual_seed(6)).to('cuda', torch.bfloat16)
    layouts = {'contiguous': base[..., :D].contiguous(), 'sliced': base[..., :D],
               'the model': base[..., :D].transpose(1, 2).contiguous().transpose(1, 2)}
    for _ in range(2):
        for layout, do in layouts.items():
            for who in ('pytorch', 'ours'):
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                if who == 'pytorch':
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
                    expected = run_torch_causal(q, k, v, do)
                else:
                    out = stablemask_sdpa(*leaves, gamma)
                    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
                    ref = stablemask_reference(*ref_leaves, gamma.double())
                    expected = (ref, *torch.autograd.grad(ref, ref_leaves, do.double()))
                got = (out, *torch.autograd.grad(out, leaves, do))
                for name, x, r in zip(('out', 'dq', 'dk', 'dv'), got, expected):
                    err = rel_err(x, r)
                    assert err <= TOLERANCE[torch.bfloat16], f"{who}, dO {layout}: {name} {err:.2e}"
    assert kinds == ['cudnn'] * 6


@pytest.mark.parametrize('impl', ['auto', 'triton'])
def test_the_deterministic_mode(impl):
    """Under torch.use_deterministic_algorithms(True), with nothing let off with a warning: the default
    path (cuDNN's on Hopper) and the Triton kernel (dQ by its own kernel, no atomics) run, in bf16 as
    the model feeds them, give the same bits twice, and match float64."""
    q, k, v, leaf = projected(2, 77, 4, 2, 64, torch.bfloat16)
    do = the_models_do(2, 77, 4, 64, torch.bfloat16)
    gamma = alibi_slopes(4).to(DEVICE)
    leaf64 = leaf.detach().double().requires_grad_()
    ref = attend('reference', *projected_from(leaf64, 4, 2, 64), gamma.double())
    grad64, = torch.autograd.grad(ref, leaf64, do.double())
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out = attend(impl, *projected_from(leaf, 4, 2, 64), gamma)
            runs.append((out.detach(), *torch.autograd.grad(out, leaf, do)))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    tolerance = TOLERANCE[torch.bfloat16]
    assert rel_err(runs[0][0], ref) <= tolerance and rel_err(runs[0][1], grad64) <= tolerance


@gpu_only
@pytest.mark.parametrize('n_embd,n_head,pos_enc', [(64, 2, 'rope'), (60, 3, 'alibi'), (320, 2, 'rope')])
@pytest.mark.parametrize('window', [None, 24])
@pytest.mark.parametrize('Cache', [KVCache, FixedKVCache])
def test_decode_steps_on_the_gpu(n_embd, n_head, pos_enc, window, Cache):
    """Cached decode steps (the sdpa path, one query; the fixed cache's through its ring's bias, on
    the memory-efficient kernel) equal a full forward pass (the Triton kernel, or sdpa where a window
    or a head dim past 128 rules it out), head dims 32, 20 and 160."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=24, vocab_size=97, n_layer=2, n_head=n_head, n_embd=n_embd,
                       pos_enc=pos_enc)
    model = GPT(config).cuda().eval()
    idx = torch.randint(0, 97, (2, 60), device='cuda')
    cache = Cache(model.config.n_layer, 60, window)
    with torch.no_grad():
        steps = [model(idx[:, :10], pseudo_len=24, kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], pseudo_len=24, kv_cache=cache)[0] for t in range(10, 60)]
        full = model(idx, targets=idx, pseudo_len=24, window=window)[0]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-3, atol=1e-3)


@gpu_only
def test_generation_tunes_once_per_length_bucket():
    """Uncached generation runs the Triton forward at every length, from 70 to 109: tuned once per
    bucket, not per token."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=97, n_layer=1, n_head=2, n_embd=64, attn_impl='triton')
    model = GPT(config).cuda().eval()
    before = len(sk._kernels['fwd'].cache)
    model.generate(torch.randint(0, 97, (1, 70), device='cuda'), 40, temperature=0, use_cache=False)
    assert len(sk._kernels['fwd'].cache) - before <= 1


@gpu_only
def test_train_on_the_gpu_eager_and_compiled(tmp_path):
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    args = ['--n_layer=2', '--n_head=2', '--n_embd=128', '--block_size=256', '--batch_size=8',
            '--max_iters=20', '--eval_interval=20', '--eval_iters=2', '--log_interval=5',
            '--attn_impl=triton']
    logs = {}
    for compile in (False, True):
        run_script('train.py', *args, f'--compile={compile}', f'--out_dir=out-{compile}', cwd=tmp_path)
        with open(tmp_path / f'out-{compile}' / 'log.jsonl') as f:
            logs[compile] = [json.loads(line) for line in f]
    eager, compiled = ([r['loss'] for r in logs[c] if 'loss' in r] for c in (False, True))
    assert len(eager) == len(compiled) == 4 and eager[-1] < eager[0]
    assert compiled == pytest.approx(eager, rel=2e-2)  # bf16 autocast; fused and unfused rounding differ
    if any(key in torch.cuda.get_device_name() for key in GPU_PEAK_FLOPS):
        assert 0 < logs[False][-1]['mfu'] < 1
    assert os.path.getsize(tmp_path / 'out-True' / 'ckpt.pt') > 0


@gpu_only
def test_fsdp_trains_compiled_on_one_gpu(tmp_path):
    """FSDP2 with torch.compile and bf16 mixed precision, one GPU a world of one, two steps and a
    sharded save, then resumed for one more: the losses of the same three steps unsharded, eager,
    in float32, to bf16's rounding."""
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    args = ['--n_layer=2', '--n_head=2', '--n_embd=128', '--block_size=256', '--batch_size=8',
            '--eval_interval=2', '--eval_iters=2', '--log_interval=1']
    sharded = ['--fsdp=True', '--compile=True', '--activation_checkpointing=True']
    run_script('train.py', *args, *sharded, '--max_iters=2', '--out_dir=out-fsdp', cwd=tmp_path)
    assert (tmp_path / 'out-fsdp' / 'ckpt.dcp' / 'run.json').exists()
    run_script('train.py', '--init_from=resume', '--out_dir=out-fsdp', '--max_iters=3', cwd=tmp_path)
    run_script('train.py', *args, '--dtype=float32', '--max_iters=3', '--out_dir=out-ref', cwd=tmp_path)
    losses = {name: losses_by_step(tmp_path / name / 'log.jsonl') for name in ('out-fsdp', 'out-ref')}
    assert sorted(losses['out-fsdp']) == sorted(losses['out-ref']) == [0, 1, 2], losses
    for step, loss in losses['out-fsdp'].items():
        assert loss == pytest.approx(losses['out-ref'][step], rel=2e-2), (step, losses)


def losses_by_step(log):
    """{iter: training loss} of a run's log.jsonl (a resumed run's rows after the first run's)."""
    with open(log) as f:
        return {row['iter']: row['loss'] for row in map(json.loads, f) if 'loss' in row}
