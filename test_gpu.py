"""
What only a GPU can check, each test skipped without CUDA: every autotune configuration of the three
Triton kernels forced once against float64 (bf16, fp16, fp32), the sdpa path's CUDA branches (flash,
memory-efficient, padded head dims) and decode steps, autotuning once per length bucket, and train.py
on the GPU, eager against torch.compile. `python gpu_check.py` runs these, the rest of the suite on
the GPU and a short benchmark, in one command.
"""

import json
import os

import pytest
import torch
import triton

import stablemask_kernel as sk
import stablemask_sdpa as sdpa_module
from conftest import run_script
from model import GPT, GPU_PEAK_FLOPS, FixedKVCache, GPTConfig, KVCache, alibi_slopes
from stablemask_sdpa import fused_kernel
from test_kernel import check, inputs

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not ON_GPU and not sk.DRY_RUN, reason='needs a CUDA GPU')
gpu_only = pytest.mark.skipif(not ON_GPU, reason='needs a CUDA GPU (gpu_check.py --dry_run counts only the kernels forced)')
FORCED = [  # dtype, T, head dim (80: padded to 128), ALiBi, pseudo_len beyond T, K/V heads of the 4 query heads
    (torch.bfloat16, 257, 128, True, 0, 4), (torch.bfloat16, 300, 64, False, 40, 2), (torch.bfloat16, 33, 80, False, 7, 1),
    (torch.float16, 200, 128, False, 0, 1), (torch.float16, 1, 64, True, 0, 4),
    (torch.float32, 200, 64, True, 0, 1), (torch.float32, 77, 128, False, 3, 2)]
MOST = max(len(choices) for choices in sk.CONFIGS.values())


@pytest.mark.parametrize('index', range(MOST))
@pytest.mark.parametrize('dtype,T,D,alibi,extra,kv_heads', FORCED, ids=[f"{str(c[0])[6:]}-T{c[1]}-D{c[2]}" for c in FORCED])
def test_every_autotune_config_against_float64(poisoned, monkeypatch, index, dtype, T, D, alibi, extra, kv_heads):
    """Each configuration the autotuner may pick, forced for all three kernels (a kernel with fewer
    configurations runs its last), against float64, dQ both by atomics and by its own kernel;
    grouped-query attention in some cases."""
    width = max(16, 1 << (D - 1).bit_length())
    lists = {name: sk.configs_for(name, dtype, width) for name in sk.TILES}
    if index >= max(len(configs) for configs in lists.values()):
        pytest.skip(f"{dtype} at head dim {width} has fewer configurations")
    forced = {name: configs[min(index, len(configs) - 1)] for name, configs in lists.items()}
    monkeypatch.setattr(sk, 'configs_for', lambda name, dtype, head_dim: [forced[name]])
    for kernel in sk._kernels.values():
        if isinstance(kernel, triton.runtime.Autotuner):
            monkeypatch.setattr(kernel, 'cache', {})  # tune anew: the one configuration
    q, k, v, do = inputs(2, 4, T, D, dtype, seed=index, kv_heads=kv_heads)
    for dq in ('atomic', 'separate'):
        monkeypatch.setattr(sk, 'DQ', dq)
        check('kernel', q, k, v, do, alibi_slopes(4), alibi_slopes(4) if alibi else None, T + extra)


@gpu_only
def test_shared_memory_limit_of_the_current_gpu():
    """torch.device('cuda') has no index: it means the current GPU (Triton's query wants an int)."""
    current = torch.device('cuda', torch.cuda.current_device())
    assert sk._shared_memory_limit(torch.device('cuda')) == sk._shared_memory_limit(current) > 0


@gpu_only
@pytest.mark.parametrize('dtype,D,alibi,kind', [
    (torch.bfloat16, 128, False, 'cudnn'), (torch.float16, 20, False, 'cudnn'), (torch.bfloat16, 64, False, 'cudnn'),
    (torch.bfloat16, 128, False, 'flash'), (torch.float16, 20, False, 'flash'), (torch.bfloat16, 160, False, 'flash'),
    (torch.bfloat16, 64, True, 'efficient'), (torch.float32, 64, False, 'efficient'), (torch.float32, 36, True, 'efficient')])
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


@gpu_only
@pytest.mark.parametrize('n_embd,n_head,pos_enc', [(64, 2, 'rope'), (60, 3, 'alibi'), (320, 2, 'rope')])
@pytest.mark.parametrize('window', [None, 24])
@pytest.mark.parametrize('Cache', [KVCache, FixedKVCache])
def test_decode_steps_on_the_gpu(n_embd, n_head, pos_enc, window, Cache):
    """Cached decode steps (the sdpa path, one query; the fixed cache's through its ring's bias, on
    the memory-efficient kernel) equal a full forward pass (the Triton kernel, or sdpa where a window
    or a head dim past 128 rules it out), head dims 32, 20 and 160."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=97, n_layer=2, n_head=n_head, n_embd=n_embd, pos_enc=pos_enc)).cuda().eval()
    idx = torch.randint(0, 97, (2, 60), device='cuda')
    cache = Cache(model.config.n_layer, 60, window)
    with torch.no_grad():
        steps = [model(idx[:, :10], pseudo_len=24, kv_cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], pseudo_len=24, kv_cache=cache)[0] for t in range(10, 60)]
        full = model(idx, targets=idx, pseudo_len=24, window=window)[0]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-3, atol=1e-3)


@gpu_only
def test_generation_tunes_once_per_length_bucket():
    """Uncached generation runs the Triton forward at every length: tuned once per bucket, not per token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=97, n_layer=1, n_head=2, n_embd=64, attn_impl='triton')).cuda().eval()
    before = len(sk._kernels['fwd'].cache)
    model.generate(torch.randint(0, 97, (1, 70), device='cuda'), 40, temperature=0, use_cache=False)  # lengths 70 to 109
    assert len(sk._kernels['fwd'].cache) - before <= 1


@gpu_only
def test_train_on_the_gpu_eager_and_compiled(tmp_path):
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    args = ['--n_layer=2', '--n_head=2', '--n_embd=128', '--block_size=256', '--batch_size=8', '--max_iters=20',
            '--eval_interval=20', '--eval_iters=2', '--log_interval=5', '--attn_impl=triton']
    logs = {}
    for compile in (False, True):
        run_script('train.py', *args, f'--compile={compile}', f'--out_dir=out-{compile}', cwd=tmp_path, timeout=600)
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
    sharded save; then resumed for one more."""
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    args = ['--n_layer=2', '--n_head=2', '--n_embd=128', '--block_size=256', '--batch_size=8', '--eval_interval=2',
            '--eval_iters=2', '--log_interval=1', '--fsdp=True', '--compile=True', '--activation_checkpointing=True']
    run_script('train.py', *args, '--max_iters=2', '--out_dir=out-fsdp', cwd=tmp_path, timeout=600)
    assert (tmp_path / 'out-fsdp' / 'ckpt.dcp' / 'run.json').exists()
    run_script('train.py', '--init_from=resume', '--out_dir=out-fsdp', '--max_iters=3', cwd=tmp_path, timeout=600)
    with open(tmp_path / 'out-fsdp' / 'log.jsonl') as f:
        losses = [json.loads(line)['loss'] for line in f if '"loss"' in line]
    assert len(losses) == 3 and all(l == l for l in losses)  # no NaN
