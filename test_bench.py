"""bench.py runs (on a CPU: the sdpa path, the reference and causal SDPA), and its FlexAttention
StableMask, a comparison on GPUs, computes StableMask."""

import re

import pytest
import torch

from bench import flex_stablemask
from conftest import run_script
from model import alibi_slopes, stablemask_reference


def test_quick_bench_prints_both_tables(tmp_path):
    """Every row is measured (or says why not: a backend this GPU lacks, out of memory), and the ratios
    are taken against the first implementation of each length, the causal baseline."""
    gpu = torch.cuda.is_available()
    out = run_script('bench.py', '--quick', *(['--tokens=4096', '--model_preset=tiny'] if gpu else []), cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| \d+ \|', line)]
    attention = [r for r in rows if r.count('|') == 9]
    model = [r for r in rows if r.count('|') == 7]
    expected = (['SDPA causal, flash', 'Triton StableMask (ours)', 'sdpa StableMask (ours)'] if gpu else
                ['SDPA causal', 'sdpa StableMask (ours)', 'reference StableMask'])
    assert len(attention) >= 6 and len(model) >= 3, out
    for name in expected:
        assert any(name in r for r in attention)
    for row in attention + model:
        cells = [c.strip() for c in row.strip('|').split('|')]
        if cells[2].startswith(('failed', 'out of memory')):
            assert not cells[2].endswith(':'), row  # the reason, not only its type
            continue
        assert all(cells[i] and cells[i] != 'nan' for i in range(len(cells) - 1)), row
    first_of_each_length = [r for i, r in enumerate(attention) if i == 0 or r.split('|')[1] != attention[i - 1].split('|')[1]]
    assert all('SDPA causal' in r and r.split('|')[7].strip() == '1.00' for r in first_of_each_length)


@pytest.mark.filterwarnings('ignore:.*flex_attention called without torch.compile')
def test_flex_stablemask_forward_matches_the_reference(monkeypatch):
    """FlexAttention's backward needs a GPU; its forward runs (eagerly) here. Its block mask is built
    once per length, not inside every timed call."""
    import torch.nn.attention.flex_attention as flex
    built = []
    make = flex.create_block_mask
    monkeypatch.setattr(flex, 'create_block_mask', lambda *a, **kw: built.append(a[3]) or make(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    gamma = alibi_slopes(3)
    attend = flex_stablemask(gamma)
    out = attend(q, k, v)
    ref = stablemask_reference(q.double(), k.double(), v.double(), gamma.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    torch.testing.assert_close(attend(q, k, v), out)
    assert built == [37]


def test_flex_is_compiled_once_per_shape(monkeypatch):
    """dynamo stops recompiling a function after 8 shapes and runs it eagerly (materialising T x T):
    bench.py resets it whenever the shape changes, so each shape gets its own compile."""
    import bench
    compiled, resets = [], []
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(torch._dynamo, 'reset', lambda: resets.append(1))
    monkeypatch.setattr(bench, '_flex', {})
    shapes = [((4, 16, T, 128), torch.bfloat16) for T in (512, 1024, 2048)] * 2 + [((4, 16, 512, 64), torch.float16)]
    for shape in shapes:
        for _ in range(4):  # forward, backward, both, memory: one shape, one compile
            bench._compiled_flex(shape)
    assert len(compiled) == len(resets) == 7 and all(kw == dict(dynamic=False) for kw in compiled)


def test_gpu_check_runs_its_steps_and_writes_a_summary(tmp_path):
    """gpu_check.py's plumbing, on a CPU: a step runs in its own process (here the GPU tests, which
    skip), and SUMMARY.txt says what each found. Without a GPU it refuses unless told otherwise."""
    result = run_script('gpu_check.py', f'--out_dir={tmp_path}', cwd=tmp_path, expect_ok=False)
    if not torch.cuda.is_available():
        assert result.returncode == 1 and result.stderr.strip() == 'gpu_check.py: error: no CUDA GPU here (--require_gpu=False runs the steps anyway)'
    run_script('gpu_check.py', '--require_gpu=False', '--steps=gpu_tests', f'--out_dir={tmp_path}', cwd=tmp_path)
    summary = (tmp_path / 'SUMMARY.txt').read_text()
    assert 'gpu_tests: PASS' in summary and ('skipped' in summary or 'passed' in summary), summary
    assert (tmp_path / 'gpu_tests.log').stat().st_size > 0
    result = run_script('gpu_check.py', '--require_gpu=False', '--steps=nope', f'--out_dir={tmp_path}', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and "unknown step 'nope'" in result.stderr
