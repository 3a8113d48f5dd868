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
    out = run_script('bench.py', '--quick', '--reps=2', *(['--tokens=4096', '--model_preset=tiny'] if gpu else []), cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| \d+ \|', line)]
    attention = [r for r in rows if r.count('|') == 10]
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
    assert all('SDPA causal' in r and r.split('|')[8].strip() == '1.00' for r in first_of_each_length)


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
    skip), and SUMMARY.txt says what each found, test by test. Without a GPU it refuses unless told otherwise."""
    result = run_script('gpu_check.py', f'--out_dir={tmp_path}', cwd=tmp_path, expect_ok=False)
    if not torch.cuda.is_available():
        assert result.returncode == 1 and result.stderr.count('\n') == 1 and 'no CUDA GPU here' in result.stderr
    run_script('gpu_check.py', '--require_gpu=False', '--steps=gpu_tests', f'--out_dir={tmp_path}', cwd=tmp_path)
    summary = (tmp_path / 'SUMMARY.txt').read_text()
    assert 'gpu_tests: PASS' in summary and re.search(r'\d+ passed, 0 failed, \d+ skipped', summary), summary
    assert 'test_gpu.py::test_decode_steps_on_the_gpu' in (tmp_path / 'gpu_tests.log').read_text()  # -v: each test named


def test_gpu_check_reports_failures_and_time_outs(tmp_path, monkeypatch):
    """A failing test is named with its first error line; a step past its timeout is stopped and
    named with the test it was in; the other steps still run."""
    import gpu_check
    (tmp_path / 'test_steps.py').write_text("import time\ndef test_fails():\n    assert 1 == 2, 'one is not two'\n"
                                            "def test_passes():\n    pass\ndef test_hangs():\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, 'REPO', str(tmp_path))
    monkeypatch.setattr(gpu_check, 'STEPS', {
        'failing': (gpu_check.PYTEST + ['test_steps.py', '-k', 'fails or passes'], 60, None, 'first'),
        'hanging': (gpu_check.PYTEST + ['test_steps.py', '-k', 'hangs'], 5, None, 'first')})
    for name, value in dict(out_dir=str(tmp_path / 'out'), require_gpu=False).items():
        monkeypatch.setattr(gpu_check, name, value)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 1
    summary = (tmp_path / 'out' / 'SUMMARY.txt').read_text()
    assert 'failing: FAIL (exit 1)' in summary and '1 passed, 1 failed' in summary
    assert 'FAILED test_steps.py::test_fails - AssertionError: one is not two' in summary
    assert 'hanging: TIMEOUT after 5 s' in summary and 'stopped in or after test_steps.py::test_hangs' in summary


def test_gpu_check_compiles_within_its_budget(tmp_path):
    """--dry_run runs each counted step's tests with the kernels replaced by a logger and counts what
    a GPU would compile (the autotuner simulated: every configuration it times at a new key, then its
    choice at each new specialisation): each step within its budget, and each budget within what its
    timeout allows. The counts are real: a forced-configuration step compiles at least every
    configuration of its dtype."""
    import gpu_check
    import stablemask_kernel as sk
    for name, (command, timeout, budget, autotune) in gpu_check.STEPS.items():
        assert budget is None or budget * gpu_check.seconds_per_compile <= timeout, name
    run_script('gpu_check.py', '--dry_run=True', f'--out_dir={tmp_path}', cwd=tmp_path, timeout=900)
    summary = (tmp_path / 'SUMMARY.txt').read_text()
    counts = {name: int(n) for name, n in re.findall(r'^(\w+): within budget in .*?; (\d+) kernels compiled', summary, re.M)}
    assert set(counts) == {name for name, step in gpu_check.STEPS.items() if step[2] is not None}, summary
    for bits, names in ((16, ('configs_bf16', 'configs_fp16')), (32, ('configs_fp32',))):
        every = sum(len(choices) for key, choices in sk.CONFIGS.items() if key[1] == bits)
        assert all(counts[name] >= every for name in names), (counts, every)
    assert counts['kernel_suite'] > 10 and counts['model_suite'] > 3
